//! Host-side weight preparation: range-checked fp16 repacking PyTorch [out][in][3][3] conv weights into the kernels' [cout][9][cin] fp16 layout
//! with channels padded to multiples of 8, the sub-pixel up_conv's composite weights, and the
//! MIL concepts' fp16 rows.

use anyhow::{ensure, Result};
use half::f16;

/// `c` rounded up to a multiple of 8 (NHWC channel padding).
pub fn pad8(c: usize) -> usize {
    c.div_ceil(8) * 8
}

/// Repacks [cout][cin][3][3] fp32 weights, whose input channels are the concatenation of
/// tensors with `parts` real channels each, into fp16 [cout_pad][9][Σ pad8(part)]; the
/// k index of channel c of part j at tap t is t·Σpad + (Σ_{i<j} pad8(part_i)) + c.
pub fn pack_conv3x3(w: &[f32], cout: usize, parts: &[usize]) -> Result<Vec<f16>> {
    let cin: usize = parts.iter().sum();
    ensure!(
        w.len() == cout * cin * 9,
        "conv weight has {} values, expected {}",
        w.len(),
        cout * cin * 9
    );
    let cin_pad: usize = parts.iter().map(|&p| pad8(p)).sum();
    let max = w.iter().fold(0f32, |a, v| a.max(v.abs()));
    ensure!(max < 65504.0, "a folded conv weight ({max}) overflows fp16");
    let mut out = vec![f16::ZERO; pad8(cout) * 9 * cin_pad];
    for o in 0..cout {
        let (mut real0, mut pad0) = (0, 0);
        for &part in parts {
            for c in 0..part {
                for t in 0..9 {
                    out[(o * 9 + t) * cin_pad + pad0 + c] =
                        f16::from_f32(w[(o * cin + real0 + c) * 9 + t]);
                }
            }
            real0 += part;
            pad0 += pad8(part);
        }
    }
    Ok(out)
}

/// P_py[a][d] of kernels/conv_up.cu in quarters: the weight of high-res tap d on low-res
/// offset a for output parity py, 0 for the tap an `edge` variant drops (d = 0 for py = 0,
/// d = 2 for py = 1: it falls on the conv's zero padding at the first resp. last row).
fn up_quarters(parity: usize, edge: bool, a: usize, d: usize) -> i32 {
    const P: [[[i32; 3]; 3]; 2] = [
        [[3, 1, 0], [1, 3, 3], [0, 0, 1]],
        [[1, 0, 0], [3, 3, 1], [0, 1, 3]],
    ];
    if edge && d == 2 * parity {
        0
    } else {
        P[parity][a][d]
    }
}

/// The sub-pixel up_conv's composite weights (derivation: kernels/conv_up.cu) from fp32
/// [cout][cin][3][3] weights: fp16 [4 variants 2·vy + vx][4·pad8(cout)][9][pad8(cin)], row
/// q·pad8(cout) + o for parity q = 2·py + px, value Σ_{d,e} (P_py[a][d]·P_px[b][e]/16)·w[o][c][d][e]
/// summed d-major in f64 (every product exact) and rounded once to fp16, as the device
/// pack_conv_up. Rounding the composite (≤ 2^-11 relative) replaces rounding the original
/// weights; its error on an output is at most 2^-11·Σ|composite·x| ≤ 2^-11·(|w| ∗ upsample|x|).
pub fn pack_conv_up(w: &[f32], cout: usize, cin: usize) -> Result<Vec<f16>> {
    ensure!(
        w.len() == cout * cin * 9,
        "conv weight has {} values, expected {}",
        w.len(),
        cout * cin * 9
    );
    let (cp, kp) = (pad8(cout), pad8(cin));
    let mut out = vec![f16::ZERO; 16 * cp * 9 * kp];
    let mut max = 0f64;
    for var in 0..4 {
        for q in 0..4 {
            let (py, px, vy, vx) = (q >> 1, q & 1, var >> 1 == 1, var & 1 == 1);
            for o in 0..cout {
                for tap in 0..9 {
                    let (a, b) = (tap / 3, tap % 3);
                    for c in 0..cin {
                        let wk = &w[(o * cin + c) * 9..][..9];
                        let mut s = 0f64;
                        for d in 0..3 {
                            let qy = up_quarters(py, vy, a, d);
                            for e in 0..3 {
                                let qx = up_quarters(px, vx, b, e);
                                s += f64::from(qy * qx) / 16.0 * f64::from(wk[d * 3 + e]);
                            }
                        }
                        max = max.max(s.abs());
                        out[(((var * 4 + q) * cp + o) * 9 + tap) * kp + c] = f16::from_f64(s);
                    }
                }
            }
        }
    }
    ensure!(
        max < 65504.0,
        "a composite up_conv weight ({max}) overflows fp16"
    );
    Ok(out)
}

/// `v` padded with zeros to `len` values.
pub fn padded(v: &[f32], len: usize) -> Vec<f32> {
    let mut out = v.to_vec();
    out.resize(len.max(v.len()), 0.0);
    out
}

/// Columns of a [`pack_concepts`] row for `c` input channels: a multiple of 32 (the k-tiles of
/// `mil_concepts_mma`).
pub fn concepts_row(c: usize) -> usize {
    c.next_multiple_of(32)
}

/// A Linear weight [k][c] as fp16 rows zero-padded to [`concepts_row`] columns.
pub fn pack_concepts(w: &[f32], k: usize, c: usize) -> Result<Vec<f16>> {
    ensure!(
        w.len() == k * c,
        "concept weight has {} values, expected {}",
        w.len(),
        k * c
    );
    let max = w.iter().fold(0f32, |a, v| a.max(v.abs()));
    ensure!(max < 65504.0, "a concept weight ({max}) overflows fp16");
    let kc = concepts_row(c);
    let mut out = vec![f16::ZERO; k * kc];
    for (row, src) in out.chunks_mut(kc).zip(w.chunks(c)) {
        for (o, &v) in row.iter_mut().zip(src) {
            *o = f16::from_f32(v);
        }
    }
    Ok(out)
}

/// A [rows][cols] matrix transposed to [cols][rows].
pub fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = m[r * cols + c];
        }
    }
    out
}
