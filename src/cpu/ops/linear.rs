//! Linear (fully connected) layers of the CPU engine, forward and backward: GEMMs through the
//! gemm crate over blocks of rows, each entry summed in a fixed order.

use super::matmul::{matmul, Operand, Parallelism};
use rayon::prelude::*;

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
                matmul(
                    (yb.len() / fout, fout, fin),
                    (yb.as_mut_ptr(), fout),
                    true,
                    Operand::rows(xb.as_ptr(), fin),
                    Operand::transposed(w.as_ptr(), fin),
                    Parallelism::None,
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
                    matmul(
                        (dxb.len() / fin, fin, fout),
                        (dxb.as_mut_ptr(), fin),
                        false,
                        Operand::rows(dyb.as_ptr(), fout),
                        Operand::rows(w.as_ptr(), fin),
                        Parallelism::None,
                    );
                }
            });
    }
    dw.par_chunks_mut(LINEAR_ROWS * fin)
        .enumerate()
        .for_each(|(blk, dwb)| {
            // SAFETY: dwb is rows j0.. of dw = dyᵀ [fout, m] · x [m, fin].
            unsafe {
                matmul(
                    (dwb.len() / fin, fin, m),
                    (dwb.as_mut_ptr(), fin),
                    false,
                    Operand::transposed(dy[blk * LINEAR_ROWS..].as_ptr(), fout),
                    Operand::rows(x.as_ptr(), fin),
                    Parallelism::None,
                );
            }
        });
}
