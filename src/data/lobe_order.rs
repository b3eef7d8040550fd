//! The lobe-order step: each craniocaudal column of a lung relabelled into the most probable
//! anatomical lobe sequence under the network's per-pixel lobe probabilities.

use rayon::prelude::*;

/// The lobes of each lung from the base up, as every craniocaudal line through the lung meets
/// them: LLL below LUL on the left; RLL below RML below RUL on the right (the oblique fissure
/// rises towards the back, the horizontal one caps the middle lobe).
const LOBE_ORDER: [&[u8]; 2] = [&[2, 1], &[5, 4, 3]];

/// Puts every craniocaudal column of each lung in anatomical lobe order ([`LOBE_ORDER`]): a
/// slice-wise network's labels along a column may flip back and forth near a fissure, while
/// the lobes meet each column in one order, each at most once. Per column and lung, a dynamic
/// programme over the column's voxels of that lung (voxels labelled with one of its lobes;
/// background and the other lung are not touched) finds the non-decreasing lobe sequence of
/// least total `cost(x, y, z, lobe)`. With cost −ln p of the network's probabilities this is
/// the most probable ordered labelling (pixels taken as independent); a column whose labels
/// are already in order keeps them, as each voxel then holds its cheapest lobe. Ties keep the
/// lower lobe.
pub fn order_lobes_along_z<F>(labels: &mut [u8], dims: [usize; 3], cost: F)
where
    F: Fn(usize, usize, usize, u8) -> f32 + Sync,
{
    let [nx, ny, nz] = dims;
    let n = nx * ny;
    // One row of columns at a time, gathered as [x][z] from whole rows (cache-friendly reads).
    let rows: Vec<(usize, Vec<u8>)> = (0..ny)
        .into_par_iter()
        .filter_map(|y| {
            let mut block = vec![0u8; nx * nz];
            for z in 0..nz {
                let row = &labels[z * n + y * nx..z * n + (y + 1) * nx];
                for (x, &l) in row.iter().enumerate() {
                    block[x * nz + z] = l;
                }
            }
            let mut changed = false;
            for (x, column) in block.chunks_mut(nz).enumerate() {
                for order in LOBE_ORDER {
                    changed |= order_column(column, order, |z, lobe| cost(x, y, z, lobe));
                }
            }
            changed.then_some((y, block))
        })
        .collect();
    for (y, block) in rows {
        for z in 0..nz {
            let row = &mut labels[z * n + y * nx..z * n + (y + 1) * nx];
            for (x, l) in row.iter_mut().enumerate() {
                *l = block[x * nz + z];
            }
        }
    }
}

/// Relabels the voxels of `column` whose labels are in `order` into the non-decreasing (in
/// `order`) sequence of least total `cost(z, lobe)`; true when a label changed.
fn order_column(column: &mut [u8], order: &[u8], cost: impl Fn(usize, u8) -> f32) -> bool {
    /// At most three lobes per lung.
    const MAX: usize = 3;
    let k = order.len();
    let rank = |l: u8| order.iter().position(|&o| o == l);
    // Most columns are already in order: check before allocating anything.
    let mut highest = 0;
    let ordered = column.iter().filter_map(|&l| rank(l)).all(|r| {
        let ok = r >= highest;
        highest = highest.max(r);
        ok
    });
    if ordered {
        return false;
    }
    let voxels: Vec<usize> = (0..column.len())
        .filter(|&z| rank(column[z]).is_some())
        .collect();
    // total[s]: least cost so far with the current voxel in state s; from[i·k + s]: the best
    // state of voxel i − 1 given state s at voxel i.
    let mut total = [0f32; MAX];
    let mut from = vec![0u8; voxels.len() * k];
    for (i, &z) in voxels.iter().enumerate() {
        let mut best = (f32::INFINITY, 0usize);
        let mut next = [0f32; MAX];
        for s in 0..k {
            if i > 0 && total[s] < best.0 {
                best = (total[s], s);
            }
            let before = if i > 0 { best.0 } else { 0.0 };
            from[i * k + s] = best.1 as u8;
            next[s] = before + cost(z, order[s]);
        }
        total = next;
    }
    let mut s = 0;
    for t in 1..k {
        if total[t] < total[s] {
            s = t;
        }
    }
    for i in (0..voxels.len()).rev() {
        column[voxels[i]] = order[s];
        s = from[i * k + s] as usize;
    }
    true
}
