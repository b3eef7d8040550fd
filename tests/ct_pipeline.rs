//! CT pipeline tests: NIfTI geometry and validation, phantoms, preprocessing round trips,
//! dataset bags, and `assess` end to end through a ground-truth oracle engine.

mod cli_common;

use anyhow::{anyhow, Result};
use cli_common::{label_logits, synth_args};
use flate2::read::GzDecoder;
use m2unet::app::assess::{run_with_engine, AssessArgs};
use m2unet::app::synth::{run as run_synth, SynthArgs};
use m2unet::assess::{assess_batch, assess_volume, AssessOptions, LabelScheme};
use m2unet::backend::Backend;
use m2unet::config::ModelConfig;
use m2unet::data::dataset::{
    epoch_order, load_bag, read_manifest, split_by_case, stratified_slices, BagCache, BagConfig,
    Loading, Prefetcher,
};
use m2unet::data::lobe_order::order_lobes_along_z;
use m2unet::data::phantom::{
    case_spec, generate, FieldOfView, FovChoice, Geometry, Phantom, PhantomSpec, StoredDtype,
    SynthOptions, XformKind,
};
use m2unet::data::preprocess::{
    body_mask, keep_largest_components, label_patches, paste_patches, resize_bilinear,
    volume_patches, CanonicalCt, CropBox, PreprocessConfig,
};
use m2unet::engine::{InferenceEngine, LobeScores, Outputs};
use m2unet::io::nifti::{read_volume, write_label_map, write_nifti, VoxelData};
use nifti::NiftiHeader;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

fn spec(
    shape: [usize; 3],
    spacing: [f64; 3],
    orientation: &str,
    dtype: StoredDtype,
    xform: XformKind,
    severe: bool,
) -> PhantomSpec {
    PhantomSpec {
        shape,
        spacing,
        orientation: orientation.to_string(),
        dtype,
        xform,
        noise_hu: 12.0,
        severe,
        fov: FieldOfView::Chest,
        frame: FieldOfView::Chest.frame(),
    }
}

/// The header of a NIfTI file as the `nifti` crate parses it (independent of our reader).
fn crate_header(path: &Path) -> NiftiHeader {
    let raw = std::fs::read(path).unwrap();
    if raw[0] == 0x1f && raw[1] == 0x8b {
        let mut bytes = Vec::new();
        GzDecoder::new(&raw[..]).read_to_end(&mut bytes).unwrap();
        NiftiHeader::from_reader(&bytes[..]).unwrap()
    } else {
        NiftiHeader::from_reader(&raw[..]).unwrap()
    }
}

fn dice(a: &[u8], b: &[u8], label: u8) -> f64 {
    let (mut inter, mut na, mut nb) = (0usize, 0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        na += (x == label) as usize;
        nb += (y == label) as usize;
        inter += (x == label && y == label) as usize;
    }
    2.0 * inter as f64 / (na + nb).max(1) as f64
}

fn canonical_labels(path: &Path) -> Vec<u8> {
    read_volume(path)
        .unwrap()
        .canonical_data()
        .iter()
        .map(|&v| v as u8)
        .collect()
}

#[test]
fn geometry_orientations_dtypes_spacings_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "RAS",
            StoredDtype::Int16,
            XformKind::Both,
            [0.7, 0.7, 2.5],
            0.5f32,
        ),
        (
            "LPS",
            StoredDtype::Float32,
            XformKind::QformOnly,
            [1.2, 0.9, 5.0],
            0.0,
        ),
        (
            "LAS",
            StoredDtype::Uint16,
            XformKind::SformOnly,
            [0.6, 0.6, 1.0],
            0.25,
        ),
        (
            "PSR",
            StoredDtype::Int16,
            XformKind::QformOnly,
            [2.0, 1.5, 3.0],
            0.5,
        ),
    ];
    for (k, (orient, dtype, xform, spacing, tol)) in cases.into_iter().enumerate() {
        let s = spec([64, 56, 40], spacing, orient, dtype, xform, k % 2 == 0);
        let ph = generate(&s, 100 + k as u64);
        let id = format!("g{k}");
        ph.write(dir.path(), &id, 0, k % 2 == 0).unwrap();
        let ext = if k % 2 == 0 { "nii.gz" } else { "nii" };
        let vol = read_volume(&dir.path().join(format!("{id}.{ext}"))).unwrap();
        assert_eq!(vol.orientation.axcodes(), orient);
        assert_eq!(vol.canonical_dims(), [64, 56, 40]);
        let hu = vol.canonical_data();
        let err = hu
            .iter()
            .zip(&ph.hu)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let sp = vol.canonical_spacing();
        let sp_err = (0..3)
            .map(|i| (sp[i] - spacing[i]).abs())
            .fold(0.0, f64::max);
        let mask = canonical_labels(&dir.path().join(format!("{id}_mask.{ext}")));
        let mask_diff = mask.iter().zip(&ph.lobes).filter(|(a, b)| a != b).count();
        println!(
            "{orient} {dtype:?} {xform:?}: max HU error {err} (allowed {tol}), spacing error {sp_err:e}, mask voxels differing {mask_diff}"
        );
        assert!(err <= tol + 1e-3, "HU error {err}");
        assert!(sp_err < 1e-5);
        assert_eq!(mask_diff, 0);
        let (_, affine) = ph.native_geometry().unwrap();
        let aff_err = affine
            .iter()
            .flatten()
            .zip(vol.affine.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        println!("  affine error vs the written geometry {aff_err:e}");
        assert!(aff_err < 1e-4);
        let ct = CanonicalCt::from_volume(&vol);
        let vp = volume_patches(&ct, &PreprocessConfig::new(96));
        let mut back = paste_patches(
            &label_patches(&mask, ct.dims, &vp.slices, 96),
            &vp.slices,
            ct.dims,
            96,
        );
        keep_largest_components(&mut back, ct.dims);
        let dices: Vec<f64> = (1..=5).map(|l| dice(&back, &mask, l)).collect();
        println!("  crop → resize (P = 96) → inverse: Dice per lobe {dices:.4?}");
        assert!(dices.iter().all(|&d| d >= 0.98));
        let written = dir.path().join(format!("{id}_lobes.nii.gz"));
        write_label_map(&written, &vol, &vol.orientation.from_canonical(&back), true).unwrap();
        let (a, b) = (
            crate_header(&dir.path().join(format!("{id}.{ext}"))),
            crate_header(&written),
        );
        assert_eq!(
            (a.dim, a.pixdim, a.srow_x, a.srow_y, a.srow_z),
            (b.dim, b.pixdim, b.srow_x, b.srow_y, b.srow_z)
        );
        assert_eq!(
            (a.quatern_b, a.quatern_c, a.quatern_d),
            (b.quatern_b, b.quatern_c, b.quatern_d)
        );
        assert_eq!(read_volume(&written).unwrap().affine, vol.affine);
    }
}

#[test]
fn crop_resize_inverse_recovers_the_mask_and_label_map_keeps_the_grid() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        [72, 64, 36],
        [0.8, 0.8, 3.0],
        "LPS",
        StoredDtype::Int16,
        XformKind::Both,
        false,
    );
    generate(&s, 7).write(dir.path(), "c", 7, true).unwrap();
    let image = dir.path().join("c.nii.gz");
    let mask_path = dir.path().join("c_mask.nii.gz");
    let vol = read_volume(&image).unwrap();
    let ct = CanonicalCt::from_volume(&vol);
    let truth = canonical_labels(&mask_path);
    for (p, min_dice) in [(128usize, 0.98), (96, 0.98), (32, 0.85)] {
        let cfg = PreprocessConfig::new(p);
        let vp = volume_patches(&ct, &cfg);
        let patches = label_patches(&truth, ct.dims, &vp.slices, p);
        let mut back = paste_patches(&patches, &vp.slices, ct.dims, p);
        keep_largest_components(&mut back, ct.dims);
        let dices: Vec<f64> = (1..=5).map(|l| dice(&back, &truth, l)).collect();
        println!(
            "P = {p}: Dice per lobe after crop → resize → inverse: {dices:.4?} (need ≥ {min_dice})"
        );
        assert!(dices.iter().all(|&d| d >= min_dice));
    }
    let native = vol.orientation.from_canonical(&truth);
    let out = dir.path().join("written_lobes.nii.gz");
    write_label_map(&out, &vol, &native, true).unwrap();
    let (a, b) = (crate_header(&image), crate_header(&out));
    println!(
        "written header: dim {:?} vs {:?}, pixdim {:?} vs {:?}",
        b.dim, a.dim, b.pixdim, a.pixdim
    );
    assert_eq!(a.dim, b.dim);
    assert_eq!(a.pixdim, b.pixdim);
    assert_eq!(
        (a.srow_x, a.srow_y, a.srow_z),
        (b.srow_x, b.srow_y, b.srow_z)
    );
    assert_eq!(
        (
            a.quatern_b,
            a.quatern_c,
            a.quatern_d,
            a.quatern_x,
            a.quatern_y,
            a.quatern_z
        ),
        (
            b.quatern_b,
            b.quatern_c,
            b.quatern_d,
            b.quatern_x,
            b.quatern_y,
            b.quatern_z
        )
    );
    assert_eq!((a.qform_code, a.sform_code), (b.qform_code, b.sform_code));
    assert_eq!(b.datatype, 2);
    let back = read_volume(&out).unwrap();
    let raw_truth = read_volume(&mask_path).unwrap();
    let differing = back
        .data
        .iter()
        .zip(&raw_truth.data)
        .filter(|(a, b)| a != b)
        .count();
    println!("label map re-read on the native grid: {differing} voxels differ from the mask file");
    assert_eq!(differing, 0);
}

#[derive(serde::Deserialize)]
struct Expected {
    note: String,
    affine: Vec<Vec<f64>>,
    axcodes: String,
    canonical_shape: Vec<usize>,
    canonical_data: Vec<f64>,
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/nifti")
        .join(name)
}

#[test]
fn awkward_headers_match_nibabel() {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    let expected: HashMap<String, Expected> = serde_json::from_str(&text).unwrap();
    assert!(expected.len() >= 6);
    for (name, e) in &expected {
        let vol = read_volume(&fixture(name)).unwrap();
        let aff_err = (0..4)
            .flat_map(|r| (0..4).map(move |c| (r, c)))
            .map(|(r, c)| (vol.affine[r][c] - e.affine[r][c]).abs())
            .fold(0.0, f64::max);
        let data = vol.canonical_data();
        let data_err = data
            .iter()
            .zip(&e.canonical_data)
            .map(|(&a, &b)| (a as f64 - b).abs())
            .fold(0.0, f64::max);
        println!(
            "{name} ({}): affine error {aff_err:e}, canonical data error {data_err:e}, axcodes {} vs nibabel {}",
            e.note,
            vol.orientation.axcodes(),
            e.axcodes
        );
        assert!(aff_err < 1e-4);
        assert_eq!(vol.orientation.axcodes(), e.axcodes);
        assert_eq!(vol.canonical_dims().to_vec(), e.canonical_shape);
        assert_eq!(data.len(), e.canonical_data.len());
        assert!(data_err < 1e-3);
        let out = tempfile::tempdir().unwrap();
        let labels_path = out.path().join("labels.nii.gz");
        let labels: Vec<u8> = (0..vol.data.len()).map(|i| (i % 6) as u8).collect();
        write_label_map(&labels_path, &vol, &labels, true).unwrap();
        let (a, b) = (crate_header(&fixture(name)), crate_header(&labels_path));
        assert_eq!(
            (a.dim, a.pixdim, a.qform_code, a.sform_code),
            (b.dim, b.pixdim, b.qform_code, b.sform_code)
        );
        assert_eq!(
            (a.srow_x, a.srow_y, a.srow_z),
            (b.srow_x, b.srow_y, b.srow_z)
        );
        assert_eq!(
            (a.quatern_b, a.quatern_c, a.quatern_d, a.quatern_x),
            (b.quatern_b, b.quatern_c, b.quatern_d, b.quatern_x)
        );
        let back = read_volume(&labels_path).unwrap();
        assert_eq!(back.affine, vol.affine);
        assert!(back.data.iter().zip(&labels).all(|(&x, &l)| x == l as f32));
    }
    for (name, needle) in [
        ("nifti2.nii", "NIfTI-2"),
        ("four_frames_4d.nii.gz", "3 frames"),
    ] {
        let err = read_volume(&fixture(name)).unwrap_err().to_string();
        println!("{name}: {err}");
        assert!(err.contains(needle) && err.contains(name));
    }
}

/// Writes the bad inputs of the issue into `dir` and returns (path, expected message part).
fn bad_inputs(dir: &Path, good_gz: &Path) -> Vec<(PathBuf, &'static str)> {
    let mut out = Vec::new();
    let bytes = std::fs::read(good_gz).unwrap();
    let truncated = dir.join("truncated.nii.gz");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    out.push((truncated, "truncated"));
    let text = dir.join("notes.nii");
    std::fs::write(&text, "patient notes, not an image\n".repeat(30)).unwrap();
    out.push((text, "not a NIfTI file"));
    let mut h = NiftiHeader {
        dim: [3, 32, 32, 8, 1, 1, 1, 1],
        ..NiftiHeader::default()
    };
    h.srow_x = [1.0, 0.0, 0.0, 0.0];
    let hu: Vec<f32> = (0..32 * 32 * 8)
        .map(|i| if i % 3 == 0 { 200.0 } else { -900.0 })
        .collect();
    let mut zero = h.clone();
    zero.pixdim[2] = 0.0;
    let p = dir.join("zero_spacing.nii");
    write_nifti(&p, &zero, VoxelData::F32(&hu), false).unwrap();
    out.push((p, "spacing"));
    let tiny = NiftiHeader {
        dim: [3, 2, 2, 2, 1, 1, 1, 1],
        ..h.clone()
    };
    let p = dir.join("tiny.nii");
    write_nifti(&p, &tiny, VoxelData::F32(&[-900.0; 8]), false).unwrap();
    out.push((p, "too small"));
    let mut nan = hu.clone();
    nan[100] = f32::NAN;
    let p = dir.join("nan.nii.gz");
    write_nifti(&p, &h, VoxelData::F32(&nan), true).unwrap();
    out.push((p, "NaN"));
    out.push((dir.join("missing.nii.gz"), "cannot read"));
    // Raw header edits (little-endian file): dim[0] out of 1..7 or negative, a negative size.
    let plain = dir.join("plain.nii");
    write_nifti(&plain, &h, VoxelData::F32(&hu), false).unwrap();
    let raw = std::fs::read(&plain).unwrap();
    for (file, offset, value, needle) in [
        (
            "dim0_8.nii",
            40,
            8i16,
            "dim[0] = 8 is not a dimension count",
        ),
        (
            "dim0_neg.nii",
            40,
            -3,
            "dim[0] = -3 is not a dimension count",
        ),
        ("dim1_neg.nii", 42, -64, "dim[1] = -64"),
        ("huge.nii", 42, 32767, "more than the"),
    ] {
        let mut b = raw.clone();
        b[offset..offset + 2].copy_from_slice(&value.to_le_bytes());
        if file == "huge.nii" {
            for o in [44, 46] {
                b[o..o + 2].copy_from_slice(&32767i16.to_le_bytes());
            }
        }
        let p = dir.join(file);
        std::fs::write(&p, b).unwrap();
        out.push((p, needle));
    }
    out
}

/// Peak resident memory of this process so far (VmHWM), in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<f64>()
        .unwrap()
        / 1024.0
}

#[test]
fn a_gzip_bomb_is_read_only_up_to_its_declared_size() {
    // A 64×64×32 int16 volume (256 KiB of voxels) followed by 1 GiB of zeros in the gzip
    // stream: the reader must stop inflating at the declared size, so the read is fast and the
    // process's peak memory grows by far less than the stream's inflated size.
    use flate2::{write::GzEncoder, Compression};
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let h = NiftiHeader {
        dim: [3, 64, 64, 32, 1, 1, 1, 1],
        pixdim: [1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.0],
        ..NiftiHeader::default()
    };
    let plain = dir.path().join("plain.nii");
    let hu: Vec<f32> = (0..64 * 64 * 32)
        .map(|i| if i % 5 == 0 { 300.0 } else { -800.0 })
        .collect();
    write_nifti(&plain, &h, VoxelData::F32(&hu), false).unwrap();
    let bomb = dir.path().join("bomb.nii.gz");
    let mut gz = GzEncoder::new(std::fs::File::create(&bomb).unwrap(), Compression::fast());
    gz.write_all(&std::fs::read(&plain).unwrap()).unwrap();
    let zeros = vec![0u8; 1 << 24];
    for _ in 0..64 {
        gz.write_all(&zeros).unwrap();
    }
    gz.finish().unwrap();
    let before = peak_rss_mib();
    let t = std::time::Instant::now();
    let v = read_volume(&bomb).unwrap();
    let (secs, grew) = (t.elapsed().as_secs_f64(), peak_rss_mib() - before);
    println!(
        "bomb of {} KiB compressed, 1 GiB inflated: read in {secs:.3} s, peak memory +{grew:.0} MiB",
        std::fs::metadata(&bomb).unwrap().len() / 1024
    );
    assert_eq!(v.data, hu);
    assert!(secs < 1.0 && grew < 64.0);
}

#[test]
fn bad_inputs_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        [32, 32, 8],
        [1.0, 1.0, 2.0],
        "RAS",
        StoredDtype::Int16,
        XformKind::Both,
        false,
    );
    generate(&s, 1).write(dir.path(), "good", 1, true).unwrap();
    read_volume(&dir.path().join("good.nii.gz")).unwrap();
    for (path, needle) in bad_inputs(dir.path(), &dir.path().join("good.nii.gz")) {
        let err = read_volume(&path).unwrap_err().to_string();
        println!("{}: {err}", path.display());
        assert!(err.contains(needle), "{err} lacks {needle:?}");
        assert!(err.contains(&path.display().to_string()));
    }
}

#[test]
fn phantom_same_seed_same_bytes_and_classes_follow_involvement() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let mut args = SynthArgs {
        uncompressed: false,
        ..synth_args(a.path(), 4, 42, [64, 64, 40])
    };
    run_synth(&args).unwrap();
    args.out = b.path().to_path_buf();
    run_synth(&args).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(a.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 13);
    for n in &names {
        let (x, y) = (
            std::fs::read(a.path().join(n)).unwrap(),
            std::fs::read(b.path().join(n)).unwrap(),
        );
        assert_eq!(x, y, "{n} differs between two runs with the same seed");
    }
    println!(
        "{} files identical between two runs with seed 42",
        names.len()
    );
    args.seed = 43;
    let c = tempfile::tempdir().unwrap();
    args.out = c.path().to_path_buf();
    run_synth(&args).unwrap();
    let differs = std::fs::read(a.path().join("case_0000.nii.gz")).unwrap()
        != std::fs::read(c.path().join("case_0000.nii.gz")).unwrap();
    assert!(differs, "another seed must give another phantom");

    let entries = read_manifest(&a.path().join("manifest.csv")).unwrap();
    let labels: Vec<u8> = entries.iter().map(|e| e.label).collect();
    println!("manifest labels {labels:?}");
    assert!(labels.contains(&0) && labels.contains(&1));
    for e in &entries {
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(a.path().join(format!("{}.json", e.case_id))).unwrap(),
        )
        .unwrap();
        let vol = read_volume(&e.image).unwrap();
        let mask = read_volume(&e.mask).unwrap();
        let (mut lung, mut lesion, mut hu_involved) = (0f64, 0f64, 0f64);
        for lobe in json["lobes"].as_array().unwrap() {
            let label = lobe["label"].as_u64().unwrap() as f32;
            let voxels: Vec<usize> = (0..mask.data.len())
                .filter(|&i| mask.data[i] == label)
                .collect();
            assert_eq!(voxels.len() as u64, lobe["voxels"].as_u64().unwrap());
            let in_window = voxels
                .iter()
                .filter(|&&i| (-750.0..=100.0).contains(&vol.data[i]))
                .count() as f64
                / voxels.len() as f64;
            let truth = lobe["involvement"].as_f64().unwrap();
            println!(
                "  {} lobe {label}: involvement {truth:.3}, HU-window estimate from the image {in_window:.3}",
                e.case_id
            );
            assert!((in_window - truth).abs() < 0.06);
            lung += voxels.len() as f64;
            lesion += lobe["lesion_voxels"].as_f64().unwrap();
            hu_involved += in_window * voxels.len() as f64;
        }
        let total = lesion / lung;
        let grade = match total {
            0.0 => 0,
            t if t < 0.25 => 1,
            t if t < 0.5 => 2,
            t if t < 0.75 => 3,
            _ => 4,
        };
        println!(
            "{}: total {total:.3} (JSON {:.3}, image {:.3}) grade CT-{grade}, label {}",
            e.case_id,
            json["total_involvement"].as_f64().unwrap(),
            hu_involved / lung,
            e.label
        );
        assert!((json["total_involvement"].as_f64().unwrap() - total).abs() < 1e-9);
        assert_eq!(json["ct_grade"].as_u64().unwrap(), grade);
        assert_eq!(e.label, (grade >= 2) as u8);
    }
}

#[test]
fn phantom_lobes_sit_where_anatomy_puts_them_in_world_space() {
    let dir = tempfile::tempdir().unwrap();
    for (k, orient) in ["RAS", "LPS", "LAS"].iter().enumerate() {
        let s = spec(
            [64, 64, 48],
            [0.8, 0.8, 2.5],
            orient,
            StoredDtype::Int16,
            XformKind::SformOnly,
            false,
        );
        let id = format!("w{k}");
        generate(&s, 9 + k as u64)
            .write(dir.path(), &id, 0, true)
            .unwrap();
        let mask_path = dir.path().join(format!("{id}_mask.nii.gz"));
        let h = crate_header(&mask_path);
        let raw = read_volume(&mask_path).unwrap();
        let [nx, ny, _] = raw.dims;
        let mut sum = [[0f64; 3]; 6];
        let mut count = [0f64; 6];
        for (i, &l) in raw.data.iter().enumerate() {
            let idx = [
                (i % nx) as f32,
                ((i / nx) % ny) as f32,
                (i / (nx * ny)) as f32,
            ];
            let l = l as usize;
            for (r, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
                sum[l][r] += (row[0] * idx[0] + row[1] * idx[1] + row[2] * idx[2] + row[3]) as f64;
            }
            count[l] += 1.0;
        }
        let c: Vec<[f64; 3]> = (0..6)
            .map(|l| std::array::from_fn(|r| sum[l][r] / count[l]))
            .collect();
        println!("{orient}: world centroids (mm) LUL {:.1?} LLL {:.1?} RUL {:.1?} RML {:.1?} RLL {:.1?}; volumes {:?}", c[1], c[2], c[3], c[4], c[5], &count[1..]);
        for l in 3..=5 {
            for m in 1..=2 {
                assert!(
                    c[l][0] > 5.0 && c[m][0] < -5.0,
                    "right lobes must lie at +x (RAS)"
                );
            }
        }
        assert!(
            c[3][2] > c[5][2] && c[1][2] > c[2][2],
            "upper lobes above lower lobes"
        );
        assert!(
            c[4][1] > c[5][1] && c[4][1] > c[3][1],
            "the middle lobe is anterior"
        );
        assert!(c[3][2] > c[4][2] && c[4][2] > c[5][2] - 20.0);
        assert!(
            count[1] + count[2] < count[3] + count[4] + count[5],
            "the heart takes room on the left"
        );
    }
}

/// Fissures show in the image as faint sheets along the lobe boundaries of the mask: lung
/// voxels beside another lobe are denser than the rest of the lung, yet (noise-free) stay below
/// the lesion HU window so that they do not count as involvement.
#[test]
fn phantom_fissures_are_visible_on_lobe_boundaries() {
    for (seed, shape) in [(3u64, [80, 80, 48]), (4, [96, 96, 64])] {
        let mut s = spec(
            shape,
            [0.8, 0.8, 2.5],
            "RAS",
            StoredDtype::Float32,
            XformKind::Both,
            false,
        );
        s.noise_hu = 0.0;
        let ph = generate(&s, seed);
        let [nx, ny, nz] = shape;
        let (mut fissure, mut interior) = (Vec::new(), Vec::new());
        for z in 1..nz - 1 {
            for y in 1..ny - 1 {
                for x in 1..nx - 1 {
                    let i = (z * ny + y) * nx + x;
                    let l = ph.lobes[i];
                    if l == 0 || ph.hu[i] > -750.0 {
                        continue; // outside the lung, or a lesion
                    }
                    let other_lobe = [1, nx, nx * ny].iter().any(|&d| {
                        [ph.lobes[i - d], ph.lobes[i + d]]
                            .iter()
                            .any(|&m| m != 0 && m != l)
                    });
                    let near_edge = [1, nx, nx * ny]
                        .iter()
                        .any(|&d| ph.lobes[i - d] == 0 || ph.lobes[i + d] == 0);
                    if other_lobe {
                        fissure.push(ph.hu[i] as f64);
                    } else if !near_edge {
                        interior.push(ph.hu[i] as f64);
                    }
                }
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let in_window = ph
            .hu
            .iter()
            .zip(&ph.lobes)
            .filter(|(&h, &l)| l > 0 && (-750.0..-700.0).contains(&h))
            .count();
        println!(
            "seed {seed} {shape:?}: fissure voxels {} mean {:.1} HU, interior {} mean {:.1} HU, \
             lung voxels in [-750, -700) HU {in_window}",
            fissure.len(),
            mean(&fissure),
            interior.len(),
            mean(&interior)
        );
        assert!(fissure.len() > 100);
        assert!(mean(&fissure) - mean(&interior) > 25.0);
        assert_eq!(in_window, 0, "fissures must stay out of the lesion window");
    }
}

#[test]
fn phantom_128x128x96_is_fast() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        [128, 128, 96],
        [0.8, 0.8, 3.0],
        "LPS",
        StoredDtype::Int16,
        XformKind::Both,
        true,
    );
    let t = Instant::now();
    let ph = generate(&s, 3);
    let gen = t.elapsed().as_secs_f64();
    ph.write(dir.path(), "fast", 3, true).unwrap();
    let total = t.elapsed().as_secs_f64();
    println!(
        "128×128×96 phantom: generate {:.0} ms, generate + write {:.0} ms",
        gen * 1e3,
        total * 1e3
    );
    assert!(total < 2.0, "a 128×128×96 phantom took {total} s");
}

/// Shrinking a slice (a clinical 512-pixel crop to an 80-pixel patch) averages every input
/// pixel: a one-pixel line keeps its mass A / s wherever it lies (plain bilinear sampling
/// would miss most lines at s = 5.6), and a ramp stays the same ramp.
#[test]
fn shrinking_resize_averages_thin_lines_and_keeps_ramps() {
    let (nx, ny, p) = (512usize, 64usize, 80usize);
    let crop = CropBox {
        x0: 20.0,
        y0: 0.0,
        w: 448.0,
        h: 64.0,
    };
    let s = crop.w / p as f64;
    let mut worst = 0f64;
    for x0 in 100..140 {
        let line: Vec<f32> = (0..nx * ny)
            .map(|i| if i % nx == x0 { 70.0 } else { 0.0 })
            .collect();
        let mut out = vec![0f32; p * p];
        resize_bilinear(&line, nx, ny, &crop, p, 0.0, &mut out);
        let mass: f64 = out[40 * p..41 * p].iter().map(|&v| v as f64).sum();
        worst = worst.max((mass - 70.0 / s).abs() / (70.0 / s));
    }
    let ramp: Vec<f32> = (0..nx * ny).map(|i| 0.5 * (i % nx) as f32).collect();
    let mut out = vec![0f32; p * p];
    resize_bilinear(&ramp, nx, ny, &crop, p, 0.0, &mut out);
    let ramp_err = (0..p)
        .map(|u| {
            let x = crop.x0 + (u as f64 + 0.5) * s - 0.5;
            (out[40 * p + u] as f64 - 0.5 * x).abs()
        })
        .fold(0.0, f64::max);
    println!(
        "shrink by {s:.2}: a one-pixel line's mass off by at most {worst:.2e} (relative) over 40 \
         positions; ramp max error {ramp_err:.2e}"
    );
    // The triangle sampled at whole pixels and normalised keeps mass and centroid up to
    // O(1 / s²) (sampling alone would lose whole lines: errors of 100 %).
    let bound = 1.0 / (s * s);
    assert!(worst < bound, "line mass off by {worst}, bound {bound}");
    assert!(ramp_err < 0.5 * bound, "ramp off by {ramp_err} (slope 0.5)");
}

#[test]
fn bilinear_resize_of_a_ramp_is_exact_and_body_mask_fills_holes() {
    let (nx, ny) = (40usize, 30usize);
    let ramp: Vec<f32> = (0..nx * ny)
        .map(|i| 2.0 * (i % nx) as f32 + 3.0 * (i / nx) as f32)
        .collect();
    let crop = CropBox {
        x0: 5.0,
        y0: 4.0,
        w: 20.0,
        h: 16.0,
    };
    let p = 32;
    let mut out = vec![0f32; p * p];
    resize_bilinear(&ramp, nx, ny, &crop, p, 0.0, &mut out);
    let mut err = 0f32;
    for v in 0..p {
        for u in 0..p {
            let x = crop.x0 + (u as f64 + 0.5) * crop.w / p as f64 - 0.5;
            let y = crop.y0 + (v as f64 + 0.5) * crop.h / p as f64 - 0.5;
            err = err.max((out[v * p + u] - (2.0 * x + 3.0 * y) as f32).abs());
        }
    }
    println!("bilinear ramp max error {err:e}");
    assert!(err < 1e-4);

    let (n, r_out, r_in) = (64usize, 25.0f64, 15.0f64);
    let ring: Vec<f32> = (0..n * n)
        .map(|i| {
            let (x, y) = ((i % n) as f64 - 31.5, (i / n) as f64 - 31.5);
            let r = (x * x + y * y).sqrt();
            if r < r_in {
                -900.0
            } else if r < r_out {
                40.0
            } else {
                -1000.0
            }
        })
        .collect();
    let body = body_mask(&ring, n, n, -500.0).unwrap();
    let disc = (0..n * n)
        .filter(|&i| {
            let (x, y) = ((i % n) as f64 - 31.5, (i / n) as f64 - 31.5);
            (x * x + y * y).sqrt() < r_out
        })
        .count();
    println!(
        "filled body {} pixels, disc {disc}, bbox x {}..{}",
        body.pixels, body.xmin, body.xmax
    );
    assert_eq!(body.pixels, disc);
    assert_eq!((body.xmin, body.xmax), (7, 56));
}

/// Naive reference: flood fill every component (6-connectivity) and keep the largest per label.
fn largest_components_reference(labels: &[u8], d: [usize; 3]) -> Vec<u8> {
    let mut comp = vec![usize::MAX; labels.len()];
    let mut sizes: Vec<(u8, usize)> = Vec::new();
    for s in 0..labels.len() {
        if labels[s] == 0 || comp[s] != usize::MAX {
            continue;
        }
        let id = sizes.len();
        let mut stack = vec![s];
        comp[s] = id;
        let mut size = 0;
        while let Some(i) = stack.pop() {
            size += 1;
            let (x, y, z) = (i % d[0], (i / d[0]) % d[1], i / (d[0] * d[1]));
            let mut nb = Vec::new();
            if x > 0 {
                nb.push(i - 1)
            }
            if x + 1 < d[0] {
                nb.push(i + 1)
            }
            if y > 0 {
                nb.push(i - d[0])
            }
            if y + 1 < d[1] {
                nb.push(i + d[0])
            }
            if z > 0 {
                nb.push(i - d[0] * d[1])
            }
            if z + 1 < d[2] {
                nb.push(i + d[0] * d[1])
            }
            for j in nb {
                if labels[j] == labels[s] && comp[j] == usize::MAX {
                    comp[j] = id;
                    stack.push(j);
                }
            }
        }
        sizes.push((labels[s], size));
    }
    let mut best: HashMap<u8, (usize, usize)> = HashMap::new();
    for (id, &(l, size)) in sizes.iter().enumerate() {
        let e = best.entry(l).or_insert((id, size));
        if size > e.1 {
            *e = (id, size);
        }
    }
    labels
        .iter()
        .zip(&comp)
        .map(|(&l, &c)| if l > 0 && best[&l].0 == c { l } else { 0 })
        .collect()
}

#[test]
fn largest_component_per_label_matches_a_naive_flood_fill() {
    let d = [23, 19, 11];
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut total_diff = 0;
    for trial in 0..4 {
        let labels: Vec<u8> = (0..d[0] * d[1] * d[2])
            .map(|_| {
                if rng.gen_bool(0.45) {
                    rng.gen_range(1..=3)
                } else {
                    0
                }
            })
            .collect();
        let expected = largest_components_reference(&labels, d);
        let mut got = labels.clone();
        keep_largest_components(&mut got, d);
        let diff = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
        let kept = got.iter().filter(|&&l| l > 0).count();
        println!("trial {trial}: {diff} voxels differ from the reference ({kept} kept)");
        total_diff += diff;
    }
    assert_eq!(total_diff, 0);
}

/// A test engine whose `segment` answers with the ground-truth labels of each patch (looked up
/// by the patch's exact values), and whose severity logit follows the bag's HU involvement.
/// Patches in `doubt` answer RML where the truth is RUL, but barely (logits 8 against 7.9).
struct OracleEngine {
    config: ModelConfig,
    table: HashMap<Vec<u32>, Vec<u8>>,
    doubt: HashSet<Vec<u32>>,
}

impl OracleEngine {
    fn new(image: &Path, mask: &Path, patch: usize) -> Self {
        let ct = CanonicalCt::from_volume(&read_volume(image).unwrap());
        let cfg = PreprocessConfig::new(patch);
        let vp = volume_patches(&ct, &cfg);
        let truth = canonical_labels(mask);
        let lp = label_patches(&truth, ct.dims, &vp.slices, patch);
        let n = patch * patch;
        let table = vp
            .patches
            .chunks(n)
            .zip(lp.chunks(n))
            .map(|(img, lab)| (img.iter().map(|v| v.to_bits()).collect(), lab.to_vec()))
            .collect();
        OracleEngine {
            config: ModelConfig {
                patch,
                ..ModelConfig::tiny()
            },
            table,
            doubt: HashSet::new(),
        }
    }

    /// The same oracle, in doubt (see [`OracleEngine`]) on the patches of the slices in the
    /// top `fraction` of the RUL's craniocaudal extent.
    fn doubting_upper_rul(image: &Path, mask: &Path, patch: usize, fraction: f64) -> Self {
        let mut oracle = OracleEngine::new(image, mask, patch);
        let ct = CanonicalCt::from_volume(&read_volume(image).unwrap());
        let vp = volume_patches(&ct, &PreprocessConfig::new(patch));
        let truth = canonical_labels(mask);
        let n = ct.dims[0] * ct.dims[1];
        let rul: Vec<usize> = (0..ct.dims[2])
            .filter(|&z| truth[z * n..(z + 1) * n].contains(&3))
            .collect();
        let (lo, hi) = (rul[0] as f64, *rul.last().unwrap() as f64);
        let from = hi - fraction * (hi - lo);
        for (img, s) in vp.patches.chunks(patch * patch).zip(&vp.slices) {
            if s.z as f64 >= from {
                oracle
                    .doubt
                    .insert(img.iter().map(|v| v.to_bits()).collect());
            }
        }
        oracle
    }

    fn lookup(&self, patch: &[f32]) -> Result<&Vec<u8>> {
        let key: Vec<u32> = patch.iter().map(|v| v.to_bits()).collect();
        self.table.get(&key).ok_or_else(|| anyhow!("unknown patch"))
    }
}

impl InferenceEngine for OracleEngine {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn describe(&self) -> String {
        "ground-truth oracle".into()
    }
    fn forward_eval(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Outputs> {
        let n = self.config.patch * self.config.patch;
        let (lo, hi) = ((1024.0 - 750.0) / 1624.0, (1024.0 + 100.0) / 1624.0);
        let mut cls = Vec::new();
        let mut start = 0;
        for &b in bag_sizes {
            let (mut lung, mut involved) = (0usize, 0usize);
            for k in start..start + b {
                let patch = &patches[k * n..(k + 1) * n];
                let labels = self.lookup(patch)?;
                for (&v, &l) in patch.iter().zip(labels) {
                    if l > 0 {
                        lung += 1;
                        involved += (v >= lo && v <= hi) as usize;
                    }
                }
            }
            start += b;
            cls.extend([0.0, 10.0 * (involved as f32 / lung.max(1) as f32 - 0.25)]);
        }
        Ok(Outputs {
            seg_logits: Vec::new(),
            cls_logits: cls,
        })
    }
    fn classify(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Vec<f32>> {
        Ok(self.forward_eval(patches, bag_sizes)?.cls_logits)
    }
    fn segment(&mut self, patches: &[f32], patch: usize, costs: bool) -> Result<LobeScores> {
        let (n, classes) = (patch * patch, self.config.seg_classes);
        let mut out = Vec::with_capacity(patches.len() * classes);
        for patch in patches.chunks(n) {
            let labels = self.lookup(patch)?;
            let mut logits = label_logits(labels, classes, n);
            if self
                .doubt
                .contains(&patch.iter().map(|v| v.to_bits()).collect::<Vec<u32>>())
            {
                for (px, _) in labels.iter().enumerate().filter(|(_, &l)| l == 3) {
                    logits[3 * n + px] = 7.9;
                    logits[4 * n + px] = 8.0;
                }
            }
            out.extend(logits);
        }
        Ok(LobeScores::from_logits(&out, classes, n, costs))
    }
}

#[test]
fn lobe_order_follows_the_network_probabilities_not_the_label_count() {
    // The oracle answers RML, barely (logits 8 against 7.9), for the true RUL in the upper 60 %
    // of the RUL's slices, and is sure of every other label. A column then meets sure RUL below
    // doubtful RML: out of lobe order. The most probable ordered labelling relabels the doubtful
    // voxels (cost ≈ 0.1 nat each) rather than the sure RUL below them (≈ 8 nats each), even in
    // the columns where the doubtful voxels outnumber the sure ones, where relabelling the fewest
    // voxels would have turned the sure RUL into RML. Independent truth: the phantom's mask, and
    // the same assessment with `--no-lobe-order`, which shows where the doubt fell.
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        [80, 72, 40],
        [0.9, 0.9, 4.0],
        "PSR",
        StoredDtype::Int16,
        XformKind::QformOnly,
        true,
    );
    let ph: Phantom = generate(&s, 23);
    ph.write(dir.path(), "case", 23, true).unwrap();
    let image = dir.path().join("case.nii.gz");
    let mask = dir.path().join("case_mask.nii.gz");
    let mut engine = OracleEngine::doubting_upper_rul(&image, &mask, 64, 0.6);
    let mut lobes = Vec::new();
    for order_lobes in [true, false] {
        let out_dir = dir.path().join(format!("out_{order_lobes}"));
        std::fs::create_dir_all(&out_dir).unwrap();
        let opts = AssessOptions {
            out_dir: Some(out_dir.clone()),
            order_lobes,
            ..AssessOptions::default()
        };
        assess_volume(&mut engine, &image, &opts).unwrap();
        lobes.push(canonical_labels(&out_dir.join("case_lobes.nii.gz")));
    }
    let (ordered, raw) = (&lobes[0], &lobes[1]);
    let truth = canonical_labels(&mask);
    let dims = read_volume(&mask).unwrap().canonical_dims();
    let n = dims[0] * dims[1];
    let (mut doubtful, mut restored, mut outnumbered, mut outnumbered_restored) = (0, 0, 0, 0);
    for c in 0..n {
        let at = |z: usize| c + z * n;
        // The doubtful voxels of this column, and the sure RUL below the lowest of them.
        let band: Vec<usize> = (0..dims[2])
            .filter(|&z| truth[at(z)] == 3 && raw[at(z)] == 4)
            .collect();
        let Some(&lowest) = band.first() else {
            continue;
        };
        let sure = (0..lowest).filter(|&z| raw[at(z)] == 3).count();
        if sure == 0 {
            continue; // Doubtful RML on top of RML or RLL only is in lobe order: nothing to fix.
        }
        let fixed = band.iter().filter(|&&z| ordered[at(z)] == 3).count();
        doubtful += band.len();
        restored += fixed;
        if band.len() > sure {
            outnumbered += band.len();
            outnumbered_restored += fixed;
        }
    }
    let rul = |l: &[u8]| dice(l, &truth, 3);
    println!(
        "doubtful RML voxels above sure RUL: {restored} of {doubtful} relabelled RUL; where they outnumber the sure RUL: {outnumbered_restored} of {outnumbered}; RUL Dice {:.4} (without the lobe-order step {:.4})",
        rul(ordered),
        rul(raw)
    );
    assert!(outnumbered > 0 && doubtful > outnumbered);
    assert!(restored as f64 >= 0.99 * doubtful as f64);
    assert!(outnumbered_restored as f64 >= 0.99 * outnumbered as f64);
    assert!(rul(ordered) > rul(raw));
}

#[test]
fn assess_with_a_ground_truth_oracle_reproduces_the_lobes_on_the_input_grid() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let s = spec(
        [80, 72, 40],
        [0.9, 0.9, 4.0],
        "PSR",
        StoredDtype::Uint16,
        XformKind::QformOnly,
        true,
    );
    let ph: Phantom = generate(&s, 21);
    let truth = ph.write(dir.path(), "case", 21, true).unwrap();
    let image = dir.path().join("case.nii.gz");
    let mask = dir.path().join("case_mask.nii.gz");
    let mut engine = OracleEngine::new(&image, &mask, 64);
    let opts = AssessOptions {
        out_dir: Some(out_dir.clone()),
        batch_size: 5,
        max_bag: 12,
        preview: true,
        ..AssessOptions::default()
    };
    assess_volume(&mut engine, &image, &opts).unwrap();
    let written = read_volume(&out_dir.join("case_lobes.nii.gz")).unwrap();
    let gt = read_volume(&mask).unwrap();
    assert_eq!(written.dims, gt.dims);
    assert_eq!(written.affine, gt.affine);
    let (a, b) = (
        crate_header(&out_dir.join("case_lobes.nii.gz")),
        crate_header(&image),
    );
    assert_eq!((a.dim, a.pixdim), (b.dim, b.pixdim));
    let w: Vec<u8> = written.data.iter().map(|&v| v as u8).collect();
    let g: Vec<u8> = gt.data.iter().map(|&v| v as u8).collect();
    let dices: Vec<f64> = (1..=5).map(|l| dice(&w, &g, l)).collect();
    println!("assess through the oracle: Dice per lobe {dices:.4?}");
    assert!(dices.iter().all(|&d| d >= 0.95));

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("case_report.json")).unwrap())
            .unwrap();
    assert_eq!(json["input"].as_str().unwrap(), image.display().to_string());
    let prob = json["severity"]["probability"].as_f64().unwrap();
    let logits = &json["severity"]["logits"];
    let diff = logits[1].as_f64().unwrap() - logits[0].as_f64().unwrap();
    let expected_prob = 1.0 / (1.0 + (-diff).exp());
    println!(
        "severity p = {prob:.4} (sigmoid of the logit difference {expected_prob:.4}), class {}, truth severe = {}",
        json["severity"]["class"], truth.severe
    );
    assert!((prob - expected_prob).abs() < 1e-6);
    assert_eq!(
        json["severity"]["class"].as_str().unwrap(),
        if truth.severe { "severe" } else { "non-severe" }
    );
    let voxel_ml = 0.9 * 0.9 * 4.0 / 1000.0;
    let hu = read_volume(&image).unwrap().data;
    for (l, lobe) in json["lobes"].as_array().unwrap().iter().enumerate() {
        let label = l as u8 + 1;
        let idx: Vec<usize> = (0..w.len()).filter(|&i| w[i] == label).collect();
        let mean_hu = idx.iter().map(|&i| hu[i] as f64).sum::<f64>() / idx.len() as f64;
        let vol_ml = idx.len() as f64 * voxel_ml;
        let inv = lobe["involvement"].as_f64().unwrap();
        println!(
            "  {} label {}: volume {:.2} mL (counted {vol_ml:.2}), mean HU {:.1} (counted {mean_hu:.1}), involvement {inv:.3} (truth {:.3})",
            lobe["name"], lobe["label"], lobe["volume_ml"].as_f64().unwrap(), lobe["mean_hu"].as_f64().unwrap(), truth.lobes[l].involvement
        );
        assert_eq!(lobe["label"].as_u64().unwrap(), label as u64);
        assert!((lobe["volume_ml"].as_f64().unwrap() - vol_ml).abs() < 1e-6 * vol_ml.max(1.0));
        assert!((lobe["mean_hu"].as_f64().unwrap() - mean_hu).abs() < 0.01);
        assert!((inv - truth.lobes[l].involvement).abs() < 0.06);
    }
    for key in ["timings_ms", "device", "model", "version", "patches"] {
        assert!(!json[key].is_null(), "report lacks {key}");
    }
    assert!(json["patches"]["bag"].as_u64().unwrap() <= 12);
    let png = std::fs::File::open(out_dir.join("case_preview.png")).unwrap();
    let info = png::Decoder::new(std::io::BufReader::new(png))
        .read_info()
        .unwrap()
        .info()
        .clone();
    println!("preview {}×{}", info.width, info.height);
    assert_eq!(info.width as usize, 4 * 80);
    let leftovers: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let totalseg = AssessOptions {
        label_scheme: LabelScheme::Totalseg,
        preview: false,
        ..opts
    };
    assess_volume(&mut engine, &image, &totalseg).unwrap();
    let ts = read_volume(&out_dir.join("case_lobes.nii.gz")).unwrap();
    let mismatched = ts
        .data
        .iter()
        .zip(&written.data)
        .filter(|(&t, &l)| t != if l > 0.0 { l + 9.0 } else { 0.0 })
        .count();
    println!("totalseg scheme: {mismatched} voxels not at lungmask label + 9");
    assert_eq!(mismatched, 0);
}

#[test]
fn assess_batch_reports_failures_writes_nothing_for_them_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let s = spec(
        [48, 48, 12],
        [1.0, 1.0, 3.0],
        "LAS",
        StoredDtype::Float32,
        XformKind::Both,
        false,
    );
    generate(&s, 4).write(dir.path(), "good", 4, true).unwrap();
    let good = dir.path().join("good.nii.gz");
    let mut engine = OracleEngine::new(&good, &dir.path().join("good_mask.nii.gz"), 32);
    let bad = bad_inputs(dir.path(), &good);
    let mut files: Vec<PathBuf> = bad.iter().map(|(p, _)| p.clone()).collect();
    files.insert(2, good.clone());
    let opts = AssessOptions {
        out_dir: Some(out_dir.clone()),
        ..AssessOptions::default()
    };
    let results = assess_batch(&mut engine, &files, &opts, false);
    assert_eq!(results.len(), files.len());
    for (path, result) in &results {
        match result {
            Ok(r) => {
                println!("{}: ok, {}", path.display(), r.severity.class);
                assert_eq!(path, &good);
            }
            Err(e) => {
                let needle = bad.iter().find(|(p, _)| p == path).unwrap().1;
                println!("{}: {e}", path.display());
                assert!(e.to_string().contains(needle));
            }
        }
    }
    let mut names: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    println!("output folder: {names:?}");
    assert_eq!(names, ["good_lobes.nii.gz", "good_report.json"]);
}

#[test]
fn dataset_bags_are_stratified_seeded_prefetched_and_split_by_patient() {
    let dir = tempfile::tempdir().unwrap();
    let args = synth_args(dir.path(), 6, 11, [48, 48, 32]);
    run_synth(&args).unwrap();
    let manifest = dir.path().join("manifest.csv");
    let mut text = std::fs::read_to_string(&manifest).unwrap();
    text.push_str("case_0000.nii,case_0000_mask.nii,");
    let first_label = read_manifest(&manifest).unwrap()[0].label;
    text.push_str(&format!("{first_label},case_0000\n"));
    std::fs::write(&manifest, text).unwrap();
    let entries = read_manifest(&manifest).unwrap();
    assert_eq!(entries.len(), 7);

    let (train, val) = split_by_case(&entries, 0.34, 3);
    let train_ids: Vec<&str> = train.iter().map(|e| e.case_id.as_str()).collect();
    let overlap = val
        .iter()
        .filter(|e| train_ids.contains(&e.case_id.as_str()))
        .count();
    let val_labels: Vec<u8> = val.iter().map(|e| e.label).collect();
    println!(
        "split: {} train rows, {} validation rows {val_labels:?}, {overlap} case ids on both sides",
        train.len(),
        val.len()
    );
    assert_eq!(overlap, 0);
    assert_eq!(train.len() + val.len(), entries.len());
    assert!(val_labels.contains(&0) && val_labels.contains(&1));

    let lung: Vec<usize> = (10..30).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for n in [4usize, 8, 20, 30] {
        let picks = stratified_slices(&lung, n, &mut rng);
        for (k, &z) in picks.iter().enumerate() {
            let pos = z - 10;
            let (lo, hi) = (k * lung.len() / n, ((k + 1) * lung.len()).div_ceil(n));
            assert!(
                pos >= lo && pos < hi.max(lo + 1),
                "pick {k} of {n} at {pos} outside [{lo}, {hi})"
            );
        }
        println!("n = {n}: stratified picks {picks:?}");
    }

    let cfg = BagConfig {
        bag_size: 6,
        preprocess: PreprocessConfig::new(32),
    };
    let order = epoch_order(entries.len(), 5, 2);
    let direct: Vec<_> = order
        .iter()
        .map(|&i| load_bag(&entries[i], i, &cfg, 5, 2, None).unwrap())
        .collect();
    // The slice cache: a pass that fills it, one that reads every bag from it, and one with
    // room for only some cases give the bags read from disk.
    let full = Arc::new(BagCache::new(1 << 30));
    let fetch = |workers: usize, cache: Option<&Arc<BagCache>>| -> Vec<_> {
        let loading = Loading {
            workers,
            depth: 2,
            cache: cache.cloned(),
        };
        Prefetcher::start(entries.clone(), cfg, 5, 2, loading)
            .map(|b| b.unwrap())
            .collect()
    };
    for (workers, cache) in [(1, None), (3, None), (2, Some(&full)), (3, Some(&full))] {
        let fetched = fetch(workers, cache);
        assert_eq!(fetched, direct, "prefetch with {workers} workers differs");
    }
    let partial = Arc::new(BagCache::new(full.used() / 2));
    assert_eq!(fetch(1, Some(&partial)), direct, "a partial cache differs");
    println!(
        "bag cache: {} bytes for all {} cases, {} within half that budget; bags equal those read from disk",
        full.used(),
        entries.len(),
        partial.used()
    );
    assert!(partial.used() > 0 && partial.used() < full.used());
    let lo = (1024.0 - 300.0) / 1624.0;
    for bag in &direct {
        assert_eq!(bag.patches.len(), 6 * 32 * 32);
        let mask = read_volume(
            &entries
                .iter()
                .find(|e| e.case_id == bag.case_id)
                .unwrap()
                .mask,
        )
        .unwrap();
        let nz = mask.canonical_dims()[2];
        let lung_z: Vec<usize> = {
            let c = mask.canonical_data();
            let n = c.len() / nz;
            (0..nz)
                .filter(|&z| c[z * n..(z + 1) * n].iter().any(|&v| v > 0.0))
                .collect()
        };
        assert!(bag.slices.iter().all(|z| lung_z.contains(z)));
        assert!(bag.slices.windows(2).all(|w| w[0] <= w[1]));
        let lobe_px: Vec<f32> = bag
            .patches
            .iter()
            .zip(&bag.masks)
            .filter(|(_, &m)| m > 0)
            .map(|(&v, _)| v)
            .collect();
        let dark = lobe_px.iter().filter(|&&v| v < lo).count() as f64 / lobe_px.len() as f64;
        println!(
            "bag {} (label {}): slices {:?}, {:.3} of lobe pixels below −300 HU",
            bag.case_id, bag.label, bag.slices, dark
        );
        if bag.label == 0 {
            assert!(dark > 0.7, "image and mask patches are misaligned");
        }
    }
}

/// Naive reference of the body mask: pixel flood fills (8-connected body, 4-connected
/// background from the border), first largest component in raster order.
fn body_mask_reference(
    slice: &[f32],
    nx: usize,
    ny: usize,
    thr: f32,
) -> Option<(Vec<bool>, [usize; 4])> {
    let fg: Vec<bool> = slice.iter().map(|&v| v > thr).collect();
    let mut comp = vec![0usize; nx * ny];
    let (mut best, mut best_size, mut next) = (0, 0, 0);
    for s in 0..nx * ny {
        if !fg[s] || comp[s] != 0 {
            continue;
        }
        next += 1;
        comp[s] = next;
        let mut stack = vec![s];
        let mut size = 0;
        while let Some(p) = stack.pop() {
            size += 1;
            let (x, y) = ((p % nx) as i64, (p / nx) as i64);
            for dy in -1..=1 {
                for dx in -1..=1 {
                    let (qx, qy) = (x + dx, y + dy);
                    if qx >= 0 && qy >= 0 && qx < nx as i64 && qy < ny as i64 {
                        let q = qy as usize * nx + qx as usize;
                        if fg[q] && comp[q] == 0 {
                            comp[q] = next;
                            stack.push(q);
                        }
                    }
                }
            }
        }
        if size > best_size {
            (best, best_size) = (next, size);
        }
    }
    if best_size == 0 {
        return None;
    }
    let body: Vec<bool> = comp.iter().map(|&c| c == best).collect();
    let mut bbox = [nx, 0, ny, 0];
    for (p, _) in body.iter().enumerate().filter(|(_, &b)| b) {
        let (x, y) = (p % nx, p / nx);
        bbox = [
            bbox[0].min(x),
            bbox[1].max(x),
            bbox[2].min(y),
            bbox[3].max(y),
        ];
    }
    let mut outside = vec![false; nx * ny];
    let mut stack: Vec<usize> = (0..nx * ny)
        .filter(|&p| {
            let (x, y) = (p % nx, p / nx);
            (x == 0 || y == 0 || x == nx - 1 || y == ny - 1) && !body[p]
        })
        .collect();
    for &p in &stack {
        outside[p] = true;
    }
    while let Some(p) = stack.pop() {
        let (x, y) = (p % nx, p / nx);
        let mut nb = Vec::new();
        if x > 0 {
            nb.push(p - 1)
        }
        if x + 1 < nx {
            nb.push(p + 1)
        }
        if y > 0 {
            nb.push(p - nx)
        }
        if y + 1 < ny {
            nb.push(p + nx)
        }
        for q in nb {
            if !body[q] && !outside[q] {
                outside[q] = true;
                stack.push(q);
            }
        }
    }
    Some((outside.iter().map(|o| !o).collect(), bbox))
}

#[test]
fn body_mask_matches_a_naive_flood_fill_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let (nx, ny) = (57usize, 43usize);
    let mut differing = 0;
    for trial in 0..30 {
        let mut img = vec![-1000f32; nx * ny];
        for _ in 0..rng.gen_range(1..6) {
            let (cx, cy) = (rng.gen_range(0.0..nx as f64), rng.gen_range(0.0..ny as f64));
            let (ro, ri) = (rng.gen_range(3.0..20.0), rng.gen_range(0.0..10.0));
            for (p, v) in img.iter_mut().enumerate() {
                let r = (((p % nx) as f64 - cx).powi(2) + ((p / nx) as f64 - cy).powi(2)).sqrt();
                if r < ro && r >= ri {
                    *v = 40.0;
                }
            }
        }
        for v in img.iter_mut() {
            if rng.gen_bool(0.08) {
                *v = if *v > 0.0 { -900.0 } else { 100.0 };
            }
        }
        let got = body_mask(&img, nx, ny, -500.0);
        let want = body_mask_reference(&img, nx, ny, -500.0);
        match (got, want) {
            (Some(g), Some((mask, bbox))) => {
                let diff = g.mask.iter().zip(&mask).filter(|(a, b)| a != b).count();
                assert_eq!([g.xmin, g.xmax, g.ymin, g.ymax], bbox, "trial {trial}");
                assert_eq!(g.pixels, mask.iter().filter(|&&m| m).count());
                differing += diff;
            }
            (g, w) => panic!("trial {trial}: {:?} vs {:?}", g.is_some(), w.is_some()),
        }
    }
    println!("body mask vs naive flood fill over 30 random slices: {differing} pixels differ");
    assert_eq!(differing, 0);
}

#[test]
fn run_assess_expands_folders_and_its_status_says_whether_all_succeeded() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let s = spec(
        [48, 40, 12],
        [1.0, 1.0, 3.0],
        "LPS",
        StoredDtype::Int16,
        XformKind::Both,
        true,
    );
    generate(&s, 8).write(&input, "good", 8, true).unwrap();
    let good = input.join("good.nii.gz");
    let mask = input.join("good_mask.nii.gz");
    let args = |inputs: Vec<PathBuf>, out: Option<PathBuf>, force: bool| AssessArgs {
        inputs,
        weights: None,
        out,
        device: Backend::Cpu,
        batch_size: 4,
        max_bag: 8,
        preview: false,
        quiet: true,
        force,
        label_scheme: LabelScheme::Lungmask,
        no_lobe_order: false,
    };
    let run_assess = |args: &AssessArgs| {
        run_with_engine(args, &mut OracleEngine::new(&good, &mask, 32), "oracle")
    };
    let all_ok = run_assess(&args(vec![input.clone()], None, false)).unwrap();
    let mut beside: Vec<String> = std::fs::read_dir(&input)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    beside.sort();
    println!("folder input, outputs beside it: status {all_ok}, folder now {beside:?}");
    assert!(all_ok);
    assert!(beside.contains(&"good_lobes.nii.gz".to_string()));
    assert!(!beside.iter().any(|n| n.starts_with("good_mask_")));

    let byte = NiftiHeader {
        dim: [3, 32, 32, 8, 1, 1, 1, 1],
        ..NiftiHeader::default()
    };
    let values: Vec<u8> = (0..32 * 32 * 8).map(|i| (i % 251) as u8).collect();
    let not_hu = input.join("photo.nii");
    write_nifti(&not_hu, &byte, VoxelData::U8(&values), false).unwrap();
    std::fs::write(input.join("broken.nii"), b"not an image at all").unwrap();
    let out = dir.path().join("out");
    let all_ok = run_assess(&args(vec![input.clone()], Some(out.clone()), false)).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    println!("folder with a non-HU and a broken file: status {all_ok}, outputs {names:?}");
    assert!(!all_ok);
    assert_eq!(names, ["good_lobes.nii.gz", "good_report.json"]);
    let mut engine = OracleEngine::new(&good, &mask, 32);
    let err = assess_volume(&mut engine, &not_hu, &AssessOptions::default()).unwrap_err();
    println!("non-HU volume: {err}");
    assert!(err.to_string().contains("Hounsfield") && err.to_string().contains("--force"));
    let status = run_assess(&args(
        vec![dir.path().join("empty_dir_missing")],
        Some(out),
        false,
    ))
    .unwrap();
    assert!(!status, "a missing input must fail the run");
}

#[test]
fn synth_command_line_writes_a_set_and_rejects_bad_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_m2unet");
    let run = std::process::Command::new(bin)
        .args(["synth", "--out"])
        .arg(dir.path())
        .args([
            "--count", "2", "--seed", "3", "--shape", "48,48,24", "--dtype", "uint16",
        ])
        .output()
        .unwrap();
    println!(
        "synth: status {:?}, stderr {:?}",
        run.status,
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success());
    let rows = read_manifest(&dir.path().join("manifest.csv")).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().any(|r| r.label == 0) && rows.iter().any(|r| r.label == 1));
    for r in &rows {
        assert_eq!(read_volume(&r.image).unwrap().dtype, "uint16");
    }
    let bad = std::process::Command::new(bin)
        .args(["synth", "--out"])
        .arg(dir.path().join("x"))
        .args(["--shape", "2,2"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    println!("bad --shape: status {:?}, stderr {stderr}", bad.status);
    assert!(!bad.status.success() && stderr.contains("--shape"));
    assert!(!dir.path().join("x").exists());
    // The clinical geometry draws shape and spacing itself.
    let clash = std::process::Command::new(bin)
        .args(["synth", "--out"])
        .arg(dir.path().join("y"))
        .args(["--geometry", "clinical", "--spacing", "1,1,1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&clash.stderr);
    println!(
        "--geometry clinical with --spacing: status {:?}, stderr {stderr}",
        clash.status
    );
    assert!(!clash.status.success() && stderr.contains("--spacing"));
    assert!(!dir.path().join("y").exists());
}

#[test]
fn drawn_spacings_keep_an_adult_chest_size_on_large_grids() {
    // The anatomy fills the grid, so the drawn spacing of a clinical-size grid must keep the
    // field of view ≤ 400 mm and the head-to-foot extent ≤ 300 mm (else a 512×512×300 phantom
    // has 750 mm lungs and ~21 L of lung); small grids keep the drawn ranges (0.6–1 mm, 1–5 mm).
    for shape in [
        [512, 512, 300],
        [512, 512, 600],
        [384, 512, 120],
        [80, 80, 48],
    ] {
        for i in 0..8 {
            let opts = SynthOptions {
                seed: 4242,
                shape: Some(shape),
                ..SynthOptions::default()
            };
            let s = case_spec(&opts, i, i % 2 == 0).unwrap().spacing;
            let fov = (0..2).map(|j| s[j] * shape[j] as f64).fold(0.0, f64::max);
            let height = s[2] * shape[2] as f64;
            if i == 0 {
                println!("{shape:?}: spacing {s:.3?} mm, field of view {fov:.0} mm, height {height:.0} mm");
            }
            assert!(fov <= 400.0 + 1e-9 && height <= 300.0 + 1e-9);
            assert!(s[0] < 1.0 && s[2] < 5.0 && s[0] > 0.0 && s[2] > 0.0);
            if shape == [80, 80, 48] {
                assert!(
                    s[0] >= 0.6 && s[2] >= 1.0,
                    "small grids keep the drawn spacing"
                );
            }
        }
    }
}

#[test]
fn clinical_geometry_draws_scanner_grids_at_physical_scale() {
    // The drawn grids cover what chest scanners acquire: 384/512/768 matrices, 0.5–1 mm pixels,
    // reconstructed slice thicknesses, at most 600 slices (100–600 for thin chest slices).
    let draw = |fov, i| {
        let opts = SynthOptions {
            seed: 77,
            fov,
            geometry: Geometry::Clinical,
            ..SynthOptions::default()
        };
        case_spec(&opts, i, i % 2 == 0).unwrap()
    };
    let specs: Vec<PhantomSpec> = (0..200).map(|i| draw(Some(FovChoice::Mixed), i)).collect();
    let thick = [0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0];
    for s in &specs {
        assert!([384, 512, 768].contains(&s.shape[0]) && s.shape[0] == s.shape[1]);
        assert!((0.5..=1.0).contains(&s.spacing[0]), "{:?}", s.spacing);
        assert!(thick.contains(&s.spacing[2]) && s.shape[2] <= 600);
        if s.fov == FieldOfView::Chest && s.spacing[2] <= 1.25 {
            assert!(s.shape[2] >= 100, "{:?}", s.shape);
        }
    }
    let slices: Vec<usize> = specs.iter().map(|s| s.shape[2]).collect();
    println!(
        "200 drawn clinical grids: {} of 384, {} of 512, {} of 768 pixels; {}–{} slices",
        specs.iter().filter(|s| s.shape[0] == 384).count(),
        specs.iter().filter(|s| s.shape[0] == 512).count(),
        specs.iter().filter(|s| s.shape[0] == 768).count(),
        slices.iter().min().unwrap(),
        slices.iter().max().unwrap()
    );

    // Physical scale: the same case on grids of a quarter and an eighth of the resolution (the
    // same frame, so the same patch of anatomy) holds the same lobes, in mL.
    let spec = draw(None, 3);
    let coarse = |f: usize| PhantomSpec {
        shape: [
            spec.shape[0] / f,
            spec.shape[1] / f,
            spec.shape[2].div_ceil(f),
        ],
        spacing: [
            spec.spacing[0] * f as f64,
            spec.spacing[1] * f as f64,
            spec.spacing[2] * spec.shape[2] as f64 / spec.shape[2].div_ceil(f) as f64,
        ],
        ..spec.clone()
    };
    let volumes = |s: &PhantomSpec| -> [f64; 5] {
        let ph = generate(s, 5);
        let ml = s.spacing.iter().product::<f64>() / 1000.0;
        ph.counts.map(|(v, _)| v as f64 * ml)
    };
    // Coarse grids keep this test's memory small (other tests in this binary measure theirs).
    let (fine, coarser) = (volumes(&coarse(4)), volumes(&coarse(8)));
    let total: f64 = fine.iter().sum();
    let worst = (0..5)
        .map(|l| (fine[l] - coarser[l]).abs() / fine[l])
        .fold(0.0, f64::max);
    println!(
        "{:?} at {:.2?} mm: lobes {fine:.0?} mL on a quarter of its resolution, {coarser:.0?} mL \
         on an eighth (worst lobe differs by {:.1} %); RML {:.1} % of {total:.0} mL",
        spec.shape,
        spec.spacing,
        100.0 * worst,
        100.0 * fine[3] / total
    );
    assert!(worst < 0.03, "lobe volumes depend on the grid: {worst}");
    assert!((3000.0..9000.0).contains(&total) && (0.04..0.15).contains(&(fine[3] / total)));

    // The field of view is wider than the body, and the table lies under the back: the grid's
    // outer rows and columns hold no body at the lungs' level, and a couch at 250 HU lies
    // below the body in every slice.
    let spec = coarse(4);
    let ph = generate(&spec, 5);
    let [nx, ny, nz] = spec.shape;
    let z = nz / 2;
    let slice = &ph.hu[z * nx * ny..(z + 1) * nx * ny];
    let body = |x: usize, y: usize| slice[y * nx + x] > -500.0 && slice[y * nx + x] < 200.0;
    let edge_body = (0..nx)
        .flat_map(|x| [(x, 0), (x, ny - 1)])
        .chain((0..ny).flat_map(|y| [(0, y), (nx - 1, y)]))
        .filter(|&(x, y)| body(x, y))
        .count();
    let lowest_body = (0..ny).find(|&y| (0..nx).any(|x| body(x, y))).unwrap();
    let table_rows: Vec<usize> = (0..lowest_body)
        .filter(|&y| (0..nx).filter(|&x| slice[y * nx + x] > 150.0).count() > nx / 2)
        .collect();
    println!(
        "mid slice: {edge_body} body pixels on the grid's edge; the body's lowest row {lowest_body}, \
         table rows {table_rows:?}"
    );
    assert_eq!(edge_body, 0);
    assert!(!table_rows.is_empty() && *table_rows.last().unwrap() + 1 < lowest_body);
}

#[test]
fn lobe_scores_are_the_argmax_and_the_quantised_negative_log_softmax() {
    // Independent truth: argmax and −ln softmax in f64 of random logits [m, 6, hw], some of
    // them far apart (costs past the u8 range saturate at 255/16 nat).
    let (m, classes, hw) = (3, 6, 7);
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let logits: Vec<f32> = (0..m * classes * hw)
        .map(|i| rng.gen_range(-6.0..6.0f32) * if i % 11 == 0 { 5.0 } else { 1.0 })
        .collect();
    let mut scores = LobeScores::from_logits(&logits[..classes * hw], classes, hw, true);
    scores.append(LobeScores::from_logits(
        &logits[classes * hw..],
        classes,
        hw,
        true,
    ));
    assert!(scores.has_costs());
    let (mut worst, mut saturated) = (0f64, 0);
    for i in 0..m {
        for px in 0..hw {
            let l = |k: usize| logits[(i * classes + k) * hw + px] as f64;
            let best = (1..classes).fold(0, |b, k| if l(k) > l(b) { k } else { b });
            assert_eq!(scores.labels[i * hw + px] as usize, best);
            let lse = (0..classes).map(|k| l(k).exp()).sum::<f64>().ln();
            for lobe in 1..=5u8 {
                let want = (lse - l(lobe as usize)).min(255.0 / 16.0);
                let got = scores.cost(i * hw + px, lobe) as f64;
                saturated += (want == 255.0 / 16.0) as usize;
                worst = worst.max((got - want).abs());
            }
        }
    }
    println!("lobe costs vs f64 −ln softmax: worst |error| {worst:.4} nat (bound 1/32 + 1e-4), {saturated} saturated");
    assert!(worst <= 1.0 / 32.0 + 1e-4);
    assert!(saturated > 0);
}

#[test]
fn lobe_order_along_z_is_the_least_cost_ordered_column() {
    // Independent truth: every ordered sequence of each lung's lobes along a short column
    // (left: LLL 2 below LUL 1; right: RLL 5 below RML 4 below RUL 3), enumerated by its cut
    // points, and the least total cost any of them has, each voxel with its own random cost
    // per lobe. Background stays as it is, and each voxel stays in its lung.
    fn least(column: &[u8], costs: &[[f32; 6]], order: &[u8]) -> f32 {
        let lung: Vec<usize> = (0..column.len())
            .filter(|&z| order.contains(&column[z]))
            .collect();
        let n = lung.len();
        let mut best = f32::INFINITY;
        for a in 0..=n {
            for b in a..=n {
                let total: f32 = (0..n)
                    .map(|i| {
                        let state = [0, 1, 2][(i >= a) as usize + (i >= b) as usize];
                        costs[lung[i]][order[state.min(order.len() - 1)] as usize]
                    })
                    .sum();
                best = best.min(total);
            }
        }
        best
    }
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let (mut changed_total, mut worst) = (0, 0f32);
    for case in 0..400 {
        let nz = 1 + case % 9;
        // Each voxel's label is its cheapest class (0 background), as the argmax of the
        // network's probabilities is.
        let costs: Vec<[f32; 6]> = (0..nz)
            .map(|_| std::array::from_fn(|_| rng.gen_range(0.0..4.0f32)))
            .collect();
        let column: Vec<u8> = costs
            .iter()
            .map(|c| (0..6).min_by(|&a, &b| c[a].total_cmp(&c[b])).unwrap() as u8)
            .collect();
        let want = least(&column, &costs, &[2, 1]) + least(&column, &costs, &[5, 4, 3]);
        // The same column as a 1×1×nz volume.
        let mut labels = column.clone();
        order_lobes_along_z(&mut labels, [1, 1, nz], |x, y, z, lobe| {
            assert_eq!((x, y), (0, 0));
            costs[z][lobe as usize]
        });
        for order in [[2u8, 1, 1], [5, 4, 3]] {
            let ranks: Vec<usize> = labels
                .iter()
                .filter_map(|l| order.iter().position(|o| o == l))
                .collect();
            assert!(
                ranks.windows(2).all(|w| w[0] <= w[1]),
                "{column:?} → {labels:?} is not in lobe order"
            );
        }
        let side = |l: u8| [0, 1, 1, 2, 2, 2][l as usize];
        assert!((0..nz).all(|z| side(column[z]) == side(labels[z])));
        let got: f32 = (0..nz)
            .filter(|&z| labels[z] > 0)
            .map(|z| costs[z][labels[z] as usize])
            .sum();
        worst = worst.max((got - want).abs());
        assert!(
            (got - want).abs() <= 1e-4,
            "{column:?} → {labels:?}: {got} vs {want}"
        );
        changed_total += (0..nz).filter(|&z| labels[z] != column[z]).count();
    }
    println!(
        "400 random columns with random lobe costs: each ordered at the least cost (worst |Δ| \
         {worst:.1e}; {changed_total} voxels relabelled in all)"
    );
}
