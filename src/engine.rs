//! What every engine (CPU, CUDA on a GPU, CUDA on the emulator) offers to the tools built on it.

use crate::config::ModelConfig;
use anyhow::Result;

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
    /// `bag_sizes` (each ≥ 2, summing to M).
    fn forward_eval(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Outputs>;
    /// Eval-mode segmentation only (no bag needed): argmax lobe labels [M, P, P].
    fn segment(&mut self, patches: &[f32]) -> Result<Vec<u8>>;
}
