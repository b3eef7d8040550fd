//! Convolutions (3×3 and 1×1, NCHW f32) and linear layers of the CPU engine, forward and backward.
//!
//! A convolution is an implicit GEMM: GEMM-M = output channels, GEMM-N = the pixels of one image,
//! GEMM-K = input channels × taps (9 for 3×3, 1 for 1×1). Rayon tasks each own a tile of a few
//! hundred output pixels of one image (and, when tiles are scarce, a block of output channels)
//! and take the input channels in chunks of at most 64 (3×3) into a per-thread scratch; no
//! whole-image im2col is ever built. Two backends share this tiling:
//! - AVX-512F (chosen at run time): the tile holds each input channel once, as a flat row with
//!   a halo of one image row and one pixel; an 8×48 micro-kernel reads the 9 taps as shifted
//!   loads (lanes on the image's first/last column masked) and broadcasts packed weights.
//!   Images too small to fill a tile (the deep levels) go several to a tile, stacked with a
//!   zero row between them, instead of one mostly padded tile each.
//! - Portable (any CPU): an unfolded im2col tile (K rows × tile pixels) times the weights
//!   through the `gemm` crate, single-threaded inside the task.
//!
//! Backward: dx is the forward convolution of dy with the transposed, flipped weights (the same
//! tiled path). dwᵀ[k, co] = Σ_pixels unfold(x)[k, p] · dy[co, p]: a task owns a chunk of input
//! channels and a fixed range of tiles. On AVX-512 the tile's channels are laid out with a zero
//! column each side (so every tap is a shifted pointer), dy is transposed to [pixel][64
//! channels] (kept in L1), and a 6×64 micro-kernel broadcasts from six shifted channel rows.
//! Tile sums go to f64 partials reduced in a fixed order; db is summed in the same sweep. No
//! sum depends on scheduling or thread count, so every result is bit-identical from run to run.

use super::Dims;
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::Range;

/// Forward micro-kernel tile: MR output channels × NR pixels (three 16-lane vectors).
const MR: usize = 8;
const NR: usize = 48;
/// Weight-gradient micro-kernel tile: DW_MR rows of the unfolded input × DW_NR output channels.
const DW_MR: usize = 6;
const DW_NR: usize = 64;

/// Which inner kernels run the tile products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    /// Hand-written AVX-512F micro-kernels.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// The `gemm` crate on the same tiles (any CPU).
    Portable,
}

impl Backend {
    fn detect() -> Backend {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Backend::Avx512;
        }
        Backend::Portable
    }

    /// Rows per panel of packed weights.
    fn panel_rows(self) -> usize {
        match self {
            #[cfg(target_arch = "x86_64")]
            Backend::Avx512 => MR,
            Backend::Portable => 1,
        }
    }
}

/// Cache blocking of the drivers. It fixes the order of floating-point sums, so it is a
/// constant: results never depend on the machine or on the thread count. Tests shrink it to
/// reach every edge case (several K chunks, tiles and channel blocks) on small shapes.
#[derive(Clone, Copy, Debug)]
struct Blocking {
    /// Forward: most K rows (input channels × taps) per pass over a tile.
    fwd_k: usize,
    /// Forward: target size in floats of one unfolded chunk (K rows × tile pixels).
    fwd_col: usize,
    /// Forward: most pixels per tile.
    fwd_tile: usize,
    /// Weight gradient: most K rows per task.
    dw_k: usize,
    /// Weight gradient: most pixels per tile.
    dw_tile: usize,
    /// Weight gradient: pixels summed in f32 before the sums go into f64.
    dw_flush: usize,
    /// Channel blocks (forward) or pixel ranges (weight gradient) are split until there are at
    /// least this many tasks.
    min_tasks: usize,
}

const BLOCKING: Blocking = Blocking {
    fwd_k: 576,
    fwd_col: 1 << 18,
    fwd_tile: 4096,
    dw_k: 576,
    dw_tile: 144,
    dw_flush: 16384,
    min_tasks: 8,
};

thread_local! {
    /// Per-thread scratch for unfolded tiles, kept between calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` on `len` floats of this thread's scratch, aligned to 64 bytes.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len + 16 {
            buf.resize(len + 16, 0.0);
        }
        let off = buf.as_ptr().align_offset(64).min(15);
        f(&mut buf[off..off + len])
    })
}

/// A raw output pointer shared by tasks that write disjoint regions.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// Safety: `off` within the allocation, and the caller alone writes what it addresses.
    unsafe fn add(self, off: usize) -> *mut f32 {
        self.0.add(off)
    }
}

/// An NCHW input given as the channel concatenation of parts `[n, c_i, h, w]`.
#[derive(Clone, Copy)]
struct Planes<'a> {
    parts: &'a [(&'a [f32], usize)],
    hw: usize,
}

impl<'a> Planes<'a> {
    fn channels(&self) -> usize {
        self.parts.iter().map(|p| p.1).sum()
    }

    /// The h·w plane of channel `c` (of the concatenation) of image `img`.
    fn plane(&self, img: usize, c: usize) -> &'a [f32] {
        let mut c = c;
        for &(data, ch) in self.parts {
            if c < ch {
                let off = (img * ch + c) * self.hw;
                return &data[off..off + self.hw];
            }
            c -= ch;
        }
        panic!("channel outside the concatenated input")
    }
}

/// Weights as a row-major [rows, k] matrix cut into panels of `mr` rows, each stored k-major
/// ([k][mr], rows past the end zero), the layout the micro-kernel streams.
struct Packed {
    data: Vec<f32>,
    rows: usize,
    k: usize,
}

impl Packed {
    fn new(rows: usize, k: usize, mr: usize, get: impl Fn(usize, usize) -> f32 + Sync) -> Packed {
        let mut data = vec![0.0; rows.div_ceil(mr) * k * mr];
        data.par_chunks_mut(k * mr)
            .enumerate()
            .for_each(|(panel, dst)| {
                for r in 0..mr.min(rows - panel * mr) {
                    let row = panel * mr + r;
                    for kk in 0..k {
                        dst[kk * mr + r] = get(row, kk);
                    }
                }
            });
        Packed { data, rows, k }
    }
}

/// One image's pixels cut into `count` tiles of `len` pixels (a multiple of NR; the last tile
/// may be shorter), stored `ld` floats apart in an unfolded tile.
#[derive(Clone, Copy, Debug)]
struct Tiling {
    len: usize,
    count: usize,
    ld: usize,
}

impl Tiling {
    fn new(hw: usize, target: usize) -> Tiling {
        let count = hw.div_ceil(target.max(NR));
        let len = hw.div_ceil(count).next_multiple_of(NR);
        let count = hw.div_ceil(len);
        Tiling {
            len,
            count,
            ld: row_stride(len),
        }
    }

    /// First pixel and pixel count of tile `t` of an image of `hw` pixels.
    fn range(&self, t: usize, hw: usize) -> (usize, usize) {
        let p0 = t * self.len;
        (p0, self.len.min(hw - p0))
    }
}

/// Size of the blocks, a multiple of `unit`, that cut `m` rows into enough blocks for
/// `other_tasks` × blocks to reach `min_tasks` where `m` allows it.
fn block_size(m: usize, unit: usize, other_tasks: usize, min_tasks: usize) -> usize {
    let blocks = min_tasks
        .div_ceil(other_tasks.max(1))
        .clamp(1, m.div_ceil(unit));
    m.div_ceil(blocks).next_multiple_of(unit)
}

/// Unfolds channels `chans` of image `img` under pixels [p0, p0+plen) into `col` (the
/// portable backend's im2col tile): row (c − chans.start)·taps + t holds tap t, `ld` floats
/// apart, zero-padded from plen to ld.
#[allow(clippy::too_many_arguments)]
fn pack_cols(
    x: &Planes,
    img: usize,
    chans: Range<usize>,
    taps: usize,
    w: usize,
    p0: usize,
    plen: usize,
    ld: usize,
    col: &mut [f32],
) {
    let h = x.hw / w;
    for (r, c) in chans.enumerate() {
        let plane = x.plane(img, c);
        for t in 0..taps {
            let row = &mut col[(r * taps + t) * ld..][..ld];
            if taps == 1 {
                row[..plen].copy_from_slice(&plane[p0..p0 + plen]);
            } else {
                shifted_copy(plane, h, w, t / 3, t % 3, p0, &mut row[..plen]);
            }
            row[plen..].fill(0.0);
        }
    }
}

/// out[i] = plane[oy + ky − 1, ox + kx − 1] for output pixel p0 + i = (oy, ox), zero where
/// that falls outside the h×w plane (zero padding 1), copied one image row at a time.
fn shifted_copy(
    plane: &[f32],
    h: usize,
    w: usize,
    ky: usize,
    kx: usize,
    p0: usize,
    out: &mut [f32],
) {
    let mut i = 0;
    while i < out.len() {
        let p = p0 + i;
        let (oy, ox0) = (p / w, p % w);
        let ox1 = w.min(ox0 + out.len() - i);
        let seg = &mut out[i..i + ox1 - ox0];
        if oy + ky == 0 || oy + ky > h {
            seg.fill(0.0);
        } else {
            let src = &plane[(oy + ky - 1) * w..][..w];
            // Source column ox + kx − 1 lies inside for 1 − kx ≤ ox < w + 1 − kx.
            let lo = (1 - kx.min(1)).clamp(ox0, ox1);
            let hi = (w + 1 - kx).clamp(lo, ox1);
            seg[..lo - ox0].fill(0.0);
            seg[lo - ox0..hi - ox0].copy_from_slice(&src[lo + kx - 1..hi + kx - 1]);
            seg[hi - ox0..].fill(0.0);
        }
        i += ox1 - ox0;
    }
}

/// How a tile product starts its sums.
#[derive(Clone, Copy)]
enum Start {
    Zero,
    /// The bias of the tile's first output channel.
    Bias(*const f32),
    /// Add to what is already in the output (a later K chunk).
    Accumulate,
}

impl Start {
    /// The start of the K chunk from input channel `c0` for output rows from `co0`: the bias
    /// (or zero) on the first chunk, accumulation on the later ones.
    fn for_chunk(c0: usize, bias: Option<&[f32]>, co0: usize) -> Start {
        match (c0, bias) {
            (0, Some(b)) => Start::Bias(b[co0..].as_ptr()),
            (0, None) => Start::Zero,
            _ => Start::Accumulate,
        }
    }
}

/// y = conv(x; wp) (+ bias), optionally ReLU'd. `taps` 9: 3×3 with zero padding 1; 1: 1×1.
/// `wp` holds the weights as a [cout, cin·taps] matrix. y: [n, cout, h, w], overwritten.
#[allow(clippy::too_many_arguments)]
fn conv_forward(
    be: Backend,
    bl: &Blocking,
    x: Planes,
    n: usize,
    w: usize,
    taps: usize,
    wp: &Packed,
    bias: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    let hw = x.hw;
    let (cin, cout) = (x.channels(), wp.rows);
    debug_assert_eq!(wp.k, cin * taps);
    if n == 0 || hw == 0 || cout == 0 {
        return;
    }
    let cc = (bl.fwd_k / taps).clamp(1, cin);
    let target = (bl.fwd_col / (cc * taps)).min(bl.fwd_tile);
    let tiling = Tiling::new(hw, target);
    #[cfg(target_arch = "x86_64")]
    if be == Backend::Avx512 && tiling.count == 1 {
        let group = (target / (hw + w)).min(n);
        if group > 1 {
            let plan = Stacking { w, taps, cc, group };
            return conv_forward_stacked(bl, x, n, plan, wp, bias, relu, y);
        }
    }
    let cb = block_size(cout, MR, n * tiling.count, bl.min_tasks);
    let nblk = cout.div_ceil(cb);
    // AVX-512 tiles hold one flat row per channel with a halo of one image row and one pixel.
    let halo = if taps == 9 { w + 1 } else { 0 };
    let ldr = row_stride(2 * halo + tiling.len);
    let scratch = match be {
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => cc * ldr,
        Backend::Portable => cc * taps * tiling.ld,
    };
    let out = SharedMut(y.as_mut_ptr());
    (0..n * tiling.count * nblk)
        .into_par_iter()
        .for_each(|task| {
            let img = task / (tiling.count * nblk);
            let tile = task / nblk % tiling.count;
            let co = task % nblk * cb..(task % nblk * cb + cb).min(cout);
            let (p0, plen) = tiling.range(tile, hw);
            with_scratch(scratch, |buf| {
                for c0 in (0..cin).step_by(cc) {
                    let c1 = (c0 + cc).min(cin);
                    let prod = TileProduct {
                        wp,
                        co: co.clone(),
                        k0: c0 * taps,
                        kc: (c1 - c0) * taps,
                        plen,
                        // SAFETY: rows co, pixels [p0, p0+plen) of image img are this task's alone.
                        out: unsafe { out.add((img * cout + co.start) * hw + p0) },
                        ldo: hw,
                        start: Start::for_chunk(c0, bias, co.start),
                        relu: relu && c1 == cin,
                    };
                    match be {
                        #[cfg(target_arch = "x86_64")]
                        Backend::Avx512 => {
                            let (qlo, len) = (p0 as isize - halo as isize, plen + 2 * halo);
                            pack_padded_rows(&x, img, c0..c1, w, 0, qlo, len, ldr, buf);
                            // SAFETY: AVX-512F present (Backend::detect); `prod` is in bounds.
                            unsafe { prod.run_avx512(buf, ldr, halo, taps, w, p0) }
                        }
                        Backend::Portable => {
                            pack_cols(&x, img, c0..c1, taps, w, p0, plen, tiling.ld, buf);
                            // SAFETY: `prod` is in bounds.
                            unsafe { prod.run_portable(buf, tiling.ld) }
                        }
                    }
                }
            });
        });
}

/// How `conv_forward_stacked` lays out a tile: `group` images of width `w` stacked with one
/// zero row below each, `cc` input channels per K chunk.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
struct Stacking {
    w: usize,
    taps: usize,
    cc: usize,
    group: usize,
}

/// `conv_forward` (AVX-512) for images too small to fill a tile: a tile holds `plan.group`
/// whole images stacked with a zero row between them, so no 3×3 tap mixes two images and the
/// micro-kernel's 48-pixel panels are not mostly padding. A task stages its block of output
/// channels over the stack and then copies each image's rows out, dropping the zero rows.
/// Every output's sum runs in the same order as in `conv_forward`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn conv_forward_stacked(
    bl: &Blocking,
    x: Planes,
    n: usize,
    plan: Stacking,
    wp: &Packed,
    bias: Option<&[f32]>,
    relu: bool,
    y: &mut [f32],
) {
    let Stacking { w, taps, cc, group } = plan;
    let (hw, cin, cout) = (x.hw, x.channels(), wp.rows);
    let stack = hw + w;
    let lenr = (group * stack - w).next_multiple_of(NR);
    let halo = if taps == 9 { w + 1 } else { 0 };
    let (ldr, ldt) = (row_stride(2 * halo + lenr), row_stride(lenr));
    let ngroups = n.div_ceil(group);
    let cb = block_size(cout, MR, ngroups, bl.min_tasks);
    let nblk = cout.div_ceil(cb);
    let out = SharedMut(y.as_mut_ptr());
    (0..ngroups * nblk).into_par_iter().for_each(|task| {
        let imgs = task / nblk * group..(task / nblk * group + group).min(n);
        let co = task % nblk * cb..(task % nblk * cb + cb).min(cout);
        with_scratch(cc * ldr + cb * ldt, |buf| {
            let (rows, staged) = buf.split_at_mut(cc * ldr);
            for c0 in (0..cin).step_by(cc) {
                let c1 = (c0 + cc).min(cin);
                for (r, c) in (c0..c1).enumerate() {
                    let row = &mut rows[r * ldr..][..2 * halo + lenr];
                    row.fill(0.0);
                    for (j, img) in imgs.clone().enumerate() {
                        row[halo + j * stack..][..hw].copy_from_slice(x.plane(img, c));
                    }
                }
                let prod = TileProduct {
                    wp,
                    co: co.clone(),
                    k0: c0 * taps,
                    kc: (c1 - c0) * taps,
                    plen: imgs.len() * stack - w,
                    out: staged.as_mut_ptr(),
                    ldo: ldt,
                    start: Start::for_chunk(c0, bias, co.start),
                    relu: relu && c1 == cin,
                };
                // SAFETY: AVX-512F present (the caller checked the backend); `staged` holds
                // co.len() rows of ldt ≥ plen floats.
                unsafe { prod.run_avx512(rows, ldr, halo, taps, w, 0) }
            }
            for (r, c) in co.clone().enumerate() {
                for (j, img) in imgs.clone().enumerate() {
                    let src = &staged[r * ldt + j * stack..][..hw];
                    // SAFETY: image img, channel c is this task's alone; hw floats in bounds.
                    unsafe {
                        let dst = out.add((img * cout + c) * hw);
                        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, hw);
                    }
                }
            }
        });
    });
}

/// A scratch row stride of at least `len` floats: a multiple of 16, and not of 256 (a multiple
/// of 1 KiB would map all rows onto the same cache sets).
fn row_stride(len: usize) -> usize {
    let ld = len.next_multiple_of(16);
    if ld.is_multiple_of(256) {
        ld + 16
    } else {
        ld
    }
}

/// Copies each channel of `chans` (image `img`) into one row of `rows` (`ldr` apart): the
/// image laid out with rows of w + 2·pad floats (`pad` zero columns each side), positions
/// [qlo, qlo + len) of that layout (qlo may be negative), zero outside the image. With pad 0
/// this is the flat plane; with pad 1 every 3×3 tap of a pixel is that pixel's position shifted.
#[allow(clippy::too_many_arguments)]
fn pack_padded_rows(
    x: &Planes,
    img: usize,
    chans: Range<usize>,
    w: usize,
    pad: usize,
    qlo: isize,
    len: usize,
    ldr: usize,
    rows: &mut [f32],
) {
    let (h, wp) = (x.hw / w, w + 2 * pad);
    for (r, c) in chans.enumerate() {
        let plane = x.plane(img, c);
        let row = &mut rows[r * ldr..][..len];
        let mut i = 0;
        while i < len {
            let q = qlo + i as isize;
            let (py, px) = (
                q.div_euclid(wp as isize),
                q.rem_euclid(wp as isize) as usize,
            );
            let seg = (wp - px).min(len - i);
            let out = &mut row[i..i + seg];
            if py < 0 || py >= h as isize {
                out.fill(0.0);
            } else {
                // Layout columns pad..pad + w hold image columns 0..w.
                let lo = px.max(pad).min(px + seg);
                let hi = (pad + w).min(px + seg).max(lo);
                let src = &plane[py as usize * w..][..w];
                out[..lo - px].fill(0.0);
                out[lo - px..hi - px].copy_from_slice(&src[lo - pad..hi - pad]);
                out[hi - px..].fill(0.0);
            }
            i += seg;
        }
    }
}

/// out[co, p] (+)= Σ_k W[co, k0 + k] · unfold(x)[k, p] for one tile and one K chunk.
struct TileProduct<'a> {
    wp: &'a Packed,
    co: Range<usize>,
    k0: usize,
    kc: usize,
    plen: usize,
    /// Output row co.start at the tile's first pixel; rows `ldo` floats apart.
    out: *mut f32,
    ldo: usize,
    start: Start,
    relu: bool,
}

impl TileProduct<'_> {
    /// Through the `gemm` crate, from the unfolded tile `col` (kc rows `ld` apart).
    /// Safety: `out` addresses co.len() rows of plen floats.
    unsafe fn run_portable(&self, col: &[f32], ld: usize) {
        let m = self.co.len();
        for i in 0..m {
            let row = std::slice::from_raw_parts_mut(self.out.add(i * self.ldo), self.plen);
            match self.start {
                Start::Zero => row.fill(0.0),
                Start::Bias(b) => row.fill(*b.add(i)),
                Start::Accumulate => {}
            }
        }
        gemm::gemm(
            m,
            self.plen,
            self.kc,
            self.out,
            1,
            self.ldo as isize,
            true,
            self.wp.data[self.co.start * self.wp.k + self.k0..].as_ptr(),
            1,
            self.wp.k as isize,
            col.as_ptr(),
            1,
            ld as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
        if self.relu {
            for i in 0..m {
                let row = std::slice::from_raw_parts_mut(self.out.add(i * self.ldo), self.plen);
                row.iter_mut().for_each(|v| *v = v.max(0.0));
            }
        }
    }

    /// Through the 8×48 AVX-512 micro-kernel, from `rows` (pack_padded_rows, pad 0: one row per
    /// channel, `ldr` apart, the tile's first pixel at `halo`). For each 48-pixel panel, lanes
    /// on the image's first and last column are masked out of the taps that would wrap around.
    /// Safety: AVX-512F present; `out` as for run_portable.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(
        &self,
        rows: &[f32],
        ldr: usize,
        halo: usize,
        taps: usize,
        w: usize,
        p0: usize,
    ) {
        let k = self.wp.k;
        for j in (0..self.plen).step_by(NR) {
            let edges = avx512::column_masks(p0 + j, w);
            let b = rows[halo + j..].as_ptr();
            for cp in self.co.clone().step_by(MR) {
                let a = self.wp.data[(cp / MR * k + self.k0) * MR..].as_ptr();
                let start = match self.start {
                    Start::Bias(b) => Start::Bias(b.add(cp - self.co.start)),
                    s => s,
                };
                let tile = avx512::OutTile {
                    c: self.out.add((cp - self.co.start) * self.ldo + j),
                    ldc: self.ldo,
                    rows: MR.min(self.co.end - cp),
                    cols: NR.min(self.plen - j),
                    start,
                    relu: self.relu,
                };
                let chans = self.kc / taps;
                if taps == 9 {
                    avx512::kernel_8x48::<9>(chans, a, b, ldr, w, edges, tile);
                } else {
                    avx512::kernel_8x48::<1>(chans, a, b, ldr, w, edges, tile);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512F micro-kernels.
    use super::{Start, DW_MR, DW_NR, MR};
    use std::arch::x86_64::*;

    /// Transposes 16 rows of 16 floats in place (r[i][j] → r[j][i]).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn transpose16(r: &mut [__m512; 16]) {
        let mut a = [_mm512_setzero_ps(); 16];
        for k in 0..8 {
            a[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
            a[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
        }
        // b[4k + c], 128-bit lane L: column 4L + c of rows 4k..4k+3.
        let mut b = [_mm512_setzero_ps(); 16];
        for k in 0..4 {
            let pd = |v: __m512| _mm512_castps_pd(v);
            b[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a[4 * k]), pd(a[4 * k + 2])));
            b[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a[4 * k]), pd(a[4 * k + 2])));
            b[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a[4 * k + 1]), pd(a[4 * k + 3])));
            b[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a[4 * k + 1]), pd(a[4 * k + 3])));
        }
        for c in 0..4 {
            let s0 = _mm512_shuffle_f32x4::<0x44>(b[c], b[4 + c]);
            let s1 = _mm512_shuffle_f32x4::<0xEE>(b[c], b[4 + c]);
            let s2 = _mm512_shuffle_f32x4::<0x44>(b[8 + c], b[12 + c]);
            let s3 = _mm512_shuffle_f32x4::<0xEE>(b[8 + c], b[12 + c]);
            r[c] = _mm512_shuffle_f32x4::<0x88>(s0, s2);
            r[4 + c] = _mm512_shuffle_f32x4::<0xDD>(s0, s2);
            r[8 + c] = _mm512_shuffle_f32x4::<0x88>(s1, s3);
            r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(s1, s3);
        }
    }

    /// dyt[(co / 64 · tcap + s) · 64 + co % 64] = dy[co · hw + p] for co < cout and the tile's
    /// pixels p = p0 + i (i < plen), at step s = pos(p) − q0, pos(p) = p / w · (w + 2·pad) +
    /// p % w + pad; by 16×16 blocks. Other entries are left alone. Safety: AVX-512F present;
    /// dy holds cout rows of hw floats, dyt cout/64 (rounded up) panels of tcap × 64 floats,
    /// every step below tcap.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_dy(
        dy: &[f32],
        hw: usize,
        cout: usize,
        (p0, plen): (usize, usize),
        (w, pad, q0): (usize, usize, usize),
        dyt: &mut [f32],
        tcap: usize,
    ) {
        let wp = w + 2 * pad;
        for co0 in (0..cout).step_by(16) {
            let out = dyt
                .as_mut_ptr()
                .add((co0 / DW_NR * tcap) * DW_NR + co0 % DW_NR);
            for pb in (0..plen).step_by(16) {
                let m = lane_mask(plen, pb);
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, r) in r.iter_mut().enumerate().take(cout - co0) {
                    *r = _mm512_maskz_loadu_ps(m, dy.as_ptr().add((co0 + i) * hw + p0 + pb));
                }
                transpose16(&mut r);
                for (j, &v) in r.iter().enumerate().take(plen - pb) {
                    let p = p0 + pb + j;
                    let step = p / w * wp + p % w + pad - q0;
                    _mm512_storeu_ps(out.add(step * DW_NR), v);
                }
            }
        }
    }

    /// Lanes of the 16-pixel vector starting at `first` that fall before `cols`.
    fn lane_mask(cols: usize, first: usize) -> __mmask16 {
        if cols >= first + 16 {
            0xFFFF
        } else if cols > first {
            ((1u32 << (cols - first)) - 1) as __mmask16
        } else {
            0
        }
    }

    /// Where a micro-kernel writes: rows × cols of c (rows `ldc` apart), starting its sums as
    /// `start` says, then optionally ReLU'd.
    pub(super) struct OutTile {
        pub c: *mut f32,
        pub ldc: usize,
        pub rows: usize,
        pub cols: usize,
        pub start: Start,
        pub relu: bool,
    }

    /// For the 48 pixels from flat index p: lanes not on column 0 (three vectors), then lanes
    /// not on column w − 1.
    pub(super) fn column_masks(p: usize, w: usize) -> [__mmask16; 6] {
        let mut m = [0xFFFF; 6];
        let mut ox = p % w;
        for l in 0..48 {
            if ox == 0 {
                m[l / 16] &= !(1 << (l % 16));
            }
            if ox + 1 == w {
                m[3 + l / 16] &= !(1 << (l % 16));
            }
            ox = if ox + 1 == w { 0 } else { ox + 1 };
        }
        m
    }

    /// out[i, p] = start + Σ_{r, t} a[r·TAPS + t, i] · b[r·ldb + p + shift(t)] for a 8×48 tile.
    /// TAPS 9: shift(t) = (t/3 − 1)·w + t%3 − 1, lanes on the first (last) column dropped for
    /// t%3 = 0 (2) by `edges`; TAPS 1: shift 0. a: packed panel [chans·TAPS][MR]; b: `chans`
    /// rows readable from −(w+1) to 48 + w + 1. Safety: AVX-512F present, pointers valid.
    /// Never inlined: as a function of its own the 24 accumulators stay in registers and the
    /// tap loop unrolls, whatever the caller looks like.
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel_8x48<const TAPS: usize>(
        chans: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        w: usize,
        edges: [__mmask16; 6],
        out: OutTile,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; MR];
        let mut ap = a;
        for r in 0..chans {
            let row = b.add(r * ldb);
            for t in 0..TAPS {
                let (bp, m) = if TAPS == 1 {
                    (row, [0xFFFF; 3])
                } else {
                    let bp = row.wrapping_add((t / 3) * w + t % 3).wrapping_sub(w + 1);
                    match t % 3 {
                        0 => (bp, [edges[0], edges[1], edges[2]]),
                        2 => (bp, [edges[3], edges[4], edges[5]]),
                        _ => (bp, [0xFFFF; 3]),
                    }
                };
                let b0 = _mm512_maskz_loadu_ps(m[0], bp);
                let b1 = _mm512_maskz_loadu_ps(m[1], bp.add(16));
                let b2 = _mm512_maskz_loadu_ps(m[2], bp.add(32));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai = _mm512_set1_ps(*ap.add(i));
                    acc[0] = _mm512_fmadd_ps(ai, b0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(ai, b1, acc[1]);
                    acc[2] = _mm512_fmadd_ps(ai, b2, acc[2]);
                }
                ap = ap.add(MR);
            }
        }
        let masks = [
            lane_mask(out.cols, 0),
            lane_mask(out.cols, 16),
            lane_mask(out.cols, 32),
        ];
        for (i, acc) in acc.iter().enumerate().take(out.rows) {
            let row = out.c.add(i * out.ldc);
            for (j, &mask) in masks.iter().enumerate() {
                let mut v = acc[j];
                v = match out.start {
                    Start::Zero => v,
                    Start::Bias(bias) => _mm512_add_ps(v, _mm512_set1_ps(*bias.add(i))),
                    Start::Accumulate => {
                        _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, row.add(16 * j)))
                    }
                };
                if out.relu {
                    v = _mm512_max_ps(v, _mm512_setzero_ps());
                }
                _mm512_mask_storeu_ps(row.add(16 * j), mask, v);
            }
        }
    }

    /// c[i, j] += Σ_{p < steps} a[i][p] · b[p, j] for i < rows, j < 64. a: DW_MR row pointers
    /// readable for `steps` floats; b: [steps][64]; c: rows `ldc` apart. Safety: AVX-512F
    /// present, pointers valid for those extents.
    #[inline(never)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel_6x64(
        steps: usize,
        a: &[*const f32; DW_MR],
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
    ) {
        let a = *a;
        let mut acc = [[_mm512_setzero_ps(); 4]; DW_MR];
        for p in 0..steps {
            let bp = b.add(p * DW_NR);
            let bv = [
                _mm512_loadu_ps(bp),
                _mm512_loadu_ps(bp.add(16)),
                _mm512_loadu_ps(bp.add(32)),
                _mm512_loadu_ps(bp.add(48)),
            ];
            for (acc, ap) in acc.iter_mut().zip(a) {
                let ai = _mm512_set1_ps(*ap.add(p));
                for (acc, &bj) in acc.iter_mut().zip(&bv) {
                    *acc = _mm512_fmadd_ps(ai, bj, *acc);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate().take(rows) {
            for (j, &v) in acc.iter().enumerate() {
                let ptr = c.add(i * ldc + 16 * j);
                _mm512_storeu_ps(ptr, _mm512_add_ps(_mm512_loadu_ps(ptr), v));
            }
        }
    }
}

/// Sum of `v` in f64: 16 f32 lanes over the slice, then the lanes in f64 (fixed order).
fn sum_f64(v: &[f32]) -> f64 {
    let mut lanes = [0.0f32; 16];
    let chunks = v.chunks_exact(16);
    let rest = chunks.remainder();
    for ch in chunks {
        for (l, &x) in lanes.iter_mut().zip(ch) {
            *l += x;
        }
    }
    lanes.iter().chain(rest).map(|&l| l as f64).sum()
}

/// dw [cout, cin·taps] and db [cout] of `conv_forward` from dy [n, cout, h, w].
/// dwᵀ[k, co] = Σ_{img, p} unfold(x)[k, p] · dy[img, co, p]. A task owns a chunk of input
/// channels (K rows) and a fixed range of the (image, tile) list; it sums tile products in f32
/// over about `dw_flush` pixels at a time, adds those to f64 partials, and the partials
/// are reduced over the ranges in order.
/// Nothing depends on which thread ran what, so dw and db are bit-reproducible.
#[allow(clippy::too_many_arguments)]
fn conv_weight_grad(
    be: Backend,
    bl: &Blocking,
    x: Planes,
    n: usize,
    w: usize,
    taps: usize,
    dy: &[f32],
    cout: usize,
    dw: &mut [f32],
    db: &mut [f32],
) {
    let hw = x.hw;
    let cin = x.channels();
    let k = cin * taps;
    if n == 0 || hw == 0 {
        dw.fill(0.0);
        db.fill(0.0);
        return;
    }
    let cc = (bl.dw_k / taps).clamp(1, cin);
    let nci = cin.div_ceil(cc);
    let tiling = Tiling::new(hw, bl.dw_tile);
    let items = n * tiling.count;
    let per = items.div_ceil(bl.min_tasks.div_ceil(nci).clamp(1, items));
    let nrange = items.div_ceil(per);
    let ldc = cout.next_multiple_of(DW_NR);
    let flush_every = bl.dw_flush.div_ceil(tiling.len);
    let geo = DwGeometry::new(w, taps, tiling.len);
    let partials: Vec<(Vec<f64>, Vec<f64>)> = (0..nci * nrange)
        .into_par_iter()
        .map(|task| {
            let chans = task / nrange * cc..(task / nrange * cc + cc).min(cin);
            let kc = chans.len() * taps;
            let mut acc = vec![0.0f64; kc * cout];
            let mut dbacc = vec![0.0f64; if chans.start == 0 { cout } else { 0 }];
            let input_len = match be {
                #[cfg(target_arch = "x86_64")]
                Backend::Avx512 => (chans.len() + 1) * geo.ldr + ldc * geo.tcap,
                Backend::Portable => kc * tiling.ld,
            };
            with_scratch(input_len + kc * ldc, |scratch| {
                let (input, stage) = scratch.split_at_mut(input_len);
                input.fill(0.0);
                stage.fill(0.0);
                let range = task % nrange * per..(task % nrange * per + per).min(items);
                for item in range.clone() {
                    let (img, t) = (item / tiling.count, item % tiling.count);
                    let (p0, plen) = tiling.range(t, hw);
                    let dyi = &dy[img * cout * hw..(img + 1) * cout * hw];
                    match be {
                        #[cfg(target_arch = "x86_64")]
                        Backend::Avx512 => {
                            let tile = (img, p0, plen);
                            // SAFETY: AVX-512F present (Backend::detect).
                            unsafe {
                                geo.tile_avx512(&x, chans.clone(), tile, dyi, input, stage, ldc)
                            }
                        }
                        Backend::Portable => {
                            let ld = tiling.ld;
                            pack_cols(&x, img, chans.clone(), taps, w, p0, plen, ld, input);
                            dw_tile_portable(input, ld, kc, (dyi, hw, cout), (p0, plen), stage, ldc)
                        }
                    }
                    for (co, s) in dbacc.iter_mut().enumerate() {
                        *s += sum_f64(&dyi[co * hw + p0..co * hw + p0 + plen]);
                    }
                    if item + 1 == range.end || (item + 1 - range.start) % flush_every == 0 {
                        for (a, s) in acc.chunks_exact_mut(cout).zip(stage.chunks_exact_mut(ldc)) {
                            for (a, s) in a.iter_mut().zip(s.iter_mut()) {
                                *a += *s as f64;
                                *s = 0.0;
                            }
                        }
                    }
                }
            });
            (acc, dbacc)
        })
        .collect();
    for (ci, chunk) in partials.chunks(nrange).enumerate() {
        let mut sum = chunk[0].0.clone();
        for (acc, _) in &chunk[1..] {
            sum.iter_mut().zip(acc).for_each(|(s, &v)| *s += v);
        }
        let k0 = ci * cc * taps;
        for (kk, row) in sum.chunks_exact(cout).enumerate() {
            for (co, &v) in row.iter().enumerate() {
                dw[co * k + k0 + kk] = v as f32;
            }
        }
    }
    for (co, d) in db.iter_mut().enumerate() {
        *d = partials[..nrange]
            .iter()
            .map(|(_, dbp)| dbp[co])
            .sum::<f64>() as f32;
    }
}

/// stage[k, co] += Σ_{p < plen} col[k, p] · dy[co, p0 + p] for one tile through the `gemm`
/// crate: col holds kc unfolded rows `ld` apart; dy is one image [cout, hw]; stage rows are
/// `ldc` apart.
fn dw_tile_portable(
    col: &[f32],
    ld: usize,
    kc: usize,
    (dy, hw, cout): (&[f32], usize, usize),
    (p0, plen): (usize, usize),
    stage: &mut [f32],
    ldc: usize,
) {
    assert!(col.len() >= kc * ld && stage.len() >= kc * ldc && dy.len() >= cout * hw);
    // SAFETY: the extents read and written are checked above.
    unsafe {
        gemm::gemm(
            kc,
            cout,
            plen,
            stage.as_mut_ptr(),
            1,
            ldc as isize,
            true,
            col.as_ptr(),
            1,
            ld as isize,
            dy[p0..].as_ptr(),
            hw as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Layout of the AVX-512 weight gradient's tiles. Pixels live in a padded layout with rows of
/// wp = w + 2·pad (pad 1 for 3×3: one zero column each side, so that every tap of a pixel is
/// the pixel's position shifted by (ky − 1)·wp + kx − 1; pad 0 for 1×1).
#[derive(Clone, Copy, Debug)]
struct DwGeometry {
    w: usize,
    taps: usize,
    pad: usize,
    /// Positions of padding before and after a tile's range: one padded row and one pixel.
    halo: usize,
    /// Most padded positions a tile of `tiling.len` pixels spans.
    tcap: usize,
    /// Stride of the packed channel rows.
    ldr: usize,
}

impl DwGeometry {
    fn new(w: usize, taps: usize, tile_len: usize) -> DwGeometry {
        let pad = usize::from(taps == 9);
        let halo = pad * (w + 2 * pad + 1);
        let tcap = tile_len + 2 * pad * (tile_len.div_ceil(w) + 1);
        DwGeometry {
            w,
            taps,
            pad,
            halo,
            tcap,
            ldr: row_stride(tcap + 2 * halo),
        }
    }

    /// Padded position of flat pixel p.
    fn pos(&self, p: usize) -> usize {
        p / self.w * (self.w + 2 * self.pad) + p % self.w + self.pad
    }

    /// stage[k, co] += Σ over the tile (img, p0, plen) of unfold(x)[k, p] · dy[co, p]. The input
    /// channels are packed once each in the padded layout (`input`: chans.len() + 1 rows of ldr,
    /// the last zero, then ldc/64 panels of dyᵀ); dy is transposed to [position][64 channels]
    /// with zero rows at padding positions; the 6×64 micro-kernel then broadcasts from 6
    /// shifted channel rows while a dyᵀ panel stays in L1. Safety: AVX-512F present.
    #[allow(clippy::too_many_arguments)]
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile_avx512(
        &self,
        x: &Planes,
        chans: Range<usize>,
        (img, p0, plen): (usize, usize, usize),
        dy: &[f32],
        input: &mut [f32],
        stage: &mut [f32],
        ldc: usize,
    ) {
        let (hw, cout, taps) = (x.hw, dy.len() / x.hw, self.taps);
        let wp = self.w + 2 * self.pad;
        let (q0, steps) = (self.pos(p0), self.pos(p0 + plen - 1) + 1 - self.pos(p0));
        let (rows, dyt) = input.split_at_mut((chans.len() + 1) * self.ldr);
        let qlo = q0 as isize - self.halo as isize;
        let nch = chans.len();
        pack_padded_rows(
            x,
            img,
            chans,
            self.w,
            self.pad,
            qlo,
            steps + 2 * self.halo,
            self.ldr,
            rows,
        );
        avx512::transpose_dy(
            dy,
            hw,
            cout,
            (p0, plen),
            (self.w, self.pad, q0),
            dyt,
            self.tcap,
        );
        if self.pad > 0 {
            for s in 0..steps {
                let col = (q0 + s) % wp;
                if col == 0 || col == wp - 1 {
                    for panel in dyt.chunks_exact_mut(self.tcap * DW_NR) {
                        panel[s * DW_NR..(s + 1) * DW_NR].fill(0.0);
                    }
                }
            }
        }
        let kc = nch * taps;
        let zero = rows[nch * self.ldr..].as_ptr();
        for (panel, b) in dyt.chunks_exact(self.tcap * DW_NR).enumerate() {
            for kp in (0..kc).step_by(DW_MR) {
                let mut a = [zero; DW_MR];
                for (i, a) in a.iter_mut().enumerate().take(kc - kp) {
                    let (r, t) = ((kp + i) / taps, (kp + i) % taps);
                    // Tap t of position q0 + s is position q0 + s + (t/3 − 1)·wp + t%3 − 1, at
                    // index s + halo + (t/3 − 1)·wp + t%3 − 1 = s + t/3·wp + t%3 (halo = wp + 1).
                    let off = if taps == 9 { t / 3 * wp + t % 3 } else { 0 };
                    *a = rows[r * self.ldr + off..].as_ptr();
                }
                let c = stage[kp * ldc + panel * DW_NR..].as_mut_ptr();
                avx512::kernel_6x64(steps, &a, b.as_ptr(), c, ldc, DW_MR.min(kc - kp));
            }
        }
    }
}

/// Shared argument checks of the convolutions.
fn check_conv(parts: &[(&[f32], usize)], xd: Dims, taps: usize, w: &[f32], cout: usize) {
    let cin: usize = parts.iter().map(|p| p.1).sum();
    assert!(
        cin > 0 && cout > 0,
        "a convolution needs input and output channels"
    );
    assert_eq!(
        cin, xd.c,
        "input parts hold {cin} channels, dims say {}",
        xd.c
    );
    for &(data, c) in parts {
        assert_eq!(
            data.len(),
            xd.n * c * xd.hw(),
            "input part of {c} channels has the wrong length"
        );
    }
    assert_eq!(w.len(), cout * cin * taps, "weight length");
}

#[allow(clippy::too_many_arguments)]
fn forward_impl(
    be: Backend,
    bl: &Blocking,
    parts: &[(&[f32], usize)],
    xd: Dims,
    taps: usize,
    w: &[f32],
    b: &[f32],
    cout: usize,
    relu: bool,
    y: &mut [f32],
) {
    check_conv(parts, xd, taps, w, cout);
    assert_eq!(b.len(), cout, "bias length");
    assert_eq!(y.len(), xd.n * cout * xd.hw(), "output length");
    let k = xd.c * taps;
    let wp = Packed::new(cout, k, be.panel_rows(), |co, kk| w[co * k + kk]);
    let x = Planes { parts, hw: xd.hw() };
    conv_forward(be, bl, x, xd.n, xd.w, taps, &wp, Some(b), relu, y);
}

#[allow(clippy::too_many_arguments)]
fn backward_impl(
    be: Backend,
    bl: &Blocking,
    parts: &[(&[f32], usize)],
    xd: Dims,
    taps: usize,
    w: &[f32],
    dy: &[f32],
    cout: usize,
    dx: &mut [Option<&mut [f32]>],
    dw: &mut [f32],
    db: &mut [f32],
) {
    check_conv(parts, xd, taps, w, cout);
    let (cin, hw) = (xd.c, xd.hw());
    assert_eq!(dy.len(), xd.n * cout * hw, "dy length");
    assert_eq!(dw.len(), w.len(), "dw length");
    assert_eq!(db.len(), cout, "db length");
    assert_eq!(dx.len(), parts.len(), "one dx slot per input part");
    let x = Planes { parts, hw };
    conv_weight_grad(be, bl, x, xd.n, xd.w, taps, dy, cout, dw, db);
    let dy_planes = [(dy, cout)];
    let dyp = Planes {
        parts: &dy_planes,
        hw,
    };
    let mut c_lo = 0;
    for (&(_, c), dxp) in parts.iter().zip(dx.iter_mut()) {
        if let Some(dxp) = dxp {
            assert_eq!(dxp.len(), xd.n * c * hw, "dx length");
            // dx = conv(dy; W') with W'[ci, co·taps + t] = w[co, ci, taps − 1 − t].
            let wt = Packed::new(c, cout * taps, be.panel_rows(), |r, kk| {
                let (co, t) = (kk / taps, taps - 1 - kk % taps);
                w[(co * cin + c_lo + r) * taps + t]
            });
            conv_forward(be, bl, dyp, xd.n, xd.w, taps, &wt, None, false, dxp);
        }
        c_lo += c;
    }
}

/// 3×3 convolution, stride 1, zero padding 1, with bias. x: [n, cin, h, w] (xd),
/// w: [cout, cin, 3, 3], b: [cout] → y: [n, cout, h, w].
pub fn conv3x3_forward(x: &[f32], xd: Dims, w: &[f32], b: &[f32], cout: usize, y: &mut [f32]) {
    conv3x3_forward_concat(&[(x, xd.c)], xd, w, b, cout, false, y);
}

/// y = relu(conv3x3(x; w, b)), for inference with BatchNorm folded into w and b by the caller.
pub fn conv3x3_relu_forward(x: &[f32], xd: Dims, w: &[f32], b: &[f32], cout: usize, y: &mut [f32]) {
    conv3x3_forward_concat(&[(x, xd.c)], xd, w, b, cout, true, y);
}

/// conv3x3_forward of the channel concatenation of `parts` ([n, c_i, h, w] each, in order;
/// xd.c = Σ c_i) without materialising it. `relu` as in conv3x3_relu_forward.
pub fn conv3x3_forward_concat(
    parts: &[(&[f32], usize)],
    xd: Dims,
    w: &[f32],
    b: &[f32],
    cout: usize,
    relu: bool,
    y: &mut [f32],
) {
    forward_impl(
        Backend::detect(),
        &BLOCKING,
        parts,
        xd,
        9,
        w,
        b,
        cout,
        relu,
        y,
    );
}

/// Gradients of conv3x3_forward. dy: [n, cout, h, w]. dx (if Some): [n, cin, h, w];
/// dw: [cout, cin, 3, 3]; db: [cout]. All overwritten; dw and db are bit-reproducible.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_backward(
    x: &[f32],
    xd: Dims,
    w: &[f32],
    dy: &[f32],
    cout: usize,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) {
    conv3x3_backward_concat(&[(x, xd.c)], xd, w, dy, cout, &mut [dx], dw, db);
}

/// Gradients of conv3x3_forward_concat: dx[i] (if Some) receives the gradient of parts[i].
#[allow(clippy::too_many_arguments)]
pub fn conv3x3_backward_concat(
    parts: &[(&[f32], usize)],
    xd: Dims,
    w: &[f32],
    dy: &[f32],
    cout: usize,
    dx: &mut [Option<&mut [f32]>],
    dw: &mut [f32],
    db: &mut [f32],
) {
    backward_impl(
        Backend::detect(),
        &BLOCKING,
        parts,
        xd,
        9,
        w,
        dy,
        cout,
        dx,
        dw,
        db,
    );
}

/// 1×1 convolution with bias: w [cout, cin] (PyTorch's [cout, cin, 1, 1] flattened),
/// x [n, cin, h, w] → y [n, cout, h, w].
pub fn conv1x1_forward(x: &[f32], xd: Dims, w: &[f32], b: &[f32], cout: usize, y: &mut [f32]) {
    forward_impl(
        Backend::detect(),
        &BLOCKING,
        &[(x, xd.c)],
        xd,
        1,
        w,
        b,
        cout,
        false,
        y,
    );
}

/// Gradients of conv1x1_forward; shapes as in conv3x3_backward with w [cout, cin].
#[allow(clippy::too_many_arguments)]
pub fn conv1x1_backward(
    x: &[f32],
    xd: Dims,
    w: &[f32],
    dy: &[f32],
    cout: usize,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) {
    backward_impl(
        Backend::detect(),
        &BLOCKING,
        &[(x, xd.c)],
        xd,
        1,
        w,
        dy,
        cout,
        &mut [dx],
        dw,
        db,
    );
}

/// Rows of x per linear-layer task.
const LINEAR_ROWS: usize = 64;

/// Linear layer y = x·wᵀ + b: x [m, fin], w [fout, fin], b [fout] → y [m, fout].
pub fn linear_forward(
    x: &[f32],
    m: usize,
    fin: usize,
    w: &[f32],
    b: &[f32],
    fout: usize,
    y: &mut [f32],
) {
    assert_eq!(x.len(), m * fin, "x length");
    assert_eq!(w.len(), fout * fin, "weight length");
    assert_eq!(b.len(), fout, "bias length");
    assert_eq!(y.len(), m * fout, "y length");
    if m == 0 || fout == 0 {
        return;
    }
    if fin == 0 {
        y.chunks_exact_mut(fout)
            .for_each(|row| row.copy_from_slice(b));
        return;
    }
    y.par_chunks_mut(LINEAR_ROWS * fout)
        .zip(x.par_chunks(LINEAR_ROWS * fin))
        .for_each(|(yb, xb)| {
            for row in yb.chunks_exact_mut(fout) {
                row.copy_from_slice(b);
            }
            // SAFETY: yb is [rows, fout], xb [rows, fin], w [fout, fin] read as wᵀ.
            unsafe {
                gemm::gemm(
                    yb.len() / fout,
                    fout,
                    fin,
                    yb.as_mut_ptr(),
                    1,
                    fout as isize,
                    true,
                    xb.as_ptr(),
                    1,
                    fin as isize,
                    w.as_ptr(),
                    fin as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
}

/// Gradients of linear_forward: dx (if Some) [m, fin], dw [fout, fin], db [fout], overwritten.
/// Each entry is summed by one task in a fixed order (bit-reproducible).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    x: &[f32],
    m: usize,
    fin: usize,
    w: &[f32],
    dy: &[f32],
    fout: usize,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
) {
    assert_eq!(x.len(), m * fin, "x length");
    assert_eq!(w.len(), fout * fin, "weight length");
    assert_eq!(dy.len(), m * fout, "dy length");
    assert_eq!(dw.len(), fout * fin, "dw length");
    assert_eq!(db.len(), fout, "db length");
    for (j, d) in db.iter_mut().enumerate() {
        *d = (0..m).map(|r| dy[r * fout + j] as f64).sum::<f64>() as f32;
    }
    if m == 0 || fin == 0 || fout == 0 {
        // Empty sums: dx (if any) and dw are zero.
        dw.fill(0.0);
        if let Some(dx) = dx {
            assert_eq!(dx.len(), m * fin, "dx length");
            dx.fill(0.0);
        }
        return;
    }
    if let Some(dx) = dx {
        assert_eq!(dx.len(), m * fin, "dx length");
        dx.par_chunks_mut(LINEAR_ROWS * fin)
            .zip(dy.par_chunks(LINEAR_ROWS * fout))
            .for_each(|(dxb, dyb)| {
                // SAFETY: dxb is [rows, fin] = dyb [rows, fout] · w [fout, fin].
                unsafe {
                    gemm::gemm(
                        dxb.len() / fin,
                        fin,
                        fout,
                        dxb.as_mut_ptr(),
                        1,
                        fin as isize,
                        false,
                        dyb.as_ptr(),
                        1,
                        fout as isize,
                        w.as_ptr(),
                        1,
                        fin as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            });
    }
    dw.par_chunks_mut(LINEAR_ROWS * fin)
        .enumerate()
        .for_each(|(blk, dwb)| {
            // SAFETY: dwb is rows j0.. of dw = dyᵀ [fout, m] · x [m, fin].
            unsafe {
                gemm::gemm(
                    dwb.len() / fin,
                    fin,
                    m,
                    dwb.as_mut_ptr(),
                    1,
                    fin as isize,
                    false,
                    dy[blk * LINEAR_ROWS..].as_ptr(),
                    fout as isize,
                    1,
                    x.as_ptr(),
                    1,
                    fin as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A blocking so small that the test shapes need several K chunks, tiles and channel
    /// blocks, with ragged ends everywhere.
    const SMALL: Blocking = Blocking {
        fwd_k: 18,
        fwd_col: 18 * 96,
        fwd_tile: 48,
        dw_k: 18,
        dw_tile: 48,
        dw_flush: 96,
        min_tasks: 8,
    };

    fn rand_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }

    fn to_f64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    /// The backends this CPU can run (the portable one always).
    fn backends() -> Vec<Backend> {
        let mut v = vec![Backend::Portable];
        if Backend::detect() != Backend::Portable {
            v.push(Backend::detect());
        }
        v
    }

    /// Direct loops in f64: 3×3 zero-padded (taps 9) or 1×1 (taps 1) convolution with bias.
    fn naive_conv(x: &[f64], d: Dims, taps: usize, w: &[f64], b: &[f64], cout: usize) -> Vec<f64> {
        let (ks, pad) = if taps == 9 { (3, 1) } else { (1, 0) };
        let mut y = vec![0.0; d.n * cout * d.hw()];
        for i in 0..d.n {
            for co in 0..cout {
                for oy in 0..d.h {
                    for ox in 0..d.w {
                        let mut s = b[co];
                        for ci in 0..d.c {
                            for ky in 0..ks {
                                for kx in 0..ks {
                                    let (sy, sx) = (oy + ky, ox + kx);
                                    if sy < pad || sx < pad || sy - pad >= d.h || sx - pad >= d.w {
                                        continue;
                                    }
                                    let xv = x[((i * d.c + ci) * d.h + sy - pad) * d.w + sx - pad];
                                    s += w[((co * d.c + ci) * ks + ky) * ks + kx] * xv;
                                }
                            }
                        }
                        y[((i * cout + co) * d.h + oy) * d.w + ox] = s;
                    }
                }
            }
        }
        y
    }

    /// Splits x [n, Σc, h, w] into tensors [n, c_i, h, w].
    fn split_channels(x: &[f32], d: Dims, cs: &[usize]) -> Vec<Vec<f32>> {
        let mut c0 = 0;
        cs.iter()
            .map(|&c| {
                let mut part = Vec::with_capacity(d.n * c * d.hw());
                for i in 0..d.n {
                    part.extend_from_slice(
                        &x[(i * d.c + c0) * d.hw()..(i * d.c + c0 + c) * d.hw()],
                    );
                }
                c0 += c;
                part
            })
            .collect()
    }

    fn fmt_errs(errs: &[f64]) -> String {
        let v: Vec<String> = errs.iter().map(|e| format!("{e:.2e}")).collect();
        v.join(", ")
    }

    fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(&u, &v)| (u as f64 - v).abs())
            .fold(0.0, f64::max)
    }

    /// ‖g − r‖ / ‖r‖.
    fn rel_err(g: &[f32], r: &[f64]) -> f64 {
        assert_eq!(g.len(), r.len());
        let num: f64 = g.iter().zip(r).map(|(&u, &v)| (u as f64 - v).powi(2)).sum();
        let den: f64 = r.iter().map(|v| v * v).sum();
        (num / den.max(1e-300)).sqrt()
    }

    /// (n, input channel parts, cout, h, w)
    type ConvShape = (usize, &'static [usize], usize, usize, usize);

    const FORWARD_SHAPES: [ConvShape; 9] = [
        (2, &[3], 4, 7, 1),
        (1, &[1], 3, 5, 7),
        (2, &[3], 4, 16, 16),
        (3, &[5], 3, 7, 5),
        (1, &[1], 64, 9, 13),
        (2, &[20], 9, 9, 13),
        (2, &[7, 6], 10, 6, 11),
        (1, &[1], 5, 24, 32),
        (5, &[2, 3], 6, 3, 4),
    ];

    fn check_forward(taps: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for &(n, cs, cout, h, w) in &FORWARD_SHAPES {
            let cin: usize = cs.iter().sum();
            let d = Dims::new(n, cin, h, w);
            let x = rand_vec(&mut rng, d.len());
            let wt = rand_vec(&mut rng, cout * cin * taps);
            let b = rand_vec(&mut rng, cout);
            let want = naive_conv(&to_f64(&x), d, taps, &to_f64(&wt), &to_f64(&b), cout);
            let want_relu: Vec<f64> = want.iter().map(|v| v.max(0.0)).collect();
            let parts_data = split_channels(&x, d, cs);
            let parts: Vec<(&[f32], usize)> = parts_data
                .iter()
                .map(|p| p.as_slice())
                .zip(cs.iter().copied())
                .collect();
            for be in backends() {
                for bl in [BLOCKING, SMALL] {
                    for relu in [false, true] {
                        let mut y = vec![f32::NAN; n * cout * h * w];
                        forward_impl(be, &bl, &parts, d, taps, &wt, &b, cout, relu, &mut y);
                        let err = max_abs_diff(&y, if relu { &want_relu } else { &want });
                        println!(
                            "taps {taps} {be:?} fwd_k {} n{n} c{cs:?}→{cout} {h}×{w} relu {relu}: max abs err {err:.2e}",
                            bl.fwd_k
                        );
                        assert!(err < 1e-4, "forward error {err}");
                    }
                }
            }
        }
    }

    #[test]
    fn conv3x3_forward_matches_naive_loops() {
        check_forward(9);
    }

    #[test]
    fn conv1x1_forward_matches_naive_loops() {
        check_forward(1);
    }

    #[test]
    fn public_conv_entry_points_match_naive_loops() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let d = Dims::new(2, 6, 7, 9);
        let cout = 5;
        let x = rand_vec(&mut rng, d.len());
        let b = rand_vec(&mut rng, cout);
        for taps in [9, 1] {
            let wt = rand_vec(&mut rng, cout * d.c * taps);
            let want = naive_conv(&to_f64(&x), d, taps, &to_f64(&wt), &to_f64(&b), cout);
            let want_relu: Vec<f64> = want.iter().map(|v| v.max(0.0)).collect();
            let mut y = vec![0.0; d.n * cout * d.hw()];
            let mut errs = Vec::new();
            if taps == 9 {
                conv3x3_forward(&x, d, &wt, &b, cout, &mut y);
                errs.push(max_abs_diff(&y, &want));
                conv3x3_relu_forward(&x, d, &wt, &b, cout, &mut y);
                errs.push(max_abs_diff(&y, &want_relu));
                let parts_data = split_channels(&x, d, &[2, 4]);
                let parts = [(&parts_data[0][..], 2), (&parts_data[1][..], 4)];
                conv3x3_forward_concat(&parts, d, &wt, &b, cout, false, &mut y);
                errs.push(max_abs_diff(&y, &want));
                conv3x3_forward_concat(&parts, d, &wt, &b, cout, true, &mut y);
                errs.push(max_abs_diff(&y, &want_relu));
                let with_empty = [
                    (&parts_data[0][..], 2),
                    (&[][..], 0),
                    (&parts_data[1][..], 4),
                ];
                conv3x3_forward_concat(&with_empty, d, &wt, &b, cout, false, &mut y);
                errs.push(max_abs_diff(&y, &want));
            } else {
                conv1x1_forward(&x, d, &wt, &b, cout, &mut y);
                errs.push(max_abs_diff(&y, &want));
            }
            println!("public taps {taps}: max abs errors {}", fmt_errs(&errs));
            assert!(errs.iter().all(|&e| e < 1e-4), "errors {errs:?}");
        }
    }

    /// Central differences of L = Σ r ⊙ f(θ) over every entry of θ, f evaluated in f64.
    fn fd_grad(theta: &[f32], r: &[f32], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
        let eps = 1e-3;
        let mut t = to_f64(theta);
        let loss = |y: Vec<f64>| -> f64 { y.iter().zip(r).map(|(a, &b)| a * b as f64).sum() };
        (0..t.len())
            .map(|i| {
                let v = t[i];
                t[i] = v + eps;
                let lp = loss(f(&t));
                t[i] = v - eps;
                let lm = loss(f(&t));
                t[i] = v;
                (lp - lm) / (2.0 * eps)
            })
            .collect()
    }

    const BACKWARD_SHAPES: [ConvShape; 6] = [
        (2, &[3], 4, 7, 1),
        (2, &[3], 4, 5, 7),
        (1, &[1], 3, 6, 4),
        (2, &[2, 3], 9, 9, 13),
        (3, &[4], 6, 1, 5),
        (5, &[2, 3], 6, 3, 4),
    ];

    fn check_backward(taps: usize) {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for &(n, cs, cout, h, w) in &BACKWARD_SHAPES {
            let cin: usize = cs.iter().sum();
            let d = Dims::new(n, cin, h, w);
            let x = rand_vec(&mut rng, d.len());
            let wt = rand_vec(&mut rng, cout * cin * taps);
            let b = rand_vec(&mut rng, cout);
            let r = rand_vec(&mut rng, n * cout * h * w);
            let (xf, wf, bf) = (to_f64(&x), to_f64(&wt), to_f64(&b));
            let fd_x = fd_grad(&x, &r, |t| naive_conv(t, d, taps, &wf, &bf, cout));
            let fd_w = fd_grad(&wt, &r, |t| naive_conv(&xf, d, taps, t, &bf, cout));
            let fd_b = fd_grad(&b, &r, |t| naive_conv(&xf, d, taps, &wf, t, cout));
            let parts_data = split_channels(&x, d, cs);
            let parts: Vec<(&[f32], usize)> = parts_data
                .iter()
                .map(|p| p.as_slice())
                .zip(cs.iter().copied())
                .collect();
            let fd_x_parts =
                split_channels(&fd_x.iter().map(|&v| v as f32).collect::<Vec<_>>(), d, cs);
            for be in backends() {
                for bl in [BLOCKING, SMALL] {
                    let mut dx_data: Vec<Vec<f32>> =
                        cs.iter().map(|&c| vec![f32::NAN; n * c * h * w]).collect();
                    let mut dx: Vec<Option<&mut [f32]>> =
                        dx_data.iter_mut().map(|v| Some(v.as_mut_slice())).collect();
                    let mut dw = vec![f32::NAN; wt.len()];
                    let mut db = vec![f32::NAN; cout];
                    backward_impl(
                        be, &bl, &parts, d, taps, &wt, &r, cout, &mut dx, &mut dw, &mut db,
                    );
                    let ex: Vec<f64> = dx_data
                        .iter()
                        .zip(&fd_x_parts)
                        .map(|(g, fd)| rel_err(g, &to_f64(fd)))
                        .collect();
                    let (ew, eb) = (rel_err(&dw, &fd_w), rel_err(&db, &fd_b));
                    println!(
                        "taps {taps} {be:?} dw_k {} n{n} c{cs:?}→{cout} {h}×{w}: rel err dx [{}] dw {ew:.2e} db {eb:.2e}",
                        bl.dw_k,
                        fmt_errs(&ex)
                    );
                    assert!(ex.iter().all(|&e| e < 1e-3) && ew < 1e-3 && eb < 1e-3);
                }
            }
        }
    }

    #[test]
    fn conv3x3_backward_matches_finite_differences() {
        check_backward(9);
    }

    #[test]
    fn conv1x1_backward_matches_finite_differences() {
        check_backward(1);
    }

    #[test]
    fn public_backward_entry_points_match_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (d, cout) = (Dims::new(2, 3, 4, 6), 2);
        let x = rand_vec(&mut rng, d.len());
        let b = rand_vec(&mut rng, cout);
        let r = rand_vec(&mut rng, d.n * cout * d.hw());
        let (xf, bf) = (to_f64(&x), to_f64(&b));
        for taps in [9, 1] {
            let wt = rand_vec(&mut rng, cout * d.c * taps);
            let wf = to_f64(&wt);
            let fd_x = fd_grad(&x, &r, |t| naive_conv(t, d, taps, &wf, &bf, cout));
            let fd_w = fd_grad(&wt, &r, |t| naive_conv(&xf, d, taps, t, &bf, cout));
            let fd_b = fd_grad(&b, &r, |t| naive_conv(&xf, d, taps, &wf, t, cout));
            let (mut dx, mut dw, mut db) =
                (vec![0.0; x.len()], vec![0.0; wt.len()], vec![0.0; cout]);
            let mut errs = Vec::new();
            if taps == 9 {
                conv3x3_backward(&x, d, &wt, &r, cout, Some(&mut dx), &mut dw, &mut db);
                errs.extend([
                    rel_err(&dx, &fd_x),
                    rel_err(&dw, &fd_w),
                    rel_err(&db, &fd_b),
                ]);
                let parts_data = split_channels(&x, d, &[1, 2]);
                let parts = [(&parts_data[0][..], 1), (&parts_data[1][..], 2)];
                let mut dx1 = vec![0.0; d.n * 2 * d.hw()];
                let mut empty: [f32; 0] = [];
                let with_empty = [parts[0], (&[][..], 0), parts[1]];
                conv3x3_backward_concat(
                    &with_empty,
                    d,
                    &wt,
                    &r,
                    cout,
                    &mut [None, Some(&mut empty), Some(&mut dx1)],
                    &mut dw,
                    &mut db,
                );
                let fd_x1 = split_channels(
                    &fd_x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                    d,
                    &[1, 2],
                );
                errs.extend([
                    rel_err(&dx1, &to_f64(&fd_x1[1])),
                    rel_err(&dw, &fd_w),
                    rel_err(&db, &fd_b),
                ]);
            } else {
                conv1x1_backward(&x, d, &wt, &r, cout, Some(&mut dx), &mut dw, &mut db);
                errs.extend([
                    rel_err(&dx, &fd_x),
                    rel_err(&dw, &fd_w),
                    rel_err(&db, &fd_b),
                ]);
            }
            println!(
                "public backward taps {taps}: rel errors (dx, dw, db …) {}",
                fmt_errs(&errs)
            );
            assert!(errs.iter().all(|&e| e < 1e-3), "errors {errs:?}");
        }
    }

    /// Direct loops in f64: y = x·wᵀ + b.
    fn naive_linear(
        x: &[f64],
        m: usize,
        fin: usize,
        w: &[f64],
        b: &[f64],
        fout: usize,
    ) -> Vec<f64> {
        let mut y = vec![0.0; m * fout];
        for i in 0..m {
            for j in 0..fout {
                y[i * fout + j] = b[j]
                    + (0..fin)
                        .map(|k| x[i * fin + k] * w[j * fin + k])
                        .sum::<f64>();
            }
        }
        y
    }

    #[test]
    fn linear_matches_naive_loops_and_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for (m, fin, fout) in [(1, 1, 1), (3, 5, 2), (70, 9, 131), (130, 17, 3), (4, 0, 3)] {
            let x = rand_vec(&mut rng, m * fin);
            let w = rand_vec(&mut rng, fout * fin);
            let b = rand_vec(&mut rng, fout);
            let r = rand_vec(&mut rng, m * fout);
            let (xf, wf, bf) = (to_f64(&x), to_f64(&w), to_f64(&b));
            let mut y = vec![f32::NAN; m * fout];
            linear_forward(&x, m, fin, &w, &b, fout, &mut y);
            let fwd = max_abs_diff(&y, &naive_linear(&xf, m, fin, &wf, &bf, fout));
            let (mut dx, mut dw, mut db) = (
                vec![f32::NAN; m * fin],
                vec![f32::NAN; fout * fin],
                vec![f32::NAN; fout],
            );
            linear_backward(&x, m, fin, &w, &r, fout, Some(&mut dx), &mut dw, &mut db);
            let ex = rel_err(
                &dx,
                &fd_grad(&x, &r, |t| naive_linear(t, m, fin, &wf, &bf, fout)),
            );
            let ew = rel_err(
                &dw,
                &fd_grad(&w, &r, |t| naive_linear(&xf, m, fin, t, &bf, fout)),
            );
            let eb = rel_err(
                &db,
                &fd_grad(&b, &r, |t| naive_linear(&xf, m, fin, &wf, t, fout)),
            );
            println!("linear {m}×{fin}→{fout}: fwd max abs err {fwd:.2e}, rel err dx {ex:.2e} dw {ew:.2e} db {eb:.2e}");
            assert!(fwd < 1e-4 && ex < 1e-3 && ew < 1e-3 && eb < 1e-3);
        }
    }

    #[test]
    fn conv3x3_backward_is_bit_reproducible() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let (d, cout) = (Dims::new(2, 64, 32, 32), 64);
        let x = rand_vec(&mut rng, d.len());
        let w = rand_vec(&mut rng, cout * d.c * 9);
        let dy = rand_vec(&mut rng, d.n * cout * d.hw());
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let (mut dx, mut dw, mut db) =
                    (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; cout]);
                conv3x3_backward(&x, d, &w, &dy, cout, Some(&mut dx), &mut dw, &mut db);
                (dx, dw, db)
            })
        };
        let first = run(2);
        // A reference for dw entries, so that the test also fails on a wrong (if stable) result.
        let col0: f64 = (0..d.n)
            .flat_map(|i| (1..d.h).flat_map(move |oy| (1..d.w).map(move |ox| (i, oy, ox))))
            .map(|(i, oy, ox)| {
                dy[i * cout * d.hw() + oy * d.w + ox] as f64
                    * x[i * d.c * d.hw() + (oy - 1) * d.w + ox - 1] as f64
            })
            .sum();
        let err0 = (first.1[0] as f64 - col0).abs();
        for threads in [2, 1, 3] {
            let again = run(threads);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let diff = first
                .1
                .iter()
                .zip(&again.1)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            println!("{threads} threads: max |dw − dw₀| = {diff:e}; dw[0,0,0,0] err vs f64 sum {err0:.2e}");
            assert_eq!(
                bits(&first.1),
                bits(&again.1),
                "dw differs with {threads} threads"
            );
            assert_eq!(
                bits(&first.2),
                bits(&again.2),
                "db differs with {threads} threads"
            );
            assert_eq!(
                bits(&first.0),
                bits(&again.0),
                "dx differs with {threads} threads"
            );
        }
        assert!(err0 < 1e-3, "dw[0,0,0,0] error {err0}");
    }
}
