//! The device a command runs on (auto | cpu | cuda | emu) and the one factory of inference
//! engines.

use crate::cpu::CpuEngine;
use crate::cuda::{CudaEngine, Device, DeviceKind};
use crate::engine::InferenceEngine;
use crate::model::Model;
use anyhow::Result;

/// Where the network runs (the `--device` of every command).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// The first GPU when the CUDA driver finds one, else the CPU (the command says which).
    Auto,
    /// The f32 CPU engine.
    Cpu,
    /// The CUDA engine on the first GPU (fp16 kernels, fp32 accumulation).
    Cuda,
    /// The CUDA engine's kernels on the CPU emulator (slow; for checks without a GPU).
    Emu,
}

impl Backend {
    /// `auto` made concrete: `cuda` when a GPU is usable, else `cpu` (saying why on stderr).
    pub fn resolve(self) -> Backend {
        if self != Backend::Auto {
            return self;
        }
        match Device::new(DeviceKind::Gpu) {
            Ok(d) => {
                eprintln!("device: {} (--device auto)", d.describe());
                Backend::Cuda
            }
            Err(e) => {
                let why = format!("{e:#}");
                let why = why.split(": use --device").next().unwrap_or_default();
                eprintln!("device: cpu (--device auto found no GPU: {why})");
                Backend::Cpu
            }
        }
    }

    /// The CUDA engine's device for `cuda` and `emu` (and `auto` with a GPU); None for the
    /// CPU engine.
    pub fn cuda_device(self) -> Option<DeviceKind> {
        match self.resolve() {
            Backend::Auto | Backend::Cpu => None,
            Backend::Cuda => Some(DeviceKind::Gpu),
            Backend::Emu => Some(DeviceKind::Emu),
        }
    }
}

/// The inference engine for `model` on `backend`.
pub fn make_engine(model: Model, backend: Backend) -> Result<Box<dyn InferenceEngine>> {
    engine_on(model, backend.cuda_device())
}

/// The inference engine for `model` on a CUDA device of `kind` (see
/// [`Backend::cuda_device`]), or the CPU engine for None.
pub fn engine_on(model: Model, kind: Option<DeviceKind>) -> Result<Box<dyn InferenceEngine>> {
    Ok(match kind {
        None => Box::new(CpuEngine::new(model)),
        Some(kind) => Box::new(CudaEngine::new(&model, kind)?),
    })
}
