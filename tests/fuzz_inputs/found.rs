//! The inputs that broke the readers before their fixes, kept as regression cases.

use crate::nifti::NIFTI_FACTOR;
use crate::weights::{encode_safetensors, header_json, split_safetensors, WEIGHTS_FACTOR};
use crate::{gzip, root, vm_hwm_kb, Tally, SERIAL};
use m2unet::io::read_volume;
use m2unet::io::weights::load_model_bytes;
use serde_json::{json, Value};

/// Runs one input that must be rejected with a message saying `why`.
fn expect_rejected(
    tally: &mut Tally,
    (what, name): (&str, &str),
    (size, factor): (usize, usize),
    why: &str,
    parse: impl FnOnce() -> Result<(), String>,
) {
    tally.run(what, name, size, factor, || match parse() {
        Ok(()) => Err("accepted".into()),
        Err(e) if e.contains(why) => {
            println!("{what}: {e}");
            Ok(Err(e))
        }
        Err(e) => Err(format!("rejected without saying {why:?}: {e}")),
    });
}

/// The inputs that broke the readers before their fixes: each is now an error naming the file
/// and saying why, within the heap bound.
#[test]
fn inputs_that_broke_the_readers_stay_rejected() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let hwm = vm_hwm_kb();
    let mut tally = Tally::default();
    // NIfTI: a bare 352-byte header whose data would start at 4 GB, or whose dims declare a
    // 1024×1024×2048 float64 volume (the reader used to reserve 4 and 16 GiB up front).
    let seed = std::fs::read(root().join("fuzz/corpus/nifti/seed-int16-ras.nii")).unwrap();
    let mut far = seed[..352].to_vec();
    far[108..112].copy_from_slice(&4e9f32.to_le_bytes());
    let mut huge = seed[..352].to_vec();
    for (off, v) in [(42, 1024i16), (44, 1024), (46, 2048), (70, 64), (72, 64)] {
        huge[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    for (i, (what, bytes)) in [("vox_offset 4e9", far), ("1024×1024×2048 float64", huge)]
        .into_iter()
        .enumerate()
    {
        for (ext, file) in [("nii", bytes.clone()), ("nii.gz", gzip(&bytes))] {
            let name = format!("found{i}.{ext}");
            let path = dir.path().join(&name);
            std::fs::write(&path, file).unwrap();
            let parse = || read_volume(&path).map(|_| ()).map_err(|e| format!("{e:#}"));
            let size = (bytes.len(), NIFTI_FACTOR);
            expect_rejected(&mut tally, (what, &name), size, "truncated", parse);
        }
    }
    // Weights whose shapes describe a model far larger than the file: a zero-element
    // enc1.conv1.weight 2^40 wide (an 88 TB allocation: abort), one 4096 wide with its data
    // (a 4.8 GB model filled with random values); and a 2^30 patch side (was accepted).
    let seed = std::fs::read(root().join("fuzz/corpus/weights/seed-tiny-f16.safetensors")).unwrap();
    let (entries, metadata) = split_safetensors(&seed);
    let lie = |shape: Vec<u64>, metadata: &Value| {
        let mut entries = entries.clone();
        let e = entries
            .iter_mut()
            .find(|e| e.name == "enc1.conv1.weight")
            .unwrap();
        e.bytes = vec![0; (shape.iter().product::<u64>() * 2) as usize];
        e.shape = shape;
        encode_safetensors(&header_json(&entries, metadata).to_string(), &entries)
    };
    let mut big_patch = metadata.clone();
    big_patch["patch"] = json!("1073741824");
    let cases = [
        (
            "zero-element 2^40-wide enc1",
            lie(vec![1 << 40, 1, 3, 0], &metadata),
            "beyond the 65536 channels",
        ),
        (
            "4096-wide enc1",
            lie(vec![4096, 1, 3, 3], &metadata),
            "the file holds only",
        ),
        ("patch 2^30", lie(vec![8, 1, 3, 3], &big_patch), "patch"),
    ];
    for (i, (what, bytes, why)) in cases.into_iter().enumerate() {
        let name = format!("found{i}.safetensors");
        let parse = || {
            load_model_bytes(&bytes, &name)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        };
        let size = (bytes.len(), WEIGHTS_FACTOR);
        expect_rejected(&mut tally, (what, &name), size, why, parse);
    }
    tally.report("found inputs", vm_hwm_kb() - hwm, false);
    assert_eq!(tally.rejected, tally.tried);
}
