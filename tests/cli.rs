//! The `m2unet` command line end to end: info, init, the forward contract (against the
//! PyTorch fixtures), assess and the demo from any folder, with clear errors and no output on
//! bad input.

use m2unet::io::weights::{Tensor, TensorFile};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod cli_common;
use cli_common::{m2unet, names, phantoms_and_tiny_weights, stderr};

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

/// `m2unet forward` with the tiny fixture weights, plus any extra arguments.
fn forward_tiny(input: &str, out: &Path, extra: &[&str]) -> Output {
    let weights = fixture("tiny_weights.safetensors");
    let mut args = vec![
        "forward",
        "--weights",
        &weights,
        "--input",
        input,
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    m2unet(&args)
}

#[test]
fn info_prints_the_paper_counts() {
    let o = m2unet(&["info", "--params"]);
    let out = String::from_utf8_lossy(&o.stdout);
    println!("{out}");
    assert!(o.status.success());
    assert!(out.contains("learnable parameters: 4,015,304"));
    assert!(out.contains("enc5") && out.contains("2,657,280") && out.contains("2595.0"));
}

#[test]
fn forward_train_reproduces_the_pytorch_fixture() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("y.safetensors");
    let o = forward_tiny(
        &fixture("tiny_input.safetensors"),
        &out,
        &["--mode", "train"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = TensorFile::read(&out).unwrap();
    let want = TensorFile::read(Path::new(&fixture("tiny_train.safetensors"))).unwrap();
    let keys: Vec<&String> = got.tensors.keys().collect();
    assert_eq!(
        keys,
        want.tensors.keys().collect::<Vec<_>>(),
        "same output keys as the fixture"
    );
    let mut worst = 0f64;
    for (k, t) in &want.tensors {
        assert_eq!(got.tensors[k].shape(), t.shape(), "{k}");
        if k.starts_with("grad.") {
            continue; // gradients are compared with their own measure in torch_fixtures.rs
        }
        match t {
            Tensor::I64 { data, .. } => assert_eq!(got.i64(k).unwrap().1, &data[..], "{k}"),
            _ => {
                let (a, b) = (got.f32(k).unwrap().1, want.f32(k).unwrap().1);
                let d: f64 = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| ((x - y) as f64).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let n: f64 = b
                    .iter()
                    .map(|y| (*y as f64).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    .max(1e-30);
                worst = worst.max(d / n);
            }
        }
    }
    println!("CLI forward --mode train: worst relative L2 error over outputs, losses and BN buffers {worst:.3e}");
    assert!(worst <= 1e-4);
}

fn write_input(dir: &Path, m: usize, p: usize, bags: &[i64]) -> String {
    let mut f = TensorFile::default();
    f.tensors.insert(
        "patches".into(),
        Tensor::f32(&[m, 1, p, p], vec![0.5; m * p * p]),
    );
    f.tensors.insert(
        "bag_sizes".into(),
        Tensor::i64(&[bags.len()], bags.to_vec()),
    );
    let path = dir.join(format!("in_{m}_{p}_{}.safetensors", bags.len()));
    f.write(&path).unwrap();
    path.display().to_string()
}

#[test]
fn forward_eval_writes_only_the_logits() {
    let dir = tempfile::tempdir().unwrap();
    let input = write_input(dir.path(), 4, 16, &[2, 2]);
    let out = dir.path().join("y.safetensors");
    let o = forward_tiny(&input, &out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = TensorFile::read(&out).unwrap();
    assert_eq!(
        got.tensors.keys().collect::<Vec<_>>(),
        ["cls_logits", "seg_logits"]
    );
    assert_eq!(got.tensors["seg_logits"].shape(), [4, 6, 16, 16]);
    assert_eq!(got.tensors["cls_logits"].shape(), [2, 2]);
    let (_, logits) = got.f32("cls_logits").unwrap();
    println!("P=16 eval logits {logits:?}");
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn bad_forward_inputs_fail_clearly_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let cases = [
        (write_input(d, 5, 32, &[2, 2]), "sum to 4"),
        (write_input(d, 4, 24, &[2, 2]), "multiple of 16"),
        (write_input(d, 3, 32, &[1, 2]), "at least 2"),
        (
            fixture("tiny_weights.safetensors"),
            "missing tensor \"patches\"",
        ),
    ];
    for (input, needle) in cases {
        let out = d.join("never.safetensors");
        let o = forward_tiny(&input, &out, &[]);
        let msg = stderr(&o);
        println!("{input}: {msg}");
        assert!(!o.status.success());
        assert!(msg.contains(needle), "{msg:?} should contain {needle:?}");
        assert!(
            msg.contains(Path::new(&input).file_name().unwrap().to_str().unwrap()),
            "names the file"
        );
        assert!(!out.exists(), "no output on failure");
    }
    let o = m2unet(&[
        "forward",
        "--weights",
        "/nonexistent/w.safetensors",
        "--input",
        "x",
        "--output",
        "y",
    ]);
    println!("{}", stderr(&o));
    assert!(!o.status.success() && stderr(&o).contains("/nonexistent/w.safetensors"));
}

#[test]
fn init_writes_weights_that_load_with_the_preset_config() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.safetensors");
    let o = m2unet(&[
        "init",
        "--out",
        w.to_str().unwrap(),
        "--seed",
        "5",
        "--preset",
        "tiny",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = m2unet(&["info", "--weights", w.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    println!("{out}");
    assert!(out.contains("enc_width 8") && out.contains("bottleneck_width 16"));
    let again = dir.path().join("w2.safetensors");
    m2unet(&[
        "init",
        "--out",
        again.to_str().unwrap(),
        "--seed",
        "5",
        "--preset",
        "tiny",
    ]);
    assert_eq!(
        std::fs::read(&w).unwrap(),
        std::fs::read(&again).unwrap(),
        "same seed, same bytes"
    );
}

#[test]
fn assess_runs_end_to_end_on_a_phantom_with_init_weights() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ph, w) = phantoms_and_tiny_weights(d, 1, 11);
    let ct = std::fs::read_dir(&ph)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.to_str().unwrap().ends_with(".nii.gz") && !p.to_str().unwrap().contains("_mask")
        })
        .unwrap();
    // A second input that is not a volume: reported, the good one still assessed.
    let bad = d.join("bad.nii");
    std::fs::write(&bad, "not a nifti file").unwrap();
    let out = d.join("out");
    let o = m2unet(&[
        "assess",
        ct.to_str().unwrap(),
        bad.to_str().unwrap(),
        "--weights",
        w.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    println!("{}", stderr(&o));
    assert!(
        !o.status.success(),
        "one input failed, so the exit code says so"
    );
    assert!(stderr(&o).contains("bad.nii"));
    let stem = ct
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches(".nii.gz");
    assert_eq!(
        names(&out),
        [
            format!("{stem}_lobes.nii.gz"),
            format!("{stem}_report.json")
        ],
        "nothing for the bad file"
    );
    let input = m2unet::io::nifti::read_volume(&ct).unwrap();
    let lobes = m2unet::io::nifti::read_volume(&out.join(format!("{stem}_lobes.nii.gz"))).unwrap();
    println!(
        "input dims {:?}, lobe map dims {:?}",
        input.dims, lobes.dims
    );
    assert_eq!(input.dims, lobes.dims);
    assert_eq!(input.affine, lobes.affine);
    assert_eq!(lobes.dtype, "uint8");
    assert!(lobes
        .data
        .iter()
        .all(|&v| (0.0..=5.0).contains(&v) && v.fract() == 0.0));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join(format!("{stem}_report.json"))).unwrap())
            .unwrap();
    let p = report["severity"]["probability"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p));
    assert!(["severe", "non-severe"].contains(&report["severity"]["class"].as_str().unwrap()));
    assert_eq!(report["lobes"].as_array().unwrap().len(), 5);
    for key in ["label", "name", "volume_ml", "mean_hu", "involvement"] {
        assert!(report["lobes"][0].get(key).is_some(), "lobes[].{key}");
    }
    assert!(report["input"].as_str().unwrap().ends_with(".nii.gz"));
    assert!(report["timings_ms"].is_object());
}

#[test]
fn assess_with_unusable_weights_fails_before_creating_the_output_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never");
    let bad = dir.path().join("w.safetensors");
    std::fs::write(&bad, "not weights").unwrap();
    let o = m2unet(&[
        "assess",
        "whatever.nii.gz",
        "--weights",
        bad.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    println!("{}", stderr(&o));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("w.safetensors"));
    assert!(!out.exists(), "no output folder on failure");
}

/// `m2unet demo` run in `dir` with `M2UNET_WEIGHTS` set to `env` (unset when None).
fn demo_in(dir: &Path, env: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_m2unet"));
    cmd.arg("demo").args(args).current_dir(dir);
    match env {
        Some(w) => cmd.env("M2UNET_WEIGHTS", w),
        None => cmd.env_remove("M2UNET_WEIGHTS"),
    };
    cmd.output().expect("run m2unet demo")
}

fn report_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn demo_works_from_any_folder_and_names_the_weights_it_used() {
    // A fresh folder, far from the checkout, without M2UNET_WEIGHTS: the embedded default.
    let dir = tempfile::tempdir().unwrap();
    let o = demo_in(dir.path(), None, &[]);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    println!("{out}\n{}", stderr(&o));
    assert!(o.status.success(), "{}", stderr(&o));
    let name = "embedded default m2unet_synthetic_p112";
    assert!(stderr(&o).contains(&format!("weights: {name}")));
    // --device auto (the default) says where it ran: the CPU on a machine without a GPU.
    let gpu = m2unet::cuda::Device::new(m2unet::cuda::DeviceKind::Gpu).is_ok();
    let device = if gpu {
        "device: cuda"
    } else {
        "device: cpu (--device auto found no GPU"
    };
    assert!(stderr(&o).contains(device), "stderr names the device");
    assert!(out.contains(&format!("weights {name}")));
    let report = report_json(&dir.path().join("m2unet_demo/demo_case_report.json"));
    assert_eq!(report["weights"], name);
    assert_eq!(
        report["model"]["patch"], 112,
        "the default weights are trained at P = 112"
    );
    let dice: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("mean lobe Dice "))
        .expect("a mean Dice line")
        .parse()
        .unwrap();
    println!("embedded default weights: mean lobe Dice {dice} against the phantom's truth");
    assert!(dice > 0.9);

    // M2UNET_WEIGHTS names other weights (tiny preset: enc_width 8): they are used and named.
    let tiny = dir.path().join("tiny.safetensors");
    let init = m2unet(&["init", "--preset", "tiny", "--out", tiny.to_str().unwrap()]);
    assert!(init.status.success(), "{}", stderr(&init));
    let o = demo_in(dir.path(), Some(&tiny), &["--out", "env_demo"]);
    println!("{}", stderr(&o));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(&format!("weights: {}", tiny.display())));
    let report = report_json(&dir.path().join("env_demo/demo_case_report.json"));
    println!(
        "with M2UNET_WEIGHTS: report weights {}, model {}",
        report["weights"], report["model"]
    );
    assert_eq!(report["weights"], tiny.display().to_string());
    assert_eq!(report["model"]["enc_width"], 8);

    // --weights comes first; a missing M2UNET_WEIGHTS file is named in the error.
    let missing = dir.path().join("missing.safetensors");
    let flag = ["--weights", tiny.to_str().unwrap(), "--out", "flag_demo"];
    let o = demo_in(dir.path(), Some(&missing), &flag);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = demo_in(dir.path(), Some(&missing), &["--out", "never"]);
    println!("{}", stderr(&o));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("M2UNET_WEIGHTS") && stderr(&o).contains("missing.safetensors"));
    assert!(!dir.path().join("never").exists());
}

#[test]
fn assess_refuses_inputs_whose_outputs_would_collide_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (ph, w) = phantoms_and_tiny_weights(d, 2, 0);
    for (from, to) in [
        ("case_0000.nii.gz", "a/ct.nii.gz"),
        ("case_0000.nii.gz", "b/ct.nii.gz"),
        ("case_0001.nii.gz", "c/other.nii.gz"),
        ("case_0001.nii.gz", "d/ct.nii.gz"),
    ] {
        std::fs::create_dir_all(d.join(to).parent().unwrap()).unwrap();
        std::fs::copy(ph.join(from), d.join(to)).unwrap();
    }
    let p = |rel: &str| d.join(rel).to_str().unwrap().to_string();

    // a/ct and b/ct into one --out: both refused, naming each other; c/other (named twice)
    // is assessed once.
    let out = d.join("o");
    let o = m2unet(&[
        "assess",
        &p("a/ct.nii.gz"),
        &p("b/ct.nii.gz"),
        &p("c/other.nii.gz"),
        &p("c/other.nii.gz"),
        "--weights",
        w.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    let msg = stderr(&o);
    println!("{msg}");
    assert!(!o.status.success());
    assert!(msg.contains("2 of 3 volume(s) failed"));
    for (me, other) in [
        ("a/ct.nii.gz", "b/ct.nii.gz"),
        ("b/ct.nii.gz", "a/ct.nii.gz"),
    ] {
        let line = msg
            .lines()
            .find(|l| l.contains(&format!("{me}: not assessed")))
            .unwrap_or_else(|| panic!("no refusal of {me}"));
        assert!(line.contains(other) && line.contains("o/ct_lobes.nii.gz"));
    }
    assert_eq!(
        names(&out),
        ["other_lobes.nii.gz", "other_report.json"],
        "only the input without a collision wrote its outputs"
    );

    // ct.nii beside ct.nii.gz, outputs beside the inputs: both refused, the folder unchanged.
    let plain = m2unet::io::nifti::read_volume(&d.join("d/ct.nii.gz")).unwrap();
    let header = plain.header.clone();
    let hu: Vec<i16> = plain.data.iter().map(|&v| v as i16).collect();
    m2unet::io::nifti::write_nifti(
        &d.join("d/ct.nii"),
        &header,
        m2unet::io::nifti::VoxelData::I16(&hu),
        false,
    )
    .unwrap();
    let o = m2unet(&[
        "assess",
        &p("d"),
        "--weights",
        w.to_str().unwrap(),
        "--quiet",
    ]);
    let msg = stderr(&o);
    println!("{msg}");
    assert!(!o.status.success());
    assert!(msg.contains("2 of 2 volume(s) failed"));
    assert!(msg.contains("d/ct.nii: not assessed") && msg.contains("d/ct.nii.gz: not assessed"));
    assert_eq!(names(&d.join("d")), ["ct.nii", "ct.nii.gz"]);

    // An output that is another input: the input that would overwrite it is refused.
    std::fs::create_dir(d.join("e")).unwrap();
    std::fs::copy(ph.join("case_0000.nii.gz"), d.join("e/x.nii.gz")).unwrap();
    std::fs::copy(ph.join("case_0001.nii.gz"), d.join("e/x_lobes.nii.gz")).unwrap();
    let o = m2unet(&[
        "assess",
        &p("e/x.nii.gz"),
        &p("e/x_lobes.nii.gz"),
        "--weights",
        w.to_str().unwrap(),
        "--quiet",
    ]);
    let msg = stderr(&o);
    println!("{msg}");
    assert!(!o.status.success() && msg.contains("1 of 2 volume(s) failed"));
    assert!(msg.contains("x.nii.gz: not assessed: its output") && msg.contains("is the input"));
    let help = String::from_utf8_lossy(&m2unet(&["assess", "--help"]).stdout).to_string();
    assert!(
        help.contains("are refused before anything is written"),
        "--help says so"
    );
    assert_eq!(
        names(&d.join("e")),
        [
            "x.nii.gz",
            "x_lobes.nii.gz",
            "x_lobes_lobes.nii.gz",
            "x_lobes_report.json"
        ]
    );
}

#[test]
fn synth_refuses_a_non_empty_folder_and_overwrite_replaces_the_whole_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let synth = |out: &Path, count: &str, seed: &str, extra: &[&str]| {
        let mut args = vec![
            "synth",
            "--out",
            out.to_str().unwrap(),
            "--count",
            count,
            "--seed",
            seed,
            "--shape",
            "32,32,8",
        ];
        args.extend_from_slice(extra);
        m2unet(&args)
    };
    let set = d.join("set");
    assert!(synth(&set, "3", "1", &[]).status.success());
    let read_all = |dir: &Path| -> Vec<(String, Vec<u8>)> {
        names(dir)
            .into_iter()
            .map(|n| {
                let bytes = std::fs::read(dir.join(&n)).unwrap();
                (n, bytes)
            })
            .collect()
    };
    let first = read_all(&set);
    println!("first set: {:?}", names(&set));
    assert_eq!(first.len(), 10);

    // Without --overwrite: refused, nothing changed.
    let o = synth(&set, "2", "2", &[]);
    println!("{}", stderr(&o));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is not empty") && stderr(&o).contains("--overwrite"));
    assert_eq!(read_all(&set), first);

    // With --overwrite: exactly the new set (the third case is gone, and so are temporaries
    // that a killed synth left), byte for byte what a fresh folder gets with the same seed.
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    for name in [".case_0000.nii.gz.tmp", ".case_0007.json.tmp"] {
        std::fs::write(set.join(format!("{name}{dead}")), "partial").unwrap();
    }
    let o = synth(&set, "2", "2", &["--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let fresh = d.join("fresh");
    assert!(synth(&fresh, "2", "2", &[]).status.success());
    println!("after --overwrite: {:?}", names(&set));
    assert_eq!(read_all(&set), read_all(&fresh));
    let manifest = std::fs::read_to_string(set.join("manifest.csv")).unwrap();
    assert_eq!(manifest.lines().count(), 3, "header and two cases");

    // Anything synth does not write is refused even with --overwrite.
    std::fs::write(set.join("notes.txt"), "mine").unwrap();
    let before = read_all(&set);
    let o = synth(&set, "1", "3", &["--overwrite"]);
    println!("{}", stderr(&o));
    assert!(!o.status.success() && stderr(&o).contains("notes.txt"));
    assert_eq!(read_all(&set), before);
}
