//! `m2unet assess`: its arguments, the engine they name, and the batch over the inputs.

use crate::assess::{assess_batch, claim_outputs, AssessOptions, LabelScheme, Report};
use crate::backend::{make_engine, Backend};
use crate::ct_input::collect_ct_inputs;
use crate::engine::InferenceEngine;
use crate::quality::Outcome;
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
///
/// Lobes are kept only inside a lung mask measured from the HU (air-density lung inside the
/// body, without outside air, airways and bowel or stomach gas, with vessels and lesions filled
/// back), and the severity bag takes only slices that hold that lung.
///
/// Every volume then passes a quality gate, whose checks (measured value, accepted range,
/// pass / warning / fail) are in the report's `quality` section. A FAIL means the volume is not
/// a chest CT or its header or values are broken: the outputs are still written, but the report
/// says `"reliable": false` under `severity`, the console says the gate failed, and the volume
/// counts as failed (non-zero exit) unless --force. A warning (partial coverage, say) is printed
/// and reported and the result stands.
#[derive(clap::Args, Debug, Clone)]
#[command(after_long_help = gate_help())]
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
    /// Where the network runs: auto (the first GPU when the CUDA driver finds one, else the
    /// CPU; the choice is printed), cpu, cuda, or emu (the CUDA kernels on the CPU emulator).
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
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
    /// Assess volumes whose values do not look like Hounsfield units (with a warning), and
    /// exit 0 when the quality gate fails (the report still marks the severity unreliable).
    #[arg(long)]
    pub force: bool,
    /// Label values of the written lobe map.
    #[arg(long, value_enum, default_value_t = LabelScheme::Lungmask)]
    pub label_scheme: LabelScheme,
    /// Write the network's lobes (the argmax of its seg output) without putting each
    /// craniocaudal column of each lung in anatomical lobe order (LLL below LUL; RLL below RML
    /// below RUL: the labelling most probable under the network's lobe probabilities in which
    /// every column meets the lobes in that order, each at most once).
    #[arg(long)]
    pub no_lobe_order: bool,
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
            order_lobes: !self.no_lobe_order,
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
    Ok(report_results(results, failures, args.quiet, args.force))
}

/// The quality gate's checks for `--help`.
fn gate_help() -> String {
    format!(
        "Lobes are kept only inside a lung mask measured from the HU (grown by 40 mm), and the \
         severity bag takes only slices that hold lung.\n\nQuality gate, in the report's \
         `quality` section and on the console. A FAIL (not a chest CT, or broken header or \
         values) still writes the outputs, but the report marks the severity \
         \"reliable\": false and the volume counts as failed (exit code 1) unless --force; a \
         warning (partial coverage, say) is reported and the result stands:\n{}",
        crate::quality::rules_text()
    )
}

/// One line per assessed volume (unless `quiet`) with the checks that did not pass, then the
/// failures or the count; whether there were no failures. A failed quality gate is a failure
/// unless `force`.
fn report_results(
    results: Vec<(PathBuf, Result<Report>)>,
    mut failures: Vec<(PathBuf, anyhow::Error)>,
    quiet: bool,
    force: bool,
) -> bool {
    let mut ok = 0;
    for (file, result) in results {
        let report = match result {
            Ok(report) => report,
            Err(e) => {
                failures.push((file, e));
                continue;
            }
        };
        let q = &report.quality;
        if !quiet || !q.passed {
            let verdict = if q.passed {
                format!(
                    "{} (p = {:.3})",
                    report.severity.class, report.severity.probability
                )
            } else {
                format!(
                    "QUALITY GATE FAILED, no reliable severity (the network said {}, p = {:.3})",
                    report.severity.class, report.severity.probability
                )
            };
            eprintln!(
                "{}: {verdict}, lobes {:.0} mL, lung mask {:.0} mL → {}",
                file.display(),
                report.lung_volume_ml,
                report.lung_mask_volume_ml,
                report.outputs.report
            );
            let passed = q.with(Outcome::Pass).count();
            eprintln!(
                "  quality: {passed} of {} checks pass, {} warning(s), {} failed",
                q.checks.len(),
                q.warned.len(),
                q.failed.len()
            );
            for (label, outcome) in [("FAIL", Outcome::Fail), ("warning", Outcome::Warning)] {
                for c in q.with(outcome) {
                    eprintln!("  {label}: {}", c.describe());
                }
            }
        }
        if q.passed || force {
            ok += 1;
        } else {
            let failed = q.failed.join(", ");
            failures.push((
                file.clone(),
                anyhow::anyhow!(
                    "{}: the quality gate failed ({failed}); the outputs are written with the \
                     severity marked unreliable; pass --force to accept them",
                    file.display()
                ),
            ));
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
