//! `m2unet synth`: its arguments and the set of phantoms it writes.

use crate::data::phantom::{
    check_shape, write_set, FovChoice, Geometry, StoredDtype, SynthOptions,
};
use anyhow::{bail, Result};
use std::path::PathBuf;

/// Generate seeded synthetic chest CT phantoms with lobe masks, per-case ground truth JSON and
/// a manifest CSV.
///
/// For each case `case_NNNN` it writes the CT volume `case_NNNN.nii.gz` (HU), the lobe mask
/// `case_NNNN_mask.nii.gz` (uint8: 0 background, 1 LUL, 2 LLL, 3 RUL, 4 RML, 5 RLL) and
/// `case_NNNN.json` (per-lobe and total involvement, CT-grade, severe label), plus
/// `manifest.csv` (image, mask, label, case_id) over all cases; with two cases or more both
/// classes are present. Whatever is not fixed by an option (shape, spacing, orientation, data
/// type, noise) is drawn per case from the seed; the same seed gives identical files.
///
/// The output folder must be empty (or missing); --overwrite replaces the synthetic set in it.
/// The set is written whole or not at all: a failure (a full disk, too little memory) leaves
/// no file of the new set behind and an earlier set untouched.
#[derive(clap::Args, Debug, Clone)]
pub struct SynthArgs {
    /// Output folder (created when missing); it must be empty unless --overwrite is given.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace the synthetic set in --out: its cases are replaced and those the new set does not
    /// have removed. The folder may hold nothing else (anything synth does not write is refused).
    #[arg(long)]
    pub overwrite: bool,
    /// Number of cases.
    #[arg(long, default_value_t = 8)]
    pub count: usize,
    /// Seed of the whole set (case i uses a stream derived from it).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Grid size X,Y,Z in voxels along the canonical axes (left→right, posterior→anterior,
    /// inferior→superior): at least 16,16,2, at most 2048 per axis and 268,435,456 voxels in
    /// all (e.g. 512,512,1024; the generator needs about 16 bytes per voxel, 4 GiB at that
    /// size); drawn per case when absent.
    #[arg(long, value_parser = parse_shape)]
    pub shape: Option<[usize; 3]>,
    /// Voxel spacing X,Y,Z in mm (canonical order); drawn per case (0.6–1.0 mm in-plane,
    /// 1–5 mm between slices) when absent, finer on large grids so that the field of view stays
    /// within 400 mm and the lungs within 300 mm head to foot (the anatomy fills the grid).
    #[arg(long, value_parser = parse_spacing)]
    pub spacing: Option<[f64; 3]>,
    /// Axis codes of the stored array (e.g. RAS, LPS, LAS, or any permutation such as PSR);
    /// drawn per case from RAS, LPS and LAS when absent.
    #[arg(long)]
    pub orientation: Option<String>,
    /// Stored data type; drawn per case when absent.
    #[arg(long, value_enum)]
    pub dtype: Option<StoredDtype>,
    /// Voxel noise standard deviation in HU; drawn per case (5–30) when absent.
    #[arg(long)]
    pub noise: Option<f32>,
    /// Write uncompressed `.nii` files instead of `.nii.gz`.
    #[arg(long)]
    pub uncompressed: bool,
    /// What each phantom covers around the lungs: chest (the thorax fills the grid; default),
    /// body (neck to pelvis, with arms, the table, liver, stomach gas and bowel gas), abdomen
    /// (the lung bases in the top slices, the abdomen below, the table) or mixed (drawn per
    /// case: 60 % chest, 25 % body, 15 % abdomen). Truth masks are background outside the lungs.
    #[arg(long, value_enum)]
    pub fov: Option<FovChoice>,
    /// How each grid is sized: fill (the anatomy fills the grid of --shape and --spacing, or of
    /// drawn small ones; default) or clinical (as a scanner acquires a chest CT: 384, 512 or
    /// 768 pixels in-plane over a field of view wider than the body, 0.5–1 mm pixels, slices of
    /// 0.625–5 mm over the scanned range, 100–600 slices for a chest, an adult of drawn size at
    /// physical scale, the table under the back; --shape and --spacing are then drawn). A
    /// 512×512×300 case takes about 6 s and 100 MB compressed.
    #[arg(long, value_enum, default_value_t = Geometry::Fill, conflicts_with_all = ["shape", "spacing"])]
    pub geometry: Geometry,
}

impl SynthArgs {
    /// The library's options: what the flags fix of each case.
    fn options(&self) -> SynthOptions {
        SynthOptions {
            seed: self.seed,
            shape: self.shape,
            spacing: self.spacing,
            orientation: self.orientation.clone(),
            dtype: self.dtype,
            noise: self.noise,
            fov: self.fov,
            geometry: self.geometry,
        }
    }
}

/// `m2unet synth`: writes the phantoms and the manifest.
pub fn run(args: &SynthArgs) -> Result<()> {
    if args.count == 0 {
        bail!("--count must be at least 1");
    }
    write_set(
        &args.out,
        args.count,
        &args.options(),
        !args.uncompressed,
        args.overwrite,
    )
}

fn parse_triple<T: std::str::FromStr>(s: &str, what: &str) -> Result<[T; 3], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != 3 {
        return Err(format!(
            "{what} must be three comma-separated numbers, e.g. 128,128,96"
        ));
    }
    let mut out = Vec::with_capacity(3);
    for p in parts {
        out.push(
            p.parse::<T>()
                .map_err(|_| format!("{what}: {p:?} is not a valid number"))?,
        );
    }
    out.try_into()
        .map_err(|_| format!("{what}: three values needed"))
}

fn parse_shape(s: &str) -> Result<[usize; 3], String> {
    let v: [usize; 3] = parse_triple(s, "--shape")?;
    check_shape(v).map_err(|e| e.to_string())?;
    Ok(v)
}

fn parse_spacing(s: &str) -> Result<[f64; 3], String> {
    let v: [f64; 3] = parse_triple(s, "--spacing")?;
    if v.iter().any(|&d| !(d.is_finite() && d > 0.0 && d <= 20.0)) {
        return Err("--spacing values must be positive mm (at most 20)".into());
    }
    Ok(v)
}
