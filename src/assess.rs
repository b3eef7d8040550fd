//! Assessment of CT volumes: lobe label map, severity, JSON report and optional preview.
//!
//! One file or a batch, through any [`InferenceEngine`]; the lobe map is written on the
//! input's grid.

use crate::config::ModelConfig;
use crate::ct_input::{CtInput, LoadedCt};
use crate::data::dataset::stem;
use crate::data::lobe_order::order_lobes_along_z;
use crate::data::lung_mask::{lung_mask, LungMask};
use crate::data::preprocess::{
    keep_largest_components, paste_patches, patch_of_slice, volume_patches, CanonicalCt,
    PreprocessConfig, VolumePatches,
};
use crate::data::{LOBE_NAMES, NUM_LOBES};
use crate::engine::{InferenceEngine, LobeScores};
use crate::io::atomic::StagedFiles;
use crate::io::dicom::SeriesInfo;
use crate::io::nifti::{label_map_header, write_nifti_to, AffineSource, Volume, VoxelData};
use crate::quality::{self, Measurements, Quality};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Label values written in the lobe map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LabelScheme {
    /// 1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL (lungmask).
    Lungmask,
    /// The same lobes at 10–14 (TotalSegmentator v2).
    Totalseg,
}

impl LabelScheme {
    pub fn map(self, label: u8) -> u8 {
        match (self, label) {
            (_, 0) | (LabelScheme::Lungmask, _) => label,
            (LabelScheme::Totalseg, l) => l + 9,
        }
    }
}

/// Settings of one assessment.
#[derive(Clone, Debug, PartialEq)]
pub struct AssessOptions {
    /// Output folder; `None` writes beside each input.
    pub out_dir: Option<PathBuf>,
    /// Patches per `segment` call.
    pub batch_size: usize,
    /// Largest classification bag; more lung slices are evenly subsampled.
    pub max_bag: usize,
    pub preview: bool,
    /// Continue (with a warning in the report) when the values do not look like HU; the
    /// command line also accepts a failed quality gate with it.
    pub force: bool,
    pub label_scheme: LabelScheme,
    /// How the report names the engine's weights (a path, or the embedded default).
    pub weights: Option<String>,
    /// Put each craniocaudal column of each lung in its most probable anatomical lobe order
    /// ([`order_lobes_along_z`], on the network's lobe probabilities) before the largest
    /// components are kept.
    pub order_lobes: bool,
}

impl Default for AssessOptions {
    fn default() -> Self {
        AssessOptions {
            out_dir: None,
            batch_size: 8,
            max_bag: 32,
            preview: false,
            force: false,
            label_scheme: LabelScheme::Lungmask,
            weights: None,
            order_lobes: true,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct OutputFiles {
    pub lobes: String,
    pub report: String,
    pub preview: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Severity {
    /// Softmax probability of the severe class.
    pub probability: f64,
    /// "severe" or "non-severe".
    pub class: String,
    pub logits: [f32; 2],
    /// False when the quality gate failed: the class and probability are no answer then.
    pub reliable: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct LobeReport {
    /// The label value in the written map (depends on the label scheme).
    pub label: u8,
    pub name: String,
    pub voxels: usize,
    pub volume_ml: f64,
    /// Mean HU over the lobe; null for an empty lobe.
    pub mean_hu: Option<f64>,
    /// Fraction of lobe voxels in [−750, 100] HU; null for an empty lobe.
    pub involvement: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PatchCounts {
    /// Body slices segmented.
    pub segmented: usize,
    /// Slices in the classification bag.
    pub bag: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct VolumeInfo {
    /// Native array size.
    pub shape: [usize; 3],
    /// Spacing in mm along the canonical (RAS) axes.
    pub spacing_mm: [f64; 3],
    /// Axis codes of the native array.
    pub orientation: String,
    pub dtype: String,
    pub affine_source: AffineSource,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    pub read: f64,
    pub preprocess: f64,
    pub lung_mask: f64,
    pub segment: f64,
    pub postprocess: f64,
    pub classify: f64,
    pub write: f64,
    pub total: f64,
}

/// The JSON report of one volume.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub input: String,
    pub outputs: OutputFiles,
    pub severity: Severity,
    pub lobes: Vec<LobeReport>,
    /// Volume of the five lobes.
    pub lung_volume_ml: f64,
    /// Volume of the lung mask measured from the HU (air-density lung, filled), the envelope
    /// the lobes are kept in.
    pub lung_mask_volume_ml: f64,
    /// The lung mask's right and left lung.
    pub lung_mask_sides_ml: [f64; 2],
    /// HU-based involvement over all lobes.
    pub total_involvement: Option<f64>,
    pub patches: PatchCounts,
    pub volume: VolumeInfo,
    pub timings_ms: Timings,
    pub device: String,
    /// The weights file, or "embedded default …"; null when the caller did not say.
    pub weights: Option<String>,
    pub model: ModelConfig,
    pub label_scheme: LabelScheme,
    pub version: String,
    pub warnings: Vec<String>,
    /// The quality gate: every check with its measured value, accepted range and result.
    pub quality: Quality,
    /// The DICOM series' identifying tags (no patient tags); absent for NIfTI inputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dicom: Option<SeriesInfo>,
}

/// HU window counted as involved by the report's estimate.
const INVOLVED_HU: (f32, f32) = (-750.0, 100.0);

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Output paths of an input: `<name>_lobes.nii.gz`, `<name>_report.json`, `<name>_preview.png`.
pub fn output_paths(input: &Path, opts: &AssessOptions) -> [PathBuf; 3] {
    let dir = match &opts.out_dir {
        Some(d) => d.clone(),
        None => input.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let name = stem(input);
    [
        dir.join(format!("{name}_lobes.nii.gz")),
        dir.join(format!("{name}_report.json")),
        dir.join(format!("{name}_preview.png")),
    ]
}

/// Evenly spaced picks of `k` out of `n` (all of them when `n ≤ k`).
fn evenly(n: usize, k: usize) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    (0..k)
        .map(|i| ((i as f64 + 0.5) * n as f64 / k as f64) as usize)
        .collect()
}

/// Assesses one volume and writes its outputs (all or none).
pub fn assess_volume(
    engine: &mut dyn InferenceEngine,
    path: &Path,
    opts: &AssessOptions,
) -> Result<Report> {
    let input = CtInput::Nifti(path.to_path_buf());
    assess_input_with_progress(engine, &input, opts, &ProgressBar::hidden())
}

/// Assesses one NIfTI volume or DICOM series, reporting its stages on `bar`; the outputs are
/// named after [`CtInput::path`].
pub fn assess_input_with_progress(
    engine: &mut dyn InferenceEngine,
    input: &CtInput,
    opts: &AssessOptions,
    bar: &ProgressBar,
) -> Result<Report> {
    if opts.batch_size == 0 || opts.max_bag < 2 {
        bail!("the batch size must be at least 1 and the largest bag at least 2");
    }
    let path = &input.path();
    let start = Instant::now();
    let mut t = Timings::default();
    let loaded = stage(bar, "reading", &mut t.read, || {
        read_hu_volume(input, opts.force)
    })?;
    let (volume, dicom, warnings) = (loaded.volume, loaded.dicom, loaded.warnings);
    // The patch side the weights were trained at decides the preprocessing.
    let patch = engine.config().patch;
    let (ct, body) = stage(bar, "preprocessing", &mut t.preprocess, || {
        body_patches(&volume, patch, path)
    })?;
    let lung = stage(bar, "lung mask", &mut t.lung_mask, || Ok(lung_mask(&ct)))?;
    // Engine errors name the volume, the engine and the weights.
    let engine_failed = |what: &str, engine: &dyn InferenceEngine| {
        format!(
            "{}: {what} failed on {} with the weights {}",
            path.display(),
            engine.describe(),
            opts.weights.as_deref().unwrap_or("given to the engine")
        )
    };
    let seg = stage(bar, "segmenting", &mut t.segment, || {
        segment(engine, &body, patch, opts.batch_size, opts.order_lobes, bar)
    })
    .with_context(|| engine_failed("segmentation", engine))?;
    let lobes = stage(bar, "post-processing", &mut t.postprocess, || {
        Ok(LobeMap::new(&seg, &body, &ct, patch, &lung))
    })?;
    let mut warnings = warnings;
    let bag = stage(bar, "classifying", &mut t.classify, || {
        classify(engine, &body, &lobes, opts.max_bag, &mut warnings)
    })
    .with_context(|| engine_failed("severity classification", engine))?;
    let assessed = Assessed {
        volume,
        ct,
        body,
        lung,
        lobes,
        bag,
    };
    let mut report = assessed.report(engine, path, opts, warnings);
    report.dicom = dicom;
    bar.set_message("writing");
    assessed
        .write(&mut report, path, opts, t, start)
        .with_context(|| format!("{}: no output written", path.display()))?;
    bar.set_message("done");
    Ok(report)
}

/// Runs one stage of an assessment: shows `what` on `bar` and stores its wall time (ms).
fn stage<T>(
    bar: &ProgressBar,
    what: &str,
    millis: &mut f64,
    run: impl FnOnce() -> Result<T>,
) -> Result<T> {
    bar.set_message(what.to_string());
    let t = Instant::now();
    let out = run()?;
    *millis = ms(t);
    Ok(out)
}

/// Reads the input and checks that its values look like HU (a warning with `force`).
fn read_hu_volume(input: &CtInput, force: bool) -> Result<LoadedCt> {
    let mut loaded = input.read()?;
    if let Some(problem) = loaded.volume.hu_range_problem() {
        if force {
            loaded.warnings.push(problem);
        } else {
            bail!("{problem}; pass --force to assess it anyway");
        }
    }
    Ok(loaded)
}

/// The volume on the canonical grid and the network's patches of its body slices (at least 2).
fn body_patches(
    volume: &Volume,
    patch: usize,
    path: &Path,
) -> Result<(CanonicalCt, VolumePatches)> {
    let ct = CanonicalCt::from_volume(volume);
    let vp = volume_patches(&ct, &PreprocessConfig::new(patch));
    let m = vp.slices.len();
    if m < 2 {
        bail!(
            "{}: only {m} slice(s) hold body (voxels above −500 HU); at least 2 are needed",
            path.display()
        );
    }
    Ok((ct, vp))
}

/// Lobe labels [M, P, P] of the body patches, `batch_size` patches per engine call, with every
/// pixel's lobe costs when the lobe-order step will run (`with_costs`).
fn segment(
    engine: &mut dyn InferenceEngine,
    body: &VolumePatches,
    p: usize,
    batch_size: usize,
    with_costs: bool,
    bar: &ProgressBar,
) -> Result<LobeScores> {
    let pp = p * p;
    let classes = engine.config().seg_classes;
    if classes != NUM_LOBES + 1 {
        bail!(
            "the weights segment {classes} classes; a lobe map needs {}",
            NUM_LOBES + 1
        );
    }
    bar.set_length(body.slices.len() as u64);
    bar.set_position(0);
    let mut seg = LobeScores::default();
    for chunk in body.patches.chunks(batch_size * pp) {
        let next = engine.segment(chunk, p, with_costs)?;
        if next.labels.len() != chunk.len() {
            bail!(
                "the engine returned {} labels for {} patch pixels",
                next.labels.len(),
                chunk.len()
            );
        }
        if with_costs && next.costs().len() != chunk.len() * NUM_LOBES {
            bail!(
                "the engine returned {} lobe costs for {} patch pixels of {NUM_LOBES} lobes",
                next.costs().len(),
                chunk.len()
            );
        }
        if let Some(&bad) = next.labels.iter().find(|&&l| l as usize > NUM_LOBES) {
            bail!("the engine returned label {bad}, outside 0–{NUM_LOBES}");
        }
        seg.append(next);
        bar.inc((chunk.len() / pp) as u64);
    }
    Ok(seg)
}

/// Voxel count, HU sum and involved voxels of one lobe in one slice.
#[derive(Clone, Copy, Default)]
struct LobeSums {
    voxels: usize,
    hu: f64,
    involved: usize,
}

/// The post-processed lobe map on the canonical grid and its per-slice sums.
struct LobeMap {
    labels: Vec<u8>,
    /// Per canonical z slice, per lobe.
    per_slice: Vec<[LobeSums; NUM_LOBES]>,
    /// Per canonical z slice: voxels in the lung mask or a lobe.
    lung_area: Vec<usize>,
}

impl LobeMap {
    /// The patches' labels pasted back on the canonical grid and kept only inside the lung
    /// mask's envelope, each lung's columns put in their most probable lobe order (when `seg`
    /// has lobe costs), the largest component of each lobe kept, and the sums of every slice.
    fn new(
        seg: &LobeScores,
        body: &VolumePatches,
        ct: &CanonicalCt,
        patch: usize,
        lung: &LungMask,
    ) -> LobeMap {
        let dims = ct.dims;
        let mut labels = paste_patches(&seg.labels, &body.slices, dims, patch);
        labels
            .par_iter_mut()
            .zip(lung.envelope.par_iter())
            .for_each(|(l, &inside)| {
                if !inside {
                    *l = 0;
                }
            });
        if seg.has_costs() {
            // A voxel's cost is that of the patch pixel it was pasted from.
            let which = patch_of_slice(&body.slices, dims[2]);
            order_lobes_along_z(&mut labels, dims, |x, y, z, lobe| {
                let m = which[z];
                let pixel = body.slices[m].crop.patch_pixel(x, y, patch);
                seg.cost(m * patch * patch + pixel, lobe)
            });
        }
        keep_largest_components(&mut labels, dims);
        let n = dims[0] * dims[1];
        let (per_slice, lung_area) = labels
            .par_chunks(n)
            .zip(ct.hu.par_chunks(n))
            .zip(lung.labels.par_chunks(n))
            .map(|((ls, hs), ms)| {
                let mut acc = [LobeSums::default(); NUM_LOBES];
                let mut area = 0;
                for ((&l, &h), &m) in ls.iter().zip(hs).zip(ms) {
                    area += (l > 0 || m > 0) as usize;
                    if l > 0 {
                        let a = &mut acc[l as usize - 1];
                        a.voxels += 1;
                        a.hu += h as f64;
                        a.involved += (h >= INVOLVED_HU.0 && h <= INVOLVED_HU.1) as usize;
                    }
                }
                (acc, area)
            })
            .unzip();
        LobeMap {
            labels,
            per_slice,
            lung_area,
        }
    }

    /// Slices that hold real lung: lung mask or lobes over at least 5 % of the area of the
    /// fullest slice (the slivers at the apex and the dome do not count on their own; a
    /// consolidated base, labelled by the network inside the envelope, does).
    fn lung_slices(&self) -> Vec<bool> {
        let most = self.lung_area.iter().copied().max().unwrap_or(0);
        self.lung_area
            .iter()
            .map(|&a| most > 0 && a * 20 >= most)
            .collect()
    }

    /// Mean HU over all lobe voxels; `None` without any.
    fn mean_hu(&self) -> Option<f64> {
        let (n, sum) = self
            .per_slice
            .iter()
            .flatten()
            .fold((0, 0.0), |a, s| (a.0 + s.voxels, a.1 + s.hu));
        (n > 0).then(|| sum / n as f64)
    }

    /// The report line of every lobe and the lung's (voxels, involved voxels).
    fn lobe_reports(
        &self,
        voxel_ml: f64,
        scheme: LabelScheme,
    ) -> (Vec<LobeReport>, (usize, usize)) {
        let mut totals = (0usize, 0usize);
        let reports = (0..NUM_LOBES)
            .map(|l| {
                let (count, sum, involved) = self.per_slice.iter().fold((0, 0.0, 0), |a, s| {
                    (a.0 + s[l].voxels, a.1 + s[l].hu, a.2 + s[l].involved)
                });
                totals.0 += count;
                totals.1 += involved;
                LobeReport {
                    label: scheme.map(l as u8 + 1),
                    name: LOBE_NAMES[l].to_string(),
                    voxels: count,
                    volume_ml: count as f64 * voxel_ml,
                    mean_hu: (count > 0).then(|| sum / count as f64),
                    involvement: (count > 0).then(|| involved as f64 / count as f64),
                }
            })
            .collect();
        (reports, totals)
    }
}

/// The severity bag and its result.
struct SeverityBag {
    /// The body slices (indices into the patches) the bag was drawn from: those that hold real
    /// lung ([`LobeMap::lung_slices`]), or all body slices when fewer than 2 do.
    pool: Vec<usize>,
    /// Slices in the bag.
    len: usize,
    severity: Severity,
}

/// Classifies an evenly spaced bag of at most `max_bag` slices that hold real lung.
fn classify(
    engine: &mut dyn InferenceEngine,
    body: &VolumePatches,
    lobes: &LobeMap,
    max_bag: usize,
    warnings: &mut Vec<String>,
) -> Result<SeverityBag> {
    let m = body.slices.len();
    let pp = body.patches.len() / m;
    let is_lung = lobes.lung_slices();
    let lung: Vec<usize> = (0..m).filter(|&k| is_lung[body.slices[k].z]).collect();
    let pool: Vec<usize> = if lung.len() >= 2 {
        lung
    } else {
        warnings.push(format!(
            "the lung mask and lobes hold lung in {} slice(s); the severity bag uses evenly spaced body slices",
            lung.len()
        ));
        (0..m).collect()
    };
    let bag: Vec<usize> = evenly(pool.len(), max_bag)
        .into_iter()
        .map(|i| pool[i])
        .collect();
    let mut bag_patches = Vec::with_capacity(bag.len() * pp);
    for &k in &bag {
        bag_patches.extend_from_slice(&body.patches[k * pp..(k + 1) * pp]);
    }
    let cls = engine.classify(&bag_patches, &[bag.len()])?;
    if cls.len() < 2 || cls.iter().any(|v| !v.is_finite()) {
        bail!("the engine returned invalid class logits {cls:?}");
    }
    Ok(SeverityBag {
        pool,
        len: bag.len(),
        severity: Severity::from_logits([cls[0], cls[1]]),
    })
}

impl Severity {
    /// The softmax probability of the severe class and the class at threshold 0.5.
    fn from_logits(logits: [f32; 2]) -> Severity {
        let probability = 1.0 / (1.0 + ((logits[0] - logits[1]) as f64).exp());
        let class = if probability >= 0.5 {
            "severe"
        } else {
            "non-severe"
        };
        Severity {
            probability,
            class: class.to_string(),
            logits,
            reliable: true,
        }
    }
}

/// What the stages of an assessment produced.
struct Assessed {
    volume: Volume,
    ct: CanonicalCt,
    body: VolumePatches,
    lung: LungMask,
    lobes: LobeMap,
    bag: SeverityBag,
}

impl Assessed {
    /// The report (timings still zero), with the quality gate's verdict.
    fn report(
        &self,
        engine: &dyn InferenceEngine,
        path: &Path,
        opts: &AssessOptions,
        mut warnings: Vec<String>,
    ) -> Report {
        let volume = &self.volume;
        let voxel_ml = volume.voxel_ml();
        let (lobes, (lung, involved)) = self.lobes.lobe_reports(voxel_ml, opts.label_scheme);
        let [lobes_path, report_path, preview_path] = output_paths(path, opts);
        let mask_ml = self.lung.voxels() as f64 * voxel_ml;
        let quality = self.quality(&lobes, lung);
        let lobe_ml = lung as f64 * voxel_ml;
        if mask_ml > 0.0 && (lobe_ml - mask_ml).abs() > 0.25 * mask_ml {
            warnings.push(format!(
                "the lobes hold {lobe_ml:.0} mL but the lung mask measured from the HU holds                  {mask_ml:.0} mL (more than 25 % apart)"
            ));
        }
        if !quality.passed {
            let failed: Vec<String> = quality
                .with(quality::Outcome::Fail)
                .map(|c| c.describe())
                .collect();
            warnings.push(format!(
                "quality gate failed, the severity is unreliable: {}",
                failed.join("; ")
            ));
        }
        let mut severity = self.bag.severity.clone();
        severity.reliable = quality.passed;
        Report {
            input: path.display().to_string(),
            outputs: OutputFiles {
                lobes: lobes_path.display().to_string(),
                report: report_path.display().to_string(),
                preview: opts.preview.then(|| preview_path.display().to_string()),
            },
            severity,
            lobes,
            lung_volume_ml: lobe_ml,
            lung_mask_volume_ml: mask_ml,
            lung_mask_sides_ml: self.lung.sides.map(|v| v as f64 * voxel_ml),
            total_involvement: (lung > 0).then(|| involved as f64 / lung as f64),
            patches: PatchCounts {
                segmented: self.body.slices.len(),
                bag: self.bag.len,
            },
            volume: VolumeInfo {
                shape: volume.dims,
                spacing_mm: volume.canonical_spacing(),
                orientation: volume.orientation.axcodes(),
                dtype: volume.dtype.to_string(),
                affine_source: volume.affine_source,
            },
            timings_ms: Timings::default(),
            device: engine.describe(),
            weights: opts.weights.clone(),
            model: *engine.config(),
            label_scheme: opts.label_scheme,
            version: env!("CARGO_PKG_VERSION").to_string(),
            warnings,
            quality,
            dicom: None,
        }
    }

    /// Measures the volume, the lung mask and the lobes (`lung`: lobe voxels) and judges them
    /// by the quality gate's rules.
    fn quality(&self, lobes: &[LobeReport], lung: usize) -> Quality {
        let ct = &self.ct;
        let (hu_min, hu_max) = self.volume.value_range();
        let mask = self.lung.voxels();
        quality::evaluate(&Measurements {
            spacing_mm: ct.spacing,
            hu_min: hu_min as f64,
            hu_max: hu_max as f64,
            identical_slices: quality::identical_slice_share(ct),
            body_slices: self.body.slices.len() as f64 / ct.dims[2] as f64,
            lung_sides: self.lung.sides.iter().filter(|&&v| v > 0).count(),
            lung_volume_ml: mask as f64 * self.volume.voxel_ml(),
            lung_body_fraction: self.lung.lung_body_fraction(),
            lobe_mean_hu: self.lobes.mean_hu(),
            lobes_present: lobes.iter().filter(|l| l.voxels > 0).count(),
            lobes_to_lung_mask: (mask > 0).then(|| lung as f64 / mask as f64),
        })
    }

    /// Writes the lobe map on the input's grid, the preview (if asked) and last the report
    /// with the final `timings` (the writing's own and the total since `start`): each to a
    /// temporary beside its target, renamed together at the end, so a failure anywhere leaves
    /// none of them (and no temporary).
    fn write(
        &self,
        report: &mut Report,
        path: &Path,
        opts: &AssessOptions,
        mut timings: Timings,
        start: Instant,
    ) -> Result<()> {
        let t = Instant::now();
        let [lobes_path, report_path, preview_path] = output_paths(path, opts);
        let mut staged = StagedFiles::default();
        let native: Vec<u8> = self
            .volume
            .orientation
            .from_canonical(&self.lobes.labels)
            .into_iter()
            .map(|l| opts.label_scheme.map(l))
            .collect();
        let header = label_map_header(&self.volume, &native);
        staged.write(&lobes_path, |w| {
            write_nifti_to(w, &header, VoxelData::U8(&native), true)
        })?;
        if opts.preview {
            staged.write(&preview_path, |w| {
                write_preview(w, &self.ct, &self.lobes.labels, &self.preview_slices())
            })?;
        }
        timings.write = ms(t);
        timings.total = ms(start);
        report.timings_ms = timings;
        staged.write(&report_path, |w| {
            Ok(serde_json::to_writer_pretty(w, &report)?)
        })?;
        staged.commit()
    }

    /// Four evenly spaced canonical slices of the bag's pool.
    fn preview_slices(&self) -> Vec<usize> {
        let pool = &self.bag.pool;
        evenly(pool.len(), 4)
            .into_iter()
            .map(|i| self.body.slices[pool[i]].z)
            .collect()
    }
}

/// Lobe colours of the preview (label 1–5).
const LOBE_COLOURS: [[u8; 3]; NUM_LOBES] = [
    [255, 200, 0],
    [0, 160, 255],
    [255, 60, 60],
    [60, 220, 60],
    [200, 80, 255],
];

/// Axial slices side by side in radiological view (patient's right on the left, anterior up,
/// square pixels), window [−1000, 400] HU, lobes overlaid at 45 % opacity: a PNG into `w`.
pub fn write_preview(
    w: &mut dyn Write,
    ct: &CanonicalCt,
    lobes: &[u8],
    slices: &[usize],
) -> Result<()> {
    let [nx, ny, _] = ct.dims;
    let tile_h = ((ny as f64 * ct.spacing[1] / ct.spacing[0]).round() as usize).max(1);
    let width = nx * slices.len().max(1);
    let mut rgb = vec![0u8; width * tile_h * 3];
    for (t, &z) in slices.iter().enumerate() {
        let base = z * nx * ny;
        for r in 0..tile_h {
            let y = ny - 1 - ((r as f64 + 0.5) * ny as f64 / tile_h as f64) as usize;
            for c in 0..nx {
                let x = nx - 1 - c;
                let i = base + y * nx + x;
                let g = ((ct.hu[i] + 1000.0) / 1400.0).clamp(0.0, 1.0) * 255.0;
                let mut px = [g; 3];
                if lobes[i] > 0 {
                    let col = LOBE_COLOURS[lobes[i] as usize - 1];
                    for k in 0..3 {
                        px[k] = 0.55 * px[k] + 0.45 * col[k] as f32;
                    }
                }
                let o = (r * width + t * nx + c) * 3;
                for k in 0..3 {
                    rgb[o + k] = px[k].round() as u8;
                }
            }
        }
    }
    let mut enc = png::Encoder::new(w, width as u32, tile_h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut png = enc.write_header()?;
    png.write_image_data(&rgb)?;
    png.finish()?;
    Ok(())
}

/// Expands folders into the NIfTI files they hold (sorted; label maps named `*_lobes.nii*` or
/// `*_mask.nii*` are skipped). A folder without any, or one that cannot be listed, is a failure.
pub fn collect_inputs(inputs: &[PathBuf]) -> (Vec<PathBuf>, Vec<(PathBuf, anyhow::Error)>) {
    let mut files = Vec::new();
    let mut failures = Vec::new();
    for input in inputs {
        if !input.is_dir() {
            files.push(input.clone());
            continue;
        }
        let listed = std::fs::read_dir(input).map(|rd| {
            let mut found: Vec<PathBuf> = rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
                    let name = name.unwrap_or_default();
                    p.is_file()
                        && (name.ends_with(".nii") || name.ends_with(".nii.gz"))
                        && !name.starts_with('.')
                        && !["_lobes.nii", "_mask.nii"].iter().any(|s| name.contains(s))
                })
                .collect();
            found.sort();
            found
        });
        match listed {
            Ok(found) if found.is_empty() => failures.push((
                input.clone(),
                anyhow!(
                    "{}: the folder holds no .nii or .nii.gz file",
                    input.display()
                ),
            )),
            Ok(found) => files.extend(found),
            Err(e) => failures.push((
                input.clone(),
                anyhow!("{}: cannot list the folder ({e})", input.display()),
            )),
        }
    }
    (files, failures)
}

/// Checks, before anything is written, that every input's outputs are its own. An input named
/// twice (the same file) is assessed once. Inputs whose outputs would land on the same files
/// (`a/ct.nii.gz` and `b/ct.nii.gz` with one `--out`, or `ct.nii` beside `ct.nii.gz`) are all
/// refused, and so is an input whose output would overwrite another input; each refusal is a
/// failure naming the other input. Returns the inputs to assess (in order) and the refusals.
pub fn claim_outputs(
    files: &[CtInput],
    opts: &AssessOptions,
) -> (Vec<CtInput>, Vec<(PathBuf, anyhow::Error)>) {
    let mut inputs: Vec<(PathBuf, &CtInput, PathBuf)> = Vec::new();
    let mut seen = HashSet::new();
    for input in files {
        let file = input.path();
        let key = file_key(&file);
        if seen.insert(key.clone()) {
            inputs.push((file, input, key));
        }
    }
    let named: Vec<[PathBuf; 3]> = inputs
        .iter()
        .map(|(file, _, _)| output_paths(file, opts))
        .collect();
    let outputs: Vec<[PathBuf; 3]> = named
        .iter()
        .map(|out| out.clone().map(|p| file_key(&p)))
        .collect();
    let mut by_output: HashMap<&Path, Vec<usize>> = HashMap::new();
    for (i, out) in outputs.iter().enumerate() {
        by_output.entry(&out[0]).or_default().push(i);
    }
    let by_input: HashMap<&Path, usize> = inputs
        .iter()
        .enumerate()
        .map(|(i, (_, _, key))| (key.as_path(), i))
        .collect();
    let mut refusals: Vec<Vec<String>> = vec![Vec::new(); inputs.len()];
    for (i, out) in outputs.iter().enumerate() {
        for &j in &by_output[out[0].as_path()] {
            if j != i {
                refusals[i].push(format!(
                    "{} would write the same outputs ({})",
                    inputs[j].0.display(),
                    named[i][0].display()
                ));
            }
        }
        for (path, name) in out.iter().zip(&named[i]) {
            if let Some(&j) = by_input.get(path.as_path()) {
                refusals[i].push(format!(
                    "its output {} is the input {}",
                    name.display(),
                    inputs[j].0.display()
                ));
            }
        }
    }
    let mut claimed = Vec::new();
    let mut refused = Vec::new();
    for ((file, input, _), why) in inputs.into_iter().zip(refusals) {
        if why.is_empty() {
            claimed.push(input.clone());
        } else {
            refused.push((
                file.clone(),
                anyhow!(
                    "{}: not assessed: {}; assess such inputs into different --out folders or \
                     rename one",
                    file.display(),
                    why.join("; ")
                ),
            ));
        }
    }
    (claimed, refused)
}

/// A path with its folder resolved (the file itself need not exist), to compare paths.
fn file_key(path: &Path) -> PathBuf {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match (std::fs::canonicalize(folder), path.file_name()) {
        (Ok(folder), Some(name)) => folder.join(name),
        _ => path.to_path_buf(),
    }
}

/// Assesses every input (paths of NIfTI files, or [`CtInput`]s) in turn; a failure is
/// recorded under [`CtInput::path`] and the batch goes on.
pub fn assess_batch<I: Clone + Into<CtInput>>(
    engine: &mut dyn InferenceEngine,
    files: &[I],
    opts: &AssessOptions,
    show_progress: bool,
) -> Vec<(PathBuf, Result<Report>)> {
    let multi = MultiProgress::with_draw_target(if show_progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let batch = multi.add(ProgressBar::new(files.len() as u64));
    batch.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} volumes {elapsed}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    batch.set_prefix("batch");
    let mut results = Vec::with_capacity(files.len());
    for file in files {
        let input: CtInput = file.clone().into();
        let file = input.path();
        let bar = multi.add(ProgressBar::new(1));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} slices {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(stem(&file));
        let result = assess_input_with_progress(engine, &input, opts, &bar);
        bar.finish_and_clear();
        multi.remove(&bar);
        batch.inc(1);
        results.push((file, result));
    }
    batch.finish_and_clear();
    results
}
