//! The AVX-512F micro-kernels of the convolutions (forward 8×48, weight gradient 6×64) and the
//! 16×16 transposes that feed them.
use super::forward::Start;
use super::{DW_MR, DW_NR, MR};
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
                Start::Accumulate => _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, row.add(16 * j))),
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
