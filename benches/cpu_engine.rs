//! Criterion bench of the CPU engine: eval forward and one training step (forward, backward,
//! AdamW) of the paper preset, P=256 with a bag of 8 patches and a smaller case (2 patches).
//! tools/bench_cpu.sh runs it beside PyTorch's CPU baseline and prints the ratios.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use m2unet::config::{ModelConfig, TrainConfig};
use m2unet::cpu::{run_step, Trainer};
use m2unet::engine::{Batch, Mode};
use m2unet::model::{Arch, Model};
use rand::{Rng, SeedableRng};
use std::time::Duration;

fn engine(c: &mut Criterion) {
    let cfg = ModelConfig::paper();
    let p = cfg.patch;
    for m in [2usize, 8] {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let patches: Vec<f32> = (0..m * p * p).map(|_| rng.gen()).collect();
        let seg: Vec<i64> = (0..m * p * p).map(|_| rng.gen_range(0..6)).collect();
        // M=2: one bag of 2; M=8: two bags of 4 (tools/bench_cpu.sh passes the same to PyTorch).
        let (bags, cls): (&[usize], &[i64]) = if m < 4 {
            (&[2], &[1])
        } else {
            (&[4, 4], &[0, 1])
        };
        let batch = Batch {
            patches: &patches,
            patch: p,
            bag_sizes: bags,
            seg_labels: Some(&seg),
            cls_labels: Some(cls),
        };
        let eval_batch = Batch {
            seg_labels: None,
            cls_labels: None,
            ..batch
        };
        let flops = Arch::new(&cfg).forward_flops_per_patch(p) * m as f64;
        let mut group = c.benchmark_group(format!("cpu_paper_p{p}_m{m}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(1))
            .measurement_time(Duration::from_secs(1));
        let mut model = Model::init(cfg, 0);
        group.throughput(Throughput::Elements(flops as u64));
        group.bench_function("eval_forward", |b| {
            b.iter(|| {
                run_step(&mut model, &eval_batch, Mode::Eval, &TrainConfig::default()).unwrap()
            })
        });
        let mut trainer = Trainer::new(Model::init(cfg, 0), TrainConfig::default());
        group.throughput(Throughput::Elements(3 * flops as u64));
        group.bench_function("train_step", |b| b.iter(|| trainer.step(&batch).unwrap()));
        group.finish();
    }
}

criterion_group!(benches, engine);
criterion_main!(benches);
