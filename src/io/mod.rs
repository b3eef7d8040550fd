//! File formats: NIfTI volumes (read, validate, orient, write), DICOM CT series (read),
//! safetensors weights and tensors, and the atomic writes they go through.

pub mod atomic;
pub mod checkpoint;
pub mod dicom;
pub mod nifti;
pub mod weights;

pub use self::nifti::{
    read_volume, write_label_map, write_nifti, AffineSource, Orientation, Volume, VoxelData,
};
