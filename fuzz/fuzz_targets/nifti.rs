//! Fuzz target: the NIfTI-1 reader (`.nii` and `.nii.gz` bytes) and the canonical view of what it accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use m2unet::io::nifti::read_volume_from;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.nii.gz");
    match read_volume_from(path, data) {
        Ok(volume) => {
            let n = volume.dims.iter().product::<usize>();
            assert_eq!(volume.data.len(), n, "voxel count differs from the dims");
            assert_eq!(volume.canonical_data().len(), n);
            assert!(volume.voxel_ml().is_finite());
            let _ = volume.hu_range_problem();
        }
        Err(e) => assert!(
            format!("{e:#}").contains("fuzz.nii.gz"),
            "error without the file name: {e:#}"
        ),
    }
});
