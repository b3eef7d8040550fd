//! A run folder: checkpoints (last, best), steps.csv, metrics.csv and curves.png.

use crate::cpu::Trainer;
use crate::cuda::train::StepReport;
use crate::data::{LOBE_NAMES, NUM_LOBES};
use crate::io::atomic::write_atomic;
use crate::io::checkpoint::{load_checkpoint, save_checkpoint, CheckpointRef, TrainState};
use crate::metrics::EvalMetrics;
use crate::plot::{write_line_charts, Panel, Series};
use crate::train::settings::RunSettings;
use anyhow::{bail, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Header of RUN_DIR/steps.csv.
const STEPS_HEADER: &str = "step,epoch,loss,cls,seg_ce,seg_dice,patches_per_s,loss_scale,skipped";

/// The files of a run folder.
pub struct RunDir {
    root: PathBuf,
    last: PathBuf,
    best: PathBuf,
    steps_csv: PathBuf,
    metrics_csv: PathBuf,
}

/// Which checkpoint to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    Last,
    Best,
}

/// The validation results of an epoch: mean losses and the assessed volumes' metrics.
pub struct Validation {
    /// Total, classification, segmentation CE and Dice losses.
    pub losses: [f64; 4],
    pub metrics: EvalMetrics,
}

impl RunDir {
    /// The run folder `root` (not created yet: see [`RunDir::create`]).
    pub fn at(root: &Path) -> RunDir {
        RunDir {
            root: root.to_path_buf(),
            last: root.join("last.safetensors"),
            best: root.join("best.safetensors"),
            steps_csv: root.join("steps.csv"),
            metrics_csv: root.join("metrics.csv"),
        }
    }

    /// Creates the folder when missing.
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.root)
            .with_context(|| format!("cannot create the run folder {}", self.root.display()))
    }

    /// Where the validation volumes' assess outputs go.
    pub fn validation_dir(&self) -> PathBuf {
        self.root.join("val")
    }

    /// Fails when the folder already holds a run.
    pub fn ensure_empty(&self) -> Result<()> {
        if self.last.exists() {
            bail!(
                "{} already holds a run (last.safetensors); pass --resume to continue it or choose another --out",
                self.root.display()
            );
        }
        Ok(())
    }

    /// The trainer, run state and settings stored in last.safetensors.
    pub fn load_last(&self) -> Result<(Trainer, TrainState, RunSettings)> {
        if !self.last.exists() {
            bail!(
                "--resume: {} does not exist (nothing to resume in {})",
                self.last.display(),
                self.root.display()
            );
        }
        let ck = load_checkpoint(&self.last)?;
        let run: RunSettings = serde_json::from_str(&ck.run)
            .with_context(|| format!("{}: bad run settings", self.last.display()))?;
        let mut trainer = Trainer::new(ck.model, ck.train_config);
        trainer.m = ck.m;
        trainer.v = ck.v;
        trainer.step = ck.state.optim_steps.unwrap_or(ck.state.step);
        Ok((trainer, ck.state, run))
    }

    /// Writes a checkpoint of `trainer` at `state` (atomically).
    pub fn save(
        &self,
        which: Which,
        trainer: &Trainer,
        state: &TrainState,
        run: &str,
    ) -> Result<()> {
        let path = match which {
            Which::Last => &self.last,
            Which::Best => &self.best,
        };
        let ck = CheckpointRef {
            model: &trainer.model,
            train_config: &trainer.config,
            m: &trainer.m,
            v: &trainer.v,
            state,
            run,
        };
        save_checkpoint(path, &ck)
    }

    /// Starts steps.csv and metrics.csv afresh, or for a resumed run keeps the rows up to its
    /// step and epoch (a run killed after its last checkpoint may have logged more).
    pub fn reset_logs(&self, resumed_at: Option<&TrainState>) -> Result<()> {
        let (step, epoch) = resumed_at.map_or((None, None), |s| (Some(s.step), Some(s.epoch)));
        truncate_csv(&self.steps_csv, STEPS_HEADER, |s| {
            step.is_some_and(|k| s <= k)
        })?;
        truncate_csv(&self.metrics_csv, &metrics_header(), |e| {
            epoch.is_some_and(|k| e <= k)
        })
    }

    /// Appends one step's losses, throughput, loss scale and whether its update was skipped
    /// to steps.csv.
    pub fn log_step(&self, state: &TrainState, r: &StepReport, rate: f64) -> Result<()> {
        let l = &r.losses;
        let line = format!(
            "{},{},{},{},{},{},{rate:.3},{},{}",
            state.step,
            state.epoch,
            l.total,
            l.cls,
            l.seg_ce,
            l.seg_dice,
            r.loss_scale,
            r.skipped as u8
        );
        append_line(&self.steps_csv, &line)
    }

    /// Appends the row of the finished epoch `state.epoch` to metrics.csv (mean training losses
    /// from steps.csv, validation losses and metrics or NaN) and redraws curves.png.
    pub fn log_epoch(
        &self,
        state: &TrainState,
        validation: Option<&Validation>,
        seconds: f64,
    ) -> Result<()> {
        let mut row = vec![(state.epoch + 1).to_string(), state.step.to_string()];
        row.extend(self.epoch_train_losses(state.epoch)?.map(fmt));
        match validation {
            None => row.extend(std::iter::repeat_n("nan".to_string(), 4 + NUM_LOBES + 7)),
            Some(Validation { losses, metrics: m }) => {
                row.extend(losses.map(fmt));
                row.extend(m.lobe_dice.map(fmt));
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
            }
        }
        row.push(format!("{seconds:.1}"));
        append_line(&self.metrics_csv, &row.join(","))?;
        draw_curves(&self.metrics_csv, &self.root.join("curves.png"))
    }

    /// Mean training losses of epoch `epoch` from steps.csv.
    fn epoch_train_losses(&self, epoch: u64) -> Result<[f64; 4]> {
        let (_, rows) = read_csv(&self.steps_csv)?;
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
}

/// Header of RUN_DIR/metrics.csv.
fn metrics_header() -> String {
    let dice: Vec<String> = LOBE_NAMES.iter().map(|n| format!("dice_{n}")).collect();
    format!(
        "epoch,step,train_loss,train_cls,train_seg_ce,train_seg_dice,val_loss,val_cls,val_seg_ce,val_seg_dice,{},mean_dice,accuracy,sensitivity,specificity,f1,auc,score,seconds",
        dice.join(",")
    )
}

/// Rewrites `path` (atomically) keeping the header and the rows whose first field passes `keep`.
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
    write_atomic(path, out.as_bytes())
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
