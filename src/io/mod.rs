//! File formats: NIfTI volumes (read, validate, orient, write) and safetensors weights and tensors.

pub mod checkpoint;
pub mod nifti;
pub mod weights;

pub use self::nifti::{
    read_volume, write_label_map, write_nifti, AffineSource, Orientation, Volume, VoxelData,
};
