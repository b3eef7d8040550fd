//! `m2unet train`, `evaluate` and `export`: bag-wise training of M²UNet on the CPU engine with
//! a case-level validation split, per-epoch metrics (CSV and curves), resumable atomic
//! checkpoints, and evaluation of weights on a manifest.

use crate::assess::{assess_volume, AssessOptions};
use crate::config::{ModelConfig, TrainConfig};
use crate::cpu::{run_step, CpuEngine, Losses, Trainer};
use crate::data::dataset::{
    epoch_order, load_bag, read_manifest, split_by_case, Bag, BagConfig, ManifestEntry,
};
use crate::data::preprocess::PreprocessConfig;
use crate::data::{LOBE_NAMES, NUM_LOBES};
use crate::engine::{Batch, Mode};
use crate::io::checkpoint::{load_checkpoint, save_checkpoint, TrainState};
use crate::io::read_volume;
use crate::io::weights::{load_model, model_tensors, WeightDtype};
use crate::metrics::{lobe_dice, EvalMetrics};
use crate::model::Model;
use crate::plot::{write_line_charts, Panel, Series};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

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
    /// Where training runs (only the CPU engine trains for now).
    #[arg(long, default_value = "cpu")]
    pub device: String,
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
    /// No progress bar or log lines.
    #[arg(long)]
    pub quiet: bool,
}

/// Learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Cosine,
}

/// The learning rate of optimiser step `step` (1-based) of `total`.
pub fn scheduled_lr(schedule: Schedule, lr: f32, step: u64, total: u64) -> f32 {
    match schedule {
        Schedule::Constant => lr,
        Schedule::Cosine => {
            let t =
                (step.saturating_sub(1) as f64 / total.saturating_sub(1).max(1) as f64).min(1.0);
            let floor = lr as f64 / 100.0;
            (floor + (lr as f64 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
        }
    }
}

/// The settings that fix a run's arithmetic (stored in its checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    pub data: PathBuf,
    pub lr: f32,
    pub schedule: Schedule,
    /// Steps over which the schedule runs: --epochs × steps per epoch (a resume with another
    /// --epochs re-targets the schedule's end from there on).
    pub schedule_steps: u64,
    pub bags_per_step: usize,
    pub bag_size: usize,
    pub val_fraction: f64,
    pub checkpoint_every: u64,
}

/// What a finished (or stopped) `train` call reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub state: TrainState,
    /// Metrics of the last validation of this call, if any.
    pub last_metrics: Option<EvalMetrics>,
    pub seconds: f64,
    pub patches_per_second: f64,
}

/// Reads a manifest and checks every row before training: field count, label 0/1, image and
/// mask files present. Errors name the file's line number.
pub fn read_checked_manifest(path: &Path) -> Result<Vec<ManifestEntry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the manifest {}", path.display()))?;
    let mut rows = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let header: Vec<&str> = match rows.next() {
        Some((_, h)) => h.split(',').map(str::trim).collect(),
        None => bail!("{}: the manifest is empty", path.display()),
    };
    let label_col = header.iter().position(|h| *h == "label");
    let rows: Vec<(usize, Vec<&str>)> = rows
        .map(|(i, l)| (i + 1, l.split(',').map(str::trim).collect()))
        .collect();
    for (line, fields) in &rows {
        if fields.len() != header.len() {
            bail!(
                "{} line {line}: {} fields, but the header names {}",
                path.display(),
                fields.len(),
                header.len()
            );
        }
        if let Some(c) = label_col {
            if !matches!(fields[c], "0" | "1") {
                bail!(
                    "{} line {line}: label {:?} must be 0 (non-severe) or 1 (severe)",
                    path.display(),
                    fields[c]
                );
            }
        }
    }
    let entries = read_manifest(path)?;
    for (e, (line, _)) in entries.iter().zip(&rows) {
        for (what, file) in [("image", &e.image), ("mask", &e.mask)] {
            if !file.is_file() {
                bail!(
                    "{} line {line}: the {what} file {} does not exist",
                    path.display(),
                    file.display()
                );
            }
        }
    }
    Ok(entries)
}

/// The tensors of a batch of consecutive bags.
struct BatchData {
    patches: Vec<f32>,
    seg: Vec<i64>,
    cls: Vec<i64>,
    sizes: Vec<usize>,
}

impl BatchData {
    fn batch(&self, patch: usize) -> Batch<'_> {
        Batch {
            patches: &self.patches,
            patch,
            bag_sizes: &self.sizes,
            seg_labels: Some(&self.seg),
            cls_labels: Some(&self.cls),
        }
    }
}

/// The training batch of consecutive bags: patches, i64 lobe labels, class labels.
fn batch_tensors(bags: &[Bag], classes: usize) -> Result<BatchData> {
    let mut patches = Vec::new();
    let mut seg = Vec::new();
    for b in bags {
        if let Some(&bad) = b.masks.iter().find(|&&l| l as usize >= classes) {
            bail!(
                "case {}: the lobe mask holds label {bad}; expected 0–{}",
                b.case_id,
                classes - 1
            );
        }
        patches.extend_from_slice(&b.patches);
        seg.extend(b.masks.iter().map(|&l| l as i64));
    }
    Ok(BatchData {
        patches,
        seg,
        cls: bags.iter().map(|b| b.label as i64).collect(),
        sizes: bags.iter().map(|b| b.slices.len()).collect(),
    })
}

/// Losses of one eval-mode forward over `bags` (no update).
fn eval_losses(model: &mut Model, bags: &[Bag], train: &TrainConfig) -> Result<Losses> {
    let cfg = *model.config();
    let data = batch_tensors(bags, cfg.seg_classes)?;
    run_step(model, &data.batch(cfg.patch), Mode::Eval, train)?
        .losses
        .ok_or_else(|| anyhow!("the forward returned no losses"))
}

/// One case's evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub case_id: String,
    pub label: u8,
    pub probability: f64,
    pub lobe_dice: [f64; NUM_LOBES],
}

/// Assesses every case (writing the assess outputs into `work_dir`) and compares the lobe
/// maps with the masks in 3D and the severity probabilities with the labels.
pub fn evaluate(
    model: &Model,
    entries: &[ManifestEntry],
    work_dir: &Path,
) -> Result<(EvalMetrics, Vec<CaseResult>)> {
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("cannot create {}", work_dir.display()))?;
    let mut engine = CpuEngine::new(model.clone());
    let opts = AssessOptions {
        out_dir: Some(work_dir.to_path_buf()),
        ..AssessOptions::default()
    };
    let mut cases = Vec::with_capacity(entries.len());
    for e in entries {
        let report = assess_volume(&mut engine, &e.image, &opts)?;
        let pred = read_volume(Path::new(&report.outputs.lobes))?;
        let truth = read_volume(&e.mask)?;
        if pred.data.len() != truth.data.len() {
            bail!(
                "{}: the mask has {} voxels, the image {}",
                e.mask.display(),
                truth.data.len(),
                pred.data.len()
            );
        }
        let to_u8 = |v: &[f32]| -> Vec<u8> { v.iter().map(|&x| x.round() as u8).collect() };
        cases.push(CaseResult {
            case_id: e.case_id.clone(),
            label: e.label,
            probability: report.severity.probability,
            lobe_dice: lobe_dice(&to_u8(&pred.data), &to_u8(&truth.data)),
        });
    }
    let dice: Vec<_> = cases.iter().map(|c| c.lobe_dice).collect();
    let prob: Vec<f64> = cases.iter().map(|c| c.probability).collect();
    let severe: Vec<bool> = cases.iter().map(|c| c.label == 1).collect();
    Ok((EvalMetrics::from_cases(&dice, &prob, &severe), cases))
}

/// Header of RUN_DIR/steps.csv.
const STEPS_HEADER: &str = "step,epoch,loss,cls,seg_ce,seg_dice,patches_per_s";

/// Header of RUN_DIR/metrics.csv.
fn metrics_header() -> String {
    let dice: Vec<String> = LOBE_NAMES.iter().map(|n| format!("dice_{n}")).collect();
    format!(
        "epoch,step,train_loss,train_cls,train_seg_ce,train_seg_dice,val_loss,val_cls,val_seg_ce,val_seg_dice,{},mean_dice,accuracy,sensitivity,specificity,f1,auc,score,seconds",
        dice.join(",")
    )
}

/// Rewrites `path` keeping the header and the rows whose first field passes `keep`.
fn truncate_csv(path: &Path, header: &str, keep: impl Fn(u64) -> bool) -> Result<()> {
    let mut out = format!("{header}\n");
    if path.exists() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        for line in text.lines().skip(1) {
            let first = line.split(',').next().unwrap_or("");
            if first.parse::<u64>().map(&keep).unwrap_or(false) {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    std::fs::write(path, out).with_context(|| format!("cannot write {}", path.display()))
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))
}

/// Numeric columns of a CSV written by this module (header, rows).
fn read_csv(path: &Path) -> Result<(Vec<String>, Vec<Vec<f64>>)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut lines = text.lines();
    let header = lines
        .next()
        .unwrap_or("")
        .split(',')
        .map(String::from)
        .collect();
    let rows = lines
        .map(|l| {
            l.split(',')
                .map(|v| v.parse().unwrap_or(f64::NAN))
                .collect()
        })
        .collect();
    Ok((header, rows))
}

/// Mean training losses of epoch `epoch` from steps.csv.
fn epoch_train_losses(steps_csv: &Path, epoch: u64) -> Result<[f64; 4]> {
    let (_, rows) = read_csv(steps_csv)?;
    let mut sum = [0.0; 4];
    let mut n = 0usize;
    for r in rows.iter().filter(|r| r.len() >= 6 && r[1] == epoch as f64) {
        for k in 0..4 {
            sum[k] += r[2 + k];
        }
        n += 1;
    }
    Ok(sum.map(|s| if n == 0 { f64::NAN } else { s / n as f64 }))
}

/// Draws curves.png from metrics.csv: losses (train and validation) and validation metrics.
fn draw_curves(metrics_csv: &Path, png: &Path) -> Result<()> {
    let (header, rows) = read_csv(metrics_csv)?;
    let col = |name: &str| header.iter().position(|h| h == name);
    let series = |names: &[(&str, [u8; 3])]| -> Vec<Series> {
        names
            .iter()
            .filter_map(|(n, colour)| {
                let c = col(n)?;
                Some(Series {
                    name: n.to_string(),
                    colour: *colour,
                    points: rows
                        .iter()
                        .filter(|r| r.len() > c && r[c].is_finite())
                        .map(|r| (r[0], r[c]))
                        .collect(),
                })
            })
            .collect()
    };
    let panels = [
        Panel {
            title: "LOSS".into(),
            series: series(&[
                ("train_loss", [30, 90, 200]),
                ("val_loss", [220, 60, 40]),
                ("train_cls", [120, 170, 240]),
                ("val_cls", [240, 150, 120]),
            ]),
        },
        Panel {
            title: "VALIDATION".into(),
            series: series(&[
                ("mean_dice", [30, 150, 60]),
                ("auc", [200, 40, 160]),
                ("accuracy", [230, 150, 0]),
                ("f1", [90, 90, 90]),
            ]),
        },
    ];
    write_line_charts(png, &panels)
}

fn fmt(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else {
        format!("{v:.6}")
    }
}

/// `m2unet train`.
pub fn run_train(args: &TrainArgs) -> Result<TrainSummary> {
    match args.device.as_str() {
        "cpu" => {}
        "cuda" | "emu" => bail!(
            "training runs on the CPU engine for now (the CUDA engine has no backward yet); use --device cpu"
        ),
        other => bail!("unknown device {other:?} (training supports: cpu)"),
    }
    let out = &args.out;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the run folder {}", out.display()))?;
    let last_path = out.join("last.safetensors");
    let best_path = out.join("best.safetensors");
    let steps_csv = out.join("steps.csv");
    let metrics_csv = out.join("metrics.csv");

    let (mut trainer, mut state, mut run) = if args.resume {
        if !last_path.exists() {
            bail!(
                "--resume: {} does not exist (nothing to resume in {})",
                last_path.display(),
                out.display()
            );
        }
        let ck = load_checkpoint(&last_path)?;
        let run: RunSettings = serde_json::from_str(&ck.run)
            .with_context(|| format!("{}: bad run settings", last_path.display()))?;
        (ck.trainer, ck.state, run)
    } else {
        if last_path.exists() {
            bail!(
                "{} already holds a run (last.safetensors); pass --resume to continue it or choose another --out",
                out.display()
            );
        }
        let data = args
            .data
            .clone()
            .ok_or_else(|| anyhow!("--data MANIFEST.csv is required (unless --resume)"))?;
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
        let mut model = match &args.init {
            Some(w) => load_model(w)?,
            None => Model::init(ModelConfig::preset(&args.preset)?, args.seed),
        };
        let patch = args.patch.unwrap_or(match &args.init {
            Some(_) => model.config().patch,
            None => ModelConfig::preset(&args.preset)?.patch,
        });
        model.set_trained_patch(patch)?;
        let config = TrainConfig {
            lr: args.lr,
            weight_decay: args.weight_decay,
            ..TrainConfig::default()
        };
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
        let state = TrainState {
            step: 0,
            epoch: 0,
            position: 0,
            seed: args.seed,
            best_score: None,
            best_epoch: None,
        };
        (Trainer::new(model, config), state, run)
    };
    let cfg = *trainer.model.config();
    let entries = read_checked_manifest(&run.data)?;
    let (train, val) = split_by_case(&entries, run.val_fraction, state.seed);
    if train.is_empty() {
        bail!(
            "{}: no case is left for training after the validation split",
            run.data.display()
        );
    }
    let bag_cfg = BagConfig {
        bag_size: run.bag_size,
        preprocess: PreprocessConfig::new(cfg.patch),
    };
    let val_bags: Vec<Bag> = val
        .iter()
        .enumerate()
        .map(|(i, e)| load_bag(e, i, &bag_cfg, state.seed, 0))
        .collect::<Result<_>>()?;

    if args.resume {
        truncate_csv(&steps_csv, STEPS_HEADER, |s| s <= state.step)?;
        truncate_csv(&metrics_csv, &metrics_header(), |e| e <= state.epoch)?;
    } else {
        truncate_csv(&steps_csv, STEPS_HEADER, |_| false)?;
        truncate_csv(&metrics_csv, &metrics_header(), |_| false)?;
    }

    let per_epoch = train.len().div_ceil(run.bags_per_step) as u64;
    run.schedule_steps = per_epoch * args.epochs;
    let run_json = serde_json::to_string(&run)?;
    let total_steps = match args.max_steps {
        Some(m) => m.min(per_epoch * args.epochs),
        None => per_epoch * args.epochs,
    };
    let show_bar = !args.quiet && std::io::stderr().is_terminal();
    let bar = if show_bar {
        let b = ProgressBar::new(total_steps);
        b.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
            )
            .expect("static template")
            .progress_chars("=> "),
        );
        b.set_position(state.step);
        b
    } else {
        ProgressBar::hidden()
    };
    if !args.quiet {
        eprintln!(
            "training {} cases ({} validation), {} steps per epoch of {} bags × {} patches of {p}×{p}; {} parameters",
            train.len(),
            val.len(),
            per_epoch,
            run.bags_per_step,
            run.bag_size,
            trainer.model.table.n_params,
            p = cfg.patch
        );
    }

    let started = Instant::now();
    let mut patches_done = 0usize;
    let mut last_metrics = None;
    while state.epoch < args.epochs {
        let epoch_started = Instant::now();
        let order = epoch_order(train.len(), state.seed, state.epoch);
        let pending: Vec<usize> = order[state.position.min(order.len())..].to_vec();
        let (tx, rx) = sync_channel::<Result<Bag>>(2 * run.bags_per_step);
        let loader = {
            let (train, epoch, seed) = (train.clone(), state.epoch, state.seed);
            std::thread::spawn(move || {
                for idx in pending {
                    if tx
                        .send(load_bag(&train[idx], idx, &bag_cfg, seed, epoch))
                        .is_err()
                    {
                        return;
                    }
                }
            })
        };
        let mut stop = false;
        while state.position < train.len() {
            if args.max_steps.is_some_and(|m| state.step >= m) {
                stop = true;
                break;
            }
            let k = run.bags_per_step.min(train.len() - state.position);
            let bags: Vec<Bag> = (0..k)
                .map(|_| {
                    rx.recv()
                        .map_err(|_| anyhow!("the data loader stopped unexpectedly"))?
                })
                .collect::<Result<_>>()?;
            let t = Instant::now();
            let data = batch_tensors(&bags, cfg.seg_classes)?;
            let batch = data.batch(cfg.patch);
            trainer.config.lr =
                scheduled_lr(run.schedule, run.lr, trainer.step + 1, run.schedule_steps);
            let losses = trainer.step(&batch)?;
            if !losses.total.is_finite() {
                bail!(
                    "step {}: the loss is not finite ({:?}); lower --lr",
                    trainer.step,
                    losses
                );
            }
            let m = batch.patches_count();
            let rate = m as f64 / t.elapsed().as_secs_f64();
            patches_done += m;
            state.step = trainer.step;
            state.position += k;
            append_line(
                &steps_csv,
                &format!(
                    "{},{},{},{},{},{},{rate:.3}",
                    state.step,
                    state.epoch,
                    losses.total,
                    losses.cls,
                    losses.seg_ce,
                    losses.seg_dice
                ),
            )?;
            let msg = format!(
                "epoch {} loss {:.4} (cls {:.4} ce {:.4} dice {:.4}) {rate:.2} patches/s",
                state.epoch + 1,
                losses.total,
                losses.cls,
                losses.seg_ce,
                losses.seg_dice
            );
            bar.set_position(state.step);
            bar.set_message(msg.clone());
            if !show_bar && !args.quiet && state.step % 10 == 0 {
                eprintln!("step {} {msg}", state.step);
            }
            if state.step % run.checkpoint_every == 0 {
                save_checkpoint(&last_path, &trainer, &state, &run_json)?;
            }
        }
        drop(rx);
        let _ = loader.join();
        if stop {
            save_checkpoint(&last_path, &trainer, &state, &run_json)?;
            break;
        }

        // End of epoch: validation, metrics, curves, checkpoints.
        let train_l = epoch_train_losses(&steps_csv, state.epoch)?;
        let mut row = vec![(state.epoch + 1).to_string(), state.step.to_string()];
        row.extend(train_l.iter().map(|&v| fmt(v)));
        let metrics = if val.is_empty() {
            row.extend(std::iter::repeat_n("nan".to_string(), 4 + NUM_LOBES + 7));
            None
        } else {
            let mut eval_model = trainer.model.clone();
            let mut sums = [0f64; 4];
            for b in &val_bags {
                let l = eval_losses(&mut eval_model, std::slice::from_ref(b), &trainer.config)?;
                for (s, v) in sums.iter_mut().zip([l.total, l.cls, l.seg_ce, l.seg_dice]) {
                    *s += v as f64 / val_bags.len() as f64;
                }
            }
            let (m, _) = evaluate(&trainer.model, &val, &out.join("val"))?;
            row.extend(sums.iter().map(|&v| fmt(v)));
            row.extend(m.lobe_dice.iter().map(|&v| fmt(v)));
            row.extend(
                [
                    m.mean_dice,
                    m.accuracy,
                    m.sensitivity,
                    m.specificity,
                    m.f1,
                    m.auc,
                    m.score(),
                ]
                .map(fmt),
            );
            Some(m)
        };
        row.push(format!("{:.1}", epoch_started.elapsed().as_secs_f64()));
        append_line(&metrics_csv, &row.join(","))?;
        draw_curves(&metrics_csv, &out.join("curves.png"))?;
        state.epoch += 1;
        state.position = 0;
        if let Some(m) = &metrics {
            let score = m.score();
            if !args.quiet {
                bar.suspend(|| {
                    eprintln!(
                        "epoch {} (step {}): val mean Dice {:.4} AUC {:.4} accuracy {:.4} score {:.4}",
                        state.epoch, state.step, m.mean_dice, m.auc, m.accuracy, score
                    )
                });
            }
            if state.best_score.is_none_or(|b| score > b) {
                state.best_score = Some(score);
                state.best_epoch = Some(state.epoch);
                save_checkpoint(&best_path, &trainer, &state, &run_json)?;
            }
        }
        save_checkpoint(&last_path, &trainer, &state, &run_json)?;
        last_metrics = metrics;
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    Ok(TrainSummary {
        state,
        last_metrics,
        seconds,
        patches_per_second: patches_done as f64 / seconds.max(1e-9),
    })
}

/// Evaluates weights on the cases of a manifest: assesses every volume, then reports per-lobe
/// 3D Dice against the masks and accuracy, sensitivity, specificity, F1 and ROC AUC of the
/// severity against the labels. Writes the assess outputs and `evaluation.json` into --out.
#[derive(clap::Args, Debug, Clone)]
pub struct EvaluateArgs {
    /// Weights or checkpoint (safetensors).
    #[arg(long)]
    pub weights: PathBuf,
    /// Manifest CSV (image, mask, label[, case_id]).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
}

/// `evaluation.json`.
#[derive(Serialize)]
struct Evaluation<'a> {
    weights: String,
    data: String,
    cases: &'a [CaseResult],
    lobe_dice: [f64; NUM_LOBES],
    mean_dice: f64,
    accuracy: f64,
    sensitivity: f64,
    specificity: f64,
    f1: f64,
    auc: Option<f64>,
}

/// `m2unet evaluate`.
pub fn run_evaluate(args: &EvaluateArgs) -> Result<EvalMetrics> {
    let model = load_model(&args.weights)?;
    let entries = read_checked_manifest(&args.data)?;
    let (m, cases) = evaluate(&model, &entries, &args.out)?;
    println!(
        "{:<12} {:>5} {:>8} {}",
        "case",
        "label",
        "p(sev)",
        LOBE_NAMES.map(|n| format!("{n:>7}")).join("")
    );
    for c in &cases {
        println!(
            "{:<12} {:>5} {:>8.3} {}",
            c.case_id,
            c.label,
            c.probability,
            c.lobe_dice.map(|d| format!("{d:>7.4}")).join("")
        );
    }
    println!(
        "mean lobe Dice {:.4} ({}), accuracy {:.4}, sensitivity {:.4}, specificity {:.4}, F1 {:.4}, ROC AUC {:.4}",
        m.mean_dice,
        LOBE_NAMES
            .iter()
            .zip(m.lobe_dice)
            .map(|(n, d)| format!("{n} {d:.4}"))
            .collect::<Vec<_>>()
            .join(", "),
        m.accuracy,
        m.sensitivity,
        m.specificity,
        m.f1,
        m.auc
    );
    let json = Evaluation {
        weights: args.weights.display().to_string(),
        data: args.data.display().to_string(),
        cases: &cases,
        lobe_dice: m.lobe_dice,
        mean_dice: m.mean_dice,
        accuracy: m.accuracy,
        sensitivity: m.sensitivity,
        specificity: m.specificity,
        f1: m.f1,
        auc: (!m.auc.is_nan()).then_some(m.auc),
    };
    let path = args.out.join("evaluation.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(m)
}

/// Writes the model of a checkpoint (or weights file) as a plain weights file: the state_dict
/// only, without optimiser state, in f32 or f16.
#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// Checkpoint or weights file.
    #[arg(long)]
    pub weights: PathBuf,
    /// Output weights file (safetensors, PyTorch names).
    #[arg(long)]
    pub out: PathBuf,
    /// Store tensors as f16.
    #[arg(long)]
    pub half: bool,
    /// A note stored in the file's metadata (key "note").
    #[arg(long)]
    pub note: Option<String>,
}

/// `m2unet export`.
pub fn run_export(args: &ExportArgs) -> Result<()> {
    let model = load_model(&args.weights)?;
    let dtype = if args.half {
        WeightDtype::F16
    } else {
        WeightDtype::F32
    };
    let mut file = model_tensors(&model, dtype);
    if let Some(note) = &args.note {
        file.metadata.insert("note".into(), note.clone());
    }
    file.write(&args.out)?;
    println!(
        "wrote {} ({} parameters, patch {}, {})",
        args.out.display(),
        model.table.n_params,
        model.config().patch,
        if args.half { "f16" } else { "f32" }
    );
    Ok(())
}
