//! Convolutions (3×3 and 1×1, NCHW f32) and linear layers of the CPU engine, forward and backward.
//!
//! A convolution is an implicit GEMM: GEMM-M = output channels, GEMM-N = the pixels of one image,
//! GEMM-K = input channels × taps (9 for 3×3, 1 for 1×1). Rayon tasks each own a tile of a few
//! hundred output pixels of one image (and, when tiles are scarce, a block of output channels).
//! A task unfolds the input under its tile, at most 576 K rows at a time, into a per-thread
//! scratch of about 1 MiB (never a whole-image im2col) and multiplies it by the weights: an
//! 8×48 AVX-512 micro-kernel where the CPU has AVX-512F, the `gemm` crate (single-threaded
//! inside the task) elsewhere. A 1-channel input is just K = 9.
//!
//! Backward: dx is the forward convolution of dy with the transposed, flipped weights (the same
//! tiled path). dwᵀ[k, co] = Σ_pixels unfold(x)[k, p] · dy[co, p]: a task owns a chunk of K
//! rows and a fixed range of tiles; per tile it transposes dy to [pixels][64 channels] (kept in
//! L1) and runs a 6×64 micro-kernel that broadcasts unfolded values. Tile sums go to f64
//! partials, reduced in a fixed order; db is summed in the same sweep. No sum depends on
//! scheduling or thread count, so every result is bit-identical from run to run.

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
/// may be shorter), unfolded `ld` floats apart in the scratch.
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
        // A row stride that is a multiple of 1 KiB would map all rows onto the same cache sets.
        let ld = if len.is_multiple_of(256) {
            len + 16
        } else {
            len
        };
        Tiling { len, count, ld }
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

/// Unfolds channels `chans` of image `img` under pixels [p0, p0+plen) into `col`: row
/// (c − chans.start)·taps + t holds tap t, `ld` floats apart (ld a multiple of 16), zero-padded
/// from plen to ld.
#[allow(clippy::too_many_arguments)]
fn pack_cols(
    be: Backend,
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
    assert!(col.len() >= chans.len() * taps * ld && ld.is_multiple_of(16) && plen <= ld);
    match be {
        // SAFETY: AVX-512F present (Backend::detect); col checked above.
        #[cfg(target_arch = "x86_64")]
        Backend::Avx512 => unsafe { avx512::pack_cols(x, img, chans, taps, w, p0, plen, ld, col) },
        Backend::Portable => pack_cols_portable(x, img, chans, taps, w, p0, plen, ld, col),
    }
}

/// pack_cols with slice copies, one image row segment at a time.
#[allow(clippy::too_many_arguments)]
fn pack_cols_portable(
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
    if n == 0 || hw == 0 {
        return;
    }
    let cc = (bl.fwd_k / taps).clamp(1, cin);
    let tiling = Tiling::new(hw, (bl.fwd_col / (cc * taps)).min(bl.fwd_tile));
    let cb = block_size(cout, MR, n * tiling.count, bl.min_tasks);
    let nblk = cout.div_ceil(cb);
    let out = SharedMut(y.as_mut_ptr());
    (0..n * tiling.count * nblk)
        .into_par_iter()
        .for_each(|task| {
            let img = task / (tiling.count * nblk);
            let tile = task / nblk % tiling.count;
            let co = task % nblk * cb..(task % nblk * cb + cb).min(cout);
            let (p0, plen) = tiling.range(tile, hw);
            with_scratch(cc * taps * tiling.ld, |col| {
                for c0 in (0..cin).step_by(cc) {
                    let c1 = (c0 + cc).min(cin);
                    let kc = (c1 - c0) * taps;
                    pack_cols(be, &x, img, c0..c1, taps, w, p0, plen, tiling.ld, col);
                    let start = match (c0, bias) {
                        (0, Some(b)) => Start::Bias(b[co.start..].as_ptr()),
                        (0, None) => Start::Zero,
                        _ => Start::Accumulate,
                    };
                    let prod = TileProduct {
                        wp,
                        co: co.clone(),
                        k0: c0 * taps,
                        kc,
                        col: &col[..kc * tiling.ld],
                        ld: tiling.ld,
                        plen,
                        // SAFETY: rows co, pixels [p0, p0+plen) of image img are this task's alone.
                        out: unsafe { out.add((img * cout + co.start) * hw + p0) },
                        ldo: hw,
                        start,
                        relu: relu && c1 == cin,
                    };
                    match be {
                        // SAFETY: the CPU has AVX-512F (Backend::detect) and `prod` is in bounds.
                        #[cfg(target_arch = "x86_64")]
                        Backend::Avx512 => unsafe { prod.run_avx512() },
                        Backend::Portable => unsafe { prod.run_portable() },
                    }
                }
            });
        });
}

/// out[co, p] (+)= Σ_k W[co, k0 + k] · col[k, p] for one tile and one K chunk.
struct TileProduct<'a> {
    wp: &'a Packed,
    co: Range<usize>,
    k0: usize,
    kc: usize,
    col: &'a [f32],
    ld: usize,
    plen: usize,
    /// Output row co.start at the tile's first pixel; rows `ldo` floats apart.
    out: *mut f32,
    ldo: usize,
    start: Start,
    relu: bool,
}

impl TileProduct<'_> {
    /// Through the `gemm` crate. Safety: `out` addresses co.len() rows of plen floats.
    unsafe fn run_portable(&self) {
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
            self.col.as_ptr(),
            1,
            self.ld as isize,
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

    /// Through the 8×48 AVX-512 micro-kernel, panel by panel (weights stay in L1 while the
    /// unfolded tile streams from L2). Safety: AVX-512F present; `out` as for run_portable.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self) {
        let k = self.wp.k;
        for cp in self.co.clone().step_by(MR) {
            let a = self.wp.data[(cp / MR * k + self.k0) * MR..].as_ptr();
            let rows = MR.min(self.co.end - cp);
            let start = match self.start {
                Start::Bias(b) => Start::Bias(b.add(cp - self.co.start)),
                s => s,
            };
            let out = self.out.add((cp - self.co.start) * self.ldo);
            for j in (0..self.plen).step_by(NR) {
                avx512::kernel_8x48(
                    self.kc,
                    a,
                    self.col[j..].as_ptr(),
                    self.ld,
                    out.add(j),
                    self.ldo,
                    rows,
                    NR.min(self.plen - j),
                    start,
                    self.relu,
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512F micro-kernels.
    use super::{Planes, Start, DW_MR, DW_NR, MR};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// super::pack_cols with one masked load and store per 16 pixels: the lanes whose source
    /// lies inside the plane are computed once per tap for the tile, then used for every
    /// channel. Safety: AVX-512F present; col holds chans.len()·taps rows of ld (a multiple of
    /// 16) floats.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_cols(
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
        let nv = ld / 16;
        // Per vector: lanes inside the tile, and lanes on the first/last row/column.
        let mut edges = vec![[0 as __mmask16; 5]; nv];
        let (mut oy, mut ox) = (p0 / w, p0 % w);
        for i in 0..plen {
            let bit = 1 << (i % 16);
            let e = &mut edges[i / 16];
            e[0] |= bit;
            e[1] |= if oy == 0 { bit } else { 0 };
            e[2] |= if oy + 1 == h { bit } else { 0 };
            e[3] |= if ox == 0 { bit } else { 0 };
            e[4] |= if ox + 1 == w { bit } else { 0 };
            ox += 1;
            if ox == w {
                (oy, ox) = (oy + 1, 0);
            }
        }
        // masks[t · nv + v]: lanes of vector v whose tap-t source lies inside the plane.
        let mut masks = vec![0 as __mmask16; taps * nv];
        for (t, m) in masks.chunks_exact_mut(nv).enumerate() {
            let (ky, kx) = if taps == 1 { (1, 1) } else { (t / 3, t % 3) };
            for (m, e) in m.iter_mut().zip(&edges) {
                let mut out = 0;
                out |= if ky == 0 { e[1] } else { 0 };
                out |= if ky == 2 { e[2] } else { 0 };
                out |= if kx == 0 { e[3] } else { 0 };
                out |= if kx == 2 { e[4] } else { 0 };
                *m = e[0] & !out;
            }
        }
        let dst = col.as_mut_ptr();
        for (r, c) in chans.enumerate() {
            let plane = x.plane(img, c).as_ptr();
            for t in 0..taps {
                let shift = if taps == 1 {
                    0
                } else {
                    (t / 3 * w + t % 3) as isize - w as isize - 1
                };
                // Masked-off lanes are never read, so the shifted pointer may leave the plane.
                let src = plane.wrapping_offset(p0 as isize + shift);
                let row = dst.add((r * taps + t) * ld);
                for (v, &m) in masks[t * nv..(t + 1) * nv].iter().enumerate() {
                    _mm512_storeu_ps(
                        row.add(16 * v),
                        _mm512_maskz_loadu_ps(m, src.wrapping_add(16 * v)),
                    );
                }
            }
        }
    }

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

    /// dyt[(co / 64 · tlen + p) · 64 + co % 64] = dy[co · hw + p0 + p] for co < cout, p < plen,
    /// by 16×16 blocks. Safety: AVX-512F present; dy holds cout rows of hw floats, dyt
    /// cout/64 (rounded up) panels of tlen × 64 floats, plen ≤ tlen.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn transpose_dy(
        dy: &[f32],
        hw: usize,
        cout: usize,
        p0: usize,
        plen: usize,
        dyt: &mut [f32],
        tlen: usize,
    ) {
        for co0 in (0..cout).step_by(16) {
            let out = dyt
                .as_mut_ptr()
                .add((co0 / DW_NR * tlen) * DW_NR + co0 % DW_NR);
            for pb in (0..plen).step_by(16) {
                let m = lane_mask(plen, pb);
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, r) in r.iter_mut().enumerate().take(cout - co0) {
                    *r = _mm512_maskz_loadu_ps(m, dy.as_ptr().add((co0 + i) * hw + p0 + pb));
                }
                transpose16(&mut r);
                for (j, &v) in r.iter().enumerate().take(plen - pb) {
                    _mm512_storeu_ps(out.add((pb + j) * DW_NR), v);
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

    /// c[i, p] = start + Σ_k a[k, i] · b[k, p] for i < rows, p < cols, then optional ReLU.
    /// a: packed panel [kc][MR]; b: kc rows of 48 readable floats, `ldb` apart; c: rows `ldc`
    /// apart. Safety: AVX-512F present, all pointers valid for those extents.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel_8x48(
        kc: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        start: Start,
        relu: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 3]; MR];
        for k in 0..kc {
            let bp = b.add(k * ldb);
            let b0 = _mm512_loadu_ps(bp);
            let b1 = _mm512_loadu_ps(bp.add(16));
            let b2 = _mm512_loadu_ps(bp.add(32));
            let ap = a.add(k * MR);
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*ap.add(i));
                acc[0] = _mm512_fmadd_ps(ai, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(ai, b1, acc[1]);
                acc[2] = _mm512_fmadd_ps(ai, b2, acc[2]);
            }
        }
        let masks = [lane_mask(cols, 0), lane_mask(cols, 16), lane_mask(cols, 32)];
        for (i, acc) in acc.iter().enumerate().take(rows) {
            let row = c.add(i * ldc);
            for (j, &mask) in masks.iter().enumerate() {
                let mut v = acc[j];
                v = match start {
                    Start::Zero => v,
                    Start::Bias(bias) => _mm512_add_ps(v, _mm512_set1_ps(*bias.add(i))),
                    Start::Accumulate => {
                        _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, row.add(16 * j)))
                    }
                };
                if relu {
                    v = _mm512_max_ps(v, _mm512_setzero_ps());
                }
                _mm512_mask_storeu_ps(row.add(16 * j), mask, v);
            }
        }
    }

    /// c[i, j] += Σ_{p < steps} a[i][p] · b[p, j] for i < rows, j < 64. a: DW_MR row pointers
    /// readable for `steps` floats; b: [steps][64]; c: rows `ldc` apart. Safety: AVX-512F
    /// present, pointers valid for those extents.
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
    let partials: Vec<(Vec<f64>, Vec<f64>)> = (0..nci * nrange)
        .into_par_iter()
        .map(|task| {
            let chans = task / nrange * cc..(task / nrange * cc + cc).min(cin);
            let kc = chans.len() * taps;
            let mut acc = vec![0.0f64; kc * cout];
            let mut dbacc = vec![0.0f64; if chans.start == 0 { cout } else { 0 }];
            let col_len = (kc + 1) * tiling.ld;
            let dyt_len = ldc * tiling.len;
            with_scratch(col_len + dyt_len + kc * ldc, |scratch| {
                let (col, rest) = scratch.split_at_mut(col_len);
                let (dyt, stage) = rest.split_at_mut(dyt_len);
                col[kc * tiling.ld..].fill(0.0);
                dyt.fill(0.0);
                stage.fill(0.0);
                let range = task % nrange * per..(task % nrange * per + per).min(items);
                for item in range.clone() {
                    let (img, t) = (item / tiling.count, item % tiling.count);
                    let (p0, plen) = tiling.range(t, hw);
                    pack_cols(
                        be,
                        &x,
                        img,
                        chans.clone(),
                        taps,
                        w,
                        p0,
                        plen,
                        tiling.ld,
                        col,
                    );
                    let dyi = &dy[img * cout * hw..(img + 1) * cout * hw];
                    let tile = DwTile {
                        dy: dyi,
                        hw,
                        cout,
                        p0,
                        plen,
                        col,
                        kc,
                        ld: tiling.ld,
                    };
                    match be {
                        // SAFETY: the CPU has AVX-512F (Backend::detect).
                        #[cfg(target_arch = "x86_64")]
                        Backend::Avx512 => unsafe { tile.run_avx512(dyt, tiling.len, stage, ldc) },
                        Backend::Portable => tile.run_portable(stage, ldc),
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

/// stage[k, co] += Σ_{p < plen} col[k, p] · dy[co, p0 + p] for one tile (stage rows ldc apart).
struct DwTile<'a> {
    /// One image of dy, [cout, hw].
    dy: &'a [f32],
    hw: usize,
    cout: usize,
    p0: usize,
    plen: usize,
    /// kc unfolded rows `ld` apart, then one row of zeros.
    col: &'a [f32],
    kc: usize,
    ld: usize,
}

impl DwTile<'_> {
    fn run_portable(&self, stage: &mut [f32], ldc: usize) {
        // SAFETY: stage is [kc, ldc]; col holds kc rows of plen floats; dy cout rows of hw.
        unsafe {
            gemm::gemm(
                self.kc,
                self.cout,
                self.plen,
                stage.as_mut_ptr(),
                1,
                ldc as isize,
                true,
                self.col.as_ptr(),
                1,
                self.ld as isize,
                self.dy[self.p0..].as_ptr(),
                self.hw as isize,
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

    /// Transposes the dy tile into `dyt` ([cout/64 panels][tlen][64], padding lanes zero),
    /// then runs the 6×64 micro-kernel panel by panel: a panel of dyᵀ stays in L1 while the
    /// unfolded rows stream past. Safety: AVX-512F present.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_avx512(&self, dyt: &mut [f32], tlen: usize, stage: &mut [f32], ldc: usize) {
        avx512::transpose_dy(self.dy, self.hw, self.cout, self.p0, self.plen, dyt, tlen);
        let zero = self.col[self.kc * self.ld..].as_ptr();
        for panel in 0..ldc / DW_NR {
            let b = dyt[panel * tlen * DW_NR..].as_ptr();
            for kp in (0..self.kc).step_by(DW_MR) {
                let mut a = [zero; DW_MR];
                for (i, p) in a.iter_mut().enumerate().take(self.kc - kp) {
                    *p = self.col[(kp + i) * self.ld..].as_ptr();
                }
                let c = stage[kp * ldc + panel * DW_NR..].as_mut_ptr();
                avx512::kernel_6x64(self.plen, &a, b, c, ldc, DW_MR.min(self.kc - kp));
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
    forward_impl(
        Backend::detect(),
        &BLOCKING,
        &[(x, xd.c)],
        xd,
        9,
        w,
        b,
        cout,
        false,
        y,
    );
}

/// y = relu(conv3x3(x; w, b)), for inference with BatchNorm folded into w and b by the caller.
pub fn conv3x3_relu_forward(x: &[f32], xd: Dims, w: &[f32], b: &[f32], cout: usize, y: &mut [f32]) {
    forward_impl(
        Backend::detect(),
        &BLOCKING,
        &[(x, xd.c)],
        xd,
        9,
        w,
        b,
        cout,
        true,
        y,
    );
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
    let be = Backend::detect();
    backward_impl(
        be,
        &BLOCKING,
        &[(x, xd.c)],
        xd,
        9,
        w,
        dy,
        cout,
        &mut [dx],
        dw,
        db,
    );
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
    let be = Backend::detect();
    backward_impl(
        be,
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
    if m == 0 || fin == 0 || fout == 0 {
        dw.fill(0.0);
        db.fill(0.0);
        if let Some(dx) = dx {
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
    for (j, d) in db.iter_mut().enumerate() {
        *d = (0..m).map(|r| dy[r * fout + j] as f64).sum::<f64>() as f32;
    }
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

    const FORWARD_SHAPES: [ConvShape; 7] = [
        (1, &[1], 3, 5, 7),
        (2, &[3], 4, 16, 16),
        (3, &[5], 3, 7, 5),
        (1, &[1], 64, 9, 13),
        (2, &[20], 9, 9, 13),
        (2, &[7, 6], 10, 6, 11),
        (1, &[1], 5, 24, 32),
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

    const BACKWARD_SHAPES: [ConvShape; 4] = [
        (2, &[3], 4, 5, 7),
        (1, &[1], 3, 6, 4),
        (2, &[2, 3], 9, 9, 13),
        (3, &[4], 6, 1, 5),
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
                conv3x3_backward_concat(
                    &parts,
                    d,
                    &wt,
                    &r,
                    cout,
                    &mut [None, Some(&mut dx1)],
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
        for (m, fin, fout) in [(1, 1, 1), (3, 5, 2), (70, 9, 131), (130, 17, 3)] {
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
