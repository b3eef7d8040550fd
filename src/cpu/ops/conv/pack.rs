//! Input and weight layouts of the convolutions: the concatenated input planes, packed weight
//! panels, and the unfolded (im2col) and padded-row tiles the inner products read.

use rayon::prelude::*;
use std::ops::Range;

/// An NCHW input given as the channel concatenation of parts `[n, c_i, h, w]`.
#[derive(Clone, Copy)]
pub(super) struct Planes<'a> {
    pub(super) parts: &'a [(&'a [f32], usize)],
    pub(super) hw: usize,
}

impl<'a> Planes<'a> {
    pub(super) fn channels(&self) -> usize {
        self.parts.iter().map(|p| p.1).sum()
    }

    /// The h·w plane of channel `c` (of the concatenation) of image `img`.
    pub(super) fn plane(&self, img: usize, c: usize) -> &'a [f32] {
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
pub(super) struct Packed {
    pub(super) data: Vec<f32>,
    pub(super) rows: usize,
    pub(super) k: usize,
}

impl Packed {
    pub(super) fn new(
        rows: usize,
        k: usize,
        mr: usize,
        get: impl Fn(usize, usize) -> f32 + Sync,
    ) -> Packed {
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

/// Unfolds channels `chans` of image `img` under pixels [p0, p0+plen) into `col` (the
/// portable backend's im2col tile): row (c − chans.start)·taps + t holds tap t, `ld` floats
/// apart, zero-padded from plen to ld.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_cols(
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

/// Copies each channel of `chans` (image `img`) into one row of `rows` (`ldr` apart): the
/// image laid out with rows of w + 2·pad floats (`pad` zero columns each side), positions
/// [qlo, qlo + len) of that layout (qlo may be negative), zero outside the image. With pad 0
/// this is the flat plane; with pad 1 every 3×3 tap of a pixel is that pixel's position shifted.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_padded_rows(
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
