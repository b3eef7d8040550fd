//! Training batches: bags as the CPU engine's batch tensors, and the eval-mode losses of bags.

use crate::config::TrainConfig;
use crate::cpu::{run_step, Losses};
use crate::data::dataset::Bag;
use crate::engine::{Batch, Mode};
use crate::model::Model;
use anyhow::{anyhow, bail, Result};

/// The tensors of a batch of consecutive bags.
pub struct BatchData {
    patches: Vec<f32>,
    seg: Vec<i64>,
    cls: Vec<i64>,
    sizes: Vec<usize>,
}

impl BatchData {
    /// The training batch of consecutive bags: patches, i64 lobe labels, class labels.
    pub fn new(bags: &[Bag], classes: usize) -> Result<BatchData> {
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

    pub fn batch(&self, patch: usize) -> Batch<'_> {
        Batch {
            patches: &self.patches,
            patch,
            bag_sizes: &self.sizes,
            seg_labels: Some(&self.seg),
            cls_labels: Some(&self.cls),
        }
    }
}

/// Mean eval-mode losses (total, classification, segmentation CE, Dice) over `bags`, one bag
/// per forward, on a copy of `model` (its BatchNorm buffers stay as they are).
pub fn validation_losses(model: &Model, bags: &[Bag], train: &TrainConfig) -> Result<[f64; 4]> {
    let mut eval_model = model.clone();
    let mut sums = [0f64; 4];
    for b in bags {
        let l = eval_losses(&mut eval_model, std::slice::from_ref(b), train)?;
        for (s, v) in sums.iter_mut().zip([l.total, l.cls, l.seg_ce, l.seg_dice]) {
            *s += v as f64 / bags.len() as f64;
        }
    }
    Ok(sums)
}

/// Losses of one eval-mode forward over `bags` (no update).
fn eval_losses(model: &mut Model, bags: &[Bag], train: &TrainConfig) -> Result<Losses> {
    let cfg = *model.config();
    let data = BatchData::new(bags, cfg.seg_classes)?;
    run_step(model, &data.batch(cfg.patch), Mode::Eval, train)?
        .losses
        .ok_or_else(|| anyhow!("the forward returned no losses"))
}
