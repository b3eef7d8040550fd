//! Finding the DICOM CT series in a folder tree: files grouped by SeriesInstanceUID and named for output files; other files skipped with a note.

use super::header::{
    has_dicom_magic, SliceHeader, CT_IMAGE_STORAGE, MEDIA_DIRECTORY_STORAGE, MULTIFRAME_CT_STORAGE,
};
use anyhow::{anyhow, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Deepest folder level searched below the given folder.
const MAX_DEPTH: usize = 16;

/// The tags that identify a series in reports: no patient name, ID, birth date or other
/// patient or date tags.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SeriesTags {
    pub series_instance_uid: String,
    pub series_number: Option<i64>,
    pub series_description: Option<String>,
    pub study_instance_uid: Option<String>,
    pub modality: Option<String>,
    pub manufacturer: Option<String>,
}

/// One CT series found in a folder tree.
#[derive(Clone, Debug)]
pub struct DicomSeries {
    /// The folder that holds the series' files.
    pub folder: PathBuf,
    /// The name its outputs get (`<name>_lobes.nii.gz`, `<name>.nii.gz`): SeriesNumber and
    /// description, or the SeriesInstanceUID; letters, digits, `-`, `_` and `.` only.
    pub name: String,
    pub tags: SeriesTags,
    /// The files' headers, sorted by path.
    pub headers: Vec<SliceHeader>,
}

impl DicomSeries {
    /// The series' folder joined with its name: what messages and reports call the input
    /// (no such file exists).
    pub fn path(&self) -> PathBuf {
        self.folder.join(&self.name)
    }

    /// "series NAME in FOLDER", for messages.
    pub fn label(&self) -> String {
        format!("series {} in {}", self.name, self.folder.display())
    }
}

/// What a folder scan found.
#[derive(Debug, Default)]
pub struct FolderScan {
    pub series: Vec<DicomSeries>,
    /// Files and series skipped on purpose (not DICOM, a DICOMDIR, no image, not CT).
    pub notes: Vec<String>,
    /// Files or series that cannot be read, each naming the file and the problem.
    pub failures: Vec<(PathBuf, anyhow::Error)>,
}

/// Lists the files below `dir` (hidden names skipped), sorted.
fn list_files(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow!("{}: cannot list the folder ({e})", dir.display()))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| anyhow!("{}: cannot list the folder ({e})", dir.display()))?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
        if is_dir && depth < MAX_DEPTH {
            list_files(&path, depth + 1, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Reads the header of every file below `dir` and groups the CT slices into series.
/// Fails only when `dir` cannot be listed.
pub fn scan_folder(dir: &Path) -> Result<FolderScan> {
    let mut files = Vec::new();
    list_files(dir, 0, &mut files)?;
    files.sort();
    let headers: Vec<(PathBuf, Option<Result<SliceHeader>>)> = files
        .into_par_iter()
        .map(|p| {
            let h = has_dicom_magic(&p).then(|| SliceHeader::read(&p));
            (p, h)
        })
        .collect();
    let mut scan = FolderScan::default();
    let mut groups: BTreeMap<String, Vec<SliceHeader>> = BTreeMap::new();
    for (path, header) in headers {
        let name = path.display();
        match header {
            None => scan.notes.push(format!(
                "{name}: not a DICOM file (no DICM marker), skipped"
            )),
            Some(Err(e)) => scan.failures.push((path, e)),
            Some(Ok(h)) if h.sop_class_uid == MEDIA_DIRECTORY_STORAGE => scan.notes.push(format!(
                "{name}: a DICOMDIR (directory index), skipped; the images are found by \
                 reading the folder"
            )),
            Some(Ok(h)) if !h.has_image() => scan.notes.push(format!(
                "{name}: holds no image (SOP class {}), skipped",
                h.sop_class_uid
            )),
            Some(Ok(h)) => match h.series_instance_uid.clone() {
                Some(uid) => groups.entry(uid).or_default().push(h),
                None => scan.failures.push((
                    path.clone(),
                    anyhow!("{name}: SeriesInstanceUID (0020,000E) is missing"),
                )),
            },
        }
    }
    for (uid, headers) in groups {
        sort_series(&mut scan, uid, headers);
    }
    Ok(scan)
}

/// Keeps a group as a CT series, or notes or fails it with the reason.
fn sort_series(scan: &mut FolderScan, uid: String, headers: Vec<SliceHeader>) {
    let first = &headers[0];
    let count = headers.len();
    let modality = first.modality.clone().unwrap_or_default();
    if modality != "CT" {
        let shown = if modality.is_empty() {
            "no Modality".to_string()
        } else {
            format!("modality {modality}")
        };
        scan.notes.push(format!(
            "series {uid} ({count} file(s), e.g. {}): {shown}; only CT series are read, skipped",
            first.path.display()
        ));
        return;
    }
    if let Some(h) = headers
        .iter()
        .find(|h| MULTIFRAME_CT_STORAGE.contains(&h.sop_class_uid.as_str()) || h.frames > 1)
    {
        scan.failures.push((
            h.path.clone(),
            anyhow!(
                "{}: a multi-frame (enhanced) CT image with {} frame(s); only single-frame CT \
                 Image Storage series are read (export the series as one file per slice)",
                h.path.display(),
                h.frames
            ),
        ));
        return;
    }
    let (images, others): (Vec<SliceHeader>, Vec<SliceHeader>) = headers
        .into_iter()
        .partition(|h| h.sop_class_uid == CT_IMAGE_STORAGE);
    for h in &others {
        scan.notes.push(format!(
            "{}: not a CT image slice (SOP class {}; e.g. a dose report or secondary \
             capture), skipped",
            h.path.display(),
            h.sop_class_uid
        ));
    }
    let Some(first) = images.first() else {
        return;
    };
    let folder = first
        .path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let tags = SeriesTags {
        series_instance_uid: uid,
        series_number: first.series_number,
        series_description: first.series_description.clone(),
        study_instance_uid: first.study_instance_uid.clone(),
        modality: first.modality.clone(),
        manufacturer: first.manufacturer.clone(),
    };
    scan.series.push(DicomSeries {
        folder,
        name: preferred_name(&tags),
        tags,
        headers: images,
    });
}

/// Letters, digits, `-`, `_` and `.` kept; runs of anything else become one `_`; no leading
/// or trailing `_` or `.`; at most 64 characters.
pub fn sanitise(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '-' | '.') {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    let trimmed: String = out
        .trim_matches(|c| c == '_' || c == '.')
        .chars()
        .take(64)
        .collect();
    trimmed.trim_end_matches(['_', '.']).to_string()
}

/// `S<number>_<description>` (or `S<number>`) when the series has a number, else its UID.
fn preferred_name(tags: &SeriesTags) -> String {
    let name = match (tags.series_number, &tags.series_description) {
        (Some(n), Some(d)) => sanitise(&format!("S{n}_{d}")),
        (Some(n), None) => format!("S{n}"),
        (None, _) => String::new(),
    };
    if name.is_empty() {
        uid_name(tags)
    } else {
        name
    }
}

fn uid_name(tags: &SeriesTags) -> String {
    let name = sanitise(&tags.series_instance_uid);
    if name.is_empty() {
        "series".to_string()
    } else {
        name
    }
}

/// Gives every series whose name another one shares (over all scanned folders) its
/// SeriesInstanceUID as name instead, then numbers any names still shared (`_2`, `_3`, …),
/// so that no two series write the same output files.
pub fn make_names_unique(series: &mut [DicomSeries]) {
    let count = |series: &[DicomSeries]| {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for s in series {
            *counts.entry(s.name.clone()).or_default() += 1;
        }
        counts
    };
    let counts = count(series);
    for s in series.iter_mut() {
        if counts[&s.name] > 1 {
            s.name = uid_name(&s.tags);
        }
    }
    let counts = count(series);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for s in series.iter_mut() {
        if counts[&s.name] > 1 {
            let k = seen.entry(s.name.clone()).or_default();
            *k += 1;
            if *k > 1 {
                s.name = format!("{}_{k}", s.name);
            }
        }
    }
}
