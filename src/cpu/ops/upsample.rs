//! Bilinear ×2 upsampling as PyTorch's align_corners=False `F.interpolate`, forward and backward.

use super::Dims;
use rayon::prelude::*;

/// Source taps of one output coordinate along one axis: the two neighbours and their weights.
#[derive(Clone, Copy)]
struct Taps {
    i0: usize,
    i1: usize,
    w0: f32,
    w1: f32,
}

/// Taps of the 2·len outputs of an axis of length len: source = (dst + 0.5)/2 − 0.5, clamped
/// at 0 below; the upper neighbour is clamped at the last index.
fn axis_taps(len: usize) -> Vec<Taps> {
    (0..2 * len)
        .map(|dst| {
            let src = ((dst as f32 + 0.5) * 0.5 - 0.5).max(0.0);
            let i0 = src as usize;
            let i1 = if i0 + 1 < len { i0 + 1 } else { i0 };
            let w1 = src - i0 as f32;
            Taps {
                i0,
                i1,
                w0: 1.0 - w1,
                w1,
            }
        })
        .collect()
}

/// y [n, c, 2h, 2w] = bilinear ×2 upsampling of x [xd].
pub fn upsample2x_forward(x: &[f32], xd: Dims, y: &mut [f32]) {
    assert_eq!(
        x.len(),
        xd.len(),
        "upsample2x_forward: x does not match its dims"
    );
    assert_eq!(y.len(), 4 * xd.len(), "upsample2x_forward: bad y length");
    if y.is_empty() {
        return;
    }
    let (rows, cols) = (axis_taps(xd.h), axis_taps(xd.w));
    let w = xd.w;
    y.par_chunks_mut(4 * xd.hw())
        .zip(x.par_chunks(xd.hw()))
        .for_each(|(yp, xp)| {
            for (yrow, r) in yp.chunks_mut(2 * w).zip(&rows) {
                let top = &xp[r.i0 * w..(r.i0 + 1) * w];
                let bottom = &xp[r.i1 * w..(r.i1 + 1) * w];
                for (v, c) in yrow.iter_mut().zip(&cols) {
                    *v = r.w0 * (c.w0 * top[c.i0] + c.w1 * top[c.i1])
                        + r.w1 * (c.w0 * bottom[c.i0] + c.w1 * bottom[c.i1]);
                }
            }
        });
}

/// dx [xd] = adjoint of [`upsample2x_forward`] applied to dy [n, c, 2h, 2w]: every output's
/// gradient is scattered to its four taps with their weights, in a fixed order.
pub fn upsample2x_backward(dy: &[f32], xd: Dims, dx: &mut [f32]) {
    assert_eq!(dy.len(), 4 * xd.len(), "upsample2x_backward: bad dy length");
    assert_eq!(
        dx.len(),
        xd.len(),
        "upsample2x_backward: dx does not match its dims"
    );
    if dx.is_empty() {
        return;
    }
    let (rows, cols) = (axis_taps(xd.h), axis_taps(xd.w));
    let w = xd.w;
    dx.par_chunks_mut(xd.hw())
        .zip(dy.par_chunks(4 * xd.hw()))
        .for_each(|(dxp, dyp)| {
            dxp.fill(0.0);
            for (dyrow, r) in dyp.chunks(2 * w).zip(&rows) {
                for (&g, c) in dyrow.iter().zip(&cols) {
                    dxp[r.i0 * w + c.i0] += r.w0 * c.w0 * g;
                    dxp[r.i0 * w + c.i1] += r.w0 * c.w1 * g;
                    dxp[r.i1 * w + c.i0] += r.w1 * c.w0 * g;
                    dxp[r.i1 * w + c.i1] += r.w1 * c.w1 * g;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ops::tensor::test_support::max_abs_diff;

    #[test]
    fn upsample_known_2x2_matches_pytorch_formula() {
        let x = [1.0, 2.0, 3.0, 4.0];
        let xd = Dims::new(1, 1, 2, 2);
        let mut y = [0.0f32; 16];
        upsample2x_forward(&x, xd, &mut y);
        // Rows of the output take input rows with weights (1,0), (.75,.25), (.25,.75), (0,1):
        // row values are [1,2] → [1, 1.25, 1.75, 2], and the row weights mix [1,2] and [3,4].
        let want = [
            1.0, 1.25, 1.75, 2.0, //
            1.5, 1.75, 2.25, 2.5, //
            2.5, 2.75, 3.25, 3.5, //
            3.0, 3.25, 3.75, 4.0,
        ];
        let err = max_abs_diff(&y, &want);
        println!("upsample 2x2 → 4x4: max error {err:.3e}, y = {y:?}");
        assert_eq!(err, 0.0);
    }

    #[test]
    fn upsample_of_constant_is_constant() {
        let xd = Dims::new(2, 3, 5, 7);
        let x = vec![0.3f32; xd.len()];
        let mut y = vec![0.0; 4 * xd.len()];
        upsample2x_forward(&x, xd, &mut y);
        let err = y.iter().map(|v| (v - 0.3).abs()).fold(0.0f32, f32::max);
        println!("upsample constant: max deviation {err:.3e}");
        assert!(err <= 1e-7, "constant not preserved: {err}");
    }
}
