//! BatchNorm2d/1d fused with its ReLU: train and eval forward, train backward, folding into a conv.

use crate::config::{BN_EPS, BN_MOMENTUM};
use rayon::prelude::*;

fn check_shapes(what: &str, x: usize, n: usize, c: usize, hw: usize, per_channel: &[usize]) {
    assert_eq!(
        x,
        n * c * hw,
        "{what}: x is not [n, c, hw] = [{n}, {c}, {hw}]"
    );
    for &len in per_channel {
        assert_eq!(
            len, c,
            "{what}: a per-channel buffer does not have {c} entries"
        );
    }
}

/// Independent accumulators per channel sum (breaks the f64 add latency chain).
const LANES: usize = 8;

/// Σ over the n·hw values of channel ch of f(the values of `inputs` there), K sums at once, in
/// f64. Value j of each plane goes to lane j mod LANES and the lanes are added in order at the
/// end, so the result is fixed by the shape alone. The lanes are independent sums, so the loop
/// over a block of LANES values vectorises without reordering any sum.
fn channel_sums<const K: usize, const S: usize>(
    inputs: [&[f32]; S],
    (n, c, hw, ch): (usize, usize, usize, usize),
    f: impl Fn([f32; S]) -> [f64; K],
) -> [f64; K] {
    let mut lanes = [[0.0f64; LANES]; K];
    let full = hw - hw % LANES;
    for i in 0..n {
        let base = (i * c + ch) * hw;
        let planes: [&[f32]; S] = inputs.map(|t| &t[base..base + hw]);
        for j in (0..full).step_by(LANES) {
            let block: [&[f32; LANES]; S] =
                planes.map(|p| p[j..j + LANES].try_into().expect("a block of LANES values"));
            for l in 0..LANES {
                let v = f(block.map(|b| b[l]));
                for (sum, x) in lanes.iter_mut().zip(v) {
                    sum[l] += x;
                }
            }
        }
        for j in full..hw {
            let v = f(planes.map(|p| p[j]));
            for (sum, x) in lanes.iter_mut().zip(v) {
                sum[j % LANES] += x;
            }
        }
    }
    lanes.map(|sum| sum.iter().fold(0.0, |t, &v| t + v))
}

/// y = relu(x·scale[ch] + shift[ch]), parallel over the (image, channel) planes.
fn affine_relu(x: &[f32], c: usize, hw: usize, scale: &[f32], shift: &[f32], y: &mut [f32]) {
    if y.is_empty() {
        return;
    }
    y.par_chunks_mut(hw)
        .zip(x.par_chunks(hw))
        .enumerate()
        .for_each(|(plane, (yp, xp))| {
            let (a, b) = (scale[plane % c], shift[plane % c]);
            for (yv, &xv) in yp.iter_mut().zip(xp) {
                let v = xv * a + b;
                *yv = if v > 0.0 { v } else { 0.0 };
            }
        });
}

/// Training-mode BatchNorm + ReLU over x [n, c, hw] with batch statistics (cnt = n·hw values
/// per channel, biased variance to normalise): y = relu(γ·(x−mean)·invstd + β), applied as
/// y = relu(x·a + b) with a = γ·invstd and b = β − mean·a (PyTorch's CPU form). Writes mean
/// and invstd = 1/sqrt(var_biased + eps) per channel for the backward, and updates the running
/// statistics as PyTorch: rm = (1−momentum)·rm + momentum·mean,
/// rv = (1−momentum)·rv + momentum·var_biased·cnt/(cnt−1). Statistics are computed in f64
/// (two passes). Panics if cnt < 2 (PyTorch refuses a single value per channel in training).
#[allow(clippy::too_many_arguments)]
pub fn bn_relu_train_forward(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    y: &mut [f32],
    mean: &mut [f32],
    invstd: &mut [f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
) {
    check_shapes(
        "bn_relu_train_forward",
        x.len(),
        n,
        c,
        hw,
        &[
            gamma.len(),
            beta.len(),
            mean.len(),
            invstd.len(),
            running_mean.len(),
            running_var.len(),
        ],
    );
    assert_eq!(y.len(), x.len(), "bn_relu_train_forward: bad y length");
    let cnt = n * hw;
    assert!(
        cnt >= 2,
        "bn_relu_train_forward: expected more than 1 value per channel when training, got {cnt}"
    );
    let stats: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let [sum] = channel_sums([x], (n, c, hw, ch), |[v]| [v as f64]);
            let m = sum / cnt as f64;
            let [ss] = channel_sums([x], (n, c, hw, ch), |[v]| {
                let d = v as f64 - m;
                [d * d]
            });
            let var = ss / cnt as f64;
            (m, var)
        })
        .collect();
    let mom = BN_MOMENTUM as f64;
    let mut scale = vec![0.0f32; c];
    let mut shift = vec![0.0f32; c];
    for (ch, &(m, var)) in stats.iter().enumerate() {
        let is = 1.0 / (var + BN_EPS as f64).sqrt();
        let a = gamma[ch] as f64 * is;
        scale[ch] = a as f32;
        shift[ch] = (beta[ch] as f64 - m * a) as f32;
        mean[ch] = m as f32;
        invstd[ch] = is as f32;
        let unbiased = var * cnt as f64 / (cnt - 1) as f64;
        running_mean[ch] = ((1.0 - mom) * running_mean[ch] as f64 + mom * m) as f32;
        running_var[ch] = ((1.0 - mom) * running_var[ch] as f64 + mom * unbiased) as f32;
    }
    affine_relu(x, c, hw, &scale, &shift, y);
}

/// Evaluation-mode BatchNorm + ReLU over x [n, c, hw]: y = relu(γ·(x−rm)/sqrt(rv+eps) + β),
/// applied as relu(x·a + b) with a = γ/sqrt(rv+eps), b = β − rm·a (computed in f64).
#[allow(clippy::too_many_arguments)]
pub fn bn_relu_eval_forward(
    x: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    y: &mut [f32],
) {
    check_shapes(
        "bn_relu_eval_forward",
        x.len(),
        n,
        c,
        hw,
        &[
            gamma.len(),
            beta.len(),
            running_mean.len(),
            running_var.len(),
        ],
    );
    assert_eq!(y.len(), x.len(), "bn_relu_eval_forward: bad y length");
    let (scale, shift): (Vec<f32>, Vec<f32>) = (0..c)
        .map(|ch| {
            let a = gamma[ch] as f64 / (running_var[ch] as f64 + BN_EPS as f64).sqrt();
            (
                a as f32,
                (beta[ch] as f64 - running_mean[ch] as f64 * a) as f32,
            )
        })
        .unzip();
    affine_relu(x, c, hw, &scale, &shift, y);
}

/// Backward of [`bn_relu_train_forward`]. y is the forward's output (ReLU mask = y > 0), mean
/// and invstd the statistics it saved. With g = dy·[y > 0] and x̂ = (x−mean)·invstd, per
/// channel (sums over its cnt = n·hw values, in f64): dβ = Σ g, dγ = Σ g·x̂,
/// dx = γ·invstd·(g − dβ/cnt − x̂·dγ/cnt) (sums in f64, the final affine map in f32).
/// Outputs are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn bn_relu_backward(
    x: &[f32],
    y: &[f32],
    n: usize,
    c: usize,
    hw: usize,
    gamma: &[f32],
    mean: &[f32],
    invstd: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    check_shapes(
        "bn_relu_backward",
        x.len(),
        n,
        c,
        hw,
        &[
            gamma.len(),
            mean.len(),
            invstd.len(),
            dgamma.len(),
            dbeta.len(),
        ],
    );
    for (name, len) in [("y", y.len()), ("dy", dy.len()), ("dx", dx.len())] {
        assert_eq!(len, x.len(), "bn_relu_backward: bad {name} length");
    }
    let sums: Vec<(f64, f64)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (m, is) = (mean[ch] as f64, invstd[ch] as f64);
            let [db, dg] = channel_sums([x, y, dy], (n, c, hw, ch), |[xv, yv, g]| {
                let g = if yv > 0.0 { g as f64 } else { 0.0 };
                [g, g * (xv as f64 - m) * is]
            });
            (db, dg)
        })
        .collect();
    let cnt = (n * hw) as f64;
    // Per channel, with k = γ·invstd: dx = k·g + cx·(x − mean) + c0, cx = −invstd·k·dγ/cnt,
    // c0 = −k·dβ/cnt; the coefficients are computed in f64 and applied in f32 (x − mean first,
    // so inputs far from zero lose no precision).
    let coef: Vec<[f32; 4]> = sums
        .iter()
        .enumerate()
        .map(|(ch, &(db, dg))| {
            let is = invstd[ch] as f64;
            let k = gamma[ch] as f64 * is;
            let cx = -is * k * dg / cnt;
            [k as f32, cx as f32, (-k * db / cnt) as f32, mean[ch]]
        })
        .collect();
    for (ch, &(db, dg)) in sums.iter().enumerate() {
        dbeta[ch] = db as f32;
        dgamma[ch] = dg as f32;
    }
    if dx.is_empty() {
        return;
    }
    dx.par_chunks_mut(hw)
        .zip(
            x.par_chunks(hw)
                .zip(y.par_chunks(hw).zip(dy.par_chunks(hw))),
        )
        .enumerate()
        .for_each(|(plane, (dxp, (xp, (yp, dyp))))| {
            let [k, cx, c0, m] = coef[plane % c];
            for (((d, &xv), &yv), &g) in dxp.iter_mut().zip(xp).zip(yp).zip(dyp) {
                let g = if yv > 0.0 { g } else { 0.0 };
                *d = k * g + cx * (xv - m) + c0;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ops::tensor::test_support::*;
    use crate::cpu::ops::Dims;
    use crate::reference;

    /// bn_relu_train_forward of x [n, c, hw] into new buffers: [y, mean, invstd]; rm and rv
    /// are updated.
    fn train(
        x: &[f32],
        (n, c, hw): (usize, usize, usize),
        (gamma, beta): (&[f32], &[f32]),
        rm: &mut [f32],
        rv: &mut [f32],
    ) -> [Vec<f32>; 3] {
        let (mut y, mut mean, mut is) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
        bn_relu_train_forward(x, n, c, hw, gamma, beta, &mut y, &mut mean, &mut is, rm, rv);
        [y, mean, is]
    }

    #[test]
    fn bn_train_forward_normalises_and_updates_running_stats() {
        let mut g = rng(41);
        let (n, c, hw) = (4, 3, 50);
        let len = n * c * hw;
        // Channel ch has its own offset and spread; β is large so the ReLU never clips.
        let x: Vec<f32> = rand_vec(&mut g, len, -1.0, 1.0)
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let ch = (i / hw) % c;
                v * (1.0 + ch as f32) + 3.0 * ch as f32 - 2.0
            })
            .collect();
        let gamma = [0.5f32, 2.0, 1.5];
        let beta = [10.0f32, 20.0, 30.0];
        let (mut rm, mut rv) = (vec![0.5f32; c], vec![2.0f32; c]);
        let [y, mean, invstd] = train(&x, (n, c, hw), (&gamma, &beta), &mut rm, &mut rv);
        let mut worst: f64 = 0.0;
        for ch in 0..c {
            let vals = |v: &[f32]| -> Vec<f64> {
                (0..n)
                    .flat_map(|i| (0..hw).map(move |p| (i * c + ch) * hw + p))
                    .map(|i| v[i] as f64)
                    .collect()
            };
            let (xs, ys) = (vals(&x), vals(&y));
            let cnt = xs.len() as f64;
            let xm = xs.iter().sum::<f64>() / cnt;
            let xss = xs.iter().map(|v| (v - xm).powi(2)).sum::<f64>();
            let ym = ys.iter().sum::<f64>() / cnt;
            let yvar = ys.iter().map(|v| (v - ym).powi(2)).sum::<f64>() / cnt;
            // Expected variance of y: γ²·var/(var+eps).
            let var_b = xss / cnt;
            let want_yvar = (gamma[ch] as f64).powi(2) * var_b / (var_b + BN_EPS as f64);
            let want_rm = 0.9 * 0.5 + 0.1 * xm;
            let want_rv = 0.9 * 2.0 + 0.1 * xss / (cnt - 1.0);
            let errs = [
                (ym - beta[ch] as f64).abs() / beta[ch] as f64,
                (yvar - want_yvar).abs() / want_yvar,
                (yvar - (gamma[ch] as f64).powi(2)).abs() / (gamma[ch] as f64).powi(2),
                (rm[ch] as f64 - want_rm).abs() / want_rm.abs(),
                (rv[ch] as f64 - want_rv).abs() / want_rv,
                (mean[ch] as f64 - xm).abs() / xm.abs().max(1.0),
                (invstd[ch] as f64 - 1.0 / (var_b + BN_EPS as f64).sqrt()).abs()
                    * (var_b + BN_EPS as f64).sqrt(),
            ];
            let shown: Vec<String> = errs.iter().map(|e| format!("{e:.2e}")).collect();
            println!("bn stats channel {ch}: relative errors (mean y, var y, var y vs γ², rm, rv, mean, invstd) {shown:?}");
            worst = errs.iter().cloned().fold(worst, f64::max);
        }
        // γ² vs γ²·var/(var+eps) differs by at most eps/var ≈ 1e-5 here.
        assert!(worst < 5e-5, "bn statistics error {worst}");
    }

    #[test]
    fn fold_bn_matches_conv_then_bn_eval() {
        let mut g = rng(42);
        let (n, cin, cout, hw) = (2, 4, 3, 6);
        let x = rand_vec(&mut g, n * cin * hw, -1.0, 1.0);
        let w = rand_vec(&mut g, cout * cin, -1.0, 1.0);
        let b = rand_vec(&mut g, cout, -0.5, 0.5);
        let gamma = rand_vec(&mut g, cout, 0.5, 1.5);
        let beta = rand_vec(&mut g, cout, -0.5, 0.5);
        let rm = rand_vec(&mut g, cout, -0.3, 0.3);
        let rv = rand_vec(&mut g, cout, 0.5, 2.0);
        // The conv as a 1×1 convolution over [n, cin, hw, 1], then BatchNorm with the running
        // statistics and ReLU.
        let xd = Dims::new(n, cin, hw, 1);
        let conv = |w: &[f64], b: &[f64]| reference::conv1x1_forward(&to_f64(&x), xd, w, b, cout);
        let z = conv(&to_f64(&w), &to_f64(&b));
        let want = reference::relu_forward(&reference::bn_eval_forward(
            &z,
            cout,
            hw,
            &to_f64(&gamma),
            &to_f64(&beta),
            &to_f64(&rm),
            &to_f64(&rv),
        ));
        let (wf, bf) = crate::model::fold_bn(&w, &b, &gamma, &beta, &rm, &rv);
        let folded = reference::relu_forward(&conv(&to_f64(&wf), &to_f64(&bf)));
        let fold_err = max_abs_diff(&folded, &want);
        println!("folded conv error {fold_err:.3e}");
        assert!(fold_err < 1e-6, "fold error {fold_err}");
    }

    #[test]
    fn bn_train_is_bit_identical_across_thread_counts() {
        let mut g = rng(43);
        let (n, c, hw) = (4, 16, 64 * 64);
        let len = n * c * hw;
        let x = rand_vec(&mut g, len, -1.0, 1.0);
        let dy = rand_vec(&mut g, len, -1.0, 1.0);
        let gamma = rand_vec(&mut g, c, 0.5, 1.5);
        let beta = rand_vec(&mut g, c, -0.3, 0.3);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            pool.install(|| {
                let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
                let [y, mean, invstd] = train(&x, (n, c, hw), (&gamma, &beta), &mut rm, &mut rv);
                let mut dx = vec![0.0; len];
                let (mut dg, mut db) = (vec![0.0; c], vec![0.0; c]);
                bn_relu_backward(
                    &x, &y, n, c, hw, &gamma, &mean, &invstd, &dy, &mut dx, &mut dg, &mut db,
                );
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
                [y, mean, invstd, rm, rv, dx, dg, db].map(|v| bits(&v))
            })
        };
        let first = run(1);
        let mut differing = 0;
        for threads in [1, 3, 4] {
            let again = run(threads);
            differing += first
                .iter()
                .zip(&again)
                .map(|(a, b)| a.iter().zip(b).filter(|(p, q)| p != q).count())
                .sum::<usize>();
        }
        println!("bn train forward/backward on {len} values: {differing} differing bits-words across runs with 1, 1, 3, 4 threads");
        assert_eq!(differing, 0);
    }
}
