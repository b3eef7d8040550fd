//! Helpers shared by the tests that run the `m2unet` binary or its commands: running it, its
//! stderr, a folder's entries, a synthetic phantom set with tiny weights beside it, `synth`'s
//! arguments, and a small training set.
#![allow(dead_code)]

use m2unet::app::synth::{run as run_synth, SynthArgs};
use m2unet::data::phantom::Geometry;
use m2unet::engine::LobeScores;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `m2unet` with `args` in the current folder.
pub fn m2unet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_m2unet"))
        .args(args)
        .output()
        .expect("run m2unet")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The names in a folder (hidden ones included), sorted.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `count` seeded 64×64×24 phantoms in `d/ph` and freshly initialised tiny weights in
/// `d/w.safetensors`; returns (phantom folder, weights).
pub fn phantoms_and_tiny_weights(d: &Path, count: usize, seed: u64) -> (PathBuf, PathBuf) {
    let ph = d.join("ph");
    let (count, seed) = (count.to_string(), seed.to_string());
    let o = m2unet(&[
        "synth",
        "--out",
        ph.to_str().unwrap(),
        "--count",
        &count,
        "--seed",
        &seed,
        "--shape",
        "64,64,24",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let w = d.join("w.safetensors");
    let o = m2unet(&["init", "--out", w.to_str().unwrap(), "--preset", "tiny"]);
    assert!(o.status.success(), "{}", stderr(&o));
    (ph, w)
}

/// `synth`'s arguments for `count` seeded phantoms of `shape` written uncompressed into `out`,
/// everything else drawn per case.
pub fn synth_args(out: &Path, count: usize, seed: u64, shape: [usize; 3]) -> SynthArgs {
    SynthArgs {
        out: out.to_path_buf(),
        count,
        seed,
        shape: Some(shape),
        spacing: None,
        orientation: None,
        dtype: None,
        noise: None,
        uncompressed: true,
        overwrite: false,
        fov: None,
        geometry: Geometry::Fill,
    }
}

/// `count` seeded 48×48×24 phantoms (uncompressed) in `dir`, as a training set; its manifest.
pub fn training_set(dir: &Path, count: usize, seed: u64) -> PathBuf {
    run_synth(&synth_args(dir, count, seed, [48, 48, 24])).unwrap();
    dir.join("manifest.csv")
}

/// Seg logits [M, classes, hw] whose argmax is `labels` [M, hw]: 8 on the label, 0 elsewhere,
/// as a test engine sure of its labels returns them.
pub fn label_logits(labels: &[u8], classes: usize, hw: usize) -> Vec<f32> {
    let mut logits = vec![0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        logits[(i / hw * classes + l as usize) * hw + i % hw] = 8.0;
    }
    logits
}

/// What `segment` of a test engine sure of `labels` [M, hw] returns (see [`label_logits`]).
pub fn label_scores(labels: &[u8], classes: usize, hw: usize, costs: bool) -> LobeScores {
    LobeScores::from_logits(&label_logits(labels, classes, hw), classes, hw, costs)
}
