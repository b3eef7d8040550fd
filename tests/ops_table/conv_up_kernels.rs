//! Device rows of kernels/conv_up.cu: the sub-pixel up_conv (conv3x3_up_subpixel, split-K included; and on the wgmma tier, whose conv3x3_wgmma computes the inner region while conv3x3_up_subpixel takes the border) against the reference and against the fused conv3x3_igemm_up on identical inputs, and the device pack of its composite weights against the host's.

use crate::cuda_common::*;
use crate::device::{abs, Launch, ACC, U16};
use crate::{max_abs, Table};
use m2unet::cpu::ops::Dims;
use m2unet::cuda::kernels::*;
use m2unet::cuda::weights::{pack_conv3x3, pack_conv_up, pad8, padded};
use m2unet::cuda::{ConvTier, Device};
use m2unet::reference;

/// (n, low-res h, w, cin, cout, relu): odd and tiny sizes (every border case: h or w = 1
/// is first and last at once), channels that are not multiples of 8, n > 1, and (1, 3, 3,
/// 64, 24) splits K = 9·64 four ways.
const CASES: [(usize, usize, usize, usize, usize, bool); 6] = [
    (1, 1, 1, 5, 3, true),
    (2, 1, 3, 3, 9, false),
    (3, 3, 5, 13, 11, true),
    (2, 7, 7, 24, 20, true),
    (1, 2, 4, 7, 5, false),
    (1, 3, 3, 64, 24, true),
];

/// Cases the wgmma tier takes (64-channel multiples, h and w ≥ 3): an inner region of 3 × 4
/// and of 7 × 5 pixels in tiles past its edge, two K slices per tap, and a single inner
/// pixel with 128 output channels.
const WGMMA_CASES: [(usize, usize, usize, usize, usize, bool); 3] = [
    (2, 5, 6, 64, 64, true),
    (1, 9, 7, 128, 64, false),
    (1, 3, 3, 64, 128, true),
];

pub fn rows(dev: &mut Device, t: &mut Table) {
    let splits: Vec<usize> = (CASES.iter())
        .map(|&case| up_rows(dev, t, case, ConvTier::Mma))
        .collect();
    assert!(
        splits.iter().any(|&s| s > 1),
        "no up_conv case splits K: {splits:?}"
    );
    if let Err(e) = dev.set_conv_tier(ConvTier::Wgmma) {
        println!("wgmma up_conv rows skipped: {e}");
        return;
    }
    dev.set_conv_tier(ConvTier::Mma).unwrap();
    for &case in &WGMMA_CASES {
        up_rows(dev, t, case, ConvTier::Wgmma);
    }
}

/// The rows of one case; on the wgmma tier (no split-K) the up_conv's rows are named
/// "wgmma " + op.
fn up_rows(
    dev: &mut Device,
    t: &mut Table,
    (n, ih, iw, cin, cout, relu): (usize, usize, usize, usize, usize, bool),
    tier: ConvTier,
) -> usize {
    let mut r = rng((n * 1000 + ih * 100 + iw * 10 + cin + cout) as u64);
    let (h, w) = (2 * ih, 2 * iw);
    let x = round_f16(&uniform(&mut r, n * cin * ih * iw, -1.0, 1.0));
    let wgt = round_f16(&uniform(&mut r, cout * cin * 9, -0.3, 0.3));
    let bias = uniform(&mut r, cout, -0.2, 0.2);

    // Reference: upsample → conv3x3 → (ReLU).
    let (xf, wf, bf) = (to_f64(&x), to_f64(&wgt), to_f64(&bias));
    let (low, d) = (Dims::new(n, cin, ih, iw), Dims::new(n, cin, h, w));
    let mut y =
        reference::conv3x3_forward(&reference::upsample2x_forward(&xf, low), d, &wf, &bf, cout);
    if relu {
        y = reference::relu_forward(&y);
    }

    // Bounds. a = |w| ∗ upsample|x| + |b| bounds Σ|terms| of every output (the bilinear
    // weights are ≥ 0), in either formulation. Sub-pixel: the fp32 sum of K = 9·cin products
    // and the bias, and the composite weights rounded to fp16 once: U16·Σ|composite·x| ≤ U16·a.
    // Fused (as in conv_kernels): the same sum, exact fp16 weights, each upsampled input blended
    // in fp16 (≤ 8.75·U16·max|x| each, so 9·U16·max|x|·Σ|w| per output).
    let a = reference::conv3x3_forward(
        &reference::upsample2x_forward(&abs(&xf), low),
        d,
        &abs(&wf),
        &abs(&bf),
        cout,
    );
    let k = (9 * cin + 1) as f64;
    let wsum = (wf.chunks(cin * 9))
        .map(|row| row.iter().map(|v| v.abs()).sum::<f64>())
        .fold(0.0, f64::max);
    let sub_bound = (k * ACC + U16) * max_abs(&a);
    let fused_bound = k * ACC * max_abs(&a) + 9.0 * U16 * max_abs(&xf) * wsum;

    // The device: the same NHWC fp16 input for both kernels.
    let (cp, kp) = (pad8(cout), pad8(cin));
    let gx = Guarded::with(dev, &to_f16(&nchw_to_nhwc(&x, n, cin, ih * iw, kp)));
    let host_pack = pack_conv_up(&wgt, cout, cin).unwrap();
    let gw = Guarded::with(dev, &host_pack);
    let gw32 = Guarded::with(dev, &wgt);
    let gwd = Guarded::new(dev, host_pack.len() * 2);
    let gwf = Guarded::with(dev, &pack_conv3x3(&wgt, cout, &[cin]).unwrap());
    let gb = Guarded::with(dev, &padded(&bias, cp));
    let (gy, gyf) = (
        Guarded::new(dev, n * h * w * cp * 2),
        Guarded::new(dev, n * h * w * cp * 2),
    );
    let splits = match tier {
        ConvTier::Mma => conv_up_splits(n, ih, iw, kp, cp),
        ConvTier::Wgmma => 1,
    };
    let fused_splits = conv_splits(n * h * w, cp, 9 * kp);
    let gpart = Guarded::new(dev, splits.max(fused_splits) * n * h * w * cp * 4);
    let p = ConvUpParams {
        x: gx.addr(),
        wt: gw.addr(),
        bias: gb.addr(),
        y: gy.addr(),
        partial: gpart.addr(),
        n: n as i32,
        h: ih as i32,
        w: iw as i32,
        cin: kp as i32,
        cout: cp as i32,
        relu: relu as i32,
        splits: splits as i32,
        border_only: 0,
    };
    assert!(
        tier == ConvTier::Mma || wgmma_up_fits(&p),
        "the wgmma tier does not take this up_conv"
    );
    dev.set_conv_tier(tier).unwrap();
    conv3x3_up(dev, &p).unwrap();
    dev.set_conv_tier(ConvTier::Mma).unwrap();
    let pq = PackConvUpParams {
        w: gw32.addr(),
        out: gwd.addr(),
        cout: cout as i32,
        cin: cin as i32,
    };
    pack_conv_up_dev(dev, &pq).unwrap();
    let fused = ConvParams {
        x: gx.addr(),
        wt: gwf.addr(),
        bias: gb.addr(),
        y: gyf.addr(),
        partial: gpart.addr(),
        stats: 0,
        n: n as i32,
        h: h as i32,
        w: w as i32,
        cin1: kp as i32,
        cout: cp as i32,
        in_h: ih as i32,
        in_w: iw as i32,
        relu: relu as i32,
        splits: fused_splits as i32,
        ..Default::default()
    };
    conv3x3(dev, &fused, true).unwrap();

    let bufs = [&gx, &gw, &gw32, &gwd, &gwf, &gb, &gy, &gyf, &gpart];
    let shape = format!("n{n} {ih}×{iw} [{cin}]→{cout} split-K {splits}");
    let mut run = Launch::new(t, shape, dev, &bufs).nhwc(cout, cp);
    let op = format!(
        "{}up2x+conv3x3 subpixel{}",
        if tier == ConvTier::Wgmma {
            "wgmma "
        } else {
            ""
        },
        if relu { "+relu" } else { "" }
    );
    let got = gy.read_f16(dev);
    run.output_nchw(&op, &got, (&y, n), sub_bound);
    // Against the fused kernel: both bounds, and both outputs' fp16 rounding.
    let old: Vec<f64> = gyf.read_f16(dev).iter().map(|&v| v as f64).collect();
    let both = sub_bound + fused_bound;
    run.output(&format!("{op} vs fused"), &got, &old, 2.0 * U16, both);
    // The device pack must equal the host's bit for bit: the error is the count of differences.
    let dev_pack = gwd.read_f16(dev);
    let host: Vec<f32> = host_pack.iter().map(|v| v.to_f32()).collect();
    let differ = dev_pack
        .iter()
        .zip(&host)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    run.add("pack_conv_up = host pack", differ as f64, 0.0);
    splits
}
