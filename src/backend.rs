//! The device a command runs on (cpu | cuda | emu) and the one factory of inference engines.

use crate::cpu::CpuEngine;
use crate::cuda::{CudaEngine, DeviceKind};
use crate::engine::InferenceEngine;
use crate::model::Model;
use anyhow::Result;

/// Where the network runs (the `--device` of every command).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The f32 CPU engine.
    Cpu,
    /// The CUDA engine on the first GPU (fp16 kernels, fp32 accumulation).
    Cuda,
    /// The CUDA engine's kernels on the CPU emulator (slow; for checks without a GPU).
    Emu,
}

impl Backend {
    /// The CUDA engine's device for `cuda` and `emu`; None for the CPU engine.
    pub fn cuda_device(self) -> Option<DeviceKind> {
        match self {
            Backend::Cpu => None,
            Backend::Cuda => Some(DeviceKind::Gpu),
            Backend::Emu => Some(DeviceKind::Emu),
        }
    }
}

/// The inference engine for `model` on `backend`.
pub fn make_engine(model: Model, backend: Backend) -> Result<Box<dyn InferenceEngine>> {
    Ok(match backend.cuda_device() {
        None => Box::new(CpuEngine::new(model)),
        Some(kind) => Box::new(CudaEngine::new(&model, kind)?),
    })
}
