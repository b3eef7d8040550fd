//! Fuzz target: the safetensors reader and the M²UNet state_dict loader on arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use m2unet::io::weights::load_model_bytes;

fuzz_target!(|data: &[u8]| {
    match load_model_bytes(data, "fuzz.safetensors") {
        Ok(model) => {
            assert_eq!(model.params.len(), model.table.n_params);
            assert!(model.params.iter().all(|v| v.is_finite()));
        }
        Err(e) => assert!(
            format!("{e:#}").contains("fuzz.safetensors"),
            "error without the file name: {e:#}"
        ),
    }
});
