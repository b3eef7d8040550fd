//! The weight gradient of the convolutions: dw and db summed over tiles in a fixed order
//! (f32 tile products into f64 partials), bit-reproducible whatever the thread count.

#[cfg(target_arch = "x86_64")]
use super::avx512;
use super::pack::{pack_cols, pack_padded_rows, Planes};
use super::tiling::{row_stride, with_scratch, Tiling};
use super::{Backend, Blocking, DW_MR, DW_NR};
use crate::cpu::ops::matmul::{matmul, Operand, Parallelism};
use rayon::prelude::*;
use std::ops::Range;

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
pub(super) fn conv_weight_grad(
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
        matmul(
            (kc, cout, plen),
            (stage.as_mut_ptr(), ldc),
            true,
            Operand::rows(col.as_ptr(), ld),
            Operand::transposed(dy[p0..].as_ptr(), hw),
            Parallelism::None,
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
