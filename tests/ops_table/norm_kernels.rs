//! Device rows of kernels/norm.cu: training-mode BatchNorm2d (bn_stats, bn_finalize, bn_apply
//! with ReLU and max-pool) and BatchNorm1d (bn1d_train_relu), outputs, batch and running
//! statistics.

use crate::cuda_common::*;
use crate::device::{bn_params, Launch, ACC, U16};
use crate::{max_err, Table};
use m2unet::config::{BN_EPS, BN_MOMENTUM};
use m2unet::cpu::ops::Dims;
use m2unet::cuda::kernels::*;
use m2unet::cuda::weights::pad8;
use m2unet::cuda::Device;
use m2unet::reference::{self, BnBatch};

pub fn rows(dev: &mut Device, t: &mut Table) {
    bn_rows(dev, t);
    bn1d_rows(dev, t);
}

/// Bounds of training-mode BatchNorm + ReLU computed in fp32 (the maxima over the channels).
struct BnBounds {
    y: f64,
    mean: f64,
    invstd: f64,
    running_mean: f64,
    running_var: f64,
}

/// Per-channel bounds of training-mode BatchNorm + ReLU computed in fp32. x is [N, c] (N
/// values per channel), `eps` bounds the relative error of the fp32 statistics. To first
/// order, with M = max|x| of the channel, sd = sqrt(var + eps_bn) and s = γ/sd: the mean errs
/// by at most eps·M; the variance, a sum of positive squares, by eps relative, plus (through
/// errors of the mean differences in Chan's combination, whose Σ |δ|·weights is at most N·sd
/// by Cauchy–Schwarz) 4·eps·M/sd relative; rsqrt keeps 1/sd and s within half that plus a
/// few ulps, so |δs| ≤ eps·(1 + 2M/sd)·|s| (and the same relative bound for 1/sd). The shift
/// β − mean·s then errs by |s|·eps·M + M·|δs|, and x·s + shift by M·|δs| more: in all
/// |s|·M·eps·(3 + 4M/sd), plus the roundings of the affine map, ACC·(2|s|·M + |β|).
/// The running statistics take momentum m of the batch's (var unbiased).
fn bn_bounds(
    x: &[f64],
    c: usize,
    batch: &BnBatch,
    (gamma, beta): (&[f32], &[f32]),
    (rm0, rv0): (&[f32], &[f32]),
    eps: f64,
) -> BnBounds {
    let n = x.len() / c;
    let m = BN_MOMENTUM as f64;
    let mut b = BnBounds {
        y: 0.0,
        mean: 0.0,
        invstd: 0.0,
        running_mean: 0.0,
        running_var: 0.0,
    };
    for ch in 0..c {
        let big = (0..n).map(|i| x[i * c + ch].abs()).fold(0.0, f64::max);
        let sd = (batch.var[ch] + BN_EPS as f64).sqrt();
        let s = gamma[ch].abs() as f64 / sd;
        let spread = big / sd;
        let y =
            s * big * eps * (3.0 + 4.0 * spread) + ACC * (2.0 * s * big + beta[ch].abs() as f64);
        let unbiased = batch.var[ch] * n as f64 / (n - 1) as f64;
        let mean = m * eps * big + 2.0 * ACC * (rm0[ch].abs() as f64 + big);
        let var = m * unbiased * eps * (1.0 + 4.0 * spread)
            + 2.0 * ACC * (rv0[ch].abs() as f64 + unbiased);
        b.y = b.y.max(y);
        b.mean = b.mean.max(eps * big);
        b.invstd = b.invstd.max(eps * (1.0 + 2.0 * spread) / sd);
        b.running_mean = b.running_mean.max(mean);
        b.running_var = b.running_var.max(var);
    }
    b
}

/// Training-mode BatchNorm2d: bn_stats (per-chunk mean and M2), bn_finalize (Chan's
/// combination, scale/shift, running update), bn_apply (+ ReLU, + 2×2 max-pool).
fn bn_rows(dev: &mut Device, t: &mut Table) {
    for (n, h, w, c_real) in [(3, 10, 10, 20), (1, 3, 5, 8), (2, 16, 16, 13), (1, 1, 2, 3)] {
        let mut r = rng((n * 1000 + h * 10 + c_real) as u64);
        let c = pad8(c_real);
        let pixels = n * h * w;
        let real = round_f16(&uniform(&mut r, pixels * c_real, -1.0, 3.0));
        let mut x = vec![0f32; pixels * c];
        for (i, v) in real.iter().enumerate() {
            x[i / c_real * c + i % c_real] = *v;
        }
        let [gamma, beta, rm0, rv0] = bn_params(&mut r, c_real);

        // The reference sees NHWC [pixels, c] as NCHW [pixels, c, 1]: the same statistics.
        let xf = to_f64(&real);
        let batch = reference::bn_train_forward(&xf, c_real, 1, &to_f64(&gamma), &to_f64(&beta));
        let (want_rm, want_rv) =
            reference::bn_running_update(&to_f64(&rm0), &to_f64(&rv0), &batch, pixels);
        let y = reference::relu_forward(&batch.y);
        let want_y = nchw_to_nhwc(&y, pixels, c_real, 1, c);
        // The pooled reference in NCHW [n, c_real, h, w], back to NHWC.
        let nchw: Vec<f64> = (0..n * c_real * h * w)
            .map(|j| {
                let (i, ch, p) = (j / (c_real * h * w), j / (h * w) % c_real, j % (h * w));
                y[(i * h * w + p) * c_real + ch]
            })
            .collect();
        let pool = h % 2 == 0 && w % 2 == 0;
        let pooled = reference::maxpool2x2_forward(&nchw, Dims::new(n, c_real, h, w));
        let want_pool = nchw_to_nhwc(&pooled, n, c_real, (h / 2) * (w / 2), c);
        // Statistics: chunk sums of at most BN_CHUNK values, then three roundings per step of
        // Chan's combination (one step per chunk a thread takes, eight tree levels).
        let chunks = bn_chunks(pixels);
        let eps = (pixels.min(BN_CHUNK) + 3 * (chunks + 8)) as f64 * ACC;
        let b = bn_bounds(&xf, c_real, &batch, (&gamma, &beta), (&rm0, &rv0), eps);

        let gx = Guarded::with(dev, &to_f16(&x));
        let gpart = Guarded::new(dev, chunks * 2 * c * 4);
        let gg = Guarded::with(dev, &gamma);
        let gbeta = Guarded::with(dev, &beta);
        let grm = Guarded::with(dev, &rm0);
        let grv = Guarded::with(dev, &rv0);
        let gscale = Guarded::new(dev, c * 4);
        let gshift = Guarded::new(dev, c * 4);
        let gmean = Guarded::new(dev, c * 4);
        let ginv = Guarded::new(dev, c * 4);
        let gy = Guarded::new(dev, pixels * c * 2);
        let gp = Guarded::new(dev, pixels / 4 * c * 2);
        let stats = BnStatsParams {
            x: gx.addr(),
            partial: gpart.addr(),
            pixels: pixels as i32,
            c: c as i32,
            chunk: BN_CHUNK as i32,
            pad_: 0,
        };
        bn_stats(dev, &stats).unwrap();
        let fin = BnFinalizeParams {
            partial: gpart.addr(),
            gamma: gg.addr(),
            beta: gbeta.addr(),
            running_mean: grm.addr(),
            running_var: grv.addr(),
            scale: gscale.addr(),
            shift: gshift.addr(),
            mean: gmean.addr(),
            invstd: ginv.addr(),
            chunks: chunks as i32,
            pixels: pixels as i32,
            chunk: BN_CHUNK as i32,
            c: c as i32,
            c_real: c_real as i32,
            pad_: 0,
            momentum: BN_MOMENTUM,
            eps: BN_EPS,
        };
        bn_finalize(dev, &fin).unwrap();
        let apply = BnApplyParams {
            x: gx.addr(),
            scale: gscale.addr(),
            shift: gshift.addr(),
            y: gy.addr(),
            y_pool: if pool { gp.addr() } else { 0 },
            n: n as i32,
            h: h as i32,
            w: w as i32,
            c: c as i32,
        };
        bn_apply(dev, &apply).unwrap();
        let bufs = [
            &gx, &gpart, &gg, &gbeta, &grm, &grv, &gscale, &gshift, &gmean, &ginv, &gy, &gp,
        ];
        let shape = format!("n{n} {h}×{w} c{c_real}");
        let mut run = Launch::new(t, shape, dev, &bufs).nhwc(c_real, c);
        run.output("bn train+relu", &gy.read_f16(dev), &want_y, U16, b.y);
        if pool {
            let op = "bn train+relu+maxpool";
            run.output(op, &gp.read_f16(dev), &want_pool, U16, b.y);
        }
        run.output(
            "bn running mean",
            &grm.read_f32(dev),
            &want_rm,
            0.0,
            b.running_mean,
        );
        run.output(
            "bn running var",
            &grv.read_f32(dev),
            &want_rv,
            0.0,
            b.running_var,
        );
        // The batch mean and 1/sqrt(var + eps) for the backward (zero in padding channels).
        let want_mean = nchw_to_nhwc(&batch.mean, 1, c_real, 1, c);
        let invstd: Vec<f64> = (batch.var.iter())
            .map(|v| 1.0 / (v + BN_EPS as f64).sqrt())
            .collect();
        let want_inv = nchw_to_nhwc(&invstd, 1, c_real, 1, c);
        run.output(
            "bn batch mean",
            &gmean.read_f32(dev),
            &want_mean,
            0.0,
            b.mean,
        );
        run.output("bn invstd", &ginv.read_f32(dev), &want_inv, 0.0, b.invstd);
        if c > c_real {
            // Padding channels get scale = shift = 0 (so that they stay zero).
            let (scale, shift) = (gscale.read_f32(dev), gshift.read_f32(dev));
            let padding = [&scale[c_real..], &shift[c_real..]].concat();
            let err = max_err(&padding, &vec![0.0; padding.len()]);
            run.add("bn scale, shift padding", err, 0.0);
        }
    }
}

/// bn1d_train_relu: BatchNorm1d over the rows in fp32 (two plain passes), ReLU, running update.
fn bn1d_rows(dev: &mut Device, t: &mut Table) {
    for (rows, c) in [(6, 10), (2, 3), (64, 130), (3, 1)] {
        let mut r = rng((rows * 1000 + c) as u64);
        let x = uniform(&mut r, rows * c, -2.0, 2.0);
        let [gamma, beta, rm0, rv0] = bn_params(&mut r, c);
        let xf = to_f64(&x);
        let batch = reference::bn_train_forward(&xf, c, 1, &to_f64(&gamma), &to_f64(&beta));
        let want = reference::relu_forward(&batch.y);
        let (want_rm, want_rv) =
            reference::bn_running_update(&to_f64(&rm0), &to_f64(&rv0), &batch, rows);
        // Statistics: fp32 sums of `rows` terms and a few roundings (no chunks to combine).
        let eps = (rows + 8) as f64 * ACC;
        let b = bn_bounds(&xf, c, &batch, (&gamma, &beta), (&rm0, &rv0), eps);

        let (gx, gg, gb) = (
            Guarded::with(dev, &x),
            Guarded::with(dev, &gamma),
            Guarded::with(dev, &beta),
        );
        let (grm, grv) = (Guarded::with(dev, &rm0), Guarded::with(dev, &rv0));
        let gy = Guarded::new(dev, rows * c * 4);
        let p = Bn1dTrainParams {
            x: gx.addr(),
            gamma: gg.addr(),
            beta: gb.addr(),
            running_mean: grm.addr(),
            running_var: grv.addr(),
            y: gy.addr(),
            rows: rows as i32,
            c: c as i32,
            momentum: BN_MOMENTUM,
            eps: BN_EPS,
        };
        bn1d_train_relu(dev, &p).unwrap();
        let shape = format!("{rows}×{c}");
        let mut run = Launch::new(t, shape, dev, &[&gx, &gg, &gb, &grm, &grv, &gy]);
        run.output("bn1d train+relu", &gy.read_f32(dev), &want, 0.0, b.y);
        let (bm, bv) = (b.running_mean, b.running_var);
        run.output("bn1d running mean", &grm.read_f32(dev), &want_rm, 0.0, bm);
        run.output("bn1d running var", &grv.read_f32(dev), &want_rv, 0.0, bv);
    }
}
