//! `m2unet assess`: its arguments, the engine they name, and the batch over the inputs.

use crate::assess::{assess_batch, claim_outputs, AssessOptions, LabelScheme, Report};
use crate::backend::{make_engine, Backend};
use crate::ct_input::collect_ct_inputs;
use crate::engine::InferenceEngine;
use crate::weights_source::WeightsSource;
use anyhow::{bail, Context, Result};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Assess chest CT volumes: a lobe label map and a severity report per volume.
///
/// Each INPUT is a NIfTI file (.nii or .nii.gz) or a folder: every NIfTI file inside it (except
/// label maps named *_lobes.nii* or *_mask.nii*) or, when it holds none, every DICOM CT series
/// in it and its subfolders (any file names; each series assessed on its own and named
/// S<number>_<description> or by its SeriesInstanceUID; other files skipped with a note).
/// For each volume it writes
/// `<name>_lobes.nii.gz` (uint8 lobe labels on the input's exact grid and header),
/// `<name>_report.json` (severity probability and class, per-lobe volume, mean HU and
/// involvement, timings) and with --preview `<name>_preview.png`, all three or none. A file
/// that fails is reported, leaves no output behind, and the batch goes on; the exit code is
/// non-zero when any file failed.
///
/// Output names are never made up: inputs whose outputs would collide (`a/ct.nii.gz` and
/// `b/ct.nii.gz` with one --out, or `ct.nii` beside `ct.nii.gz`) are refused with an error
/// naming each other before anything is written, and so is an input whose output would
/// overwrite another input; the other inputs are assessed. A file named twice is assessed once.
#[derive(clap::Args, Debug, Clone)]
pub struct AssessArgs {
    /// CT volumes (.nii/.nii.gz), folders of them, or folders of DICOM CT series.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Model weights or a training checkpoint (safetensors with the PyTorch parameter names);
    /// default: the file named by $M2UNET_WEIGHTS, else the default weights built into the
    /// binary (trained on synthetic phantoms, weights/MODEL_CARD.md).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Output folder (created when missing); default: beside each input (a DICOM series: in
    /// its folder). Inputs whose outputs would collide (a/ct.nii.gz and b/ct.nii.gz into one
    /// folder, ct.nii beside ct.nii.gz) are refused before anything is written, each with an
    /// error naming the other; output names are never made up. A volume's outputs are written
    /// all or none.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where the network runs.
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    pub device: Backend,
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
    /// The assessment's settings; the reports name the weights `weights`.
    fn options(&self, weights: &str) -> AssessOptions {
        AssessOptions {
            out_dir: self.out.clone(),
            batch_size: self.batch_size,
            max_bag: self.max_bag,
            preview: self.preview,
            force: self.force,
            label_scheme: self.label_scheme,
            weights: Some(weights.to_string()),
        }
    }
}

/// `m2unet assess`: loads the weights ([`WeightsSource::search`]) on `--device`, assesses every
/// input and reports failures on stderr. Returns whether every volume succeeded.
pub fn run(args: &AssessArgs) -> Result<bool> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if args.max_bag < 2 {
        bail!("--max-bag must be at least 2 (a bag needs two patches)");
    }
    let weights = WeightsSource::search(args.weights.as_deref());
    // The engine first: a bad device or weights file leaves no output folder behind.
    let mut engine = make_engine(weights.load()?, args.device)?;
    if !args.quiet {
        eprintln!("weights: {weights}");
    }
    run_with_engine(args, engine.as_mut(), &weights.to_string())
}

/// [`run`] on a given engine, whose weights the reports name `weights`.
pub fn run_with_engine(
    args: &AssessArgs,
    engine: &mut dyn InferenceEngine,
    weights: &str,
) -> Result<bool> {
    let opts = args.options(weights);
    if let Some(dir) = &opts.out_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
    }
    let collected = collect_ct_inputs(&args.inputs);
    let (files, mut failures) = (collected.inputs, collected.failures);
    if !args.quiet {
        collected.notes.iter().for_each(|n| eprintln!("note: {n}"));
    }
    let (files, refused) = claim_outputs(&files, &opts);
    failures.extend(refused);
    let show = !args.quiet && std::io::stderr().is_terminal();
    let results = assess_batch(engine, &files, &opts, show);
    Ok(report_results(results, failures, args.quiet))
}

/// One line per assessed volume (unless `quiet`), then the failures or the count; whether
/// there were no failures.
fn report_results(
    results: Vec<(PathBuf, Result<Report>)>,
    mut failures: Vec<(PathBuf, anyhow::Error)>,
    quiet: bool,
) -> bool {
    let mut ok = 0;
    for (file, result) in results {
        match result {
            Ok(report) => {
                ok += 1;
                if !quiet {
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
    } else if !quiet {
        eprintln!("{ok} of {total} volume(s) assessed");
    }
    failures.is_empty()
}
