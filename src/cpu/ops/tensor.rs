//! Elementwise and layout operators: ReLU and the [n,c,s]↔[n,s,c] transpose.

use rayon::prelude::*;

/// Elements per rayon task for the elementwise operators.
const ELEM_CHUNK: usize = 1 << 14;
/// Side of the square tiles of the transpose (keeps both reads and writes in cache).
const TILE: usize = 32;

/// y = max(x, 0).
pub fn relu_forward(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "relu_forward: x and y differ in length");
    y.par_chunks_mut(ELEM_CHUNK)
        .zip(x.par_chunks(ELEM_CHUNK))
        .for_each(|(yc, xc)| {
            for (yv, &xv) in yc.iter_mut().zip(xc) {
                *yv = if xv > 0.0 { xv } else { 0.0 };
            }
        });
}

/// dx = dy where y > 0, else 0 (y is the forward's output).
pub fn relu_backward(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert_eq!(
        y.len(),
        dy.len(),
        "relu_backward: y and dy differ in length"
    );
    assert_eq!(
        y.len(),
        dx.len(),
        "relu_backward: y and dx differ in length"
    );
    dx.par_chunks_mut(ELEM_CHUNK)
        .zip(y.par_chunks(ELEM_CHUNK).zip(dy.par_chunks(ELEM_CHUNK)))
        .for_each(|(dxc, (yc, dyc))| {
            for ((d, &yv), &g) in dxc.iter_mut().zip(yc).zip(dyc) {
                *d = if yv > 0.0 { g } else { 0.0 };
            }
        });
}

/// Transpose [n, c, s] → [n, s, c]: y[i, p, k] = x[i, k, p]. Called with (c, s) swapped it
/// transposes back, so it is also its own backward.
pub fn transpose_cs(x: &[f32], n: usize, c: usize, s: usize, y: &mut [f32]) {
    assert_eq!(x.len(), n * c * s, "transpose_cs: x is not [n, c, s]");
    assert_eq!(y.len(), n * c * s, "transpose_cs: bad y length");
    if y.is_empty() {
        return;
    }
    y.par_chunks_mut(c * s)
        .zip(x.par_chunks(c * s))
        .for_each(|(yi, xi)| {
            // Output rows p0..p0+TILE of one image form one task.
            yi.par_chunks_mut(c * TILE)
                .enumerate()
                .for_each(|(blk, yb)| {
                    let p0 = blk * TILE;
                    let rows = yb.len() / c;
                    for k0 in (0..c).step_by(TILE) {
                        let k1 = (k0 + TILE).min(c);
                        for dp in 0..rows {
                            let yrow = &mut yb[dp * c..(dp + 1) * c];
                            for k in k0..k1 {
                                yrow[k] = xi[k * s + p0 + dp];
                            }
                        }
                    }
                });
        });
}

/// Helpers shared by the operator tests: seeded random buffers and error measures.
#[cfg(test)]
pub(crate) mod test_support {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    pub fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// Uniform values in [lo, hi).
    pub fn rand_vec(rng: &mut ChaCha8Rng, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| rng.gen_range(lo..hi)).collect()
    }

    pub fn to_f64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    /// max |a − b| (in f64).
    pub fn max_abs_diff<A: Copy + Into<f64>, B: Copy + Into<f64>>(a: &[A], b: &[B]) -> f64 {
        assert_eq!(a.len(), b.len(), "max_abs_diff: length mismatch");
        (a.iter().zip(b))
            .map(|(&x, &y)| (x.into() - y.into()).abs())
            .fold(0.0, f64::max)
    }

    /// max |a − b| / max |b| (b the reference; an all-zero reference gives the absolute error).
    pub fn rel_err<T: Copy + Into<f64>>(a: &[T], b: &[f64]) -> f64 {
        let diff = max_abs_diff(a, b);
        let scale = b.iter().map(|y| y.abs()).fold(0.0, f64::max);
        if scale > 0.0 {
            diff / scale
        } else {
            diff
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;

    #[test]
    fn transpose_matches_index_loop_and_inverts() {
        let mut g = rng(3);
        for &(n, c, s) in &[(2, 3, 5), (1, 70, 45), (3, 1, 33), (2, 40, 1)] {
            let x = rand_vec(&mut g, n * c * s, -1.0, 1.0);
            let mut y = vec![0.0; x.len()];
            transpose_cs(&x, n, c, s, &mut y);
            let mut mismatches = 0;
            for i in 0..n {
                for k in 0..c {
                    for p in 0..s {
                        mismatches += usize::from(y[(i * s + p) * c + k] != x[(i * c + k) * s + p]);
                    }
                }
            }
            let mut back = vec![0.0; x.len()];
            transpose_cs(&y, n, s, c, &mut back);
            let roundtrip = back.iter().zip(&x).filter(|(a, b)| a != b).count();
            println!(
                "transpose {n}x{c}x{s}: {mismatches} mismatches, {roundtrip} after round trip"
            );
            assert_eq!(mismatches, 0);
            assert_eq!(roundtrip, 0);
        }
    }
}
