//! Rust twins of kernels/conv_grad.cu's parameter structs and its launch wrappers: the device weight packs, the 3×3 weight gradient on tensor cores and the first layer's on CUDA cores.

use super::{blocks, check_i32, launch_1d, DevAddr, SMS};
use crate::cuda::device::Device;
use crate::cuda::weights::pad8;
use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct PackConvParams {
    pub w: DevAddr,
    pub out: DevAddr,
    pub cout: i32,
    pub c1: i32,
    pub c2: i32,
    pub part: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct WgradParams {
    pub dz: DevAddr,
    pub x: DevAddr,
    pub partial: DevAddr,
    pub dw: DevAddr,
    pub n: i32,
    pub h: i32,
    pub w: i32,
    pub cz: i32,
    pub cx: i32,
    pub cout: i32,
    pub cin: i32,
    pub c_off: i32,
    pub c_real: i32,
    pub splits: i32,
    pub pad_: i32,
    /// Keeps the struct free of implicit padding (Pod).
    pub pad2_: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct WgradFirstParams {
    pub dz: DevAddr,
    pub x: DevAddr,
    pub partial: DevAddr,
    pub dw: DevAddr,
    pub n: i32,
    pub cin: i32,
    pub h: i32,
    pub w: i32,
    pub cz: i32,
    pub cout: i32,
    pub splits: i32,
    pub pad_: i32,
}

const _: () = {
    assert!(std::mem::size_of::<PackConvParams>() == 32);
    assert!(std::mem::size_of::<WgradParams>() == 80);
    assert!(std::mem::size_of::<WgradFirstParams>() == 64);
};

/// conv_wgrad's block tile: WG_BM output channels × WG_BN (tap, input channel) columns,
/// WG_BK pixels per k-tile.
const WG_BM: usize = 64;
const WG_BN: usize = 128;
const WG_BK: usize = 32;
/// Threads of conv_wgrad_first's blocks.
const WF_THREADS: usize = 256;

fn part_channels(p: &PackConvParams) -> usize {
    (if p.part == 0 { p.c1 } else { p.c2 }) as usize
}

/// fp32 [cout][c1 + c2][3][3] → fp16 [pad8(cout)][9][pad8(c1) + pad8(c2)], as the host
/// `pack_conv3x3` (bit for bit).
pub fn pack_conv_fwd(dev: &Device, p: &PackConvParams) -> Result<()> {
    ensure!(
        p.cout >= 0 && p.c1 >= 0 && p.c2 >= 0,
        "pack_conv_fwd: negative channels"
    );
    let units = pad8(p.cout as usize) * 9 * (pad8(p.c1 as usize) + pad8(p.c2 as usize));
    check_i32("pack_conv_fwd", units)?;
    launch_1d(dev, "pack_conv_fwd", units, 256, p)
}

/// The dgrad pack of input part `p.part`: fp16 [pad8(c_j)][9][pad8(cout)],
/// out[c][t][o] = w[o][off_j + c][8 − t]. conv3x3 (not upsampling) of dz [pixels, pad8(cout)]
/// with it (cin1 = pad8(cout), cin2 = 0, zero bias, cout = pad8(c_j), no ReLU, no pool) is the
/// fp16 gradient of input part j.
pub fn pack_conv_dgrad(dev: &Device, p: &PackConvParams) -> Result<()> {
    ensure!(
        (p.part == 0 || (p.part == 1 && p.c2 > 0)) && p.cout >= 0 && p.c1 >= 0 && p.c2 >= 0,
        "pack_conv_dgrad: part {} of channels ({}, {})",
        p.part,
        p.c1,
        p.c2
    );
    let units = pad8(part_channels(p)) * 9 * pad8(p.cout as usize);
    check_i32("pack_conv_dgrad", units)?;
    launch_1d(dev, "pack_conv_dgrad", units, 256, p)
}

/// Pixel splits for conv_wgrad of `pixels` pixels, cz output and cx input channels (padded):
/// enough blocks to fill every SM of 132 with the 4 blocks it holds at once (126 registers ×
/// 128 threads and 48 KB of shared memory each), i.e. two waves of 2 blocks per SM, each split
/// keeping at least 16 k-tiles of 32 pixels.
pub fn wgrad_splits(pixels: usize, cz: usize, cx: usize) -> usize {
    let tiles = (9 * cx).div_ceil(WG_BN) * cz.div_ceil(WG_BM);
    let kt = pixels.div_ceil(WG_BK);
    (4 * SMS).div_ceil(tiles.max(1)).min(kt / 16).max(1)
}

/// fp32 values of conv_wgrad's scratch: splits · cz · 9·cx.
pub fn wgrad_partial_len(p: &WgradParams) -> usize {
    p.splits.max(1) as usize * p.cz as usize * 9 * p.cx as usize
}

/// Weight gradient of one input part of a 3×3 conv: conv_wgrad (tensor cores, `splits` blocks
/// over the pixels writing fp32 partials; 0 counts as 1) then conv_wgrad_reduce, which writes
/// (=) only dw[o][c_off + c][t] for o < cout, c < c_real. `partial` holds `wgrad_partial_len`
/// values.
pub fn conv_wgrad(dev: &Device, p: &WgradParams) -> Result<()> {
    ensure!(
        p.cz > 0 && p.cx > 0 && p.cz % 8 == 0 && p.cx % 8 == 0,
        "conv_wgrad: padded channels must be positive multiples of 8"
    );
    ensure!(
        p.cout <= p.cz && p.c_real <= p.cx && p.c_off >= 0 && p.c_off + p.c_real <= p.cin,
        "conv_wgrad: slice out of range"
    );
    ensure!(
        p.partial != 0 && p.dw != 0,
        "conv_wgrad: needs the partial buffer (even unsplit) and dw"
    );
    let p = &WgradParams {
        splits: p.splits.max(1),
        ..*p
    };
    let pixels = p.n as usize * p.h as usize * p.w as usize;
    check_i32("conv_wgrad", pixels * p.cz.max(p.cx) as usize + WG_BK)?;
    check_i32("conv_wgrad partials", wgrad_partial_len(p))?;
    let grid = [
        blocks(9 * p.cx as usize, WG_BN),
        blocks(p.cz as usize, WG_BM),
        p.splits as u32,
    ];
    dev.launch("conv_wgrad", grid, [128, 1, 1], p)?;
    let units = p.cout as usize * 9 * p.c_real as usize;
    launch_1d(dev, "conv_wgrad_reduce", units, 256, p)
}

/// Pixel splits for conv_wgrad_first: about two waves of 132 SMs, each block at least 1024
/// pixels.
pub fn wgrad_first_splits(pixels: usize) -> usize {
    pixels.div_ceil(1024).clamp(1, 2 * SMS)
}

/// fp32 values of conv_wgrad_first's scratch: splits · cz · cin · 9.
pub fn wgrad_first_partial_len(p: &WgradFirstParams) -> usize {
    p.splits.max(1) as usize * p.cz as usize * p.cin as usize * 9
}

/// Weight gradient of the first layer (fp32 NCHW input): conv_wgrad_first (`splits` blocks
/// over the pixels, CUDA cores; 0 counts as 1) then conv_wgrad_first_reduce, which writes (=)
/// all of dw. Needs cz/8 · cin ≤ 256.
pub fn conv_wgrad_first(dev: &Device, p: &WgradFirstParams) -> Result<()> {
    ensure!(
        p.cz > 0 && p.cz % 8 == 0 && p.cin > 0 && p.cout <= p.cz,
        "conv_wgrad_first: cz must be a positive multiple of 8, ≥ cout"
    );
    ensure!(
        (p.cz / 8 * p.cin) as usize <= WF_THREADS,
        "conv_wgrad_first: at most 256 units of 8 output channels × input channels"
    );
    ensure!(
        p.partial != 0 && p.dw != 0,
        "conv_wgrad_first: needs the partial buffer (even unsplit) and dw"
    );
    let p = &WgradFirstParams {
        splits: p.splits.max(1),
        ..*p
    };
    let pixels = p.n as usize * p.h as usize * p.w as usize;
    check_i32("conv_wgrad_first", pixels * p.cz.max(p.cin) as usize)?;
    check_i32("conv_wgrad_first partials", wgrad_first_partial_len(p))?;
    dev.launch(
        "conv_wgrad_first",
        [p.splits as u32, 1, 1],
        [WF_THREADS as u32, 1, 1],
        p,
    )?;
    let units = p.cout as usize * p.cin as usize * 9;
    launch_1d(dev, "conv_wgrad_first_reduce", units, 256, p)
}
