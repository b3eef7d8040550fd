//! `m2unet demo`: makes one synthetic chest phantom, assesses it (default weights unless told
//! otherwise), writes the lobe map, report and preview, and prints the severity and a per-lobe
//! table against the phantom's ground truth.

use crate::assess::{assess_volume, default_weights, AssessOptions, Report};
use crate::data::phantom::{case_spec, generate, CaseTruth, StoredDtype, SynthArgs};
use crate::data::{LOBE_NAMES, NUM_LOBES};
use crate::engine::InferenceEngine;
use crate::io::read_volume;
use crate::metrics::lobe_dice;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

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
    /// Weights or checkpoint; default: the shipped weights (weights/MODEL_CARD.md).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Where the network runs.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// What the demo produced.
#[derive(Clone, Debug)]
pub struct DemoResult {
    pub truth: CaseTruth,
    pub report: Report,
    /// 3D Dice of each lobe against the phantom's mask.
    pub dice: [f64; NUM_LOBES],
}

/// `m2unet demo`: builds the engine with `make_engine(weights, device)`.
pub fn run_demo(
    args: &DemoArgs,
    make_engine: impl FnOnce(&Path, &str) -> Result<Box<dyn InferenceEngine>>,
) -> Result<DemoResult> {
    let weights = match &args.weights {
        Some(w) => w.clone(),
        None => default_weights()?,
    };
    let mut engine = make_engine(&weights, &args.device)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output folder {}", args.out.display()))?;
    let synth = SynthArgs {
        out: args.out.clone(),
        count: 1,
        seed: args.seed,
        shape: Some([80, 80, 48]),
        spacing: None,
        orientation: None,
        dtype: Some(StoredDtype::Int16),
        noise: None,
        uncompressed: false,
    };
    let spec = case_spec(&synth, 0, args.severe)?;
    let truth = generate(&spec, args.seed).write(&args.out, "demo_case", args.seed, true)?;
    let image = args.out.join(&truth.image);
    let opts = AssessOptions {
        out_dir: Some(args.out.clone()),
        preview: true,
        ..AssessOptions::default()
    };
    let report = assess_volume(engine.as_mut(), &image, &opts)?;
    let pred = read_volume(Path::new(&report.outputs.lobes))?;
    let mask = read_volume(&args.out.join(&truth.mask))?;
    let to_u8 = |v: &[f32]| -> Vec<u8> { v.iter().map(|&x| x.round() as u8).collect() };
    let dice = lobe_dice(&to_u8(&pred.data), &to_u8(&mask.data));
    Ok(DemoResult {
        truth,
        report,
        dice,
    })
}

/// The printed summary of a demo.
pub fn summary(r: &DemoResult, weights: &str) -> String {
    let s = &r.report.severity;
    let mut out = format!(
        "phantom {} ({}×{}×{} voxels, {}): truth {} (involvement {:.1} %, {})\n",
        r.report.input,
        r.report.volume.shape[0],
        r.report.volume.shape[1],
        r.report.volume.shape[2],
        r.report.volume.orientation,
        if r.truth.severe {
            "severe"
        } else {
            "non-severe"
        },
        100.0 * r.truth.total_involvement,
        r.truth.ct_grade_name
    );
    out += &format!(
        "weights {weights}\nseverity: {} (p(severe) = {:.3})\n\n",
        s.class, s.probability
    );
    out += &format!(
        "{:<5} {:>10} {:>10} {:>14} {:>14} {:>8}\n",
        "lobe", "pred mL", "truth mL", "HU-involv. %", "truth involv.%", "Dice"
    );
    for (l, name) in LOBE_NAMES.iter().enumerate() {
        let p = &r.report.lobes[l];
        let t = &r.truth.lobes[l];
        out += &format!(
            "{:<5} {:>10.1} {:>10.1} {:>14.1} {:>14.1} {:>8.4}\n",
            name,
            p.volume_ml,
            t.volume_ml,
            100.0 * p.involvement.unwrap_or(0.0),
            100.0 * t.involvement,
            r.dice[l]
        );
    }
    out += &format!(
        "mean lobe Dice {:.4}\n\nwrote {}, {} and {}\nsynthetic data only: not for clinical use",
        r.dice.iter().sum::<f64>() / NUM_LOBES as f64,
        r.report.outputs.lobes,
        r.report.outputs.report,
        r.report.outputs.preview.as_deref().unwrap_or("-")
    );
    out
}
