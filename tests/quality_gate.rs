//! The lung mask and the quality gate end to end: phantoms (whole, bases only, with abdominal gas, 512×512×300) keep their lungs, lobes and Dice and pass; noise, a constant volume, absurd scaling or spacing and real non-chest CT slices (pydicom-data) fail, with no lobe voxel outside the lung mask.

mod cli_common;

use anyhow::{anyhow, Result};
use cli_common::label_scores;
use m2unet::app::assess::{run_with_engine, AssessArgs};
use m2unet::assess::{assess_volume, AssessOptions, LabelScheme};
use m2unet::backend::{make_engine, Backend};
use m2unet::config::ModelConfig;
use m2unet::data::lung_mask::{
    lung_mask, LungMask, CLOSING_MM, ENVELOPE_MM, LEFT, RIGHT, Z_CLOSING_MM,
};
use m2unet::data::phantom::{generate, FieldOfView, Phantom, PhantomSpec, StoredDtype, XformKind};
use m2unet::data::preprocess::{
    keep_largest_components, label_patches, paste_patches, volume_patches, CanonicalCt,
    PreprocessConfig,
};
use m2unet::engine::{InferenceEngine, LobeScores, Outputs};
use m2unet::io::nifti::{read_volume, write_nifti, VoxelData};
use m2unet::metrics::lobe_dice;
use m2unet::weights_source::WeightsSource;
use nifti::NiftiHeader;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

fn spec(shape: [usize; 3], spacing: [f64; 3], severe: bool) -> PhantomSpec {
    PhantomSpec {
        shape,
        spacing,
        orientation: "LPS".to_string(),
        dtype: StoredDtype::Int16,
        xform: XformKind::Both,
        noise_hu: 15.0,
        severe,
        fov: FieldOfView::Chest,
        frame: FieldOfView::Chest.frame(),
    }
}

/// A phantom the size of an adult chest: 320 mm across, 320 mm tall.
fn adult(severe: bool) -> PhantomSpec {
    spec([160, 160, 80], [2.0, 2.0, 4.0], severe)
}

fn canonical(ph: &Phantom) -> CanonicalCt {
    CanonicalCt {
        dims: ph.spec.shape,
        spacing: ph.spec.spacing,
        hu: ph.hu.clone(),
    }
}

/// Share of each lobe's true voxels inside the lung mask's envelope (where lobes are kept) and
/// inside the mask itself.
fn coverage(mask: &LungMask, truth: &[u8]) -> ([f64; 5], [f64; 5]) {
    let share = |inside: &dyn Fn(usize) -> bool| -> [f64; 5] {
        std::array::from_fn(|l| {
            let lobe: Vec<usize> = (0..truth.len())
                .filter(|&i| truth[i] == l as u8 + 1)
                .collect();
            lobe.iter().filter(|&&i| inside(i)).count() as f64 / lobe.len().max(1) as f64
        })
    };
    (share(&|i| mask.envelope[i]), share(&|i| mask.contains(i)))
}

/// The written lobe map in canonical order.
fn canonical_lobes(path: &Path) -> Vec<u8> {
    let v = read_volume(path).unwrap();
    v.orientation
        .to_canonical(&v.data)
        .iter()
        .map(|&x| x as u8)
        .collect()
}

/// A test engine that answers every patch of a written phantom with its true labels (looked up
/// by the patch's exact values); severity logits favour "severe".
struct Oracle {
    config: ModelConfig,
    table: HashMap<Vec<u32>, Vec<u8>>,
}

impl Oracle {
    fn new(image: &Path, ph: &Phantom, patch: usize) -> Oracle {
        let ct = CanonicalCt::from_volume(&read_volume(image).unwrap());
        let vp = volume_patches(&ct, &PreprocessConfig::new(patch));
        let lp = label_patches(&ph.lobes, ct.dims, &vp.slices, patch);
        let n = patch * patch;
        let table = vp
            .patches
            .chunks(n)
            .zip(lp.chunks(n))
            .map(|(p, l)| (p.iter().map(|v| v.to_bits()).collect(), l.to_vec()))
            .collect();
        Oracle {
            config: ModelConfig {
                patch,
                ..ModelConfig::tiny()
            },
            table,
        }
    }
}

impl InferenceEngine for Oracle {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn describe(&self) -> String {
        "truth oracle".into()
    }
    fn forward_eval(&mut self, _: &[f32], bag_sizes: &[usize]) -> Result<Outputs> {
        Ok(Outputs {
            seg_logits: Vec::new(),
            cls_logits: bag_sizes.iter().flat_map(|_| [0.0, 4.0]).collect(),
        })
    }
    fn classify(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Vec<f32>> {
        Ok(self.forward_eval(patches, bag_sizes)?.cls_logits)
    }
    fn segment(&mut self, patches: &[f32], patch: usize, costs: bool) -> Result<LobeScores> {
        let mut out = Vec::with_capacity(patches.len());
        for p in patches.chunks(patch * patch) {
            let key: Vec<u32> = p.iter().map(|v| v.to_bits()).collect();
            out.extend_from_slice(
                self.table
                    .get(&key)
                    .ok_or_else(|| anyhow!("unknown patch"))?,
            );
        }
        Ok(label_scores(
            &out,
            self.config.seg_classes,
            patch * patch,
            costs,
        ))
    }
}

/// A test engine that paints a lobe on every pixel of every patch (the five lobes in vertical
/// bands), as a network that has never seen the anatomy might, and is sure of "severe".
struct Painter {
    config: ModelConfig,
}

impl Painter {
    fn new() -> Painter {
        Painter {
            config: ModelConfig::tiny(),
        }
    }
}

impl InferenceEngine for Painter {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn describe(&self) -> String {
        "painter".into()
    }
    fn forward_eval(&mut self, _: &[f32], bag_sizes: &[usize]) -> Result<Outputs> {
        Ok(Outputs {
            seg_logits: Vec::new(),
            cls_logits: bag_sizes.iter().flat_map(|_| [0.0, 9.0]).collect(),
        })
    }
    fn classify(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Vec<f32>> {
        Ok(self.forward_eval(patches, bag_sizes)?.cls_logits)
    }
    fn segment(&mut self, patches: &[f32], patch: usize, costs: bool) -> Result<LobeScores> {
        let labels: Vec<u8> = (0..patches.len())
            .map(|i| (i % patch * 5 / patch) as u8 + 1)
            .collect();
        Ok(label_scores(
            &labels,
            self.config.seg_classes,
            patch * patch,
            costs,
        ))
    }
}

fn report_of(dir: &Path, name: &str) -> Value {
    let text = std::fs::read_to_string(dir.join(format!("{name}_report.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `check: measured (result)` for every check of a report.
fn gate_line(report: &Value) -> String {
    report["quality"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let m = c["measured"]
                .as_f64()
                .map_or("-".into(), |v| format!("{v:.4}"));
            format!(
                "{} {m} ({})",
                c["name"].as_str().unwrap(),
                c["result"].as_str().unwrap()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn failed(report: &Value) -> Vec<String> {
    report["quality"]["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

fn args(inputs: Vec<PathBuf>, out: &Path, force: bool) -> AssessArgs {
    AssessArgs {
        inputs,
        weights: None,
        out: Some(out.to_path_buf()),
        device: Backend::Cpu,
        batch_size: 8,
        max_bag: 16,
        preview: false,
        quiet: true,
        force,
        label_scheme: LabelScheme::Lungmask,
        no_lobe_order: false,
    }
}

/// Lobe voxels of the written map (canonical order) outside the envelope of the lung mask
/// computed here on the same input.
fn lobes_outside_mask(lobes: &[u8], mask: &LungMask) -> usize {
    lobes
        .iter()
        .enumerate()
        .filter(|&(i, &l)| l > 0 && !mask.envelope[i])
        .count()
}

#[test]
fn lung_mask_holds_every_lobe_of_phantoms_on_its_side() {
    let cases = [
        ("adult severe", adult(true), 3u64),
        ("adult non-severe", adult(false), 4),
        (
            "80×80×48 severe",
            spec([80, 80, 48], [0.8, 0.8, 2.5], true),
            5,
        ),
        (
            "80×80×48 non-severe",
            spec([80, 80, 48], [0.7, 0.7, 4.0], false),
            6,
        ),
        (
            "48×40×12 severe",
            spec([48, 40, 12], [1.0, 1.0, 3.0], true),
            8,
        ),
    ];
    for (what, s, seed) in cases {
        let ph = generate(&s, seed);
        let t = Instant::now();
        let mask = lung_mask(&canonical(&ph));
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let (cov, tight) = coverage(&mask, &ph.lobes);
        let voxel_ml = s.spacing.iter().product::<f64>() / 1000.0;
        let truth = ph.lobes.iter().filter(|&&l| l > 0).count();
        // Of the true lung voxels in the mask, the share labelled with their own side.
        let on_side = |lobes: std::ops::RangeInclusive<u8>, side: u8| {
            let inside: Vec<usize> = (0..ph.lobes.len())
                .filter(|&i| lobes.contains(&ph.lobes[i]) && mask.contains(i))
                .collect();
            inside.iter().filter(|&&i| mask.labels[i] == side).count() as f64 / inside.len() as f64
        };
        let (right_ok, left_ok) = (on_side(3..=5, RIGHT), on_side(1..=2, LEFT));
        let ratio = mask.voxels() as f64 / truth as f64;
        println!(
            "{what}: lung mask {:.1} mL (truth lobes {:.1} mL, ratio {ratio:.3}), right/left {:.1}/{:.1} mL, \
             share of each lobe in the envelope {cov:.4?} (in the mask {tight:.3?}), truth right lobes on the right {right_ok:.4}, left {left_ok:.4}, \
             airway {} voxels, lung/body {:.3}, {ms:.0} ms",
            mask.voxels() as f64 * voxel_ml,
            truth as f64 * voxel_ml,
            mask.sides[0] as f64 * voxel_ml,
            mask.sides[1] as f64 * voxel_ml,
            mask.airway_voxels,
            mask.lung_body_fraction().unwrap()
        );
        // Clipping a segmentation to the mask removes at most (1 − coverage) of a lobe's true
        // positives: a Dice cost of at most about that.
        assert!(cov.iter().all(|&c| c >= 0.995), "{what}: coverage {cov:?}");
        assert!(right_ok >= 0.99 && left_ok >= 0.99);
        assert!(
            (0.75..1.25).contains(&ratio),
            "{what}: mask / truth {ratio}"
        );
    }
}

#[test]
fn the_lung_mask_of_a_512x512x300_volume_takes_seconds() {
    // A 256×256×150 phantom doubled along every axis (generating 78 M voxels directly takes
    // longer than the mask).
    let s = spec([256, 256, 150], [1.4, 1.4, 2.0], false);
    let ph = generate(&s, 9);
    let [nx, ny, nz] = [512usize, 512, 300];
    let mut hu = vec![0f32; nx * ny * nz];
    for z in 0..nz {
        for y in 0..ny {
            let src = ((z / 2) * 256 + y / 2) * 256;
            for x in 0..nx {
                hu[(z * ny + y) * nx + x] = ph.hu[src + x / 2];
            }
        }
    }
    let ct = CanonicalCt {
        dims: [nx, ny, nz],
        spacing: [0.7, 0.7, 1.0],
        hu,
    };
    let t = Instant::now();
    let mask = lung_mask(&ct);
    let secs = t.elapsed().as_secs_f64();
    let truth = ph.lobes.iter().filter(|&&l| l > 0).count() * 8;
    println!(
        "512×512×300 lung mask: {secs:.2} s on {} threads, {:.0} mL ({} voxels; truth {truth})",
        rayon::current_num_threads(),
        mask.voxels() as f64 * 0.49 / 1000.0,
        mask.voxels()
    );
    assert!((0.95..1.25).contains(&(mask.voxels() as f64 / truth as f64)));
    assert!(secs < 20.0, "the lung mask took {secs} s");
}

/// Dice of the network's segmentation as assess computed it before the lung mask (pasted,
/// largest component per lobe) and as assess writes it now, on phantoms of the size the
/// default weights were trained on.
#[test]
fn the_lung_mask_costs_the_default_network_no_dice() {
    let model = WeightsSource::resolve(None, None).load().unwrap();
    let mut engine = make_engine(model, Backend::Cpu).unwrap();
    let patch = engine.config().patch;
    let dir = tempfile::tempdir().unwrap();
    for (seed, severe) in [(11u64, true), (12, false), (13, true)] {
        let s = spec([80, 80, 48], [0.8, 0.8, 2.5], severe);
        let ph = generate(&s, seed);
        let ct = canonical(&ph);
        let vp = volume_patches(&ct, &PreprocessConfig::new(patch));
        let seg = engine.segment(&vp.patches, patch, false).unwrap().labels;
        let mut before = paste_patches(&seg, &vp.slices, ct.dims, patch);
        keep_largest_components(&mut before, ct.dims);
        let name = format!("case{seed}");
        ph.write(dir.path(), &name, seed, true).unwrap();
        // The lung mask alone: the lobe-order step, which moves voxels between lobes, is
        // measured by `evaluate --no-lobe-order` (weights/MODEL_CARD.md).
        let opts = AssessOptions {
            out_dir: Some(dir.path().join("out")),
            order_lobes: false,
            ..AssessOptions::default()
        };
        std::fs::create_dir_all(dir.path().join("out")).unwrap();
        let report = assess_volume(
            engine.as_mut(),
            &dir.path().join(format!("{name}.nii.gz")),
            &opts,
        )
        .unwrap();
        let after = canonical_lobes(Path::new(&report.outputs.lobes));
        let (d0, d1) = (lobe_dice(&before, &ph.lobes), lobe_dice(&after, &ph.lobes));
        let (m0, m1) = (d0.iter().sum::<f64>() / 5.0, d1.iter().sum::<f64>() / 5.0);
        println!(
            "seed {seed} ({}): mean Dice before {m0:.4} {d0:.4?}, after {m1:.4} {d1:.4?}; \
             lobes {:.1} mL, lung mask {:.1} mL; gate passed {} (warned {:?})",
            if severe { "severe" } else { "non-severe" },
            report.lung_volume_ml,
            report.lung_mask_volume_ml,
            report.quality.passed,
            report.quality.warned
        );
        assert!(m1 >= m0 - 0.005, "seed {seed}: Dice {m0} → {m1}");
        assert!(d1.iter().zip(&d0).all(|(a, b)| *a >= b - 0.005));
        assert!(report.quality.passed && report.severity.reliable);
    }
}

#[test]
fn adult_sized_phantoms_pass_the_gate_whole_and_warn_for_bases_only() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for severe in [false, true] {
        let ph = generate(&adult(severe), 21 + severe as u64);
        let name = format!("whole{}", severe as u8);
        ph.write(dir.path(), &name, 1, true).unwrap();
        let image = dir.path().join(format!("{name}.nii.gz"));
        let mut oracle = Oracle::new(&image, &ph, 64);
        let a = args(vec![image], &out, false);
        let ok = run_with_engine(&a, &mut oracle, "oracle").unwrap();
        let r = report_of(&out, &name);
        println!(
            "adult phantom, severe {severe}: status {ok}, lobes {:.0} mL, mask {:.0} mL; {}",
            r["lung_volume_ml"].as_f64().unwrap(),
            r["lung_mask_volume_ml"].as_f64().unwrap(),
            gate_line(&r)
        );
        assert!(ok && r["quality"]["passed"].as_bool().unwrap());
        assert!(r["severity"]["reliable"].as_bool().unwrap());
        // Consolidation is not air: a severe case's lobes may outgrow the mask by over 25 %.
        let warned = r["quality"]["warned"].as_array().unwrap();
        let allowed = if severe {
            &["lobes_to_lung_mask"][..]
        } else {
            &[][..]
        };
        assert!(warned
            .iter()
            .all(|w| allowed.contains(&w.as_str().unwrap())));
    }

    // Only the lung bases (the lowest 30 % of the slices) of a non-severe case, as an abdominal
    // CT shows them.
    let ph = generate(&adult(false), 23);
    let [nx, ny, nz] = ph.spec.shape;
    let keep = nz * 3 / 10;
    let n = nx * ny * keep;
    let bases = Phantom {
        spec: PhantomSpec {
            shape: [nx, ny, keep],
            ..ph.spec.clone()
        },
        hu: ph.hu[..n].to_vec(),
        lobes: ph.lobes[..n].to_vec(),
        counts: ph.counts,
    };
    bases.write(dir.path(), "bases", 1, true).unwrap();
    let mut oracle = Oracle::new(&dir.path().join("bases.nii.gz"), &bases, 64);
    let a = args(vec![dir.path().join("bases.nii.gz")], &out, false);
    let ok = run_with_engine(&a, &mut oracle, "oracle").unwrap();
    let r = report_of(&out, "bases");
    let (lobes, mask) = (
        r["lung_volume_ml"].as_f64().unwrap(),
        r["lung_mask_volume_ml"].as_f64().unwrap(),
    );
    let truth = bases.lobes.iter().filter(|&&l| l > 0).count() as f64 * 0.016;
    println!(
        "bases only ({keep} of {nz} slices): status {ok}, lobes {lobes:.0} mL, mask {mask:.0} mL, \
         truth {truth:.0} mL; warned {:?}; {}",
        r["quality"]["warned"],
        gate_line(&r)
    );
    assert!(ok && r["quality"]["passed"].as_bool().unwrap());
    assert!(r["quality"]["warned"]
        .as_array()
        .unwrap()
        .contains(&Value::from("lung_volume_ml")));
    assert!(
        (lobes - mask).abs() <= 0.2 * mask,
        "lobes {lobes} vs mask {mask}"
    );
    assert!((mask - truth).abs() <= 0.2 * truth);
}

/// Adds air pockets below the lungs and under the left dome of a phantom: a stomach bubble and
/// a large bowel loop of pure gas, and a small pocket of lung-like density (gas in stool).
/// Returns the pocket voxels.
fn add_abdominal_gas(ph: &mut Phantom) -> Vec<usize> {
    let [nx, ny, nz] = ph.spec.shape;
    let coord = |i: usize, n: usize| (i as f64 + 0.5) / n as f64 * 2.0 - 1.0;
    // (u, v, w) centre, radii, HU.
    let pockets = [
        ([-0.38, 0.05, -0.74], [0.12, 0.12, 0.07], -1000.0f32),
        ([0.25, 0.2, -0.9], [0.3, 0.2, 0.08], -1000.0),
        ([0.0, -0.1, -0.88], [0.05, 0.05, 0.05], -780.0),
    ];
    let near_lung = |x: usize, y: usize, z: usize| {
        (z.saturating_sub(2)..(z + 3).min(nz)).any(|zz| {
            (y.saturating_sub(1)..(y + 2).min(ny)).any(|yy| {
                (x.saturating_sub(1)..(x + 2).min(nx))
                    .any(|xx| ph.lobes[(zz * ny + yy) * nx + xx] > 0)
            })
        })
    };
    let mut voxels = Vec::new();
    for z in 0..nz {
        for y in 0..ny {
            for x in 0..nx {
                let (u, v, w) = (coord(x, nx), coord(y, ny), coord(z, nz));
                for (c, r, hu) in pockets {
                    let d = ((u - c[0]) / r[0]).powi(2)
                        + ((v - c[1]) / r[1]).powi(2)
                        + ((w - c[2]) / r[2]).powi(2);
                    if d < 1.0 && !near_lung(x, y, z) {
                        let i = (z * ny + y) * nx + x;
                        ph.hu[i] = hu + ((i * 7919) % 31) as f32 - 15.0;
                        voxels.push(i);
                    }
                }
            }
        }
    }
    voxels
}

/// Lobe voxels of `lobes` farther from every true lung voxel of `ph` than the lung mask's
/// envelope and closing reach (in-plane and along z, for 2 × 2 × 4 mm voxels).
fn beyond_reach(lobes: &[u8], ph: &Phantom) -> usize {
    let [nx, ny, nz] = ph.spec.shape;
    let reach = ((ENVELOPE_MM + CLOSING_MM) / ph.spec.spacing[0]).ceil() as isize;
    let dz = ((ENVELOPE_MM + Z_CLOSING_MM) / ph.spec.spacing[2]).ceil() as isize;
    let mut far = 0;
    for z in 0..nz as isize {
        for y in 0..ny as isize {
            for x in 0..nx as isize {
                if lobes[((z as usize * ny) + y as usize) * nx + x as usize] == 0 {
                    continue;
                }
                let near = (z - dz..=z + dz).any(|zz| {
                    (y - reach..=y + reach).any(|yy| {
                        (x - reach..=x + reach).any(|xx| {
                            zz >= 0
                                && yy >= 0
                                && xx >= 0
                                && (zz as usize) < nz
                                && (yy as usize) < ny
                                && (xx as usize) < nx
                                && ph.lobes[(zz as usize * ny + yy as usize) * nx + xx as usize] > 0
                        })
                    })
                });
                far += !near as usize;
            }
        }
    }
    far
}

#[test]
fn abdominal_gas_stays_out_of_the_lung_mask_and_the_lobes() {
    let mut ph = generate(&adult(false), 31);
    let pockets = add_abdominal_gas(&mut ph);
    let voxel_ml = 0.016;
    let mask = lung_mask(&canonical(&ph));
    let in_mask = pockets.iter().filter(|&&i| mask.contains(i)).count();
    let (cov, _) = coverage(&mask, &ph.lobes);
    let truth_ml = ph.lobes.iter().filter(|&&l| l > 0).count() as f64 * voxel_ml;
    println!(
        "gas pockets {:.0} mL ({in_mask} voxels in the lung mask); lung mask {:.0} mL vs truth \
         {truth_ml:.0} mL; coverage per lobe {cov:.4?}",
        pockets.len() as f64 * voxel_ml,
        mask.voxels() as f64 * voxel_ml
    );
    assert_eq!(in_mask, 0);
    assert!(cov.iter().all(|&c| c >= 0.995));

    // A network that paints lobes everywhere keeps them only in the lungs' envelope.
    let dir = tempfile::tempdir().unwrap();
    ph.write(dir.path(), "gas", 31, true).unwrap();
    let out = dir.path().join("out");
    let ok = run_with_engine(
        &args(vec![dir.path().join("gas.nii.gz")], &out, false),
        &mut Painter::new(),
        "painter",
    )
    .unwrap();
    let lobes = canonical_lobes(&out.join("gas_lobes.nii.gz"));
    // The pure-gas pockets (the lung-density one is kept out of the mask by its size, but lies
    // within the envelope's reach of the lung base).
    let in_pockets = pockets
        .iter()
        .filter(|&&i| lobes[i] > 0 && ph.hu[i] < -950.0)
        .count();
    let far = beyond_reach(&lobes, &ph);
    let r = report_of(&out, "gas");
    println!(
        "painter on the gas phantom: status {ok}, {} lobe voxels, {in_pockets} in the pockets, \
         {far} beyond the envelope's reach of true lung; {}",
        lobes.iter().filter(|&&l| l > 0).count(),
        gate_line(&r)
    );
    assert_eq!((in_pockets, far), (0, 0));
}

/// Writes `hu` (canonical = native RAS, spacing 0.8 × 0.8 × 5 mm) as float32 NIfTI.
fn write_volume(path: &Path, dims: [usize; 3], hu: &[f32]) {
    let h = NiftiHeader {
        dim: [
            3,
            dims[0] as u16,
            dims[1] as u16,
            dims[2] as u16,
            1,
            1,
            1,
            1,
        ],
        pixdim: [1.0, 0.8, 0.8, 5.0, 1.0, 1.0, 1.0, 1.0],
        xyzt_units: 2,
        ..NiftiHeader::default()
    };
    write_nifti(path, &h, VoxelData::F32(hu), false).unwrap();
}

/// Rewrites a NIfTI file's header fields with `edit`.
fn edit_header(path: &Path, edit: impl Fn(&mut [u8])) {
    let mut raw = std::fs::read(path).unwrap();
    edit(&mut raw);
    std::fs::write(path, raw).unwrap();
}

/// `n` values of Gaussian noise, mean 0 and standard deviation `sd` (Box–Muller over a
/// 64-bit LCG seeded with `seed`).
fn gaussian_noise(n: usize, sd: f64, seed: u64) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (a, b) = (uniform(), uniform());
            (sd * (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
        })
        .collect()
}

#[test]
fn noise_constants_absurd_scaling_and_spacing_fail_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [96usize, 96, 16];
    let n = dims.iter().product();
    let noise = gaussian_noise(n, 600.0, 12345);
    write_volume(&dir.path().join("noise.nii"), dims, &noise);
    write_volume(&dir.path().join("constant.nii"), dims, &vec![40.0; n]);
    // A phantom with scl_slope 1e30, and one whose sform says 1e27 mm per slice.
    let ph = generate(&spec([64, 64, 16], [1.0, 1.0, 5.0], true), 41);
    for name in ["slope", "sform"] {
        ph.write(dir.path(), name, 41, false).unwrap();
    }
    edit_header(&dir.path().join("slope.nii"), |h| {
        h[112..116].copy_from_slice(&1e30f32.to_le_bytes())
    });
    edit_header(&dir.path().join("sform.nii"), |h| {
        // srow_z (bytes 312..328): the slice axis scaled to 1e27 mm.
        for k in 0..3 {
            let at = 312 + 4 * k;
            let v = f32::from_le_bytes(h[at..at + 4].try_into().unwrap());
            h[at..at + 4].copy_from_slice(&(v * 1e27).to_le_bytes());
        }
    });
    let cases: [(&str, bool, &[&str]); 4] = [
        ("noise", false, &["lung_sides"]),
        (
            "constant",
            true,
            &["hu_min", "identical_slices", "lung_sides"],
        ),
        ("slope", false, &["hu_min", "hu_max", "lobe_mean_hu"]),
        ("sform", false, &["spacing_z_mm", "lung_volume_ml"]),
    ];
    let out = dir.path().join("out");
    for (name, needs_force, expected) in cases {
        let input = dir.path().join(format!("{name}.nii"));
        let ok = run_with_engine(
            &args(vec![input.clone()], &out, false),
            &mut Painter::new(),
            "painter",
        )
        .unwrap();
        let written = out.join(format!("{name}_report.json")).exists();
        let ok_forced = run_with_engine(
            &args(vec![input.clone()], &out, true),
            &mut Painter::new(),
            "painter",
        )
        .unwrap();
        let r = report_of(&out, name);
        let lobes = canonical_lobes(&out.join(format!("{name}_lobes.nii.gz")));
        let ct = CanonicalCt::from_volume(&read_volume(&input).unwrap());
        let outside = lobes_outside_mask(&lobes, &lung_mask(&ct));
        let lobe_voxels = lobes.iter().filter(|&&l| l > 0).count();
        println!(
            "{name}: status {ok} (report written without --force: {written}), with --force \
             {ok_forced}; severity {} p = {:.3} reliable {}; failed {:?}; {lobe_voxels} lobe \
             voxels, {outside} outside the lung mask; {}",
            r["severity"]["class"],
            r["severity"]["probability"].as_f64().unwrap(),
            r["severity"]["reliable"],
            failed(&r),
            gate_line(&r)
        );
        assert!(!ok, "{name}: the run must fail without --force");
        assert_eq!(written, !needs_force);
        assert!(ok_forced);
        assert!(!r["severity"]["reliable"].as_bool().unwrap());
        assert!(!r["quality"]["passed"].as_bool().unwrap());
        let f = failed(&r);
        assert!(
            expected.iter().all(|e| f.contains(&e.to_string())),
            "{name}: {f:?}"
        );
        assert_eq!(outside, 0);
        if ["noise", "constant"].contains(&name) {
            assert_eq!(lobe_voxels, 0, "{name} holds no lung");
        }
    }
}

#[test]
fn the_command_line_exits_non_zero_on_a_failed_gate_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let dims = [64usize, 64, 12];
    let hu = gaussian_noise(dims.iter().product(), 800.0, 7);
    let input = dir.path().join("noise.nii");
    write_volume(&input, dims, &hu);
    let run = |force: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_m2unet"));
        c.args(["assess", input.to_str().unwrap(), "--out"])
            .arg(dir.path().join("out"))
            .env_remove("M2UNET_WEIGHTS");
        if force {
            c.arg("--force");
        }
        c.output().unwrap()
    };
    let (plain, forced) = (run(false), run(true));
    let text = String::from_utf8_lossy(&plain.stderr).to_string();
    println!(
        "Gaussian noise: exit {:?} / with --force {:?}\n{text}",
        plain.status.code(),
        forced.status.code()
    );
    assert_eq!(plain.status.code(), Some(1));
    assert_eq!(forced.status.code(), Some(0));
    assert!(text.contains("QUALITY GATE FAILED") && text.contains("FAIL: lung_sides"));
    assert!(String::from_utf8_lossy(&forced.stderr).contains("QUALITY GATE FAILED"));
}

/// pydicom-data's real slices stacked into 8-slice series by tools/make_real_ct_fixtures.py
/// (made once per test run).
fn real_ct() -> &'static Value {
    static F: OnceLock<Value> = OnceLock::new();
    F.get_or_init(|| {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("real_ct");
        let o = Command::new("python3")
            .env("PYTHONPATH", repo.join(".pydicom"))
            .arg(repo.join("tools/make_real_ct_fixtures.py"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "tools/make_real_ct_fixtures.py failed (run tools/install_test_python.sh): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap()
    })
}

/// Voxels below −400 HU not 4-connected in-plane, through such voxels, to the image border
/// (a naive flood fill per slice): the air a lung could be made of.
fn inner_air(ct: &CanonicalCt) -> Vec<bool> {
    let [nx, ny, nz] = ct.dims;
    let mut out = vec![false; nx * ny * nz];
    for z in 0..nz {
        let s = ct.slice(z);
        let mut outside = vec![false; nx * ny];
        let mut stack: Vec<(usize, usize)> = Vec::new();
        for y in 0..ny {
            for x in 0..nx {
                if (x == 0 || y == 0 || x == nx - 1 || y == ny - 1) && s[y * nx + x] < -400.0 {
                    outside[y * nx + x] = true;
                    stack.push((x, y));
                }
            }
        }
        while let Some((x, y)) = stack.pop() {
            let mut go = |x: usize, y: usize| {
                if s[y * nx + x] < -400.0 && !outside[y * nx + x] {
                    outside[y * nx + x] = true;
                    stack.push((x, y));
                }
            };
            if x > 0 {
                go(x - 1, y);
            }
            if x + 1 < nx {
                go(x + 1, y);
            }
            if y > 0 {
                go(x, y - 1);
            }
            if y + 1 < ny {
                go(x, y + 1);
            }
        }
        for i in 0..nx * ny {
            out[z * nx * ny + i] = s[i] < -400.0 && !outside[i];
        }
    }
    out
}

#[test]
fn real_non_chest_ct_slices_get_no_confident_answer_and_no_lobe_outside_lung() {
    let manifest = real_ct();
    let model = WeightsSource::resolve(None, None).load().unwrap();
    let mut engine = make_engine(model, Backend::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for name in ["head", "neck", "abdomen"] {
        let case = &manifest["cases"][name];
        let folder = PathBuf::from(case["folder"].as_str().unwrap());
        let out = dir.path().join(name);
        let ok = run_with_engine(
            &args(vec![folder.clone()], &out, false),
            engine.as_mut(),
            "default",
        )
        .unwrap();
        let reports: Vec<PathBuf> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.to_string_lossy().ends_with("_report.json"))
            .collect();
        assert_eq!(reports.len(), 1, "{name}: {reports:?}");
        let r: Value =
            serde_json::from_str(&std::fs::read_to_string(&reports[0]).unwrap()).unwrap();
        let lobes = canonical_lobes(Path::new(r["outputs"]["lobes"].as_str().unwrap()));
        let input = m2unet::ct_input::collect_ct_inputs(&[folder]).inputs;
        let volume = input[0].read().unwrap().volume;
        let ct = CanonicalCt::from_volume(&volume);
        let mask = lung_mask(&ct);
        let outside = lobes_outside_mask(&lobes, &mask);
        let lobe_voxels = lobes.iter().filter(|&&l| l > 0).count();
        // Independent of the lung mask: lobe voxels farther than the envelope's reach from any
        // inner air voxel of their slice (all slices are the same slice).
        let air = inner_air(&ct);
        let [nx, ny, _] = ct.dims;
        let reach = ((ENVELOPE_MM + CLOSING_MM) / ct.spacing[0]).ceil() as isize;
        let mut air_sum = vec![0u32; (nx + 1) * (ny + 1)];
        let mut far = 0usize;
        for z in 0..ct.dims[2] {
            for y in 0..ny {
                for x in 0..nx {
                    air_sum[(y + 1) * (nx + 1) + x + 1] = air_sum[y * (nx + 1) + x + 1]
                        + air_sum[(y + 1) * (nx + 1) + x]
                        - air_sum[y * (nx + 1) + x]
                        + air[(z * ny + y) * nx + x] as u32;
                }
            }
            for y in 0..ny {
                for x in 0..nx {
                    if lobes[(z * ny + y) * nx + x] == 0 {
                        continue;
                    }
                    let clamp = |v: isize, n: usize| v.clamp(0, n as isize) as usize;
                    let (x0, x1) = (
                        clamp(x as isize - reach, nx),
                        clamp(x as isize + reach + 1, nx),
                    );
                    let (y0, y1) = (
                        clamp(y as isize - reach, ny),
                        clamp(y as isize + reach + 1, ny),
                    );
                    let count = air_sum[y1 * (nx + 1) + x1] + air_sum[y0 * (nx + 1) + x0]
                        - air_sum[y0 * (nx + 1) + x1]
                        - air_sum[y1 * (nx + 1) + x0];
                    far += (count == 0) as usize;
                }
            }
        }
        println!(
            "{name} ({}, {}): status {ok}; severity {} p = {:.3} reliable {}; failed {:?}; \
             lobes {lobe_voxels} voxels ({:.1} mL), lung mask {:.1} mL, {outside} lobe voxels \
             outside its envelope, {far} farther than the envelope's reach from inner air; {}",
            case["source"],
            case["body_part"],
            r["severity"]["class"],
            r["severity"]["probability"].as_f64().unwrap(),
            r["severity"]["reliable"],
            failed(&r),
            r["lung_volume_ml"].as_f64().unwrap(),
            r["lung_mask_volume_ml"].as_f64().unwrap(),
            gate_line(&r)
        );
        assert!(!ok, "{name}: the run must fail without --force");
        assert!(!r["severity"]["reliable"].as_bool().unwrap());
        let f = failed(&r);
        assert!(
            f.contains(&"identical_slices".to_string()) && f.contains(&"lung_sides".to_string())
        );
        assert_eq!((outside, far), (0, 0));
        if name != "neck" {
            assert_eq!(lobe_voxels, 0, "a {name} holds no lung");
        }
    }
}

/// A neck-to-pelvis phantom (arms, table, liver, stomach bubble, bowel gas) and an abdominal
/// one (lung bases in its top slices), at adult size. What a real scan holds around the lungs
/// stays out of the lung mask; a network that paints lobes everywhere keeps them only within
/// the envelope's reach of true lung; and the default weights, trained on chest-only phantoms,
/// give lobes within 20 % of the lung mask's volume (issue: lobes only where there is lung).
#[test]
fn wide_fields_of_view_keep_lobes_in_the_lungs() {
    let model = WeightsSource::resolve(None, None).load().unwrap();
    let mut network = make_engine(model, Backend::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cases = [
        ("body", FieldOfView::Body, [128, 128, 96], [3.2, 3.2, 7.2]),
        (
            "abdomen",
            FieldOfView::Abdomen,
            [144, 144, 64],
            [2.4, 2.4, 5.0],
        ),
    ];
    for (name, fov, shape, spacing) in cases {
        let ph = generate(
            &PhantomSpec {
                fov,
                frame: fov.frame(),
                ..spec(shape, spacing, false)
            },
            41,
        );
        let [nx, ny, nz] = shape;
        let slice = nx * ny;
        let lung_slices: Vec<usize> = (0..nz)
            .filter(|&z| ph.lobes[z * slice..(z + 1) * slice].iter().any(|&l| l > 0))
            .collect();
        // Gas outside the lungs: the stomach bubble, bowel gas, the air around the body.
        let gas = (0..ph.hu.len())
            .filter(|&i| ph.lobes[i] == 0 && ph.hu[i] < -900.0)
            .count();
        let mask = lung_mask(&canonical(&ph));
        let gas_in_mask = (0..ph.hu.len())
            .filter(|&i| mask.contains(i) && ph.lobes[i] == 0 && ph.hu[i] < -900.0)
            .count();
        let (cov, _) = coverage(&mask, &ph.lobes);
        println!(
            "{name}: lung in slices {}..={} of {nz}; {gas} gas voxels outside the lungs, {gas_in_mask} of them in the lung mask; lobe coverage {cov:.4?}",
            lung_slices[0],
            lung_slices[lung_slices.len() - 1]
        );
        if fov == FieldOfView::Abdomen {
            assert!(lung_slices[0] > nz / 2, "only the top slices hold lung");
        } else {
            assert!(lung_slices[0] > nz / 5 && lung_slices[lung_slices.len() - 1] < nz * 9 / 10);
        }
        assert_eq!(gas_in_mask, 0);
        // Lobes the grid holds (an abdominal scan may miss the upper lobes) lie in the envelope.
        let present = |l: usize| ph.lobes.iter().any(|&v| v as usize == l + 1);
        assert!(
            (0..5).all(|l| !present(l) || cov[l] >= 0.99),
            "{name}: coverage {cov:?}"
        );

        ph.write(dir.path(), name, 41, true).unwrap();
        let image = dir.path().join(format!("{name}.nii.gz"));
        run_with_engine(
            &args(vec![image.clone()], &out, true),
            &mut Painter::new(),
            "painter",
        )
        .unwrap();
        let painted = canonical_lobes(&out.join(format!("{name}_lobes.nii.gz")));
        let far = beyond_reach(&painted, &ph);
        run_with_engine(&args(vec![image], &out, true), network.as_mut(), "default").unwrap();
        let r = report_of(&out, name);
        let lobes = canonical_lobes(&out.join(format!("{name}_lobes.nii.gz")));
        let d = lobe_dice(&lobes, &ph.lobes);
        let (lobe_ml, mask_ml) = (
            r["lung_volume_ml"].as_f64().unwrap(),
            r["lung_mask_volume_ml"].as_f64().unwrap(),
        );
        let truth_ml = ph.lobes.iter().filter(|&&l| l > 0).count() as f64
            * spacing.iter().product::<f64>()
            / 1000.0;
        println!(
            "  painter: {far} lobe voxels beyond the envelope's reach; default weights: lobes {lobe_ml:.0} mL, lung mask {mask_ml:.0} mL, truth {truth_ml:.0} mL, \
             {} lobe voxels beyond reach, Dice {d:.3?}; {}",
            beyond_reach(&lobes, &ph),
            gate_line(&r)
        );
        assert_eq!(far, 0);
        assert_eq!(beyond_reach(&lobes, &ph), 0);
        assert!(
            (lobe_ml - mask_ml).abs() <= 0.2 * mask_ml,
            "{name}: lobes {lobe_ml} mL vs lung mask {mask_ml} mL"
        );
    }
}
