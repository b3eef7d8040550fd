//! Rust twins of kernels/heads_grad.cu's parameter structs (the heads' backward: losses, seg head, MIL layers) and their launch wrappers.

use super::{blocks, check_i32, launch_1d, DevAddr, Device};
use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct SegLossParams {
    pub logits: DevAddr,
    pub labels: DevAddr,
    pub x: DevAddr,
    pub w: DevAddr,
    pub amp: DevAddr,
    pub partial: DevAddr,
    pub losses: DevAddr,
    pub dx: DevAddr,
    pub dw: DevAddr,
    pub db: DevAddr,
    pub n: i32,
    pub hw: i32,
    pub c: i32,
    pub c_real: i32,
    pub classes: i32,
    pub lambda: f32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct ClsLossParams {
    pub logits: DevAddr,
    pub labels: DevAddr,
    pub weights: DevAddr,
    pub amp: DevAddr,
    pub losses: DevAddr,
    pub dlogits: DevAddr,
    pub bags: i32,
    pub classes: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct LinearBwdParams {
    pub x: DevAddr,
    pub w: DevAddr,
    pub dy: DevAddr,
    pub y_relu: DevAddr,
    pub dx: DevAddr,
    pub dw: DevAddr,
    pub db: DevAddr,
    pub rows: i32,
    pub fin: i32,
    pub fout: i32,
    pub pad_: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct GcpBwdParams {
    pub t: DevAddr,
    pub bag_start: DevAddr,
    pub dg: DevAddr,
    pub dt: DevAddr,
    pub bags: i32,
    pub k: i32,
    pub gcp: i32,
    pub pad_: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct Bn1dBwdParams {
    pub x: DevAddr,
    pub gamma: DevAddr,
    pub beta: DevAddr,
    pub dy: DevAddr,
    pub dx: DevAddr,
    pub dgamma: DevAddr,
    pub dbeta: DevAddr,
    pub rows: i32,
    pub c: i32,
    pub eps: f32,
    pub pad_: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct ConceptsBwdParams {
    pub x: DevAddr,
    pub w: DevAddr,
    pub dz: DevAddr,
    pub arg: DevAddr,
    pub dx: DevAddr,
    pub dw: DevAddr,
    pub db: DevAddr,
    pub partial: DevAddr,
    pub m: i32,
    pub inst: i32,
    pub c: i32,
    pub c_real: i32,
    pub k: i32,
    pub gcp: i32,
}

const _: () = {
    assert!(std::mem::size_of::<SegLossParams>() == 104);
    assert!(std::mem::size_of::<ClsLossParams>() == 56);
    assert!(std::mem::size_of::<LinearBwdParams>() == 72);
    assert!(std::mem::size_of::<GcpBwdParams>() == 48);
    assert!(std::mem::size_of::<Bn1dBwdParams>() == 72);
    assert!(std::mem::size_of::<ConceptsBwdParams>() == 88);
};

/// Pixels per block of the seg loss kernels (SEG_PIX in kernels/heads_grad.cu).
const SEG_PIX: usize = 1024;
/// Patches per chunk of the concepts' weight gradient (CONCEPTS_M in kernels/heads_grad.cu).
const CONCEPTS_M: usize = 32;

fn seg_blocks(p: &SegLossParams) -> usize {
    (p.n as usize * p.hw as usize).div_ceil(SEG_PIX)
}

/// fp32 values of `partial` that seg_loss_backward needs: per block of 1024 pixels the loss
/// sums (2 + 3·classes) and the dW/db sums (classes·(c_real + 1)), and 2 + 2·classes
/// gradient coefficients.
pub fn seg_loss_partial_len(p: &SegLossParams) -> usize {
    let c = p.classes as usize;
    seg_blocks(p) * (2 + 3 * c + c * (p.c_real as usize + 1)) + 2 + 2 * c
}

/// The seg losses (losses[1] = ce, losses[2] = dice) and the seg head's backward from
/// S·λ·d(ce + dice)/dlogits: dx += dlogits·w, dw and db written. Four launches: per-block loss
/// sums, their fixed-order finalize, the per-pixel gradient with per-block dW/db sums, and
/// their fixed-order reduction.
pub fn seg_loss_backward(dev: &Device, p: &SegLossParams) -> Result<()> {
    ensure!(
        (2..=16).contains(&p.classes) && p.classes * p.c_real <= 4096,
        "seg_loss_backward: 2 to 16 classes and at most 4096 weights"
    );
    ensure!(
        p.c % 8 == 0 && p.c_real <= p.c && p.partial != 0,
        "seg_loss_backward: padded channels and a partial-sum buffer"
    );
    check_i32(
        "seg_loss_backward",
        p.n as usize * p.hw as usize * p.c as usize,
    )?;
    let grid = [seg_blocks(p) as u32, 1, 1];
    dev.launch("seg_loss_stats", grid, [128, 1, 1], p)?;
    dev.launch("seg_loss_finalize", [1, 1, 1], [64, 1, 1], p)?;
    dev.launch("seg_loss_grad", grid, [256, 1, 1], p)?;
    let outs = (p.classes * (p.c_real + 1)) as usize;
    launch_1d(dev, "seg_loss_reduce", outs, 128, p)
}

/// The classification loss (losses[0]) and S·dloss/dlogits (one block).
pub fn cls_loss(dev: &Device, p: &ClsLossParams) -> Result<()> {
    ensure!(
        p.bags > 0 && p.classes > 0,
        "cls_loss: needs bags and classes"
    );
    dev.launch("cls_loss", [1, 1, 1], [256, 1, 1], p)
}

/// dx (when given), dw and db (when given) of a linear layer, through its ReLU when
/// `y_relu` is given.
pub fn linear_bwd(dev: &Device, p: &LinearBwdParams) -> Result<()> {
    let (rows, fin, fout) = (p.rows as usize, p.fin as usize, p.fout as usize);
    let units =
        if p.dx != 0 { rows * fin } else { 0 } + fout * fin + if p.db != 0 { fout } else { 0 };
    check_i32("linear_bwd", units)?;
    launch_1d(dev, "linear_bwd", units, 128, p)
}

/// The gradient of gcp_bags.
pub fn gcp_bwd(dev: &Device, p: &GcpBwdParams) -> Result<()> {
    launch_1d(dev, "gcp_bwd", (p.bags * p.k) as usize, 128, p)
}

/// BatchNorm1d (train) + ReLU backward, one block per channel.
pub fn bn1d_bwd_relu(dev: &Device, p: &Bn1dBwdParams) -> Result<()> {
    ensure!(p.rows > 0, "bn1d_bwd_relu: needs rows");
    dev.launch("bn1d_bwd_relu", [p.c as u32, 1, 1], [128, 1, 1], p)
}

/// fp32 values of `partial` that concepts_bwd needs: per chunk of 32 patches,
/// k·(c_real + 1) sums.
pub fn concepts_bwd_partial_len(p: &ConceptsBwdParams) -> usize {
    (p.m as usize).div_ceil(CONCEPTS_M) * p.k as usize * (p.c_real as usize + 1)
}

/// Backward of mil_concepts_gcp: dx += (into the bottleneck's dY), dw and db (when given)
/// written. Three launches: dx, per-chunk dW/db sums, their fixed-order reduction.
pub fn concepts_bwd(dev: &Device, p: &ConceptsBwdParams) -> Result<()> {
    ensure!(
        p.arg != 0 && p.partial != 0,
        "concepts_bwd: needs the forward's argmax and a partial-sum buffer"
    );
    ensure!(
        p.c % 8 == 0 && p.c_real <= p.c && p.inst > 0,
        "concepts_bwd: padded channels and instances"
    );
    let (m, inst, cr, k) = (
        p.m as usize,
        p.inst as usize,
        p.c_real as usize,
        p.k as usize,
    );
    check_i32("concepts_bwd", m * inst * p.c as usize)?;
    launch_1d(dev, "concepts_bwd_dx", m * inst * cr, 128, p)?;
    let outs = k * (cr + 1);
    let grid = [blocks(outs, 128), m.div_ceil(CONCEPTS_M) as u32, 1];
    dev.launch("concepts_bwd_dw", grid, [128, 1, 1], p)?;
    launch_1d(dev, "concepts_bwd_reduce", outs, 128, p)
}
