//! Training checkpoints: the state_dict under its PyTorch names, AdamW moments under
//! `optim.m.<name>` / `optim.v.<name>`, and the step, data-order state and configs as JSON
//! metadata; written atomically.
//!
//! PyTorch users load a checkpoint with `load_state_dict` after dropping the keys that start
//! with [`OPTIM_PREFIX`]; `load_model` (and so `assess`) ignores exactly that prefix.
//!
//! The module works on plain data (model, optimiser settings, moments, run state); the training
//! module turns a [`Checkpoint`] into its trainer and back.

use crate::config::{ModelConfig, TrainConfig};
use crate::io::weights::{
    model_from_tensors, model_tensors, Tensor, TensorFile, WeightDtype, OPTIM_PREFIX,
};
use crate::model::Model;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
    /// AdamW steps taken, when fewer than `step` (the CUDA engine skips the update of a step
    /// whose loss-scaled gradients overflowed); None: equal to `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optim_steps: Option<u64>,
    /// The CUDA engine's dynamic loss scale (None for runs on the CPU engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f32>,
}

/// Metadata keys of a checkpoint.
const KEY_STATE: &str = "train_state";
const KEY_TRAIN: &str = "train_config";
const KEY_MODEL: &str = "model_config";
const KEY_RUN: &str = "run";

/// A checkpoint read back by [`load_checkpoint`].
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub model: Model,
    /// The optimiser's settings.
    pub train_config: TrainConfig,
    /// AdamW first and second moments, laid out as the model's parameters.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    pub state: TrainState,
    /// The run's settings (JSON written by the trainer).
    pub run: String,
}

/// What [`save_checkpoint`] writes, borrowed from whoever trains.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointRef<'a> {
    pub model: &'a Model,
    pub train_config: &'a TrainConfig,
    pub m: &'a [f32],
    pub v: &'a [f32],
    pub state: &'a TrainState,
    pub run: &'a str,
}

/// The tensors and metadata of a checkpoint.
fn checkpoint_tensors(ck: &CheckpointRef) -> Result<TensorFile> {
    let model = ck.model;
    let mut file = model_tensors(model, WeightDtype::F32);
    for p in &model.table.params {
        for (kind, buf) in [("m", ck.m), ("v", ck.v)] {
            file.tensors.insert(
                format!("{OPTIM_PREFIX}{kind}.{}", p.name),
                Tensor::f32(&p.shape, buf[p.range()].to_vec()),
            );
        }
    }
    file.metadata
        .insert(KEY_STATE.into(), serde_json::to_string(ck.state)?);
    file.metadata
        .insert(KEY_TRAIN.into(), serde_json::to_string(ck.train_config)?);
    file.metadata
        .insert(KEY_MODEL.into(), serde_json::to_string(model.config())?);
    file.metadata.insert(KEY_RUN.into(), ck.run.to_string());
    Ok(file)
}

/// Writes a checkpoint atomically (a killed writer leaves the previous file intact).
pub fn save_checkpoint(path: &Path, ck: &CheckpointRef) -> Result<()> {
    checkpoint_tensors(ck)?.write(path)
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
    let train_config: TrainConfig = serde_json::from_str(meta(&file, KEY_TRAIN).with_context(ctx)?)
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
    let n = model.params.len();
    let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
    for p in &model.table.params {
        for (kind, buf) in [("m", &mut m), ("v", &mut v)] {
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
    Ok(Checkpoint {
        model,
        train_config,
        m,
        v,
        state,
        run,
    })
}
