//! Times CPU-engine training steps (forward, backward, AdamW) on random data of given shapes and
//! prints patches/s as JSON; tools/bench_train.sh runs it beside PyTorch's CPU training step.

use clap::Parser;
use m2unet::config::{ModelConfig, TrainConfig};
use m2unet::cpu::Trainer;
use m2unet::engine::Batch;
use m2unet::model::{Arch, Model};
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Network preset (paper or tiny).
    #[arg(long, default_value = "paper")]
    preset: String,
    /// Patch side.
    #[arg(long, default_value_t = 112)]
    patch: usize,
    /// Patches per step.
    #[arg(long, default_value_t = 16)]
    patches: usize,
    /// Bags the patches are split into.
    #[arg(long, default_value_t = 2)]
    bags: usize,
    /// Timed steps (after one warm-up step).
    #[arg(long, default_value_t = 5)]
    iters: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.bags == 0 || a.patches < 2 * a.bags {
        anyhow::bail!(
            "{} patches cannot form {} bags of at least 2",
            a.patches,
            a.bags
        );
    }
    let cfg = ModelConfig::preset(&a.preset)?;
    let (m, p) = (a.patches, a.patch);
    cfg.check_patch(p)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let patches: Vec<f32> = (0..m * p * p).map(|_| rng.gen()).collect();
    let seg: Vec<i64> = (0..m * p * p).map(|_| rng.gen_range(0..6)).collect();
    let bag_sizes: Vec<usize> = (0..a.bags)
        .map(|i| m / a.bags + usize::from(i < m % a.bags))
        .collect();
    let cls: Vec<i64> = (0..a.bags).map(|i| (i % 2) as i64).collect();
    let batch = Batch {
        patches: &patches,
        patch: p,
        bag_sizes: &bag_sizes,
        seg_labels: Some(&seg),
        cls_labels: Some(&cls),
    };
    let mut trainer = Trainer::new(Model::init(cfg, 0), TrainConfig::default());
    trainer.step(&batch)?;
    let mut times = Vec::with_capacity(a.iters);
    for _ in 0..a.iters {
        let t = Instant::now();
        trainer.step(&batch)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let ms = times[times.len() / 2];
    let gflop = 3.0 * Arch::new(&cfg).forward_flops_per_patch(p) * m as f64 / 1e9;
    println!(
        "{{\"preset\": \"{}\", \"patch\": {p}, \"patches\": {m}, \"bags\": {:?}, \"threads\": {}, \"train_ms\": {ms:.2}, \"patches_per_s\": {:.3}, \"gflop_per_s\": {:.2}}}",
        a.preset,
        bag_sizes,
        rayon::current_num_threads(),
        m as f64 / (ms / 1e3),
        gflop / (ms / 1e3)
    );
    Ok(())
}
