//! A run's stored settings and its learning-rate schedule.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
