//! 2×2 max-pool with stride 2, forward and backward (gradient to the first maximum).

use super::Dims;
use rayon::prelude::*;

/// Panics unless h and w are even.
fn check_even(xd: Dims) {
    assert!(
        xd.h.is_multiple_of(2) && xd.w.is_multiple_of(2),
        "maxpool2x2: h and w must be even, got {}x{}",
        xd.h,
        xd.w
    );
}

/// y [n, c, h/2, w/2] = max over each 2×2 window of x [xd] (h, w even). argmax[i] ∈ 0..4 is
/// the position of the first maximum in row-major window order (top-left, top-right,
/// bottom-left, bottom-right), for the backward. Panics if h or w is odd or a buffer length
/// does not match.
pub fn maxpool2x2_forward(x: &[f32], xd: Dims, y: &mut [f32], argmax: &mut [u8]) {
    check_even(xd);
    let (oh, ow) = (xd.h / 2, xd.w / 2);
    let olen = xd.n * xd.c * oh * ow;
    assert_eq!(
        x.len(),
        xd.len(),
        "maxpool2x2_forward: x does not match its dims"
    );
    assert_eq!(y.len(), olen, "maxpool2x2_forward: bad y length");
    assert_eq!(argmax.len(), olen, "maxpool2x2_forward: bad argmax length");
    if olen == 0 {
        return;
    }
    let w = xd.w;
    y.par_chunks_mut(oh * ow)
        .zip(argmax.par_chunks_mut(oh * ow))
        .zip(x.par_chunks(xd.hw()))
        .for_each(|((yp, ap), xp)| {
            for oy in 0..oh {
                let top = &xp[2 * oy * w..(2 * oy + 1) * w];
                let bottom = &xp[(2 * oy + 1) * w..(2 * oy + 2) * w];
                for ox in 0..ow {
                    let win = [
                        top[2 * ox],
                        top[2 * ox + 1],
                        bottom[2 * ox],
                        bottom[2 * ox + 1],
                    ];
                    let mut best = 0;
                    for (j, &v) in win.iter().enumerate().skip(1) {
                        if v > win[best] {
                            best = j;
                        }
                    }
                    yp[oy * ow + ox] = win[best];
                    ap[oy * ow + ox] = best as u8;
                }
            }
        });
}

/// dx [xd] = dy at the argmax position of each 2×2 window, 0 elsewhere.
pub fn maxpool2x2_backward(dy: &[f32], xd: Dims, argmax: &[u8], dx: &mut [f32]) {
    check_even(xd);
    let (oh, ow) = (xd.h / 2, xd.w / 2);
    let olen = xd.n * xd.c * oh * ow;
    assert_eq!(dy.len(), olen, "maxpool2x2_backward: bad dy length");
    assert_eq!(argmax.len(), olen, "maxpool2x2_backward: bad argmax length");
    assert_eq!(
        dx.len(),
        xd.len(),
        "maxpool2x2_backward: dx does not match its dims"
    );
    if olen == 0 {
        return;
    }
    let w = xd.w;
    dx.par_chunks_mut(xd.hw())
        .zip(dy.par_chunks(oh * ow).zip(argmax.par_chunks(oh * ow)))
        .for_each(|(dxp, (dyp, ap))| {
            dxp.fill(0.0);
            for oy in 0..oh {
                for ox in 0..ow {
                    let a = ap[oy * ow + ox] as usize;
                    let (r, col) = (2 * oy + a / 2, 2 * ox + a % 2);
                    dxp[r * w + col] = dyp[oy * ow + ox];
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maxpool_ties_pick_first_maximum() {
        // One 4×4 plane, four windows: all equal; tie top-right/bottom-left; unique max
        // bottom-right; tie top-left/bottom-right.
        let x = [
            1.0, 1.0, 0.0, 5.0, //
            1.0, 1.0, 5.0, 2.0, //
            -3.0, -2.0, 7.0, 0.0, //
            -4.0, -1.0, 6.0, 7.0,
        ];
        let xd = Dims::new(1, 1, 4, 4);
        let mut y = [0.0; 4];
        let mut am = [9u8; 4];
        maxpool2x2_forward(&x, xd, &mut y, &mut am);
        let dy = [10.0, 20.0, 30.0, 40.0];
        let mut dx = [f32::NAN; 16];
        maxpool2x2_backward(&dy, xd, &am, &mut dx);
        let want_dx = [
            10.0, 0.0, 0.0, 20.0, //
            0.0, 0.0, 0.0, 0.0, //
            0.0, 0.0, 40.0, 0.0, //
            0.0, 30.0, 0.0, 0.0,
        ];
        println!("maxpool ties: y {y:?}, argmax {am:?}");
        assert_eq!(y, [1.0, 5.0, -1.0, 7.0]);
        assert_eq!(am, [0, 1, 3, 0]);
        assert_eq!(dx, want_dx);
    }
}
