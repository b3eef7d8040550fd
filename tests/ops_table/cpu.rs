//! CPU rows: every operator of src/cpu/ops, forward and backward, against `m2unet::reference`.

use crate::cuda_common::{rng, to_f32, to_f64, uniform};
use crate::{max_err, Table};
use m2unet::config::GcpMode;
use m2unet::cpu::ops::{conv, linear, loss, mil, norm, pool, tensor, upsample, Dims};
use m2unet::reference::{self, Grads};
use rand::Rng;

// Tolerances of the CPU rows. The operators compute in f32 (unit roundoff 2^-24 ≈ 6e-8) and
// take their long reductions (BatchNorm statistics, losses, weight gradients) in f64.

/// ReLU and max-pool, forward and backward, only select and copy values: they must be exact.
const EXACT: f64 = 0.0;
/// Outputs a few roundings from exact: an f64 result rounded to f32 (losses, GCP, BatchNorm
/// running statistics) or a handful of f32 operations with no sum over a layer's inputs
/// (upsampling, the BatchNorm forward). The errors measured stay below 3e-7.
const FEW: f64 = 1e-6;
/// The rest (convolutions, linear layers, BatchNorm gradients) still sums up to a few hundred
/// f32 terms whose partial sums stay near the result, so the errors measured stay below 1e-6.
/// 1e-5 keeps a margin of about ten while any wrong index, tap or formula shows as an error of
/// order one.
const TOL: f64 = 1e-5;

/// (n, input channel parts, cout, h, w): one part uses the plain entry points, several the
/// concatenating ones.
type ConvShape = (usize, &'static [usize], usize, usize, usize);

const CONV3X3: [ConvShape; 9] = [
    (1, &[1], 1, 1, 1),
    (2, &[3], 4, 7, 1),
    (1, &[3], 5, 5, 7),
    (3, &[5], 3, 7, 5),
    (2, &[20], 9, 9, 13),
    (1, &[1], 64, 9, 13),
    (2, &[7, 6], 10, 6, 11),
    (5, &[2, 3], 6, 3, 4),
    (2, &[2, 0, 4], 5, 7, 9),
];

fn dims_str(d: Dims) -> String {
    format!("{}×{}×{}×{}", d.n, d.c, d.h, d.w)
}

/// Scalar error |got − want| / min(|want|, 1): the larger of the absolute and the relative
/// error (absolute for want = 0).
fn scalar_err(got: f32, want: f64) -> f64 {
    let diff = (got as f64 - want).abs();
    let scale = want.abs().min(1.0);
    if scale > 0.0 {
        diff / scale
    } else {
        diff
    }
}

/// The rows of a layer's gradients (dx, dw, db) against the reference's.
fn grad_rows(t: &mut Table, op: &str, shape: &str, got: [&[f32]; 3], want: &Grads) {
    let want = [&want.dx, &want.dw, &want.db];
    for ((name, got), want) in ["dx", "dw", "db"].into_iter().zip(got).zip(want) {
        t.add(&format!("{op} {name}"), shape, max_err(got, want), TOL);
    }
}

/// Gradient buffers of the given lengths, NaN until an operator writes them.
fn nan_bufs<const K: usize>(lens: [usize; K]) -> [Vec<f32>; K] {
    lens.map(|len| vec![f32::NAN; len])
}

pub fn table() -> Table {
    let mut t = Table::new("cpu");
    conv3x3_rows(&mut t);
    conv1x1_rows(&mut t);
    linear_rows(&mut t);
    bn_rows(&mut t);
    elementwise_rows(&mut t);
    gcp_rows(&mut t);
    loss_rows(&mut t);
    t
}

fn conv3x3_rows(t: &mut Table) {
    let mut g = rng(100);
    for &(n, cs, cout, h, w) in &CONV3X3 {
        let cin: usize = cs.iter().sum();
        let d = Dims::new(n, cin, h, w);
        let x = uniform(&mut g, d.len(), -1.0, 1.0);
        let wt = uniform(&mut g, cout * cin * 9, -1.0, 1.0);
        let b = uniform(&mut g, cout, -1.0, 1.0);
        let dy = uniform(&mut g, n * cout * h * w, -1.0, 1.0);
        let (xf, wf) = (to_f64(&x), to_f64(&wt));
        let want = reference::conv3x3_forward(&xf, d, &wf, &to_f64(&b), cout);
        let want_relu = reference::relu_forward(&want);
        let grads = reference::conv3x3_backward(&xf, d, &wf, &to_f64(&dy), cout);
        let want_dx = reference::split_channels(&grads.dx, n, h * w, cs);
        let shape = format!("{} {cs:?}→{cout}", dims_str(d));
        let concat = cs.len() > 1;
        let op = if concat { "concat+conv3x3" } else { "conv3x3" };
        let parts_data: Vec<Vec<f32>> = (reference::split_channels(&xf, n, h * w, cs).iter())
            .map(|p| to_f32(p))
            .collect();
        let parts: Vec<(&[f32], usize)> = (parts_data.iter().map(|p| p.as_slice()))
            .zip(cs.iter().copied())
            .collect();
        let [mut y, mut yr] = nan_bufs([want.len(); 2]);
        if concat {
            conv::conv3x3_forward_concat(&parts, d, &wt, &b, cout, false, &mut y);
            conv::conv3x3_forward_concat(&parts, d, &wt, &b, cout, true, &mut yr);
        } else {
            conv::conv3x3_forward(&x, d, &wt, &b, cout, &mut y);
            conv::conv3x3_relu_forward(&x, d, &wt, &b, cout, &mut yr);
        }
        t.add(op, &shape, max_err(&y, &want), TOL);
        t.add(&format!("{op}+relu"), &shape, max_err(&yr, &want_relu), TOL);
        // The gradients with every dx wanted, then without the first part's (with one part:
        // dw and db alone, as for the first layer).
        for skip_first in [false, true] {
            let mut dx: Vec<Vec<f32>> = cs.iter().map(|&c| vec![f32::NAN; n * c * h * w]).collect();
            let [mut dw, mut db] = nan_bufs([wt.len(), cout]);
            let mut slots: Vec<Option<&mut [f32]>> = (dx.iter_mut().enumerate())
                .map(|(i, v)| (i > 0 || !skip_first).then_some(v.as_mut_slice()))
                .collect();
            if concat {
                conv::conv3x3_backward_concat(
                    &parts, d, &wt, &dy, cout, &mut slots, &mut dw, &mut db,
                );
            } else {
                let dx = slots.pop().unwrap();
                conv::conv3x3_backward(&x, d, &wt, &dy, cout, dx, &mut dw, &mut db);
            }
            let tag = match (skip_first, concat) {
                (false, _) => "",
                (true, true) => ", no dx[0]",
                (true, false) => ", no dx",
            };
            for (i, (got, want)) in dx.iter().zip(&want_dx).enumerate() {
                if i > 0 || !skip_first {
                    let name = if concat {
                        format!("{op} dx[{i}]{tag}")
                    } else {
                        format!("{op} dx")
                    };
                    t.add(&name, &shape, max_err(got, want), TOL);
                }
            }
            t.add(
                &format!("conv3x3 dw{tag}"),
                &shape,
                max_err(&dw, &grads.dw),
                TOL,
            );
            t.add(
                &format!("conv3x3 db{tag}"),
                &shape,
                max_err(&db, &grads.db),
                TOL,
            );
        }
    }
}

fn conv1x1_rows(t: &mut Table) {
    let mut g = rng(101);
    for (d, cout) in [
        (Dims::new(1, 1, 1, 1), 1),
        (Dims::new(2, 3, 7, 1), 4),
        (Dims::new(1, 17, 5, 7), 5),
        (Dims::new(3, 20, 4, 6), 9),
    ] {
        let x = uniform(&mut g, d.len(), -1.0, 1.0);
        let wt = uniform(&mut g, cout * d.c, -1.0, 1.0);
        let b = uniform(&mut g, cout, -1.0, 1.0);
        let dy = uniform(&mut g, d.n * cout * d.hw(), -1.0, 1.0);
        let (xf, wf) = (to_f64(&x), to_f64(&wt));
        let want = reference::conv1x1_forward(&xf, d, &wf, &to_f64(&b), cout);
        let grads = reference::conv1x1_backward(&xf, d, &wf, &to_f64(&dy), cout);
        let [mut y, mut dx, mut dw, mut db] = nan_bufs([want.len(), x.len(), wt.len(), cout]);
        conv::conv1x1_forward(&x, d, &wt, &b, cout, &mut y);
        conv::conv1x1_backward(&x, d, &wt, &dy, cout, Some(&mut dx), &mut dw, &mut db);
        let shape = format!("{}→{cout}", dims_str(d));
        t.add("conv1x1", &shape, max_err(&y, &want), TOL);
        grad_rows(t, "conv1x1", &shape, [&dx, &dw, &db], &grads);
    }
}

fn linear_rows(t: &mut Table) {
    let mut g = rng(102);
    for (m, fin, fout) in [(1, 1, 1), (3, 5, 2), (70, 9, 131), (130, 17, 3), (4, 0, 3)] {
        let x = uniform(&mut g, m * fin, -1.0, 1.0);
        let w = uniform(&mut g, fout * fin, -1.0, 1.0);
        let b = uniform(&mut g, fout, -1.0, 1.0);
        let dy = uniform(&mut g, m * fout, -1.0, 1.0);
        let (xf, wf) = (to_f64(&x), to_f64(&w));
        let want = reference::linear_forward(&xf, m, fin, &wf, &to_f64(&b), fout);
        let grads = reference::linear_backward(&xf, m, fin, &wf, &to_f64(&dy), fout);
        let [mut y, mut dx, mut dw, mut db] = nan_bufs([m * fout, m * fin, fout * fin, fout]);
        linear::linear_forward(&x, m, fin, &w, &b, fout, &mut y);
        linear::linear_backward(&x, m, fin, &w, &dy, fout, Some(&mut dx), &mut dw, &mut db);
        let shape = format!("{m}×{fin}→{fout}");
        t.add("linear", &shape, max_err(&y, &want), TOL);
        grad_rows(t, "linear", &shape, [&dx, &dw, &db], &grads);
    }
}

/// BatchNorm (2d, or 1d as hw = 1) fused with ReLU: train forward with the running-statistics
/// update, eval forward, train backward.
fn bn_rows(t: &mut Table) {
    let mut g = rng(103);
    // At least three values per channel: with two, x̂ = ±1 and dx is a difference of nearly
    // equal terms, a cancellation no f32 implementation can resolve to 1e-5.
    for (n, c, hw) in [
        (3, 2, 1),
        (3, 2, 5),
        (6, 1, 1),
        (4, 5, 1),
        (2, 3, 49),
        (1, 4, 7),
        (2, 3, 7),
    ] {
        let len = n * c * hw;
        let x = uniform(&mut g, len, -2.0, 2.0);
        let gamma = uniform(&mut g, c, 0.5, 1.5);
        let beta = uniform(&mut g, c, -0.3, 0.3);
        let (rm0, rv0) = (uniform(&mut g, c, -0.2, 0.2), uniform(&mut g, c, 0.5, 2.0));
        let dy = uniform(&mut g, len, -1.0, 1.0);
        let (xf, gf, bf) = (to_f64(&x), to_f64(&gamma), to_f64(&beta));
        let batch = reference::bn_train_forward(&xf, c, hw, &gf, &bf);
        let (want_rm, want_rv) =
            reference::bn_running_update(&to_f64(&rm0), &to_f64(&rv0), &batch, n * hw);
        let dz = reference::relu_backward(&batch.y, &to_f64(&dy));
        let grads = reference::bn_train_backward(&xf, c, hw, &gf, &batch, &dz);
        let eval = reference::bn_eval_forward(&xf, c, hw, &gf, &bf, &to_f64(&rm0), &to_f64(&rv0));

        let (mut y, mut mean, mut invstd) = (vec![f32::NAN; len], vec![0.0; c], vec![0.0; c]);
        let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
        norm::bn_relu_train_forward(
            &x,
            n,
            c,
            hw,
            &gamma,
            &beta,
            &mut y,
            &mut mean,
            &mut invstd,
            &mut rm,
            &mut rv,
        );
        let (mut dx, mut dg, mut db) = (vec![f32::NAN; len], vec![0.0; c], vec![0.0; c]);
        norm::bn_relu_backward(
            &x, &y, n, c, hw, &gamma, &mean, &invstd, &dy, &mut dx, &mut dg, &mut db,
        );
        let mut ye = vec![f32::NAN; len];
        norm::bn_relu_eval_forward(&x, n, c, hw, &gamma, &beta, &rm0, &rv0, &mut ye);
        let shape = format!("n{n} c{c} hw{hw}");
        t.add(
            "bn+relu train",
            &shape,
            max_err(&y, &reference::relu_forward(&batch.y)),
            FEW,
        );
        t.add("bn running mean", &shape, max_err(&rm, &want_rm), FEW);
        t.add("bn running var", &shape, max_err(&rv, &want_rv), FEW);
        t.add("bn+relu dx", &shape, max_err(&dx, &grads.dx), TOL);
        t.add("bn+relu dgamma", &shape, max_err(&dg, &grads.dgamma), TOL);
        t.add("bn+relu dbeta", &shape, max_err(&db, &grads.dbeta), TOL);
        t.add(
            "bn+relu eval",
            &shape,
            max_err(&ye, &reference::relu_forward(&eval)),
            FEW,
        );
    }
}

/// ReLU, 2×2 max-pool and bilinear ×2 upsampling, forward and backward.
fn elementwise_rows(t: &mut Table) {
    let mut g = rng(104);
    for len in [1, 7, 1000] {
        let x = uniform(&mut g, len, -1.0, 1.0);
        let dy = uniform(&mut g, len, -1.0, 1.0);
        let (mut y, mut dx) = (vec![f32::NAN; len], vec![f32::NAN; len]);
        tensor::relu_forward(&x, &mut y);
        tensor::relu_backward(&y, &dy, &mut dx);
        let xf = to_f64(&x);
        let shape = format!("{len}");
        t.add(
            "relu",
            &shape,
            max_err(&y, &reference::relu_forward(&xf)),
            EXACT,
        );
        let want_dx = reference::relu_backward(&xf, &to_f64(&dy));
        t.add("relu dx", &shape, max_err(&dx, &want_dx), EXACT);
    }
    for d in [
        Dims::new(1, 1, 2, 2),
        Dims::new(2, 3, 4, 6),
        Dims::new(1, 2, 8, 2),
        Dims::new(3, 1, 6, 10),
    ] {
        let olen = d.len() / 4;
        let x = uniform(&mut g, d.len(), -1.0, 1.0);
        let dy = uniform(&mut g, olen, -1.0, 1.0);
        let (mut y, mut am, mut dx) = (vec![f32::NAN; olen], vec![0u8; olen], vec![0.0; d.len()]);
        pool::maxpool2x2_forward(&x, d, &mut y, &mut am);
        pool::maxpool2x2_backward(&dy, d, &am, &mut dx);
        let xf = to_f64(&x);
        let want_dx = reference::maxpool2x2_backward(&xf, d, &to_f64(&dy));
        t.add(
            "maxpool2x2",
            &dims_str(d),
            max_err(&y, &reference::maxpool2x2_forward(&xf, d)),
            EXACT,
        );
        t.add("maxpool2x2 dx", &dims_str(d), max_err(&dx, &want_dx), EXACT);
    }
    for d in [
        Dims::new(1, 1, 1, 1),
        Dims::new(1, 2, 3, 5),
        Dims::new(2, 3, 4, 1),
        Dims::new(2, 1, 7, 6),
    ] {
        let x = uniform(&mut g, d.len(), -1.0, 1.0);
        let dy = uniform(&mut g, 4 * d.len(), -1.0, 1.0);
        let (mut y, mut dx) = (vec![f32::NAN; 4 * d.len()], vec![f32::NAN; d.len()]);
        upsample::upsample2x_forward(&x, d, &mut y);
        upsample::upsample2x_backward(&dy, d, &mut dx);
        let want = reference::upsample2x_forward(&to_f64(&x), d);
        let want_dx = reference::upsample2x_backward(&to_f64(&dy), d);
        t.add("upsample2x", &dims_str(d), max_err(&y, &want), FEW);
        t.add("upsample2x dx", &dims_str(d), max_err(&dx, &want_dx), FEW);
    }
}

/// (k, rows, bags as (first row, rows)).
type GcpCase = (usize, usize, &'static [(usize, usize)]);

/// GCP over bags of instance rows (unsorted bags, a row in no bag, a bag of one).
fn gcp_rows(t: &mut Table) {
    let mut g = rng(105);
    let cases: [GcpCase; 3] = [
        (3, 13, &[(8, 2), (0, 5), (5, 1), (10, 2)]),
        (1, 1, &[(0, 1)]),
        (70, 12, &[(0, 4), (4, 4), (8, 4)]),
    ];
    for mode in [GcpMode::MaxMinusMean, GcpMode::Max, GcpMode::Mean] {
        for &(k, rows, bags) in &cases {
            let x = uniform(&mut g, rows * k, -1.0, 1.0);
            let dout = uniform(&mut g, bags.len() * k, -1.0, 1.0);
            let (mut out, mut am) = (vec![f32::NAN; bags.len() * k], vec![0; bags.len() * k]);
            mil::gcp_forward(&x, k, bags, mode, &mut out, &mut am);
            let mut dx = vec![f32::NAN; rows * k];
            mil::gcp_backward(&dout, k, bags, mode, &am, &mut dx);
            let xf = to_f64(&x);
            let want = reference::gcp_forward(&xf, k, bags, mode);
            let want_dx = reference::gcp_backward(&xf, k, bags, mode, &to_f64(&dout));
            let shape = format!("k{k} bags {bags:?}");
            t.add(&format!("gcp {mode}"), &shape, max_err(&out, &want), FEW);
            t.add(
                &format!("gcp {mode} dx"),
                &shape,
                max_err(&dx, &want_dx),
                FEW,
            );
        }
    }
}

/// Segmentation loss (CE + soft Dice, ignored pixels) and classification CE, values and
/// logit gradients (the CPU ops scale the gradient; the reference's is unscaled).
fn loss_rows(t: &mut Table) {
    let mut g = rng(106);
    for (m, c, hw, ignore_all) in [
        (1, 2, 5, false),
        (2, 6, 7, false),
        (3, 3, 4, false),
        (2, 3, 4, true),
    ] {
        let z = uniform(&mut g, m * c * hw, -2.0, 2.0);
        let labels: Vec<i64> = (0..m * hw)
            .map(|_| {
                if ignore_all {
                    -1
                } else {
                    g.gen_range(-1..c as i64)
                }
            })
            .collect();
        let scale = 0.7f32;
        let mut d = vec![f32::NAN; z.len()];
        let (ce, dice) = loss::seg_loss(&z, m, c, hw, &labels, scale, Some(&mut d)).unwrap();
        let want = reference::seg_loss(&to_f64(&z), m, c, hw, &labels);
        let want_d: Vec<f64> = want.dlogits.iter().map(|v| scale as f64 * v).collect();
        let shape = format!(
            "m{m} c{c} hw{hw}{}",
            if ignore_all { " all ignored" } else { "" }
        );
        t.add("seg_loss ce", &shape, scalar_err(ce, want.ce), FEW);
        t.add("seg_loss dice", &shape, scalar_err(dice, want.dice), FEW);
        t.add("seg_loss dlogits", &shape, max_err(&d, &want_d), FEW);
    }
    for (b, c, weighted) in [(5, 3, true), (1, 2, false), (7, 2, true)] {
        let z = uniform(&mut g, b * c, -3.0, 3.0);
        let labels: Vec<i64> = (0..b).map(|_| g.gen_range(0..c as i64)).collect();
        let w = uniform(&mut g, c, 0.3, 2.5);
        let weights = weighted.then_some(w.as_slice());
        let mut d = vec![f32::NAN; b * c];
        let loss = loss::cls_loss(&z, b, c, &labels, weights, 1.5, Some(&mut d)).unwrap();
        let wf = to_f64(&w);
        let (want, want_d) = reference::cls_loss(
            &to_f64(&z),
            b,
            c,
            &labels,
            weighted.then_some(wf.as_slice()),
        );
        let want_d: Vec<f64> = want_d.iter().map(|v| 1.5 * v).collect();
        let shape = format!("b{b} c{c}{}", if weighted { " weighted" } else { "" });
        t.add("cls_loss", &shape, scalar_err(loss, want), FEW);
        t.add("cls_loss dlogits", &shape, max_err(&d, &want_d), FEW);
    }
}
