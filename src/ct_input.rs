//! The CT inputs of `assess` and `convert`: NIfTI files and DICOM CT series, with folders expanded into them.

use crate::assess::collect_inputs;
use crate::io::dicom::{has_dicom_magic, make_names_unique, read_series, scan_folder};
use crate::io::dicom::{DicomSeries, SeriesInfo};
use crate::io::nifti::{read_volume, Volume};
use anyhow::{anyhow, Result};
use std::path::{Path, PathBuf};

/// One CT volume to read: a NIfTI file or a DICOM series.
#[derive(Clone, Debug)]
pub enum CtInput {
    Nifti(PathBuf),
    Dicom(DicomSeries),
}

impl From<PathBuf> for CtInput {
    fn from(path: PathBuf) -> Self {
        CtInput::Nifti(path)
    }
}

/// A read input: the volume, and for a DICOM series its identifying tags and any warnings.
#[derive(Clone, Debug)]
pub struct LoadedCt {
    pub volume: Volume,
    pub dicom: Option<SeriesInfo>,
    pub warnings: Vec<String>,
}

impl CtInput {
    /// The path that names the input in messages, results and reports, and whose folder and
    /// name the outputs take: the NIfTI file, or a series' folder joined with its name.
    pub fn path(&self) -> PathBuf {
        match self {
            CtInput::Nifti(p) => p.clone(),
            CtInput::Dicom(s) => s.path(),
        }
    }

    pub fn read(&self) -> Result<LoadedCt> {
        match self {
            CtInput::Nifti(p) => Ok(LoadedCt {
                volume: read_volume(p)?,
                dicom: None,
                warnings: Vec::new(),
            }),
            CtInput::Dicom(s) => {
                let sv = read_series(s)?;
                Ok(LoadedCt {
                    volume: sv.volume,
                    dicom: Some(sv.info),
                    warnings: sv.warnings,
                })
            }
        }
    }
}

/// Inputs found, inputs that failed (each error names its file), and notes on what was
/// skipped on purpose.
#[derive(Debug, Default)]
pub struct CollectedInputs {
    pub inputs: Vec<CtInput>,
    pub failures: Vec<(PathBuf, anyhow::Error)>,
    pub notes: Vec<String>,
}

/// Expands the command line's inputs. A file is a NIfTI volume (a single DICOM file is
/// refused: its series is read from its folder). A folder that holds NIfTI files gives those
/// (see [`collect_inputs`]); any other folder is searched, with its subfolders, for DICOM CT
/// series, each one input.
pub fn collect_ct_inputs(paths: &[PathBuf]) -> CollectedInputs {
    let mut out = CollectedInputs::default();
    let mut series = Vec::new();
    for path in paths {
        if !path.is_dir() {
            if has_dicom_magic(path) {
                out.failures.push((
                    path.clone(),
                    anyhow!(
                        "{}: a single DICOM file; pass the folder that holds its series",
                        path.display()
                    ),
                ));
            } else {
                out.inputs.push(CtInput::Nifti(path.clone()));
            }
            continue;
        }
        let (files, _) = collect_inputs(std::slice::from_ref(path));
        if !files.is_empty() {
            out.inputs.extend(files.into_iter().map(CtInput::Nifti));
            continue;
        }
        match scan_folder(path) {
            Err(e) => out.failures.push((path.clone(), e)),
            Ok(scan) => {
                out.notes.extend(scan.notes);
                if scan.series.is_empty() && scan.failures.is_empty() {
                    out.failures.push((path.clone(), no_ct(path)));
                }
                out.failures.extend(scan.failures);
                series.extend(scan.series);
            }
        }
    }
    make_names_unique(&mut series);
    out.inputs.extend(series.into_iter().map(CtInput::Dicom));
    out
}

fn no_ct(path: &Path) -> anyhow::Error {
    anyhow!(
        "{}: the folder holds no .nii or .nii.gz file and no DICOM CT series",
        path.display()
    )
}
