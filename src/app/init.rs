//! `m2unet init`: freshly initialised weights (PyTorch's default initialisation, seeded).

use crate::config::ModelConfig;
use crate::io::weights::{save_model, WeightDtype};
use crate::model::Model;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct InitArgs {
    /// Where to write the weights (safetensors, PyTorch state_dict names).
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Network size: the paper's (4,015,304 parameters) or the tiny test preset.
    #[arg(long, value_parser = ["paper", "tiny"], default_value = "paper")]
    pub preset: String,
    /// Store tensors as f16 instead of f32.
    #[arg(long)]
    pub half: bool,
}

/// `m2unet init`.
pub fn run(a: &InitArgs) -> Result<()> {
    let model = Model::init(ModelConfig::preset(&a.preset)?, a.seed);
    let dtype = if a.half {
        WeightDtype::F16
    } else {
        WeightDtype::F32
    };
    save_model(&model, &a.out, dtype)?;
    println!(
        "wrote {} ({} preset, seed {}, {} parameters)",
        a.out.display(),
        a.preset,
        a.seed,
        model.table.n_params
    );
    Ok(())
}
