//! Bag-wise training of M²UNet on the CPU engine, resumable, with per-epoch validation.
//!
//! Cases are split by case id; each epoch ends with validation (metrics CSV and curves) and
//! atomic checkpoints.

mod batch;
mod progress;
mod run_dir;
pub mod settings;
mod stepper;

pub use settings::{scheduled_lr, RunSettings, Schedule};

use crate::backend::Backend;
use crate::config::TrainConfig;
use crate::cpu::Trainer;
use crate::cuda::train::StepReport;
use crate::data::dataset::{
    load_bag, read_checked_manifest, split_by_case, Bag, BagCache, BagConfig, Loading,
    ManifestEntry, Prefetcher,
};
use crate::data::preprocess::PreprocessConfig;
use crate::evaluate::evaluate;
use crate::io::checkpoint::TrainState;
use crate::metrics::EvalMetrics;
use crate::model::Model;
use anyhow::{bail, Result};
use batch::{validation_losses, BatchData};
use progress::Progress;
use run_dir::{RunDir, Validation, Which};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use stepper::Stepper;

/// How a call to [`train`] starts.
pub enum Start {
    /// A new run in a folder that holds none.
    New(Box<NewRun>),
    /// The run in the folder, from its last.safetensors with its stored settings.
    Resume,
}

/// The beginning of a new run.
pub struct NewRun {
    /// The initial model; its config's patch side is the training patch side.
    pub model: Model,
    /// The optimiser's settings (the learning rate is set by the schedule at every step).
    pub config: TrainConfig,
    /// The run's settings; [`train`] sets `schedule_steps`.
    pub run: RunSettings,
    /// Seed of the validation split and the data order.
    pub seed: u64,
}

/// How far a call to [`train`] goes, and where it runs.
#[derive(Clone, Copy, Debug)]
pub struct RunLength {
    /// The engine that takes the steps (a resumed run may change it).
    pub device: Backend,
    /// Total epochs of the run (a resumed run continues up to this number, which also sets the
    /// end of a cosine schedule).
    pub epochs: u64,
    /// Stop (with a checkpoint) once this many optimiser steps have been taken in total.
    pub max_steps: Option<u64>,
    /// Memory for the training cases' preprocessed slices ([`BagCache`]), in bytes.
    pub cache_bytes: usize,
}

/// What a finished (or stopped) training call reports.
#[derive(Clone, Debug)]
pub struct TrainSummary {
    pub state: TrainState,
    /// Metrics of the last validation of this call, if any.
    pub last_metrics: Option<EvalMetrics>,
    pub seconds: f64,
    pub patches_per_second: f64,
}

/// Trains in the run folder `out` (created when missing). Each epoch visits every training case
/// once as a bag; `bags_per_step` bags make one AdamW step, logged in steps.csv. After each
/// epoch the validation volumes are assessed, the metrics appended to metrics.csv and drawn in
/// curves.png, and last.safetensors (also every `checkpoint_every` steps) and best.safetensors
/// (highest validation score) written. `quiet`: no progress bar or log lines.
pub fn train(out: &Path, start: Start, length: RunLength, quiet: bool) -> Result<TrainSummary> {
    let mut session = Session::open(out, start, length, quiet)?;
    let started = Instant::now();
    let mut last_metrics = None;
    while session.state.epoch < length.epochs {
        let epoch_started = Instant::now();
        if !session.train_epoch()? {
            session.save(Which::Last)?;
            break;
        }
        last_metrics = session.finish_epoch(epoch_started)?;
    }
    session.finish(started, last_metrics)
}

/// The training and validation cases of a run.
struct Cases {
    train: Vec<ManifestEntry>,
    val: Vec<ManifestEntry>,
    /// The validation cases' bags (epoch 0's slices), for the validation losses.
    val_bags: Vec<Bag>,
    bags: BagConfig,
}

impl Cases {
    /// The manifest's cases split by case id, with the validation bags loaded.
    fn load(run: &RunSettings, seed: u64, patch: usize) -> Result<Cases> {
        let entries = read_checked_manifest(&run.data)?;
        let (train, val) = split_by_case(&entries, run.val_fraction, seed);
        if train.is_empty() {
            bail!(
                "{}: no case is left for training after the validation split",
                run.data.display()
            );
        }
        let bags = BagConfig {
            bag_size: run.bag_size,
            preprocess: PreprocessConfig::new(patch),
        };
        let val_bags = val
            .iter()
            .enumerate()
            .map(|(i, e)| load_bag(e, i, &bags, seed, 0, None))
            .collect::<Result<_>>()?;
        Ok(Cases {
            train,
            val,
            val_bags,
            bags,
        })
    }
}

/// A run in progress.
struct Session {
    dir: RunDir,
    stepper: Stepper,
    /// The model's shape and the optimiser's settings.
    model: crate::config::ModelConfig,
    state: TrainState,
    run: RunSettings,
    /// `run` as stored in the checkpoints.
    run_json: String,
    cases: Cases,
    length: RunLength,
    progress: Progress,
    /// The training cases' preprocessed slices, kept across this call's epochs.
    cache: Arc<BagCache>,
    /// Patches trained on by this call.
    patches_done: usize,
}

impl Session {
    /// Starts or resumes the run, loads the cases (the manifest checked), then creates the run
    /// folder, resets the logs to the run's state and sets the schedule's length: a bad
    /// manifest leaves no folder or log behind.
    fn open(out: &Path, start: Start, length: RunLength, quiet: bool) -> Result<Session> {
        let dir = RunDir::at(out);
        let resumed = matches!(start, Start::Resume);
        let (trainer, state, mut run) = match start {
            Start::Resume => dir.load_last()?,
            Start::New(new) => {
                dir.ensure_empty()?;
                (
                    Trainer::new(new.model, new.config),
                    fresh_state(new.seed),
                    new.run,
                )
            }
        };
        let cfg = *trainer.model.config();
        let n_params = trainer.model.table.n_params;
        let cases = Cases::load(&run, state.seed, cfg.patch)?;
        let stepper = Stepper::new(trainer, length.device, state.loss_scale)?;
        dir.create()?;
        dir.reset_logs(resumed.then_some(&state))?;
        let per_epoch = cases.train.len().div_ceil(run.bags_per_step) as u64;
        run.schedule_steps = per_epoch * length.epochs;
        let total_steps = length
            .max_steps
            .map_or(run.schedule_steps, |m| m.min(run.schedule_steps));
        let progress = Progress::new(total_steps, state.step, quiet);
        progress.announce(&format!(
            "training {} cases ({} validation), {per_epoch} steps per epoch of {} bags × {} patches of {p}×{p}; {n_params} parameters; on {}",
            cases.train.len(),
            cases.val.len(),
            run.bags_per_step,
            run.bag_size,
            stepper.describe(),
            p = cfg.patch
        ));
        Ok(Session {
            run_json: serde_json::to_string(&run)?,
            dir,
            stepper,
            model: cfg,
            state,
            run,
            cases,
            length,
            progress,
            cache: Arc::new(BagCache::new(length.cache_bytes)),
            patches_done: 0,
        })
    }

    /// Trains the rest of the current epoch; false when `max_steps` stopped it first.
    fn train_epoch(&mut self) -> Result<bool> {
        let n = self.cases.train.len();
        let mut bags = Prefetcher::start_at(
            self.cases.train.clone(),
            self.cases.bags,
            self.state.seed,
            self.state.epoch,
            self.state.position,
            Loading {
                workers: 1,
                depth: 2 * self.run.bags_per_step,
                cache: Some(Arc::clone(&self.cache)),
            },
        );
        while self.state.position < n {
            if self.length.max_steps.is_some_and(|m| self.state.step >= m) {
                return Ok(false);
            }
            let k = self.run.bags_per_step.min(n - self.state.position);
            let batch: Vec<Bag> = bags.by_ref().take(k).collect::<Result<_>>()?;
            self.step(&batch)?;
        }
        Ok(true)
    }

    /// One optimiser step on `bags`, logged in steps.csv and on the progress display;
    /// last.safetensors every `checkpoint_every` steps.
    fn step(&mut self, bags: &[Bag]) -> Result<()> {
        let t = Instant::now();
        let (report, patches) = self.optimise(bags)?;
        let rate = patches as f64 / t.elapsed().as_secs_f64();
        self.patches_done += patches;
        self.state.step += 1;
        self.state.position += bags.len();
        self.dir.log_step(&self.state, &report, rate)?;
        self.progress.step(&self.state, &report, rate);
        if self.state.step.is_multiple_of(self.run.checkpoint_every) {
            self.save(Which::Last)?;
        }
        Ok(())
    }

    /// The AdamW step at the scheduled learning rate; its report and number of patches.
    fn optimise(&mut self, bags: &[Bag]) -> Result<(StepReport, usize)> {
        let cfg = self.model;
        let data = BatchData::new(bags, cfg.seg_classes)?;
        let batch = data.batch(cfg.patch);
        let run = &self.run;
        let step = self.state.step + 1;
        let lr = scheduled_lr(run.schedule, run.lr, step, run.schedule_steps);
        let report = self.stepper.step(&batch, lr)?;
        if !report.losses.total.is_finite() && !report.skipped {
            bail!(
                "step {step}: the loss is not finite ({:?}); lower --lr",
                report.losses
            );
        }
        Ok((report, batch.patches_count()))
    }

    /// End of an epoch: validation, metrics.csv and curves.png, best.safetensors when the
    /// score improved, last.safetensors. Returns the validation metrics.
    fn finish_epoch(&mut self, started: Instant) -> Result<Option<EvalMetrics>> {
        let validation = self.validate()?;
        let seconds = started.elapsed().as_secs_f64();
        self.dir
            .log_epoch(&self.state, validation.as_ref(), seconds)?;
        self.state.epoch += 1;
        self.state.position = 0;
        if let Some(v) = &validation {
            self.progress.epoch(&self.state, &v.metrics);
            self.keep_if_best(&v.metrics)?;
        }
        self.save(Which::Last)?;
        Ok(validation.map(|v| v.metrics))
    }

    /// Validation losses and the assessed validation volumes' metrics (None without
    /// validation cases).
    fn validate(&self) -> Result<Option<Validation>> {
        if self.cases.val.is_empty() {
            return Ok(None);
        }
        let trainer = self.stepper.trainer()?;
        let model = &trainer.model;
        let losses = validation_losses(model, &self.cases.val_bags, &trainer.config)?;
        let mut engine = self.stepper.inference_engine(model.clone())?;
        let (metrics, _) = evaluate(
            engine.as_mut(),
            &self.cases.val,
            &self.dir.validation_dir(),
            true,
        )?;
        Ok(Some(Validation { losses, metrics }))
    }

    /// Writes best.safetensors when `m` scores higher than every earlier epoch.
    fn keep_if_best(&mut self, m: &EvalMetrics) -> Result<()> {
        let score = m.score();
        if self.state.best_score.is_none_or(|b| score > b) {
            self.state.best_score = Some(score);
            self.state.best_epoch = Some(self.state.epoch);
            self.save(Which::Best)?;
        }
        Ok(())
    }

    /// Writes a checkpoint with the [`Session::recorded_state`].
    fn save(&self, which: Which) -> Result<()> {
        let trainer = self.stepper.trainer()?;
        let state = self.recorded_state(&trainer)?;
        self.dir.save(which, &trainer, &state, &self.run_json)
    }

    /// The run's state with the AdamW steps and the loss scale of the engine that trained.
    fn recorded_state(&self, trainer: &Trainer) -> Result<TrainState> {
        Ok(TrainState {
            optim_steps: (trainer.step != self.state.step).then_some(trainer.step),
            loss_scale: self.stepper.loss_scale()?,
            ..self.state
        })
    }

    fn finish(self, started: Instant, last_metrics: Option<EvalMetrics>) -> Result<TrainSummary> {
        self.progress.finish();
        let seconds = started.elapsed().as_secs_f64();
        let trainer = self.stepper.trainer()?;
        let state = self.recorded_state(&trainer)?;
        Ok(TrainSummary {
            state,
            last_metrics,
            seconds,
            patches_per_second: self.patches_done as f64 / seconds.max(1e-9),
        })
    }
}

/// The state of a run before its first step.
fn fresh_state(seed: u64) -> TrainState {
    TrainState {
        step: 0,
        epoch: 0,
        position: 0,
        seed,
        best_score: None,
        best_epoch: None,
        optim_steps: None,
        loss_scale: None,
    }
}
