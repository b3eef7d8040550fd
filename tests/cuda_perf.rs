//! GPU-only timings (skipped, saying why, without a GPU): eval forward of the paper preset at
//! 8, 32 and 128 patches and the implicit-GEMM conv alone (on the mma.sync and the wgmma tier;
//! dec2's up_conv on both its kernels too; the MIL concepts' two kernels), timed with CUDA events, and the mixed-precision training step (paper network at P = 256 with 4 bags of 8, and the default
//! weights' recipe, P = 112 with 2 bags of 8) timed end to end. Each result is checked for finite
//! outputs and printed as a `PERF` line that tools/gpu_check.sh reads, with a per-stage profile
//! (PROFILE lines). Set M2UNET_PERF_PATCHES (e.g. "8,32") to choose the forward's batch sizes.

mod cuda_common;

use m2unet::config::{ModelConfig, TrainConfig};
use m2unet::cpu::Trainer;
use m2unet::cuda::kernels::{
    conv3x3, conv3x3_up, mil_concepts_gcp, mil_concepts_mma, ConceptsGcpParams, ConceptsMmaParams,
    ConvUpParams,
};
use m2unet::cuda::train::{CudaTrainer, INITIAL_LOSS_SCALE};
use m2unet::cuda::{ConvTier, CudaEngine, Device, DeviceKind};
use m2unet::engine::Batch;
use m2unet::engine::InferenceEngine;
use m2unet::model::{Arch, Model};

fn gpu_or_skip(what: &str) -> bool {
    match Device::new(DeviceKind::Gpu) {
        Ok(d) => {
            println!("{what}: {}", d.describe());
            print!("{}", m2unet::cuda::describe_devices());
            true
        }
        Err(e) => {
            println!("{what}: skipped, no usable GPU ({e})");
            false
        }
    }
}

#[test]
fn gpu_forward_eval_paper_timing() {
    if !gpu_or_skip("gpu_forward_eval_paper_timing") {
        return;
    }
    let c = ModelConfig::paper();
    let model = Model::init(c, 1);
    let sizes: Vec<usize> = std::env::var("M2UNET_PERF_PATCHES")
        .unwrap_or_else(|_| "8,32,128".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("M2UNET_PERF_PATCHES: comma-separated patch counts")
        })
        .collect();
    let mut engine = CudaEngine::new(&model, DeviceKind::Gpu).unwrap();
    for m in sizes {
        let mut r = cuda_common::rng(m as u64);
        let x = cuda_common::uniform(&mut r, m * c.patch * c.patch, 0.0, 1.0);
        let bags = vec![8; m / 8];
        let out = engine.forward_eval(&x, &bags).unwrap();
        let bad = out
            .seg_logits
            .iter()
            .chain(&out.cls_logits)
            .filter(|v| !v.is_finite())
            .count();
        assert_eq!(bad, 0, "non-finite outputs at M={m}");
        let iters = if m >= 128 { 5 } else { 10 };
        let ms = engine.time_forward_eval(&x, &bags, iters).unwrap();
        let gflop = Arch::new(&c).forward_flops_per_patch(c.patch) * m as f64 / 1e9;
        println!(
            "PERF forward m={m} ms={ms:.3} gflop={gflop:.2} tflops={:.1}",
            gflop / ms as f64
        );
        assert!(ms > 0.0);
        let stages = engine.profile_forward_eval(&x, &bags).unwrap();
        for (stage, sms) in &stages {
            println!("PROFILE m={m} stage={stage} ms={sms:.4}");
        }
    }
}

/// Times `launch` (after one warm-up launch; mean of 20) as a GEMM of `m` rows, depth `k` and
/// `n` columns, and prints its `PERF conv NAME` line (2·m·k·n FLOPs).
fn perf_gemm(
    dev: &Device,
    name: &str,
    (m, k, n): (usize, usize, usize),
    mut launch: impl FnMut() -> anyhow::Result<()>,
) {
    launch().unwrap();
    let iters = 20;
    let ms = cuda_common::time_launches(dev, iters, &mut launch) / iters as f32;
    let gflop = 2.0 * (m * k * n) as f64 / 1e9;
    println!(
        "PERF conv {name} m={m} k={k} n={n} ms={ms:.3} gflop={gflop:.2} tflops={:.1}",
        gflop / ms as f64
    );
    assert!(ms > 0.0);
}

#[test]
fn gpu_conv3x3_igemm_timing() {
    if !gpu_or_skip("gpu_conv3x3_igemm_timing") {
        return;
    }
    let mut dev = Device::new(DeviceKind::Gpu).unwrap();
    // Each shape on both tiers (name@tier; wgmma only on compute capability 9.0): enc1.conv2
    // with its fused pool, dec2.conv1 (256×256, [u, skip] 128 → 64) for 8 patches, and the
    // 512-channel enc5.conv2 for 128 patches.
    // The wgmma tier only where it is the device's default (M2UNET_CONV_TIER=mma turns it off).
    let hopper = dev.conv_tier() == ConvTier::Wgmma;
    let tiers: Vec<(ConvTier, &str)> = [(ConvTier::Mma, "mma"), (ConvTier::Wgmma, "wgmma")]
        .into_iter()
        .filter(|&(t, _)| t == ConvTier::Mma || hopper)
        .collect();
    for (name, n, h, cin1, cin2, cout, pool) in [
        ("enc1.conv2", 8, 256, 64, 0, 64, true),
        ("dec2.conv1", 8, 256, 64, 64, 64, false),
        ("enc5.conv2", 128, 16, 512, 0, 512, false),
    ] {
        let m = n * h * h;
        let p = cuda_common::timing_conv_params(&mut dev, (n, h, cin1, cin2, cout), false, pool);
        for &(tier, tier_name) in &tiers {
            dev.set_conv_tier(tier).unwrap();
            let k = 9 * (cin1 + cin2);
            perf_gemm(&dev, &format!("{name}@{tier_name}"), (m, k, cout), || {
                conv3x3(&dev, &p, false)
            });
        }
    }
    // dec2.up_conv for 8 patches: 128×128 upsampled to 256×256, 64 → 64: the fused loader
    // (mma.sync) and the sub-pixel GEMM on each tier; FLOPs of the high-res conv
    // (2·M·cout·9·cin) for all, so their TFLOP/s compare.
    let (n, h, cin, cout) = (8, 256, 64, 64);
    let m = n * h * h;
    let p = cuda_common::timing_conv_params(&mut dev, (n, h, cin, 0, cout), true, false);
    let wt = dev.alloc(16 * cout * 9 * cin * 2).unwrap().0;
    let sub = ConvUpParams {
        x: p.x,
        wt,
        bias: p.bias,
        y: p.y,
        n: n as i32,
        h: (h / 2) as i32,
        w: (h / 2) as i32,
        cin: cin as i32,
        cout: cout as i32,
        relu: 1,
        splits: 1,
        ..Default::default()
    };
    let mut kernels = vec![("up_fused".to_string(), ConvTier::Mma, true)];
    for &(tier, tier_name) in &tiers {
        kernels.push((format!("up_subpixel@{tier_name}"), tier, false));
    }
    for (name, tier, fused) in kernels {
        dev.set_conv_tier(tier).unwrap();
        perf_gemm(&dev, &name, (m, 9 * cin, cout), || match fused {
            true => conv3x3(&dev, &p, true),
            false => conv3x3_up(&dev, &sub),
        });
    }
    // The embedding concepts (h 512 × 16² per patch → 256 concepts, GCP per patch) for 8 and
    // 128 patches: the fp32-weight kernel the train step uses (`gcp`) and the eval kernel on
    // tensor cores (`mma`), as GEMMs of M·256 rows, K = 512, N = 256.
    let (inst, c, k) = (256, 512, 256);
    for patches in [8, 128] {
        let rows = patches * inst;
        let x = dev.alloc(rows * c * 2).unwrap().0;
        let wt = dev.alloc(c * k * 4).unwrap().0;
        let wh = dev.alloc(c * k * 2).unwrap().0;
        let bias = dev.alloc(k * 4).unwrap().0;
        let z = dev.alloc(patches * k * 4).unwrap().0;
        let (m, inst, c, k) = (patches as i32, inst as i32, c as i32, k as i32);
        let gcp = ConceptsGcpParams {
            x,
            wt,
            bias,
            z,
            arg: 0,
            m,
            inst,
            c,
            c_real: c,
            k,
            gcp: 0,
        };
        let mma = ConceptsMmaParams {
            x,
            wt: wh,
            bias,
            z,
            m,
            inst,
            c,
            kc: c,
            k,
            gcp: 0,
            pad_: [0; 2],
        };
        for (name, tensor_cores) in [("gcp", false), ("mma", true)] {
            let shape = (rows, c as usize, k as usize);
            perf_gemm(
                &dev,
                &format!("mil_concepts{patches}@{name}"),
                shape,
                || match tensor_cores {
                    false => mil_concepts_gcp(&dev, &gcp),
                    true => mil_concepts_mma(&dev, &mma),
                },
            );
        }
    }
}

#[test]
fn gpu_train_step_timing() {
    if !gpu_or_skip("gpu_train_step_timing") {
        return;
    }
    let c = ModelConfig::paper();
    let trainer = Trainer::new(Model::init(c, 1), TrainConfig::default());
    for (p, bags) in [(256usize, vec![8usize; 4]), (112, vec![8; 2])] {
        let m: usize = bags.iter().sum();
        let mut r = cuda_common::rng(p as u64);
        let x = cuda_common::uniform(&mut r, m * p * p, 0.0, 1.0);
        let seg: Vec<i64> = (0..m * p * p).map(|i| ((i / 97) % 6) as i64).collect();
        let cls: Vec<i64> = (0..bags.len()).map(|b| (b % 2) as i64).collect();
        let batch = Batch {
            patches: &x,
            patch: p,
            bag_sizes: &bags,
            seg_labels: Some(&seg),
            cls_labels: Some(&cls),
        };
        let mut cuda = CudaTrainer::new(&trainer, DeviceKind::Gpu, INITIAL_LOSS_SCALE).unwrap();
        // Warm-up: buffers sized, kernels loaded.
        for _ in 0..2 {
            let r = cuda.step(&batch).unwrap();
            assert!(r.losses.total.is_finite(), "loss {:?}", r.losses);
        }
        let iters = 10;
        let t = std::time::Instant::now();
        let mut skipped = 0;
        for _ in 0..iters {
            skipped += cuda.step(&batch).unwrap().skipped as usize;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / iters as f64;
        // Forward, and a backward of about twice its work (dgrad + wgrad of every conv).
        let gflop = 3.0 * Arch::new(&c).forward_flops_per_patch(p) * m as f64 / 1e9;
        println!(
            "PERF train p={p} m={m} ms={ms:.3} patches_per_s={:.1} gflop={gflop:.1} tflops={:.1} skipped={skipped} mem_gib={:.2}",
            m as f64 * 1e3 / ms,
            gflop / ms,
            cuda.device_bytes() as f64 / (1u64 << 30) as f64
        );
    }
}
