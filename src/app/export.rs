//! `m2unet export`: a checkpoint's (or weights file's) model as a plain weights file.

use crate::io::weights::{load_model, model_tensors, WeightDtype};
use anyhow::Result;
use std::path::PathBuf;

/// Writes the model of a checkpoint (or weights file) as a plain weights file: the state_dict
/// only, without optimiser state, in f32 or f16.
#[derive(clap::Args, Debug, Clone)]
pub struct ExportArgs {
    /// Checkpoint or weights file.
    #[arg(long)]
    pub weights: PathBuf,
    /// Output weights file (safetensors, PyTorch names).
    #[arg(long)]
    pub out: PathBuf,
    /// Store tensors as f16.
    #[arg(long)]
    pub half: bool,
    /// A note stored in the file's metadata (key "note").
    #[arg(long)]
    pub note: Option<String>,
}

/// `m2unet export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    let model = load_model(&args.weights)?;
    let dtype = if args.half {
        WeightDtype::F16
    } else {
        WeightDtype::F32
    };
    let mut file = model_tensors(&model, dtype);
    if let Some(note) = &args.note {
        file.metadata.insert("note".into(), note.clone());
    }
    file.write(&args.out)?;
    println!(
        "wrote {} ({} parameters, patch {}, {})",
        args.out.display(),
        model.table.n_params,
        model.config().patch,
        if args.half { "f16" } else { "f32" }
    );
    Ok(())
}
