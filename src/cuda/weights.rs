//! Host-side weight preparation: range-checked fp16 repacking PyTorch [out][in][3][3] conv weights into the kernels' [cout][9][cin] fp16 layout
//! with channels padded to multiples of 8.

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

/// `v` padded with zeros to `len` values.
pub fn padded(v: &[f32], len: usize) -> Vec<f32> {
    let mut out = v.to_vec();
    out.resize(len.max(v.len()), 0.0);
    out
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
