//! Model and training configuration: the paper and tiny presets of docs/model.md.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// How a multi-instance level pools its instance scores into one bag score.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GcpMode {
    /// `max_i a_i − mean_i a_i` (the default, "global contrast pooling").
    MaxMinusMean,
    /// `max_i a_i` (ablation).
    Max,
    /// `mean_i a_i` (ablation).
    Mean,
}

impl fmt::Display for GcpMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GcpMode::MaxMinusMean => "max_minus_mean",
            GcpMode::Max => "max",
            GcpMode::Mean => "mean",
        })
    }
}

impl FromStr for GcpMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "max_minus_mean" => GcpMode::MaxMinusMean,
            "max" => GcpMode::Max,
            "mean" => GcpMode::Mean,
            other => bail!("unknown gcp mode {other:?} (expected max_minus_mean, max or mean)"),
        })
    }
}

/// The shape of the network. Every engine computes the same function of these fields; the
/// layers they imply are listed once, in `model::Arch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// The patch side the weights were trained at: preprocessing metadata for `assess` and
    /// `train`. The engines take the patch side of each batch from its input.
    pub patch: usize,
    /// Encoder stages D (the last is the bottleneck); the decoder has D − 1 blocks.
    #[serde(default = "paper_depth")]
    pub depth: usize,
    pub in_channels: usize,
    /// Width W of encoder blocks 1–4 and of the decoder.
    pub enc_width: usize,
    /// Width B of the bottleneck, the last encoder stage (enc5 for the paper).
    pub bottleneck_width: usize,
    /// K1: concepts of the embedding-level MIL layer.
    pub emb_concepts: usize,
    /// K2: concepts of the image-level MIL layer.
    pub img_concepts: usize,
    pub seg_classes: usize,
    pub cls_classes: usize,
    pub gcp: GcpMode,
}

fn paper_depth() -> usize {
    5
}

impl ModelConfig {
    /// The network of the paper (Table 1): 4,015,304 learnable parameters.
    pub fn paper() -> Self {
        ModelConfig {
            patch: 256,
            depth: paper_depth(),
            in_channels: 1,
            enc_width: 64,
            bottleneck_width: 512,
            emb_concepts: 256,
            img_concepts: 128,
            seg_classes: 6,
            cls_classes: 2,
            gcp: GcpMode::MaxMinusMean,
        }
    }

    /// A small network with the same structure, for tests.
    pub fn tiny() -> Self {
        ModelConfig {
            patch: 32,
            enc_width: 8,
            bottleneck_width: 16,
            emb_concepts: 16,
            img_concepts: 8,
            ..Self::paper()
        }
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "paper" => Ok(Self::paper()),
            "tiny" => Ok(Self::tiny()),
            other => bail!("unknown preset {other:?} (expected paper or tiny)"),
        }
    }

    /// Checks the invariants the engines rely on.
    pub fn validate(&self) -> Result<()> {
        if !(2..=8).contains(&self.depth) {
            bail!("depth {} is outside 2..=8 encoder stages", self.depth);
        }
        self.check_patch(self.patch)?;
        for (name, v) in [
            ("in_channels", self.in_channels),
            ("enc_width", self.enc_width),
            ("bottleneck_width", self.bottleneck_width),
            ("emb_concepts", self.emb_concepts),
            ("img_concepts", self.img_concepts),
            ("seg_classes", self.seg_classes),
            ("cls_classes", self.cls_classes),
        ] {
            if v == 0 {
                bail!("model config field {name} must be positive");
            }
        }
        Ok(())
    }

    /// The factor every patch side must be a multiple of: 2^(depth − 1) (16 for the paper).
    pub fn patch_multiple(&self) -> usize {
        1 << (self.depth - 1)
    }

    /// Checks that patches of side `p` pass through every pooling level evenly.
    pub fn check_patch(&self, p: usize) -> Result<()> {
        let k = self.patch_multiple();
        if p == 0 || !p.is_multiple_of(k) {
            bail!("patch side {p} is not a positive multiple of {k} (2^(depth − 1))");
        }
        Ok(())
    }
}

/// Losses and optimiser settings (docs/model.md defaults).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// λ_seg in `L = L_cls + λ_seg (L_ce_seg + L_dice)`.
    pub lambda_seg: f32,
    /// Optional per-class weights of the classification cross-entropy.
    pub class_weights: Option<[f32; 2]>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-4,
            lambda_seg: 1.0,
            class_weights: None,
        }
    }
}

/// BatchNorm constants (PyTorch defaults).
pub const BN_EPS: f32 = 1e-5;
pub const BN_MOMENTUM: f32 = 0.1;
