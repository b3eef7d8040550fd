//! Tests of the convolutions: every backend and blocking, forward and backward, against
//! `reference`, and bit-reproducibility across thread counts.

use super::*;
use crate::reference::{self, Grads};
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

/// The reference convolution: 3×3 zero-padded (taps 9) or 1×1 (taps 1), with bias.
fn ref_forward(x: &[f32], d: Dims, taps: usize, w: &[f32], b: &[f32], cout: usize) -> Vec<f64> {
    let (x, w, b) = (to_f64(x), to_f64(w), to_f64(b));
    match taps {
        9 => reference::conv3x3_forward(&x, d, &w, &b, cout),
        _ => reference::conv1x1_forward(&x, d, &w, &b, cout),
    }
}

/// The reference gradients of [`ref_forward`] for dy.
fn ref_backward(x: &[f32], d: Dims, taps: usize, w: &[f32], dy: &[f32], cout: usize) -> Grads {
    let (x, w, dy) = (to_f64(x), to_f64(w), to_f64(dy));
    match taps {
        9 => reference::conv3x3_backward(&x, d, &w, &dy, cout),
        _ => reference::conv1x1_backward(&x, d, &w, &dy, cout),
    }
}

/// Splits x [n, Σc, h, w] into tensors [n, c_i, h, w] (reference::split_channels, in f32).
fn split_f32(x: &[f32], d: Dims, cs: &[usize]) -> Vec<Vec<f32>> {
    reference::split_channels(&to_f64(x), d.n, d.hw(), cs)
        .iter()
        .map(|p| p.iter().map(|&v| v as f32).collect())
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
        let want = ref_forward(&x, d, taps, &wt, &b, cout);
        let want_relu = reference::relu_forward(&want);
        let parts_data = split_f32(&x, d, cs);
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
fn conv3x3_forward_matches_reference() {
    check_forward(9);
}

#[test]
fn conv1x1_forward_matches_reference() {
    check_forward(1);
}

#[test]
fn public_conv_entry_points_match_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let d = Dims::new(2, 6, 7, 9);
    let cout = 5;
    let x = rand_vec(&mut rng, d.len());
    let b = rand_vec(&mut rng, cout);
    for taps in [9, 1] {
        let wt = rand_vec(&mut rng, cout * d.c * taps);
        let want = ref_forward(&x, d, taps, &wt, &b, cout);
        let want_relu = reference::relu_forward(&want);
        let mut y = vec![0.0; d.n * cout * d.hw()];
        let mut errs = Vec::new();
        if taps == 9 {
            conv3x3_forward(&x, d, &wt, &b, cout, &mut y);
            errs.push(max_abs_diff(&y, &want));
            conv3x3_relu_forward(&x, d, &wt, &b, cout, &mut y);
            errs.push(max_abs_diff(&y, &want_relu));
            let parts_data = split_f32(&x, d, &[2, 4]);
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
        let r = rand_vec(&mut rng, n * cout * h * w);
        let want = ref_backward(&x, d, taps, &wt, &r, cout);
        let want_dx = reference::split_channels(&want.dx, n, h * w, cs);
        let parts_data = split_f32(&x, d, cs);
        let parts: Vec<(&[f32], usize)> = parts_data
            .iter()
            .map(|p| p.as_slice())
            .zip(cs.iter().copied())
            .collect();
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
                    .zip(&want_dx)
                    .map(|(g, r)| rel_err(g, r))
                    .collect();
                let (ew, eb) = (rel_err(&dw, &want.dw), rel_err(&db, &want.db));
                println!(
                    "taps {taps} {be:?} dw_k {} n{n} c{cs:?}→{cout} {h}×{w}: rel err dx [{}] dw {ew:.2e} db {eb:.2e}",
                    bl.dw_k,
                    fmt_errs(&ex)
                );
                assert!(ex.iter().all(|&e| e < 1e-5) && ew < 1e-5 && eb < 1e-5);
            }
        }
    }
}

#[test]
fn conv3x3_backward_matches_reference() {
    check_backward(9);
}

#[test]
fn conv1x1_backward_matches_reference() {
    check_backward(1);
}

#[test]
fn public_backward_entry_points_match_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (d, cout) = (Dims::new(2, 3, 4, 6), 2);
    let x = rand_vec(&mut rng, d.len());
    let r = rand_vec(&mut rng, d.n * cout * d.hw());
    for taps in [9, 1] {
        let wt = rand_vec(&mut rng, cout * d.c * taps);
        let want = ref_backward(&x, d, taps, &wt, &r, cout);
        let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; wt.len()], vec![0.0; cout]);
        let mut errs = Vec::new();
        if taps == 9 {
            conv3x3_backward(&x, d, &wt, &r, cout, Some(&mut dx), &mut dw, &mut db);
            errs.extend([
                rel_err(&dx, &want.dx),
                rel_err(&dw, &want.dw),
                rel_err(&db, &want.db),
            ]);
            let parts_data = split_f32(&x, d, &[1, 2]);
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
            let want_dx1 = reference::split_channels(&want.dx, d.n, d.hw(), &[1, 2]);
            errs.extend([
                rel_err(&dx1, &want_dx1[1]),
                rel_err(&dw, &want.dw),
                rel_err(&db, &want.db),
            ]);
        } else {
            conv1x1_backward(&x, d, &wt, &r, cout, Some(&mut dx), &mut dw, &mut db);
            errs.extend([
                rel_err(&dx, &want.dx),
                rel_err(&dw, &want.dw),
                rel_err(&db, &want.db),
            ]);
        }
        println!(
            "public backward taps {taps}: rel errors (dx, dw, db …) {}",
            fmt_errs(&errs)
        );
        assert!(errs.iter().all(|&e| e < 1e-5), "errors {errs:?}");
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
    // The reference gradients, so that the test also fails on a wrong (if stable) result.
    let want = ref_backward(&x, d, 9, &w, &dy, cout);
    let errs = [
        rel_err(&first.0, &want.dx),
        rel_err(&first.1, &want.dw),
        rel_err(&first.2, &want.db),
    ];
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
            "{threads} threads: max |dw − dw₀| = {diff:e}; rel err vs reference (dx, dw, db) {}",
            fmt_errs(&errs)
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
    assert!(
        errs.iter().all(|&e| e < 1e-5),
        "errors vs reference {errs:?}"
    );
}
