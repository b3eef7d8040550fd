//! Tests of the convolutions: every backend and blocking, forward and backward, against
//! `reference`, and bit-reproducibility across thread counts. The public entry points
//! (this machine's backend, the production blocking) are rows of the op table
//! (tests/ops_table/cpu.rs).

use super::*;
use crate::cpu::ops::tensor::test_support::{max_abs_diff, rand_vec, rng, to_f64};
use crate::reference::{self, Grads};
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

/// The backends this CPU can run (the portable one always), each with the production and
/// the SMALL blocking.
fn plans() -> Vec<Plan> {
    let mut backends = vec![Backend::Portable];
    if Backend::detect() != Backend::Portable {
        backends.push(Backend::detect());
    }
    (backends.into_iter())
        .flat_map(|be| [BLOCKING, SMALL].map(|bl| Plan { be, bl }))
        .collect()
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

/// A shape's dims and random input x and weights (values in [-1, 1)), and x split into
/// tensors [n, c_i, h, w] (reference::split_channels, in f32).
fn shape_inputs(
    rng: &mut ChaCha8Rng,
    &(n, cs, cout, h, w): &ConvShape,
    taps: usize,
) -> (Dims, Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let d = Dims::new(n, cs.iter().sum(), h, w);
    let x = rand_vec(rng, d.len(), -1.0, 1.0);
    let wt = rand_vec(rng, cout * d.c * taps, -1.0, 1.0);
    let parts = (reference::split_channels(&to_f64(&x), n, d.hw(), cs).iter())
        .map(|p| p.iter().map(|&v| v as f32).collect())
        .collect();
    (d, x, wt, parts)
}

/// Each part with its channel count, as the convolutions take their input.
fn as_parts<'a>(data: &'a [Vec<f32>], cs: &[usize]) -> Vec<(&'a [f32], usize)> {
    (data.iter().map(|p| p.as_slice()))
        .zip(cs.iter().copied())
        .collect()
}

fn fmt_errs(errs: &[f64]) -> String {
    let v: Vec<String> = errs.iter().map(|e| format!("{e:.2e}")).collect();
    v.join(", ")
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
    let mut g = rng(7);
    for shape @ &(n, cs, cout, h, w) in &FORWARD_SHAPES {
        let (d, x, wt, parts_data) = shape_inputs(&mut g, shape, taps);
        let b = rand_vec(&mut g, cout, -1.0, 1.0);
        let want = ref_forward(&x, d, taps, &wt, &b, cout);
        let want_relu = reference::relu_forward(&want);
        let parts = as_parts(&parts_data, cs);
        for plan in plans() {
            for relu in [false, true] {
                let mut y = vec![f32::NAN; n * cout * h * w];
                plan.forward(&parts, d, taps, &wt, &b, cout, relu, &mut y);
                let err = max_abs_diff(&y, if relu { &want_relu } else { &want });
                println!(
                    "taps {taps} {:?} fwd_k {} n{n} c{cs:?}→{cout} {h}×{w} relu {relu}: max abs err {err:.2e}",
                    plan.be, plan.bl.fwd_k
                );
                assert!(err < 1e-4, "forward error {err}");
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

const BACKWARD_SHAPES: [ConvShape; 6] = [
    (2, &[3], 4, 7, 1),
    (2, &[3], 4, 5, 7),
    (1, &[1], 3, 6, 4),
    (2, &[2, 3], 9, 9, 13),
    (3, &[4], 6, 1, 5),
    (5, &[2, 3], 6, 3, 4),
];

fn check_backward(taps: usize) {
    let mut g = rng(3);
    for shape @ &(n, cs, cout, h, w) in &BACKWARD_SHAPES {
        let (d, x, wt, parts_data) = shape_inputs(&mut g, shape, taps);
        let r = rand_vec(&mut g, n * cout * h * w, -1.0, 1.0);
        let want = ref_backward(&x, d, taps, &wt, &r, cout);
        let want_dx = reference::split_channels(&want.dx, n, h * w, cs);
        let parts = as_parts(&parts_data, cs);
        for plan in plans() {
            let mut dx_data: Vec<Vec<f32>> =
                cs.iter().map(|&c| vec![f32::NAN; n * c * h * w]).collect();
            let mut dx: Vec<Option<&mut [f32]>> =
                dx_data.iter_mut().map(|v| Some(v.as_mut_slice())).collect();
            let mut dw = vec![f32::NAN; wt.len()];
            let mut db = vec![f32::NAN; cout];
            plan.backward(&parts, d, taps, &wt, &r, cout, &mut dx, &mut dw, &mut db);
            let ex: Vec<f64> = dx_data
                .iter()
                .zip(&want_dx)
                .map(|(g, r)| rel_err(g, r))
                .collect();
            let (ew, eb) = (rel_err(&dw, &want.dw), rel_err(&db, &want.db));
            println!(
                "taps {taps} {:?} dw_k {} n{n} c{cs:?}→{cout} {h}×{w}: rel err dx [{}] dw {ew:.2e} db {eb:.2e}",
                plan.be,
                plan.bl.dw_k,
                fmt_errs(&ex)
            );
            assert!(ex.iter().all(|&e| e < 1e-5) && ew < 1e-5 && eb < 1e-5);
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
fn conv3x3_backward_is_bit_reproducible() {
    let mut g = rng(13);
    let (d, cout) = (Dims::new(2, 64, 32, 32), 64);
    let x = rand_vec(&mut g, d.len(), -1.0, 1.0);
    let w = rand_vec(&mut g, cout * d.c * 9, -1.0, 1.0);
    let dy = rand_vec(&mut g, d.n * cout * d.hw(), -1.0, 1.0);
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
