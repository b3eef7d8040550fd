//! Device rows of kernels/heads_grad.cu: the seg loss with the seg head's backward, the cls loss, and the MIL head's backward (linear, GCP, BatchNorm1d + ReLU, concepts).
//!
//! Softmax errors, used by the loss rows: with R the largest |z_k − max z| of a logit vector,
//! each p_k = exp(z_k − max)/Σ errs by at most (c + 6 + R)·ACC relative (the subtraction
//! R·ACC/2, expf 2 ulps, the sum of c terms, the division), and log Σ − (z_l − max) by
//! (c + 4)·ACC + 2·ACC·(ce + R) absolute (logf and the sum's relative error, two roundings).

use crate::cuda_common::*;
use crate::device::{abs, bn_params, Launch, ACC};
use crate::head_kernels::{argmax_mismatches, with_duplicates};
use crate::{max_abs, max_err, Table};
use m2unet::config::BN_EPS;
use m2unet::cpu::ops::Dims;
use m2unet::cuda::kernels::*;
use m2unet::cuda::weights::{pad8, transpose};
use m2unet::cuda::Device;
use m2unet::reference;
use rand::Rng;

pub fn rows(dev: &mut Device, t: &mut Table) {
    seg_loss_rows(dev, t);
    cls_loss_rows(dev, t);
    linear_bwd_rows(dev, t);
    gcp_bwd_rows(dev, t);
    bn1d_bwd_rows(dev, t);
    concepts_bwd_rows(dev, t);
}

/// The loss scale the loss rows run with (a power of two, as GradScaler's).
const SCALE: f32 = 1024.0;

fn amp_buffer(dev: &mut Device, scale: f32) -> Guarded {
    let amp = AmpState {
        scale,
        ..AmpState::default()
    };
    Guarded::with(dev, &[amp])
}

/// Softmax of a logit vector and its spread R = max |z_k − max z|.
fn softmax(z: &[f64]) -> (Vec<f64>, f64) {
    let top = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - top).exp()).collect();
    let s: f64 = e.iter().sum();
    let spread = z.iter().map(|v| top - v).fold(0.0, f64::max);
    (e.iter().map(|v| v / s).collect(), spread)
}

/// Which pixels of the seg rows carry no label.
#[derive(Clone, Copy, Debug)]
enum Ignore {
    /// About one in (classes + 1), at random.
    Some,
    /// Every pixel of image 0 (and some of the others).
    FirstImage,
    /// Every pixel: no labelled pixel in the batch.
    All,
}

/// Error bounds of the seg loss kernels: (ce, dice, per-element dlogits [n, classes, hw]).
/// Sums: the loss sums run through at most 8 + 128 + blocks roundings (per thread, over the
/// threads, over the blocks), each of at most ACC·Σ|terms|. With those, Σp·y and Σp err by
/// their softmax errors plus that; num_k = 2Σp·y + 1 and den_k = Σp + Σy + 1 carry them into
/// num/den (hence dice) and into the coefficients A_k = 2/(den (c−1)), B_k = num/(den² (c−1))
/// of g_k = −A_k y_k + B_k (one more rounding each). A pixel's
/// dlogits_j = S·λ·((p_j − y_j)/N + p_j (g_j − Σ_k p_k g_k)) then errs by at most
/// S·λ·((E p_j + 3 ACC |p_j − y_j|)/N + p_j (2 E G + (c + 3) ACC G + 2 δg)) with E the
/// softmax error, G = |g_j| + Σ_k p_k |g_k| and δg the largest coefficient error.
fn seg_bounds(
    logits: &[f64],
    (n, classes, hw): (usize, usize, usize),
    labels: &[i64],
    s_l: f64,
) -> (f64, f64, Vec<f64>) {
    let c = classes;
    let fg = (c - 1) as f64;
    let k_loss = (136 + (n * hw).div_ceil(1024)) as f64;
    let (mut inter, mut psum, mut ysum) = (vec![0.0; c], vec![0.0; c], vec![0.0; c]);
    let (mut dinter, mut dpsum) = (vec![0.0; c], vec![0.0; c]);
    let (mut ce_sum, mut ce_err, mut count) = (0.0, 0.0, 0.0);
    let mut pixels = vec![];
    for i in 0..n {
        for p in 0..hw {
            let l = labels[i * hw + p];
            if l < 0 {
                continue;
            }
            let z: Vec<f64> = (0..c).map(|k| logits[(i * c + k) * hw + p]).collect();
            let (q, spread) = softmax(&z);
            let e = (c as f64 + 6.0 + spread) * ACC;
            let ce = -q[l as usize].ln();
            ce_sum += ce;
            ce_err += (c as f64 + 4.0) * ACC + 2.0 * ACC * (ce + spread);
            count += 1.0;
            for k in 0..c {
                psum[k] += q[k];
                dpsum[k] += e * q[k];
                if k as i64 == l {
                    inter[k] += q[k];
                    dinter[k] += e * q[k];
                    ysum[k] += 1.0;
                }
            }
            pixels.push((i, p, l as usize, q, e));
        }
    }
    let mut dl = vec![0.0; logits.len()];
    if count == 0.0 {
        return (0.0, 0.0, dl);
    }
    let ce = ce_sum / count;
    let ce_bound = ce_err / count + k_loss * ACC * ce + ACC * ce;
    let (mut dice_bound, mut dg) = (2.0 * ACC, 0.0f64);
    let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
    for k in 1..c {
        let dnum = 2.0 * (dinter[k] + k_loss * ACC * inter[k]);
        let dden = dpsum[k] + k_loss * ACC * psum[k];
        let (num, den) = (2.0 * inter[k] + 1.0, psum[k] + ysum[k] + 1.0);
        dice_bound += (dnum / den + num * dden / (den * den)) / fg;
        a[k] = 2.0 / (den * fg);
        b[k] = num / (den * den * fg);
        let da = a[k] * (dden / den + ACC);
        let db = b[k] * (dnum / num + 2.0 * dden / den + ACC);
        dg = dg.max(da + db);
    }
    for (i, p, l, q, e) in pixels {
        let g: Vec<f64> = (0..c)
            .map(|k| if k == l { b[k] - a[k] } else { b[k] })
            .collect();
        let spread_g: f64 = q.iter().zip(&g).map(|(p, g)| p * g.abs()).sum();
        for j in 0..c {
            let y = if j == l { 1.0 } else { 0.0 };
            let big_g = g[j].abs() + spread_g;
            let own = (e * q[j] + 3.0 * ACC * (q[j] - y).abs()) / count;
            let dice = q[j] * (2.0 * e * big_g + (c as f64 + 3.0) * ACC * big_g + 2.0 * dg);
            dl[(i * c + j) * hw + p] = s_l * (own + dice);
        }
    }
    (ce_bound, dice_bound, dl)
}

/// seg_loss_backward: the losses (= reference::seg_loss) and, from its dlogits·S·λ, the seg
/// head's dx (+= onto a prefilled dY), dW and db (= reference::conv1x1_backward). dx's bound:
/// the dlogits bounds through |w|, the fp32 sum of `classes` terms and the +=; dW/db's: through
/// |x|, and sums of at most min(pixels, 1024) + blocks roundings.
fn seg_loss_rows(dev: &mut Device, t: &mut Table) {
    const LAMBDA: f32 = 0.75;
    for (n, h, w, c_real, classes, ignore) in [
        (2, 5, 7, 12, 3, Ignore::Some),
        (3, 19, 23, 16, 4, Ignore::FirstImage),
        (1, 3, 3, 5, 2, Ignore::All),
        (1, 1, 1, 3, 2, Ignore::Some),
        (1, 33, 35, 9, 16, Ignore::Some),
    ] {
        let mut r = rng((n * 1000 + h * 10 + classes) as u64);
        let (c, hw) = (pad8(c_real), h * w);
        let pixels = n * hw;
        let x = round_f16(&uniform(&mut r, n * c_real * hw, 0.0, 1.0));
        let wgt = uniform(&mut r, classes * c_real, -0.5, 0.5);
        let logits = uniform(&mut r, n * classes * hw, -3.0, 3.0);
        let mut labels: Vec<i32> = (0..pixels)
            .map(|_| r.gen_range(0..=classes as i32) - 1)
            .collect();
        // At least one labelled pixel where some are wanted (the 1-pixel batch).
        match ignore {
            Ignore::Some => labels[0] = labels[0].max(0),
            Ignore::FirstImage => labels[..hw].fill(-1),
            Ignore::All => labels.fill(-1),
        }
        let prefill = nchw_to_nhwc(
            &uniform(&mut r, pixels * c_real, -1.0, 1.0),
            pixels,
            c_real,
            1,
            c,
        );

        let (xf, wf, lf) = (to_f64(&x), to_f64(&wgt), to_f64(&logits));
        let l64: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        let want = reference::seg_loss(&lf, n, classes, hw, &l64);
        let s_l = SCALE as f64 * LAMBDA as f64;
        let dl: Vec<f64> = want.dlogits.iter().map(|v| v * s_l).collect();
        let d = Dims::new(n, c_real, h, w);
        let g = reference::conv1x1_backward(&xf, d, &wf, &dl, classes);
        let mut want_dx = nchw_to_nhwc(&g.dx, n, c_real, hw, c);
        for (v, p) in want_dx.iter_mut().zip(&prefill) {
            *v += *p as f64;
        }
        let (ce_b, dice_b, dl_b) = seg_bounds(&lf, (n, classes, hw), &l64, s_l);
        let (xa, wa) = (abs(&xf), abs(&wf));
        let prop = reference::conv1x1_backward(&xa, d, &wa, &dl_b, classes);
        let terms = reference::conv1x1_backward(&xa, d, &wa, &abs(&dl), classes);
        let k_w = (pixels.min(1024) + pixels.div_ceil(1024)) as f64;
        let bound = |p: &[f64], s: &[f64], k: f64| {
            (p.iter().zip(s))
                .map(|(p, s)| p + k * ACC * s)
                .fold(0.0, f64::max)
        };
        let dx_prop = nchw_to_nhwc(&prop.dx, n, c_real, hw, c);
        let dx_terms = nchw_to_nhwc(&terms.dx, n, c_real, hw, c);
        let dx_b = bound(&dx_prop, &dx_terms, (classes + 1) as f64) + ACC * max_abs(&want_dx);

        let gl = Guarded::with(dev, &logits);
        let glab = Guarded::with(dev, &labels);
        let gx = Guarded::with(dev, &to_f16(&nchw_to_nhwc(&x, n, c_real, hw, c)));
        let gw = Guarded::with(dev, &wgt);
        let gamp = amp_buffer(dev, SCALE);
        let gloss = Guarded::new(dev, 16);
        let gdx = Guarded::with(dev, &prefill);
        let gdw = Guarded::with(dev, &vec![7f32; classes * c_real]);
        let gdb = Guarded::with(dev, &vec![7f32; classes]);
        let mut p = SegLossParams {
            logits: gl.addr(),
            labels: glab.addr(),
            x: gx.addr(),
            w: gw.addr(),
            amp: gamp.addr(),
            partial: 0,
            losses: gloss.addr(),
            dx: gdx.addr(),
            dw: gdw.addr(),
            db: gdb.addr(),
            n: n as i32,
            hw: hw as i32,
            c: c as i32,
            c_real: c_real as i32,
            classes: classes as i32,
            lambda: LAMBDA,
        };
        let gpart = Guarded::new(dev, seg_loss_partial_len(&p) * 4);
        p.partial = gpart.addr();
        seg_loss_backward(dev, &p).unwrap();
        let bufs = [
            &gl, &glab, &gx, &gw, &gamp, &gloss, &gdx, &gdw, &gdb, &gpart,
        ];
        let shape = format!("n{n} {h}×{w} c{c_real}→{classes} {ignore:?}");
        let mut run = Launch::new(t, shape.clone(), dev, &bufs);
        let losses = gloss.read_f32(dev);
        run.output("seg loss ce", &losses[1..2], &[want.ce], 0.0, ce_b);
        run.output("seg loss dice", &losses[2..3], &[want.dice], 0.0, dice_b);
        // losses[0] and [3] belong to others: untouched (zero).
        let others = max_err(&[losses[0], losses[3]], &[0.0, 0.0]);
        run.add("seg loss losses[0,3] untouched", others, 0.0);
        run.output(
            "seg head dw",
            &gdw.read_f32(dev),
            &g.dw,
            0.0,
            bound(&prop.dw, &terms.dw, k_w),
        );
        run.output(
            "seg head db",
            &gdb.read_f32(dev),
            &g.db,
            0.0,
            bound(&prop.db, &terms.db, k_w),
        );
        let mut run = Launch::new(t, shape, dev, &bufs).nhwc(c_real, c);
        run.output("seg head dx (+=)", &gdx.read_f32(dev), &want_dx, 0.0, dx_b);
    }
}

/// cls_loss: the (weighted) CE over the bags and S·dloss/dlogits (= reference::cls_loss). The
/// weighted sums Σ w·ce and Σ w run through ⌈bags/256⌉ + 8 roundings; the loss is their
/// quotient, each dlogit S·w·(p − y)/Σw with the softmax error and three roundings.
fn cls_loss_rows(dev: &mut Device, t: &mut Table) {
    for (bags, classes, weighted) in [
        (5, 2, false),
        (5, 2, true),
        (7, 3, true),
        (1, 2, false),
        (300, 2, true),
    ] {
        let mut r = rng((bags * 100 + classes * 10 + weighted as usize) as u64);
        let logits = uniform(&mut r, bags * classes, -4.0, 4.0);
        let labels: Vec<i32> = (0..bags).map(|_| r.gen_range(0..classes as i32)).collect();
        let weights = uniform(&mut r, classes, 0.3, 3.0);
        let (lf, wf) = (to_f64(&logits), to_f64(&weights));
        let l64: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
        let wopt = weighted.then_some(&wf[..]);
        let (loss, dl) = reference::cls_loss(&lf, bags, classes, &l64, wopt);
        let want: Vec<f64> = dl.iter().map(|v| v * SCALE as f64).collect();

        let weight = |l: usize| if weighted { wf[l] } else { 1.0 };
        let k = (bags.div_ceil(256) + 8) as f64;
        let wsum: f64 = l64.iter().map(|&l| weight(l as usize)).sum();
        let (mut lsum_err, mut lsum) = (0.0, 0.0);
        let mut per_bag = vec![];
        for (b, &l) in l64.iter().enumerate() {
            let (q, spread) = softmax(&lf[b * classes..(b + 1) * classes]);
            let ce = -q[l as usize].ln();
            let w = weight(l as usize);
            lsum += w * ce;
            lsum_err += w * ((classes as f64 + 4.0) * ACC + 2.0 * ACC * (ce + spread) + ACC * ce);
            per_bag.push((q, (classes as f64 + 6.0 + spread) * ACC, w, l as usize));
        }
        let dwsum = k * ACC * wsum;
        let loss_b = (lsum_err + k * ACC * lsum) / wsum + loss * dwsum / wsum + ACC * loss;
        let mut dl_b = 0.0f64;
        for (q, e, w, l) in per_bag {
            for (j, &qj) in q.iter().enumerate() {
                let d = (qj - if j == l { 1.0 } else { 0.0 }).abs();
                let b =
                    w * (e * qj + 2.0 * ACC * d) / wsum + w * d / wsum * (dwsum / wsum + 2.0 * ACC);
                dl_b = dl_b.max(SCALE as f64 * b);
            }
        }

        let gl = Guarded::with(dev, &logits);
        let glab = Guarded::with(dev, &labels);
        let gw = Guarded::with(dev, &weights);
        let gamp = amp_buffer(dev, SCALE);
        let gloss = Guarded::new(dev, 16);
        let gd = Guarded::new(dev, bags * classes * 4);
        let p = ClsLossParams {
            logits: gl.addr(),
            labels: glab.addr(),
            weights: if weighted { gw.addr() } else { 0 },
            amp: gamp.addr(),
            losses: gloss.addr(),
            dlogits: gd.addr(),
            bags: bags as i32,
            classes: classes as i32,
        };
        cls_loss(dev, &p).unwrap();
        let shape = format!("{bags}×{classes} weights {weighted}");
        let mut run = Launch::new(t, shape, dev, &[&gl, &glab, &gw, &gamp, &gloss, &gd]);
        let losses = gloss.read_f32(dev);
        run.output("cls loss", &losses[..1], &[loss], 0.0, loss_b);
        // losses[1..] belong to others: untouched (zero).
        run.add(
            "cls loss losses[1..] untouched",
            max_err(&losses[1..], &[0.0; 3]),
            0.0,
        );
        run.output("cls dlogits", &gd.read_f32(dev), &want, 0.0, dl_b);
    }
}

/// linear_bwd: dx, dW, db of y = x·wᵀ + b through its ReLU (= reference::relu_backward on the
/// post-ReLU output's mask → linear_backward); each an fp32 sum of fout (dx) or rows (dW, db)
/// products.
fn linear_bwd_rows(dev: &mut Device, t: &mut Table) {
    for (rows, fin, fout, relu, with_dx, with_db) in [
        (5, 70, 9, true, true, true),
        (33, 17, 130, false, true, false),
        (1, 1, 1, false, true, true),
        (12, 9, 5, true, false, true),
    ] {
        let mut r = rng((rows * 100 + fin * 10 + fout) as u64);
        let x = uniform(&mut r, rows * fin, -1.0, 1.0);
        let w = uniform(&mut r, fout * fin, -0.3, 0.3);
        let b = uniform(&mut r, fout, -0.1, 0.1);
        let dy = uniform(&mut r, rows * fout, -1.0, 1.0);
        let (xf, wf) = (to_f64(&x), to_f64(&w));
        let pre = reference::linear_forward(&xf, rows, fin, &wf, &to_f64(&b), fout);
        let y = to_f32(&reference::relu_forward(&pre));
        let dyr = if relu {
            reference::relu_backward(&to_f64(&y), &to_f64(&dy))
        } else {
            to_f64(&dy)
        };
        let g = reference::linear_backward(&xf, rows, fin, &wf, &dyr, fout);
        let a = reference::linear_backward(&abs(&xf), rows, fin, &abs(&wf), &abs(&dyr), fout);

        let (gx, gw, gdy, gy) = (
            Guarded::with(dev, &x),
            Guarded::with(dev, &w),
            Guarded::with(dev, &dy),
            Guarded::with(dev, &y),
        );
        let gdx = Guarded::with(dev, &vec![7f32; rows * fin]);
        let gdw = Guarded::with(dev, &vec![7f32; fout * fin]);
        let gdb = Guarded::with(dev, &vec![7f32; fout]);
        let p = LinearBwdParams {
            x: gx.addr(),
            w: gw.addr(),
            dy: gdy.addr(),
            y_relu: if relu { gy.addr() } else { 0 },
            dx: if with_dx { gdx.addr() } else { 0 },
            dw: gdw.addr(),
            db: if with_db { gdb.addr() } else { 0 },
            rows: rows as i32,
            fin: fin as i32,
            fout: fout as i32,
            pad_: 0,
        };
        linear_bwd(dev, &p).unwrap();
        let shape = format!("{rows}×{fin}→{fout} relu {relu}");
        let mut run = Launch::new(t, shape, dev, &[&gx, &gw, &gdy, &gy, &gdx, &gdw, &gdb]);
        let bound = |v: &[f64], k: usize| k as f64 * ACC * max_abs(v);
        // Outputs not asked for stay as they were.
        let untouched = |g: &Guarded, on: bool, want: &[f64]| -> Vec<f64> {
            if on {
                want.to_vec()
            } else {
                vec![7.0; g.bytes / 4]
            }
        };
        let want_dx = untouched(&gdx, with_dx, &g.dx);
        let want_db = untouched(&gdb, with_db, &g.db);
        run.output(
            "linear_bwd dx",
            &gdx.read_f32(dev),
            &want_dx,
            0.0,
            bound(&a.dx, fout),
        );
        run.output(
            "linear_bwd dw",
            &gdw.read_f32(dev),
            &g.dw,
            0.0,
            bound(&a.dw, rows),
        );
        run.output(
            "linear_bwd db",
            &gdb.read_f32(dev),
            &want_db,
            0.0,
            bound(&a.db, rows),
        );
    }
}

/// gcp_bwd: the gradient of bag-level GCP (= reference::gcp_backward), with exact ties (values
/// from a small set) where the first maximum must win. Each value is (coefficient)·dg with the
/// coefficient 1 − 1/n, ±1/n or 1: at most three roundings, 2·ACC relative.
fn gcp_bwd_rows(dev: &mut Device, t: &mut Table) {
    for (k, sizes, ties) in [
        (9, &[2, 3][..], true),
        (1, &[1][..], false),
        (70, &[4, 1, 7][..], true),
        (5, &[6, 2][..], false),
    ] {
        let rows: usize = sizes.iter().sum();
        let mut r = rng((k * 100 + rows) as u64);
        let x: Vec<f32> = if ties {
            (0..rows * k).map(|_| r.gen_range(0..3) as f32).collect()
        } else {
            uniform(&mut r, rows * k, -1.0, 1.0)
        };
        let dg = uniform(&mut r, sizes.len() * k, -1.0, 1.0);
        let mut starts = vec![0i32];
        let mut bags = vec![];
        for &s in sizes {
            bags.push((*starts.last().unwrap() as usize, s));
            starts.push(starts.last().unwrap() + s as i32);
        }
        let (xf, dgf) = (to_f64(&x), to_f64(&dg));
        let (gx, gs, gdg) = (
            Guarded::with(dev, &x),
            Guarded::with(dev, &starts),
            Guarded::with(dev, &dg),
        );
        for gcp in 0..3 {
            let mode = gcp_mode(gcp);
            let want = reference::gcp_backward(&xf, k, &bags, mode, &dgf);
            let gdt = Guarded::with(dev, &vec![7f32; rows * k]);
            let p = GcpBwdParams {
                t: gx.addr(),
                bag_start: gs.addr(),
                dg: gdg.addr(),
                dt: gdt.addr(),
                bags: sizes.len() as i32,
                k: k as i32,
                gcp,
                pad_: 0,
            };
            gcp_bwd(dev, &p).unwrap();
            let shape = format!("k{k} bags {sizes:?} ties {ties}");
            let mut run = Launch::new(t, shape, dev, &[&gx, &gs, &gdg, &gdt]);
            let op = format!("gcp_bwd {mode}");
            run.output(
                &op,
                &gdt.read_f32(dev),
                &want,
                0.0,
                2.0 * ACC * max_abs(&want),
            );
        }
    }
}

/// Per-channel bounds of bn1d_bwd_relu: (dx, dgamma, dbeta). With N rows, M = max|x|,
/// sd = sqrt(var + eps) and e = (N + 2)·ACC: the mean errs by e·M, the variance by e·(1 + 2M/sd)
/// relative (Cauchy–Schwarz on the mean's error through Σ(x − mean)²), invstd by that plus
/// rsqrtf's 2 ulps (e_i), x̂ by e_x = e·M/sd + max|x̂|·(e_i + 2·ACC). dβ = Σ dy·mask and
/// dγ = Σ dy·mask·x̂ are sums of depth ⌈N/128⌉ + 7 ≤ N + 8; dx = γ·invstd/N·T with
/// T = N·dy − dβ − x̂·dγ takes their errors, x̂'s and invstd's, and four more roundings.
fn bn1d_bwd_bounds(
    x: &[f64],
    c: usize,
    batch: &reference::BnBatch,
    gamma: &[f64],
    dyr: &[f64],
    g: &reference::BnGrads,
) -> (f64, f64, f64) {
    let n = x.len() / c;
    let nf = n as f64;
    let e = (n + 2) as f64 * ACC;
    let k = (n + 8) as f64;
    let (mut bx, mut bg, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for ch in 0..c {
        let col = |v: &[f64], i: usize| v[i * c + ch];
        let big = (0..n).map(|i| col(x, i).abs()).fold(0.0, f64::max);
        let sd = (batch.var[ch] + BN_EPS as f64).sqrt();
        let xhat = |i: usize| (col(x, i) - batch.mean[ch]) / sd;
        let xmax = (0..n).map(|i| xhat(i).abs()).fold(0.0, f64::max);
        let ei = e * (1.0 + 2.0 * big / sd) + 2.0 * ACC;
        let ex = e * big / sd + xmax * (ei + 2.0 * ACC);
        let sdy: f64 = (0..n).map(|i| col(dyr, i).abs()).sum();
        let sdyx: f64 = (0..n).map(|i| (col(dyr, i) * xhat(i)).abs()).sum();
        let ddb = k * ACC * sdy;
        let ddg = sdy * ex + (k + 1.0) * ACC * sdyx;
        let kk = gamma[ch].abs() / (nf * sd);
        for i in 0..n {
            let tt = nf * col(dyr, i) - g.dbeta[ch] - xhat(i) * g.dgamma[ch];
            let tabs = nf * col(dyr, i).abs() + g.dbeta[ch].abs() + (xhat(i) * g.dgamma[ch]).abs();
            let dt = ddb + xhat(i).abs() * ddg + g.dgamma[ch].abs() * ex + 3.0 * ACC * tabs;
            bx = bx.max(kk * dt + kk * tt.abs() * (ei + 2.0 * ACC) + ACC * kk * tt.abs());
        }
        bg = bg.max(ddg);
        bb = bb.max(ddb);
    }
    (bx, bg, bb)
}

/// bn1d_bwd_relu: BatchNorm1d (train) + ReLU backward (= reference::relu_backward on the BN
/// output → bn_train_backward with hw = 1).
fn bn1d_bwd_rows(dev: &mut Device, t: &mut Table) {
    for (rows, c) in [(7, 5), (33, 64), (2, 3), (300, 9)] {
        let mut r = rng((rows * 1000 + c + 7) as u64);
        let x = uniform(&mut r, rows * c, -1.0, 3.0);
        let [gamma, beta, _, _] = bn_params(&mut r, c);
        let dy = uniform(&mut r, rows * c, -1.0, 1.0);
        let (xf, gf) = (to_f64(&x), to_f64(&gamma));
        let batch = reference::bn_train_forward(&xf, c, 1, &gf, &to_f64(&beta));
        let dyr = reference::relu_backward(&batch.y, &to_f64(&dy));
        let g = reference::bn_train_backward(&xf, c, 1, &gf, &batch, &dyr);
        let (bx, bg, bb) = bn1d_bwd_bounds(&xf, c, &batch, &gf, &dyr, &g);

        let (gx, gg, gb, gdy) = (
            Guarded::with(dev, &x),
            Guarded::with(dev, &gamma),
            Guarded::with(dev, &beta),
            Guarded::with(dev, &dy),
        );
        let gdx = Guarded::with(dev, &vec![7f32; rows * c]);
        let gdg = Guarded::with(dev, &vec![7f32; c]);
        let gdb = Guarded::with(dev, &vec![7f32; c]);
        let p = Bn1dBwdParams {
            x: gx.addr(),
            gamma: gg.addr(),
            beta: gb.addr(),
            dy: gdy.addr(),
            dx: gdx.addr(),
            dgamma: gdg.addr(),
            dbeta: gdb.addr(),
            rows: rows as i32,
            c: c as i32,
            eps: BN_EPS,
            pad_: 0,
        };
        bn1d_bwd_relu(dev, &p).unwrap();
        let shape = format!("{rows}×{c}");
        let mut run = Launch::new(t, shape, dev, &[&gx, &gg, &gb, &gdy, &gdx, &gdg, &gdb]);
        run.output("bn1d_bwd_relu dx", &gdx.read_f32(dev), &g.dx, 0.0, bx);
        run.output(
            "bn1d_bwd_relu dgamma",
            &gdg.read_f32(dev),
            &g.dgamma,
            0.0,
            bg,
        );
        run.output("bn1d_bwd_relu dbeta", &gdb.read_f32(dev), &g.dbeta, 0.0, bb);
    }
}

/// concepts_bwd after mil_concepts_gcp (which supplies the argmax): = reference::gcp_backward
/// over each patch's instances → linear_backward over the instance rows. dx (+= onto a
/// prefilled dY): k products of the GCP coefficient (two roundings), a sum of k terms and the
/// +=. dW, db: the kernel sums a patch's instances before weighting them, which at most doubles
/// Σ|terms| (the argmax's coefficient is at least half of at_max for n ≥ 2), then the patches:
/// 2·(inst + m + 4)·ACC·Σ|ds·x|. For max − mean db is exactly 0.
fn concepts_bwd_rows(dev: &mut Device, t: &mut Table) {
    for (m, inst, c_real, k) in [(5, 4, 20, 70), (2, 9, 5, 3), (3, 1, 8, 33), (40, 4, 12, 7)] {
        let mut r = rng((m * 100 + inst * 10 + c_real + 3) as u64);
        let c = pad8(c_real);
        let x = uniform(&mut r, m * inst * c_real, 0.0, 2.0);
        let x = with_duplicates(round_f16(&x), m, inst, c_real);
        let wc = uniform(&mut r, k * c_real, -0.3, 0.3);
        let bc = uniform(&mut r, k, -0.1, 0.1);
        let dz = uniform(&mut r, m * k, -1.0, 1.0);
        let prefill = nchw_to_nhwc(
            &uniform(&mut r, m * inst * c_real, -1.0, 1.0),
            m * inst,
            c_real,
            1,
            c,
        );
        let (xf, wf) = (to_f64(&x), to_f64(&wc));
        let rows = m * inst;
        let scores = reference::linear_forward(&xf, rows, c_real, &wf, &to_f64(&bc), k);
        let a =
            reference::linear_forward(&abs(&xf), rows, c_real, &abs(&wf), &abs(&to_f64(&bc)), k);
        let score_bound = (c_real + 1) as f64 * ACC * max_abs(&a);
        let patches: Vec<(usize, usize)> = (0..m).map(|pm| (pm * inst, inst)).collect();

        let gx = Guarded::with(dev, &to_f16(&nchw_to_nhwc(&x, rows, c_real, 1, c)));
        let gwt = Guarded::with(dev, &transpose(&wc, k, c_real));
        let gw = Guarded::with(dev, &wc);
        let gb = Guarded::with(dev, &bc);
        let gdz = Guarded::with(dev, &dz);
        for gcp in 0..3 {
            let mode = gcp_mode(gcp);
            let ds = reference::gcp_backward(&scores, k, &patches, mode, &to_f64(&dz));
            let g = reference::linear_backward(&xf, rows, c_real, &wf, &ds, k);
            let ta = reference::linear_backward(&abs(&xf), rows, c_real, &abs(&wf), &abs(&ds), k);
            let mut want_dx = nchw_to_nhwc(&g.dx, rows, c_real, 1, c);
            for (v, p) in want_dx.iter_mut().zip(&prefill) {
                *v += *p as f64;
            }
            let want_db = if gcp == 0 { vec![0.0; k] } else { g.db.clone() };
            let dx_b = (k + 4) as f64 * ACC * max_abs(&nchw_to_nhwc(&ta.dx, rows, c_real, 1, c))
                + ACC * max_abs(&want_dx);
            let dw_b = 2.0 * (inst + m + 4) as f64 * ACC * max_abs(&ta.dw);
            let db_b = if gcp == 0 {
                0.0
            } else {
                2.0 * (m + 4) as f64 * ACC * max_abs(&ta.db)
            };

            let gz = Guarded::new(dev, m * k * 4);
            let garg = Guarded::new(dev, m * k * 4);
            let fwd = ConceptsGcpParams {
                x: gx.addr(),
                wt: gwt.addr(),
                bias: gb.addr(),
                z: gz.addr(),
                arg: garg.addr(),
                m: m as i32,
                inst: inst as i32,
                c: c as i32,
                c_real: c_real as i32,
                k: k as i32,
                gcp,
            };
            mil_concepts_gcp(dev, &fwd).unwrap();
            let gdx = Guarded::with(dev, &prefill);
            let gdw = Guarded::with(dev, &vec![7f32; k * c_real]);
            let gdb = Guarded::with(dev, &vec![7f32; k]);
            let mut p = ConceptsBwdParams {
                x: gx.addr(),
                w: gw.addr(),
                dz: gdz.addr(),
                arg: garg.addr(),
                dx: gdx.addr(),
                dw: gdw.addr(),
                db: gdb.addr(),
                partial: 0,
                m: m as i32,
                inst: inst as i32,
                c: c as i32,
                c_real: c_real as i32,
                k: k as i32,
                gcp,
            };
            let gpart = Guarded::new(dev, concepts_bwd_partial_len(&p) * 4);
            p.partial = gpart.addr();
            concepts_bwd(dev, &p).unwrap();
            let bufs = [&gx, &gw, &gdz, &garg, &gdx, &gdw, &gdb, &gpart];
            let shape = format!("m{m} inst{inst} c{c_real}→{k}");
            let mut run = Launch::new(t, shape.clone(), dev, &bufs);
            // The backward is only comparable where the argmax is clear or an exact tie.
            let (wrong, clear) =
                argmax_mismatches(&garg.read_i32(dev), &scores, &x, inst, k, score_bound);
            let unclear = if clear == m * k { 0.0 } else { f64::INFINITY };
            let err = wrong as f64 + unclear;
            run.add(&format!("concepts_bwd arg {mode}"), err, 0.0);
            run.output(
                &format!("concepts_bwd dw {mode}"),
                &gdw.read_f32(dev),
                &g.dw,
                0.0,
                dw_b,
            );
            run.output(
                &format!("concepts_bwd db {mode}"),
                &gdb.read_f32(dev),
                &want_db,
                0.0,
                db_b,
            );
            let mut run = Launch::new(t, shape, dev, &bufs).nhwc(c_real, c);
            run.output(
                &format!("concepts_bwd dx {mode} (+=)"),
                &gdx.read_f32(dev),
                &want_dx,
                0.0,
                dx_b,
            );
        }
    }
}
