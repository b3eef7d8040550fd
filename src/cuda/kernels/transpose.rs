//! Rust twin and launch wrapper of kernels/transpose.cu (fp32 matrix transpose).

use super::{launch_1d, DevAddr};
use crate::cuda::Device;
use anyhow::Result;
use bytemuck::{Pod, Zeroable};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct TransposeParams {
    pub x: DevAddr,
    pub y: DevAddr,
    pub rows: i32,
    pub cols: i32,
}

const _: () = assert!(std::mem::size_of::<TransposeParams>() == 24);

/// y [cols][rows] = x [rows][cols]ᵀ.
pub fn transpose_f32(dev: &Device, p: &TransposeParams) -> Result<()> {
    launch_1d(dev, "transpose_f32", (p.rows * p.cols) as usize, 256, p)
}
