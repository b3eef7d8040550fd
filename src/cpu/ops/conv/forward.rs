//! The forward drivers of the convolutions: tiles of pixels × blocks of output channels over
//! rayon tasks, K in chunks, and the tile products through the gemm crate or the AVX-512 kernels.

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::pack::{pack_cols, pack_padded_rows, Packed, Planes};
use super::tiling::{block_size, row_stride, with_scratch, SharedMut, Tiling};
use super::{Backend, Blocking, MR, NR};
use crate::cpu::ops::matmul::{matmul, Operand, Parallelism};
use rayon::prelude::*;
use std::ops::Range;

/// How a tile product starts its sums.
#[derive(Clone, Copy)]
pub(super) enum Start {
    Zero,
    /// The bias of the tile's first output channel.
    Bias(*const f32),
    /// Add to what is already in the output (a later K chunk).
    Accumulate,
}

impl Start {
    /// The start of the K chunk from input channel `c0` for output rows from `co0`: the bias
    /// (or zero) on the first chunk, accumulation on the later ones.
    pub(super) fn for_chunk(c0: usize, bias: Option<&[f32]>, co0: usize) -> Start {
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
pub(super) fn conv_forward(
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
        let wp = &self.wp.data[self.co.start * self.wp.k + self.k0..];
        matmul(
            (m, self.plen, self.kc),
            (self.out, self.ldo),
            true,
            Operand::rows(wp.as_ptr(), self.wp.k),
            Operand::rows(col.as_ptr(), ld),
            Parallelism::None,
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
