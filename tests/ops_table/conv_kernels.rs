//! Device rows of kernels/conv.cu: conv3x3_igemm (plain, concatenated, split-K, upsampling
//! loader, fused ReLU and max-pool, BatchNorm folded by the host, BN statistics in the
//! epilogue) and conv3x3_first.

use crate::cuda_common::*;
use crate::device::{abs, Launch, ACC, U16};
use crate::{max_abs, Table};
use m2unet::config::BN_EPS;
use m2unet::cpu::ops::Dims;
use m2unet::cuda::kernels::*;
use m2unet::cuda::weights::{pack_conv3x3, pad8, padded};
use m2unet::cuda::{ConvTier, Device};
use m2unet::model::fold_bn;
use m2unet::reference;

pub fn rows(dev: &mut Device, t: &mut Table) {
    let splits: Vec<usize> = (CONVS.iter())
        .map(|case| conv_rows(dev, t, case, ConvTier::Mma))
        .collect();
    // Split-K must stay covered: (1, 6, 6, [64], 24) splits its K = 9·64 four ways.
    assert!(
        splits.iter().any(|&s| s > 1),
        "no conv case splits K: {splits:?}"
    );
    folded_bn_rows(dev, t);
    epilogue_stats_rows(dev, t);
    first_rows(dev, t);
}

/// A case of conv3x3_igemm (conv3x3_igemm_up when `up`): (n, h, w, input channel parts, cout,
/// relu, up). The input is the channel concatenation of the parts (each upsampled ×2 from
/// h/2 × w/2 when `up`); then bias, optional ReLU and, for even h and w, the fused 2×2
/// max-pool. Split-K is chosen as the engine does (conv_splits); returns the splits.
pub type ConvCase = (usize, usize, usize, &'static [usize], usize, bool, bool);

const CONVS: [ConvCase; 9] = [
    (1, 1, 1, &[1], 1, false, false),
    (1, 5, 7, &[3], 5, false, false),
    (3, 7, 3, &[5], 9, true, false),
    (2, 10, 14, &[24], 72, true, false),
    (1, 6, 6, &[64], 24, true, false),
    (2, 6, 6, &[8, 16], 16, true, false),
    (1, 5, 6, &[5, 3], 7, false, false),
    (2, 6, 10, &[16], 24, true, true),
    (1, 2, 2, &[5], 3, false, true),
];

/// The rows of one case on the mma.sync tier or (which then must take it: no split-K) the
/// wgmma tier, whose rows are named "wgmma " + op.
pub fn conv_rows(
    dev: &mut Device,
    t: &mut Table,
    &(n, h, w, parts, cout, relu, up): &ConvCase,
    tier: ConvTier,
) -> usize {
    let mut r = rng((n * 1000 + h * 100 + w * 10 + cout) as u64);
    let (ih, iw) = if up { (h / 2, w / 2) } else { (h, w) };
    let cin: usize = parts.iter().sum();
    let xs: Vec<Vec<f32>> = (parts.iter())
        .map(|&c| round_f16(&uniform(&mut r, n * c * ih * iw, -1.0, 1.0)))
        .collect();
    let wgt = round_f16(&uniform(&mut r, cout * cin * 9, -0.3, 0.3));
    let bias = uniform(&mut r, cout, -0.2, 0.2);

    // Reference: concat → (upsample) → conv3x3 → (ReLU) → (max-pool).
    let xs64: Vec<Vec<f64>> = xs.iter().map(|x| to_f64(x)).collect();
    let refs: Vec<(&[f64], usize)> = (xs64.iter().map(|x| x.as_slice()))
        .zip(parts.iter().copied())
        .collect();
    let x = reference::concat_channels(&refs, n, ih * iw);
    let (low, d) = (Dims::new(n, cin, ih, iw), Dims::new(n, cin, h, w));
    let (xin, xabs) = match up {
        true => (
            reference::upsample2x_forward(&x, low),
            reference::upsample2x_forward(&abs(&x), low),
        ),
        false => (x.clone(), abs(&x)),
    };
    let (wf, bf) = (to_f64(&wgt), to_f64(&bias));
    let mut y = reference::conv3x3_forward(&xin, d, &wf, &bf, cout);
    if relu {
        y = reference::relu_forward(&y);
    }
    let pool = h % 2 == 0 && w % 2 == 0;
    let y_pool = reference::maxpool2x2_forward(&y, Dims::new(n, cout, h, w));

    // Bound: fp16 output rounding + the fp32 sum of K = 9·cin products and the bias. With
    // `up`, each input vector is blended in fp16 arithmetic (b − a, then an fma with λ, for
    // the top and the bottom pair and once more between them): five roundings of values at
    // most M = max|x| (with weights λ ≤ 3/4) err by at most 8.75·U16·M, so every output gets
    // 9·U16·M·Σ|w| more, Σ|w| over its output channel's weights.
    let a = reference::conv3x3_forward(&xabs, d, &abs(&wf), &abs(&bf), cout);
    let k = (9 * cin + 1) as f64;
    let wsum = (wf.chunks(cin * 9))
        .map(|row| row.iter().map(|v| v.abs()).sum::<f64>())
        .fold(0.0, f64::max);
    let blend = if up {
        9.0 * U16 * max_abs(&x) * wsum
    } else {
        0.0
    };
    let bound = k * ACC * max_abs(&a) + blend;

    // The device: NHWC fp16 inputs with channels padded to 8, weights [cout][9][Σ pad8].
    let cp = pad8(cout);
    let gx: Vec<Guarded> = (parts.iter().zip(&xs))
        .map(|(&c, x)| Guarded::with(dev, &to_f16(&nchw_to_nhwc(x, n, c, ih * iw, pad8(c)))))
        .collect();
    let gw = Guarded::with(dev, &pack_conv3x3(&wgt, cout, parts).unwrap());
    let gb = Guarded::with(dev, &padded(&bias, cp));
    let gy = Guarded::new(dev, n * h * w * cp * 2);
    let gp = Guarded::new(dev, n * (h / 2) * (w / 2) * cp * 2);
    let cin_pad: usize = parts.iter().map(|&c| pad8(c)).sum();
    let splits = match tier {
        ConvTier::Mma => conv_splits(n * h * w, cp, 9 * cin_pad),
        ConvTier::Wgmma => 1,
    };
    let gpart = Guarded::new(dev, splits * n * h * w * cp * 4);
    let p = ConvParams {
        x: gx[0].addr(),
        x2: gx.get(1).map_or(0, |g| g.addr()),
        wt: gw.addr(),
        bias: gb.addr(),
        y: gy.addr(),
        y_pool: if pool { gp.addr() } else { 0 },
        partial: gpart.addr(),
        stats: 0,
        n: n as i32,
        h: h as i32,
        w: w as i32,
        cin1: pad8(parts[0]) as i32,
        cin2: parts.get(1).map_or(0, |&c| pad8(c)) as i32,
        cout: cp as i32,
        in_h: ih as i32,
        in_w: iw as i32,
        relu: relu as i32,
        quad: pool as i32,
        splits: splits as i32,
        pad_: 0,
    };
    assert!(
        tier == ConvTier::Mma || wgmma_fits(&p, up),
        "the wgmma tier does not take {parts:?}→{cout}"
    );
    dev.set_conv_tier(tier).unwrap();
    conv3x3(dev, &p, up).unwrap();
    dev.set_conv_tier(ConvTier::Mma).unwrap();
    let mut bufs: Vec<&Guarded> = gx.iter().collect();
    bufs.extend([&gw, &gb, &gy, &gp, &gpart]);
    let shape = format!("n{n} {ih}×{iw} {:?}→{cout} split-K {splits}", parts);
    let mut run = Launch::new(t, shape, dev, &bufs).nhwc(cout, cp);

    let op = format!(
        "{}{}{}conv3x3{}",
        if tier == ConvTier::Wgmma {
            "wgmma "
        } else {
            ""
        },
        if parts.len() > 1 { "concat+" } else { "" },
        if up { "up2x+" } else { "" },
        if relu { "+relu" } else { "" }
    );
    let got = (gy.read_f16(dev), pool.then(|| gp.read_f16(dev)));
    output_rows(&mut run, &op, got, (&y, &y_pool), n, bound);
    splits
}

/// The rows of a conv's fp16 NHWC output y (`op`) and, when read, its fused 2×2 max-pool
/// (`op`+maxpool) against the NCHW references y [n, cout, h, w] and y_pool.
fn output_rows(
    run: &mut Launch,
    op: &str,
    (y, y_pool): (Vec<f32>, Option<Vec<f32>>),
    (want, want_pool): (&[f64], &[f64]),
    n: usize,
    bound: f64,
) {
    run.output_nchw(op, &y, (want, n), bound);
    if let Some(y_pool) = y_pool {
        run.output_nchw(&format!("{op}+maxpool"), &y_pool, (want_pool, n), bound);
    }
}

/// conv3x3_igemm with eval-mode BatchNorm folded into its weights and bias by the host
/// (model::fold_bn, then fp16 weights), + ReLU + max-pool, against
/// reference conv3x3 → bn_eval → relu → maxpool.
fn folded_bn_rows(dev: &mut Device, t: &mut Table) {
    let (n, h, w, cin, cout) = (2, 8, 6, 13, 11);
    let mut r = rng(7);
    let x = round_f16(&uniform(&mut r, n * cin * h * w, -1.0, 1.0));
    let wgt = uniform(&mut r, cout * cin * 9, -0.3, 0.3);
    let bias = uniform(&mut r, cout, -0.2, 0.2);
    let gamma = uniform(&mut r, cout, 0.5, 1.5);
    let beta = uniform(&mut r, cout, -0.5, 0.5);
    let rm = uniform(&mut r, cout, -0.3, 0.3);
    let rv = uniform(&mut r, cout, 0.5, 2.0);
    let (wf, bf) = fold_bn(&wgt, &bias, &gamma, &beta, &rm, &rv);

    let d = Dims::new(n, cin, h, w);
    let xf = to_f64(&x);
    let z = reference::conv3x3_forward(&xf, d, &to_f64(&wgt), &to_f64(&bias), cout);
    let (g64, b64, m64, v64) = (to_f64(&gamma), to_f64(&beta), to_f64(&rm), to_f64(&rv));
    let y = reference::relu_forward(&reference::bn_eval_forward(
        &z,
        cout,
        h * w,
        &g64,
        &b64,
        &m64,
        &v64,
    ));
    let y_pool = reference::maxpool2x2_forward(&y, Dims::new(n, cout, h, w));

    // Bound: as conv3x3, with the folded weights w' rounded to fp16 (U16·Σ|w'·x| more) and
    // folded in fp32 (a few roundings per weight and per bias: 4 more ACC terms), the bias
    // error relative to the magnitudes it was folded from, (|b| + |rm|)·|s| + |β|.
    let bias_mag: Vec<f64> = (0..cout)
        .map(|c| {
            let s = (g64[c] / (v64[c] + BN_EPS as f64).sqrt()).abs();
            (bias[c].abs() as f64 + rm[c].abs() as f64) * s + beta[c].abs() as f64
        })
        .collect();
    let a = reference::conv3x3_forward(&abs(&xf), d, &abs(&to_f64(&wf)), &bias_mag, cout);
    let k = (9 * cin + 1 + 4) as f64;
    let bound = (U16 + k * ACC) * max_abs(&a);

    let cp = pad8(cout);
    let gx = Guarded::with(dev, &to_f16(&nchw_to_nhwc(&x, n, cin, h * w, pad8(cin))));
    let gw = Guarded::with(dev, &pack_conv3x3(&wf, cout, &[cin]).unwrap());
    let gb = Guarded::with(dev, &padded(&bf, cp));
    let gy = Guarded::new(dev, n * h * w * cp * 2);
    let gp = Guarded::new(dev, n * h * w / 4 * cp * 2);
    let p = ConvParams {
        x: gx.addr(),
        wt: gw.addr(),
        bias: gb.addr(),
        y: gy.addr(),
        y_pool: gp.addr(),
        n: n as i32,
        h: h as i32,
        w: w as i32,
        cin1: pad8(cin) as i32,
        cout: cp as i32,
        relu: 1,
        quad: 1,
        splits: 1,
        ..Default::default()
    };
    conv3x3(dev, &p, false).unwrap();
    let shape = format!("n{n} {h}×{w} [{cin}]→{cout}");
    let mut run = Launch::new(t, shape, dev, &[&gx, &gw, &gb, &gy, &gp]).nhwc(cout, cp);
    let got = (gy.read_f16(dev), Some(gp.read_f16(dev)));
    let op = "conv3x3+bn eval+relu";
    output_rows(&mut run, op, got, (&y, &y_pool), n, bound);
}

/// conv3x3_first: the first layer's direct convolution of fp32 NCHW input, fp16 NHWC output.
fn first_rows(dev: &mut Device, t: &mut Table) {
    for (n, cin, cout, h, w, relu) in [
        (2, 1, 12, 6, 10, true),
        (1, 1, 8, 5, 3, true),
        (1, 3, 8, 4, 4, false),
        (1, 1, 5, 7, 9, true),
        (3, 2, 16, 2, 2, true),
        // More units than the capped grid has threads (8 blocks × 132 SMs × 128 = 135,168):
        // threads stride over 264,192 units, and 163,840 pooled ones.
        (2, 1, 64, 128, 129, true),
        (5, 1, 64, 128, 128, true),
    ] {
        let mut r = rng((100 * n + 10 * cin + cout) as u64);
        let x = uniform(&mut r, n * cin * h * w, 0.0, 1.0);
        let wgt = uniform(&mut r, cout * cin * 9, -0.5, 0.5);
        let bias = uniform(&mut r, cout, -0.2, 0.2);
        let d = Dims::new(n, cin, h, w);
        let (xf, wf, bf) = (to_f64(&x), to_f64(&wgt), to_f64(&bias));
        let mut y = reference::conv3x3_forward(&xf, d, &wf, &bf, cout);
        if relu {
            y = reference::relu_forward(&y);
        }
        let pool = h % 2 == 0 && w % 2 == 0;
        let y_pool = reference::maxpool2x2_forward(&y, Dims::new(n, cout, h, w));
        // Bound: fp16 output rounding + the fp32 sum of 9·cin products and the bias.
        let a = reference::conv3x3_forward(&abs(&xf), d, &abs(&wf), &abs(&bf), cout);
        let bound = (9 * cin + 1) as f64 * ACC * max_abs(&a);

        let cp = pad8(cout);
        let gx = Guarded::with(dev, &x);
        let gw = Guarded::with(dev, &wgt);
        let gb = Guarded::with(dev, &bias);
        let gy = Guarded::new(dev, n * h * w * cp * 2);
        let gp = Guarded::new(dev, n * (h / 2) * (w / 2) * cp * 2);
        let p = ConvFirstParams {
            x: gx.addr(),
            wt: gw.addr(),
            bias: gb.addr(),
            y: gy.addr(),
            y_pool: if pool { gp.addr() } else { 0 },
            n: n as i32,
            cin: cin as i32,
            h: h as i32,
            w: w as i32,
            cout_real: cout as i32,
            cout: cp as i32,
            relu: relu as i32,
            pad_: 0,
        };
        conv3x3_first(dev, &p).unwrap();
        let shape = format!("n{n} {h}×{w} [{cin}]→{cout}");
        let mut run = Launch::new(t, shape, dev, &[&gx, &gw, &gb, &gy, &gp]).nhwc(cout, cp);
        let op = format!("conv3x3 first{}", if relu { "+relu" } else { "" });
        let got = (gy.read_f16(dev), pool.then(|| gp.read_f16(dev)));
        output_rows(&mut run, &op, got, (&y, &y_pool), n, bound);
    }
}

/// conv3x3_igemm writing BN chunk statistics in its epilogue (train mode, no ReLU), combined
/// by bn_finalize, against the batch mean and 1/sd of its own fp16 output computed in f64.
/// Bounds as the bn_stats rows (tests/ops_table/norm_kernels.rs): chunk sums of ≤ 128 values
/// and three roundings per step of Chan's combination give a relative statistics error
/// eps = (128 + 3·(chunks + 8))·ACC; the mean errs by eps·max|y|, 1/sd by
/// eps·(1 + 4·max|y|/sd) relative (so the row's tolerance is 1 on the ratio error / bound).
fn epilogue_stats_rows(dev: &mut Device, t: &mut Table) {
    // (n, h, w, cin, cout): one partial block; several row and column blocks in 2×2-window
    // (quad) order; odd sizes in plain order.
    for (n, h, w, cin, cout) in [(2, 9, 7, 13, 11), (3, 12, 10, 8, 70), (1, 17, 15, 24, 9)] {
        let mut r = rng((n * 100 + h * 10 + cout) as u64);
        let x = round_f16(&uniform(&mut r, n * cin * h * w, -1.0, 1.0));
        let wgt = uniform(&mut r, cout * cin * 9, -0.3, 0.3);
        let bias = uniform(&mut r, cout, -0.2, 0.2);
        let (cp, pixels) = (pad8(cout), n * h * w);
        let chunks = bn_chunks(pixels);
        let gx = Guarded::with(dev, &to_f16(&nchw_to_nhwc(&x, n, cin, h * w, pad8(cin))));
        let gw = Guarded::with(dev, &pack_conv3x3(&wgt, cout, &[cin]).unwrap());
        let gb = Guarded::with(dev, &padded(&bias, cp));
        let gy = Guarded::new(dev, pixels * cp * 2);
        let gs = Guarded::new(dev, chunks * 2 * cp * 4);
        let quad = h % 2 == 0 && w % 2 == 0;
        let p = ConvParams {
            x: gx.addr(),
            wt: gw.addr(),
            bias: gb.addr(),
            y: gy.addr(),
            stats: gs.addr(),
            n: n as i32,
            h: h as i32,
            w: w as i32,
            cin1: pad8(cin) as i32,
            cout: cp as i32,
            quad: quad as i32,
            splits: 1,
            ..Default::default()
        };
        conv3x3(dev, &p, false).unwrap();
        let ones = vec![1f32; cout];
        let zeros = vec![0f32; cout];
        let (gg, gbeta) = (Guarded::with(dev, &ones), Guarded::with(dev, &zeros));
        let [gscale, gshift, gmean, ginv] = [(); 4].map(|_| Guarded::new(dev, cp * 4));
        let fin = BnFinalizeParams {
            partial: gs.addr(),
            gamma: gg.addr(),
            beta: gbeta.addr(),
            scale: gscale.addr(),
            shift: gshift.addr(),
            mean: gmean.addr(),
            invstd: ginv.addr(),
            chunks: chunks as i32,
            pixels: pixels as i32,
            chunk: BN_CHUNK as i32,
            c: cp as i32,
            c_real: cout as i32,
            eps: BN_EPS,
            ..Default::default()
        };
        bn_finalize(dev, &fin).unwrap();
        let y = gy.read_f16(dev);
        let (mean, inv) = (gmean.read_f32(dev), ginv.read_f32(dev));
        let eps = (BN_CHUNK + 3 * (chunks + 8)) as f64 * ACC;
        let (mut worst_mean, mut worst_inv) = (0f64, 0f64);
        for c in 0..cout {
            let v: Vec<f64> = (0..pixels).map(|i| y[i * cp + c] as f64).collect();
            let mu = v.iter().sum::<f64>() / pixels as f64;
            let var = v.iter().map(|a| (a - mu) * (a - mu)).sum::<f64>() / pixels as f64;
            let sd = (var + BN_EPS as f64).sqrt();
            let big = v.iter().fold(0f64, |m, a| m.max(a.abs()));
            worst_mean = worst_mean.max((mean[c] as f64 - mu).abs() / (eps * big));
            let rel = (inv[c] as f64 * sd - 1.0).abs();
            worst_inv = worst_inv.max(rel / (eps * (1.0 + 4.0 * big / sd)));
        }
        let bufs = [
            &gx, &gw, &gb, &gy, &gs, &gg, &gbeta, &gscale, &gshift, &gmean, &ginv,
        ];
        let shape = format!(
            "n{n} {h}×{w} {cin}→{cout}{}",
            if quad { " quad" } else { "" }
        );
        let mut run = Launch::new(t, shape, dev, &bufs);
        run.add("conv3x3 epilogue BN mean (error/bound)", worst_mean, 1.0);
        run.add("conv3x3 epilogue BN 1/sd (error/bound)", worst_inv, 1.0);
    }
}
