//! Training checkpoints: the state_dict under its PyTorch names, AdamW moments under
//! `optim.m.<name>` / `optim.v.<name>`, and the step, data-order state and configs as JSON
//! metadata; written atomically.
//!
//! PyTorch users load a checkpoint with `load_state_dict` after dropping the keys that start
//! with [`OPTIM_PREFIX`]; `load_model` (and so `assess`) ignores exactly that prefix.

use crate::config::{ModelConfig, TrainConfig};
use crate::cpu::Trainer;
use crate::io::weights::{model_from_tensors, model_tensors, Tensor, TensorFile, WeightDtype};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Prefix of the optimiser tensors in a checkpoint.
pub const OPTIM_PREFIX: &str = "optim.";

/// Where a run stands: everything besides tensors and configs that a resume needs.
///
/// The run has no random state of its own beyond the data order: the bags of an epoch are a
/// function of (seed, epoch, manifest row), so `(seed, epoch, position)` is the whole RNG and
/// data-order state.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimiser steps taken.
    pub step: u64,
    /// The epoch in progress (0-based).
    pub epoch: u64,
    /// Training bags of this epoch already consumed (in the epoch's shuffled order).
    pub position: usize,
    /// Seed of the data order and of the initialisation.
    pub seed: u64,
    /// Best validation score so far and the epoch (1-based) that reached it.
    pub best_score: Option<f64>,
    pub best_epoch: Option<u64>,
}

/// Metadata keys of a checkpoint.
const KEY_STATE: &str = "train_state";
const KEY_TRAIN: &str = "train_config";
const KEY_MODEL: &str = "model_config";
const KEY_RUN: &str = "run";

/// A checkpoint's contents.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub trainer: Trainer,
    pub state: TrainState,
    /// The run's settings (JSON written by the trainer).
    pub run: String,
}

/// The tensors and metadata of a checkpoint.
pub fn checkpoint_tensors(trainer: &Trainer, state: &TrainState, run: &str) -> Result<TensorFile> {
    let model = &trainer.model;
    let mut file = model_tensors(model, WeightDtype::F32);
    for p in &model.table.params {
        for (kind, buf) in [("m", &trainer.m), ("v", &trainer.v)] {
            file.tensors.insert(
                format!("{OPTIM_PREFIX}{kind}.{}", p.name),
                Tensor::f32(&p.shape, buf[p.range()].to_vec()),
            );
        }
    }
    file.metadata
        .insert(KEY_STATE.into(), serde_json::to_string(state)?);
    file.metadata
        .insert(KEY_TRAIN.into(), serde_json::to_string(&trainer.config)?);
    file.metadata
        .insert(KEY_MODEL.into(), serde_json::to_string(model.config())?);
    file.metadata.insert(KEY_RUN.into(), run.to_string());
    Ok(file)
}

/// Writes a checkpoint atomically (a killed writer leaves the previous file intact).
pub fn save_checkpoint(
    path: &Path,
    trainer: &Trainer,
    state: &TrainState,
    run: &str,
) -> Result<()> {
    checkpoint_tensors(trainer, state, run)?.write(path)
}

fn meta<'a>(file: &'a TensorFile, key: &str) -> Result<&'a str> {
    file.metadata
        .get(key)
        .map(String::as_str)
        .ok_or_else(|| anyhow!("metadata {key:?} is missing (not a training checkpoint)"))
}

/// Reads a checkpoint written by [`save_checkpoint`].
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    let file = TensorFile::read(path)?;
    let ctx = || format!("{} is not a usable training checkpoint", path.display());
    let model = model_from_tensors(&file).with_context(ctx)?;
    let state: TrainState = serde_json::from_str(meta(&file, KEY_STATE).with_context(ctx)?)
        .with_context(|| format!("{}: bad {KEY_STATE} metadata", path.display()))?;
    let config: TrainConfig = serde_json::from_str(meta(&file, KEY_TRAIN).with_context(ctx)?)
        .with_context(|| format!("{}: bad {KEY_TRAIN} metadata", path.display()))?;
    let model_cfg: ModelConfig = serde_json::from_str(meta(&file, KEY_MODEL).with_context(ctx)?)
        .with_context(|| format!("{}: bad {KEY_MODEL} metadata", path.display()))?;
    if model_cfg != *model.config() {
        bail!(
            "{}: the stored model config {model_cfg:?} does not match the tensors ({:?})",
            path.display(),
            model.config()
        );
    }
    let run = meta(&file, KEY_RUN).with_context(ctx)?.to_string();
    let mut trainer = Trainer::new(model, config);
    for p in &trainer.model.table.params {
        for (kind, buf) in [("m", &mut trainer.m), ("v", &mut trainer.v)] {
            let name = format!("{OPTIM_PREFIX}{kind}.{}", p.name);
            let (shape, data) = file.f32(&name).with_context(ctx)?;
            if shape != p.shape.as_slice() {
                bail!(
                    "{}: tensor {name:?} has shape {shape:?}, expected {:?}",
                    path.display(),
                    p.shape
                );
            }
            buf[p.range()].copy_from_slice(data);
        }
    }
    trainer.step = state.step;
    Ok(Checkpoint {
        trainer,
        state,
        run,
    })
}
