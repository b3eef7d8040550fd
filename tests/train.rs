//! Training tests: learning on tiny phantoms (evaluated on the CPU engine and the emulator),
//! bit-exact resume, metrics against hand-computed
//! cases, checkpoints surviving a killed writer, manifest errors and checks, loss label ranges,
//! checkpoint loading, the demo and where weights come from.

mod cli_common;

use cli_common::{synth_args, training_set};
use m2unet::app::synth::{run as run_synth, SynthArgs};
use m2unet::app::train::{run as run_train, TrainArgs};
use m2unet::backend::Backend;
use m2unet::config::ModelConfig;
use m2unet::cpu::CpuEngine;
use m2unet::cuda::{CudaEngine, DeviceKind};
use m2unet::data::dataset::read_checked_manifest;
use m2unet::evaluate::evaluate;
use m2unet::io::checkpoint::load_checkpoint;
use m2unet::io::weights::{load_model, model_from_tensors, Tensor, TensorFile, OPTIM_PREFIX};
use m2unet::metrics::{
    by_height, dice, fissure_offsets, lobe_confusion, lobe_dice, pooled, roc_auc, Confusion,
    EvalMetrics, HEIGHT_BANDS,
};
use m2unet::model::Model;
use m2unet::train::Schedule;
use m2unet::weights_source::{WeightsSource, WEIGHTS_ENV};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn args(data: &Path, out: &Path) -> TrainArgs {
    TrainArgs {
        data: Some(data.to_path_buf()),
        out: out.to_path_buf(),
        device: Backend::Cpu,
        preset: "tiny".into(),
        epochs: 3,
        bags_per_step: 2,
        bag_size: 4,
        patch: None,
        lr: 1e-2,
        schedule: Schedule::Constant,
        weight_decay: 1e-4,
        val_fraction: 0.0,
        seed: 3,
        resume: false,
        init: None,
        checkpoint_every: 50,
        max_steps: None,
        cache_gib: 1.0,
        quiet: true,
    }
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("steps.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn training_on_tiny_phantoms_lowers_loss_and_raises_dice() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = training_set(&dir.path().join("data"), 4, 11);
    let entries = read_checked_manifest(&manifest).unwrap();
    let run = dir.path().join("run");
    let a = TrainArgs {
        epochs: 25,
        ..args(&manifest, &run)
    };
    let before_model = Model::init(ModelConfig::tiny(), a.seed);
    let mut before_engine = CpuEngine::new(before_model);
    let (before, _) = evaluate(
        &mut before_engine,
        &entries,
        &dir.path().join("eval0"),
        true,
    )
    .unwrap();
    let summary = run_train(&a).unwrap();
    assert_eq!(summary.state.step, 50);
    let after_model = load_model(&run.join("last.safetensors")).unwrap();
    let mut cpu = CpuEngine::new(after_model.clone());
    let (after, after_cases) =
        evaluate(&mut cpu, &entries, &dir.path().join("eval1"), true).unwrap();
    // The same evaluation with the CUDA engine's fp16 kernels (on the emulator): labels differ
    // only where the two best logits lie within fp16 rounding of each other, a few voxels on
    // lobe borders, so each lobe's Dice moves by well under 0.01.
    let mut emu = CudaEngine::new(&after_model, DeviceKind::Emu).unwrap();
    let (on_emu, emu_cases) =
        evaluate(&mut emu, &entries, &dir.path().join("eval2"), true).unwrap();
    // The severity probabilities come from fp16 activations: close, not equal. The forward's
    // fp16 error is ~5e-4 of the logits (tests/cuda_forward.rs), a probability moves by at most
    // a quarter of its logit difference's change, and these logits are below 10: under 0.01.
    let dp = after_cases
        .iter()
        .zip(&emu_cases)
        .map(|(a, b)| (a.probability - b.probability).abs())
        .fold(0.0, f64::max);
    let moved = after
        .lobe_dice
        .iter()
        .zip(on_emu.lobe_dice)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!(
        "evaluation on the emulator: lobe Dice {:?} (largest change from the CPU engine {moved:.2e}), severity probability largest change {dp:.2e}",
        on_emu.lobe_dice
    );
    assert!(moved < 0.01, "Dice moved by {moved}");
    assert!(dp > 0.0 && dp < 0.01, "severity probability moved by {dp}");
    let l = losses(&run);
    let first = (l[0] + l[1]) / 2.0;
    let last = (l[l.len() - 2] + l[l.len() - 1]) / 2.0;
    println!(
        "loss first two steps {first:.4}, last two {last:.4}; mean lobe Dice before {:.4} after {:.4} ({:?})",
        before.mean_dice, after.mean_dice, after.lobe_dice
    );
    assert!(last < 0.7 * first, "loss {first} → {last}");
    assert!(
        after.mean_dice > before.mean_dice + 0.15,
        "Dice {} → {}",
        before.mean_dice,
        after.mean_dice
    );
}

fn tensor_bits(t: &Tensor) -> Vec<u64> {
    match t {
        Tensor::F32 { data, .. } | Tensor::F16 { data, .. } => {
            data.iter().map(|v| v.to_bits() as u64).collect()
        }
        Tensor::I64 { data, .. } => data.iter().map(|&v| v as u64).collect(),
    }
}

/// Number of differing values over all tensors of two files (and whether the names agree).
fn differences(a: &Path, b: &Path) -> usize {
    let (a, b) = (TensorFile::read(a).unwrap(), TensorFile::read(b).unwrap());
    assert_eq!(
        a.tensors.keys().collect::<Vec<_>>(),
        b.tensors.keys().collect::<Vec<_>>()
    );
    a.tensors
        .iter()
        .map(|(k, t)| {
            let (x, y) = (tensor_bits(t), tensor_bits(&b.tensors[k]));
            assert_eq!(x.len(), y.len(), "{k}");
            x.iter().zip(&y).filter(|(p, q)| p != q).count()
        })
        .sum()
}

/// metrics.csv without the wall-time column.
/// A freshly initialised tiny network saved as DIR/tiny.safetensors (f32).
fn tiny_weights(dir: &Path) -> PathBuf {
    let weights = dir.join("tiny.safetensors");
    m2unet::io::weights::save_model(
        &Model::init(ModelConfig::tiny(), 1),
        &weights,
        m2unet::io::weights::WeightDtype::F32,
    )
    .unwrap();
    weights
}

/// `m2unet evaluate` of `weights` on the manifest `data` into `out`, on the CPU engine.
fn run_evaluate(weights: PathBuf, data: PathBuf, out: &Path) -> anyhow::Result<EvalMetrics> {
    m2unet::app::evaluate::run(&m2unet::app::evaluate::EvaluateArgs {
        weights,
        data,
        out: out.to_path_buf(),
        no_lobe_order: false,
        device: Backend::Cpu,
    })
}

fn metrics_rows(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(',').unwrap().0.to_string())
        .collect()
}

#[test]
fn resumed_run_matches_uninterrupted_run_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = training_set(&dir.path().join("data"), 6, 21);
    let full = dir.path().join("full");
    let split = dir.path().join("split");
    let base = |out: &Path| TrainArgs {
        val_fraction: 0.34,
        lr: 3e-3,
        schedule: Schedule::Cosine,
        ..args(&manifest, out)
    };
    let s = run_train(&base(&full)).unwrap();
    assert_eq!(s.state.step, 6);
    let s = run_train(&TrainArgs {
        max_steps: Some(3),
        ..base(&split)
    })
    .unwrap();
    assert_eq!((s.state.step, s.state.epoch, s.state.position), (3, 1, 2));
    let s = run_train(&TrainArgs {
        resume: true,
        data: None,
        ..base(&split)
    })
    .unwrap();
    assert_eq!((s.state.step, s.state.epoch), (6, 3));
    let diff_last = differences(
        &full.join("last.safetensors"),
        &split.join("last.safetensors"),
    );
    let diff_best = differences(
        &full.join("best.safetensors"),
        &split.join("best.safetensors"),
    );
    let (lf, ls) = (losses(&full), losses(&split));
    let loss_diff = lf.iter().zip(&ls).filter(|(a, b)| a != b).count();
    println!(
        "differing values: last {diff_last}, best {diff_best}; differing step losses {loss_diff} of {}; losses {lf:?}",
        lf.len()
    );
    assert_eq!((diff_last, diff_best, loss_diff), (0, 0, 0));
    assert_eq!(lf.len(), 6);
    assert_eq!(ls.len(), 6);
    let (mf, ms) = (metrics_rows(&full), metrics_rows(&split));
    assert_eq!(mf.len(), 4);
    assert_eq!(mf, ms);
    let png = std::fs::read(split.join("curves.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
}

#[test]
fn metrics_match_hand_computed_cases() {
    // Dice of known masks: label 1 has |A| = 3, |B| = 2, |A∩B| = 2 → 0.8.
    let pred = [1u8, 1, 1, 0, 2, 2, 0, 0];
    let truth = [1u8, 1, 0, 0, 2, 0, 3, 0];
    let d = lobe_dice(&pred, &truth);
    let want = [0.8, 2.0 / 3.0, 0.0, 1.0, 1.0];
    let err = d
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("lobe Dice {d:?}, max error {err:e}");
    assert!(err < 1e-12);
    assert_eq!(dice(&pred, &truth, 4), 1.0);
    // The confusion of the same maps, counted by hand (labels above 5 count as "other").
    let c = lobe_confusion(&[1, 1, 1, 0, 2, 2, 0, 9], &[1, 1, 0, 0, 2, 0, 3, 7]);
    println!("lobe confusion {c:?}");
    let mut want = [[0u64; 6]; 6];
    want[1][1] = 2;
    want[0][1] = 1;
    want[0][0] = 2;
    want[2][2] = 1;
    want[0][2] = 1;
    want[3][0] = 1;
    assert_eq!(c, want);

    // Fissure placement, three 10-slice columns at 2.5 mm (labels by z, base first). Column 0:
    // right lung, RLL/RML 1 slice too high, RML/RUL in place, RLL/RUL (midway 5.5 → 6) half a
    // slice too high. Column 1: the prediction puts LLL above LUL (skipped). Column 2: LLL/LUL
    // 2 slices too low.
    let columns: [[[u8; 10]; 2]; 3] = [
        [
            [5, 5, 5, 5, 5, 4, 4, 3, 3, 3],
            [5, 5, 5, 5, 4, 4, 4, 3, 3, 3],
        ],
        [
            [0, 0, 2, 2, 1, 1, 1, 1, 1, 2],
            [0, 0, 2, 2, 2, 2, 1, 1, 1, 0],
        ],
        [
            [2, 2, 2, 1, 1, 1, 1, 1, 1, 1],
            [2, 2, 2, 2, 2, 1, 1, 1, 1, 1],
        ],
    ];
    // [pred, truth] columns laid out z-major with x fastest.
    let volume = |which: usize| -> Vec<u8> {
        (0..10)
            .flat_map(|z| columns.iter().map(move |c| c[which][z]))
            .collect()
    };
    let (pred, truth) = (volume(0), volume(1));
    let f = fissure_offsets(&pred, &truth, [3, 1, 10], 2.5);
    let got: Vec<(usize, f64, f64)> = f
        .iter()
        .map(|o| (o.columns, o.sum_mm, o.sum_abs_mm))
        .collect();
    println!(
        "fissure offsets (columns, sum mm, sum |mm|) LLL/LUL, RLL/RML, RML/RUL, RLL/RUL: {got:?}"
    );
    assert_eq!(
        got,
        [
            (1, -5.0, 5.0),
            (1, 2.5, 2.5),
            (1, 0.0, 0.0),
            (1, 1.25, 1.25)
        ]
    );

    // Dice by height: a 1×1×30 column whose lung spans z 5..25 (bands of 2 slices); lobe 1 is
    // true on 5..15 and predicted on 7..17, lobe 4 true on 15..25 and predicted from 17 up to
    // the top slice 29 (counted in the last band).
    let dims = [1, 1, 30];
    let truth: Vec<u8> = (0..30)
        .map(|z| match z {
            5..15 => 1,
            15..25 => 4,
            _ => 0,
        })
        .collect();
    let pred: Vec<u8> = (0..30)
        .map(|z| match z {
            7..17 => 1,
            17.. => 4,
            _ => 0,
        })
        .collect();
    let bands = by_height(&pred, &truth, dims);
    let got: Vec<[Option<f64>; 2]> = bands.iter().map(|b| [b[0].dice(), b[3].dice()]).collect();
    println!("Dice by height (LUL, RML) per band: {got:?}");
    let want: [[Option<f64>; 2]; HEIGHT_BANDS] = [
        [Some(0.0), None],
        [Some(1.0), None],
        [Some(1.0), None],
        [Some(1.0), None],
        [Some(1.0), None],
        [Some(0.0), Some(0.0)],
        [None, Some(1.0)],
        [None, Some(1.0)],
        [None, Some(1.0)],
        [None, Some(2.0 * 2.0 / (2.0 + 7.0))],
    ];
    assert_eq!(got, want);
    let twice = pooled(&[bands, bands]);
    assert_eq!(twice[9][3].pred, 2 * bands[9][3].pred);

    // AUC: one misordered pair out of four → 0.75; ties count one half.
    let a = roc_auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]).unwrap();
    let t = roc_auc(&[0.5, 0.5, 0.5, 0.9], &[false, true, false, true]).unwrap();
    let all_tied = roc_auc(&[0.3; 4], &[false, true, false, true]).unwrap();
    println!("AUC {a}, with ties {t}, all tied {all_tied}");
    assert_eq!((a, t, all_tied), (0.75, 0.75, 0.5));
    assert!(roc_auc(&[0.1, 0.2], &[true, true]).is_none());

    // Against a naive pairwise count on scores with many ties.
    let scores: Vec<f64> = (0..40).map(|i| ((i * 7) % 9) as f64 / 8.0).collect();
    let labels: Vec<bool> = (0..40).map(|i| (i * 5) % 3 == 0).collect();
    let (mut num, mut den) = (0.0, 0.0);
    for i in 0..40 {
        for j in 0..40 {
            if labels[i] && !labels[j] {
                den += 1.0;
                num += if scores[i] > scores[j] {
                    1.0
                } else if scores[i] == scores[j] {
                    0.5
                } else {
                    0.0
                };
            }
        }
    }
    let got = roc_auc(&scores, &labels).unwrap();
    println!(
        "AUC {got} vs pairwise {}, error {:e}",
        num / den,
        (got - num / den).abs()
    );
    assert!((got - num / den).abs() < 1e-12);

    // Confusion: TP 2, FP 1, TN 3, FN 2.
    let p = [true, true, true, false, false, false, false, false];
    let y = [true, true, false, false, false, false, true, true];
    let c = Confusion::new(&p, &y);
    assert_eq!((c.tp, c.fp, c.tn, c.fn_), (2, 1, 3, 2));
    let got = [c.accuracy(), c.sensitivity(), c.specificity(), c.f1()];
    let want = [5.0 / 8.0, 0.5, 0.75, 4.0 / 7.0];
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("accuracy/sensitivity/specificity/F1 {got:?}, max error {err:e}");
    assert!(err < 1e-12);
    assert!(Confusion::new(&[false], &[false]).sensitivity().is_nan());

    // Aggregation: probabilities thresholded at 0.5, per-lobe Dice averaged over cases.
    let m = EvalMetrics::from_cases(
        &[[1.0, 0.5, 1.0, 0.0, 1.0], [0.0, 0.5, 1.0, 1.0, 1.0]],
        &[0.7, 0.2],
        &[true, false],
    );
    println!("{m:?}");
    assert_eq!(m.lobe_dice, [0.5, 0.5, 1.0, 0.5, 1.0]);
    assert!((m.mean_dice - 0.7).abs() < 1e-12);
    assert_eq!((m.accuracy, m.auc, m.score()), (1.0, 1.0, 0.85));
}

#[test]
fn killed_checkpoint_write_leaves_previous_checkpoint_loadable() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = training_set(&dir.path().join("data"), 2, 31);
    let run = dir.path().join("run");
    // The paper network at P = 16: cheap steps, 48 MB checkpoints that take a while to write.
    let mut child = Command::new(env!("CARGO_BIN_EXE_m2unet"))
        .args([
            "train",
            "--preset",
            "paper",
            "--patch",
            "16",
            "--bag-size",
            "2",
        ])
        .args([
            "--bags-per-step",
            "1",
            "--epochs",
            "1000",
            "--checkpoint-every",
            "1",
        ])
        .args(["--val-fraction", "0", "--quiet", "--data"])
        .arg(&manifest)
        .arg("--out")
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let last = run.join("last.safetensors");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut killed_during_write = false;
    while Instant::now() < deadline {
        let writing = last.exists()
            && std::fs::read_dir(&run).unwrap().any(|e| {
                e.unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".last.safetensors.tmp")
            });
        if writing {
            child.kill().unwrap();
            killed_during_write = true;
            break;
        }
    }
    if !killed_during_write {
        child.kill().unwrap();
    }
    child.wait().unwrap();
    let leftovers: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let ck = load_checkpoint(&last).unwrap();
    println!(
        "killed while a temporary checkpoint existed: {killed_during_write}; files {leftovers:?}; last.safetensors loads at step {}",
        ck.state.step
    );
    assert!(killed_during_write);
    assert!(ck.state.step >= 1);
    assert_eq!(ck.model.table.n_params, 4_015_304);
}

#[test]
fn bad_manifest_lines_give_errors_with_line_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = training_set(&dir.path().join("data"), 2, 41);
    let text = std::fs::read_to_string(&manifest).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let write = |name: &str, body: String| {
        let p = manifest.with_file_name(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let missing = write(
        "missing.csv",
        format!(
            "{}\n{}\nnope.nii.gz,{}",
            lines[0],
            lines[1],
            lines[2].split_once(',').unwrap().1
        ),
    );
    let bad_label = write(
        "label.csv",
        format!(
            "{}\n\n{}\n{}",
            lines[0],
            lines[1],
            lines[2].replace(",1,", ",2,").replace(",0,", ",2,")
        ),
    );
    let e1 = format!("{:#}", read_checked_manifest(&missing).unwrap_err());
    let e2 = format!(
        "{:#}",
        run_train(&args(&bad_label, &dir.path().join("run"))).unwrap_err()
    );
    println!("missing file: {e1}\nbad label: {e2}");
    assert!(e1.contains("line 3") && e1.contains("nope.nii.gz") && e1.contains("does not exist"));
    assert!(e2.contains("line 4") && e2.contains("label \"2\""));
    // Without a GPU, --device cuda fails with a clear error before anything is written.
    if m2unet::cuda::Device::new(m2unet::cuda::DeviceKind::Gpu).is_err() {
        let run = dir.path().join("run");
        let e3 = format!(
            "{:#}",
            run_train(&TrainArgs {
                device: Backend::Cuda,
                ..args(&manifest, &run)
            })
            .unwrap_err()
        );
        println!("cuda: {e3}");
        assert!(e3.contains("--device cpu") && e3.contains("--device emu"));
        assert!(!run.exists());
    }
}

/// A mask like `from` (same header) with `edit` applied to its values, written as `to`.
fn edited_mask(
    from: &Path,
    to: &Path,
    edit_header: impl FnOnce(&mut nifti::NiftiHeader),
    edit: impl FnOnce(&mut [u8]),
) {
    let vol = m2unet::io::read_volume(from).unwrap();
    let mut labels: Vec<u8> = vol.data.iter().map(|&v| v as u8).collect();
    edit(&mut labels);
    let mut h = vol.header.clone();
    edit_header(&mut h);
    m2unet::io::nifti::write_nifti(to, &h, m2unet::io::nifti::VoxelData::U8(&labels), false)
        .unwrap();
}

#[test]
fn manifest_problems_are_reported_with_their_lines_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let set = |out: &Path, count: usize, shape: [usize; 3]| {
        run_synth(&SynthArgs {
            orientation: Some("RAS".into()),
            ..synth_args(out, count, 41, shape)
        })
        .unwrap();
    };
    set(&data, 4, [48, 48, 24]);
    set(&data.join("other"), 1, [48, 48, 20]);
    // Label 9 in 50 voxels and 6 in 3; a mask shifted by 5 mm; a mask of 20 slices.
    edited_mask(
        &data.join("case_0001_mask.nii"),
        &data.join("bad_mask.nii"),
        |_| {},
        |v| {
            v[..50].fill(9);
            v[50..53].fill(6);
        },
    );
    edited_mask(
        &data.join("case_0002_mask.nii"),
        &data.join("shifted_mask.nii"),
        |h| {
            h.srow_x[3] += 5.0;
            h.quatern_x += 5.0;
        },
        |_| {},
    );
    let clean = read_checked_manifest(&data.join("manifest.csv")).unwrap();
    let label = |i: usize| clean[i].label;
    let rows = [
        "image,mask,label,case_id".to_string(),
        format!("case_0000.nii,case_0000_mask.nii,{},case_0000", label(0)),
        format!("case_0001.nii,bad_mask.nii,{},case_0001", label(1)),
        format!("./case_0000.nii,case_0000_mask.nii,{},again", label(0)),
        format!("case_0002.nii,shifted_mask.nii,{},case_0002", label(2)),
        format!(
            "case_0003.nii,other/case_0000_mask.nii,{},case_0003",
            label(3)
        ),
        format!(
            "other/case_0000.nii,other/case_0000_mask.nii,{},case_0000",
            1 - label(0)
        ),
        "missing.nii,case_0000_mask.nii,0,gone".to_string(),
    ];
    let manifest = data.join("bad.csv");
    std::fs::write(&manifest, rows.join("\n")).unwrap();
    let started = Instant::now();
    let msg = format!("{:#}", read_checked_manifest(&manifest).unwrap_err());
    println!(
        "checked in {:.3} s:\n{msg}",
        started.elapsed().as_secs_f64()
    );
    let line = |n: usize| -> &str {
        msg.lines()
            .find(|l| l.trim_start().starts_with(&format!("line {n}:")))
            .unwrap_or_else(|| panic!("no problem reported on line {n}"))
    };
    assert!(msg.contains("bad.csv: 6 problem(s)"));
    assert!(!msg.contains("line 2:"), "line 2 is fine");
    assert!(line(3).contains("bad_mask.nii holds 53 voxels outside the lobe labels 0–5"));
    assert!(line(3).contains("9 (50 voxels)") && line(3).contains("6 (3 voxels)"));
    assert!(line(4).contains("is already listed on line 2"));
    assert!(line(5).contains("not on the same grid") && line(5).contains("differ by up to 5.0000"));
    assert!(line(6).contains("not on the same grid") && line(6).contains("48×48×24 vs 48×48×20"));
    assert!(line(7).contains(&format!(
        "case id \"case_0000\" is labelled {} here but {} on line 2",
        1 - label(0),
        label(0)
    )));
    assert!(line(8).contains("missing.nii does not exist"));

    // train and evaluate stop at the check: no run folder, no evaluation folder.
    let run = dir.path().join("run");
    let e = format!("{:#}", run_train(&args(&manifest, &run)).unwrap_err());
    assert!(e.contains("6 problem(s)"), "{e}");
    assert!(!run.exists(), "train left {}", run.display());
    let weights = tiny_weights(dir.path());
    let out = dir.path().join("eval");
    let e = run_evaluate(weights, manifest, &out).unwrap_err();
    assert!(format!("{e:#}").contains("6 problem(s)"));
    assert!(!out.exists(), "evaluate left {}", out.display());
    println!("train and evaluate refused the manifest; nothing written");
}

#[test]
fn evaluate_reports_an_unreadable_case_and_still_scores_the_others() {
    // Three phantoms, one of whose images is cut short after its header: the manifest check
    // (headers only) passes, the volume's data cannot be read. evaluate scores the other two,
    // writes evaluation.json with the failure, leaves no output for the broken case and fails
    // naming its file.
    let dir = tempfile::tempdir().unwrap();
    let manifest = training_set(&dir.path().join("data"), 3, 29);
    let entries = read_checked_manifest(&manifest).unwrap();
    let broken = &entries[1];
    let bytes = std::fs::read(&broken.image).unwrap();
    std::fs::write(&broken.image, &bytes[..bytes.len() / 3]).unwrap();
    let weights = tiny_weights(dir.path());
    let out = dir.path().join("eval");
    let e = run_evaluate(weights, manifest, &out).unwrap_err();
    let msg = format!("{e:#}");
    println!("{msg}");
    assert!(msg.contains("1 of 3 cases could not be evaluated"), "{msg}");
    assert!(msg.contains(&broken.image.display().to_string()), "{msg}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("evaluation.json")).unwrap())
            .unwrap();
    let scored: Vec<&str> = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["case_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        scored,
        [entries[0].case_id.as_str(), entries[2].case_id.as_str()]
    );
    assert_eq!(json["failed"][0]["case_id"], broken.case_id.as_str());
    let left: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.starts_with(&broken.case_id))
        .collect();
    assert!(left.is_empty(), "outputs of the broken case: {left:?}");
}

#[test]
fn segmentation_and_class_label_errors_state_the_valid_range() {
    use m2unet::cpu::ops::loss::{cls_loss, seg_loss};
    // Six classes: −1 (ignore) and 0..=5 are valid, 6 is not.
    let (m, c, hw) = (1, 6, 4);
    let logits = vec![0f32; m * c * hw];
    assert!(seg_loss(&logits, m, c, hw, &[-1, 0, 5, 3], 1.0, None).is_ok());
    let e = seg_loss(&logits, m, c, hw, &[0, 1, 6, 5], 1.0, None)
        .unwrap_err()
        .to_string();
    println!("label 6 of 6 classes: {e}");
    assert!(e.contains("label 6") && e.contains("pixel 2"));
    assert!(e.contains("−1 (ignore) or a class 0..=5") && !e.contains("..6"));
    let e = cls_loss(&[0.0; 2], 1, 2, &[2], None, 1.0, None)
        .unwrap_err()
        .to_string();
    println!("class 2 of 2: {e}");
    assert!(e.contains("label 2") && e.contains("0..=1"));
}

#[test]
fn checkpoint_loads_as_weights_and_only_optim_tensors_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = training_set(&dir.path().join("data"), 2, 51);
    let run = dir.path().join("run");
    run_train(&TrainArgs {
        epochs: 1,
        ..args(&manifest, &run)
    })
    .unwrap();
    let path = run.join("last.safetensors");
    let ck = load_checkpoint(&path).unwrap();
    let weights = load_model(&path).unwrap();
    let same = weights.params == ck.model.params && weights.buffers == ck.model.buffers;
    let mut file = TensorFile::read(&path).unwrap();
    let n_optim = file
        .tensors
        .keys()
        .filter(|k| k.starts_with(OPTIM_PREFIX))
        .count();
    let moments_nonzero = ck.m.iter().filter(|v| **v != 0.0).count();
    println!(
        "weights equal: {same}; {n_optim} optim tensors; {moments_nonzero} non-zero first moments; step {}",
        ck.state.step
    );
    assert!(same);
    assert_eq!(n_optim, 2 * ck.model.table.params.len());
    assert!(moments_nonzero > ck.m.len() / 2);
    file.tensors
        .insert("optimizer.m".into(), Tensor::scalar(0.0));
    let err = model_from_tensors(&file).unwrap_err().to_string();
    assert!(err.contains("optimizer.m"), "{err}");
}

#[test]
fn demo_writes_outputs_and_reports_dice_of_the_written_map() {
    let dir = tempfile::tempdir().unwrap();
    let weights = dir.path().join("tiny.safetensors");
    m2unet::io::weights::save_model(
        &Model::init(ModelConfig::tiny(), 5),
        &weights,
        m2unet::io::weights::WeightDtype::F32,
    )
    .unwrap();
    let out = dir.path().join("demo");
    let opts = m2unet::demo::DemoOptions {
        out: out.clone(),
        seed: 9,
        severe: true,
        weights: "tiny".into(),
    };
    let mut engine = m2unet::cpu::CpuEngine::new(load_model(&weights).unwrap());
    let r = m2unet::demo::run_demo(&mut engine, &opts).unwrap();
    // Dice of every lobe recomputed from the written files with a plain loop.
    let pred = m2unet::io::read_volume(&out.join("demo_case_lobes.nii.gz")).unwrap();
    let truth = m2unet::io::read_volume(&out.join("demo_case_mask.nii.gz")).unwrap();
    let mut err = 0f64;
    for (l, &d) in r.dice.iter().enumerate() {
        let lab = (l + 1) as f32;
        let (mut inter, mut a, mut b) = (0.0, 0.0, 0.0);
        for (p, t) in pred.data.iter().zip(&truth.data) {
            let (x, y) = ((*p == lab) as u8 as f64, (*t == lab) as u8 as f64);
            inter += x * y;
            a += x;
            b += y;
        }
        let want = if a + b == 0.0 {
            1.0
        } else {
            2.0 * inter / (a + b)
        };
        err = err.max((want - d).abs());
    }
    let text = m2unet::demo::summary(&r);
    println!("{text}\nmax Dice error {err:e}");
    assert!(err < 1e-12);
    assert!(r.truth.severe);
    assert!((0.0..=1.0).contains(&r.report.severity.probability));
    assert!(out.join("demo_case_preview.png").is_file());
    assert!(out.join("demo_case_report.json").is_file());
    assert!(text.contains("RML") && text.contains("not for clinical use"));
    assert!(text.contains("weights tiny"));
    assert_eq!(r.report.weights.as_deref(), Some("tiny"));
}

#[test]
fn weights_are_the_flag_else_the_environment_else_the_embedded_default() {
    let (flag, env) = (Path::new("flag.safetensors"), "env.safetensors");
    let cases = [
        (Some(flag), Some(env), WeightsSource::Flag(flag.into())),
        (Some(flag), None, WeightsSource::Flag(flag.into())),
        (None, Some(env), WeightsSource::Env(env.into())),
        (None, Some(""), WeightsSource::EmbeddedDefault),
        (None, None, WeightsSource::EmbeddedDefault),
    ];
    for (f, e, want) in cases {
        let got = WeightsSource::resolve(f, e.map(OsString::from));
        println!("--weights {f:?}, {WEIGHTS_ENV}={e:?} → {got}");
        assert_eq!(got, want);
    }
    assert_eq!(
        WeightsSource::EmbeddedDefault.to_string(),
        "embedded default m2unet_synthetic_p112"
    );

    // The embedded default is the shipped file, byte for byte and as a model.
    let shipped =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/m2unet_synthetic_p112.safetensors");
    let embedded = WeightsSource::EmbeddedDefault.load().unwrap();
    let file = load_model(&shipped).unwrap();
    println!(
        "embedded default: {} bytes, patch {}, {} parameters",
        m2unet::weights_source::DEFAULT_WEIGHTS.len(),
        embedded.config().patch,
        embedded.table.n_params
    );
    assert_eq!(
        m2unet::weights_source::DEFAULT_WEIGHTS,
        std::fs::read(&shipped).unwrap()
    );
    assert_eq!(embedded.table.n_params, 4_015_304);
    assert_eq!(embedded.config().patch, 112);
    assert!(embedded.params == file.params && embedded.buffers == file.buffers);

    let missing = WeightsSource::Env("/nonexistent/w.safetensors".into());
    let err = format!("{:#}", missing.load().unwrap_err());
    println!("{err}");
    assert!(err.contains(WEIGHTS_ENV) && err.contains("/nonexistent/w.safetensors"));
}
