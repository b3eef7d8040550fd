//! The CUDA engine: hand-written fp16 kernels (kernels/*.cu) with fp32 accumulation, run on a
//! GPU through cudarc or on the CPU emulator, behind one device layer and one orchestration.

pub mod device;
pub mod engine;
pub mod kernels;
pub mod nvtx;
pub mod tensor_map;
pub mod train;
pub mod weights;

pub use device::{describe_devices, ConvTier, DevPtr, Device, DeviceKind, Graph, Mark};
pub use engine::CudaEngine;
