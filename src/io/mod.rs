//! File formats: safetensors weights and tensors.

pub mod weights;
