//! Failure paths of the commands that write files: a full disk (a file-size limit), too little
//! memory (an address-space limit) and targets in the way; each failure must leave nothing behind.

use m2unet::data::phantom::{case_classes, case_spec, write_set, StoredDtype, SynthOptions};
use m2unet::io::nifti::{read_volume, write_nifti, VoxelData};
use nifti::NiftiHeader;
use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod cli_common;
use cli_common::{names, stderr};

/// A resource limit for the child process.
#[derive(Clone, Copy)]
enum Limit {
    /// Largest file it may write, in bytes; SIGXFSZ is ignored, so a write beyond it fails
    /// with EFBIG ("File too large") as a write on a full disk fails with ENOSPC. Unlike
    /// permissions, this holds for root as well.
    FileSize(u64),
    /// Largest address space, in bytes: allocations beyond it fail.
    AddressSpace(u64),
}

/// Runs `m2unet` in `dir` with `args`, under `limit` when given.
fn m2unet_in(dir: &Path, args: &[&str], limit: Option<Limit>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_m2unet"));
    cmd.args(args)
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "2");
    if let Some(limit) = limit {
        // SAFETY: setrlimit and signal are async-signal-safe; nothing else runs in the child
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let (resource, bytes) = match limit {
                    Limit::FileSize(b) => (libc::RLIMIT_FSIZE, b),
                    Limit::AddressSpace(b) => (libc::RLIMIT_AS, b),
                };
                let lim = libc::rlimit {
                    rlim_cur: bytes,
                    rlim_max: bytes,
                };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
    }
    cmd.output().expect("run m2unet")
}

/// Every file in a folder with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    names(dir)
        .into_iter()
        .map(|n| {
            let bytes = std::fs::read(dir.join(&n)).unwrap_or_default();
            (n, bytes)
        })
        .collect()
}

/// A small synthetic set of `count` cases in `dir` (no limit).
fn synth(dir: &Path, out: &str, count: usize, seed: u64) -> PathBuf {
    let o = m2unet_in(
        dir,
        &[
            "synth",
            "--out",
            out,
            "--count",
            &count.to_string(),
            "--seed",
            &seed.to_string(),
            "--shape",
            "64,64,24",
        ],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    dir.join(out)
}

/// A 16×16×2 float32 header with 1 mm voxels.
fn small_header() -> NiftiHeader {
    let mut h = NiftiHeader {
        dim: [3, 16, 16, 2, 1, 1, 1, 1],
        sform_code: 1,
        ..NiftiHeader::default()
    };
    h.srow_x = [1.0, 0.0, 0.0, 0.0];
    h.srow_y = [0.0, 1.0, 0.0, 0.0];
    h.srow_z = [0.0, 0.0, 1.0, 0.0];
    h
}

#[test]
fn nifti_writes_leave_nothing_on_failure_and_clear_stale_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let h = small_header();
    let values: Vec<f32> = (0..512).map(|i| i as f32 - 300.0).collect();

    // The target is a folder (with something in it): refused, the folder untouched.
    let folder = d.join("vol.nii.gz");
    std::fs::create_dir(&folder).unwrap();
    std::fs::write(folder.join("keep"), b"mine").unwrap();
    let e = write_nifti(&folder, &h, VoxelData::F32(&values), true).unwrap_err();
    println!("target is a folder: {e:#}");
    assert!(format!("{e:#}").contains("vol.nii.gz"));
    assert_eq!(names(d), ["vol.nii.gz"]);
    assert_eq!(names(&folder), ["keep"]);

    // The target's parent is a file: nothing can be created, nothing is left.
    let file = d.join("notes.txt");
    std::fs::write(&file, b"a file, not a folder").unwrap();
    let e = write_nifti(&file.join("x.nii"), &h, VoxelData::F32(&values), false).unwrap_err();
    println!("parent is a file: {e:#}");
    assert!(format!("{e:#}").contains("notes.txt/x.nii"));
    assert_eq!(names(d), ["notes.txt", "vol.nii.gz"]);

    // A temporary of a writer that no longer runs is removed by the next write of that file;
    // one of a running writer (our parent process) is not.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let live = std::os::unix::process::parent_id();
    let stale = format!(".ok.nii.tmp{dead}");
    let running = format!(".ok.nii.tmp{live}");
    std::fs::write(d.join(&stale), b"partial").unwrap();
    std::fs::write(d.join(&running), b"in progress").unwrap();
    write_nifti(&d.join("ok.nii"), &h, VoxelData::F32(&values), false).unwrap();
    println!("after a write beside {stale} and {running}: {:?}", names(d));
    assert_eq!(
        names(d),
        [running.as_str(), "notes.txt", "ok.nii", "vol.nii.gz"]
    );
    let back = read_volume(&d.join("ok.nii")).unwrap();
    assert_eq!(back.data, values, "the renamed file holds what was written");
}

#[test]
fn assess_writes_a_volume_s_outputs_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth(d, "ph", 2, 5);
    let o = m2unet_in(
        d,
        &["init", "--preset", "tiny", "--out", "w.safetensors"],
        None,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let assess = |out: &str, inputs: &[&str], limit| {
        let mut args = vec![
            "assess",
            "--weights",
            "w.safetensors",
            "--quiet",
            "--out",
            out,
        ];
        args.extend_from_slice(inputs);
        m2unet_in(d, &args, limit)
    };

    // case_0000's report cannot be written (a folder holds its name): its lobe map, already
    // written to a temporary, must go too; case_0001 is assessed.
    let out = d.join("o");
    std::fs::create_dir_all(out.join("case_0000_report.json")).unwrap();
    std::fs::write(out.join("case_0000_report.json/keep"), b"mine").unwrap();
    let o = assess("o", &["ph/case_0000.nii.gz", "ph/case_0001.nii.gz"], None);
    println!("report target is a folder:\n{}", stderr(&o));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("ph/case_0000.nii.gz: no output written"));
    assert!(stderr(&o).contains("case_0000_report.json") && stderr(&o).contains("1 of 2"));
    assert_eq!(
        names(&out),
        [
            "case_0000_report.json",
            "case_0001_lobes.nii.gz",
            "case_0001_report.json"
        ]
    );
    assert_eq!(names(&out.join("case_0000_report.json")), ["keep"]);

    // A full disk partway through: a file-size limit between the sizes of the lobe map and the
    // report (measured above) lets the smaller one through and stops the larger one (the report,
    // written last, when it is the larger: then the lobe map is already staged and must go).
    let size = |n: &str| std::fs::metadata(out.join(n)).unwrap().len();
    let (lobes, report) = (
        size("case_0001_lobes.nii.gz"),
        size("case_0001_report.json"),
    );
    let limit = (lobes + report) / 2;
    let stopped = match lobes < report {
        true => "case_0001_report.json",
        false => "case_0001_lobes.nii.gz",
    };
    println!("lobe map {lobes} B, report {report} B: file-size limit {limit} B stops {stopped}");
    assert!(lobes.min(report) < limit && limit < lobes.max(report));
    let o = assess(
        "full",
        &["ph/case_0001.nii.gz"],
        Some(Limit::FileSize(limit)),
    );
    println!("disk full at {stopped}:\n{}", stderr(&o));
    assert!(!o.status.success());
    assert!(stderr(&o).contains(stopped) && stderr(&o).contains("too large"));
    assert_eq!(names(&d.join("full")), Vec::<String>::new(), "nothing left");
}

/// A seed whose first case is stored as int16 or uint16 and whose last of three as float32:
/// with uncompressed files the float32 volume is twice the size of the others.
fn seed_with_float32_last(shape: [usize; 3]) -> u64 {
    (0..1000)
        .find(|&seed| {
            let opts = SynthOptions {
                seed,
                shape: Some(shape),
                ..SynthOptions::default()
            };
            let classes = case_classes(3, seed);
            let dtype = |i: usize| case_spec(&opts, i, classes[i]).unwrap().dtype;
            dtype(0) != StoredDtype::Float32
                && dtype(1) != StoredDtype::Float32
                && dtype(2) == StoredDtype::Float32
        })
        .expect("some seed draws float32 last")
}

#[test]
fn synth_on_a_full_disk_midway_leaves_no_new_set_and_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let shape = [32, 32, 8];
    let seed = seed_with_float32_last(shape);
    // Uncompressed: 352 + 2·8192 B for int16/uint16 volumes, 352 + 4·8192 B for float32.
    let limit = 25_000;
    let run = |out: &str, extra: &[&str]| {
        let seed = seed.to_string();
        let mut args = vec![
            "synth",
            "--out",
            out,
            "--count",
            "3",
            "--seed",
            &seed,
            "--shape",
            "32,32,8",
            "--uncompressed",
        ];
        args.extend_from_slice(extra);
        m2unet_in(d, &args, Some(Limit::FileSize(limit)))
    };
    let o = run("fresh", &[]);
    println!(
        "seed {seed}, limit {limit} B, into a new folder:\n{}",
        stderr(&o)
    );
    assert!(!o.status.success());
    assert!(stderr(&o).contains("case_0002.nii") && stderr(&o).contains("too large"));
    assert!(
        !d.join("fresh").exists(),
        "the folder synth created is gone"
    );

    // Over an earlier set with --overwrite: the failure leaves that set exactly as it was.
    let old = synth(d, "old", 2, 1);
    let before = snapshot(&old);
    let o = run("old", &["--overwrite"]);
    println!("over an earlier set:\n{}", stderr(&o));
    assert!(!o.status.success());
    let after = snapshot(&old);
    println!("earlier set after the failure: {:?}", names(&old));
    assert_eq!(
        after, before,
        "the earlier set is untouched, no temporary left"
    );
}

#[test]
fn demo_on_a_full_disk_leaves_no_truncated_volume() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let o = m2unet_in(d, &["demo", "--out", "demo"], Some(Limit::FileSize(8192)));
    println!("{}", stderr(&o));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("demo_case.nii.gz") && stderr(&o).contains("too large"));
    let left = names(&d.join("demo"));
    println!("left in the demo folder: {left:?}");
    assert!(left.is_empty(), "no volume, mask, JSON or temporary left");
}

#[test]
fn forward_export_and_init_on_a_full_disk_leave_no_temporaries() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let weights = fixtures.join("tiny_weights.safetensors");
    let input = fixtures.join("tiny_input.safetensors");
    std::fs::create_dir(d.join("out")).unwrap();
    let full = Some(Limit::FileSize(4096));
    let runs: [(&str, Vec<&str>); 3] = [
        (
            "init.safetensors",
            vec!["init", "--preset", "tiny", "--out", "out/init.safetensors"],
        ),
        (
            "export.safetensors",
            vec![
                "export",
                "--weights",
                weights.to_str().unwrap(),
                "--out",
                "out/export.safetensors",
            ],
        ),
        (
            "forward.safetensors",
            vec![
                "forward",
                "--weights",
                weights.to_str().unwrap(),
                "--input",
                input.to_str().unwrap(),
                "--output",
                "out/forward.safetensors",
            ],
        ),
    ];
    for (file, args) in runs {
        let o = m2unet_in(d, &args, full);
        println!("{}: {}", args[0], stderr(&o).trim());
        assert!(!o.status.success());
        assert!(stderr(&o).contains(file) && stderr(&o).contains("too large"));
        assert_eq!(
            names(&d.join("out")),
            Vec::<String>::new(),
            "{} left files",
            args[0]
        );
    }
}

#[test]
fn synth_rejects_shapes_beyond_its_range_and_memory_it_cannot_get() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Beyond the documented range (2^28 voxels): a usage error, nothing created.
    let o = m2unet_in(
        d,
        &["synth", "--out", "big", "--shape", "2048,2048,512"],
        None,
    );
    println!("2048×2048×512: {}", stderr(&o).trim());
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("2147483648 voxels") && stderr(&o).contains("268435456"));
    assert!(!d.join("big").exists());
    // The library refuses it too, before allocating anything.
    let opts = SynthOptions {
        shape: Some([2048, 2048, 512]),
        ..SynthOptions::default()
    };
    let e = write_set(&d.join("lib"), 1, &opts, true, false).unwrap_err();
    println!("write_set: {e:#}");
    assert!(format!("{e:#}").contains("2147483648 voxels"));
    assert!(!d.join("lib").exists());

    // Within the range but more memory than the process may have (2 GiB of address space for
    // a phantom needing 4 GiB): a clear error and exit code 1, not an abort.
    let o = m2unet_in(
        d,
        &["synth", "--out", "big", "--shape", "512,512,1024"],
        Some(Limit::AddressSpace(2 << 30)),
    );
    println!(
        "512×512×1024 under a 2 GiB address-space limit: status {:?}, {}",
        o.status,
        stderr(&o).trim()
    );
    assert_eq!(o.status.code(), Some(1), "an error exit, not a signal");
    assert!(stderr(&o).contains("cannot allocate 4.0 GiB for a 512×512×1024 phantom"));
    assert!(!d.join("big").exists());
}
