//! File formats: NIfTI volumes, safetensors weights and tensors, and the atomic writes they go through.

pub mod atomic;
pub mod checkpoint;
pub mod nifti;
pub mod weights;

pub use self::nifti::{
    read_volume, write_label_map, write_nifti, AffineSource, Orientation, Volume, VoxelData,
};
