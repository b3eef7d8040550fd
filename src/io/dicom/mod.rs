//! DICOM CT series through the dicom-rs crates: find the series in a folder tree and read each into the same [`Volume`](crate::io::nifti::Volume) the NIfTI reader makes.

mod geometry;
mod header;
mod scan;
mod volume;

pub use header::{has_dicom_magic, SliceHeader};
pub use scan::{make_names_unique, sanitise, scan_folder, DicomSeries, FolderScan, SeriesTags};
pub use volume::{read_series, read_slice, SeriesInfo, SeriesVolume, SliceImage};
