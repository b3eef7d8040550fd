//! Rust twins of kernels/conv_up.cu's parameter structs and its launch wrappers: the sub-pixel up_conv (conv3x3 of the ×2 bilinear upsampling as one implicit GEMM over the low-resolution input) and the device pack of its composite weights.

use super::{
    blocks, check_i32, conv3x3_up_wgmma, conv_splits, launch_1d, wgmma_up_fits, ConvParams,
    DevAddr, CONV_BM, CONV_BN,
};
use crate::cuda::device::{ConvTier, Device};
use crate::cuda::weights::pad8;
use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct ConvUpParams {
    pub x: DevAddr,
    pub wt: DevAddr,
    pub bias: DevAddr,
    pub y: DevAddr,
    pub partial: DevAddr,
    pub n: i32,
    pub h: i32,
    pub w: i32,
    pub cin: i32,
    pub cout: i32,
    pub relu: i32,
    pub splits: i32,
    /// Set by `conv3x3_up` when the wgmma tier computes the inner region.
    pub border_only: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct PackConvUpParams {
    pub w: DevAddr,
    pub out: DevAddr,
    pub cout: i32,
    pub cin: i32,
}

const _: () = {
    assert!(std::mem::size_of::<ConvUpParams>() == 72);
    assert!(std::mem::size_of::<PackConvUpParams>() == 24);
};

/// fp16 values of the composite pack of a conv with `cout` × `cin` real channels:
/// [4 variants][4·pad8(cout)][9][pad8(cin)].
pub fn conv_up_pack_len(cout: usize, cin: usize) -> usize {
    16 * pad8(cout) * 9 * pad8(cin)
}

/// The composite pack from fp32 [cout][cin][3][3] weights on the device, as the host
/// `pack_conv_up` (bit for bit).
pub fn pack_conv_up_dev(dev: &Device, p: &PackConvUpParams) -> Result<()> {
    ensure!(p.cout >= 0 && p.cin >= 0, "pack_conv_up: negative channels");
    let units = conv_up_pack_len(p.cout as usize, p.cin as usize);
    check_i32("pack_conv_up", units)?;
    launch_1d(dev, "pack_conv_up", units, 256, p)
}

/// GEMM rows of the nine regions (first / inner / last low-res row × column) for n images of
/// h × w, in the order conv3x3_up_subpixel enumerates them (inner × inner first); from
/// region `first` on.
fn region_rows(n: usize, h: usize, w: usize, first: usize) -> impl Iterator<Item = usize> {
    let class = |len: usize| [1, len.saturating_sub(2), usize::from(len >= 2)];
    let (ys, xs) = (class(h), class(w));
    (first..9).map(move |r| {
        let reg = (r + 4) % 9;
        n * ys[reg / 3] * xs[reg % 3]
    })
}

/// The split-K factor the engine uses for the up_conv of a low-res n × h × w input: that of
/// the fused kernel's high-res GEMM (same tiles, same K), so the split-K scratch it sized
/// holds either.
pub fn conv_up_splits(n: usize, h: usize, w: usize, cin: usize, cout: usize) -> usize {
    conv_splits(4 * n * h * w, cout, 9 * cin)
}

/// The sub-pixel up_conv: conv3x3_up_subpixel (grid over the regions' row tiles × ⌈4·cout/64⌉
/// × splits), then, when split, conv_splitk_reduce of its fp32 partials (high-res NHWC order,
/// `partial` holding splits · n·2h·2w · cout values). On the wgmma tier (no split-K, 64-channel
/// multiples, h and w ≥ 3) the inner region runs there and conv3x3_up_subpixel takes the
/// border.
pub fn conv3x3_up(dev: &Device, p: &ConvUpParams) -> Result<()> {
    ensure!(
        p.cin > 0 && p.cout > 0 && p.cin % 8 == 0 && p.cout % 8 == 0,
        "conv3x3_up: channels must be positive multiples of 8"
    );
    ensure!(p.n > 0 && p.h > 0 && p.w > 0, "conv3x3_up: empty input");
    let mut p = *p;
    p.splits = p.splits.max(1);
    ensure!(
        p.splits == 1 || p.partial != 0,
        "conv3x3_up: split-K needs a partial-sum buffer"
    );
    let (n, h, w) = (p.n as usize, p.h as usize, p.w as usize);
    let high = 4 * n * h * w;
    check_i32("conv3x3_up", high * p.cout as usize)?;
    check_i32(
        "conv3x3_up weights",
        conv_up_pack_len(p.cout as usize, p.cin as usize),
    )?;
    p.border_only = 0;
    if dev.conv_tier() == ConvTier::Wgmma && wgmma_up_fits(&p) {
        conv3x3_up_wgmma(dev, &p)?;
        p.border_only = 1;
    }
    let first = p.border_only as usize;
    let tiles: usize = region_rows(n, h, w, first)
        .map(|r| r.div_ceil(CONV_BM))
        .sum();
    let grid = [
        tiles as u32,
        blocks(4 * p.cout as usize, CONV_BN),
        p.splits as u32,
    ];
    dev.launch("conv3x3_up_subpixel", grid, [128, 1, 1], &p)?;
    if p.splits > 1 {
        let reduce = ConvParams {
            bias: p.bias,
            y: p.y,
            partial: p.partial,
            stats: 0,
            n: p.n,
            h: 2 * p.h,
            w: 2 * p.w,
            cout: p.cout,
            relu: p.relu,
            splits: p.splits,
            ..Default::default()
        };
        launch_1d(
            dev,
            "conv_splitk_reduce",
            high * (p.cout as usize / 8),
            256,
            &reduce,
        )?;
    }
    Ok(())
}

/// Which kernel runs the decoders' up_conv: the fused loader that upsamples every tap
/// (conv3x3_igemm_up) or the sub-pixel GEMM with composite weights (conv3x3_up_subpixel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpConvKernel {
    Fused,
    Subpixel,
}

impl UpConvKernel {
    /// From M2UNET_UPCONV (`fused` or `subpixel`; unset: subpixel).
    pub fn from_env() -> Result<Self> {
        match std::env::var("M2UNET_UPCONV").as_deref() {
            Err(_) | Ok("subpixel") => Ok(UpConvKernel::Subpixel),
            Ok("fused") => Ok(UpConvKernel::Fused),
            Ok(v) => anyhow::bail!("M2UNET_UPCONV={v}: expected fused or subpixel"),
        }
    }
}
