//! The CPU engine against PyTorch golden fixtures (tools/torch_reference.py, float64): eval and
//! train outputs, losses, BN buffers, every gradient, and a 5-step AdamW trajectory.

use m2unet::config::TrainConfig;
use m2unet::cpu::{run_step, Trainer};
use m2unet::engine::{Batch, Mode};
use m2unet::io::weights::{load_model, model_tensors, TensorFile, WeightDtype};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn read(name: &str) -> TensorFile {
    TensorFile::read(&fixture(name)).unwrap()
}

fn l2(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// ‖a − b‖ / ‖b‖ (b the reference).
fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = l2(a.iter().zip(b).map(|(x, y)| (*x - *y) as f64));
    diff / l2(b.iter().map(|&y| y as f64)).max(1e-30)
}

struct Inputs {
    patches: Vec<f32>,
    patch: usize,
    bags: Vec<usize>,
    seg: Vec<i64>,
    cls: Vec<i64>,
}

fn inputs() -> Inputs {
    let f = read("tiny_input.safetensors");
    let (shape, patches) = f.f32("patches").unwrap();
    Inputs {
        patch: shape[2],
        patches: patches.to_vec(),
        bags: f
            .i64("bag_sizes")
            .unwrap()
            .1
            .iter()
            .map(|&b| b as usize)
            .collect(),
        seg: f.i64("seg_labels").unwrap().1.to_vec(),
        cls: f.i64("cls_labels").unwrap().1.to_vec(),
    }
}

impl Inputs {
    fn batch(&self, labels: bool) -> Batch<'_> {
        Batch {
            patches: &self.patches,
            patch: self.patch,
            bag_sizes: &self.bags,
            seg_labels: labels.then_some(self.seg.as_slice()),
            cls_labels: labels.then_some(self.cls.as_slice()),
        }
    }
}

fn check(name: &str, got: &[f32], reference: &TensorFile, key: &str, tol: f64) {
    let err = rel_l2(got, reference.f32(key).unwrap().1);
    println!("{name} {key}: relative L2 error {err:.3e} (tolerance {tol:e})");
    assert!(err <= tol, "{name} {key}: {err:e} > {tol:e}");
}

#[test]
fn eval_forward_matches_pytorch() {
    let mut model = load_model(&fixture("tiny_weights.safetensors")).unwrap();
    let inp = inputs();
    let r = run_step(
        &mut model,
        &inp.batch(false),
        Mode::Eval,
        &TrainConfig::default(),
    )
    .unwrap();
    let reference = read("tiny_eval.safetensors");
    check(
        "eval",
        &r.outputs.seg_logits,
        &reference,
        "seg_logits",
        1e-4,
    );
    check(
        "eval",
        &r.outputs.cls_logits,
        &reference,
        "cls_logits",
        1e-4,
    );
}

#[test]
fn train_forward_backward_matches_pytorch() {
    let mut model = load_model(&fixture("tiny_weights.safetensors")).unwrap();
    let inp = inputs();
    let r = run_step(
        &mut model,
        &inp.batch(true),
        Mode::Train,
        &TrainConfig::default(),
    )
    .unwrap();
    let reference = read("tiny_train.safetensors");
    check(
        "train",
        &r.outputs.seg_logits,
        &reference,
        "seg_logits",
        1e-4,
    );
    check(
        "train",
        &r.outputs.cls_logits,
        &reference,
        "cls_logits",
        1e-4,
    );
    let l = r.losses.unwrap();
    for (key, v) in [
        ("loss", l.total),
        ("loss_cls", l.cls),
        ("loss_seg_ce", l.seg_ce),
        ("loss_seg_dice", l.seg_dice),
    ] {
        check("train", &[v], &reference, key, 1e-4);
    }
    let state = model_tensors(&model, WeightDtype::F32);
    for bn in &model.table.bns {
        for buf in ["running_mean", "running_var"] {
            let key = format!("{}.{buf}", bn.module);
            let (_, got) = state.f32(&key).unwrap();
            check("train", got, &reference, &key, 1e-4);
        }
        let key = format!("{}.num_batches_tracked", bn.module);
        assert_eq!(
            state.i64(&key).unwrap().1,
            reference.i64(&key).unwrap().1,
            "{key}"
        );
    }
    // Gradients: some true gradients are zero (conv biases before BatchNorm, concept biases
    // under max − mean), so each tensor's error is measured against its own norm plus a small
    // fraction of the whole gradient's norm.
    let grads = r.grads.unwrap();
    let all: Vec<f32> = model
        .table
        .params
        .iter()
        .flat_map(|p| {
            reference
                .f32(&format!("grad.{}", p.name))
                .unwrap()
                .1
                .to_vec()
        })
        .collect();
    let whole = l2(all.iter().map(|&v| v as f64));
    let mut worst = (0.0, String::new());
    for p in &model.table.params {
        let (_, want) = reference.f32(&format!("grad.{}", p.name)).unwrap();
        let got = &grads[p.range()];
        let diff = l2(got.iter().zip(want).map(|(a, b)| (a - b) as f64));
        let err = diff / (l2(want.iter().map(|&v| v as f64)) + 1e-3 * whole);
        println!("grad.{:<28} error {err:.3e}", p.name);
        if err > worst.0 {
            worst = (err, p.name.clone());
        }
    }
    println!("worst gradient error {:.3e} ({})", worst.0, worst.1);
    assert!(
        worst.0 <= 1e-2,
        "gradient of {} off by {:e}",
        worst.1,
        worst.0
    );
}

#[test]
fn five_adamw_steps_follow_pytorch() {
    let model = load_model(&fixture("tiny_weights.safetensors")).unwrap();
    let inp = inputs();
    let mut trainer = Trainer::new(model, TrainConfig::default());
    let losses: Vec<f32> = (0..5)
        .map(|_| trainer.step(&inp.batch(true)).unwrap().total)
        .collect();
    let reference = read("tiny_adamw.safetensors");
    check("adamw", &losses, &reference, "losses", 1e-4);
    let state = model_tensors(&trainer.model, WeightDtype::F32);
    let mut worst = (0.0, String::new());
    for (name, _) in state
        .tensors
        .iter()
        .filter(|(n, _)| !n.ends_with("num_batches_tracked"))
    {
        let err = rel_l2(state.f32(name).unwrap().1, reference.f32(name).unwrap().1);
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    println!(
        "after 5 steps: worst tensor relative L2 error {:.3e} ({})",
        worst.0, worst.1
    );
    assert!(worst.0 <= 1e-4, "{} off by {:e}", worst.1, worst.0);
}

#[test]
fn two_runs_are_bit_identical() {
    let inp = inputs();
    let run = || {
        let model = load_model(&fixture("tiny_weights.safetensors")).unwrap();
        let mut t = Trainer::new(model, TrainConfig::default());
        let l: Vec<u32> = (0..2)
            .map(|_| t.step(&inp.batch(true)).unwrap().total.to_bits())
            .collect();
        (
            l,
            t.model
                .params
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>(),
        )
    };
    let (a, b) = (run(), run());
    let differing = a.1.iter().zip(&b.1).filter(|(x, y)| x != y).count();
    println!(
        "two runs: losses {:?} vs {:?}, {differing} differing parameters",
        a.0, b.0
    );
    assert_eq!(a, b);
}
