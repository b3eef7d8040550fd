//! NIfTI files: header-field, datatype, length and gzip mutations of valid volumes.

use crate::{
    flip_bits, gzip, inflated_len, overwrite_bytes, root, truncate_or_extend, vm_hwm_kb, Tally,
    SERIAL,
};
use flate2::read::MultiGzDecoder;
use m2unet::io::read_volume;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Read;
use std::path::{Path, PathBuf};

/// NIfTI-1 header fields: name, byte offset, kind (2 = i16, 4 = i32, 0 = f32).
const NIFTI_FIELDS: &[(&str, usize, u8)] = &[
    ("sizeof_hdr", 0, 4),
    ("dim[0]", 40, 2),
    ("dim[1]", 42, 2),
    ("dim[2]", 44, 2),
    ("dim[3]", 46, 2),
    ("dim[4]", 48, 2),
    ("dim[5]", 50, 2),
    ("datatype", 70, 2),
    ("bitpix", 72, 2),
    ("pixdim[0]", 76, 0),
    ("pixdim[1]", 80, 0),
    ("pixdim[2]", 84, 0),
    ("pixdim[3]", 88, 0),
    ("vox_offset", 108, 0),
    ("scl_slope", 112, 0),
    ("scl_inter", 116, 0),
    ("qform_code", 252, 2),
    ("sform_code", 254, 2),
    ("quatern_b", 256, 0),
    ("quatern_c", 260, 0),
    ("quatern_d", 264, 0),
    ("qoffset_x", 268, 0),
    ("srow_x[0]", 280, 0),
    ("srow_x[1]", 284, 0),
    ("srow_x[3]", 292, 0),
    ("srow_y[1]", 300, 0),
    ("srow_y[2]", 304, 0),
    ("srow_z[0]", 312, 0),
    ("srow_z[2]", 320, 0),
    ("srow_z[3]", 324, 0),
];

const I16_VALUES: &[i16] = &[
    0,
    1,
    -1,
    2,
    3,
    4,
    7,
    8,
    15,
    16,
    64,
    256,
    512,
    768,
    1024,
    2048,
    i16::MAX,
    i16::MIN,
];
const F32_VALUES: &[f32] = &[
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-30,
    1e-45,
    1e27,
    1e30,
    -1e30,
    f32::MAX,
    f32::MIN,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    351.0,
    352.0,
    353.5,
    1e6,
    4e9,
    1e10,
];

/// Sets a header field in the file's byte order (from sizeof_hdr).
fn set_field(b: &mut [u8], off: usize, kind: u8, rng: &mut ChaCha8Rng) -> String {
    let big = b[0..4] != 348i32.to_le_bytes();
    let put = |b: &mut [u8], bytes: &[u8]| {
        let mut v = bytes.to_vec();
        if big {
            v.reverse();
        }
        b[off..off + v.len()].copy_from_slice(&v);
    };
    match kind {
        2 => {
            let v = if rng.gen_bool(0.8) {
                *I16_VALUES.choose(rng).unwrap()
            } else {
                rng.gen()
            };
            put(b, &v.to_le_bytes());
            v.to_string()
        }
        4 => {
            let v = *[0, -1, 348, 540, 348i32.swap_bytes(), i32::MAX, i32::MIN]
                .choose(rng)
                .unwrap();
            put(b, &v.to_le_bytes());
            v.to_string()
        }
        _ => {
            let v = if rng.gen_bool(0.8) {
                *F32_VALUES.choose(rng).unwrap()
            } else {
                f32::from_bits(rng.gen())
            };
            put(b, &v.to_le_bytes());
            format!("{v:e}")
        }
    }
}

/// One mutation of a plain (inflated) NIfTI file; returns its description.
fn mutate_nifti(rng: &mut ChaCha8Rng, b: &mut Vec<u8>) -> String {
    let header_ops = if b.len() >= 352 { 0 } else { 5 };
    match rng.gen_range(header_ops..7) {
        0..=2 => {
            let (field, off, kind) = *NIFTI_FIELDS.choose(rng).unwrap();
            let v = set_field(b, off, kind, rng);
            format!("{field} = {v}")
        }
        3 => {
            let code = *[
                2i16, 4, 8, 16, 64, 512, 1, 128, 256, 768, 1024, 1792, 2304, -1,
            ]
            .choose(rng)
            .unwrap();
            let bits = *[8i16, 16, 32, 64, 0, 128].choose(rng).unwrap();
            let big = b[0..4] != 348i32.to_le_bytes();
            let enc = |v: i16| {
                if big {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                }
            };
            b[70..72].copy_from_slice(&enc(code));
            b[72..74].copy_from_slice(&enc(bits));
            format!("datatype {code}, bitpix {bits}")
        }
        4 => {
            flip_bits(rng, b, 0..352);
            "header bit flips".into()
        }
        5 => {
            let len = b.len();
            if rng.gen_bool(0.5) {
                flip_bits(rng, b, 0..len);
            } else {
                overwrite_bytes(rng, b, 0..len);
            }
            "bit flips / byte overwrites anywhere".into()
        }
        _ => {
            truncate_or_extend(rng, b);
            format!("length {}", b.len())
        }
    }
}

/// Every rejection names the file; every accepted volume holds its declared voxels, all
/// finite, on a grid no smaller than the reader's minimum, with a finite voxel volume.
fn check_volume(path: &Path, plain_len: usize) -> Result<Result<(), String>, String> {
    let volume = match read_volume(path) {
        Ok(v) => v,
        Err(e) => return Ok(Err(format!("{e:#}"))),
    };
    let nvox: usize = volume.dims.iter().product();
    let size = match volume.dtype {
        "uint8" => 1,
        "int16" | "uint16" => 2,
        "int32" | "float32" => 4,
        _ => 8,
    };
    let declared_end = volume.header.vox_offset as usize + nvox * size;
    if declared_end > plain_len {
        return Err(format!(
            "accepted, but the header promises {declared_end} bytes and the file has {plain_len}"
        ));
    }
    if volume.data.len() != nvox || volume.canonical_data().len() != nvox {
        return Err(format!(
            "{} values for dims {:?}",
            volume.data.len(),
            volume.dims
        ));
    }
    if volume.data.iter().any(|v| !v.is_finite()) || !volume.voxel_ml().is_finite() {
        return Err("accepted non-finite values".into());
    }
    let c = volume.canonical_dims();
    if c[0] < 16 || c[1] < 16 || c[2] < 2 {
        return Err(format!("accepted a {c:?} grid"));
    }
    Ok(Ok(()))
}

fn nifti_seeds() -> Vec<(String, Vec<u8>)> {
    let corpus = root().join("fuzz/corpus/nifti");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
        })
        .collect();
    names.sort();
    for f in [
        "big_endian_int16_lps.nii",
        "qform_only_las_uint16.nii.gz",
        "sform_only_oblique_float32.nii.gz",
        "sform_wins_int32.nii",
    ] {
        names.push(root().join("tests/fixtures/nifti").join(f));
    }
    names
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).unwrap();
            let mut plain = Vec::new();
            if bytes.starts_with(&[0x1f, 0x8b]) {
                MultiGzDecoder::new(&bytes[..])
                    .read_to_end(&mut plain)
                    .unwrap();
            } else {
                plain = bytes;
            }
            (p.file_name().unwrap().to_string_lossy().into_owned(), plain)
        })
        .collect()
}

/// Heap growth per byte the NIfTI reader sees: the raw bytes (1×), the f32 voxels (≤ 4× for
/// uint8), the canonical copy (4×) and vector growth slack (≤ 2×), with margin.
pub const NIFTI_FACTOR: usize = 16;

#[test]
fn mutated_nifti_files_are_rejected_cleanly_within_bounded_memory() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let seeds = nifti_seeds();
    for (name, plain) in &seeds {
        let path = dir.path().join(name);
        std::fs::write(&path, plain).unwrap();
        let v = read_volume(&path).unwrap_or_else(|e| panic!("seed {name}: {e:#}"));
        println!("seed {name}: {:?} {} accepted", v.dims, v.dtype);
    }
    let hwm = vm_hwm_kb();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut tally = Tally::default();
    for i in 0..3000 {
        let (seed, plain) = seeds.choose(&mut rng).unwrap();
        let mut b = plain.clone();
        let mut what: Vec<String> = (0..rng.gen_range(1..=3))
            .map(|_| mutate_nifti(&mut rng, &mut b))
            .collect();
        let plain_len = b.len();
        let bytes = match rng.gen_range(0..6) {
            0..=2 => b,
            3 | 4 => {
                what.push("gzip".into());
                gzip(&b)
            }
            _ => {
                let mut z = gzip(&b);
                let len = z.len();
                match rng.gen_range(0..3) {
                    0 => flip_bits(&mut rng, &mut z, 10..len),
                    1 => truncate_or_extend(&mut rng, &mut z),
                    _ => z.extend(gzip(&b[..b.len() / 2])),
                }
                what.push("corrupted gzip stream".into());
                z
            }
        };
        let ext = if bytes.starts_with(&[0x1f, 0x8b]) {
            "nii.gz"
        } else {
            "nii"
        };
        let name = format!("input{i}.{ext}");
        let path = dir.path().join(&name);
        std::fs::write(&path, &bytes).unwrap();
        let seen = inflated_len(&bytes, 1 << 26).max(bytes.len());
        let what = format!("#{i} {seed}: {}", what.join(", "));
        tally.run(&what, &name, seen, NIFTI_FACTOR, || {
            check_volume(&path, plain_len.max(seen))
        });
        let _ = std::fs::remove_file(&path);
    }
    tally.report("nifti", vm_hwm_kb() - hwm, true);
}
