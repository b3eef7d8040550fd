//! `m2unet info`: the model configuration, per-block parameter counts and the devices.

use crate::config::ModelConfig;
use crate::io::weights::load_model;
use crate::model::ParamTable;
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct InfoArgs {
    /// Print the parameter count of every block (as in the paper's Table 1).
    #[arg(long)]
    pub params: bool,
    /// Describe this preset ...
    #[arg(long, value_parser = ["paper", "tiny"], default_value = "paper", conflicts_with = "weights")]
    pub preset: String,
    /// ... or the model stored in this weights file.
    #[arg(long)]
    pub weights: Option<PathBuf>,
}

/// `m2unet info`.
pub fn run(a: &InfoArgs) -> Result<()> {
    let cfg = match &a.weights {
        Some(w) => *load_model(w)?.config(),
        None => ModelConfig::preset(&a.preset)?,
    };
    let table = ParamTable::new(cfg);
    println!("m2unet {}", env!("CARGO_PKG_VERSION"));
    println!(
        "model: patch {p}×{p}, in_channels {}, enc_width {}, bottleneck_width {}, emb_concepts {}, img_concepts {}, seg_classes {}, cls_classes {}, gcp {}",
        cfg.in_channels,
        cfg.enc_width,
        cfg.bottleneck_width,
        cfg.emb_concepts,
        cfg.img_concepts,
        cfg.seg_classes,
        cfg.cls_classes,
        cfg.gcp,
        p = cfg.patch
    );
    println!("learnable parameters: {}", group_thousands(table.n_params));
    if a.params {
        println!("{:<12} {:>12} {:>9}", "block", "params", "K (×1024)");
        for (block, n) in table.block_counts() {
            println!(
                "{block:<12} {:>12} {:>9.1}",
                group_thousands(n),
                n as f64 / 1024.0
            );
        }
    }
    println!("cpu engine: {} threads", rayon::current_num_threads());
    print!("{}", crate::cuda::describe_devices());
    Ok(())
}

/// `n` with commas between groups of three digits.
fn group_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}
