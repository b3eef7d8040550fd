//! Fuzz target: the training manifest CSV parser (the bytes are written to a temporary file).
#![no_main]

use libfuzzer_sys::fuzz_target;
use m2unet::data::dataset::read_manifest;
use std::sync::OnceLock;

static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| tempfile::tempdir().expect("temporary folder"));
    let path = dir.path().join("manifest.csv");
    std::fs::write(&path, data).expect("write the manifest");
    match read_manifest(&path) {
        Ok(rows) => assert!(!rows.is_empty(), "an accepted manifest has rows"),
        Err(e) => assert!(
            format!("{e:#}").contains("manifest.csv"),
            "error without the file name: {e:#}"
        ),
    }
});
