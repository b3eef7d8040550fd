//! `m2unet demo`: its arguments, the engine they name, and the printed result.

use crate::backend::{make_engine, Backend};
use crate::demo::{run_demo, summary, DemoOptions};
use crate::weights_source::WeightsSource;
use anyhow::Result;
use std::path::PathBuf;

/// Makes one seeded phantom (80×80×48 voxels, the size the default weights were trained on;
/// shape, spacing and orientation drawn as `synth` does), assesses it and prints the result.
/// Writes `demo_case.nii.gz`, its mask and truth JSON, and the assess outputs
/// `demo_case_lobes.nii.gz`, `demo_case_report.json` and `demo_case_preview.png` into --out.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Output folder (created when missing).
    #[arg(long, default_value = "m2unet_demo")]
    pub out: PathBuf,
    /// Seed of the phantom.
    #[arg(long, default_value_t = 2026)]
    pub seed: u64,
    /// Make a severe case (lesions over ≥ 25 % of the lung) instead of a non-severe one.
    #[arg(long)]
    pub severe: bool,
    /// Weights or checkpoint; default: the file named by $M2UNET_WEIGHTS, else the default
    /// weights built into the binary (weights/MODEL_CARD.md).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Where the network runs: auto (the first GPU when the CUDA driver finds one, else the
    /// CPU; the choice is printed), cpu, cuda, or emu (the CUDA kernels on the CPU emulator).
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub device: Backend,
}

/// `m2unet demo`: loads the weights ([`WeightsSource::search`]) on `--device`, runs the demo
/// and prints its summary.
pub fn run(args: &DemoArgs) -> Result<()> {
    let weights = WeightsSource::search(args.weights.as_deref());
    let mut engine = make_engine(weights.load()?, args.device)?;
    eprintln!("weights: {weights}");
    let opts = DemoOptions {
        out: args.out.clone(),
        seed: args.seed,
        severe: args.severe,
        weights: weights.to_string(),
    };
    let result = run_demo(engine.as_mut(), &opts)?;
    println!("{}", summary(&result));
    Ok(())
}
