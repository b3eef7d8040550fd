//! Device rows of kernels/conv_wgmma.cu, the Hopper tier: the single-wgmma probe (TMA with
//! zero fill and the 128-byte swizzle, mbarrier, wgmma descriptors and fragments) against a
//! matmul, and conv3x3 on the wgmma tier (plain and concatenated inputs, 64 and 128 output
//! channels per block, ReLU, fused max-pool, tiles past the image's edge). Skipped on a GPU of
//! another compute capability than 9.0.

use crate::conv_kernels::{conv_rows, ConvCase};
use crate::cuda_common::*;
use crate::device::{abs, Launch, ACC};
use crate::{max_abs, Table};
use m2unet::cuda::kernels::wgmma_probe;
use m2unet::cuda::{ConvTier, DevPtr, Device};

/// (n, h, w, input channel parts, cout, relu, up = false): each takes the wgmma tier.
const CONVS: [ConvCase; 4] = [
    // 20 columns in tiles of 32 × 8: the right part of each tile lies past the edge.
    (2, 12, 20, &[64], 64, true, false),
    // Odd sizes (16 × 16 tiles), two K slices per tap, three groups of 64 output channels.
    (1, 9, 7, &[128], 192, false, false),
    // Concatenated inputs, 128 output channels per block, pooled, two tiles of 16 × 16.
    (1, 32, 16, &[64, 64], 128, true, false),
    // A tile larger than the image (10 columns in 16, 6 rows in 16), pooled.
    (2, 6, 10, &[64], 128, true, false),
];

pub fn rows(dev: &mut Device, t: &mut Table) {
    if let Err(e) = dev.set_conv_tier(ConvTier::Wgmma) {
        println!("wgmma rows skipped: {e}");
        return;
    }
    dev.set_conv_tier(ConvTier::Mma).unwrap();
    probe_row(dev, t);
    for case in &CONVS {
        conv_rows(dev, t, case, ConvTier::Wgmma);
    }
}

/// wgmma_probe: D = A · Bᵀ with A 50 × 64 (rows 50..63 of the 64-row box are TMA's zero fill)
/// and B 128 × 64, both fp16, D fp32. Bound: an fp32 sum of 64 products, (K + 1)·ACC·Σ|a·b|.
fn probe_row(dev: &mut Device, t: &mut Table) {
    let (rows, k, n) = (50, 64, 128);
    let mut r = rng(90);
    let a = round_f16(&uniform(&mut r, rows * k, -1.0, 1.0));
    let b = round_f16(&uniform(&mut r, n * k, -1.0, 1.0));
    let (mut want, mut sum_abs) = (vec![0.0f64; 64 * n], vec![0.0f64; 64 * n]);
    for i in 0..rows {
        for j in 0..n {
            for kk in 0..k {
                let v = a[i * k + kk] as f64 * b[j * k + kk] as f64;
                want[i * n + j] += v;
                sum_abs[i * n + j] += v.abs();
            }
        }
    }
    let ga = Guarded::with(dev, &to_f16(&a));
    let gb = Guarded::with(dev, &to_f16(&b));
    let gd = Guarded::new(dev, 64 * n * 4);
    wgmma_probe(
        dev,
        DevPtr(ga.addr()),
        rows,
        DevPtr(gb.addr()),
        DevPtr(gd.addr()),
    )
    .unwrap();
    let got = gd.read_f32(dev);
    let bound = (k + 1) as f64 * ACC * max_abs(&abs(&sum_abs));
    let mut run = Launch::new(
        t,
        format!("A {rows}×{k} (box 64) · Bᵀ {n}×{k}"),
        dev,
        &[&ga, &gb, &gd],
    );
    run.output("wgmma_probe", &got, &want, 0.0, bound);
}
