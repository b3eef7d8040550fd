//! What every engine (CPU, CUDA on a GPU, CUDA on the emulator) shares: the batch they take
//! and its one input check, the BatchNorm mode, the outputs, and the inference interface.

use crate::config::ModelConfig;
use anyhow::{bail, Result};
use rayon::prelude::*;

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
    /// `patch`: argmax labels [M, P, P] (first maximum wins) and, with `costs`, each pixel's
    /// costs of classes 1.. for the lobe-order step ([`LobeScores`]); an engine may compute
    /// them without writing the logits.
    fn segment(&mut self, patches: &[f32], patch: usize, costs: bool) -> Result<LobeScores>;
}

/// Costs are stored in steps of 1/16 nat, so a u8 holds −ln p up to 15.94 (p ≥ 1.2·10⁻⁷).
const COST_STEPS_PER_NAT: f32 = 16.0;

/// What `segment` returns: labels [M, P, P] and, when asked for, every pixel's cost of each
/// class but the background, −ln of its softmax probability quantised to 1/16 nat, rounded half
/// away from zero and saturated at 255 (one byte per lobe: a 600-slice volume at P = 256 keeps
/// 197 MB). kernels/common.cuh `class_costs` computes the same on the device.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LobeScores {
    pub labels: Vec<u8>,
    /// [pixel][class − 1], pixels in the order of `labels`; empty without costs.
    costs: Vec<u8>,
    /// Classes but the background (the costs per pixel).
    stride: usize,
}

impl LobeScores {
    /// Labels and costs as an engine computed them (`costs` empty, or `stride` per label).
    pub fn from_parts(labels: Vec<u8>, costs: Vec<u8>, stride: usize) -> Self {
        LobeScores {
            labels,
            costs,
            stride,
        }
    }

    /// The labels (first maximum wins) and, with `costs`, the class costs of logits
    /// [m, classes, hw].
    pub fn from_logits(logits: &[f32], classes: usize, hw: usize, costs: bool) -> Self {
        let (m, stride) = (logits.len() / (classes * hw), classes - 1);
        let labels = argmax_classes(logits, m, classes, hw);
        let mut scores = LobeScores::from_parts(labels, Vec::new(), stride);
        if costs {
            scores.costs = vec![0u8; m * hw * stride];
            scores
                .costs
                .par_chunks_mut(hw * stride)
                .zip(logits.par_chunks(classes * hw))
                .for_each(|(out, img)| {
                    for (px, out) in out.chunks_mut(stride).enumerate() {
                        let l = |k: usize| img[k * hw + px];
                        let top = (1..classes).map(l).fold(l(0), f32::max);
                        let sum: f32 = (0..classes).map(|k| (l(k) - top).exp()).sum();
                        let lse = top + sum.ln();
                        for (k, o) in (1..classes).zip(out) {
                            let steps = (lse - l(k)) * COST_STEPS_PER_NAT;
                            *o = steps.round().clamp(0.0, 255.0) as u8;
                        }
                    }
                });
        }
        scores
    }

    /// Appends the scores of the next patches (with costs exactly when these have them).
    pub fn append(&mut self, next: LobeScores) {
        self.labels.extend(next.labels);
        self.costs.extend(next.costs);
        self.stride = next.stride;
    }

    /// True when every label has its costs.
    pub fn has_costs(&self) -> bool {
        !self.labels.is_empty() && self.costs.len() == self.labels.len() * self.stride
    }

    /// The cost (nats, to 1/16) of class `class` (≥ 1) at `pixel` (an index into `labels`).
    pub fn cost(&self, pixel: usize, class: u8) -> f32 {
        self.costs[pixel * self.stride + class as usize - 1] as f32 / COST_STEPS_PER_NAT
    }

    /// The raw costs [pixel][class − 1] in 1/16 nat.
    pub fn costs(&self) -> &[u8] {
        &self.costs
    }
}

/// Per-pixel argmax over classes of logits [m, c, hw] → labels [m, hw] (first maximum wins).
fn argmax_classes(logits: &[f32], m: usize, c: usize, hw: usize) -> Vec<u8> {
    let mut out = vec![0u8; m * hw];
    for i in 0..m {
        let img = &logits[i * c * hw..(i + 1) * c * hw];
        for (px, o) in out[i * hw..(i + 1) * hw].iter_mut().enumerate() {
            let mut best = 0;
            for k in 1..c {
                if img[k * hw + px] > img[best * hw + px] {
                    best = k;
                }
            }
            *o = best as u8;
        }
    }
    out
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
