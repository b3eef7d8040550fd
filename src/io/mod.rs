//! Volume input and output: NIfTI reading, validation, orientation and writing.

pub mod nifti;

pub use self::nifti::{
    read_volume, write_label_map, write_nifti, AffineSource, Orientation, Volume, VoxelData,
};
