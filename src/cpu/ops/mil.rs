//! Global contrast pooling (GCP) over the instances of each multi-instance bag, forward and backward.

use crate::config::GcpMode;
use rayon::prelude::*;

/// Panics with a clear message if a bag is empty or reaches past the last row.
fn check_bags(bags: &[(usize, usize)], rows: usize, what: &str) {
    for (b, &(start, len)) in bags.iter().enumerate() {
        assert!(len > 0, "{what}: bag {b} has no instances");
        assert!(
            start + len <= rows,
            "{what}: bag {b} (rows {start}..{}) reaches past the {rows} rows of x",
            start + len
        );
    }
}

/// Pools x [rows, k] over the instances of each bag: bag b is rows bags[b].0 ..
/// bags[b].0 + bags[b].1. out [bags.len(), k] is max − mean, max or mean per concept
/// (mode); argmax [bags.len(), k] is the absolute row of the first maximum (in every mode).
/// Means are accumulated in f64. Panics if a bag is empty or out of range.
pub fn gcp_forward(
    x: &[f32],
    k: usize,
    bags: &[(usize, usize)],
    mode: GcpMode,
    out: &mut [f32],
    argmax: &mut [usize],
) {
    assert!(k > 0, "gcp_forward: k must be positive");
    assert!(x.len().is_multiple_of(k), "gcp_forward: x is not [rows, k]");
    check_bags(bags, x.len() / k, "gcp_forward");
    assert_eq!(out.len(), bags.len() * k, "gcp_forward: bad out length");
    assert_eq!(
        argmax.len(),
        bags.len() * k,
        "gcp_forward: bad argmax length"
    );
    out.par_chunks_mut(k)
        .zip(argmax.par_chunks_mut(k))
        .zip(bags.par_iter())
        .for_each(|((o, am), &(start, len))| {
            let mut sum = vec![0.0f64; k];
            let mut best = x[start * k..(start + 1) * k].to_vec();
            am.fill(start);
            for row in start..start + len {
                let xr = &x[row * k..(row + 1) * k];
                for j in 0..k {
                    sum[j] += xr[j] as f64;
                    if xr[j] > best[j] {
                        best[j] = xr[j];
                        am[j] = row;
                    }
                }
            }
            for j in 0..k {
                let mean = sum[j] / len as f64;
                o[j] = match mode {
                    GcpMode::MaxMinusMean => (best[j] as f64 - mean) as f32,
                    GcpMode::Max => best[j],
                    GcpMode::Mean => mean as f32,
                };
            }
        });
}

/// dx [rows, k] = gradient of Σ dout⊙out through [`gcp_forward`]: per bag of n instances,
/// MaxMinusMean gives [row = argmax] − 1/n, Max gives [row = argmax], Mean gives 1/n, each
/// times dout. Rows outside every bag get 0. Panics if bags overlap, are empty or out of range.
pub fn gcp_backward(
    dout: &[f32],
    k: usize,
    bags: &[(usize, usize)],
    mode: GcpMode,
    argmax: &[usize],
    dx: &mut [f32],
) {
    assert!(k > 0, "gcp_backward: k must be positive");
    assert!(
        dx.len().is_multiple_of(k),
        "gcp_backward: dx is not [rows, k]"
    );
    let rows = dx.len() / k;
    check_bags(bags, rows, "gcp_backward");
    assert_eq!(dout.len(), bags.len() * k, "gcp_backward: bad dout length");
    assert_eq!(
        argmax.len(),
        bags.len() * k,
        "gcp_backward: bad argmax length"
    );
    dx.fill(0.0);
    // Cut dx into one disjoint slice per bag (in row order) so the bags run in parallel.
    let mut order: Vec<usize> = (0..bags.len()).collect();
    order.sort_by_key(|&b| bags[b].0);
    let mut parts: Vec<(usize, &mut [f32])> = Vec::with_capacity(bags.len());
    let mut rest: &mut [f32] = dx;
    let mut consumed = 0;
    for &b in &order {
        let (start, len) = bags[b];
        assert!(
            start >= consumed,
            "gcp_backward: bag {b} (rows {start}..{}) overlaps another bag",
            start + len
        );
        let (_, tail) = std::mem::take(&mut rest).split_at_mut((start - consumed) * k);
        let (mine, tail) = tail.split_at_mut(len * k);
        parts.push((b, mine));
        rest = tail;
        consumed = start + len;
    }
    parts.into_par_iter().for_each(|(b, dxb)| {
        let (start, len) = bags[b];
        let d = &dout[b * k..(b + 1) * k];
        let am = &argmax[b * k..(b + 1) * k];
        let inv_n = 1.0 / len as f32;
        let (spread, at_max) = match mode {
            GcpMode::MaxMinusMean => (-inv_n, 1.0 - inv_n),
            GcpMode::Max => (0.0, 1.0),
            GcpMode::Mean => (inv_n, inv_n),
        };
        for (i, dr) in dxb.chunks_mut(k).enumerate() {
            for j in 0..k {
                dr[j] = if am[j] == start + i {
                    at_max * d[j]
                } else {
                    spread * d[j]
                };
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcp_hand_written_bag_all_modes() {
        // Rows 0..1 are outside the bag; the bag is rows 1..5 with k = 2. Column 0 has a tie
        // for its maximum (rows 2 and 4): the first, row 2, wins.
        let x = [
            100.0, 100.0, //
            1.0, -2.0, //
            4.0, -1.0, //
            -1.0, -5.0, //
            4.0, -3.0,
        ];
        let bags = [(1, 4)];
        let want = [
            (GcpMode::MaxMinusMean, [4.0 - 2.0, -1.0 + 2.75]),
            (GcpMode::Max, [4.0, -1.0]),
            (GcpMode::Mean, [2.0, -2.75]),
        ];
        let dout = [1.0, -2.0];
        for (mode, w) in want {
            let mut out = [0.0; 2];
            let mut am = [0usize; 2];
            gcp_forward(&x, 2, &bags, mode, &mut out, &mut am);
            let mut dx = [f32::NAN; 10];
            gcp_backward(&dout, 2, &bags, mode, &am, &mut dx);
            let want_dx: [f32; 10] = match mode {
                GcpMode::MaxMinusMean => [0.0, 0.0, -0.25, 0.5, 0.75, -1.5, -0.25, 0.5, -0.25, 0.5],
                GcpMode::Max => [0.0, 0.0, 0.0, 0.0, 1.0, -2.0, 0.0, 0.0, 0.0, 0.0],
                GcpMode::Mean => [0.0, 0.0, 0.25, -0.5, 0.25, -0.5, 0.25, -0.5, 0.25, -0.5],
            };
            let err = out
                .iter()
                .zip(&w)
                .chain(dx.iter().zip(&want_dx))
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            println!("gcp {mode}: out {out:?}, argmax {am:?}, max error {err:.3e}");
            assert_eq!(am, [2, 2]);
            assert!(err < 1e-6, "gcp {mode} error {err}");
        }
    }
}
