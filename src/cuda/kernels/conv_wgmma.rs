//! Rust twins of kernels/conv_wgmma.cu's parameter structs and the Hopper tier's launch: which
//! convolutions it takes, their pixel tiles and TMA descriptors, and the single-wgmma probe.

use super::{check_i32, ConvParams, ConvSegParams, ConvUpParams, DevAddr};
use crate::cuda::device::{DevPtr, Device};
use crate::cuda::tensor_map::TensorMap;
use anyhow::{ensure, Result};
use bytemuck::{Pod, Zeroable};

#[repr(C, align(128))]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct WgmmaConvParams {
    pub x1: TensorMap,
    pub x2: TensorMap,
    pub wt: TensorMap,
    pub bias: DevAddr,
    pub y: DevAddr,
    pub y_pool: DevAddr,
    pub n: i32,
    pub h: i32,
    pub w: i32,
    pub cin1: i32,
    pub cin2: i32,
    pub cout: i32,
    pub relu: i32,
    pub tile_x: i32,
    pub tile_y: i32,
    pub tiles_x: i32,
    pub tiles_y: i32,
    pub up: i32,
    pub pad_: [i32; 14],
}

#[repr(C, align(128))]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct WgmmaProbeParams {
    pub a: TensorMap,
    pub b: TensorMap,
    pub d: DevAddr,
    pub pad_: [u64; 15],
}

/// conv3x3_wgmma_seg's parameters: the conv and the seg tail (kernels/common.cuh SegTail).
#[repr(C, align(128))]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
pub struct WgmmaSegParams {
    pub conv: WgmmaConvParams,
    pub w: DevAddr,
    pub bias: DevAddr,
    pub labels: DevAddr,
    pub costs: DevAddr,
    pub classes: i32,
    pub c_real: i32,
    pub pad_: [u64; 11],
}

const _: () = {
    assert!(std::mem::size_of::<WgmmaConvParams>() == 512);
    assert!(std::mem::size_of::<WgmmaSegParams>() == 640);
    assert!(std::mem::size_of::<WgmmaProbeParams>() == 384);
};

/// Pixels per block (a tile_y × tile_x rectangle of one image).
const PIXELS: usize = 256;
const STAGES: usize = 4;
const THREADS: u32 = 384;

/// Dynamic shared memory of a block with `nsub` groups of 64 output channels (kernels/conv_wgmma.cu).
fn smem_bytes(nsub: usize) -> u32 {
    (STAGES * (PIXELS * 128 + nsub * 64 * 128) + 2 * STAGES * 8 + 1024) as u32
}

/// Whether the wgmma tier computes this convolution: plain or concatenated input (not
/// upsampled), 64-channel multiples, no split-K and no BN statistics (eval-mode epilogue).
pub fn wgmma_fits(p: &ConvParams, upsample: bool) -> bool {
    let pool_ok = p.y_pool == 0 || (p.h % 2 == 0 && p.w % 2 == 0);
    !upsample
        && p.splits <= 1
        && p.stats == 0
        && p.cin1 > 0
        && p.cin1 % 64 == 0
        && p.cin2 % 64 == 0
        && p.cout % 64 == 0
        && pool_ok
}

/// The pixel tile (tile_x, tile_y) with tile_x · tile_y = 256 that wastes the fewest pixels on an
/// h × w image (wider first on ties); pooling needs an even tile_y.
fn pixel_tile(h: usize, w: usize, pool: bool) -> (usize, usize) {
    let mut best = (0, 0, usize::MAX);
    for tx in [256, 128, 64, 32, 16] {
        let ty = PIXELS / tx;
        if pool && ty % 2 == 1 {
            continue;
        }
        let covered = w.div_ceil(tx) * tx * h.div_ceil(ty) * ty;
        if covered < best.2 {
            best = (tx, ty, covered);
        }
    }
    (best.0, best.1)
}

/// The convolution `p` (for which `wgmma_fits`) on the wgmma tier.
pub fn conv3x3_wgmma(dev: &Device, p: &ConvParams) -> Result<()> {
    let (q, k) = conv_params(dev, p)?;
    launch(dev, q, p.wt, k, p.cout as usize)
}

/// `segment`'s last conv with the seg head and argmax in the epilogue on the wgmma tier:
/// `p.conv` must fit (`wgmma_fits`) with cout = 64 and no pooling.
pub fn conv3x3_wgmma_seg(dev: &Device, p: &ConvSegParams) -> Result<()> {
    ensure!(
        p.conv.cout == 64 && p.conv.y_pool == 0,
        "conv3x3_wgmma_seg: needs cout = 64 and no pooling"
    );
    let (conv, k) = conv_params(dev, &p.conv)?;
    let q = WgmmaSegParams {
        conv: WgmmaConvParams {
            wt: weights_map(dev, p.conv.wt, k, 64, 1)?,
            ..conv
        },
        w: p.w,
        bias: p.bias,
        labels: p.labels,
        costs: p.costs,
        classes: p.classes,
        c_real: p.c_real,
        pad_: [0; 11],
    };
    let blocks = (q.conv.n * q.conv.tiles_x * q.conv.tiles_y) as u32;
    dev.launch_smem(
        "conv3x3_wgmma_seg",
        [blocks, 1, 1],
        [THREADS, 1, 1],
        smem_bytes(1),
        &q,
    )
}

/// The launch parameters of a plain or concatenated conv (weights map unset) and its K.
fn conv_params(dev: &Device, p: &ConvParams) -> Result<(WgmmaConvParams, usize)> {
    ensure!(
        wgmma_fits(p, false),
        "conv3x3_wgmma: needs 64-channel multiples, no upsampling, split-K or statistics"
    );
    let (n, h, w) = (p.n as usize, p.h as usize, p.w as usize);
    let (cin1, cin2, cout) = (p.cin1 as usize, p.cin2 as usize, p.cout as usize);
    check_i32("conv3x3_wgmma", n * h * w * cout.max(cin1 + cin2))?;
    let tile = pixel_tile(h, w, p.y_pool != 0);
    let x1 = input_map(dev, p.x, (n, h, w, cin1), (h, w), tile)?;
    let x2 = match cin2 {
        0 => x1.map,
        _ => input_map(dev, p.x2, (n, h, w, cin2), (h, w), tile)?.map,
    };
    let q = WgmmaConvParams {
        x2,
        bias: p.bias,
        y: p.y,
        y_pool: p.y_pool,
        cin1: p.cin1,
        cin2: p.cin2,
        cout: p.cout,
        relu: p.relu,
        ..x1.params(p.n, p.h, p.w)
    };
    Ok((q, 9 * (cin1 + cin2)))
}

/// Whether the wgmma tier computes the inner region of this sub-pixel up_conv (the border
/// stays with conv3x3_up_subpixel): no split-K, 64-channel multiples, a non-empty interior.
pub fn wgmma_up_fits(p: &ConvUpParams) -> bool {
    p.splits <= 1 && p.cin % 64 == 0 && p.cout % 64 == 0 && p.h >= 3 && p.w >= 3
}

/// The inner low-resolution pixels (1..h−2 × 1..w−2) of the sub-pixel up_conv `p` on the wgmma
/// tier, with the inner composite weights (variant 0 of `p.wt`).
pub fn conv3x3_up_wgmma(dev: &Device, p: &ConvUpParams) -> Result<()> {
    ensure!(
        wgmma_up_fits(p),
        "conv3x3_up_wgmma: needs 64-channel multiples, no split-K and h, w ≥ 3"
    );
    let (n, h, w) = (p.n as usize, p.h as usize, p.w as usize);
    let (cin, cout) = (p.cin as usize, p.cout as usize);
    check_i32("conv3x3_up_wgmma", 4 * n * h * w * cout.max(cin))?;
    let inner = (h - 2, w - 2);
    let x = input_map(
        dev,
        p.x,
        (n, h, w, cin),
        inner,
        pixel_tile(inner.0, inner.1, false),
    )?;
    let q = WgmmaConvParams {
        x2: x.map,
        bias: p.bias,
        y: p.y,
        y_pool: 0,
        cin1: p.cin,
        cin2: 0,
        cout: p.cout,
        relu: p.relu,
        up: 1,
        ..x.params(p.n, p.h, p.w)
    };
    launch(dev, q, p.wt, 9 * cin, 4 * cout)
}

/// An input's tensor map with its pixel tile and the tiles covering its region.
struct InputMap {
    map: TensorMap,
    tile: (usize, usize),
    tiles: (usize, usize),
}

impl InputMap {
    /// Launch parameters with this input as x1 and its tiles (the rest zero).
    fn params(&self, n: i32, h: i32, w: i32) -> WgmmaConvParams {
        WgmmaConvParams {
            x1: self.map,
            n,
            h,
            w,
            tile_x: self.tile.0 as i32,
            tile_y: self.tile.1 as i32,
            tiles_x: self.tiles.0 as i32,
            tiles_y: self.tiles.1 as i32,
            ..Zeroable::zeroed()
        }
    }
}

/// The 4-D map (c, x, y, n) of the NHWC tensor at `x`, in boxes of 64 channels × the pixel
/// tile (tx, ty) that covers a `region` (rows, columns) of the images.
fn input_map(
    dev: &Device,
    x: DevAddr,
    (n, h, w, c): (usize, usize, usize, usize),
    (rh, rw): (usize, usize),
    (tx, ty): (usize, usize),
) -> Result<InputMap> {
    let row = 2 * c as u64;
    let map = TensorMap::f16_tiled(
        dev,
        DevPtr(x),
        &[c as u64, w as u64, h as u64, n as u64],
        &[row, row * w as u64, row * (w * h) as u64],
        &[64, tx as u32, ty as u32, 1],
    )?;
    Ok(InputMap {
        map,
        tile: (tx, ty),
        tiles: (rw.div_ceil(tx), rh.div_ceil(ty)),
    })
}

/// The 2-D map of fp16 weights [cols][k] in boxes of 64 k × 64·nsub rows.
fn weights_map(dev: &Device, wt: DevAddr, k: usize, cols: usize, nsub: usize) -> Result<TensorMap> {
    TensorMap::f16_tiled(
        dev,
        DevPtr(wt),
        &[k as u64, cols as u64],
        &[2 * k as u64],
        &[64, 64 * nsub as u32],
    )
}

/// Launches conv3x3_wgmma_n64 or _n128 for `q` with weights `wt` [cols][k] fp16: 128 columns
/// per block when they divide `cols` (each pixel tile feeds twice the MMAs).
fn launch(dev: &Device, mut q: WgmmaConvParams, wt: DevAddr, k: usize, cols: usize) -> Result<()> {
    let blocks = q.n as usize * (q.tiles_x * q.tiles_y) as usize;
    let nsub = if cols.is_multiple_of(128) { 2 } else { 1 };
    q.wt = weights_map(dev, wt, k, cols, nsub)?;
    let name = if nsub == 2 {
        "conv3x3_wgmma_n128"
    } else {
        "conv3x3_wgmma_n64"
    };
    let grid = [blocks as u32, (cols / (64 * nsub)) as u32, 1];
    dev.launch_smem(name, grid, [THREADS, 1, 1], smem_bytes(nsub), &q)
}

/// The single-wgmma probe: d [64][128] fp32 = A · Bᵀ for fp16 A [a_rows][64] (rows past
/// `a_rows` read as zeros through TMA's fill) and B [128][64].
pub fn wgmma_probe(dev: &Device, a: DevPtr, a_rows: usize, b: DevPtr, d: DevPtr) -> Result<()> {
    ensure!((1..=64).contains(&a_rows), "wgmma_probe: 1..64 rows of A");
    let map = |at: DevPtr, rows: usize, box_rows: u32| {
        TensorMap::f16_tiled(dev, at, &[64, rows as u64], &[128], &[64, box_rows])
    };
    let q = WgmmaProbeParams {
        a: map(a, a_rows, 64)?,
        b: map(b, 128, 128)?,
        d: d.0,
        pad_: [0; 15],
    };
    let smem = 3 * 8192 + 8 + 1024;
    dev.launch_smem("wgmma_probe", [1, 1, 1], [128, 1, 1], smem, &q)
}
