//! Criterion benches of the CUDA kernels and the whole eval forward on a GPU (timed with CUDA
//! events; throughput in FLOP/s or bytes/s). Without a GPU they print why and do nothing:
//! emulator timings are not performance. PyTorch/cuDNN numbers for the same shapes come from
//! tools/gpu_check.sh and are recorded beside these in docs/perf.md.

#[path = "../tests/cuda_common/mod.rs"]
mod cuda_common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use cuda_common::{time_launches, timing_conv_params};
use m2unet::config::ModelConfig;
use m2unet::cuda::kernels::*;
use m2unet::cuda::{ConvTier, CudaEngine, DevPtr, Device, DeviceKind};
use m2unet::model::{Arch, Model};
use std::time::Duration;

/// Times `iters` launches of `launch` with CUDA events.
fn gpu_time(dev: &Device, iters: u64, launch: impl FnMut() -> anyhow::Result<()>) -> Duration {
    Duration::from_secs_f64(time_launches(dev, iters, launch) as f64 / 1e3)
}

fn alloc(dev: &mut Device, bytes: usize) -> DevPtr {
    dev.alloc(bytes).expect("device allocation")
}

fn kernels(c: &mut Criterion) {
    let mut dev = match Device::new(DeviceKind::Gpu) {
        Ok(d) => d,
        Err(e) => {
            println!("cuda_kernels benches skipped: {e}");
            return;
        }
    };
    println!("{}", dev.describe());
    let hopper = dev.conv_tier();
    let mut g = c.benchmark_group("cuda_kernels");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    // Implicit-GEMM conv at the network's two extremes, plain / concat / upsampling loaders.
    for (name, n, h, cin1, cin2, cout, up) in [
        (
            "conv3x3_igemm enc1.conv2 8x256² 64→64 +pool",
            8,
            256,
            64,
            0,
            64,
            false,
        ),
        (
            "conv3x3_igemm dec2.conv1 8x256² [64,64]→64",
            8,
            256,
            64,
            64,
            64,
            false,
        ),
        (
            "conv3x3_igemm enc5.conv2 128x16² 512→512",
            128,
            16,
            512,
            0,
            512,
            false,
        ),
        (
            "conv3x3_igemm_up dec2.up_conv 8x256² 64→64",
            8,
            256,
            64,
            0,
            64,
            true,
        ),
    ] {
        let m = n * h * h;
        let pool = name.contains("pool");
        let p = timing_conv_params(&mut dev, (n, h, cin1, cin2, cout), up, pool);
        g.throughput(Throughput::Elements(
            (2 * m * cout * 9 * (cin1 + cin2)) as u64,
        ));
        // Each on both tiers where the wgmma one is the device's default (the upsampling loader
        // is mma.sync only).
        for (tier, tier_name) in [(ConvTier::Mma, "mma"), (ConvTier::Wgmma, "wgmma")] {
            if tier == ConvTier::Wgmma && (up || hopper != ConvTier::Wgmma) {
                continue;
            }
            dev.set_conv_tier(tier).unwrap();
            g.bench_function(format!("{name} @{tier_name} (elements = FLOP)"), |b| {
                b.iter_custom(|it| gpu_time(&dev, it, || conv3x3(&dev, &p, up)))
            });
        }
        dev.set_conv_tier(hopper).unwrap();
    }
    // First layer: 1 fp32 channel → 64, with the pooled output.
    let (n, h) = (8, 256);
    let pf = ConvFirstParams {
        x: alloc(&mut dev, n * h * h * 4).0,
        wt: alloc(&mut dev, 64 * 9 * 4).0,
        bias: alloc(&mut dev, 64 * 4).0,
        y: alloc(&mut dev, n * h * h * 64 * 2).0,
        y_pool: alloc(&mut dev, n * h * h * 16 * 2).0,
        n: n as i32,
        cin: 1,
        h: h as i32,
        w: h as i32,
        cout_real: 64,
        cout: 64,
        relu: 1,
        pad_: 0,
    };
    g.throughput(Throughput::Bytes(
        (n * h * h * (4 + 64 * 2 + 16 * 2)) as u64,
    ));
    g.bench_function("conv3x3_first enc1.conv1 8x256² 1→64 (bytes)", |b| {
        b.iter_custom(|it| gpu_time(&dev, it, || conv3x3_first(&dev, &pf)))
    });
    // Training-mode BN apply with pooling, and the seg head: memory-bound.
    let pa = BnApplyParams {
        x: alloc(&mut dev, n * h * h * 64 * 2).0,
        scale: alloc(&mut dev, 64 * 4).0,
        shift: alloc(&mut dev, 64 * 4).0,
        y: alloc(&mut dev, n * h * h * 64 * 2).0,
        y_pool: alloc(&mut dev, n * h * h * 16 * 2).0,
        n: n as i32,
        h: h as i32,
        w: h as i32,
        c: 64,
    };
    g.throughput(Throughput::Bytes(
        (n * h * h * 64 * 2 * 2 + n * h * h * 16 * 2) as u64,
    ));
    g.bench_function("bn_apply +pool 8x256²x64 (bytes)", |b| {
        b.iter_custom(|it| gpu_time(&dev, it, || bn_apply(&dev, &pa)))
    });
    let ps = SegHeadParams {
        x: alloc(&mut dev, n * h * h * 64 * 2).0,
        w: alloc(&mut dev, 6 * 64 * 4).0,
        bias: alloc(&mut dev, 6 * 4).0,
        logits: alloc(&mut dev, n * 6 * h * h * 4).0,
        labels: 0,
        costs: 0,
        n: n as i32,
        hw: (h * h) as i32,
        c: 64,
        c_real: 64,
        classes: 6,
        pad_: 0,
    };
    g.throughput(Throughput::Bytes((n * h * h * (64 * 2 + 6 * 4)) as u64));
    g.bench_function("seg_head 8x256² 64→6 (bytes)", |b| {
        b.iter_custom(|it| gpu_time(&dev, it, || seg_head(&dev, &ps)))
    });
    g.finish();
}

fn forward(c: &mut Criterion) {
    let cfg = ModelConfig::paper();
    let mut engine = match CudaEngine::new(&Model::init(cfg, 1), DeviceKind::Gpu) {
        Ok(e) => e,
        Err(e) => {
            println!("cuda forward bench skipped: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("cuda_forward");
    g.sample_size(10).measurement_time(Duration::from_secs(3));
    let m = 8;
    let x = vec![0.5f32; m * cfg.patch * cfg.patch];
    g.throughput(Throughput::Elements(
        (Arch::new(&cfg).forward_flops_per_patch(cfg.patch) * m as f64) as u64,
    ));
    g.bench_function("eval forward paper P=256 M=8 (elements = FLOP)", |b| {
        b.iter_custom(|it| {
            let ms = engine
                .time_forward_eval(&x, &[8], it as usize)
                .expect("forward");
            Duration::from_secs_f64(ms as f64 * it as f64 / 1e3)
        })
    });
    g.finish();
}

criterion_group!(benches, kernels, forward);
criterion_main!(benches);
