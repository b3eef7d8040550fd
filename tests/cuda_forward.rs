//! The CUDA engine's whole forward pass (eval and train-mode BatchNorm) under the emulator
//! (or a GPU with M2UNET_TEST_DEVICE=cuda) against a plain f32 NCHW forward of model.md
//! written here from naive loops: relative L2 error of every output ≤ 1e-2.

mod cuda_common;

use cuda_common::*;
use m2unet::config::TrainConfig;
use m2unet::config::{GcpMode, ModelConfig};
use m2unet::cuda::kernels::UpConvKernel;
use m2unet::cuda::{CudaEngine, DeviceKind};
use m2unet::engine::Mode;
use m2unet::engine::{InferenceEngine, LobeScores};
use m2unet::model::Model;
use m2unet::reference::network_pass;
use rand::Rng;

/// The reference network (f64 reference ops walking the layer list) on patches of side `p`:
/// (seg logits, cls logits, running statistics after the pass), as f32.
fn reference(model: &Model, x: &[f32], p: usize, bags: &[usize], mode: Mode) -> [Vec<f32>; 3] {
    let pass = network_pass(model, x, p, bags, mode, None, &TrainConfig::default());
    [pass.seg_logits, pass.cls_logits, pass.buffers].map(|v| v.iter().map(|&a| a as f32).collect())
}

fn rel_l2(reference: &[f32], got: &[f32]) -> f64 {
    nerr(reference, got).sqrt()
}

/// One forward on the engine with the decoders' up_conv on kernel `up`.
fn check_forward_with(
    c: ModelConfig,
    p: usize,
    bags: &[usize],
    train: bool,
    seed: u64,
    up: UpConvKernel,
) {
    let model = random_model(c, seed);
    let m: usize = bags.iter().sum();
    let mut r = rng(seed + 1);
    let x = uniform(&mut r, m * c.in_channels * p * p, 0.0, 1.0);
    let kind = device_kind();
    let mut engine = CudaEngine::new(&model, kind).unwrap();
    engine.set_upconv(up);
    let t = std::time::Instant::now();
    let out = if train {
        engine.forward_train(&x, bags).unwrap()
    } else {
        engine.forward_eval(&x, bags).unwrap()
    };
    let secs = t.elapsed().as_secs_f64();
    let mode = if train { Mode::Train } else { Mode::Eval };
    let [seg, cls, ref_buffers] = reference(&model, &x, p, bags, mode);
    let es = rel_l2(&seg, &out.seg_logits);
    let ec = rel_l2(&cls, &out.cls_logits);
    println!(
        "depth {} P={p} W={} B={} bags {bags:?} {mode:?} up_conv {up:?}: rel L2 seg logits {es:.3e}, cls logits {ec:.3e} (threshold 1e-2); {secs:.2} s on {}",
        c.depth,
        c.enc_width,
        c.bottleneck_width,
        engine.describe()
    );
    assert!(es <= 1e-2 && ec <= 1e-2);
    if train {
        let er = rel_l2(&ref_buffers, &engine.model().buffers);
        println!("  running statistics after the train pass: rel L2 {er:.3e} (threshold 1e-3)");
        assert!(er <= 1e-3);
        assert!(engine.model().batches_tracked.iter().all(|&b| b == 1));
    }
}

/// The forward with the sub-pixel up_conv (the default).
fn check_forward(c: ModelConfig, p: usize, bags: &[usize], train: bool, seed: u64) {
    check_forward_with(c, p, bags, train, seed, UpConvKernel::Subpixel);
}

fn mid() -> ModelConfig {
    // Channels that are not multiples of 8 (padding), a patch side that is not a power of two.
    ModelConfig {
        patch: 48,
        enc_width: 12,
        bottleneck_width: 20,
        emb_concepts: 12,
        img_concepts: 6,
        gcp: GcpMode::MaxMinusMean,
        ..ModelConfig::tiny()
    }
}

#[test]
fn forward_eval_tiny() {
    check_forward(ModelConfig::tiny(), 32, &[2, 2], false, 21);
}

#[test]
fn forward_train_tiny() {
    check_forward(ModelConfig::tiny(), 32, &[2, 2], true, 22);
}

#[test]
fn forward_eval_mid() {
    check_forward(mid(), 48, &[2, 3], false, 23);
}

#[test]
fn forward_train_mid() {
    check_forward(mid(), 48, &[3, 2], true, 24);
}

#[test]
fn forward_eval_mid_fused_upconv() {
    check_forward_with(mid(), 48, &[2, 3], false, 23, UpConvKernel::Fused);
}

#[test]
fn forward_train_tiny_fused_upconv() {
    check_forward_with(
        ModelConfig::tiny(),
        32,
        &[2, 2],
        true,
        22,
        UpConvKernel::Fused,
    );
}

#[test]
fn segment_labels_match_eval_logits() {
    // `segment` against the argmax of forward_eval's logits: the tiny network takes the seg
    // head in its last conv's epilogue (conv3x3_igemm_seg); the paper widths at P = 16 split
    // that conv's K, so the separate seg_head kernel runs (the NVTX ranges tell which).
    let paper16 = ModelConfig {
        patch: 16,
        ..ModelConfig::paper()
    };
    for (c, fused) in [(ModelConfig::tiny(), true), (paper16, false)] {
        let model = random_model(c, 25);
        let mut r = rng(26);
        let x = uniform(&mut r, 2 * c.patch * c.patch, 0.0, 1.0);
        let mut engine = CudaEngine::new(&model, DeviceKind::Emu).unwrap();
        let (scores, events) =
            m2unet::cuda::nvtx::record(|| engine.segment(&x, c.patch, true).unwrap());
        let labels = &scores.labels;
        let last = m2unet::model::Arch::new(&c)
            .units
            .last()
            .unwrap()
            .conv
            .clone();
        let ran_last_conv = events
            .iter()
            .any(|e| matches!(e, m2unet::cuda::nvtx::Event::Push(n) if *n == last));
        let out = engine.forward_eval(&x, &[2]).unwrap();
        let pp = c.patch * c.patch;
        let mut mism = 0;
        for i in 0..2 {
            for px in 0..pp {
                let l = |k: usize| out.seg_logits[(i * c.seg_classes + k) * pp + px];
                let best = (0..c.seg_classes).fold(0, |b, k| if l(k) > l(b) { k } else { b });
                mism += (best != labels[i * pp + px] as usize) as usize;
            }
        }
        // The lobe-order costs the seg head wrote (kernels/common.cuh class_costs) against
        // the host's from forward_eval's logits (LobeScores::from_logits): off by at most one
        // 1/16-nat step (expf/logf may round differently), and the share that is off.
        let host = LobeScores::from_logits(&out.seg_logits, c.seg_classes, pp, true);
        let (mut off, mut worst) = (0, 0);
        for (&a, &b) in scores.costs().iter().zip(host.costs()) {
            off += (a != b) as usize;
            worst = worst.max(a.abs_diff(b));
        }
        println!(
            "W={}: seg head {} the last conv; segment vs argmax(forward_eval): {mism} mismatches of {}; lobe costs: {off} of {} off by up to {worst} step(s)",
            c.enc_width,
            if ran_last_conv { "after" } else { "fused into" },
            labels.len(),
            host.costs().len()
        );
        assert_eq!(ran_last_conv, !fused);
        assert_eq!(mism, 0);
        assert_eq!(scores.costs().len(), host.costs().len());
        assert!(worst <= 1 && off * 1000 <= host.costs().len());
    }
}

#[test]
fn classify_in_chunks_equals_the_full_forward() {
    // classify runs only the encoder, in chunks of patches (4 on the CPU, 8 on CUDA), and the
    // MIL head over the whole bag: its logits must equal forward_eval's (eval-mode BatchNorm
    // treats every patch alone). Bags of 7 and 4 patches cross the chunk boundaries.
    let c = ModelConfig::tiny();
    let model = random_model(c, 51);
    let bags = [7usize, 4];
    let x = uniform(&mut rng(52), 11 * c.patch * c.patch, 0.0, 1.0);
    let mut cuda = CudaEngine::new(&model, device_kind()).unwrap();
    let mut cpu = m2unet::cpu::CpuEngine::new(model.clone());
    let engines: [&mut dyn InferenceEngine; 2] = [&mut cuda, &mut cpu];
    for e in engines {
        let full = e.forward_eval(&x, &bags).unwrap().cls_logits;
        let chunked = e.classify(&x, &bags).unwrap();
        let err = rel_l2(&full, &chunked);
        println!(
            "{}: classify vs forward_eval cls logits rel L2 {err:.3e} (threshold 1e-6)",
            e.describe()
        );
        assert!(err <= 1e-6, "{full:?} vs {chunked:?}");
        assert_ne!(
            full[..2],
            full[2..],
            "the two bags must get different logits"
        );
    }
}

#[test]
fn bad_bags_are_errors() {
    let c = ModelConfig::tiny();
    let mut engine = CudaEngine::new(&Model::init(c, 1), DeviceKind::Emu).unwrap();
    let x = vec![0.5f32; 3 * c.patch * c.patch];
    let e1 = engine.forward_eval(&x, &[1, 2]).unwrap_err().to_string();
    let e2 = engine.forward_eval(&x, &[2, 2]).unwrap_err().to_string();
    let e3 = engine.forward_eval(&x[1..], &[3]).unwrap_err().to_string();
    println!("errors: {e1} | {e2} | {e3}");
    assert!(e1.contains("at least 2") && e2.contains("M = 4") && e3.contains("M = 3"));
    // A non-finite pixel is refused by both engines, in forward and segment, naming the patch.
    let mut nan = x.clone();
    nan[2 * c.patch * c.patch + 7] = f32::NAN;
    let mut cpu = m2unet::cpu::CpuEngine::new(Model::init(c, 1));
    let engines: [&mut dyn InferenceEngine; 2] = [&mut engine, &mut cpu];
    for e in engines {
        let e4 = e.forward_eval(&nan, &[3]).unwrap_err().to_string();
        let e5 = e.segment(&nan, c.patch, true).unwrap_err().to_string();
        println!("{}: {e4} | {e5}", e.describe());
        assert!(e4.contains("non-finite") && e4.contains("patch 2"));
        assert!(e5.contains("non-finite") && e5.contains("patch 2"));
    }
}

#[test]
fn profile_lists_every_stage() {
    // One entry per conv unit of the layer list (22 for the paper's depth), the seg head, the
    // MIL head, in network order, each a non-negative time.
    let c = ModelConfig::tiny();
    let model = Model::init(c, 3);
    let mut engine = CudaEngine::new(&model, DeviceKind::Emu).unwrap();
    let x = vec![0.25f32; 2 * c.patch * c.patch];
    let stages = engine.profile_forward_eval(&x, &[2]).unwrap();
    let mut want: Vec<String> = model.arch().units.iter().map(|u| u.conv.clone()).collect();
    assert_eq!(want.len(), 22);
    want.push("seg_head".into());
    want.push("mil_head".into());
    let names: Vec<&str> = stages.iter().map(|(s, _)| s.as_str()).collect();
    let total: f32 = stages.iter().map(|(_, ms)| ms).sum();
    println!(
        "profile: {} stages, {total:.1} ms in all on the emulator",
        stages.len()
    );
    assert_eq!(names, want.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(stages.iter().all(|(_, ms)| *ms >= 0.0));
}

/// The CUDA engine (emulator, or GPU with M2UNET_TEST_DEVICE=cuda) against the CPU engine's
/// `run_step` in eval and train mode: outputs and, in train mode, the updated running stats.
fn check_vs_cpu_engine(c: ModelConfig, p: usize, bags: &[usize], seed: u64) {
    use m2unet::config::TrainConfig;
    use m2unet::cpu::run_step;
    use m2unet::engine::{Batch, Mode};
    let model = random_model(c, seed);
    let m: usize = bags.iter().sum();
    let mut r = rng(seed + 1);
    let x = uniform(&mut r, m * c.in_channels * p * p, 0.0, 1.0);
    let kind = device_kind();
    let batch = Batch {
        patches: &x,
        patch: p,
        bag_sizes: bags,
        seg_labels: None,
        cls_labels: None,
    };
    for (mode, train) in [(Mode::Eval, false), (Mode::Train, true)] {
        let mut cpu_model = model.clone();
        let cpu = run_step(&mut cpu_model, &batch, mode, &TrainConfig::default())
            .unwrap()
            .outputs;
        let mut engine = CudaEngine::new(&model, kind).unwrap();
        let out = if train {
            engine.forward_train(&x, bags).unwrap()
        } else {
            engine.forward_eval(&x, bags).unwrap()
        };
        let es = rel_l2(&cpu.seg_logits, &out.seg_logits);
        let ec = rel_l2(&cpu.cls_logits, &out.cls_logits);
        let er = rel_l2(&cpu_model.buffers, &engine.model().buffers);
        println!(
            "CUDA ({}) vs CPU engine, depth {} P={p} W={} B={} bags {bags:?} {}: rel L2 seg {es:.3e}, cls {ec:.3e}, running stats {er:.3e} (thresholds 1e-2, 1e-2, 1e-3)",
            engine.describe(),
            c.depth,
            c.enc_width,
            c.bottleneck_width,
            if train { "train" } else { "eval" }
        );
        assert!(es <= 1e-2 && ec <= 1e-2 && er <= 1e-3);
    }
}

#[test]
fn wgmma_tier_forward_matches_cpu_engine() {
    // The paper widths at P = 48 with 8 patches: the top level's 144 tiles of 128 pixels fill
    // a wave, so enc1.conv2 (with its pool), dec2's convs and dec2.up_conv's inner region
    // take the wgmma tier (the deeper, split-K layers stay on mma.sync); the launch log shows
    // it. Both tiers must match the CPU engine within the calibrated fp16 threshold; on the
    // emulator they must equal each other bit for bit, since both CPU twins sum every
    // output's products sequentially in the same k order (tap, then channel), so any
    // indexing slip of the Hopper path (tap coordinates, fragments, epilogue) shows.
    use m2unet::cpu::run_step;
    use m2unet::cuda::ConvTier;
    use m2unet::engine::Batch;
    let (c, p, bags) = (ModelConfig::paper(), 48, [4usize, 4]);
    let model = random_model(c, 61);
    let x = uniform(&mut rng(62), 8 * p * p, 0.0, 1.0);
    let batch = Batch {
        patches: &x,
        patch: p,
        bag_sizes: &bags,
        seg_labels: None,
        cls_labels: None,
    };
    let cpu = run_step(
        &mut model.clone(),
        &batch,
        Mode::Eval,
        &TrainConfig::default(),
    )
    .unwrap()
    .outputs;
    let mut engine = CudaEngine::new(&model, device_kind()).unwrap();
    let mut outs = vec![];
    for tier in [ConvTier::Mma, ConvTier::Wgmma] {
        if let Err(e) = engine.set_conv_tier(tier) {
            println!("wgmma tier skipped: {e}");
            return;
        }
        let t = std::time::Instant::now();
        engine.device().log_launches(true);
        let out = engine.forward_eval(&x, &bags).unwrap();
        let launched = engine.device().log_launches(false);
        let hopper = launched.iter().filter(|k| k.contains("wgmma")).count();
        let es = rel_l2(&cpu.seg_logits, &out.seg_logits);
        let ec = rel_l2(&cpu.cls_logits, &out.cls_logits);
        println!(
            "{tier:?} tier vs CPU engine, paper widths P={p} bags {bags:?}: rel L2 seg {es:.3e}, cls {ec:.3e} (threshold 1e-2); {hopper} of {} launches on the wgmma tier; {:.1} s on {}",
            launched.len(),
            t.elapsed().as_secs_f64(),
            engine.describe()
        );
        assert!(es <= 1e-2 && ec <= 1e-2);
        assert_eq!(hopper > 0, tier == ConvTier::Wgmma);
        outs.push(out);
    }
    let between = rel_l2(&outs[0].seg_logits, &outs[1].seg_logits);
    println!("wgmma vs mma.sync tier: rel L2 seg {between:.3e}");
    if device_kind() == DeviceKind::Emu {
        assert!(
            outs[0].seg_logits == outs[1].seg_logits && outs[0].cls_logits == outs[1].cls_logits
        );
    }
    // `segment` on the wgmma tier: its last conv carries the seg head, argmax and lobe-order
    // costs (conv3x3_wgmma_seg); the labels must be the argmax of the same tier's logits and
    // the costs the host's from them, within one 1/16-nat step.
    engine.device().log_launches(true);
    let scores = engine.segment(&x, p, true).unwrap();
    let launched = engine.device().log_launches(false);
    let host = LobeScores::from_logits(&outs[1].seg_logits, c.seg_classes, p * p, true);
    let mism = (0..scores.labels.len())
        .filter(|&u| scores.labels[u] != host.labels[u])
        .count();
    let worst = (scores.costs().iter().zip(host.costs()))
        .map(|(&a, &b)| a.abs_diff(b))
        .max()
        .unwrap();
    let fused = launched.contains(&"conv3x3_wgmma_seg");
    println!(
        "segment on the wgmma tier: {mism} of {} labels differ from argmax(forward_eval), lobe costs off by up to {worst} step(s); seg head in conv3x3_wgmma_seg: {fused}",
        scores.labels.len()
    );
    assert!(fused);
    assert_eq!(mism, 0);
    assert_eq!(scores.costs().len(), host.costs().len());
    assert!(worst <= 1);
}

/// A network that is not the paper's: 3 encoder stages (2 decoder blocks), other widths and
/// concept counts. The layer list is the only place that knows the depth, so both engines
/// and the reference follow it from the config alone. The patch side (20) is not the
/// config's trained patch (32): the engines take it from the input.
fn variant() -> ModelConfig {
    ModelConfig {
        depth: 3,
        enc_width: 10,
        bottleneck_width: 14,
        emb_concepts: 6,
        img_concepts: 5,
        gcp: GcpMode::Mean,
        ..ModelConfig::tiny()
    }
}

#[test]
fn variant_depth3_cuda_matches_reference() {
    check_forward(variant(), 20, &[2, 3], false, 41);
    check_forward(variant(), 20, &[3, 2], true, 42);
}

#[test]
fn variant_depth3_cpu_matches_reference() {
    // The CPU engine (f32) against the f64 reference network: eval and train outputs, running
    // statistics, losses and every parameter's gradient, at f32 rounding.
    use m2unet::cpu::run_step;
    use m2unet::engine::Batch;
    let (c, p, bags) = (variant(), 20, [2usize, 3]);
    assert_eq!(m2unet::model::Arch::new(&c).units.len(), 6 + 6);
    let model = random_model(c, 46);
    let x = uniform(&mut rng(44), 5 * p * p, 0.0, 1.0);
    let seg_labels: Vec<i64> = (0..5 * p * p)
        .map(|i| (i * 7 % 13) as i64 % 7 - 1)
        .collect();
    let cls_labels = [1i64, 0];
    for mode in [Mode::Eval, Mode::Train] {
        let mut cpu_model = model.clone();
        let batch = Batch {
            patches: &x,
            patch: p,
            bag_sizes: &bags,
            seg_labels: Some(&seg_labels),
            cls_labels: Some(&cls_labels),
        };
        let train = TrainConfig::default();
        let out = run_step(&mut cpu_model, &batch, mode, &train).unwrap();
        let labels = Some((seg_labels.as_slice(), cls_labels.as_slice()));
        let pass = network_pass(&model, &x, p, &bags, mode, labels, &train);
        let f32s = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
        let es = rel_l2(&f32s(&pass.seg_logits), &out.outputs.seg_logits);
        let ec = rel_l2(&f32s(&pass.cls_logits), &out.outputs.cls_logits);
        let er = rel_l2(&f32s(&pass.buffers), &cpu_model.buffers);
        // The image-level head must be live (not every ReLU closed), or cls compares biases.
        let bias = model.param("classifier.bias");
        assert!(
            f32s(&pass.cls_logits).chunks(2).any(|l| l != bias),
            "cls logits are the bias alone"
        );
        let want = pass.losses.unwrap();
        let l = out.losses.unwrap();
        let el = [l.total, l.cls, l.seg_ce, l.seg_dice]
            .iter()
            .zip(want)
            .map(|(&a, b)| (a as f64 - b).abs() / b.abs().max(1e-3))
            .fold(0.0, f64::max);
        println!("CPU engine vs reference network, depth 3 P={p} {mode:?}: rel L2 seg {es:.3e}, cls {ec:.3e}, running stats {er:.3e}, losses {el:.3e} (threshold 1e-5)");
        assert!(es <= 1e-5 && ec <= 1e-5 && er <= 1e-5 && el <= 1e-5);
        if mode == Mode::Train {
            // Per tensor, relative to the tensor's largest reference gradient, floored at 1e-3
            // of the largest gradient overall: biases that feed a train-mode BatchNorm have an
            // exact gradient of 0, which both sides compute as rounding noise (f32 or f64).
            let (got, want) = (out.grads.unwrap(), pass.grads.unwrap());
            let floor = 1e-3 * want.iter().fold(0f64, |a, v| a.max(v.abs()));
            let mut worst = (0.0f64, String::new());
            for e in &model.table.params {
                let (g, w) = (&got[e.range()], &want[e.range()]);
                let scale = w.iter().fold(floor, |a, v| a.max(v.abs()));
                let err = g
                    .iter()
                    .zip(w)
                    .map(|(&a, b)| (a as f64 - b).abs() / scale)
                    .fold(0.0, f64::max);
                if err > worst.0 {
                    worst = (err, e.name.clone());
                }
            }
            println!(
                "  gradients of {} tensors: worst rel error {:.3e} ({}) (threshold 1e-3)",
                model.table.params.len(),
                worst.0,
                worst.1
            );
            assert!(worst.0 <= 1e-3);
        }
    }
}

#[test]
fn variant_depth3_cuda_vs_cpu_engine() {
    check_vs_cpu_engine(variant(), 20, &[2, 2], 46);
}

#[test]
fn cuda_vs_cpu_engine_tiny() {
    check_vs_cpu_engine(ModelConfig::tiny(), 32, &[2, 3], 31);
}

#[test]
fn cuda_vs_cpu_engine_mid() {
    check_vs_cpu_engine(mid(), 48, &[2, 2], 32);
}

#[test]
fn cli_forward_emu_matches_pytorch_fixtures() {
    // `m2unet forward --device emu` on the PyTorch fixtures (tools/torch_reference.py, float64)
    // with PyTorch's default initialisation. Eval outputs and train-mode BN buffers: ≤ 1e-2 and
    // ≤ 1e-3. Train-mode logits of a freshly initialised BN network amplify rounding ~1.15× per
    // layer, so their bound is max(1e-2, 4·s), s = how far the f32 CPU engine's train outputs
    // move when the input is perturbed by one fp16 rounding (relative noise 2^-11).
    use m2unet::config::TrainConfig;
    use m2unet::cpu::run_step;
    use m2unet::engine::{Batch, Mode};
    use m2unet::io::weights::{load_model, TensorFile};
    let dir = tempfile::tempdir().unwrap();
    let mut input = TensorFile::read(&fixture("tiny_input.safetensors")).unwrap();
    input
        .tensors
        .retain(|k, _| k == "patches" || k == "bag_sizes");
    let inp = dir.path().join("x.safetensors");
    input.write(&inp).unwrap();
    // The conditioning of the train-mode forward at this point.
    let (pshape, patches) = input.f32("patches").unwrap();
    let bags: Vec<usize> = input
        .i64("bag_sizes")
        .unwrap()
        .1
        .iter()
        .map(|&b| b as usize)
        .collect();
    let mut r = rng(41);
    let noisy: Vec<f32> = patches
        .iter()
        .map(|v| v * (1.0 + r.gen_range(-1.0f32..1.0) / 2048.0))
        .collect();
    let model = load_model(&fixture("tiny_weights.safetensors")).unwrap();
    let train = |x: &[f32]| {
        let b = Batch {
            patches: x,
            patch: pshape[2],
            bag_sizes: &bags,
            seg_labels: None,
            cls_labels: None,
        };
        run_step(&mut model.clone(), &b, Mode::Train, &TrainConfig::default())
            .unwrap()
            .outputs
    };
    let (clean, moved) = (train(patches), train(&noisy));
    let s = rel_l2(&clean.seg_logits, &moved.seg_logits)
        .max(rel_l2(&clean.cls_logits, &moved.cls_logits));
    let train_bound = (4.0 * s).max(1e-2);
    println!("train-mode sensitivity to one fp16 rounding of the input: {s:.3e} → logits bound {train_bound:.3e}");
    for (mode, outputs) in [
        ("eval", "tiny_eval.safetensors"),
        ("train", "tiny_train.safetensors"),
    ] {
        let out = dir.path().join(format!("y_{mode}.safetensors"));
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_m2unet"))
            .args(["forward", "--device", "emu", "--mode", mode, "--weights"])
            .arg(fixture("tiny_weights.safetensors"))
            .arg("--input")
            .arg(&inp)
            .arg("--output")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = TensorFile::read(&out).unwrap();
        let want = TensorFile::read(&fixture(outputs)).unwrap();
        assert!(got.tensors.contains_key("seg_logits") && got.tensors.contains_key("cls_logits"));
        let mut buffers = 0f64;
        for k in got.tensors.keys() {
            let Ok((_, g)) = got.f32(k) else { continue };
            let e = rel_l2(want.f32(k).unwrap().1, g);
            if k.ends_with("_logits") {
                let bound = if mode == "train" { train_bound } else { 1e-2 };
                println!("CLI forward --device emu --mode {mode}: {k} rel L2 vs PyTorch {e:.3e} (bound {bound:.1e})");
                assert!(e <= bound, "{k}");
            } else {
                buffers = buffers.max(e);
            }
        }
        if mode == "train" {
            println!(
                "  {} BN buffers: worst rel L2 {buffers:.3e} (bound 1e-3)",
                got.tensors.len() - 2
            );
            assert!(buffers <= 1e-3);
        }
    }
}

#[test]
fn eval_forward_graphs_replay_the_eager_forward_bit_for_bit() {
    // Forwards of changing inputs and shapes with graphs (the second forward of a shape is
    // captured, later ones replay it) against the same forwards run eagerly.
    let c = ModelConfig::tiny();
    let model = random_model(c, 51);
    let shapes: [(usize, &[usize]); 5] = [
        (32, &[2, 2]),
        (32, &[2, 2]),
        (32, &[2, 2]),
        (16, &[3, 2]),
        (32, &[2, 2]),
    ];
    let mut graphed = CudaEngine::new(&model, DeviceKind::Emu).unwrap();
    let mut eager = CudaEngine::new(&model, DeviceKind::Emu).unwrap();
    eager.set_graphs(false);
    let (mut differing, mut replays) = (0, 0);
    for (i, (p, bags)) in shapes.iter().enumerate() {
        let m: usize = bags.iter().sum();
        let x = uniform(&mut rng(60 + i as u64), m * p * p, 0.0, 1.0);
        let (a, events) = m2unet::cuda::nvtx::record(|| graphed.forward_eval(&x, bags).unwrap());
        let b = eager.forward_eval(&x, bags).unwrap();
        replays += events
            .iter()
            .filter(|e| matches!(e, m2unet::cuda::nvtx::Event::Push(n) if n == "replay"))
            .count();
        let bits = |o: &m2unet::engine::Outputs| -> Vec<u32> {
            o.seg_logits
                .iter()
                .chain(&o.cls_logits)
                .map(|v| v.to_bits())
                .collect()
        };
        differing += bits(&a)
            .iter()
            .zip(bits(&b))
            .filter(|(x, y)| **x != *y)
            .count();
    }
    println!("{replays} graph replays; {differing} output values differ from the eager forwards");
    // Shape A: eager, capture + replay, replay; B: eager; A again: eager (a new arena).
    assert_eq!((replays, differing), (2, 0));
}
