//! The physical lung mask of a canonical CT: air-density parenchyma inside the body, without outside air, airways or gas, with vessels and lesions filled back in.
//!
//! Steps (each a rule stated where its constant is defined):
//! 1. per axial slice, the body (`preprocess::body_mask`) and the air-density voxels inside it
//!    (below [`AIR_HU`]), as row runs;
//! 2. the trachea and main bronchi traced from the top of the scan down through small, central,
//!    pure-air 2D components until they enter the lungs, and removed;
//! 3. 3D components of the rest (6-connected); a component is lung unless it touches the image
//!    border (air connected to the outside), is smaller than [`MIN_LUNG_ML`] or than
//!    [`MIN_BODY_SHARE`] of the body in its slices (bowel gas, sinuses, noise specks), or is pure
//!    air by its mean HU (stomach, bowel and airway gas, see [`GAS_MEAN_HU`]);
//! 4. sides: a component with a large share on both sides of the body's midline (lungs touching at
//!    the junction lines) is split there; each side keeps its largest piece, and further pieces of
//!    at least [`EXTRA_PIECE_SHARE`] of it that overlap it in z;
//! 5. per slice and side, a closing with a disc of [`CLOSING_MM`] and filling of holes up to
//!    [`MAX_HOLE_MM2`], then a closing
//!    along z over [`Z_CLOSING_MM`]: vessels, airway walls and dense lesions inside the lung
//!    come back;
//! 6. the envelope: the mask grown by [`ENVELOPE_MM`] in-plane and along z, inside the body and
//!    without the air that step 3 rejected, so that consolidation replacing the lung beside its
//!    aerated part (a pleural-based lesion, a consolidated base) is not cut away from the lobes,
//!    while the neck, the abdomen, gas and anything outside the body are.
//!
//! Arrays are canonical RAS+ (x fastest; larger x is the patient's right, larger z superior).

use crate::data::preprocess::{body_mask, find, union, CanonicalCt};
use rayon::prelude::*;

/// Voxels below this are air-density candidates: aerated lung is −950…−600 HU, ground glass
/// reaches about −300, soft tissue and fluid are above −100.
pub const AIR_HU: f32 = -400.0;
/// The body threshold of the per-slice body mask (as the preprocessing uses).
const BODY_HU: f32 = -500.0;
/// A component whose mean HU is at or below this is gas, not lung: parenchyma is a mixture of
/// air and tissue (healthy lung about −850, even severe emphysema averages above −950, the
/// emphysema threshold itself), while gas in the stomach, bowel or airways is pure air
/// (−1000 with noise and a little partial volume at its walls).
pub const GAS_MEAN_HU: f64 = -950.0;
/// Smallest lung component in mL: a lung, even a base cut by the field of view, holds more;
/// sinuses, mastoid cells and noise specks hold less.
pub const MIN_LUNG_ML: f64 = 1.0;
/// A lung component holds at least this share of the body volume over the slices it spans:
/// lungs fill a quarter to a half of the chest's cross-section (their bases a few per cent at
/// the least), while gas bubbles in bowel content hold a fraction of a per cent of the abdomen.
pub const MIN_BODY_SHARE: f64 = 0.02;
/// A component with at least this share of its voxels on each side of the body's midline is
/// split there (two lungs touching at the anterior or posterior junction line).
const SPLIT_SHARE: f64 = 0.2;
/// Further pieces on a side are kept when at least this share of the side's largest piece and
/// overlapping it in z (a lung split by a dense lesion); smaller or lower pieces are gas.
pub const EXTRA_PIECE_SHARE: f64 = 0.1;
/// Radius of the in-plane closing (mm): fills bays up to 30 mm wide, such as a consolidation
/// against the pleura, but not the heart's impression on the left lung (about 100 mm).
pub const CLOSING_MM: f64 = 15.0;
/// Largest hole filled in a slice (mm²): vessels and bronchi inside the lung are under 3 cm²;
/// a larger enclosed region, such as the liver dome ringed by the lung base, is not lung.
pub const MAX_HOLE_MM2: f64 = 1000.0;
/// Half-length of the closing along z (mm): a slice where a region holds no air between two
/// slices that do is filled back.
pub const Z_CLOSING_MM: f64 = 10.0;
/// How far the envelope reaches beyond the mask (mm), in-plane and along z: severe phantoms'
/// lesions (up to 64 mm across, against the pleura or filling a base) lie within it, and the
/// abdomen and neck more than this far from aerated lung are cut.
pub const ENVELOPE_MM: f64 = 40.0;
/// The airway lumen in a slice is at most this area (mm²): the adult trachea is 13–25 mm wide.
const AIRWAY_MAX_MM2: f64 = 800.0;
/// An airway seed's mean HU is at most this (a lumen of pure air, unlike lung parenchyma).
const AIRWAY_SEED_HU: f64 = -900.0;
/// An airway seed lies within this share of the body's width from the body's centre.
const AIRWAY_CENTRAL_SHARE: f64 = 0.15;

/// Label of the right lung in [`LungMask::labels`].
pub const RIGHT: u8 = 1;
/// Label of the left lung in [`LungMask::labels`].
pub const LEFT: u8 = 2;

/// The lung mask of a volume and what the quality gate measures on it.
#[derive(Clone, Debug)]
pub struct LungMask {
    pub dims: [usize; 3],
    /// Per canonical voxel: 0 outside the lungs, [`RIGHT`] or [`LEFT`].
    pub labels: Vec<u8>,
    /// Per canonical voxel: inside the envelope, where lobe labels are kept.
    pub envelope: Vec<bool>,
    /// Lung voxels per canonical slice.
    pub per_slice: Vec<usize>,
    /// Body voxels (hole-filled body mask) per canonical slice.
    pub body_per_slice: Vec<usize>,
    /// Voxels of the right and left lung.
    pub sides: [usize; 2],
    /// Voxels removed as trachea and main bronchi.
    pub airway_voxels: usize,
}

impl LungMask {
    pub fn voxels(&self) -> usize {
        self.sides[0] + self.sides[1]
    }

    /// Whether voxel `i` is inside the lung mask.
    pub fn contains(&self, i: usize) -> bool {
        self.labels[i] != 0
    }

    /// Lung voxels over body voxels in the slices that hold any lung; `None` without lung.
    pub fn lung_body_fraction(&self) -> Option<f64> {
        let body: usize = self
            .per_slice
            .iter()
            .zip(&self.body_per_slice)
            .filter(|(&l, _)| l > 0)
            .map(|(_, &b)| b)
            .sum();
        (body > 0).then(|| self.voxels() as f64 / body as f64)
    }
}

/// An x run of air-density voxels in one row, with its sums.
#[derive(Clone, Copy, Debug)]
struct Run {
    y: u32,
    x0: u32,
    x1: u32,
    hu_sum: f64,
}

impl Run {
    fn len(&self) -> usize {
        (self.x1 - self.x0) as usize
    }
}

/// One slice's body and air runs, with its 2D (4-connected) air components.
#[derive(Default)]
struct SliceAir {
    runs: Vec<Run>,
    /// Index of the first run of each row (ny + 1 entries).
    row_start: Vec<usize>,
    /// Per run: its 2D component (the lowest run index in it).
    comp: Vec<u32>,
    body_pixels: usize,
    /// Body centre and width along x (voxels); `None` without body.
    centre_x: Option<f64>,
    body_width: f64,
}

/// Calls `join(i, j)` for every pair of runs, `i` in `a` and `j` in `b` (index ranges of runs
/// sorted by x), whose x ranges overlap.
fn overlapping(
    runs_a: &[Run],
    a: std::ops::Range<usize>,
    runs_b: &[Run],
    b: std::ops::Range<usize>,
    mut join: impl FnMut(usize, usize),
) {
    let (mut i, mut j) = (a.start, b.start);
    while i < a.end && j < b.end {
        let (ra, rb) = (runs_a[i], runs_b[j]);
        if ra.x0 < rb.x1 && rb.x0 < ra.x1 {
            join(i, j);
        }
        if ra.x1 <= rb.x1 {
            i += 1;
        } else {
            j += 1;
        }
    }
}

/// The body and air runs of slice `z`.
fn slice_air(ct: &CanonicalCt, z: usize) -> SliceAir {
    let [nx, ny, _] = ct.dims;
    let hu = ct.slice(z);
    let Some(body) = body_mask(hu, nx, ny, BODY_HU) else {
        return SliceAir {
            row_start: vec![0; ny + 1],
            ..SliceAir::default()
        };
    };
    let mut runs = Vec::new();
    let mut row_start = Vec::with_capacity(ny + 1);
    for y in 0..ny {
        row_start.push(runs.len());
        let row = &hu[y * nx..(y + 1) * nx];
        let inside = &body.mask[y * nx..(y + 1) * nx];
        let mut x = 0;
        while x < nx {
            if inside[x] && row[x] < AIR_HU {
                let x0 = x;
                let mut sum = 0.0;
                while x < nx && inside[x] && row[x] < AIR_HU {
                    sum += row[x] as f64;
                    x += 1;
                }
                runs.push(Run {
                    y: y as u32,
                    x0: x0 as u32,
                    x1: x as u32,
                    hu_sum: sum,
                });
            } else {
                x += 1;
            }
        }
    }
    row_start.push(runs.len());
    let mut parent: Vec<u32> = (0..runs.len() as u32).collect();
    for y in 1..ny {
        overlapping(
            &runs,
            row_start[y]..row_start[y + 1],
            &runs,
            row_start[y - 1]..row_start[y],
            |i, j| union(&mut parent, i as u32, j as u32),
        );
    }
    let comp = (0..runs.len() as u32)
        .map(|k| find(&mut parent, k))
        .collect();
    SliceAir {
        runs,
        row_start,
        comp,
        body_pixels: body.pixels,
        centre_x: Some((body.xmin + body.xmax + 1) as f64 / 2.0),
        body_width: (body.xmax + 1 - body.xmin) as f64,
    }
}

/// Area, HU sum and x sum of every 2D component of a slice (indexed by root run).
fn component_sums(s: &SliceAir) -> Vec<(usize, f64, f64)> {
    let mut sums = vec![(0usize, 0.0f64, 0.0f64); s.runs.len()];
    for (k, r) in s.runs.iter().enumerate() {
        let e = &mut sums[s.comp[k] as usize];
        e.0 += r.len();
        e.1 += r.hu_sum;
        e.2 += (r.x0 + r.x1) as f64 / 2.0 * r.len() as f64;
    }
    sums
}

/// Marks the runs of the trachea and main bronchi: traced from the top slice down, through 2D
/// components no larger than the airway lumen that overlap the airway of the slice above; new
/// airways start (above the lungs only) at small, central, pure-air components. Returns, per
/// slice, which runs are airway.
fn trace_airways(slices: &[SliceAir], nx: usize, ny: usize, pixel_mm2: f64) -> Vec<Vec<bool>> {
    let max_pixels = (AIRWAY_MAX_MM2 / pixel_mm2).max(1.0);
    let mut airway: Vec<Vec<bool>> = slices.iter().map(|s| vec![false; s.runs.len()]).collect();
    let mut above = vec![false; nx * ny];
    let mut tracking = false;
    let mut lungs_seen = false;
    for z in (0..slices.len()).rev() {
        let s = &slices[z];
        let sums = component_sums(s);
        lungs_seen |= sums.iter().any(|c| c.0 as f64 > max_pixels);
        let mut touches = vec![false; s.runs.len()];
        if tracking {
            for (k, r) in s.runs.iter().enumerate() {
                let row = r.y as usize * nx;
                touches[s.comp[k] as usize] |= above[row + r.x0 as usize..row + r.x1 as usize]
                    .iter()
                    .any(|&a| a);
            }
        }
        let mut take = vec![false; s.runs.len()];
        for root in 0..s.runs.len() {
            let (area, hu, xs) = sums[root];
            if area == 0 || area as f64 > max_pixels {
                continue;
            }
            let seed = !lungs_seen
                && hu / area as f64 <= AIRWAY_SEED_HU
                && s.centre_x.is_some_and(|c| {
                    (xs / area as f64 - c).abs() <= AIRWAY_CENTRAL_SHARE * s.body_width
                });
            take[root] = touches[root] || seed;
        }
        above.fill(false);
        tracking = false;
        for (k, r) in s.runs.iter().enumerate() {
            if take[s.comp[k] as usize] {
                airway[z][k] = true;
                tracking = true;
                above[r.y as usize * nx + r.x0 as usize..r.y as usize * nx + r.x1 as usize]
                    .fill(true);
            }
        }
    }
    airway
}

/// What a 3D air component holds.
#[derive(Clone, Copy, Debug, Default)]
struct Component {
    voxels: usize,
    hu_sum: f64,
    /// Voxels right and left of the body's midline.
    right: usize,
    left: usize,
    z_min: usize,
    z_max: usize,
    touches_border: bool,
}

/// How a kept component is labelled.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Keep {
    No,
    /// Not lung: pure air by its mean HU (stomach, bowel or airway gas).
    Gas,
    Side(u8),
    /// Split at the midline: each voxel takes the side it lies on.
    Split,
}

/// The lung mask of `ct` (see the module documentation for the rules).
pub fn lung_mask(ct: &CanonicalCt) -> LungMask {
    let [nx, ny, nz] = ct.dims;
    let [sx, sy, sz] = ct.spacing;
    let voxel_ml = sx * sy * sz / 1000.0;
    let slices: Vec<SliceAir> = (0..nz).into_par_iter().map(|z| slice_air(ct, z)).collect();
    let airway = trace_airways(&slices, nx, ny, sx * sy);
    let airway_voxels = slices
        .iter()
        .zip(&airway)
        .map(|(s, a)| {
            s.runs
                .iter()
                .zip(a)
                .filter(|(_, &w)| w)
                .map(|(r, _)| r.len())
                .sum::<usize>()
        })
        .sum();
    // 3D components over the non-airway runs of all slices.
    let offsets: Vec<usize> = slices
        .iter()
        .scan(0, |acc, s| {
            let o = *acc;
            *acc += s.runs.len();
            Some(o)
        })
        .collect();
    let total = offsets.last().map_or(0, |&o| o + slices[nz - 1].runs.len());
    let mut parent: Vec<u32> = (0..total as u32).collect();
    for z in 0..nz {
        let s = &slices[z];
        for y in 0..ny {
            let rows = s.row_start[y]..s.row_start[y + 1];
            let mut join = |other: &SliceAir, oz: usize, range: std::ops::Range<usize>| {
                overlapping(&s.runs, rows.clone(), &other.runs, range, |i, j| {
                    if !airway[z][i] && !airway[oz][j] {
                        union(
                            &mut parent,
                            (offsets[z] + i) as u32,
                            (offsets[oz] + j) as u32,
                        );
                    }
                })
            };
            if y > 0 {
                join(s, z, s.row_start[y - 1]..s.row_start[y]);
            }
            if z > 0 {
                let below = &slices[z - 1];
                join(below, z - 1, below.row_start[y]..below.row_start[y + 1]);
            }
        }
    }
    let mut root = vec![0u32; total];
    let mut comps = vec![Component::default(); total];
    for z in 0..nz {
        let s = &slices[z];
        let centre = s.centre_x.unwrap_or(nx as f64 / 2.0);
        for (k, r) in s.runs.iter().enumerate() {
            if airway[z][k] {
                continue;
            }
            let g = offsets[z] + k;
            root[g] = find(&mut parent, g as u32);
            let c = &mut comps[root[g] as usize];
            if c.voxels == 0 {
                c.z_min = z;
            }
            c.voxels += r.len();
            c.hu_sum += r.hu_sum;
            c.z_max = z;
            // Voxel x is on the right when its centre x + 0.5 is at or past the midline.
            let first_right = ((centre - 0.5).ceil().max(0.0) as u32).max(r.x0).min(r.x1);
            let right = (r.x1 - first_right) as usize;
            c.right += right;
            c.left += r.len() - right;
            c.touches_border |=
                r.x0 == 0 || r.x1 as usize == nx || r.y == 0 || r.y as usize == ny - 1;
        }
    }
    let body_per_slice: Vec<usize> = slices.iter().map(|s| s.body_pixels).collect();
    let keep = choose_lungs(&comps, &body_per_slice, voxel_ml);
    let mut labels = vec![0u8; nx * ny * nz];
    labels
        .par_chunks_mut(nx * ny)
        .enumerate()
        .for_each(|(z, out)| {
            let s = &slices[z];
            let centre = s.centre_x.unwrap_or(nx as f64 / 2.0);
            for (k, r) in s.runs.iter().enumerate() {
                if airway[z][k] {
                    continue;
                }
                let row = r.y as usize * nx;
                match keep[root[offsets[z] + k] as usize] {
                    Keep::No | Keep::Gas => {}
                    Keep::Side(side) => out[row + r.x0 as usize..row + r.x1 as usize].fill(side),
                    Keep::Split => {
                        for x in r.x0..r.x1 {
                            let right = x as f64 + 0.5 >= centre;
                            out[row + x as usize] = if right { RIGHT } else { LEFT };
                        }
                    }
                }
            }
        });
    close_in_plane(&mut labels, ct.dims, [sx, sy]);
    close_along_z(&mut labels, ct.dims, sz);
    let mut envelope = envelope(ct, &labels);
    // Airways and gas are neither lung nor carry a lobe.
    envelope
        .par_chunks_mut(nx * ny)
        .zip(labels.par_chunks_mut(nx * ny))
        .enumerate()
        .for_each(|(z, (env, lab))| {
            let s = &slices[z];
            for (k, r) in s.runs.iter().enumerate() {
                if airway[z][k] || keep[root[offsets[z] + k] as usize] == Keep::Gas {
                    let span = r.y as usize * nx + r.x0 as usize..r.y as usize * nx + r.x1 as usize;
                    env[span.clone()].fill(false);
                    lab[span].fill(0);
                }
            }
        });
    drop(slices);
    let per_slice: Vec<usize> = labels
        .par_chunks(nx * ny)
        .map(|s| s.iter().filter(|&&l| l != 0).count())
        .collect();
    let right = labels.par_iter().filter(|&&l| l == RIGHT).count();
    let left = labels.par_iter().filter(|&&l| l == LEFT).count();
    LungMask {
        dims: ct.dims,
        labels,
        envelope,
        per_slice,
        body_per_slice,
        sides: [right, left],
        airway_voxels,
    }
}

/// Which components are lung, and on which side (see the module documentation, steps 3–4).
fn choose_lungs(comps: &[Component], body_per_slice: &[usize], voxel_ml: f64) -> Vec<Keep> {
    /// A candidate lung: its component, side, voxels on that side, and whether it is split.
    struct Piece {
        comp: usize,
        side: u8,
        voxels: usize,
        split: bool,
    }
    let mut pieces: Vec<Piece> = Vec::new();
    let mut keep = vec![Keep::No; comps.len()];
    for (i, c) in comps.iter().enumerate() {
        if c.voxels == 0 || c.touches_border {
            continue;
        }
        if c.hu_sum / c.voxels as f64 <= GAS_MEAN_HU {
            keep[i] = Keep::Gas;
            continue;
        }
        let body: usize = body_per_slice[c.z_min..=c.z_max].iter().sum();
        if (c.voxels as f64) * voxel_ml < MIN_LUNG_ML
            || (c.voxels as f64) < MIN_BODY_SHARE * body as f64
        {
            continue;
        }
        let split = c.right.min(c.left) as f64 >= SPLIT_SHARE * c.voxels as f64;
        for (side, voxels) in [(RIGHT, c.right), (LEFT, c.left)] {
            let mine = if split {
                true
            } else {
                (side == RIGHT) == (c.right >= c.left)
            };
            if mine {
                pieces.push(Piece {
                    comp: i,
                    side,
                    voxels: if split { voxels } else { c.voxels },
                    split,
                });
            }
        }
    }
    for side in [RIGHT, LEFT] {
        let Some(main) = pieces
            .iter()
            .filter(|p| p.side == side)
            .max_by_key(|p| p.voxels)
        else {
            continue;
        };
        let m = &comps[main.comp];
        for p in pieces.iter().filter(|p| p.side == side) {
            let c = &comps[p.comp];
            let overlaps = c.z_min <= m.z_max && c.z_max >= m.z_min;
            let large = p.voxels as f64 >= EXTRA_PIECE_SHARE * main.voxels as f64;
            if p.comp == main.comp || (large && overlaps) {
                keep[p.comp] = if p.split {
                    Keep::Split
                } else {
                    Keep::Side(side)
                };
            }
        }
    }
    keep
}

/// The squared distance (mm²) from each pixel of a `w`×`h` image to the nearest pixel where
/// `feature` holds (`f32::INFINITY` without any): Felzenszwalb–Huttenlocher's exact transform,
/// one pass along x and one along y, with pixel sizes `sx`, `sy`.
fn distance_sq(feature: &[bool], w: usize, h: usize, sx: f32, sy: f32) -> Vec<f32> {
    let mut d: Vec<f32> = feature
        .iter()
        .map(|&f| if f { 0.0 } else { f32::INFINITY })
        .collect();
    let n = w.max(h);
    let (mut f, mut out) = (vec![0f32; n], vec![0f32; n]);
    let (mut v, mut zb) = (vec![0usize; n], vec![0f32; n + 1]);
    for row in d.chunks_mut(w) {
        f[..w].copy_from_slice(row);
        lower_envelope(&f[..w], sx, &mut out[..w], &mut v, &mut zb);
        row.copy_from_slice(&out[..w]);
    }
    for x in 0..w {
        for y in 0..h {
            f[y] = d[y * w + x];
        }
        lower_envelope(&f[..h], sy, &mut out[..h], &mut v, &mut zb);
        for y in 0..h {
            d[y * w + x] = out[y];
        }
    }
    d
}

/// One dimension of [`distance_sq`]: `out[i] = min_j f[j] + (s·(i − j))²` over the finite `f[j]`.
fn lower_envelope(f: &[f32], s: f32, out: &mut [f32], v: &mut [usize], zb: &mut [f32]) {
    let s2 = s * s;
    let mut k: isize = -1;
    for q in 0..f.len() {
        if !f[q].is_finite() {
            continue;
        }
        loop {
            if k < 0 {
                k = 0;
                v[0] = q;
                zb[0] = f32::NEG_INFINITY;
                zb[1] = f32::INFINITY;
                break;
            }
            let p = v[k as usize];
            let cross = ((f[q] + s2 * (q * q) as f32) - (f[p] + s2 * (p * p) as f32))
                / (2.0 * s2 * (q - p) as f32);
            if cross <= zb[k as usize] {
                k -= 1;
                continue;
            }
            k += 1;
            v[k as usize] = q;
            zb[k as usize] = cross;
            zb[k as usize + 1] = f32::INFINITY;
            break;
        }
    }
    if k < 0 {
        out.fill(f32::INFINITY);
        return;
    }
    let mut j = 0usize;
    for (q, o) in out.iter_mut().enumerate() {
        while zb[j + 1] < q as f32 {
            j += 1;
        }
        let p = v[j];
        let dq = s * (q as f32 - p as f32);
        *o = f[p] + dq * dq;
    }
}

/// Floods the background region of `start` (4-connected) into `region`, marking it `seen`;
/// whether it reaches the image border.
fn flood(
    mask: &[bool],
    w: usize,
    h: usize,
    start: usize,
    seen: &mut [bool],
    region: &mut Vec<usize>,
) -> bool {
    region.clear();
    seen[start] = true;
    region.push(start);
    let (mut k, mut border) = (0, false);
    while k < region.len() {
        let i = region[k];
        k += 1;
        let (x, y) = (i % w, i / w);
        border |= x == 0 || y == 0 || x == w - 1 || y == h - 1;
        let mut visit = |j: usize| {
            if !mask[j] && !seen[j] {
                seen[j] = true;
                region.push(j);
            }
        };
        if x > 0 {
            visit(i - 1);
        }
        if x + 1 < w {
            visit(i + 1);
        }
        if y > 0 {
            visit(i - w);
        }
        if y + 1 < h {
            visit(i + w);
        }
    }
    border
}

/// Fills the background regions of a `w`×`h` image that are not 4-connected to its border and
/// hold at most `max_pixels` pixels.
fn fill_holes(mask: &mut [bool], w: usize, h: usize, max_pixels: usize) {
    let mut seen = vec![false; w * h];
    let mut region: Vec<usize> = Vec::new();
    for start in 0..w * h {
        if mask[start] || seen[start] {
            continue;
        }
        if !flood(mask, w, h, start, &mut seen, &mut region) && region.len() <= max_pixels {
            for &i in &region {
                mask[i] = true;
            }
        }
    }
}

/// The half-open box [x0, x1) × [y0, y1) of the pixels of a slice (rows of `nx`) whose label
/// satisfies `keep`; `None` when there are none.
fn bounding_box(slice: &[u8], nx: usize, keep: impl Fn(u8) -> bool) -> Option<[usize; 4]> {
    let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
    for (i, _) in slice.iter().enumerate().filter(|(_, &l)| keep(l)) {
        let (x, y) = (i % nx, i / nx);
        x0 = x0.min(x);
        x1 = x1.max(x + 1);
        y0 = y0.min(y);
        y1 = y1.max(y + 1);
    }
    (x0 < x1).then_some([x0, x1, y0, y1])
}

/// Per slice and side: a closing with a disc of [`CLOSING_MM`], then filling of holes up to
/// [`MAX_HOLE_MM2`], on the side's
/// bounding box grown by the radius (parallel over slices). A voxel already labelled keeps its
/// label.
fn close_in_plane(labels: &mut [u8], dims: [usize; 3], spacing: [f64; 2]) {
    let [nx, ny, _] = dims;
    let (sx, sy) = (spacing[0] as f32, spacing[1] as f32);
    let r2 = (CLOSING_MM * CLOSING_MM) as f32;
    let max_hole = (MAX_HOLE_MM2 / (spacing[0] * spacing[1])).min((nx * ny) as f64) as usize;
    let pad = |s: f64, n: usize| ((CLOSING_MM / s).ceil().min(n as f64) as usize) + 1;
    let (px, py) = (pad(spacing[0], nx), pad(spacing[1], ny));
    labels.par_chunks_mut(nx * ny).for_each(|slice| {
        for side in [RIGHT, LEFT] {
            let Some([x0, x1, y0, y1]) = bounding_box(slice, nx, |l| l == side) else {
                continue;
            };
            // The box, grown by the radius; pixels beyond the slice count as not lung.
            let (bx0, by0) = (x0 as isize - px as isize, y0 as isize - py as isize);
            let (w, h) = (x1 - x0 + 2 * px, y1 - y0 + 2 * py);
            let at = |bx: usize, by: usize| -> Option<usize> {
                let (x, y) = (bx0 + bx as isize, by0 + by as isize);
                (x >= 0 && y >= 0 && (x as usize) < nx && (y as usize) < ny)
                    .then(|| y as usize * nx + x as usize)
            };
            let mut mask = vec![false; w * h];
            for by in 0..h {
                for bx in 0..w {
                    mask[by * w + bx] = at(bx, by).is_some_and(|i| slice[i] == side);
                }
            }
            let grown: Vec<bool> = distance_sq(&mask, w, h, sx, sy)
                .iter()
                .map(|&d| d > r2)
                .collect();
            let mut closed: Vec<bool> = distance_sq(&grown, w, h, sx, sy)
                .iter()
                .map(|&d| d > r2)
                .collect();
            fill_holes(&mut closed, w, h, max_hole);
            for by in 0..h {
                for bx in 0..w {
                    if closed[by * w + bx] {
                        if let Some(i) = at(bx, by) {
                            if slice[i] == 0 {
                                slice[i] = side;
                            }
                        }
                    }
                }
            }
        }
    });
}

/// Along every (x, y) column: a gap of unlabelled voxels between two voxels of the same side,
/// at most 2 × [`Z_CLOSING_MM`] long, takes that side.
fn close_along_z(labels: &mut [u8], dims: [usize; 3], sz: f64) {
    let [nx, ny, nz] = dims;
    let n = nx * ny;
    let max_gap = (2.0 * Z_CLOSING_MM / sz).floor().min(nz as f64) as usize;
    if max_gap == 0 {
        return;
    }
    // Last slice (+ 1) and side seen in each column.
    let mut last = vec![(0usize, 0u8); n];
    for z in 0..nz {
        for i in 0..n {
            let l = labels[z * n + i];
            if l == 0 {
                continue;
            }
            let (seen, side) = last[i];
            if side == l && seen < z && z - seen <= max_gap {
                for g in seen..z {
                    if labels[g * n + i] == 0 {
                        labels[g * n + i] = l;
                    }
                }
            }
            last[i] = (z + 1, l);
        }
    }
}

/// The mask grown by [`ENVELOPE_MM`]: a disc in-plane, then along z, then cut to the body.
fn envelope(ct: &CanonicalCt, labels: &[u8]) -> Vec<bool> {
    let [nx, ny, nz] = ct.dims;
    let [sx, sy, sz] = ct.spacing;
    let n = nx * ny;
    let r2 = (ENVELOPE_MM * ENVELOPE_MM) as f32;
    let pad = |s: f64, n: usize| ((ENVELOPE_MM / s).ceil().min(n as f64) as usize) + 1;
    let (px, py) = (pad(sx, nx), pad(sy, ny));
    let mut grown = vec![false; n * nz];
    grown
        .par_chunks_mut(n)
        .zip(labels.par_chunks(n))
        .for_each(|(out, slice)| {
            let Some([x0, x1, y0, y1]) = bounding_box(slice, nx, |l| l != 0) else {
                return;
            };
            let (bx0, by0) = (x0.saturating_sub(px), y0.saturating_sub(py));
            let (bx1, by1) = ((x1 + px).min(nx), (y1 + py).min(ny));
            let (w, h) = (bx1 - bx0, by1 - by0);
            let feature: Vec<bool> = (0..w * h)
                .map(|k| slice[(by0 + k / w) * nx + bx0 + k % w] != 0)
                .collect();
            let d = distance_sq(&feature, w, h, sx as f32, sy as f32);
            for (k, &d) in d.iter().enumerate() {
                out[(by0 + k / w) * nx + bx0 + k % w] = d <= r2;
            }
        });
    // Along z: a voxel is in the envelope when a grown voxel of its column lies within `reach`
    // slices, counted in a window that slides up the columns.
    let reach = (ENVELOPE_MM / sz).floor().min(nz as f64) as usize;
    let slide = |z: usize, add: bool, count: &mut [u32]| {
        for (c, &g) in count.iter_mut().zip(&grown[z * n..(z + 1) * n]) {
            if g {
                *c = if add { *c + 1 } else { *c - 1 };
            }
        }
    };
    let mut count = vec![0u32; n];
    for z in 0..=reach.min(nz - 1) {
        slide(z, true, &mut count);
    }
    let mut envelope = vec![false; n * nz];
    for z in 0..nz {
        for (e, &c) in envelope[z * n..(z + 1) * n].iter_mut().zip(&count) {
            *e = c > 0;
        }
        if z + reach + 1 < nz {
            slide(z + reach + 1, true, &mut count);
        }
        if z >= reach {
            slide(z - reach, false, &mut count);
        }
    }
    drop(grown);
    envelope.par_chunks_mut(n).enumerate().for_each(|(z, out)| {
        match body_mask(ct.slice(z), nx, ny, BODY_HU) {
            Some(body) => out.iter_mut().zip(&body.mask).for_each(|(e, &b)| *e &= b),
            None => out.fill(false),
        }
    });
    envelope
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute-force squared distances of a small image.
    fn brute(feature: &[bool], w: usize, h: usize, sx: f32, sy: f32) -> Vec<f32> {
        (0..w * h)
            .map(|i| {
                let (x, y) = ((i % w) as f32, (i / w) as f32);
                (0..w * h)
                    .filter(|&j| feature[j])
                    .map(|j| {
                        let (dx, dy) = (sx * (x - (j % w) as f32), sy * (y - (j / w) as f32));
                        dx * dx + dy * dy
                    })
                    .fold(f32::INFINITY, f32::min)
            })
            .collect()
    }

    #[test]
    fn distance_transform_matches_brute_force() {
        let (w, h) = (23, 17);
        let mut worst = 0f32;
        for seed in 0..20u64 {
            let feature: Vec<bool> = (0..w * h)
                .map(|i| {
                    (i as u64 * 2654435761 + seed * 97)
                        .wrapping_mul(seed + 3)
                        .is_multiple_of(37)
                })
                .collect();
            let got = distance_sq(&feature, w, h, 0.7, 1.9);
            let want = brute(&feature, w, h, 0.7, 1.9);
            for (a, b) in got.iter().zip(&want) {
                if b.is_finite() {
                    worst = worst.max((a - b).abs() / b.max(1.0));
                } else {
                    assert!(a.is_infinite());
                }
            }
        }
        println!("largest relative error of the distance transform: {worst:e}");
        assert!(worst < 1e-4);
    }

    #[test]
    fn small_holes_fill_and_open_bays_and_large_holes_stay() {
        // A ring (one-pixel hole), a U open at the top and a ring around a two-pixel hole.
        let rows = [
            "..............",
            ".###.#.#.####.",
            ".#.#.#.#.#..#.",
            ".###.###.####.",
            "..............",
        ];
        let mut mask: Vec<bool> = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c == '#'))
            .collect();
        let before = mask.iter().filter(|&&m| m).count();
        fill_holes(&mut mask, 14, 5, 1);
        let after = mask.iter().filter(|&&m| m).count();
        println!("{before} → {after} pixels after filling holes of at most 1 pixel");
        // Only the small ring's centre (2, 2) is filled; the U's inside (6, 2) reaches the
        // border and the large hole (10–11, 2) holds 2 pixels.
        assert!(mask[2 * 14 + 2] && !mask[2 * 14 + 6] && !mask[2 * 14 + 10]);
        assert_eq!(after, before + 1);
    }
}
