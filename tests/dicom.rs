//! DICOM series in: a phantom written as DICOM by pydicom (tools/make_dicom_fixtures.py) against the NIfTI path of the same phantom, a real CT slice against pydicom's HU, bad inputs, and `assess`/`convert` on series.

use m2unet::ct_input::{collect_ct_inputs, CtInput};
use m2unet::io::dicom::{make_names_unique, read_series, read_slice, sanitise, scan_folder};
use m2unet::io::dicom::{DicomSeries, SeriesVolume};
use m2unet::io::nifti::{read_volume, AffineSource, Volume};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

mod cli_common;
use cli_common::{m2unet, names, stderr};
use std::sync::OnceLock;

struct Fixtures {
    phantom: PathBuf,
    manifest: Value,
}

/// A phantom from `m2unet synth` and the DICOM series the script writes from it, made once
/// per test run (pydicom and numpy from tools/install_test_python.sh).
fn fixtures() -> &'static Fixtures {
    static F: OnceLock<Fixtures> = OnceLock::new();
    F.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dicom_fixtures");
        let _ = std::fs::remove_dir_all(&root);
        let ph = root.join("phantom");
        let o = m2unet(&[
            "synth",
            "--out",
            ph.to_str().unwrap(),
            "--count",
            "1",
            "--seed",
            "7",
            "--shape",
            "48,40,12",
            "--spacing",
            "0.9,0.8,2.5",
            "--orientation",
            "LPS",
            "--dtype",
            "int16",
            "--uncompressed",
        ]);
        assert!(o.status.success(), "synth failed: {}", stderr(&o));
        let phantom = ph.join("case_0000.nii");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = root.join("dicom");
        let o = Command::new("python3")
            .env("PYTHONPATH", repo.join(".pydicom"))
            .arg(repo.join("tools/make_dicom_fixtures.py"))
            .args(["--nifti", phantom.to_str().unwrap(), "--out"])
            .arg(&out)
            .output()
            .expect("run python3");
        assert!(
            o.status.success(),
            "tools/make_dicom_fixtures.py failed (are pydicom and numpy installed? run \
             tools/install_test_python.sh): {}",
            stderr(&o)
        );
        println!("{}", String::from_utf8_lossy(&o.stdout));
        let manifest: Value =
            serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
        Fixtures { phantom, manifest }
    })
}

fn affine_of(v: &Value) -> [[f64; 4]; 4] {
    std::array::from_fn(|r| std::array::from_fn(|c| v[r][c].as_f64().unwrap()))
}

fn max_diff(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> f64 {
    (0..4)
        .flat_map(|r| (0..4).map(move |c| (a[r][c] - b[r][c]).abs()))
        .fold(0.0, f64::max)
}

/// The only series of a folder (no failures, no notes).
fn only_series(folder: &Path) -> DicomSeries {
    let scan = scan_folder(folder).unwrap();
    assert!(
        scan.failures.is_empty() && scan.notes.is_empty(),
        "{:?} {:?}",
        scan.failures,
        scan.notes
    );
    assert_eq!(scan.series.len(), 1);
    scan.series.into_iter().next().unwrap()
}

fn bad_case(name: &str) -> (&'static Value, PathBuf) {
    let case = &fixtures().manifest["bad"][name];
    (case, PathBuf::from(case["folder"].as_str().unwrap()))
}

fn read_bad(name: &str) -> (&'static Value, anyhow::Result<SeriesVolume>) {
    let (case, folder) = bad_case(name);
    let series = only_series(&folder);
    let result = read_series(&series);
    match &result {
        Ok(sv) => println!("{name}: read, warnings {:?}", sv.warnings),
        Err(e) => println!("{name}: {e:#}"),
    }
    (case, result)
}

fn file(case: &Value, key: &str) -> String {
    case[key].as_str().unwrap().to_string()
}

#[test]
fn phantom_series_equal_the_nifti_path_voxel_for_voxel_and_affine_for_affine() {
    let f = fixtures();
    let nifti = read_volume(&f.phantom).unwrap();
    let n_canon = nifti.canonical_data();
    let mut checked = 0;
    for view in f.manifest["views"].as_array().unwrap() {
        let name = view["name"].as_str().unwrap();
        let tilt = view["tilt_degrees"].as_f64().unwrap();
        let series = only_series(Path::new(view["folder"].as_str().unwrap()));
        let result = read_series(&series);
        if tilt > 2.0 {
            let e = format!("{:#}", result.unwrap_err());
            println!("{name}: refused: {e}");
            assert!(e.contains("gantry tilt") && e.contains(&format!("{tilt:.1}°")));
            continue;
        }
        let sv = result.unwrap();
        let v = &sv.volume;
        let d_script = max_diff(&v.affine, &affine_of(&view["affine"]));
        // The canonical affine of the series is the phantom's, turned by the script's world
        // rotation (identity unless oblique); a tilt shears only the slice axis.
        let r = &view["world_rotation"];
        let nc = nifti.canonical_affine();
        let mut want = nc;
        for row in 0..3 {
            for col in 0..4 {
                want[row][col] = (0..3)
                    .map(|k| r[row][k].as_f64().unwrap() * nc[k][col])
                    .sum();
            }
        }
        let got = v.canonical_affine();
        let d_nifti = if tilt > 0.0 {
            (0..3)
                .flat_map(|row| [0, 1, 3].map(|col| (got[row][col] - want[row][col]).abs()))
                .fold(0.0, f64::max)
        } else {
            max_diff(&got, &want)
        };
        let canon = v.canonical_data();
        let voxel_diffs = canon.iter().zip(&n_canon).filter(|(a, b)| a != b).count();
        println!(
            "{name} ({}): native {:?} {} → canonical {:?}; |Δaffine| vs script {d_script:.2e}, \
             vs phantom NIfTI {d_nifti:.2e}; {voxel_diffs} of {} voxels differ; warnings {:?}",
            sv.info.transfer_syntaxes.join(", "),
            v.dims,
            v.orientation.axcodes(),
            v.canonical_dims(),
            canon.len(),
            sv.warnings
        );
        assert_eq!(v.canonical_dims(), nifti.canonical_dims(), "{name}");
        assert_eq!(voxel_diffs, 0, "{name}");
        assert!(d_script < 1e-4, "{name}: affine vs script {d_script}");
        assert!(d_nifti < 1e-4, "{name}: affine vs phantom {d_nifti}");
        assert_eq!(v.affine_source, AffineSource::Dicom);
        assert_eq!(sv.info.slices, view["files"].as_u64().unwrap() as usize);
        let tags = &sv.info.tags;
        assert_eq!(tags.series_number, view["series_number"].as_i64());
        assert_eq!(
            tags.series_description.as_deref(),
            view["description"].as_str()
        );
        assert_eq!(tags.modality.as_deref(), Some("CT"));
        let ts = view["transfer_syntax"].as_str().unwrap();
        assert!(sv.info.transfer_syntaxes.iter().all(|s| s.contains(ts)));
        if tilt > 0.0 {
            assert!(sv
                .warnings
                .iter()
                .any(|w| w.contains("gantry tilt of 1.00°")));
        }
        if name == "axial_explicit_le" {
            // Same layout as the phantom: the very Volume the NIfTI reader makes.
            assert_eq!(v.dims, nifti.dims);
            assert_eq!(v.orientation, nifti.orientation);
            assert_eq!(v.data, nifti.data);
            assert!(max_diff(&v.affine, &nifti.affine) < 1e-4);
            assert_eq!(series.name, "S2_Axial_2.5mm");
        }
        checked += 1;
    }
    assert_eq!(checked, 7, "seven readable views");
}

#[test]
fn real_ct_slice_reads_with_pydicoms_hounsfield_units() {
    let real = &fixtures().manifest["ct_small"];
    let want: Vec<f32> = real["hu"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let img = read_slice(Path::new(real["file"].as_str().unwrap())).unwrap();
    let (lo, hi) = img
        .values
        .iter()
        .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    let differ = img.values.iter().zip(&want).filter(|(a, b)| a != b).count();
    println!(
        "CT_small.dcm: {}×{}, HU {lo}…{hi}, {differ} of {} values differ from pydicom's",
        img.rows,
        img.columns,
        want.len()
    );
    assert_eq!((img.rows, img.columns), (128, 128));
    assert_eq!(differ, 0);

    let series = only_series(Path::new(real["series_folder"].as_str().unwrap()));
    let sv = read_series(&series).unwrap();
    let d = max_diff(&sv.volume.affine, &affine_of(&real["affine"]));
    let per_slice_ok = sv.volume.data.chunks(128 * 128).all(|s| s == &want[..]);
    println!(
        "three-slice series from CT_small: dims {:?}, |Δaffine| {d:.2e}, every slice equal: \
         {per_slice_ok}, name {}",
        sv.volume.dims, series.name
    );
    assert_eq!(sv.volume.dims, [128, 128, 3]);
    assert!(per_slice_ok);
    assert!(d < 1e-4);
    assert_eq!(
        sv.info.tags.series_instance_uid,
        real["series_instance_uid"].as_str().unwrap()
    );
    assert_eq!(
        sv.info.tags.manufacturer.as_deref(),
        Some("GE MEDICAL SYSTEMS")
    );
    let json = serde_json::to_string(&sv.info).unwrap();
    for phi in real["phi"].as_array().unwrap() {
        assert!(!json.contains(phi.as_str().unwrap()), "{json}");
    }
}

#[test]
fn a_mixed_folder_gives_each_ct_series_and_names_every_skipped_or_broken_file() {
    let (_, folder) = bad_case("mixed");
    let c = collect_ct_inputs(std::slice::from_ref(&folder));
    for n in &c.notes {
        println!("note: {n}");
    }
    for (p, e) in &c.failures {
        println!("failure {}: {e:#}", p.display());
    }
    let names: Vec<String> = c
        .inputs
        .iter()
        .map(|i| match i {
            CtInput::Dicom(s) => s.name.clone(),
            CtInput::Nifti(p) => panic!("unexpected NIfTI input {}", p.display()),
        })
        .collect();
    println!("series: {names:?}");
    assert_eq!(names, ["S2_Axial_2.5mm", "S3_Axial_implicit"]);
    for input in &c.inputs {
        let loaded = input.read().unwrap();
        assert!(loaded.volume.dims[2] >= 10);
    }
    let has = |needles: &[&str]| {
        c.notes
            .iter()
            .any(|n| needles.iter().all(|s| n.contains(s)))
    };
    assert!(has(&["README.txt", "not a DICOM file"]));
    assert!(has(&["DICOMDIR", "directory index"]));
    assert!(has(&["modality MR", "only CT"]));
    assert_eq!(c.failures.len(), 1);
    let garbage = format!("{:#}", c.failures[0].1);
    assert!(garbage.contains("garbage.dcm") && garbage.contains("not a readable DICOM file"));

    let single = std::fs::read_dir(folder.join("sub"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let c = collect_ct_inputs(std::slice::from_ref(&single));
    let e = format!("{:#}", c.failures[0].1);
    println!("one file: {e}");
    assert!(c.inputs.is_empty());
    assert!(e.contains("a single DICOM file") && e.contains(single.to_str().unwrap()));

    let (_, mr) = bad_case("mr_only");
    let c = collect_ct_inputs(std::slice::from_ref(&mr));
    let e = format!("{:#}", c.failures[0].1);
    println!("MR only: {e}; notes {:?}", c.notes);
    assert!(c.inputs.is_empty() && c.failures.len() == 1);
    assert!(e.contains("no DICOM CT series"));
    assert!(c.notes[0].contains("modality MR"));
}

#[test]
fn bad_series_fail_naming_the_files_and_the_problem() {
    let (case, r) = read_bad("missing_slice");
    let e = format!("{:#}", r.unwrap_err());
    assert!(e.contains(&format!(
        "1 slice(s) missing between {} and {}",
        file(case, "before"),
        file(case, "after")
    )));

    let (case, r) = read_bad("uneven");
    let e = format!("{:#}", r.unwrap_err());
    assert!(e.contains("not evenly spaced"));
    assert!(e.contains(&format!(
        "{} and {} are 3.750 mm apart",
        file(case, "before"),
        file(case, "after")
    )));

    let (case, r) = read_bad("duplicate");
    let e = format!("{:#}", r.unwrap_err());
    let files = &case["files"];
    assert!(e.contains("duplicate slices"));
    assert!(e.contains(files[0].as_str().unwrap()) && e.contains(files[1].as_str().unwrap()));

    let (case, r) = read_bad("exact_copy");
    let sv = r.unwrap();
    assert_eq!(sv.volume.dims[2], 12, "the copy is read once");
    assert!(sv
        .warnings
        .iter()
        .any(|w| w.contains("is a copy of") && w.contains("copy_of_slice")));
    assert!(case["files"][1]
        .as_str()
        .unwrap()
        .ends_with("copy_of_slice"));

    for (name, needles) in [
        ("truncated", vec!["truncated"]),
        ("spacing_mismatch", vec!["PixelSpacing", "[0.5, 0.5]"]),
        ("localizer", vec!["ImageOrientationPatient", "localizer"]),
        (
            "jpeg2000",
            vec!["JPEG 2000", "1.2.840.10008.1.2.4.90", "not supported"],
        ),
    ] {
        let (case, r) = read_bad(name);
        let e = format!("{:#}", r.unwrap_err());
        assert!(e.contains(&file(case, "file")), "{name}: names the file");
        for n in needles {
            assert!(e.contains(n), "{name}: {e:?} should contain {n:?}");
        }
    }
}

#[test]
fn series_names_are_file_safe_and_unique() {
    let cases = [
        (
            "S3_Chest 1.25mm/axial (contrast)",
            "S3_Chest_1.25mm_axial_contrast",
        ),
        ("..S4:*?", "S4"),
        ("1.2.840.113619.2.55.3", "1.2.840.113619.2.55.3"),
    ];
    for (raw, want) in cases {
        let got = sanitise(raw);
        println!("{raw:?} → {got:?}");
        assert_eq!(got, want);
    }
    let (_, folder) = bad_case("mixed");
    let one = only_series(&folder.join("sub"));
    let mut two = one.clone();
    two.folder = PathBuf::from("elsewhere");
    let mut three = one.clone();
    three.tags.series_instance_uid = "1.2.3".into();
    let mut all = vec![one.clone(), two, three];
    make_names_unique(&mut all);
    let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
    let uid = sanitise(&one.tags.series_instance_uid);
    println!("shared name S3_Axial_implicit → {names:?}");
    assert_eq!(
        names,
        [uid.clone(), format!("{uid}_2"), "1.2.3".to_string()]
    );
}

fn contains_no_phi(text: &str) {
    let phi = &fixtures().manifest["phi"];
    for (key, value) in phi.as_object().unwrap() {
        assert!(!text.contains(value.as_str().unwrap()), "{key} leaked");
        assert!(!text.contains(key.as_str()), "{key} named");
    }
    assert!(!text.contains("20240102"), "the study date leaked");
}

#[test]
fn assess_on_dicom_folders_writes_lobes_on_the_series_grid_and_a_report_without_phi() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path().join("w.safetensors");
    let o = m2unet(&["init", "--out", w.to_str().unwrap(), "--preset", "tiny"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let views = &f.manifest["views"];
    let folder = |i: usize| views[i]["folder"].as_str().unwrap().to_string();
    let (axial, oblique) = (folder(0), folder(4));
    let out = dir.path().join("out");
    let o = m2unet(&[
        "assess",
        &axial,
        &oblique,
        "--weights",
        w.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    println!("{}", stderr(&o));
    assert!(o.status.success());
    assert_eq!(
        names(&out),
        [
            "S2_Axial_2.5mm_lobes.nii.gz",
            "S2_Axial_2.5mm_report.json",
            "S6_Oblique_lobes.nii.gz",
            "S6_Oblique_report.json"
        ]
    );
    for (src, name) in [(&axial, "S2_Axial_2.5mm"), (&oblique, "S6_Oblique")] {
        let series = read_series(&only_series(Path::new(src))).unwrap().volume;
        let lobes: Volume = read_volume(&out.join(format!("{name}_lobes.nii.gz"))).unwrap();
        let d = max_diff(&series.affine, &lobes.affine);
        let text = std::fs::read_to_string(out.join(format!("{name}_report.json"))).unwrap();
        let report: Value = serde_json::from_str(&text).unwrap();
        println!(
            "{name}: lobe map {:?} (series {:?}), |Δaffine| {d:.2e}; report dicom {}",
            lobes.dims, series.dims, report["dicom"]
        );
        assert_eq!(lobes.dims, series.dims);
        assert_eq!(lobes.dtype, "uint8");
        assert!(d < 1e-4);
        let tags = &report["dicom"];
        assert_eq!(tags["modality"], "CT");
        assert_eq!(tags["manufacturer"], "m2unet fixtures");
        assert_eq!(tags["name"], name);
        for key in [
            "series_instance_uid",
            "study_instance_uid",
            "series_description",
        ] {
            assert!(tags[key].as_str().is_some_and(|s| !s.is_empty()), "{key}");
        }
        assert!(tags["series_number"].is_i64());
        assert_eq!(report["volume"]["affine_source"], "dicom");
        assert!(report["input"].as_str().unwrap().ends_with(name));
        contains_no_phi(&text);
    }
}

#[test]
fn convert_writes_each_series_as_nifti_that_reads_back_as_the_same_volume() {
    let f = fixtures();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nifti");
    let views = &f.manifest["views"];
    let (implicit, coronal) = (
        views[1]["folder"].as_str().unwrap(),
        views[3]["folder"].as_str().unwrap(),
    );
    let o = m2unet(&["convert", implicit, coronal, "--out", out.to_str().unwrap()]);
    println!("{}", stderr(&o));
    assert!(o.status.success());
    for (src, name) in [(implicit, "S3_Axial_implicit"), (coronal, "S5_Coronal_RLE")] {
        let series = read_series(&only_series(Path::new(src))).unwrap().volume;
        let back = read_volume(&out.join(format!("{name}.nii.gz"))).unwrap();
        let d = max_diff(&series.affine, &back.affine);
        println!(
            "{name}: NIfTI {:?} {} {}, |Δaffine| {d:.2e}",
            back.dims,
            back.dtype,
            back.orientation.axcodes()
        );
        assert_eq!(back.dims, series.dims);
        assert_eq!(back.dtype, "int16");
        assert_eq!(back.data, series.data);
        assert_eq!(back.orientation, series.orientation);
        assert!(d < 1e-4);
        let sidecar = std::fs::read_to_string(out.join(format!("{name}.json"))).unwrap();
        assert!(sidecar.contains("series_instance_uid"));
        contains_no_phi(&sidecar);
    }
    let o = m2unet(&[
        "convert",
        bad_case("mr_only").1.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    println!("{}", stderr(&o));
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no DICOM CT series") && stderr(&o).contains("modality MR"));
}
