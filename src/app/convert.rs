//! `m2unet convert`: every DICOM CT series in the given folders written as a NIfTI volume (HU, the series' grid) with a JSON sidecar of its identifying tags.

use crate::ct_input::{collect_ct_inputs, CtInput};
use crate::io::dicom::{read_series, DicomSeries};
use crate::io::nifti::{write_nifti, VoxelData};
use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

/// Convert DICOM CT series to NIfTI.
///
/// Each INPUT is a folder searched, with its subfolders, for DICOM CT series (any file names,
/// several series side by side). Each series is read exactly as `assess` reads it (slices
/// ordered along their normal, spacing checked, RescaleSlope/Intercept applied) and written as
/// `<name>.nii.gz` (int16 HU when every value is a whole number in range, else float32; sform
/// and qform from the series' geometry in NIfTI's RAS+ world) with `<name>.json` (series tags,
/// no patient tags). A series that fails is reported and the others go on; the exit code is
/// non-zero when any failed.
#[derive(clap::Args, Debug, Clone)]
pub struct ConvertArgs {
    /// Folders of DICOM CT series.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output folder (created when missing).
    #[arg(long)]
    pub out: PathBuf,
    /// No per-series lines and no notes on skipped files (failures are still reported).
    #[arg(long)]
    pub quiet: bool,
}

/// Writes one series as `<out>/<name>.nii.gz` and `<out>/<name>.json`; returns the volume path.
pub fn convert_series(series: &DicomSeries, out: &Path) -> Result<PathBuf> {
    let sv = read_series(series)?;
    let v = &sv.volume;
    let mut header = v.header.clone();
    header.scl_slope = 1.0;
    header.scl_inter = 0.0;
    let nifti_path = out.join(format!("{}.nii.gz", series.name));
    let whole = v
        .data
        .iter()
        .all(|&x| x.fract() == 0.0 && (i16::MIN as f32..=i16::MAX as f32).contains(&x));
    let tmp = out.join(format!(
        ".{}.nii.gz.partial-{}",
        series.name,
        std::process::id()
    ));
    let written = if whole {
        let ints: Vec<i16> = v.data.iter().map(|&x| x as i16).collect();
        write_nifti(&tmp, &header, VoxelData::I16(&ints), true)
    } else {
        write_nifti(&tmp, &header, VoxelData::F32(&v.data), true)
    };
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &nifti_path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), nifti_path.display()))?;
    let json_path = out.join(format!("{}.json", series.name));
    let mut sidecar = serde_json::to_value(&sv.info)?;
    sidecar["warnings"] = serde_json::to_value(&sv.warnings)?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&sidecar)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    Ok(nifti_path)
}

/// `m2unet convert`: converts every series found and reports failures on stderr. Returns
/// whether every series (and input) succeeded.
pub fn run(args: &ConvertArgs) -> Result<bool> {
    if let Some(file) = args.inputs.iter().find(|p| !p.is_dir()) {
        bail!(
            "{}: not a folder; convert reads folders of DICOM series",
            file.display()
        );
    }
    let collected = collect_ct_inputs(&args.inputs);
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create the output folder {}", args.out.display()))?;
    if !args.quiet {
        collected.notes.iter().for_each(|n| eprintln!("note: {n}"));
    }
    let mut failures = collected.failures;
    let mut ok = 0;
    for input in &collected.inputs {
        let result = match input {
            CtInput::Dicom(series) => convert_series(series, &args.out),
            CtInput::Nifti(p) => Err(anyhow!(
                "{}: already a NIfTI volume; convert reads DICOM series",
                p.display()
            )),
        };
        match result {
            Ok(path) => {
                ok += 1;
                if !args.quiet {
                    eprintln!("{} → {}", input.path().display(), path.display());
                }
            }
            Err(e) => failures.push((input.path(), e)),
        }
    }
    let total = ok + failures.len();
    if !failures.is_empty() {
        eprintln!("{} of {total} series failed:", failures.len());
        for (_, e) in &failures {
            eprintln!("  {e:#}");
        }
    } else if !args.quiet {
        eprintln!("{ok} of {total} series converted");
    }
    Ok(failures.is_empty())
}
