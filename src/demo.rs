//! The demo: one synthetic chest phantom assessed and compared with its ground truth.

use crate::assess::{assess_volume, AssessOptions, Report};
use crate::data::phantom::{case_spec, generate, CaseTruth, StoredDtype, SynthOptions};
use crate::data::{LOBE_NAMES, NUM_LOBES};
use crate::engine::InferenceEngine;
use crate::evaluate::compare_written_lobes;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// What the demo makes and where.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Output folder (created when missing).
    pub out: PathBuf,
    /// Seed of the phantom.
    pub seed: u64,
    /// A severe case (lesions over ≥ 25 % of the lung) instead of a non-severe one.
    pub severe: bool,
    /// How the report names the engine's weights.
    pub weights: String,
}

/// What the demo produced.
#[derive(Clone, Debug)]
pub struct DemoResult {
    pub truth: CaseTruth,
    pub report: Report,
    /// 3D Dice of each lobe against the phantom's mask.
    pub dice: [f64; NUM_LOBES],
}

/// Makes one seeded phantom (80×80×48 voxels, the size the default weights were trained on;
/// spacing and orientation drawn as `synth` does) and assesses it on `engine`. Writes
/// `demo_case.nii.gz`, its mask and truth JSON, and the assess outputs
/// `demo_case_lobes.nii.gz`, `demo_case_report.json` and `demo_case_preview.png`.
pub fn run_demo(engine: &mut dyn InferenceEngine, opts: &DemoOptions) -> Result<DemoResult> {
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create the output folder {}", opts.out.display()))?;
    let truth = write_phantom(&opts.out, opts.seed, opts.severe)?;
    let assess = AssessOptions {
        out_dir: Some(opts.out.clone()),
        preview: true,
        weights: Some(opts.weights.clone()),
        ..AssessOptions::default()
    };
    let report = assess_volume(engine, &opts.out.join(&truth.image), &assess)?;
    let dice = compare_written_lobes(
        Path::new(&report.outputs.lobes),
        &opts.out.join(&truth.mask),
    )?
    .lobe_dice;
    Ok(DemoResult {
        truth,
        report,
        dice,
    })
}

/// Writes the phantom `demo_case` into `out`.
fn write_phantom(out: &Path, seed: u64, severe: bool) -> Result<CaseTruth> {
    let draw = SynthOptions {
        seed,
        shape: Some([80, 80, 48]),
        dtype: Some(StoredDtype::Int16),
        ..SynthOptions::default()
    };
    let spec = case_spec(&draw, 0, severe)?;
    generate(&spec, seed).write(out, "demo_case", seed, true)
}

/// The printed summary of a demo.
pub fn summary(r: &DemoResult) -> String {
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
        "weights {}\nseverity: {} (p(severe) = {:.3})\n\n",
        r.report.weights.as_deref().unwrap_or("-"),
        s.class,
        s.probability
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
