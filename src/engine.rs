//! What every engine (CPU, CUDA on a GPU, CUDA on the emulator) shares: the batch they take
//! and its one input check, the BatchNorm mode, the outputs, and the inference interface.

use crate::config::ModelConfig;
use anyhow::{bail, Result};

/// Which BatchNorm statistics a forward uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Running statistics (BN folded into the layer before it).
    Eval,
    /// Batch statistics; running statistics are updated as PyTorch does.
    Train,
}

/// One batch of bags: patches [M, in_channels, P, P] and optional labels.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub patches: &'a [f32],
    /// The patch side P of this batch (any positive multiple of 2^(depth − 1)).
    pub patch: usize,
    /// Consecutive bags over the M patches (each ≥ 2).
    pub bag_sizes: &'a [usize],
    /// [M, P, P], 0..seg_classes or −1 (ignore).
    pub seg_labels: Option<&'a [i64]>,
    /// [bags], 0..cls_classes.
    pub cls_labels: Option<&'a [i64]>,
}

impl<'a> Batch<'a> {
    /// An unlabelled batch whose patch side is read off the data: `patches` must hold M square
    /// patches of `in_channels`, M being the bag sizes' sum.
    pub fn unlabelled(
        patches: &'a [f32],
        bag_sizes: &'a [usize],
        in_channels: usize,
    ) -> Result<Self> {
        let m: usize = bag_sizes.iter().sum();
        Ok(Batch {
            patches,
            patch: patch_side(patches.len(), m, in_channels)?,
            bag_sizes,
            seg_labels: None,
            cls_labels: None,
        })
    }

    pub fn patches_count(&self) -> usize {
        self.bag_sizes.iter().sum()
    }

    /// Checks the patch side, bag sizes and every tensor's length against the model config.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let p = self.patch;
        cfg.check_patch(p)?;
        if self.bag_sizes.is_empty() {
            bail!("a batch needs at least one bag");
        }
        if let Some((i, n)) = self.bag_sizes.iter().enumerate().find(|(_, &n)| n < 2) {
            bail!("bag {i} has {n} patch(es); a bag needs at least 2 for multi-instance pooling");
        }
        let m = self.patches_count();
        let want = m * cfg.in_channels * p * p;
        if self.patches.len() != want {
            bail!(
                "patches hold {} values, but bag sizes {:?} (M = {m}) with {} channel(s) of {p}×{p} need {want}",
                self.patches.len(),
                self.bag_sizes,
                cfg.in_channels
            );
        }
        if let Some(i) = self.patches.iter().position(|v| !v.is_finite()) {
            bail!(
                "patches hold a non-finite value ({}) at index {i} (patch {})",
                self.patches[i],
                i / (cfg.in_channels * p * p)
            );
        }
        if let Some(l) = self.seg_labels {
            if l.len() != m * p * p {
                bail!(
                    "seg_labels hold {} values, expected M·P·P = {}",
                    l.len(),
                    m * p * p
                );
            }
        }
        if let Some(l) = self.cls_labels {
            if l.len() != self.bag_sizes.len() {
                bail!(
                    "cls_labels hold {} values, expected one per bag ({})",
                    l.len(),
                    self.bag_sizes.len()
                );
            }
        }
        Ok(())
    }

    /// (start, len) of each bag over the patches.
    pub fn bag_ranges(&self) -> Vec<(usize, usize)> {
        let mut start = 0;
        self.bag_sizes
            .iter()
            .map(|&n| {
                start += n;
                (start - n, n)
            })
            .collect()
    }
}

/// The side P of `m` square patches of `channels` held in `len` values.
pub fn patch_side(len: usize, m: usize, channels: usize) -> Result<usize> {
    let p = ((len / m.max(1) / channels.max(1)) as f64).sqrt().round() as usize;
    if m == 0 || p == 0 || m * channels * p * p != len {
        bail!("patches hold {len} values, not M = {m} square patches of {channels} channel(s)");
    }
    Ok(p)
}

/// The network's outputs for one batch of bags.
#[derive(Clone, Debug, Default)]
pub struct Outputs {
    /// [M, seg_classes, P, P], NCHW.
    pub seg_logits: Vec<f32>,
    /// [bags, cls_classes].
    pub cls_logits: Vec<f32>,
}

/// Evaluation-mode inference over loaded weights.
pub trait InferenceEngine {
    fn config(&self) -> &ModelConfig;
    /// A short description of where it runs (e.g. "cpu (2 threads)").
    fn describe(&self) -> String;
    /// Eval-mode forward of `patches` [M, in_channels, P, P] split into consecutive bags of
    /// `bag_sizes` (each ≥ 2, summing to M); P is read off the data.
    fn forward_eval(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Outputs>;
    /// Eval-mode severity logits [bags, cls_classes] only (no decoder), for bags as in
    /// `forward_eval`; memory does not grow with the bag beyond its patches and bottleneck.
    fn classify(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Vec<f32>>;
    /// Eval-mode segmentation only (no bag needed) of patches [M, in_channels, P, P] of side
    /// `patch`: argmax lobe labels [M, P, P].
    fn segment(&mut self, patches: &[f32], patch: usize) -> Result<Vec<u8>>;
}

/// The number M of patches of side `patch` in `patches`, for segmentation (checked: whole
/// patches, finite values).
pub fn segment_count(cfg: &ModelConfig, patches: &[f32], patch: usize) -> Result<usize> {
    cfg.check_patch(patch)?;
    let len = patches.len();
    let per = cfg.in_channels * patch * patch;
    if len == 0 || !len.is_multiple_of(per) {
        bail!(
            "segment: {len} values are not a whole number of {}×{patch}×{patch} patches",
            cfg.in_channels
        );
    }
    if let Some(i) = patches.iter().position(|v| !v.is_finite()) {
        bail!(
            "segment: patch {} holds a non-finite value ({})",
            i / per,
            patches[i]
        );
    }
    Ok(len / per)
}
