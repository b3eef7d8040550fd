//! Device rows of kernels/norm_grad.cu: the BatchNorm + ReLU backward (bn_backward), the gradient routing into a unit's dY (grad_add, maxpool_bwd, upsample_bwd) and the materialised ×2 upsampling (upsample2x).

use crate::cuda_common::*;
use crate::device::{abs, bn_params, Launch, ACC, U16};
use crate::{max_abs, max_err, Table};
use m2unet::config::BN_EPS;
use m2unet::cpu::ops::Dims;
use m2unet::cuda::kernels::*;
use m2unet::cuda::weights::{pack_conv3x3, pad8, padded};
use m2unet::cuda::Device;
use m2unet::reference;

pub fn rows(dev: &mut Device, t: &mut Table) {
    bn_backward_rows(dev, t);
    grad_add_rows(dev, t);
    maxpool_bwd_rows(dev, t);
    upsample_bwd_rows(dev, t);
    upsample2x_rows(dev, t);
}

/// bn_backward (bn_bwd_reduce, bn_bwd_finalize, bn_bwd_apply) against relu_backward →
/// bn_train_backward, NHWC seen as [pixels, c, 1]. The kernels get the exact batch statistics
/// rounded to fp32 (as bn_finalize hands them over; its own error is bounded by norm_kernels'
/// rows), z rounded to fp16 for both.
///
/// Bounds, per channel with N pixels, u = ACC/2 the unit roundoff, X_i = invstd·(|z_i| +
/// |mean|) ≥ |x̂_i| and d_i = dy_i·mask_i: x̂ = (z − mean)·invstd errs by at most 2·ACC·X_i
/// (the roundings of mean, invstd, the difference and the product); dβ = Σ d sums N terms:
/// N·ACC·B with B = Σ|d|; dγ = Σ d·x̂ adds the products' errors: (N + 3)·ACC·G with
/// G = Σ|d|·X. dz = k·(N·d − dβ − x̂·dγ), k = γ·invstd/N (three roundings: 1.5·ACC
/// relative), takes the errors of dβ, x̂·dγ (|dγ|·2·ACC·X_i + X_i·(N + 3)·ACC·G) and the
/// roundings of the bracket and of the product, at most 4·ACC·T_i with T_i = N·|d_i| + |dβ| +
/// X_i·|dγ|: in all |k|·ACC·(N·B + 2·X_i·|dγ| + (N + 3)·X_i·G + 4·T_i), then the fp16
/// rounding of dz (U16).
///
/// The ReLU mask is recomputed from the fp32 scale and shift, which differ from the
/// reference's exact pre-activation by a few ulps of |scale|·(|z| + |mean|) + |β|; where the
/// pre-activation is within 10^-3 of that of zero, dy is set to 0, so both masks pass the
/// same gradients.
fn bn_backward_rows(dev: &mut Device, t: &mut Table) {
    for (n, h, w, c_real) in [
        (2, 13, 11, 20),
        (1, 1, 3, 5),
        (3, 9, 10, 8),
        (2, 10, 9, 150),
        (1, 3, 5, 2050),
    ] {
        let mut r = rng((n * 1000 + h * 10 + c_real) as u64);
        let c = pad8(c_real);
        let pixels = n * h * w;
        let z = round_f16(&uniform(&mut r, pixels * c_real, -1.0, 3.0));
        let [gamma, beta, _, _] = bn_params(&mut r, c_real);
        let (zf, gf) = (to_f64(&z), to_f64(&gamma));
        let batch = reference::bn_train_forward(&zf, c_real, 1, &gf, &to_f64(&beta));

        // The statistics in fp32, scale and shift computed from them as bn_finalize does.
        let mean: Vec<f32> = batch.mean.iter().map(|&m| m as f32).collect();
        let invstd: Vec<f32> = (batch.var.iter())
            .map(|v| (1.0 / (v + BN_EPS as f64).sqrt()) as f32)
            .collect();
        let scale: Vec<f32> = (0..c_real).map(|ch| gamma[ch] * invstd[ch]).collect();
        let shift: Vec<f32> = (0..c_real)
            .map(|ch| beta[ch] - mean[ch] * scale[ch])
            .collect();

        let mut dy = uniform(&mut r, pixels * c_real, -1.0, 1.0);
        for (i, d) in dy.iter_mut().enumerate() {
            let ch = i % c_real;
            let size = scale[ch].abs() as f64 * (zf[i].abs() + batch.mean[ch].abs())
                + beta[ch].abs() as f64;
            if batch.y[i].abs() <= 1e-3 * size {
                *d = 0.0;
            }
        }
        let dym = reference::relu_backward(&batch.y, &to_f64(&dy));
        let g = reference::bn_train_backward(&zf, c_real, 1, &gf, &batch, &dym);

        // The bounds (see above).
        let nf = pixels as f64;
        let (mut bz, mut bg, mut bb) = (0.0f64, 0.0f64, 0.0f64);
        for ch in 0..c_real {
            let inv = invstd[ch] as f64;
            let x = |i: usize| inv * (zf[i * c_real + ch].abs() + batch.mean[ch].abs());
            let d = |i: usize| dym[i * c_real + ch].abs();
            let big_b: f64 = (0..pixels).map(d).sum();
            let big_g: f64 = (0..pixels).map(|i| d(i) * x(i)).sum();
            bb = bb.max(nf * ACC * big_b);
            bg = bg.max((nf + 3.0) * ACC * big_g);
            let k = gf[ch].abs() * inv / nf;
            let (db, dg) = (g.dbeta[ch].abs(), g.dgamma[ch].abs());
            for i in 0..pixels {
                let ti = nf * d(i) + db + x(i) * dg;
                let e = nf * big_b + 2.0 * x(i) * dg + (nf + 3.0) * x(i) * big_g + 4.0 * ti;
                bz = bz.max(k * ACC * e);
            }
        }

        let mut chan = |v: &[f32]| Guarded::with(dev, &padded(v, c));
        let (gscale, gshift, gmean, ginv) =
            (chan(&scale), chan(&shift), chan(&mean), chan(&invstd));
        let gdy = Guarded::with(dev, &nchw_to_nhwc(&dy, pixels, c_real, 1, c));
        let gz = Guarded::with(dev, &to_f16(&nchw_to_nhwc(&z, pixels, c_real, 1, c)));
        let gg = Guarded::with(dev, &gamma);
        let gpart = Guarded::new(dev, bn_bwd_partial_len(pixels, c) * 4);
        let gdg = Guarded::new(dev, c_real * 4);
        let gdb = Guarded::new(dev, c_real * 4);
        let gdz = Guarded::new(dev, pixels * c * 2);
        let p = BnBwdParams {
            dy: gdy.addr(),
            z: gz.addr(),
            scale: gscale.addr(),
            shift: gshift.addr(),
            mean: gmean.addr(),
            invstd: ginv.addr(),
            gamma: gg.addr(),
            partial: gpart.addr(),
            dgamma: gdg.addr(),
            dbeta: gdb.addr(),
            dz: gdz.addr(),
            pixels: pixels as i32,
            c: c as i32,
            c_real: c_real as i32,
            chunk: BN_CHUNK as i32,
        };
        bn_backward(dev, &p).unwrap();
        let bufs = [
            &gscale, &gshift, &gmean, &ginv, &gdy, &gz, &gg, &gpart, &gdg, &gdb, &gdz,
        ];
        let shape = format!("n{n} {h}×{w} c{c_real} chunks {}", bn_chunks(pixels));
        let mut run = Launch::new(t, shape, dev, &bufs).nhwc(c_real, c);
        let want_dz = nchw_to_nhwc(&g.dx, pixels, c_real, 1, c);
        run.output("bn+relu backward dz", &gdz.read_f16(dev), &want_dz, U16, bz);
        run.output(
            "bn+relu backward dgamma",
            &gdg.read_f32(dev),
            &g.dgamma,
            0.0,
            bg,
        );
        run.output(
            "bn+relu backward dbeta",
            &gdb.read_f32(dev),
            &g.dbeta,
            0.0,
            bb,
        );
    }
}

/// Random start values (NCHW [n, c_real, hw]) of a routing destination: the kernels must add
/// to them.
fn start_dst(r: &mut rand_chacha::ChaCha8Rng, n: usize, c_real: usize, hw: usize) -> Vec<f32> {
    uniform(r, n * c_real * hw, -1.0, 1.0)
}

/// The guarded fp32 destination of a routing launch (NCHW values to NHWC, padded to c).
fn dst_buffer(dev: &mut Device, dst0: &[f32], n: usize, c_real: usize, hw: usize) -> Guarded {
    Guarded::with(dev, &nchw_to_nhwc(dst0, n, c_real, hw, pad8(c_real)))
}

/// The guarded fp16 gradient (or activation) of a routing launch, NCHW to NHWC.
fn half_buffer(dev: &mut Device, x: &[f32], n: usize, c_real: usize, hw: usize) -> Guarded {
    Guarded::with(dev, &to_f16(&nchw_to_nhwc(x, n, c_real, hw, pad8(c_real))))
}

/// `want` (NCHW) plus dst's start values, in NHWC, and the sum of the terms' magnitudes.
fn routed(want: &[f64], mag: &[f64], dst0: &[f32], n: usize, c_real: usize) -> [Vec<f64>; 2] {
    let hw = want.len() / (n * c_real);
    let add = |v: &[f64], abs_dst: bool| -> Vec<f64> {
        let sum: Vec<f64> = (v.iter().zip(dst0))
            .map(|(a, &d)| a + if abs_dst { d.abs() as f64 } else { d as f64 })
            .collect();
        nchw_to_nhwc(&sum, n, c_real, hw, pad8(c_real))
    };
    [add(want, false), add(mag, true)]
}

/// grad_add: dst += src. Bound: one fp32 addition, ACC·(|dst| + |src|).
fn grad_add_rows(dev: &mut Device, t: &mut Table) {
    for (n, h, w, c_real) in [(2, 5, 7, 13), (1, 1, 1, 3), (1, 4, 6, 16)] {
        let mut r = rng((n * 100 + h * 10 + c_real) as u64);
        let hw = h * w;
        let src = round_f16(&uniform(&mut r, n * c_real * hw, -2.0, 2.0));
        let dst0 = start_dst(&mut r, n, c_real, hw);
        let sf = to_f64(&src);
        let [want, mag] = routed(&sf, &abs(&sf), &dst0, n, c_real);

        let gsrc = half_buffer(dev, &src, n, c_real, hw);
        let gdst = dst_buffer(dev, &dst0, n, c_real, hw);
        let p = route_params(&gsrc, 0, &gdst, (n, h, w, c_real));
        grad_add(dev, &p).unwrap();
        let shape = format!("n{n} {h}×{w} c{c_real}");
        let mut run = Launch::new(t, shape, dev, &[&gsrc, &gdst]).nhwc(c_real, pad8(c_real));
        run.output(
            "grad add",
            &gdst.read_f32(dev),
            &want,
            0.0,
            ACC * max_abs(&mag),
        );
    }
}

/// The parameters of a routing launch into dst [n, h, w, pad8(c_real)].
fn route_params(
    src: &Guarded,
    y: u64,
    dst: &Guarded,
    (n, h, w, c_real): (usize, usize, usize, usize),
) -> GradRouteParams {
    GradRouteParams {
        src: src.addr(),
        y,
        dst: dst.addr(),
        n: n as i32,
        h: h as i32,
        w: w as i32,
        c: pad8(c_real) as i32,
    }
}

/// maxpool_bwd: each window's gradient to the first maximum of y (row-major window order).
/// y takes four values only, so most windows hold ties. Bound: one fp32 addition per element
/// (the windows are disjoint), ACC·(|dst| + |routed|).
fn maxpool_bwd_rows(dev: &mut Device, t: &mut Table) {
    for (n, h, w, c_real) in [(2, 6, 10, 13), (1, 2, 2, 8), (3, 4, 6, 21)] {
        let mut r = rng((n * 100 + h * 10 + c_real) as u64);
        let (hw, d) = (h * w, Dims::new(n, c_real, h, w));
        let y: Vec<f32> = (uniform(&mut r, n * c_real * hw, 0.0, 4.0).iter())
            .map(|v| v.floor() * 0.25)
            .collect();
        let src = round_f16(&uniform(&mut r, n * c_real * hw / 4, -2.0, 2.0));
        let dst0 = start_dst(&mut r, n, c_real, hw);
        let (yf, sf) = (to_f64(&y), to_f64(&src));
        let routed_ref = reference::maxpool2x2_backward(&yf, d, &sf);
        let mag = reference::maxpool2x2_backward(&yf, d, &abs(&sf));
        let [want, mag] = routed(&routed_ref, &mag, &dst0, n, c_real);

        let gy = half_buffer(dev, &y, n, c_real, hw);
        let gsrc = half_buffer(dev, &src, n, c_real, hw / 4);
        let gdst = dst_buffer(dev, &dst0, n, c_real, hw);
        let p = route_params(&gsrc, gy.addr(), &gdst, (n, h, w, c_real));
        maxpool_bwd(dev, &p).unwrap();
        let shape = format!("n{n} {h}×{w} c{c_real}");
        let bufs = [&gy, &gsrc, &gdst];
        let mut run = Launch::new(t, shape, dev, &bufs).nhwc(c_real, pad8(c_real));
        let op = "maxpool backward (ties)";
        run.output(op, &gdst.read_f32(dev), &want, 0.0, ACC * max_abs(&mag));
    }
}

/// upsample_bwd: the adjoint of the ×2 bilinear upsampling into the low-resolution dst.
/// Bound: each output sums at most 16 weighted gradients (weights multiples of 1/16 times fp16
/// values: exact products) and its start value: 17·ACC·Σ|terms|.
fn upsample_bwd_rows(dev: &mut Device, t: &mut Table) {
    for (n, h, w, c_real) in [
        (1, 1, 1, 8),
        (2, 1, 3, 5),
        (1, 3, 5, 13),
        (2, 4, 3, 20),
        (1, 7, 5, 3),
    ] {
        let mut r = rng((n * 100 + h * 10 + w + c_real) as u64);
        let (hw, d) = (h * w, Dims::new(n, c_real, h, w));
        let src = round_f16(&uniform(&mut r, n * c_real * 4 * hw, -2.0, 2.0));
        let dst0 = start_dst(&mut r, n, c_real, hw);
        let sf = to_f64(&src);
        let back = reference::upsample2x_backward(&sf, d);
        let mag = reference::upsample2x_backward(&abs(&sf), d);
        let [want, mag] = routed(&back, &mag, &dst0, n, c_real);

        let gsrc = half_buffer(dev, &src, n, c_real, 4 * hw);
        let gdst = dst_buffer(dev, &dst0, n, c_real, hw);
        let p = route_params(&gsrc, 0, &gdst, (n, h, w, c_real));
        upsample_bwd(dev, &p).unwrap();
        let shape = format!("n{n} {h}×{w} c{c_real}");
        let mut run = Launch::new(t, shape, dev, &[&gsrc, &gdst]).nhwc(c_real, pad8(c_real));
        let bound = 17.0 * ACC * max_abs(&mag);
        run.output(
            "upsample2x backward",
            &gdst.read_f32(dev),
            &want,
            0.0,
            bound,
        );
    }
}

/// upsample2x: against reference::upsample2x_forward, and bit-identical to the conv loader:
/// conv3x3_igemm of the materialised tensor equals conv3x3_igemm_up of the low-resolution one.
/// Bound of the fp16x2 blend (see upsample_blend), with M = max|x| and weights λ ≤ ¾: top =
/// fma(λx, b − a, a) errs by ¾·2M·U16 (the difference) + M·U16 (the fma) = 2.5·U16·M, the bottom
/// likewise; the result fma(λy, bottom − top, top) takes (1 − λy)·2.5 + λy·2.5 of them, plus
/// ¾·2M·U16 and M·U16 for its own roundings: 5·U16·M, its fp16 rounding included.
fn upsample2x_rows(dev: &mut Device, t: &mut Table) {
    for (n, h, w, c_real) in [(1, 1, 1, 5), (1, 1, 3, 8), (2, 3, 5, 13), (1, 4, 3, 20)] {
        let mut r = rng((n * 100 + h * 10 + w + c_real) as u64);
        let (hw, c, cout) = (h * w, pad8(c_real), 12);
        let x = round_f16(&uniform(&mut r, n * c_real * hw, -2.0, 2.0));
        let up = reference::upsample2x_forward(&to_f64(&x), Dims::new(n, c_real, h, w));
        let want = nchw_to_nhwc(&up, n, c_real, 4 * hw, c);

        let gx = half_buffer(dev, &x, n, c_real, hw);
        let gy = Guarded::new(dev, n * 4 * hw * c * 2);
        let p = Upsample2xParams {
            x: gx.addr(),
            y: gy.addr(),
            n: n as i32,
            h: h as i32,
            w: w as i32,
            c: c as i32,
        };
        upsample2x(dev, &p).unwrap();

        // The same conv (12 outputs, split-K as the engine would choose) of the materialised
        // tensor and of the low-resolution one through the upsampling loader.
        let wgt = round_f16(&uniform(&mut r, cout * c_real * 9, -0.3, 0.3));
        let gw = Guarded::with(dev, &pack_conv3x3(&wgt, cout, &[c_real]).unwrap());
        let gb = Guarded::with(dev, &uniform(&mut r, pad8(cout), -0.2, 0.2));
        let pixels = n * 4 * hw;
        let splits = conv_splits(pixels, pad8(cout), 9 * c);
        let gpart = Guarded::new(dev, splits * pixels * pad8(cout) * 4);
        let outs: Vec<Guarded> = (0..2)
            .map(|_| Guarded::new(dev, pixels * pad8(cout) * 2))
            .collect();
        for (o, loader_up) in outs.iter().zip([false, true]) {
            let conv = ConvParams {
                x: if loader_up { gx.addr() } else { gy.addr() },
                wt: gw.addr(),
                bias: gb.addr(),
                y: o.addr(),
                partial: gpart.addr(),
                stats: 0,
                n: n as i32,
                h: 2 * h as i32,
                w: 2 * w as i32,
                cin1: c as i32,
                cout: pad8(cout) as i32,
                in_h: h as i32,
                in_w: w as i32,
                splits: splits as i32,
                ..Default::default()
            };
            conv3x3(dev, &conv, loader_up).unwrap();
        }
        let shape = format!("n{n} {h}×{w} c{c_real}");
        let bufs = [&gx, &gy, &gw, &gb, &gpart, &outs[0], &outs[1]];
        let mut run = Launch::new(t, shape, dev, &bufs).nhwc(c_real, c);
        let bound = 5.0 * U16 * max_abs(&to_f64(&x));
        run.output("upsample2x", &gy.read_f16(dev), &want, 0.0, bound);
        let (plain, loader) = (outs[0].read_f16(dev), outs[1].read_f16(dev));
        let err = max_err(&plain, &to_f64(&loader));
        run.add("upsample2x→conv3x3 == conv3x3_up", err, 0.0);
    }
}
