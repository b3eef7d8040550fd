//! `m2unet assess`: CT volume → lobe label map on the input's grid, severity, JSON report and
//! optional PNG preview, for one file or a batch, through any [`InferenceEngine`].

use crate::config::ModelConfig;
use crate::ct_input::{collect_ct_inputs, CtInput};
use crate::data::dataset::stem;
use crate::data::preprocess::{
    keep_largest_components, paste_patches, volume_patches, CanonicalCt, PreprocessConfig,
};
use crate::data::{LOBE_NAMES, NUM_LOBES};
use crate::engine::InferenceEngine;
use crate::io::dicom::SeriesInfo;
use crate::io::nifti::{write_label_map, AffineSource};
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use serde::Serialize;
use std::io::IsTerminal;
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
    /// Continue (with a warning in the report) when the values do not look like HU.
    pub force: bool,
    pub label_scheme: LabelScheme,
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
    pub lung_volume_ml: f64,
    /// HU-based involvement over all lobes.
    pub total_involvement: Option<f64>,
    pub patches: PatchCounts,
    pub volume: VolumeInfo,
    pub timings_ms: Timings,
    pub device: String,
    pub model: ModelConfig,
    pub label_scheme: LabelScheme,
    pub version: String,
    pub warnings: Vec<String>,
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
    assess_volume_with_progress(engine, path, opts, &ProgressBar::hidden())
}

/// [`assess_volume`] reporting its stages on `bar`.
pub fn assess_volume_with_progress(
    engine: &mut dyn InferenceEngine,
    path: &Path,
    opts: &AssessOptions,
    bar: &ProgressBar,
) -> Result<Report> {
    assess_input_with_progress(engine, &CtInput::Nifti(path.to_path_buf()), opts, bar)
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
    let name = path.display().to_string();
    let start = Instant::now();
    let mut timings = Timings::default();
    bar.set_message("reading");
    let t = Instant::now();
    let loaded = input.read()?;
    let volume = loaded.volume;
    let mut warnings = loaded.warnings;
    if let Some(problem) = volume.hu_range_problem() {
        if opts.force {
            warnings.push(problem);
        } else {
            bail!("{problem}; pass --force to assess it anyway");
        }
    }
    timings.read = ms(t);

    bar.set_message("preprocessing");
    let t = Instant::now();
    let ct = CanonicalCt::from_volume(&volume);
    let cfg = PreprocessConfig::new(engine.config().patch);
    let vp = volume_patches(&ct, &cfg);
    let m = vp.slices.len();
    if m < 2 {
        bail!("{name}: only {m} slice(s) hold body (voxels above −500 HU); at least 2 are needed");
    }
    timings.preprocess = ms(t);

    bar.set_message("segmenting");
    bar.set_length(m as u64);
    bar.set_position(0);
    let t = Instant::now();
    let p = cfg.patch;
    let mut seg = Vec::with_capacity(m * p * p);
    for chunk in vp.patches.chunks(opts.batch_size * p * p) {
        let labels = engine
            .segment(chunk, p)
            .with_context(|| format!("{name}: segmentation failed"))?;
        if labels.len() != chunk.len() {
            bail!(
                "{name}: the engine returned {} labels for {} patch pixels",
                labels.len(),
                chunk.len()
            );
        }
        if let Some(&bad) = labels.iter().find(|&&l| l as usize > NUM_LOBES) {
            bail!("{name}: the engine returned label {bad}, outside 0–{NUM_LOBES}");
        }
        seg.extend_from_slice(&labels);
        bar.inc((chunk.len() / (p * p)) as u64);
    }
    timings.segment = ms(t);

    bar.set_message("post-processing");
    let t = Instant::now();
    let dims = ct.dims;
    let mut lobes = paste_patches(&seg, &vp.slices, dims, p);
    keep_largest_components(&mut lobes, dims);
    let n = dims[0] * dims[1];
    let stats: Vec<[(usize, f64, usize); NUM_LOBES]> = lobes
        .par_chunks(n)
        .zip(ct.hu.par_chunks(n))
        .map(|(ls, hs)| {
            let mut acc = [(0usize, 0f64, 0usize); NUM_LOBES];
            for (&l, &h) in ls.iter().zip(hs) {
                if l > 0 {
                    let a = &mut acc[l as usize - 1];
                    a.0 += 1;
                    a.1 += h as f64;
                    a.2 += (h >= INVOLVED_HU.0 && h <= INVOLVED_HU.1) as usize;
                }
            }
            acc
        })
        .collect();
    let lung_slices: Vec<usize> = (0..m)
        .filter(|&k| stats[vp.slices[k].z].iter().any(|s| s.0 > 0))
        .collect();
    timings.postprocess = ms(t);

    bar.set_message("classifying");
    let t = Instant::now();
    let bag_pool: Vec<usize> = if lung_slices.len() >= 2 {
        lung_slices.clone()
    } else {
        warnings.push(format!(
            "the lobe map marks {} slice(s) as lung; the severity bag uses evenly spaced body slices",
            lung_slices.len()
        ));
        (0..m).collect()
    };
    let bag: Vec<usize> = evenly(bag_pool.len(), opts.max_bag)
        .into_iter()
        .map(|i| bag_pool[i])
        .collect();
    let mut bag_patches = Vec::with_capacity(bag.len() * p * p);
    for &k in &bag {
        bag_patches.extend_from_slice(&vp.patches[k * p * p..(k + 1) * p * p]);
    }
    let out = engine.forward_eval(&bag_patches, &[bag.len()])?;
    if out.cls_logits.len() < 2 || out.cls_logits.iter().any(|v| !v.is_finite()) {
        bail!(
            "the engine returned invalid class logits {:?}",
            out.cls_logits
        );
    }
    let logits = [out.cls_logits[0], out.cls_logits[1]];
    let probability = 1.0 / (1.0 + ((logits[0] - logits[1]) as f64).exp());
    timings.classify = ms(t);

    let voxel_ml = volume.voxel_ml();
    let mut totals = (0usize, 0usize);
    let lobe_reports: Vec<LobeReport> = (0..NUM_LOBES)
        .map(|l| {
            let (count, sum, involved) = stats.iter().fold((0, 0.0, 0), |a, s| {
                (a.0 + s[l].0, a.1 + s[l].1, a.2 + s[l].2)
            });
            totals.0 += count;
            totals.1 += involved;
            LobeReport {
                label: opts.label_scheme.map(l as u8 + 1),
                name: LOBE_NAMES[l].to_string(),
                voxels: count,
                volume_ml: count as f64 * voxel_ml,
                mean_hu: (count > 0).then(|| sum / count as f64),
                involvement: (count > 0).then(|| involved as f64 / count as f64),
            }
        })
        .collect();

    bar.set_message("writing");
    let t = Instant::now();
    let [lobes_path, report_path, preview_path] = output_paths(path, opts);
    let native: Vec<u8> = volume
        .orientation
        .from_canonical(&lobes)
        .into_iter()
        .map(|l| opts.label_scheme.map(l))
        .collect();
    let preview_slices: Vec<usize> = evenly(bag_pool.len(), 4)
        .into_iter()
        .map(|i| vp.slices[bag_pool[i]].z)
        .collect();
    let mut report = Report {
        input: name.clone(),
        outputs: OutputFiles {
            lobes: lobes_path.display().to_string(),
            report: report_path.display().to_string(),
            preview: opts.preview.then(|| preview_path.display().to_string()),
        },
        severity: Severity {
            probability,
            class: if probability >= 0.5 {
                "severe"
            } else {
                "non-severe"
            }
            .to_string(),
            logits,
        },
        lobes: lobe_reports,
        lung_volume_ml: totals.0 as f64 * voxel_ml,
        total_involvement: (totals.0 > 0).then(|| totals.1 as f64 / totals.0 as f64),
        patches: PatchCounts {
            segmented: m,
            bag: bag.len(),
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
        model: *engine.config(),
        label_scheme: opts.label_scheme,
        version: env!("CARGO_PKG_VERSION").to_string(),
        warnings,
        dicom: loaded.dicom,
    };
    let mut staged = Staged::default();
    let written = (|| -> Result<()> {
        let tmp = staged.temp_for(&lobes_path);
        write_label_map(&tmp, &volume, &native, true)?;
        if opts.preview {
            let tmp = staged.temp_for(&preview_path);
            write_preview(&tmp, &ct, &lobes, &preview_slices)?;
        }
        timings.write = ms(t);
        timings.total = ms(start);
        report.timings_ms = timings.clone();
        let tmp = staged.temp_for(&report_path);
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(&tmp, json).with_context(|| format!("cannot write {}", tmp.display()))?;
        staged.commit()
    })();
    if let Err(e) = written {
        staged.discard();
        return Err(e);
    }
    bar.set_message("done");
    Ok(report)
}

/// Temporary files beside their destinations, renamed together on success.
#[derive(Default)]
struct Staged {
    pairs: Vec<(PathBuf, PathBuf)>,
}

impl Staged {
    fn temp_for(&mut self, dest: &Path) -> PathBuf {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        self.pairs.push((tmp.clone(), dest.to_path_buf()));
        tmp
    }

    fn commit(&mut self) -> Result<()> {
        for (tmp, dest) in &self.pairs {
            std::fs::rename(tmp, dest)
                .with_context(|| format!("cannot move {} to {}", tmp.display(), dest.display()))?;
        }
        self.pairs.clear();
        Ok(())
    }

    fn discard(&mut self) {
        for (tmp, _) in self.pairs.drain(..) {
            let _ = std::fs::remove_file(tmp);
        }
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
/// square pixels), window [−1000, 400] HU, lobes overlaid at 45 % opacity.
pub fn write_preview(path: &Path, ct: &CanonicalCt, lobes: &[u8], slices: &[usize]) -> Result<()> {
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
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), width as u32, tile_h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc
        .write_header()
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    w.write_image_data(&rgb)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    w.finish().map_err(|e| anyhow!("{}: {e}", path.display()))?;
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

/// Assess chest CT volumes: a lobe label map and a severity report per volume.
///
/// Each INPUT is a NIfTI file (.nii or .nii.gz) or a folder: every NIfTI file inside it (except
/// label maps named *_lobes.nii* or *_mask.nii*) or, when it holds none, every DICOM CT series
/// in it and its subfolders (any file names; each series assessed on its own and named
/// S<number>_<description> or by its SeriesInstanceUID; other files skipped with a note).
/// For each volume it writes
/// `<name>_lobes.nii.gz` (uint8 lobe labels on the input's exact grid and header),
/// `<name>_report.json` (severity probability and class, per-lobe volume, mean HU and
/// involvement, timings) and with --preview `<name>_preview.png`. A file that fails is
/// reported, leaves no output behind, and the batch goes on; the exit code is non-zero when
/// any file failed.
#[derive(clap::Args, Debug, Clone)]
pub struct AssessArgs {
    /// CT volumes (.nii/.nii.gz), folders of them, or folders of DICOM CT series.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Model weights or a training checkpoint (safetensors with the PyTorch parameter names);
    /// default: the shipped weights trained on synthetic phantoms (weights/MODEL_CARD.md).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Output folder (created when missing); default: beside each input (a DICOM series: in
    /// its folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the network runs.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Patches segmented per engine call.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Largest number of slices in the severity bag (lung slices beyond it are evenly subsampled).
    #[arg(long, default_value_t = 32)]
    pub max_bag: usize,
    /// Also write `<name>_preview.png`: axial slices with the lobe map overlaid.
    #[arg(long)]
    pub preview: bool,
    /// No progress bars and no per-file lines (failures are still reported).
    #[arg(long)]
    pub quiet: bool,
    /// Assess volumes whose values do not look like Hounsfield units (with a warning).
    #[arg(long)]
    pub force: bool,
    /// Label values of the written lobe map.
    #[arg(long, value_enum, default_value_t = LabelScheme::Lungmask)]
    pub label_scheme: LabelScheme,
}

impl AssessArgs {
    pub fn options(&self) -> AssessOptions {
        AssessOptions {
            out_dir: self.out.clone(),
            batch_size: self.batch_size,
            max_bag: self.max_bag,
            preview: self.preview,
            force: self.force,
            label_scheme: self.label_scheme,
        }
    }
}

/// The shipped default weights (paper network trained on synthetic phantoms; see
/// weights/MODEL_CARD.md).
pub const DEFAULT_WEIGHTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/weights/m2unet_synthetic_p80.safetensors"
);

/// The default weights' path, or an error saying how to pass weights when they are missing.
pub fn default_weights() -> Result<PathBuf> {
    let path = PathBuf::from(DEFAULT_WEIGHTS);
    if !path.is_file() {
        bail!(
            "the default weights {} are missing; pass --weights FILE (e.g. from `m2unet train`)",
            path.display()
        );
    }
    Ok(path)
}

/// `m2unet assess`: builds the engine with `make_engine(weights, device)`, assesses every input
/// and reports failures on stderr. Returns whether every volume succeeded.
pub fn run_assess(
    args: &AssessArgs,
    make_engine: impl FnOnce(&Path, &str) -> Result<Box<dyn InferenceEngine>>,
) -> Result<bool> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.max_bag < 2 {
        bail!("--max-bag must be at least 2 (a bag needs two patches)");
    }
    let opts = args.options();
    let weights = match &args.weights {
        Some(w) => w.clone(),
        None => default_weights()?,
    };
    // The engine first: a bad device or weights file leaves no output folder behind.
    let mut engine = make_engine(&weights, &args.device)?;
    if let Some(dir) = &opts.out_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
    }
    let collected = collect_ct_inputs(&args.inputs);
    let (files, mut failures) = (collected.inputs, collected.failures);
    if !args.quiet {
        collected.notes.iter().for_each(|n| eprintln!("note: {n}"));
    }
    let show = !args.quiet && std::io::stderr().is_terminal();
    let results = assess_batch(engine.as_mut(), &files, &opts, show);
    let mut ok = 0;
    for (file, result) in results {
        match result {
            Ok(report) => {
                ok += 1;
                if !args.quiet {
                    eprintln!(
                        "{}: {} (p = {:.3}), lung {:.0} mL → {}",
                        file.display(),
                        report.severity.class,
                        report.severity.probability,
                        report.lung_volume_ml,
                        report.outputs.lobes
                    );
                }
            }
            Err(e) => failures.push((file, e)),
        }
    }
    let total = ok + failures.len();
    if !failures.is_empty() {
        eprintln!("{} of {total} volume(s) failed:", failures.len());
        for (_, e) in &failures {
            eprintln!("  {e:#}");
        }
    } else if !args.quiet {
        eprintln!("{ok} of {total} volume(s) assessed");
    }
    Ok(failures.is_empty())
}
