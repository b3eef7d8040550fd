//! Seeded synthetic chest CT phantoms with exact lobe ground truth, one by one or as a set.
//!
//! The anatomy lives in normalised canonical coordinates u, v, w (u towards the patient's
//! right, v anterior, w superior); the thorax spans [−1, 1] on each axis. A phantom's field of
//! view maps its grid onto that space: the chest fills the grid (whatever the spacing), or the
//! grid covers neck to pelvis (arms beside the body, the table under it), or the abdomen with
//! the lung bases on its top slices — what real scans hold around the lungs. It is
//! deliberately asymmetric: three right lobes (oblique + horizontal fissure), two left lobes,
//! the heart to the left. Fissures show as thin denser sheets, as in thin-section CT. Every voxel is a pure function of the case seed and its index (noise
//! by hashing), so generation is parallel and the bytes are reproducible.

use crate::data::{ct_grade, LOBE_NAMES, NUM_LOBES};
use crate::io::atomic::{is_stale_temporary, StagedFiles};
use crate::io::nifti::{set_header_affine, write_nifti_to, Orientation, VoxelData};
use ::nifti::NiftiHeader;
use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// How the phantom's voxels are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StoredDtype {
    /// HU rounded to int16, no scaling.
    Int16,
    /// HU as float32.
    Float32,
    /// uint16 with scl_slope 0.5 and scl_inter −1024 (HU = 0.5·stored − 1024).
    Uint16,
}

/// Which spatial transforms the header carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum XformKind {
    Both,
    SformOnly,
    QformOnly,
}

/// How much of the body a phantom's grid covers around the lungs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FieldOfView {
    /// The thorax fills the grid, lung apices to the diaphragm.
    #[default]
    Chest,
    /// Neck to pelvis: the thorax in the middle third, the abdomen (liver, stomach with its gas
    /// bubble, bowel with gas, pelvic bones) below, the neck above, the arms beside the body
    /// and the table under it.
    Body,
    /// An abdominal scan: the lung bases in its top slices, the abdomen below, the table.
    Abdomen,
}

impl FieldOfView {
    /// The frame of a grid the anatomy fills: the chest edge to edge, or room left for the
    /// arms and the table around the body, and the heights the field of view spans.
    pub fn frame(self) -> Frame {
        let (scale, w) = match self {
            FieldOfView::Chest => (1.0, [-1.0, 1.0]),
            FieldOfView::Body => (0.76, [-2.9, 1.7]),
            FieldOfView::Abdomen => (0.9, [-2.6, -0.4]),
        };
        Frame {
            scale,
            w,
            table: self != FieldOfView::Chest,
        }
    }
}

/// Where a grid lies in the anatomy: in-plane, anatomy = grid coordinate / `scale` (grid
/// coordinates run over [−1, 1]); the slices span anatomy heights `w[0]..w[1]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Frame {
    pub scale: f64,
    pub w: [f64; 2],
    /// Whether the table lies under the body.
    pub table: bool,
}

/// Millimetres per anatomy unit of an average adult (patient size 1): in-plane (the body
/// 344 mm wide, a lung 120 mm) and head to foot (the lungs about 260 mm tall).
const MM_PER_UNIT: [f64; 2] = [200.0, 165.0];

/// How a synthetic set sizes its grids.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Geometry {
    /// The anatomy fills the grid (as the field of view frames it), whatever its shape.
    #[default]
    Fill,
    /// As real CT scans are acquired: 384–768 pixels in-plane over a field of view wider than
    /// the body (0.5–1 mm pixels), slices of 0.625–5 mm over the scanned range (100–600 slices
    /// for a chest), an adult of drawn size at physical scale, and the table under the back.
    Clinical,
}

/// Everything that defines one phantom besides its seed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PhantomSpec {
    /// Canonical (RAS) grid size: voxels left→right, posterior→anterior, inferior→superior.
    pub shape: [usize; 3],
    /// Canonical voxel spacing in mm.
    pub spacing: [f64; 3],
    /// Axis codes of the written array (e.g. "LPS").
    pub orientation: String,
    pub dtype: StoredDtype,
    pub xform: XformKind,
    /// Standard deviation of the voxel noise in HU.
    pub noise_hu: f32,
    /// The class whose involvement range the lesions are drawn from.
    pub severe: bool,
    /// What the grid covers around the lungs.
    pub fov: FieldOfView,
    /// Where the grid lies in the anatomy.
    pub frame: Frame,
}

/// Ground truth of one lobe.
#[derive(Clone, Debug, Serialize)]
pub struct LobeTruth {
    pub label: u8,
    pub name: String,
    pub voxels: usize,
    pub volume_ml: f64,
    pub lesion_voxels: usize,
    pub involvement: f64,
}

/// Ground truth of one case (the per-case JSON).
#[derive(Clone, Debug, Serialize)]
pub struct CaseTruth {
    pub case_id: String,
    pub image: String,
    pub mask: String,
    pub seed: u64,
    pub spec: PhantomSpec,
    pub lobes: Vec<LobeTruth>,
    pub total_involvement: f64,
    pub ct_grade: u8,
    pub ct_grade_name: String,
    pub severe: bool,
    pub label: u8,
}

/// A generated phantom, canonical RAS+ arrays (x fastest).
#[derive(Clone, Debug)]
pub struct Phantom {
    pub spec: PhantomSpec,
    pub hu: Vec<f32>,
    pub lobes: Vec<u8>,
    /// Per-lobe (voxels, lesion voxels), index = label − 1.
    pub counts: [(usize, usize); NUM_LOBES],
}

const RIGHT: usize = 0;
const LEFT: usize = 1;
const HU_AIR: f32 = -1000.0;
const HU_LUNG: f32 = -860.0;
const HU_SOFT: f32 = 40.0;
const HU_FAT: f32 = -100.0;
const HU_BONE: f32 = 620.0;
const HU_VESSEL: f32 = 30.0;
/// Peak HU a fissure adds to the lung it crosses: a sheet about one voxel thick, faint enough
/// (−790 HU at its centre) to stay out of the lesion HU window.
const HU_FISSURE: f32 = 70.0;

#[derive(Clone, Copy, Debug)]
struct LungGeom {
    cu: f64,
    cv: f64,
    ru: f64,
    rv: f64,
    /// Lowest w of the lung floor at its rim; the floor domes up by `dome` at the centre.
    base: f64,
    dome: f64,
    /// Above `mid` the lung narrows to the apex at `apex`.
    mid: f64,
    apex: f64,
}

#[derive(Clone, Copy, Debug)]
struct Segment {
    a: [f64; 3],
    b: [f64; 3],
    radius: f64,
}

/// The seeded anatomy of one case.
#[derive(Clone, Debug)]
struct Anatomy {
    bu: f64,
    bv: f64,
    lungs: [LungGeom; 2],
    /// Heart ellipsoid: centre and radii.
    heart: [f64; 6],
    /// Oblique fissures (offset, slope over the normalised A–P coordinate), right and left.
    oblique: [(f64, f64); 2],
    /// Horizontal fissure height (right lung).
    horizontal: f64,
    rib_freq: f64,
    rib_phase: f64,
    vessels: [Vec<Segment>; 2],
    /// Smooth lung texture: three plane waves (frequency vector, phase).
    waves: [[f64; 4]; 3],
}

impl Anatomy {
    fn draw(rng: &mut ChaCha8Rng) -> Self {
        let mut j = |centre: f64, spread: f64| centre + rng.gen_range(-spread..=spread);
        let lungs = [
            LungGeom {
                cu: j(0.37, 0.02),
                cv: j(-0.02, 0.02),
                ru: j(0.30, 0.02),
                rv: j(0.46, 0.02),
                base: j(-0.66, 0.04),
                dome: j(0.18, 0.03),
                mid: j(0.35, 0.05),
                apex: j(0.88, 0.03),
            },
            LungGeom {
                cu: j(-0.38, 0.02),
                cv: j(-0.03, 0.02),
                ru: j(0.27, 0.02),
                rv: j(0.44, 0.02),
                base: j(-0.74, 0.04),
                dome: j(0.16, 0.03),
                mid: j(0.35, 0.05),
                apex: j(0.86, 0.03),
            },
        ];
        let heart = [
            j(-0.11, 0.02),
            j(0.20, 0.02),
            j(-0.32, 0.04),
            j(0.28, 0.02),
            j(0.24, 0.02),
            j(0.33, 0.03),
        ];
        let oblique = [
            (j(-0.05, 0.05), j(0.45, 0.05)),
            (j(0.0, 0.05), j(0.5, 0.05)),
        ];
        let horizontal = j(0.06, 0.04);
        let bu = j(0.86, 0.03);
        let bv = j(0.64, 0.03);
        let rib_freq = j(5.5, 0.5);
        let rib_phase = j(0.5, 0.5);
        let mut waves = [[0.0; 4]; 3];
        for w in waves.iter_mut() {
            *w = [j(0.0, 9.0), j(0.0, 9.0), j(0.0, 9.0), j(3.2, 3.2)];
        }
        let mut anatomy = Anatomy {
            bu,
            bv,
            lungs,
            heart,
            oblique,
            horizontal,
            rib_freq,
            rib_phase,
            vessels: [Vec::new(), Vec::new()],
            waves,
        };
        for side in [RIGHT, LEFT] {
            let g = anatomy.lungs[side];
            let hilum = [if side == RIGHT { 0.17 } else { -0.17 }, 0.0, 0.08];
            let mut segs = Vec::new();
            for _ in 0..8 {
                for _ in 0..200 {
                    let p = [
                        rng.gen_range(g.cu - g.ru..g.cu + g.ru),
                        rng.gen_range(g.cv - g.rv..g.cv + g.rv),
                        rng.gen_range(g.base..g.apex),
                    ];
                    if anatomy.lung_at(side, p[0], p[1], p[2]).is_some() {
                        segs.push(Segment {
                            a: hilum,
                            b: p,
                            radius: rng.gen_range(0.015..0.03),
                        });
                        break;
                    }
                }
            }
            anatomy.vessels[side] = segs;
        }
        anatomy
    }

    /// Normalised radial position inside the body ellipse (1 at the skin).
    fn body_radius(&self, u: f64, v: f64) -> f64 {
        ((u / self.bu).powi(2) + (v / self.bv).powi(2)).sqrt()
    }

    fn in_heart(&self, u: f64, v: f64, w: f64) -> bool {
        let h = &self.heart;
        ((u - h[0]) / h[3]).powi(2) + ((v - h[1]) / h[4]).powi(2) + ((w - h[2]) / h[5]).powi(2)
            < 1.0
    }

    fn in_trachea(&self, u: f64, v: f64, w: f64) -> bool {
        w > 0.4 && u * u + (v - 0.08) * (v - 0.08) < 0.05 * 0.05
    }

    /// `Some(periphery)` when (u, v, w) is inside lung `side`; periphery ∈ [0, 1] grows towards
    /// the pleura.
    fn lung_at(&self, side: usize, u: f64, v: f64, w: f64) -> Option<f64> {
        let g = &self.lungs[side];
        let d2 = ((u - g.cu) / g.ru).powi(2) + ((v - g.cv) / g.rv).powi(2);
        if d2 >= 1.0 || w < g.base + g.dome * (1.0 - d2) || w >= g.apex {
            return None;
        }
        if w > g.mid {
            let t = (w - g.mid) / (g.apex - g.mid);
            if d2 > 1.0 - t * t {
                return None;
            }
        }
        let qb = self.body_radius(u, v);
        if u.abs() < 0.07 || qb >= 0.84 || self.in_heart(u, v, w) || self.in_trachea(u, v, w) {
            return None;
        }
        Some(d2.max((qb / 0.84).powi(2)))
    }

    /// Lobe label of a lung point by the fissure surfaces.
    fn lobe(&self, side: usize, u: f64, v: f64, w: f64) -> u8 {
        let below_oblique = w < self.oblique_height(side, v);
        if side == RIGHT {
            if below_oblique {
                5
            } else if w < self.horizontal_height(u) {
                4
            } else {
                3
            }
        } else if below_oblique {
            2
        } else {
            1
        }
    }

    /// Height w of the oblique fissure of lung `side` at A–P position v (it falls towards the
    /// front with slope `slope / rv`).
    fn oblique_height(&self, side: usize, v: f64) -> f64 {
        let g = &self.lungs[side];
        let (off, slope) = self.oblique[side];
        off - slope * ((v - g.cv) / g.rv)
    }

    /// Height w of the horizontal fissure (right lung) at left–right position u (it rises
    /// laterally with slope `0.05 / ru`).
    fn horizontal_height(&self, u: f64) -> f64 {
        let g = &self.lungs[RIGHT];
        self.horizontal + 0.05 * (u - g.cu) / g.ru
    }

    /// Distance in voxels (of size `vox`, normalised units) from a lung point to the nearest
    /// fissure of its lung: the oblique one, and on the right the horizontal one, which runs
    /// only in front of the oblique fissure. Each fissure is the plane of its height function,
    /// so the distance is the height difference over the plane's gradient in voxel units.
    fn fissure_distance(&self, side: usize, u: f64, v: f64, w: f64, vox: [f64; 3]) -> f64 {
        let g = &self.lungs[side];
        let above_oblique = w - self.oblique_height(side, v);
        let mut d = above_oblique.abs() / (self.oblique[side].1 / g.rv * vox[1]).hypot(vox[2]);
        if side == RIGHT && above_oblique >= 0.0 {
            let above_horizontal = w - self.horizontal_height(u);
            d = d.min(above_horizontal.abs() / (0.05 / g.ru * vox[0]).hypot(vox[2]));
        }
        d
    }

    fn in_vessel(&self, side: usize, p: [f64; 3]) -> bool {
        self.vessels[side].iter().any(|s| {
            let ab = [s.b[0] - s.a[0], s.b[1] - s.a[1], s.b[2] - s.a[2]];
            let ap = [p[0] - s.a[0], p[1] - s.a[1], p[2] - s.a[2]];
            let len2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
            let t = ((ap[0] * ab[0] + ap[1] * ab[1] + ap[2] * ab[2]) / len2).clamp(0.0, 1.0);
            let d = [ap[0] - t * ab[0], ap[1] - t * ab[1], ap[2] - t * ab[2]];
            d[0] * d[0] + d[1] * d[1] + d[2] * d[2] < s.radius * s.radius
        })
    }

    /// Noise-free HU and lobe label at a point; `vox` is the voxel size in normalised units.
    fn voxel(&self, u: f64, v: f64, w: f64, vox: [f64; 3]) -> (f32, u8) {
        let qb = self.body_radius(u, v);
        if qb > 1.0 {
            return (HU_AIR, 0);
        }
        for side in [RIGHT, LEFT] {
            if self.lung_at(side, u, v, w).is_some() {
                let lobe = self.lobe(side, u, v, w);
                if self.in_vessel(side, [u, v, w]) {
                    return (HU_VESSEL, lobe);
                }
                let texture: f64 = self
                    .waves
                    .iter()
                    .map(|k| (k[0] * u + k[1] * v + k[2] * w + k[3]).sin())
                    .sum::<f64>()
                    / 3.0;
                let d = self.fissure_distance(side, u, v, w, vox);
                let fissure = HU_FISSURE * (-d * d).exp() as f32;
                return (HU_LUNG + 25.0 * texture as f32 + fissure, lobe);
            }
        }
        let spine = u * u + (v + 0.5) * (v + 0.5);
        let hu = if self.in_trachea(u, v, w) {
            HU_AIR
        } else if spine < 0.04 * 0.04 {
            HU_VESSEL
        } else if spine < 0.10 * 0.10 {
            HU_BONE
        } else if self.in_heart(u, v, w) {
            HU_SOFT
        } else if qb > 0.94 {
            HU_FAT
        } else if qb > 0.86
            && qb < 0.91
            && (w * self.rib_freq + self.rib_phase).rem_euclid(1.0) < 0.4
        {
            HU_BONE
        } else {
            HU_SOFT
        };
        (hu, 0)
    }
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A standard-normal-like value (sum of four uniforms, variance 1) from a hash.
fn hashed_gauss(seed: u64, index: u64) -> f32 {
    let h = splitmix64(seed ^ splitmix64(index));
    let s: u32 = (0..4).map(|k| ((h >> (16 * k)) & 0xFFFF) as u32).sum();
    (s as f32 / 65535.0 - 2.0) * 3f32.sqrt()
}

/// Normalised coordinate of voxel `i` of `n`.
/// HU of the abdominal organs.
const HU_LIVER: f32 = 60.0;
const HU_BOWEL: f32 = 20.0;
/// Lung-like density of gas mixed with stool.
const HU_STOOL_GAS: f32 = -780.0;
const HU_TABLE: f32 = 250.0;

/// An ellipsoid: centre and radii.
type Ellipsoid = [f64; 6];

fn inside(e: &Ellipsoid, u: f64, v: f64, w: f64) -> bool {
    ((u - e[0]) / e[3]).powi(2) + ((v - e[1]) / e[4]).powi(2) + ((w - e[2]) / e[5]).powi(2) < 1.0
}

/// The seeded organs below the diaphragm (drawn from their own stream, so a chest phantom's
/// bytes do not depend on them).
#[derive(Clone, Debug)]
struct Belly {
    liver: Ellipsoid,
    stomach: Ellipsoid,
    /// The stomach's gas bubble, under the left dome.
    bubble: Ellipsoid,
    /// Bowel loops, their gas pockets (HU −1000) and stool with gas (lung-like density).
    bowel: Vec<Ellipsoid>,
    gas: Vec<(Ellipsoid, f32)>,
}

impl Belly {
    fn draw(anatomy: &Anatomy, rng: &mut ChaCha8Rng) -> Belly {
        let mut j = |centre: f64, spread: f64| centre + rng.gen_range(-spread..=spread);
        let left = anatomy.lungs[LEFT];
        // The left dome's floor above the stomach, and a diaphragm ≥ 0.08 (about 12 mm) thick.
        let floor = left.base + left.dome;
        let bubble = [
            j(left.cu * 0.9, 0.03),
            j(0.1, 0.03),
            floor - 0.16,
            0.09,
            0.08,
            0.06,
        ];
        let stomach = [bubble[0], bubble[1] - 0.05, floor - 0.35, 0.16, 0.15, 0.3];
        let right = anatomy.lungs[RIGHT];
        let liver = [
            j(0.3, 0.03),
            j(0.0, 0.03),
            right.base - 0.32,
            0.42,
            0.42,
            0.3,
        ];
        let mut bowel = vec![];
        let mut gas = vec![];
        for _ in 0..10 {
            let c = [
                rng.gen_range(-0.5..0.5),
                rng.gen_range(-0.3..0.35),
                rng.gen_range(-2.4..-1.25),
            ];
            let r = rng.gen_range(0.08..0.16);
            bowel.push([c[0], c[1], c[2], r, r * 0.8, r * 1.5]);
            let g = r * rng.gen_range(0.3..0.6);
            let hu = if rng.gen_bool(0.7) {
                HU_AIR
            } else {
                HU_STOOL_GAS
            };
            gas.push(([c[0], c[1] + r * 0.3, c[2], g, g, g * 1.2], hu));
        }
        Belly {
            liver,
            stomach,
            bubble,
            bowel,
            gas,
        }
    }

    /// HU of a body point below the diaphragm that is not lung (None: none of the organs).
    fn tissue(&self, u: f64, v: f64, w: f64) -> Option<f32> {
        if inside(&self.bubble, u, v, w) {
            return Some(HU_AIR);
        }
        if let Some((_, hu)) = self.gas.iter().find(|(e, _)| inside(e, u, v, w)) {
            return Some(*hu);
        }
        if inside(&self.stomach, u, v, w) || self.bowel.iter().any(|e| inside(e, u, v, w)) {
            return Some(HU_BOWEL);
        }
        if inside(&self.liver, u, v, w) {
            return Some(HU_LIVER);
        }
        // Pelvic bones.
        if w < -2.2
            && [0.45, -0.45]
                .iter()
                .any(|&c| ((u - c) / 0.22).powi(2) + ((v + 0.15) / 0.12).powi(2) < 1.0)
        {
            return Some(HU_BONE);
        }
        None
    }
}

/// One phantom's scene: the anatomy, what lies around it, and the field of view that maps the
/// grid onto it.
struct Scene {
    anatomy: Anatomy,
    belly: Option<Belly>,
    fov: FieldOfView,
    frame: Frame,
}

impl Scene {
    fn new(anatomy: Anatomy, fov: FieldOfView, frame: Frame, seed: u64) -> Scene {
        // The abdomen's organs, wherever the grid reaches below the lungs' lowest rim.
        let belly = (fov != FieldOfView::Chest || frame.w[0] < -0.9).then(|| {
            Belly::draw(
                &anatomy,
                &mut ChaCha8Rng::seed_from_u64(splitmix64(seed ^ 0xBE11)),
            )
        });
        Scene {
            anatomy,
            belly,
            fov,
            frame,
        }
    }

    /// Anatomy coordinates of grid coordinates (each in [−1, 1]).
    fn to_anatomy(&self, u: f64, v: f64, w: f64) -> [f64; 3] {
        let Frame {
            scale: s,
            w: [lo, hi],
            ..
        } = self.frame;
        [u / s, v / s, lo + (w + 1.0) / 2.0 * (hi - lo)]
    }

    /// Anatomy units per grid unit along each axis.
    fn units(&self) -> [f64; 3] {
        let Frame {
            scale: s,
            w: [lo, hi],
            ..
        } = self.frame;
        [1.0 / s, 1.0 / s, (hi - lo) / 2.0]
    }

    /// Noise-free HU and lobe label at grid point (u, v, w).
    fn voxel(&self, u: f64, v: f64, w: f64, vox: [f64; 3]) -> (f32, u8) {
        let [ua, va, wa] = self.to_anatomy(u, v, w);
        let a = &self.anatomy;
        // The body narrows from the shoulders (w 0.95) to the neck (w 1.25).
        let neck = ((wa - 0.95) / 0.3).clamp(0.0, 1.0) * 0.5;
        let qb = ((ua / (a.bu * (1.0 - neck))).powi(2)
            + (va / (a.bv * (1.0 - neck * 0.6))).powi(2))
        .sqrt();
        if qb > 1.0 || (wa > 0.95 && qb > 0.94) {
            return (self.outside_body(ua, va, wa), 0);
        }
        if let Some(belly) = &self.belly {
            let below_lungs = a.lungs.iter().all(|g| wa < g.base + g.dome - 0.05);
            if below_lungs
                && a.lung_at(RIGHT, ua, va, wa).is_none()
                && a.lung_at(LEFT, ua, va, wa).is_none()
            {
                let spine = ua * ua + (va + 0.5) * (va + 0.5);
                if qb <= 0.94 && spine >= 0.10 * 0.10 {
                    if let Some(hu) = belly.tissue(ua, va, wa) {
                        return (hu, 0);
                    }
                }
            }
        }
        let (hu, lobe) = a.voxel(ua, va, wa, vox);
        // Ribs belong to the thorax.
        if hu == HU_BONE && qb > 0.86 && !(-1.1..0.95).contains(&wa) {
            return (HU_SOFT, lobe);
        }
        (hu, lobe)
    }

    /// What lies outside the body at anatomy point (u, v, w): the arms (neck-to-pelvis
    /// scans), the table (a 10 mm couch 8 mm under the back), air.
    fn outside_body(&self, u: f64, v: f64, w: f64) -> f32 {
        if self.fov == FieldOfView::Body && (-2.3..0.95).contains(&w) {
            for c in [1.1, -1.1] {
                let q = ((u - c) / 0.13).powi(2) + ((v + 0.03) / 0.17).powi(2);
                if q < 1.0 {
                    let bone = ((u - c) / 0.046).powi(2) + ((v + 0.03) / 0.046).powi(2);
                    return if bone < 1.0 {
                        HU_BONE
                    } else if q > 0.75 {
                        HU_FAT
                    } else {
                        HU_SOFT
                    };
                }
            }
        }
        let back = -self.anatomy.bv;
        if self.frame.table && (back - 0.09..back - 0.04).contains(&v) && u.abs() < 1.2 {
            return HU_TABLE;
        }
        HU_AIR
    }
}

fn coord(i: usize, n: usize) -> f64 {
    (i as f64 + 0.5) / n as f64 * 2.0 - 1.0
}

/// Generates the phantom of `spec` for `seed`.
pub fn generate(spec: &PhantomSpec, seed: u64) -> Phantom {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let scene = Scene::new(Anatomy::draw(&mut rng), spec.fov, spec.frame, seed);
    let [nx, ny, nz] = spec.shape;
    let n = nx * ny;
    let units = scene.units();
    let vox = [
        2.0 / nx as f64 * units[0],
        2.0 / ny as f64 * units[1],
        2.0 / nz as f64 * units[2],
    ];
    let mut hu = vec![0f32; n * nz];
    let mut lobes = vec![0u8; n * nz];
    hu.par_chunks_mut(n)
        .zip(lobes.par_chunks_mut(n))
        .enumerate()
        .for_each(|(z, (hs, ls))| {
            let w = coord(z, nz);
            for y in 0..ny {
                let v = coord(y, ny);
                for x in 0..nx {
                    let (h, l) = scene.voxel(coord(x, nx), v, w, vox);
                    hs[y * nx + x] = h;
                    ls[y * nx + x] = l;
                }
            }
        });
    let counts = place_lesions(&scene, spec, &mut rng, &mut hu, &lobes);
    let noise_seed = splitmix64(seed ^ 0x5EED);
    let sigma = spec.noise_hu;
    hu.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (k, h) in chunk.iter_mut().enumerate() {
                let idx = (c << 16) + k;
                *h = (*h + sigma * hashed_gauss(noise_seed, idx as u64)).clamp(-1024.0, 3071.0);
            }
        });
    Phantom {
        spec: spec.clone(),
        hu,
        lobes,
        counts,
    }
}

/// Draws per-lobe involvement targets and paints ground-glass and consolidation blobs into
/// each lobe (centres preferring the periphery) until the lobe reaches its target.
fn place_lesions(
    scene: &Scene,
    spec: &PhantomSpec,
    rng: &mut ChaCha8Rng,
    hu: &mut [f32],
    lobes: &[u8],
) -> [(usize, usize); NUM_LOBES] {
    let [nx, ny, nz] = spec.shape;
    let mut members: Vec<Vec<u32>> = vec![Vec::new(); NUM_LOBES];
    for (i, &l) in lobes.iter().enumerate() {
        if l > 0 {
            members[l as usize - 1].push(i as u32);
        }
    }
    let total_lung: usize = members.iter().map(Vec::len).sum();
    let total_target = if spec.severe {
        rng.gen_range(0.32..0.80)
    } else if rng.gen_bool(0.25) {
        0.0
    } else {
        rng.gen_range(0.03..0.20)
    };
    let weights: Vec<f64> = (0..NUM_LOBES).map(|_| rng.gen_range(0.6..1.4)).collect();
    let weighted: f64 = weights
        .iter()
        .zip(&members)
        .map(|(g, m)| g * m.len() as f64)
        .sum::<f64>()
        .max(1.0);
    let consolidation_share = if spec.severe { 0.4 } else { 0.15 };
    let mut lesion = vec![false; lobes.len()];
    let mut counts = [(0usize, 0usize); NUM_LOBES];
    for l in 0..NUM_LOBES {
        let list = &members[l];
        counts[l].0 = list.len();
        let target = (total_target * weights[l] * total_lung as f64 / weighted).min(0.95);
        if list.is_empty() || target <= 0.0 {
            continue;
        }
        let goal = (target * list.len() as f64).ceil() as usize;
        let label = l as u8 + 1;
        let side = if label >= 3 { RIGHT } else { LEFT };
        let mut covered = 0usize;
        for _ in 0..600 {
            if covered >= goal {
                break;
            }
            let mut centre = list[rng.gen_range(0..list.len())] as usize;
            for _ in 0..40 {
                let (x, y, z) = (centre % nx, (centre / nx) % ny, centre / (nx * ny));
                let [u, v, w] = scene.to_anatomy(coord(x, nx), coord(y, ny), coord(z, nz));
                let periphery = scene.anatomy.lung_at(side, u, v, w).unwrap_or(1.0);
                if rng.gen_bool(periphery.clamp(0.05, 1.0).powi(2)) {
                    break;
                }
                centre = list[rng.gen_range(0..list.len())] as usize;
            }
            // Radii in anatomy units, then in grid units along each axis.
            let scale = rng.gen_range(0.04..0.09) * (1.0 + 1.5 * target);
            let mut radii = [
                scale * rng.gen_range(0.7..1.3),
                scale * rng.gen_range(0.7..1.3),
                scale * rng.gen_range(0.7..1.3),
            ];
            for (r, u) in radii.iter_mut().zip(scene.units()) {
                *r /= u;
            }
            let value: f32 = if rng.gen_bool(consolidation_share) {
                rng.gen_range(-80.0..40.0)
            } else {
                rng.gen_range(-700.0..-350.0)
            };
            let c = [centre % nx, (centre / nx) % ny, centre / (nx * ny)];
            let dims = [nx, ny, nz];
            let range: [(usize, usize); 3] = std::array::from_fn(|a| {
                let half = (radii[a] * dims[a] as f64 / 2.0).ceil() as usize + 1;
                (c[a].saturating_sub(half), (c[a] + half + 1).min(dims[a]))
            });
            let cu = [coord(c[0], nx), coord(c[1], ny), coord(c[2], nz)];
            for z in range[2].0..range[2].1 {
                let dz = (coord(z, nz) - cu[2]) / radii[2];
                for y in range[1].0..range[1].1 {
                    let dy = (coord(y, ny) - cu[1]) / radii[1];
                    for x in range[0].0..range[0].1 {
                        let dx = (coord(x, nx) - cu[0]) / radii[0];
                        let i = (z * ny + y) * nx + x;
                        if dx * dx + dy * dy + dz * dz < 1.0 && lobes[i] == label && !lesion[i] {
                            lesion[i] = true;
                            hu[i] = value;
                            covered += 1;
                        }
                    }
                }
            }
        }
        counts[l].1 = covered;
    }
    counts
}

impl Phantom {
    /// The ground truth, with file names for a case id.
    pub fn truth(&self, case_id: &str, seed: u64, ext: &str) -> CaseTruth {
        let voxel_ml = self.spec.spacing.iter().product::<f64>() / 1000.0;
        let lobes: Vec<LobeTruth> = self
            .counts
            .iter()
            .enumerate()
            .map(|(l, &(voxels, lesion_voxels))| LobeTruth {
                label: l as u8 + 1,
                name: LOBE_NAMES[l].to_string(),
                voxels,
                volume_ml: voxels as f64 * voxel_ml,
                lesion_voxels,
                involvement: if voxels > 0 {
                    lesion_voxels as f64 / voxels as f64
                } else {
                    0.0
                },
            })
            .collect();
        let lung: usize = self.counts.iter().map(|c| c.0).sum();
        let lesion: usize = self.counts.iter().map(|c| c.1).sum();
        let total = if lung > 0 {
            lesion as f64 / lung as f64
        } else {
            0.0
        };
        let grade = ct_grade(total);
        CaseTruth {
            case_id: case_id.to_string(),
            image: format!("{case_id}.{ext}"),
            mask: format!("{case_id}_mask.{ext}"),
            seed,
            spec: self.spec.clone(),
            lobes,
            total_involvement: total,
            ct_grade: grade,
            ct_grade_name: format!("CT-{grade}"),
            severe: grade >= 2,
            label: (grade >= 2) as u8,
        }
    }

    /// The orientation of the written array and its affine (centred on the world origin).
    pub fn native_geometry(&self) -> Result<(Orientation, [[f64; 4]; 4])> {
        let c = self.spec.shape;
        let probe = Orientation::from_axcodes(&self.spec.orientation, [0; 3])?;
        let mut native_dims = [0usize; 3];
        for j in 0..3 {
            native_dims[probe.perm[j]] = c[j];
        }
        let orientation = Orientation::from_axcodes(&self.spec.orientation, native_dims)?;
        let mut affine = [[0.0; 4]; 4];
        affine[3][3] = 1.0;
        for j in 0..3 {
            let s = self.spec.spacing[j];
            let origin = -(c[j] as f64 - 1.0) / 2.0 * s;
            let i = orientation.perm[j];
            if orientation.flip[j] {
                affine[j][i] = -s;
                affine[j][3] = origin + s * (c[j] as f64 - 1.0);
            } else {
                affine[j][i] = s;
                affine[j][3] = origin;
            }
        }
        Ok((orientation, affine))
    }

    /// Writes `<case_id>.nii[.gz]`, `<case_id>_mask.nii[.gz]` and `<case_id>.json` in `dir`:
    /// all three or, on failure, none.
    pub fn write(&self, dir: &Path, case_id: &str, seed: u64, gzip: bool) -> Result<CaseTruth> {
        let mut staged = StagedFiles::default();
        let truth = self.stage(&mut staged, dir, case_id, seed, gzip)?;
        staged.commit()?;
        Ok(truth)
    }

    /// [`Phantom::write`] into temporaries of `staged`, renamed when it is committed.
    pub fn stage(
        &self,
        staged: &mut StagedFiles,
        dir: &Path,
        case_id: &str,
        seed: u64,
        gzip: bool,
    ) -> Result<CaseTruth> {
        let ext = if gzip { "nii.gz" } else { "nii" };
        let truth = self.truth(case_id, seed, ext);
        let (orientation, affine) = self.native_geometry()?;
        let d = orientation.native_dims;
        let mut h = NiftiHeader {
            dim: [3, d[0] as u16, d[1] as u16, d[2] as u16, 1, 1, 1, 1],
            xyzt_units: 2,
            descrip: b"m2unet synth phantom".to_vec(),
            ..NiftiHeader::default()
        };
        let (sform, qform) = match self.spec.xform {
            XformKind::Both => (true, true),
            XformKind::SformOnly => (true, false),
            XformKind::QformOnly => (false, true),
        };
        set_header_affine(&mut h, &affine, sform, qform);
        let native_hu = orientation.from_canonical(&self.hu);
        let image_path = dir.join(&truth.image);
        let mut image = |h: &NiftiHeader, data: VoxelData| {
            staged.write(&image_path, |w| write_nifti_to(w, h, data, gzip))
        };
        match self.spec.dtype {
            StoredDtype::Int16 => {
                let v: Vec<i16> = native_hu.iter().map(|&x| x.round() as i16).collect();
                h.scl_slope = 1.0;
                h.scl_inter = 0.0;
                image(&h, VoxelData::I16(&v))?;
            }
            StoredDtype::Float32 => {
                h.scl_slope = 1.0;
                h.scl_inter = 0.0;
                image(&h, VoxelData::F32(&native_hu))?;
            }
            StoredDtype::Uint16 => {
                let v: Vec<u16> = native_hu
                    .iter()
                    .map(|&x| ((x + 1024.0) / 0.5).round().clamp(0.0, 65535.0) as u16)
                    .collect();
                h.scl_slope = 0.5;
                h.scl_inter = -1024.0;
                image(&h, VoxelData::U16(&v))?;
            }
        }
        drop(native_hu);
        let native_mask = orientation.from_canonical(&self.lobes);
        let mut mh = h.clone();
        mh.scl_slope = 1.0;
        mh.scl_inter = 0.0;
        mh.intent_code = 1002;
        mh.cal_max = 5.0;
        mh.descrip = b"m2unet synth lobe mask".to_vec();
        staged.write(&dir.join(&truth.mask), |w| {
            write_nifti_to(w, &mh, VoxelData::U8(&native_mask), gzip)
        })?;
        staged.write(&dir.join(format!("{case_id}.json")), |w| {
            Ok(serde_json::to_writer_pretty(w, &truth)?)
        })?;
        Ok(truth)
    }
}

/// What a synthetic set fixes; whatever is `None` is drawn per case from the seed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SynthOptions {
    /// Seed of the whole set (case i uses a stream derived from it).
    pub seed: u64,
    /// Grid size X,Y,Z in voxels along the canonical axes.
    pub shape: Option<[usize; 3]>,
    /// Voxel spacing X,Y,Z in mm (canonical order).
    pub spacing: Option<[f64; 3]>,
    /// Axis codes of the stored array (e.g. RAS, LPS, PSR).
    pub orientation: Option<String>,
    pub dtype: Option<StoredDtype>,
    /// Voxel noise standard deviation in HU.
    pub noise: Option<f32>,
    /// What each case's grid covers around the lungs (None: the chest).
    pub fov: Option<FovChoice>,
    /// How the grids are sized.
    pub geometry: Geometry,
}

/// The field of view of a set's cases: one for all, or drawn per case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FovChoice {
    Chest,
    Body,
    Abdomen,
    /// Per case: the chest (60 %), neck to pelvis (25 %) or the abdomen with the lung bases
    /// (15 %), drawn from a stream of its own (the other draws stay as for the chest).
    Mixed,
}

/// The spec of case `index` of a synthetic set (drawn from its own stream of the seed).
pub fn case_spec(args: &SynthOptions, index: usize, severe: bool) -> Result<PhantomSpec> {
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    rng.set_stream(index as u64 + 1);
    let fov = match args.fov {
        None | Some(FovChoice::Chest) => FieldOfView::Chest,
        Some(FovChoice::Body) => FieldOfView::Body,
        Some(FovChoice::Abdomen) => FieldOfView::Abdomen,
        Some(FovChoice::Mixed) => {
            let mut own = ChaCha8Rng::seed_from_u64(args.seed ^ 0xF0F);
            own.set_stream(index as u64 + 1);
            match own.gen_range(0..20) {
                0..12 => FieldOfView::Chest,
                12..17 => FieldOfView::Body,
                _ => FieldOfView::Abdomen,
            }
        }
    };
    let (shape, spacing, frame) = match args.geometry {
        Geometry::Fill => {
            let (shape, spacing) = filled_grid(args, fov, &mut rng)?;
            (shape, spacing, fov.frame())
        }
        Geometry::Clinical => {
            if args.shape.is_some() || args.spacing.is_some() {
                bail!("the clinical geometry draws each case's shape and spacing: give neither");
            }
            clinical_grid(fov, &mut rng)
        }
    };
    let orientation = match &args.orientation {
        Some(o) => {
            Orientation::from_axcodes(o, [1; 3])?;
            o.to_ascii_uppercase()
        }
        None => ["RAS", "LPS", "LAS"]
            .choose(&mut rng)
            .expect("non-empty")
            .to_string(),
    };
    let dtype = match args.dtype {
        Some(d) => d,
        None => *[
            StoredDtype::Int16,
            StoredDtype::Float32,
            StoredDtype::Uint16,
        ]
        .choose(&mut rng)
        .expect("non-empty"),
    };
    let xform = *[XformKind::Both, XformKind::SformOnly, XformKind::QformOnly]
        .choose(&mut rng)
        .expect("non-empty");
    let noise_hu = match args.noise {
        Some(n) if n.is_finite() && n >= 0.0 => n,
        Some(n) => bail!("--noise {n} must be a non-negative number of HU"),
        None => rng.gen_range(5.0..30.0),
    };
    Ok(PhantomSpec {
        shape,
        spacing,
        orientation,
        dtype,
        xform,
        noise_hu,
        severe,
        fov,
        frame,
    })
}

/// Shape and spacing of a grid the anatomy fills ([`Geometry::Fill`]): as given, or drawn.
fn filled_grid(
    args: &SynthOptions,
    fov: FieldOfView,
    rng: &mut ChaCha8Rng,
) -> Result<([usize; 3], [f64; 3])> {
    // The grid spans more than the thorax when the field of view is wider: the drawn spacing
    // keeps the thorax at an adult's size.
    let Frame {
        scale, w: [lo, hi], ..
    } = fov.frame();
    let (max_fov, max_height) = (MAX_FOV_MM / scale, MAX_HEIGHT_MM * (hi - lo) / 2.0);
    let shape = match args.shape {
        Some(s) => {
            check_shape(s)?;
            s
        }
        None => {
            let nx = *[112usize, 128, 144].choose(rng).expect("non-empty");
            let ny = if rng.gen_bool(0.5) { nx } else { nx - 16 };
            [nx, ny, rng.gen_range(64..=112)]
        }
    };
    let spacing = match args.spacing {
        Some(s) => s,
        None => {
            // The anatomy fills the grid, so a large grid gets finer voxels: the field of view
            // stays within an adult chest's (≤ 400 mm across, lungs ≤ 300 mm tall).
            let inplane: f64 = rng.gen_range(0.6..1.0);
            let inplane = inplane.min(max_fov / shape[0].max(shape[1]) as f64);
            let slice: f64 = rng.gen_range(1.0..5.0);
            [inplane, inplane, slice.min(max_height / shape[2] as f64)]
        }
    };
    Ok((shape, spacing))
}

/// Slice thicknesses scanners reconstruct, in mm.
const SLICE_MM: [f64; 7] = [0.625, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0];

/// Shape, spacing and frame of a grid as a scanner acquires it ([`Geometry::Clinical`]): an
/// adult of drawn size at physical scale, an in-plane matrix of 384, 512 or 768 pixels over a
/// field of view wider than the body (pixels 0.5–1 mm), and a drawn slice thickness over the
/// scanned range (a chest from below the lung bases to above the apices), at most 600 slices.
fn clinical_grid(fov: FieldOfView, rng: &mut ChaCha8Rng) -> ([usize; 3], [f64; 3], Frame) {
    let size: f64 = rng.gen_range(0.85..1.1);
    let [mm_uv, mm_w] = MM_PER_UNIT.map(|m| m * size);
    // The body is at most 2 × 0.89 units wide.
    let body_mm = 2.0 * 0.89 * mm_uv;
    let fov_mm: f64 = rng.gen_range(body_mm * 1.05..500f64.max(body_mm * 1.1));
    let mut n = *[384usize, 512, 512, 512, 512, 512, 768]
        .choose(rng)
        .expect("non-empty");
    if !(0.5..=1.0).contains(&(fov_mm / n as f64)) {
        n = 512;
    }
    let pixel = fov_mm / n as f64;
    let [lo, hi] = match fov {
        FieldOfView::Chest => [rng.gen_range(-1.25..-0.9), rng.gen_range(0.95..1.2)],
        _ => fov.frame().w,
    };
    let range_mm = (hi - lo) * mm_w;
    let most = 600.min(MAX_PHANTOM_VOXELS / (n * n));
    let thick: Vec<f64> = SLICE_MM
        .into_iter()
        .filter(|t| range_mm / t <= most as f64)
        .collect();
    let slice = *thick.choose(rng).expect("5 mm slices always fit");
    let nz = (range_mm / slice).round() as usize;
    let frame = Frame {
        scale: 2.0 * mm_uv / fov_mm,
        w: [lo, lo + nz as f64 * slice / mm_w],
        table: true,
    };
    ([n, n, nz], [pixel, pixel, slice], frame)
}

/// Largest in-plane field of view (mm) and head-to-foot extent (mm) of a drawn spacing.
const MAX_FOV_MM: f64 = 400.0;
const MAX_HEIGHT_MM: f64 = 300.0;

/// The drawn classes of `count` cases: alternating severe/non-severe, shuffled by the seed.
pub fn case_classes(count: usize, seed: u64) -> Vec<bool> {
    let mut classes: Vec<bool> = (0..count).map(|i| i % 2 == 1).collect();
    classes.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0xC1A55));
    classes
}

/// Largest phantom in voxels (e.g. 512×512×1024): the generator holds about
/// [`PEAK_BYTES_PER_VOXEL`] bytes per voxel at its peak, 4 GiB at this size.
pub const MAX_PHANTOM_VOXELS: usize = 1 << 28;

/// Most bytes per voxel the generator and the writer hold at once: the canonical HU (4) and
/// labels (1), the lesion flags (1) and lobe member lists (up to 8 while they grow), or while
/// writing the native HU (4) and their stored values (up to 2).
pub const PEAK_BYTES_PER_VOXEL: usize = 16;

/// Checks a phantom's grid size: at least 16×16×2, at most 2048 per axis and
/// [`MAX_PHANTOM_VOXELS`] in all.
pub fn check_shape(shape: [usize; 3]) -> Result<()> {
    let [x, y, z] = shape;
    if x < 16 || y < 16 || z < 2 || shape.iter().any(|&d| d > 2048) {
        bail!("a phantom's shape {x}×{y}×{z} must be at least 16×16×2 and at most 2048 per axis");
    }
    let voxels = x * y * z;
    if voxels > MAX_PHANTOM_VOXELS {
        bail!(
            "a {x}×{y}×{z} phantom has {voxels} voxels, more than the {MAX_PHANTOM_VOXELS} (e.g. \
             512×512×1024) the generator makes: it needs about {PEAK_BYTES_PER_VOXEL} bytes per \
             voxel ({})",
            gib(voxels * PEAK_BYTES_PER_VOXEL)
        );
    }
    Ok(())
}

/// `bytes` in GiB with one decimal.
fn gib(bytes: usize) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Fails clearly, instead of aborting later, when the memory a phantom of `shape` needs at its
/// peak cannot be allocated: that much is reserved (not touched) and released again.
fn check_memory(shape: [usize; 3]) -> Result<()> {
    let bytes = shape.iter().product::<usize>() * PEAK_BYTES_PER_VOXEL;
    let mut probe: Vec<u8> = Vec::new();
    probe.try_reserve_exact(bytes).map_err(|_| {
        anyhow!(
            "cannot allocate {} for a {}×{}×{} phantom (about {PEAK_BYTES_PER_VOXEL} bytes per \
             voxel); choose a smaller --shape",
            gib(bytes),
            shape[0],
            shape[1],
            shape[2]
        )
    })
}

/// Writes `count` phantoms `case_NNNN` into `out` (created when missing; `.nii.gz` with `gzip`,
/// else `.nii`) and `manifest.csv` (image, mask, label, case_id) over all of them: the whole set
/// or, on failure, nothing (a folder it created is removed again).
///
/// `out` must be empty, or with `overwrite` hold only an earlier set's files
/// ([`is_set_file`]): the new set replaces it, and its files that the new set does not have are
/// removed, so no stale case stays beside the new manifest.
pub fn write_set(
    out: &Path,
    count: usize,
    args: &SynthOptions,
    gzip: bool,
    overwrite: bool,
) -> Result<()> {
    let classes = case_classes(count, args.seed);
    let specs = (0..count)
        .map(|i| case_spec(args, i, classes[i]))
        .collect::<Result<Vec<_>>>()?;
    let largest = specs
        .iter()
        .map(|s| s.shape)
        .max_by_key(|s| s.iter().product::<usize>())
        .expect("at least one case");
    check_memory(largest)?;
    let previous = previous_set(out, overwrite)?;
    let created = create_folder(out)?;
    let written = stage_set(out, &specs, args.seed, gzip).and_then(|staged| staged.commit());
    if let Err(e) = written {
        if let Some(top) = created {
            let _ = std::fs::remove_dir_all(top);
        }
        return Err(e);
    }
    let kept = set_file_names(count, gzip);
    for name in previous.iter().filter(|n| !kept.contains(n)) {
        let path = out.join(name);
        match std::fs::remove_file(&path) {
            // A stale temporary may already be gone: writing its file removed it.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => bail!(
                "the new set is written, but its predecessor's {} cannot be removed: {e}",
                path.display()
            ),
            _ => {}
        }
    }
    Ok(())
}

/// Every case of a set and its manifest (last) written into temporaries in `out`.
fn stage_set(out: &Path, specs: &[PhantomSpec], seed: u64, gzip: bool) -> Result<StagedFiles> {
    let mut staged = StagedFiles::default();
    let mut manifest = String::from("image,mask,label,case_id\n");
    for (i, spec) in specs.iter().enumerate() {
        let case_seed = splitmix64(seed ^ splitmix64(i as u64 + 1));
        let phantom = generate(spec, case_seed);
        let truth = phantom.stage(&mut staged, out, &case_name(i), case_seed, gzip)?;
        manifest.push_str(&format!(
            "{},{},{},{}\n",
            truth.image, truth.mask, truth.label, truth.case_id
        ));
    }
    staged.write(&out.join(MANIFEST), |w| {
        Ok(w.write_all(manifest.as_bytes())?)
    })?;
    Ok(staged)
}

/// The manifest of a set.
const MANIFEST: &str = "manifest.csv";

/// The case id of case `i`.
fn case_name(i: usize) -> String {
    format!("case_{i:04}")
}

/// The file names of a set of `count` cases.
fn set_file_names(count: usize, gzip: bool) -> Vec<String> {
    let ext = if gzip { "nii.gz" } else { "nii" };
    let mut names: Vec<String> = (0..count)
        .flat_map(|i| {
            let id = case_name(i);
            [
                format!("{id}.{ext}"),
                format!("{id}_mask.{ext}"),
                format!("{id}.json"),
            ]
        })
        .collect();
    names.push(MANIFEST.to_string());
    names
}

/// Whether `name` is a file that [`write_set`] writes: `manifest.csv`, `case_N.json`,
/// `case_N.nii[.gz]` or `case_N_mask.nii[.gz]` (N decimal digits).
pub fn is_set_file(name: &str) -> bool {
    if name == MANIFEST {
        return true;
    }
    let Some(rest) = name.strip_prefix("case_") else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0
        && [".json", ".nii", ".nii.gz", "_mask.nii", "_mask.nii.gz"].contains(&&rest[digits..])
}

/// The names in `out` that a new set replaces: none when `out` is missing or empty; with
/// `overwrite` the files of an earlier set and the temporaries of killed writers; otherwise
/// (or with anything else in the folder) an error.
fn previous_set(out: &Path, overwrite: bool) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(out) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => bail!("cannot use {} as the output folder: {e}", out.display()),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", out.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if overwrite && !(is_file && (is_set_file(&name) || is_stale_temporary(&name))) {
            bail!(
                "{}: --overwrite replaces a synthetic set, but the folder also holds {name:?}, \
                 which synth does not write; move it away or choose another --out",
                out.display()
            );
        }
        names.push(name);
    }
    if !overwrite && !names.is_empty() {
        names.sort();
        bail!(
            "{} is not empty (it holds {} entries: {}{}); pass --overwrite to replace the \
             synthetic set in it, or choose another --out",
            out.display(),
            names.len(),
            names[..names.len().min(3)].join(", "),
            if names.len() > 3 { ", …" } else { "" }
        );
    }
    Ok(names)
}

/// Creates `dir` when missing; returns the outermost folder it created (to remove on failure).
fn create_folder(dir: &Path) -> Result<Option<PathBuf>> {
    let mut top = None;
    for ancestor in dir.ancestors().filter(|a| !a.as_os_str().is_empty()) {
        if ancestor.exists() {
            break;
        }
        top = Some(ancestor.to_path_buf());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
    Ok(top)
}
