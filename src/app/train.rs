//! `m2unet train`: its arguments, a new or resumed run of the training loop, the final line.

use crate::backend::Backend;
use crate::config::{ModelConfig, TrainConfig};
use crate::io::weights::load_model;
use crate::model::Model;
use crate::train::{train, NewRun, RunLength, RunSettings, Schedule, Start, TrainSummary};
use anyhow::{anyhow, bail, Result};
use std::path::PathBuf;

/// Trains M²UNet on the bags of a manifest (CSV with image, mask, label[, case_id]). Cases are
/// split into training and validation by case id (no case in both). Each epoch visits every
/// training case once as a bag of `--bag-size` lung slices; `--bags-per-step` bags make one
/// AdamW step. After each epoch the validation volumes are assessed and the metrics appended
/// to RUN_DIR/metrics.csv and drawn in RUN_DIR/curves.png; RUN_DIR/steps.csv logs every step.
/// Checkpoints: RUN_DIR/last.safetensors (every --checkpoint-every steps and each epoch) and
/// RUN_DIR/best.safetensors (highest validation score = (mean lobe Dice + ROC AUC) / 2).
/// Both hold the state_dict under PyTorch names plus optimiser moments under `optim.m.*` and
/// `optim.v.*` (drop those keys before `load_state_dict`); `assess --weights` takes them as is.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Manifest CSV (columns image, mask, label, optional case_id); taken from the checkpoint
    /// with --resume.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run folder: checkpoints, metrics.csv, curves.png, steps.csv.
    #[arg(long)]
    pub out: PathBuf,
    /// Where the training steps run: cpu (f32), cuda (the first GPU: fp16 mixed precision,
    /// fp32 master weights, dynamic loss scaling) or emu (the CUDA kernels on the CPU
    /// emulator: slow, for checks). A resumed run may change it. Validation runs on the same
    /// engine.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub device: Backend,
    /// Network widths: the paper's (4,015,304 parameters) or the tiny test preset.
    #[arg(long, value_parser = ["paper", "tiny"], default_value = "paper")]
    pub preset: String,
    /// Total epochs of the run (a resumed run continues up to this number).
    #[arg(long, default_value_t = 10)]
    pub epochs: u64,
    /// Bags (CT images) per optimiser step.
    #[arg(long, default_value_t = 2)]
    pub bags_per_step: usize,
    /// Slices per bag.
    #[arg(long, default_value_t = 8)]
    pub bag_size: usize,
    /// Patch side P (a multiple of 16); default: the preset's (paper 256, tiny 32).
    #[arg(long)]
    pub patch: Option<usize>,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f32,
    /// Learning-rate schedule over the run's steps: constant, or cosine decay from --lr to
    /// --lr / 100 at the last step of --epochs.
    #[arg(long, value_enum, default_value_t = Schedule::Constant)]
    pub schedule: Schedule,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f32,
    /// Fraction of the cases (per class) held out for validation.
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f64,
    /// Seed of the initialisation, the split and the data order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Continue the run in --out from last.safetensors with its stored settings (only
    /// --epochs, which also sets the end of a cosine schedule, and --max-steps apply).
    #[arg(long)]
    pub resume: bool,
    /// Start from these weights instead of a fresh initialisation (their widths win over
    /// --preset).
    #[arg(long, conflicts_with = "resume")]
    pub init: Option<PathBuf>,
    /// Write last.safetensors every this many steps (and at each epoch's end).
    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: u64,
    /// Stop (with a checkpoint) once this many optimiser steps have been taken in total.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Memory in GiB for the training cases' preprocessed lung slices (P×P patches and masks,
    /// 5·P² bytes per slice), kept across epochs so that each case is read and preprocessed
    /// once: a clinical-size volume takes about a second to read. Cases beyond it are read for
    /// every bag; 0 reads every bag from disk. The bags are the same either way.
    #[arg(long, default_value_t = 4.0)]
    pub cache_gib: f64,
    /// No progress bar or log lines.
    #[arg(long)]
    pub quiet: bool,
}

/// `m2unet train`: trains on --device and prints where it stopped.
pub fn run(args: &TrainArgs) -> Result<TrainSummary> {
    let start = match args.resume {
        true => Start::Resume,
        false => Start::New(Box::new(new_run(args)?)),
    };
    let length = RunLength {
        device: args.device,
        epochs: args.epochs,
        max_steps: args.max_steps,
        cache_bytes: (args.cache_gib.max(0.0) * (1u64 << 30) as f64) as usize,
    };
    let s = train(&args.out, start, length, args.quiet)?;
    println!(
        "stopped at epoch {} step {} after {:.1} s ({:.2} patches/s); best validation score {} (epoch {}); checkpoints in {}",
        s.state.epoch,
        s.state.step,
        s.seconds,
        s.patches_per_second,
        s.state
            .best_score
            .map_or("n/a".to_string(), |v| format!("{v:.4}")),
        s.state
            .best_epoch
            .map_or("n/a".to_string(), |v| v.to_string()),
        args.out.display()
    );
    Ok(s)
}

/// A new run from the arguments: checked settings and the initial model.
fn new_run(args: &TrainArgs) -> Result<NewRun> {
    let data = args
        .data
        .clone()
        .ok_or_else(|| anyhow!("--data MANIFEST.csv is required (unless --resume)"))?;
    check_settings(args)?;
    let run = RunSettings {
        data,
        lr: args.lr,
        schedule: args.schedule,
        schedule_steps: 0,
        bags_per_step: args.bags_per_step,
        bag_size: args.bag_size,
        val_fraction: args.val_fraction,
        checkpoint_every: args.checkpoint_every,
    };
    let config = TrainConfig {
        lr: args.lr,
        weight_decay: args.weight_decay,
        ..TrainConfig::default()
    };
    Ok(NewRun {
        model: initial_model(args)?,
        config,
        run,
        seed: args.seed,
    })
}

fn check_settings(args: &TrainArgs) -> Result<()> {
    if args.bags_per_step == 0 {
        bail!("--bags-per-step must be at least 1");
    }
    if args.bag_size < 2 {
        bail!("--bag-size must be at least 2 (multi-instance pooling needs two patches)");
    }
    if !(0.0..1.0).contains(&args.val_fraction) {
        bail!("--val-fraction must be in [0, 1)");
    }
    if args.checkpoint_every == 0 {
        bail!("--checkpoint-every must be at least 1");
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        bail!("--lr must be a positive number");
    }
    Ok(())
}

/// The --init weights or a fresh --preset model (seeded), at the --patch side (default: the
/// weights' or the preset's).
fn initial_model(args: &TrainArgs) -> Result<Model> {
    let mut model = match &args.init {
        Some(w) => load_model(w)?,
        None => Model::init(ModelConfig::preset(&args.preset)?, args.seed),
    };
    if let Some(patch) = args.patch {
        model.set_trained_patch(patch)?;
    }
    Ok(model)
}
