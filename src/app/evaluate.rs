//! `m2unet evaluate`: its arguments, the printed per-case table and summary, evaluation.json.

use crate::backend::{make_engine, Backend};
use crate::data::dataset::read_checked_manifest;
use crate::data::{LOBE_NAMES, NUM_LOBES};
use crate::evaluate::{case_metrics, evaluate_each, CaseFailure, CaseResult};
use crate::io::atomic::write_atomic;
use crate::io::weights::load_model;
use crate::metrics::{
    pooled, ByHeight, EvalMetrics, FissureOffset, LobeConfusion, FISSURES, HEIGHT_BANDS,
};
use anyhow::{bail, Result};
use serde::Serialize;
use std::path::PathBuf;

/// Evaluates weights on the cases of a manifest: assesses every volume, then reports per-lobe
/// 3D Dice against the masks and accuracy, sensitivity, specificity, F1 and ROC AUC of the
/// severity against the labels. Writes the assess outputs and `evaluation.json` into --out.
#[derive(clap::Args, Debug, Clone)]
pub struct EvaluateArgs {
    /// Weights or checkpoint (safetensors).
    #[arg(long)]
    pub weights: PathBuf,
    /// Manifest CSV (image, mask, label[, case_id]).
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Score the network's lobes without the lobe-order step (see `assess --no-lobe-order`).
    #[arg(long)]
    pub no_lobe_order: bool,
    /// Where the network runs: cpu (f32, the default, so that figures reproduce on any
    /// machine), cuda (fp16 on the first GPU: far faster on clinical volumes), emu or auto.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub device: Backend,
}

/// `evaluation.json`.
#[derive(Serialize)]
struct Evaluation<'a> {
    weights: String,
    data: String,
    /// The engine the network ran on (`InferenceEngine::describe`).
    engine: String,
    cases: &'a [CaseResult],
    /// Cases that could not be evaluated, with the error (the metrics leave them out).
    failed: &'a [CaseFailure],
    lobe_dice: [f64; NUM_LOBES],
    mean_dice: f64,
    accuracy: f64,
    sensitivity: f64,
    specificity: f64,
    f1: f64,
    auc: Option<f64>,
    /// Per-lobe Dice in each height band of the lung (band 0 at the base), pooled over the
    /// cases; null where a lobe is neither true nor predicted.
    dice_by_height: Vec<[Option<f64>; NUM_LOBES]>,
    /// Voxels of each true label (row: background, LUL … RLL) by predicted label (column),
    /// summed over the cases.
    confusion: LobeConfusion,
    /// Fissure placement ([`FISSURES`]: LLL/LUL, RLL/RML, RML/RUL, RLL/RUL) summed over the
    /// cases.
    fissures: [FissureOffset; FISSURES.len()],
}

/// `m2unet evaluate`: assesses every case, prints the table and summary, writes
/// evaluation.json into --out. A case that cannot be evaluated is reported with its error and
/// left out of the metrics; the others still run, and the command then fails naming it.
pub fn run(args: &EvaluateArgs) -> Result<EvalMetrics> {
    let model = load_model(&args.weights)?;
    let entries = read_checked_manifest(&args.data)?;
    let mut engine = make_engine(model, args.device.resolve())?;
    let (cases, failed) = evaluate_each(engine.as_mut(), &entries, &args.out, !args.no_lobe_order)?;
    let m = case_metrics(&cases);
    print_cases(&cases);
    let heights = pooled(&cases.iter().map(|c| c.by_height).collect::<Vec<_>>());
    print_by_height(&heights);
    let confusion = cases.iter().fold(LobeConfusion::default(), |mut sum, c| {
        for (s, v) in sum.iter_mut().flatten().zip(c.confusion.iter().flatten()) {
            *s += v;
        }
        sum
    });
    print_confusion(&confusion);
    let mut fissures = [FissureOffset::default(); FISSURES.len()];
    for c in &cases {
        for (sum, f) in fissures.iter_mut().zip(&c.fissures) {
            sum.add(f);
        }
    }
    print_fissures(&fissures);
    print_summary(&m);
    let json = Evaluation {
        weights: args.weights.display().to_string(),
        data: args.data.display().to_string(),
        engine: engine.describe(),
        cases: &cases,
        failed: &failed,
        lobe_dice: m.lobe_dice,
        mean_dice: m.mean_dice,
        accuracy: m.accuracy,
        sensitivity: m.sensitivity,
        specificity: m.specificity,
        f1: m.f1,
        auc: (!m.auc.is_nan()).then_some(m.auc),
        dice_by_height: heights.iter().map(|b| b.map(|o| o.dice())).collect(),
        confusion,
        fissures,
    };
    let path = args.out.join("evaluation.json");
    write_atomic(&path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    if !failed.is_empty() {
        let mut msg = format!(
            "{} of {} cases could not be evaluated (the metrics above and {} cover the other {}):",
            failed.len(),
            entries.len(),
            path.display(),
            cases.len()
        );
        for f in &failed {
            msg += &format!("\n  {} ({}): {}", f.case_id, f.image, f.error);
        }
        bail!(msg);
    }
    Ok(m)
}

/// One line per case: label, severity probability and the Dice of every lobe.
fn print_cases(cases: &[CaseResult]) {
    println!(
        "{:<12} {:>5} {:>8} {}",
        "case",
        "label",
        "p(sev)",
        LOBE_NAMES.map(|n| format!("{n:>7}")).join("")
    );
    for c in cases {
        println!(
            "{:<12} {:>5} {:>8.3} {}",
            c.case_id,
            c.label,
            c.probability,
            c.lobe_dice.map(|d| format!("{d:>7.4}")).join("")
        );
    }
}

/// Per-lobe Dice by height band of the lung, pooled over the cases ("-": no such lobe there).
fn print_by_height(heights: &ByHeight) {
    println!(
        "Dice by height of the lung, pooled over the cases ({HEIGHT_BANDS} bands, base to apex):"
    );
    println!(
        "{:<12} {}",
        "band",
        LOBE_NAMES.map(|n| format!("{n:>7}")).join("")
    );
    for (b, band) in heights.iter().enumerate() {
        let cells = band.map(|o| {
            o.dice()
                .map_or(format!("{:>7}", "-"), |d| format!("{d:>7.4}"))
        });
        println!(
            "{:<12} {}",
            format!("{}/{HEIGHT_BANDS}", b + 1),
            cells.join("")
        );
    }
}

/// Where each true lobe's voxels went, pooled over the cases: the share predicted as each lobe
/// or as neither ("other": background or outside the lungs).
fn print_confusion(confusion: &LobeConfusion) {
    println!("Where each lobe's voxels went, pooled over the cases (% of the true lobe):");
    println!(
        "{:<12} {:>7}{}",
        "true \\ pred",
        "other",
        LOBE_NAMES.map(|n| format!("{n:>7}")).join("")
    );
    for (name, row) in LOBE_NAMES.iter().zip(&confusion[1..]) {
        let total = row.iter().sum::<u64>().max(1) as f64;
        let cells: Vec<String> = row
            .iter()
            .map(|&v| format!("{:>7.2}", 100.0 * v as f64 / total))
            .collect();
        println!("{name:<12} {}", cells.join(""));
    }
}

/// Where each predicted fissure lies against the true one, pooled over the cases.
fn print_fissures(fissures: &[FissureOffset; FISSURES.len()]) {
    println!(
        "Fissure placement, pooled over the cases (predicted − true boundary height along each \
         craniocaudal column crossing it in both maps; + = too high):"
    );
    println!(
        "{:<12} {:>12} {:>12} {:>10}",
        "fissure", "mean mm", "mean |mm|", "columns"
    );
    for ((below, above), f) in FISSURES.iter().zip(fissures) {
        let name = format!(
            "{}/{}",
            LOBE_NAMES[*below as usize - 1],
            LOBE_NAMES[*above as usize - 1]
        );
        match f.means() {
            Some((signed, dist)) => {
                println!("{name:<12} {signed:>12.2} {dist:>12.2} {:>10}", f.columns)
            }
            None => println!("{name:<12} {:>12} {:>12} {:>10}", "-", "-", 0),
        }
    }
}

fn print_summary(m: &EvalMetrics) {
    println!(
        "mean lobe Dice {:.4} ({}), accuracy {:.4}, sensitivity {:.4}, specificity {:.4}, F1 {:.4}, ROC AUC {:.4}",
        m.mean_dice,
        LOBE_NAMES
            .iter()
            .zip(m.lobe_dice)
            .map(|(n, d)| format!("{n} {d:.4}"))
            .collect::<Vec<_>>()
            .join(", "),
        m.accuracy,
        m.sensitivity,
        m.specificity,
        m.f1,
        m.auc
    );
}
