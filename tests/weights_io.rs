//! Weights files: round trips in f32/f16/bf16, config inference, and clear errors on bad files.

use m2unet::config::{GcpMode, ModelConfig};
use m2unet::io::weights::{load_model, model_tensors, save_model, Tensor, TensorFile, WeightDtype};
use m2unet::model::Model;

fn tiny() -> Model {
    Model::init(
        ModelConfig {
            gcp: GcpMode::Max,
            ..ModelConfig::tiny()
        },
        3,
    )
}

#[test]
fn f32_round_trip_is_exact_and_keeps_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let mut model = tiny();
    model
        .buffers
        .iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = i as f32 * 0.25);
    model.batches_tracked[4] = 17;
    save_model(&model, &path, WeightDtype::F32).unwrap();
    let back = load_model(&path).unwrap();
    assert_eq!(back.config(), model.config());
    assert_eq!(back.params, model.params);
    assert_eq!(back.buffers, model.buffers);
    assert_eq!(back.batches_tracked, model.batches_tracked);
    println!(
        "f32 round trip: 0 differences over {} params",
        model.params.len()
    );
}

/// Largest |a − b| / max(|a|, 1e-3) over two parameter vectors.
fn max_rel_err(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) / x.abs().max(1e-3)).abs())
        .fold(0f32, f32::max)
}

#[test]
fn f16_and_bf16_files_load_within_their_precision() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny();
    let path = dir.path().join("h.safetensors");
    save_model(&model, &path, WeightDtype::F16).unwrap();
    let back = load_model(&path).unwrap();
    let err = max_rel_err(&model.params, &back.params);
    println!("f16 max relative error {err:e}");
    assert!(err < 1e-3 && err > 0.0);
    // bf16: re-encode the f32 state_dict by hand, truncating mantissas.
    let file = model_tensors(&model, WeightDtype::F32);
    let mut views = vec![];
    let encoded: Vec<(String, Vec<usize>, Vec<u8>, bool)> = file
        .tensors
        .iter()
        .map(|(n, t)| match t {
            Tensor::F32 { shape, data } => (
                n.clone(),
                shape.clone(),
                data.iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                true,
            ),
            Tensor::I64 { shape, data } => (
                n.clone(),
                shape.clone(),
                data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                false,
            ),
            Tensor::F16 { .. } => unreachable!(),
        })
        .collect();
    for (n, s, b, is_float) in &encoded {
        let dt = if *is_float {
            safetensors::Dtype::BF16
        } else {
            safetensors::Dtype::I64
        };
        views.push((
            n.clone(),
            safetensors::tensor::TensorView::new(dt, s.clone(), b).unwrap(),
        ));
    }
    let path = dir.path().join("b.safetensors");
    safetensors::serialize_to_file(views, &None, &path).unwrap();
    let back = load_model(&path).unwrap();
    let err = max_rel_err(&model.params, &back.params);
    println!("bf16 max relative error {err:e}");
    assert!(err < 8e-3 && err > 0.0);
}

fn expect_error(file: &TensorFile, needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    file.write(&path).unwrap();
    let msg = format!("{:#}", load_model(&path).unwrap_err());
    println!("error: {msg}");
    assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
    assert!(
        msg.contains("bad.safetensors"),
        "{msg:?} should name the file"
    );
}

#[test]
fn missing_unexpected_misshapen_and_mistyped_tensors_are_named() {
    let good = model_tensors(&tiny(), WeightDtype::F32);
    let mut f = good.clone();
    f.tensors.remove("dec3.conv2.bias");
    expect_error(&f, "dec3.conv2.bias");
    let mut f = good.clone();
    f.tensors
        .insert("enc9.conv1.weight".into(), Tensor::scalar(1.0));
    expect_error(&f, "enc9.conv1.weight");
    let mut f = good.clone();
    f.tensors
        .insert("dec2.bn1.weight".into(), Tensor::f32(&[3], vec![1.0; 3]));
    expect_error(&f, "dec2.bn1.weight");
    let mut f = good.clone();
    f.tensors
        .insert("enc2.bn2.num_batches_tracked".into(), Tensor::scalar(1.0));
    expect_error(&f, "enc2.bn2.num_batches_tracked");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("text.safetensors");
    std::fs::write(&path, "not a tensor file").unwrap();
    let msg = format!("{:#}", load_model(&path).unwrap_err());
    println!("error: {msg}");
    assert!(msg.contains("text.safetensors") && msg.contains("safetensors"));
}

#[test]
fn config_is_inferred_from_shapes_for_both_presets() {
    for cfg in [ModelConfig::paper(), ModelConfig::tiny()] {
        let file = model_tensors(&Model::init(cfg, 1), WeightDtype::F32);
        let got = m2unet::io::weights::infer_config(&file).unwrap();
        println!("inferred {got:?}");
        assert_eq!(got, cfg);
    }
}

#[test]
fn a_depth3_network_round_trips_and_its_depth_is_inferred() {
    let cfg = ModelConfig {
        depth: 3,
        enc_width: 6,
        bottleneck_width: 10,
        ..ModelConfig::tiny()
    };
    let file = model_tensors(&Model::init(cfg, 2), WeightDtype::F32);
    let got = m2unet::io::weights::infer_config(&file).unwrap();
    println!("inferred {got:?}");
    assert_eq!(got, cfg);
    assert!(file.tensors.contains_key("dec3.conv1.weight"));
    assert!(!file.tensors.contains_key("enc4.conv1.weight"));
}

#[test]
fn non_finite_weights_and_non_positive_variances_are_named() {
    let good = model_tensors(&tiny(), WeightDtype::F32);
    let set = |name: &str, i: usize, v: f32| {
        let mut f = good.clone();
        let Some(Tensor::F32 { data, .. }) = f.tensors.get_mut(name) else {
            panic!("{name} is an f32 tensor");
        };
        data[i] = v;
        f
    };
    expect_error(&set("enc3.conv1.weight", 5, f32::NAN), "enc3.conv1.weight");
    expect_error(&set("classifier.bias", 1, f32::INFINITY), "classifier.bias");
    expect_error(
        &set("dec4.bn2.running_var", 0, -0.5),
        "dec4.bn2.running_var",
    );
    expect_error(
        &set("mil_emb.bn.running_var", 2, 0.0),
        "mil_emb.bn.running_var",
    );
    expect_error(
        &set("enc1.bn1.running_mean", 2, f32::NAN),
        "enc1.bn1.running_mean",
    );
}

#[test]
fn f16_overflow_is_an_error_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half.safetensors");
    let mut model = tiny();
    let r = model.table.range("dec2.conv1.weight");
    model.params[r.start + 3] = 1e6;
    let msg = format!(
        "{:#}",
        save_model(&model, &path, WeightDtype::F16).unwrap_err()
    );
    println!("error: {msg}");
    assert!(msg.contains("dec2.conv1.weight") && msg.contains("half.safetensors"));
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}

#[test]
fn temporaries_of_killed_writers_are_removed_by_the_next_write() {
    // A `.NAME.tmpPID` whose process no longer runs is what a killed writer leaves.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.safetensors");
    let stale = dir.path().join(".w.safetensors.tmp4000000000");
    let other = dir.path().join(".x.safetensors.tmp4000000000");
    std::fs::write(&stale, b"partial").unwrap();
    std::fs::write(&other, b"someone else's").unwrap();
    save_model(&tiny(), &path, WeightDtype::F32).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    println!("after the write: {names:?}");
    assert_eq!(names, [".x.safetensors.tmp4000000000", "w.safetensors"]);
}
