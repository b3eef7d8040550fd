//! Tests of the convolutions: every backend and blocking against direct f64 loops, backward
//! against finite differences, and bit-reproducibility across thread counts.

use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A blocking so small that the test shapes need several K chunks, tiles and channel
/// blocks, with ragged ends everywhere.
const SMALL: Blocking = Blocking {
    fwd_k: 18,
    fwd_col: 18 * 96,
    fwd_tile: 48,
    dw_k: 18,
    dw_tile: 48,
    dw_flush: 96,
    min_tasks: 8,
};

fn rand_vec(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// The backends this CPU can run (the portable one always).
fn backends() -> Vec<Backend> {
    let mut v = vec![Backend::Portable];
    if Backend::detect() != Backend::Portable {
        v.push(Backend::detect());
    }
    v
}

/// Direct loops in f64: 3×3 zero-padded (taps 9) or 1×1 (taps 1) convolution with bias.
fn naive_conv(x: &[f64], d: Dims, taps: usize, w: &[f64], b: &[f64], cout: usize) -> Vec<f64> {
    let (ks, pad) = if taps == 9 { (3, 1) } else { (1, 0) };
    let mut y = vec![0.0; d.n * cout * d.hw()];
    for i in 0..d.n {
        for co in 0..cout {
            for oy in 0..d.h {
                for ox in 0..d.w {
                    let mut s = b[co];
                    for ci in 0..d.c {
                        for ky in 0..ks {
                            for kx in 0..ks {
                                let (sy, sx) = (oy + ky, ox + kx);
                                if sy < pad || sx < pad || sy - pad >= d.h || sx - pad >= d.w {
                                    continue;
                                }
                                let xv = x[((i * d.c + ci) * d.h + sy - pad) * d.w + sx - pad];
                                s += w[((co * d.c + ci) * ks + ky) * ks + kx] * xv;
                            }
                        }
                    }
                    y[((i * cout + co) * d.h + oy) * d.w + ox] = s;
                }
            }
        }
    }
    y
}

/// Splits x [n, Σc, h, w] into tensors [n, c_i, h, w].
fn split_channels(x: &[f32], d: Dims, cs: &[usize]) -> Vec<Vec<f32>> {
    let mut c0 = 0;
    cs.iter()
        .map(|&c| {
            let mut part = Vec::with_capacity(d.n * c * d.hw());
            for i in 0..d.n {
                part.extend_from_slice(&x[(i * d.c + c0) * d.hw()..(i * d.c + c0 + c) * d.hw()]);
            }
            c0 += c;
            part
        })
        .collect()
}

fn fmt_errs(errs: &[f64]) -> String {
    let v: Vec<String> = errs.iter().map(|e| format!("{e:.2e}")).collect();
    v.join(", ")
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&u, &v)| (u as f64 - v).abs())
        .fold(0.0, f64::max)
}

/// ‖g − r‖ / ‖r‖.
fn rel_err(g: &[f32], r: &[f64]) -> f64 {
    assert_eq!(g.len(), r.len());
    let num: f64 = g.iter().zip(r).map(|(&u, &v)| (u as f64 - v).powi(2)).sum();
    let den: f64 = r.iter().map(|v| v * v).sum();
    (num / den.max(1e-300)).sqrt()
}

/// (n, input channel parts, cout, h, w)
type ConvShape = (usize, &'static [usize], usize, usize, usize);

const FORWARD_SHAPES: [ConvShape; 9] = [
    (2, &[3], 4, 7, 1),
    (1, &[1], 3, 5, 7),
    (2, &[3], 4, 16, 16),
    (3, &[5], 3, 7, 5),
    (1, &[1], 64, 9, 13),
    (2, &[20], 9, 9, 13),
    (2, &[7, 6], 10, 6, 11),
    (1, &[1], 5, 24, 32),
    (5, &[2, 3], 6, 3, 4),
];

fn check_forward(taps: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for &(n, cs, cout, h, w) in &FORWARD_SHAPES {
        let cin: usize = cs.iter().sum();
        let d = Dims::new(n, cin, h, w);
        let x = rand_vec(&mut rng, d.len());
        let wt = rand_vec(&mut rng, cout * cin * taps);
        let b = rand_vec(&mut rng, cout);
        let want = naive_conv(&to_f64(&x), d, taps, &to_f64(&wt), &to_f64(&b), cout);
        let want_relu: Vec<f64> = want.iter().map(|v| v.max(0.0)).collect();
        let parts_data = split_channels(&x, d, cs);
        let parts: Vec<(&[f32], usize)> = parts_data
            .iter()
            .map(|p| p.as_slice())
            .zip(cs.iter().copied())
            .collect();
        for be in backends() {
            for bl in [BLOCKING, SMALL] {
                for relu in [false, true] {
                    let mut y = vec![f32::NAN; n * cout * h * w];
                    forward_impl(be, &bl, &parts, d, taps, &wt, &b, cout, relu, &mut y);
                    let err = max_abs_diff(&y, if relu { &want_relu } else { &want });
                    println!(
                        "taps {taps} {be:?} fwd_k {} n{n} c{cs:?}→{cout} {h}×{w} relu {relu}: max abs err {err:.2e}",
                        bl.fwd_k
                    );
                    assert!(err < 1e-4, "forward error {err}");
                }
            }
        }
    }
}

#[test]
fn conv3x3_forward_matches_naive_loops() {
    check_forward(9);
}

#[test]
fn conv1x1_forward_matches_naive_loops() {
    check_forward(1);
}

#[test]
fn public_conv_entry_points_match_naive_loops() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let d = Dims::new(2, 6, 7, 9);
    let cout = 5;
    let x = rand_vec(&mut rng, d.len());
    let b = rand_vec(&mut rng, cout);
    for taps in [9, 1] {
        let wt = rand_vec(&mut rng, cout * d.c * taps);
        let want = naive_conv(&to_f64(&x), d, taps, &to_f64(&wt), &to_f64(&b), cout);
        let want_relu: Vec<f64> = want.iter().map(|v| v.max(0.0)).collect();
        let mut y = vec![0.0; d.n * cout * d.hw()];
        let mut errs = Vec::new();
        if taps == 9 {
            conv3x3_forward(&x, d, &wt, &b, cout, &mut y);
            errs.push(max_abs_diff(&y, &want));
            conv3x3_relu_forward(&x, d, &wt, &b, cout, &mut y);
            errs.push(max_abs_diff(&y, &want_relu));
            let parts_data = split_channels(&x, d, &[2, 4]);
            let parts = [(&parts_data[0][..], 2), (&parts_data[1][..], 4)];
            conv3x3_forward_concat(&parts, d, &wt, &b, cout, false, &mut y);
            errs.push(max_abs_diff(&y, &want));
            conv3x3_forward_concat(&parts, d, &wt, &b, cout, true, &mut y);
            errs.push(max_abs_diff(&y, &want_relu));
            let with_empty = [
                (&parts_data[0][..], 2),
                (&[][..], 0),
                (&parts_data[1][..], 4),
            ];
            conv3x3_forward_concat(&with_empty, d, &wt, &b, cout, false, &mut y);
            errs.push(max_abs_diff(&y, &want));
        } else {
            conv1x1_forward(&x, d, &wt, &b, cout, &mut y);
            errs.push(max_abs_diff(&y, &want));
        }
        println!("public taps {taps}: max abs errors {}", fmt_errs(&errs));
        assert!(errs.iter().all(|&e| e < 1e-4), "errors {errs:?}");
    }
}

/// Central differences of L = Σ r ⊙ f(θ) over every entry of θ, f evaluated in f64.
fn fd_grad(theta: &[f32], r: &[f32], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let eps = 1e-3;
    let mut t = to_f64(theta);
    let loss = |y: Vec<f64>| -> f64 { y.iter().zip(r).map(|(a, &b)| a * b as f64).sum() };
    (0..t.len())
        .map(|i| {
            let v = t[i];
            t[i] = v + eps;
            let lp = loss(f(&t));
            t[i] = v - eps;
            let lm = loss(f(&t));
            t[i] = v;
            (lp - lm) / (2.0 * eps)
        })
        .collect()
}

const BACKWARD_SHAPES: [ConvShape; 6] = [
    (2, &[3], 4, 7, 1),
    (2, &[3], 4, 5, 7),
    (1, &[1], 3, 6, 4),
    (2, &[2, 3], 9, 9, 13),
    (3, &[4], 6, 1, 5),
    (5, &[2, 3], 6, 3, 4),
];

fn check_backward(taps: usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for &(n, cs, cout, h, w) in &BACKWARD_SHAPES {
        let cin: usize = cs.iter().sum();
        let d = Dims::new(n, cin, h, w);
        let x = rand_vec(&mut rng, d.len());
        let wt = rand_vec(&mut rng, cout * cin * taps);
        let b = rand_vec(&mut rng, cout);
        let r = rand_vec(&mut rng, n * cout * h * w);
        let (xf, wf, bf) = (to_f64(&x), to_f64(&wt), to_f64(&b));
        let fd_x = fd_grad(&x, &r, |t| naive_conv(t, d, taps, &wf, &bf, cout));
        let fd_w = fd_grad(&wt, &r, |t| naive_conv(&xf, d, taps, t, &bf, cout));
        let fd_b = fd_grad(&b, &r, |t| naive_conv(&xf, d, taps, &wf, t, cout));
        let parts_data = split_channels(&x, d, cs);
        let parts: Vec<(&[f32], usize)> = parts_data
            .iter()
            .map(|p| p.as_slice())
            .zip(cs.iter().copied())
            .collect();
        let fd_x_parts = split_channels(&fd_x.iter().map(|&v| v as f32).collect::<Vec<_>>(), d, cs);
        for be in backends() {
            for bl in [BLOCKING, SMALL] {
                let mut dx_data: Vec<Vec<f32>> =
                    cs.iter().map(|&c| vec![f32::NAN; n * c * h * w]).collect();
                let mut dx: Vec<Option<&mut [f32]>> =
                    dx_data.iter_mut().map(|v| Some(v.as_mut_slice())).collect();
                let mut dw = vec![f32::NAN; wt.len()];
                let mut db = vec![f32::NAN; cout];
                backward_impl(
                    be, &bl, &parts, d, taps, &wt, &r, cout, &mut dx, &mut dw, &mut db,
                );
                let ex: Vec<f64> = dx_data
                    .iter()
                    .zip(&fd_x_parts)
                    .map(|(g, fd)| rel_err(g, &to_f64(fd)))
                    .collect();
                let (ew, eb) = (rel_err(&dw, &fd_w), rel_err(&db, &fd_b));
                println!(
                    "taps {taps} {be:?} dw_k {} n{n} c{cs:?}→{cout} {h}×{w}: rel err dx [{}] dw {ew:.2e} db {eb:.2e}",
                    bl.dw_k,
                    fmt_errs(&ex)
                );
                assert!(ex.iter().all(|&e| e < 1e-3) && ew < 1e-3 && eb < 1e-3);
            }
        }
    }
}

#[test]
fn conv3x3_backward_matches_finite_differences() {
    check_backward(9);
}

#[test]
fn conv1x1_backward_matches_finite_differences() {
    check_backward(1);
}

#[test]
fn public_backward_entry_points_match_finite_differences() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (d, cout) = (Dims::new(2, 3, 4, 6), 2);
    let x = rand_vec(&mut rng, d.len());
    let b = rand_vec(&mut rng, cout);
    let r = rand_vec(&mut rng, d.n * cout * d.hw());
    let (xf, bf) = (to_f64(&x), to_f64(&b));
    for taps in [9, 1] {
        let wt = rand_vec(&mut rng, cout * d.c * taps);
        let wf = to_f64(&wt);
        let fd_x = fd_grad(&x, &r, |t| naive_conv(t, d, taps, &wf, &bf, cout));
        let fd_w = fd_grad(&wt, &r, |t| naive_conv(&xf, d, taps, t, &bf, cout));
        let fd_b = fd_grad(&b, &r, |t| naive_conv(&xf, d, taps, &wf, t, cout));
        let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; wt.len()], vec![0.0; cout]);
        let mut errs = Vec::new();
        if taps == 9 {
            conv3x3_backward(&x, d, &wt, &r, cout, Some(&mut dx), &mut dw, &mut db);
            errs.extend([
                rel_err(&dx, &fd_x),
                rel_err(&dw, &fd_w),
                rel_err(&db, &fd_b),
            ]);
            let parts_data = split_channels(&x, d, &[1, 2]);
            let parts = [(&parts_data[0][..], 1), (&parts_data[1][..], 2)];
            let mut dx1 = vec![0.0; d.n * 2 * d.hw()];
            let mut empty: [f32; 0] = [];
            let with_empty = [parts[0], (&[][..], 0), parts[1]];
            conv3x3_backward_concat(
                &with_empty,
                d,
                &wt,
                &r,
                cout,
                &mut [None, Some(&mut empty), Some(&mut dx1)],
                &mut dw,
                &mut db,
            );
            let fd_x1 = split_channels(
                &fd_x.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                d,
                &[1, 2],
            );
            errs.extend([
                rel_err(&dx1, &to_f64(&fd_x1[1])),
                rel_err(&dw, &fd_w),
                rel_err(&db, &fd_b),
            ]);
        } else {
            conv1x1_backward(&x, d, &wt, &r, cout, Some(&mut dx), &mut dw, &mut db);
            errs.extend([
                rel_err(&dx, &fd_x),
                rel_err(&dw, &fd_w),
                rel_err(&db, &fd_b),
            ]);
        }
        println!(
            "public backward taps {taps}: rel errors (dx, dw, db …) {}",
            fmt_errs(&errs)
        );
        assert!(errs.iter().all(|&e| e < 1e-3), "errors {errs:?}");
    }
}

#[test]
fn conv3x3_backward_is_bit_reproducible() {
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let (d, cout) = (Dims::new(2, 64, 32, 32), 64);
    let x = rand_vec(&mut rng, d.len());
    let w = rand_vec(&mut rng, cout * d.c * 9);
    let dy = rand_vec(&mut rng, d.n * cout * d.hw());
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (mut dx, mut dw, mut db) =
                (vec![0.0; x.len()], vec![0.0; w.len()], vec![0.0; cout]);
            conv3x3_backward(&x, d, &w, &dy, cout, Some(&mut dx), &mut dw, &mut db);
            (dx, dw, db)
        })
    };
    let first = run(2);
    // A reference for dw entries, so that the test also fails on a wrong (if stable) result.
    let col0: f64 = (0..d.n)
        .flat_map(|i| (1..d.h).flat_map(move |oy| (1..d.w).map(move |ox| (i, oy, ox))))
        .map(|(i, oy, ox)| {
            dy[i * cout * d.hw() + oy * d.w + ox] as f64
                * x[i * d.c * d.hw() + (oy - 1) * d.w + ox - 1] as f64
        })
        .sum();
    let err0 = (first.1[0] as f64 - col0).abs();
    for threads in [2, 1, 3] {
        let again = run(threads);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let diff = first
            .1
            .iter()
            .zip(&again.1)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!(
            "{threads} threads: max |dw − dw₀| = {diff:e}; dw[0,0,0,0] err vs f64 sum {err0:.2e}"
        );
        assert_eq!(
            bits(&first.1),
            bits(&again.1),
            "dw differs with {threads} threads"
        );
        assert_eq!(
            bits(&first.2),
            bits(&again.2),
            "db differs with {threads} threads"
        );
        assert_eq!(
            bits(&first.0),
            bits(&again.0),
            "dx differs with {threads} threads"
        );
    }
    assert!(err0 < 1e-3, "dw[0,0,0,0] error {err0}");
}
