//! Fuzz target: the training manifest CSV parser (the bytes are written to a temporary file).
#![no_main]

use libfuzzer_sys::fuzz_target;
use m2unet::data::dataset::read_manifest;
use std::io::Write;

fuzz_target!(|data: &[u8]| {
    let mut file = tempfile::Builder::new()
        .suffix(".csv")
        .tempfile()
        .expect("temporary file");
    file.write_all(data).expect("write the manifest");
    let name = file.path().display().to_string();
    match read_manifest(file.path()) {
        Ok(rows) => assert!(!rows.is_empty(), "an accepted manifest has rows"),
        Err(e) => assert!(
            format!("{e:#}").contains(&name),
            "error without the file name: {e:#}"
        ),
    }
});
