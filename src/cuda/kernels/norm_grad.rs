//! Rust twins of kernels/norm_grad.cu's parameter structs and their launch wrappers: the BatchNorm + ReLU backward, the gradient routing into a unit's dY, and the materialised ×2 upsampling.

use super::{bn_chunks, check_i32, launch_1d, DevAddr, BN_CHUNK};
use crate::cuda::device::Device;
use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

/// Train-mode BatchNorm2d + ReLU backward over NHWC (see kernels/norm_grad.cu).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct BnBwdParams {
    pub dy: DevAddr,
    pub z: DevAddr,
    pub scale: DevAddr,
    pub shift: DevAddr,
    pub mean: DevAddr,
    pub invstd: DevAddr,
    pub gamma: DevAddr,
    pub partial: DevAddr,
    pub dgamma: DevAddr,
    pub dbeta: DevAddr,
    pub dz: DevAddr,
    pub pixels: i32,
    pub c: i32,
    pub c_real: i32,
    pub chunk: i32,
}

/// Routes an fp16 input-part gradient into a unit's fp32 dY (+=); n, h, w, c are the
/// destination's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct GradRouteParams {
    pub src: DevAddr,
    pub y: DevAddr,
    pub dst: DevAddr,
    pub n: i32,
    pub h: i32,
    pub w: i32,
    pub c: i32,
}

/// x [n, h, w, c] → y [n, 2h, 2w, c], as conv3x3_igemm_up's loader upsamples.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct Upsample2xParams {
    pub x: DevAddr,
    pub y: DevAddr,
    pub n: i32,
    pub h: i32,
    pub w: i32,
    pub c: i32,
}

const _: () = {
    assert!(std::mem::size_of::<BnBwdParams>() == 104);
    assert!(std::mem::size_of::<GradRouteParams>() == 40);
    assert!(std::mem::size_of::<Upsample2xParams>() == 32);
};

/// fp32 values of `BnBwdParams::partial` for `pixels` pixels of `c` (padded) channels, with
/// chunk = BN_CHUNK.
pub fn bn_bwd_partial_len(pixels: usize, c: usize) -> usize {
    bn_chunks(pixels) * 2 * c
}

/// Pixels per thread of bn_bwd_apply (kernels/norm_grad.cu's APPLY_PIX).
const BN_APPLY_PIX: usize = 4;

/// BatchNorm2d + ReLU backward: per-chunk sums (grid chunks × ⌈c/8 ÷ 256⌉), their fixed-order
/// total into dgamma and dbeta (one block per real channel), then dz. Needs chunk = BN_CHUNK
/// (the size `bn_bwd_partial_len` gives the scratch).
pub fn bn_backward(dev: &Device, p: &BnBwdParams) -> Result<()> {
    ensure!(
        p.chunk as usize == BN_CHUNK,
        "bn_backward: chunk must be BN_CHUNK"
    );
    ensure!(
        p.c % 8 == 0 && p.c_real <= p.c,
        "bn_backward: channels must be padded to a multiple of 8"
    );
    let (pixels, cv) = (p.pixels as usize, p.c as usize / 8);
    check_i32("bn_backward", pixels * p.c as usize)?;
    let grid = [bn_chunks(pixels) as u32, cv.div_ceil(256) as u32, 1];
    dev.launch("bn_bwd_reduce", grid, [256, 1, 1], p)?;
    dev.launch("bn_bwd_finalize", [p.c_real as u32, 1, 1], [256, 1, 1], p)?;
    let units = pixels.div_ceil(BN_APPLY_PIX) * cv;
    launch_1d(dev, "bn_bwd_apply", units, 256, p)
}

/// Checks a routing launch; its units of work are the 8-channel vectors of `pixels` pixels.
fn route_units(what: &str, p: &GradRouteParams, pixels: usize) -> Result<usize> {
    ensure!(p.c % 8 == 0, "{what}: channels must be a multiple of 8");
    check_i32(what, dims(p).iter().product())?;
    Ok(pixels * p.c as usize / 8)
}

/// n, h, w, c of a routing launch's destination.
fn dims(p: &GradRouteParams) -> [usize; 4] {
    [p.n, p.h, p.w, p.c].map(|v| v as usize)
}

/// dst += src, both [n, h, w, c].
pub fn grad_add(dev: &Device, p: &GradRouteParams) -> Result<()> {
    let [n, h, w, _] = dims(p);
    let units = route_units("grad_add", p, n * h * w)?;
    launch_1d(dev, "grad_add", units, 256, p)
}

/// dst [n, h, w, c] += the 2×2 max-pool's backward of src [n, h/2, w/2, c] (each window's
/// gradient to the first maximum of y [n, h, w, c]); h and w even.
pub fn maxpool_bwd(dev: &Device, p: &GradRouteParams) -> Result<()> {
    ensure!(
        p.h % 2 == 0 && p.w % 2 == 0 && p.y != 0,
        "maxpool_bwd: needs even h and w and the pooled unit's output y"
    );
    let [n, h, w, _] = dims(p);
    let units = route_units("maxpool_bwd", p, n * (h / 2) * (w / 2))?;
    launch_1d(dev, "maxpool_bwd", units, 256, p)
}

/// dst [n, h, w, c] += the ×2 bilinear upsampling's backward of src [n, 2h, 2w, c].
pub fn upsample_bwd(dev: &Device, p: &GradRouteParams) -> Result<()> {
    let [n, h, w, _] = dims(p);
    let units = route_units("upsample_bwd", p, n * h * w)?;
    launch_1d(dev, "upsample_bwd", units, 256, p)
}

/// y [n, 2h, 2w, c] = the ×2 bilinear upsampling of x [n, h, w, c], bit-identical to what
/// conv3x3_igemm_up's loader feeds the MMAs.
pub fn upsample2x(dev: &Device, p: &Upsample2xParams) -> Result<()> {
    ensure!(p.c % 8 == 0, "upsample2x: channels must be a multiple of 8");
    let [n, h, w, c] = [p.n, p.h, p.w, p.c].map(|v| v as usize);
    let units = 4 * n * h * w * (c / 8);
    check_i32("upsample2x", units * 8)?;
    launch_1d(dev, "upsample2x", units, 256, p)
}
