//! Evaluation of a model on manifest cases: 3D lobe Dice and severity metrics.
//!
//! Every volume goes through the full assess pipeline; the written lobe maps are compared with
//! the masks, the severity probabilities with the labels.

use crate::assess::{assess_volume, AssessOptions};
use crate::data::dataset::ManifestEntry;
use crate::data::NUM_LOBES;
use crate::engine::InferenceEngine;
use crate::io::read_volume;
use crate::metrics::{
    by_height, fissure_offsets, lobe_confusion, lobe_dice, ByHeight, EvalMetrics, FissureOffset,
    LobeConfusion, FISSURES,
};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

/// One case's evaluation.
#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub case_id: String,
    pub label: u8,
    pub probability: f64,
    pub lobe_dice: [f64; NUM_LOBES],
    /// Per-lobe overlaps by height band of the true lung (band 0 at the base).
    pub by_height: ByHeight,
    /// Voxels of each true label (row: background, LUL … RLL) by predicted label (column).
    pub confusion: LobeConfusion,
    /// Predicted against true boundary height of each fissure ([`FISSURES`]).
    pub fissures: [FissureOffset; FISSURES.len()],
}

/// A written lobe map compared with its mask: per-lobe Dice, overlaps by height, confusion,
/// fissure placement.
pub struct Comparison {
    pub lobe_dice: [f64; NUM_LOBES],
    pub by_height: ByHeight,
    pub confusion: LobeConfusion,
    pub fissures: [FissureOffset; FISSURES.len()],
}

/// A case that could not be evaluated, and why.
#[derive(Clone, Debug, Serialize)]
pub struct CaseFailure {
    pub case_id: String,
    pub image: String,
    pub error: String,
}

/// Assesses every case on `engine` (writing the assess outputs into `work_dir`) and compares
/// the lobe maps with the masks in 3D and the severity probabilities with the labels; fails
/// on the first case that cannot be evaluated.
pub fn evaluate(
    engine: &mut dyn InferenceEngine,
    entries: &[ManifestEntry],
    work_dir: &Path,
    order_lobes: bool,
) -> Result<(EvalMetrics, Vec<CaseResult>)> {
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("cannot create {}", work_dir.display()))?;
    let mut cases = Vec::with_capacity(entries.len());
    for e in entries {
        cases.push(evaluate_case(engine, e, work_dir, order_lobes)?);
    }
    Ok((case_metrics(&cases), cases))
}

/// As [`evaluate`], but a case that cannot be evaluated (an unreadable volume, a lobe map
/// off its mask's grid) is recorded with its error and the others still run.
pub fn evaluate_each(
    engine: &mut dyn InferenceEngine,
    entries: &[ManifestEntry],
    work_dir: &Path,
    order_lobes: bool,
) -> Result<(Vec<CaseResult>, Vec<CaseFailure>)> {
    std::fs::create_dir_all(work_dir)
        .with_context(|| format!("cannot create {}", work_dir.display()))?;
    let (mut cases, mut failed) = (Vec::new(), Vec::new());
    for e in entries {
        match evaluate_case(engine, e, work_dir, order_lobes) {
            Ok(c) => cases.push(c),
            Err(err) => failed.push(CaseFailure {
                case_id: e.case_id.clone(),
                image: e.image.display().to_string(),
                error: format!("{err:#}"),
            }),
        }
    }
    Ok((cases, failed))
}

/// Severity and lobe metrics over evaluated cases.
pub fn case_metrics(cases: &[CaseResult]) -> EvalMetrics {
    let dice: Vec<_> = cases.iter().map(|c| c.lobe_dice).collect();
    let prob: Vec<f64> = cases.iter().map(|c| c.probability).collect();
    let severe: Vec<bool> = cases.iter().map(|c| c.label == 1).collect();
    EvalMetrics::from_cases(&dice, &prob, &severe)
}

/// One case through the assess pipeline, compared with its mask and label.
fn evaluate_case(
    engine: &mut dyn InferenceEngine,
    e: &ManifestEntry,
    work_dir: &Path,
    order_lobes: bool,
) -> Result<CaseResult> {
    let opts = AssessOptions {
        out_dir: Some(work_dir.to_path_buf()),
        order_lobes,
        ..AssessOptions::default()
    };
    let report = assess_volume(engine, &e.image, &opts)?;
    let c = compare_written_lobes(Path::new(&report.outputs.lobes), &e.mask)?;
    Ok(CaseResult {
        case_id: e.case_id.clone(),
        label: e.label,
        probability: report.severity.probability,
        lobe_dice: c.lobe_dice,
        by_height: c.by_height,
        confusion: c.confusion,
        fissures: c.fissures,
    })
}

/// Per-lobe 3D Dice of a written lobe map against a mask file on the same grid, the overlaps by
/// height of the lung, the lobe confusion and the fissure placement.
pub fn compare_written_lobes(lobes: &Path, mask: &Path) -> Result<Comparison> {
    let pred = read_volume(lobes)?;
    let truth = read_volume(mask)?;
    if pred.data.len() != truth.data.len() {
        bail!(
            "{}: the mask has {} voxels, the image {}",
            mask.display(),
            truth.data.len(),
            pred.data.len()
        );
    }
    let to_u8 = |v: &[f32]| -> Vec<u8> { v.iter().map(|&x| x.round() as u8).collect() };
    let (dims, spacing) = (truth.canonical_dims(), truth.canonical_spacing());
    let (pred, truth) = (
        to_u8(&pred.canonical_data()),
        to_u8(&truth.canonical_data()),
    );
    Ok(Comparison {
        lobe_dice: lobe_dice(&pred, &truth),
        by_height: by_height(&pred, &truth, dims),
        confusion: lobe_confusion(&pred, &truth),
        fissures: fissure_offsets(&pred, &truth, dims, spacing[2]),
    })
}
