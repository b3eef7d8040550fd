//! Canonical CT volume → P×P patches and back (data.md): HU clip and normalisation, per-slice
//! body mask, square crop box, bilinear/nearest resize, paste, largest 3D component per label.
//!
//! Arrays are canonical RAS+ and x fastest. A patch is `[v * P + u]` with `u` along the
//! canonical x axis (towards the patient's right) and `v` along y (towards anterior).

use crate::io::Volume;
use rayon::prelude::*;

/// Preprocessing settings; [`PreprocessConfig::new`] gives data.md's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PreprocessConfig {
    /// Patch side P.
    pub patch: usize,
    /// HU clip window; normalised value = (clip(hu) − hu_min) / (hu_max − hu_min).
    pub hu_min: f32,
    pub hu_max: f32,
    /// Body threshold for the per-slice mask.
    pub body_threshold_hu: f32,
    /// Margin added on each side of the squared body box, in mm.
    pub crop_margin_mm: f64,
    /// Slices whose largest body component has fewer pixels are skipped.
    pub min_body_pixels: usize,
    /// Set voxels outside the (hole-filled) body to `hu_min` in the patches (removes the table).
    pub mask_outside_body: bool,
}

impl PreprocessConfig {
    pub fn new(patch: usize) -> Self {
        PreprocessConfig {
            patch,
            hu_min: -1024.0,
            hu_max: 600.0,
            body_threshold_hu: -500.0,
            crop_margin_mm: 5.0,
            min_body_pixels: 16,
            mask_outside_body: true,
        }
    }

    pub fn normalise(&self, hu: f32) -> f32 {
        (hu.clamp(self.hu_min, self.hu_max) - self.hu_min) / (self.hu_max - self.hu_min)
    }
}

/// A CT volume in canonical RAS+ order with its spacing (mm) per canonical axis.
#[derive(Clone, Debug)]
pub struct CanonicalCt {
    pub dims: [usize; 3],
    pub spacing: [f64; 3],
    pub hu: Vec<f32>,
}

impl CanonicalCt {
    pub fn from_volume(v: &Volume) -> Self {
        CanonicalCt {
            dims: v.canonical_dims(),
            spacing: v.canonical_spacing(),
            hu: v.canonical_data(),
        }
    }

    pub fn slice(&self, z: usize) -> &[f32] {
        let n = self.dims[0] * self.dims[1];
        &self.hu[z * n..(z + 1) * n]
    }
}

/// A crop window in continuous voxel-edge coordinates of one slice: voxel `i` spans `[i, i+1)`.
/// It may extend past the slice; samples outside read as air.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropBox {
    pub x0: f64,
    pub y0: f64,
    pub w: f64,
    pub h: f64,
}

impl CropBox {
    /// The pixel `v * p + u` of a P×P patch of this window that voxel (x, y)'s centre lands
    /// in, clamped to the patch (the mapping [`paste_nearest`] pastes by).
    pub fn patch_pixel(&self, x: usize, y: usize, p: usize) -> usize {
        let cell = |c: usize, origin: f64, extent: f64| -> usize {
            (((c as f64 + 0.5 - origin) * p as f64 / extent)
                .floor()
                .max(0.0) as usize)
                .min(p - 1)
        };
        cell(y, self.y0, self.h) * p + cell(x, self.x0, self.w)
    }
}

/// One axial slice that holds body, with its crop box.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SliceCrop {
    pub z: usize,
    pub crop: CropBox,
}

/// The body of one slice: hole-filled largest component and its inclusive bounding box.
#[derive(Clone, Debug)]
pub struct BodyMask {
    pub mask: Vec<bool>,
    pub xmin: usize,
    pub xmax: usize,
    pub ymin: usize,
    pub ymax: usize,
    pub pixels: usize,
}

/// Union-find over per-row spans `[x0, x1)` (rows delimited by `row_start`): spans of adjacent
/// rows join when they overlap, or with `diagonal` also when they touch at a corner
/// (8-connectivity). Returns each span's root, the lowest span index of its component.
fn span_roots(spans: &[(u32, u32)], row_start: &[usize], diagonal: bool) -> Vec<u32> {
    let mut parent: Vec<u32> = (0..spans.len() as u32).collect();
    let reach = diagonal as u32;
    for r in 1..row_start.len().saturating_sub(1) {
        let (mut i, a_end) = (row_start[r], row_start[r + 1]);
        let (mut j, b_end) = (row_start[r - 1], row_start[r]);
        while i < a_end && j < b_end {
            let ((a0, a1), (b0, b1)) = (spans[i], spans[j]);
            if a0 < b1 + reach && b0 < a1 + reach {
                union(&mut parent, i as u32, j as u32);
            }
            if a1 <= b1 {
                i += 1;
            } else {
                j += 1;
            }
        }
    }
    (0..spans.len() as u32)
        .map(|k| find(&mut parent, k))
        .collect()
}

/// Threshold, largest 8-connected component, holes filled (background 4-connected to the
/// border stays background). `None` when no pixel passes the threshold. Works on row spans,
/// so its cost is one pass over the pixels plus one per span.
pub fn body_mask(slice: &[f32], nx: usize, ny: usize, threshold: f32) -> Option<BodyMask> {
    let mut spans: Vec<(u32, u32)> = Vec::new();
    let mut row_start = Vec::with_capacity(ny + 1);
    for row in slice.chunks(nx) {
        row_start.push(spans.len());
        let mut x = 0;
        while x < nx {
            if row[x] > threshold {
                let x0 = x;
                while x < nx && row[x] > threshold {
                    x += 1;
                }
                spans.push((x0 as u32, x as u32));
            } else {
                x += 1;
            }
        }
    }
    row_start.push(spans.len());
    if spans.is_empty() {
        return None;
    }
    let roots = span_roots(&spans, &row_start, true);
    let mut size = vec![0usize; spans.len()];
    for (k, &(x0, x1)) in spans.iter().enumerate() {
        size[roots[k] as usize] += (x1 - x0) as usize;
    }
    let mut best = 0usize;
    for k in 0..spans.len() {
        if size[k] > size[best] {
            best = k;
        }
    }
    let (mut xmin, mut xmax, mut ymin, mut ymax) = (nx, 0, ny, 0);
    let mut gaps: Vec<(u32, u32)> = Vec::new();
    let mut gap_start = Vec::with_capacity(ny + 1);
    for y in 0..ny {
        gap_start.push(gaps.len());
        let mut x = 0u32;
        for k in row_start[y]..row_start[y + 1] {
            if roots[k] as usize != best {
                continue;
            }
            let (x0, x1) = spans[k];
            xmin = xmin.min(x0 as usize);
            xmax = xmax.max(x1 as usize - 1);
            ymin = ymin.min(y);
            ymax = ymax.max(y);
            if x0 > x {
                gaps.push((x, x0));
            }
            x = x1;
        }
        if (x as usize) < nx {
            gaps.push((x, nx as u32));
        }
    }
    gap_start.push(gaps.len());
    let gap_roots = span_roots(&gaps, &gap_start, false);
    let mut outside = vec![false; gaps.len()];
    for y in 0..ny {
        for k in gap_start[y]..gap_start[y + 1] {
            let (x0, x1) = gaps[k];
            if y == 0 || y == ny - 1 || x0 == 0 || x1 as usize == nx {
                outside[gap_roots[k] as usize] = true;
            }
        }
    }
    let mut mask = vec![true; nx * ny];
    let mut pixels = nx * ny;
    for y in 0..ny {
        for k in gap_start[y]..gap_start[y + 1] {
            if outside[gap_roots[k] as usize] {
                let (x0, x1) = gaps[k];
                mask[y * nx + x0 as usize..y * nx + x1 as usize].fill(false);
                pixels -= (x1 - x0) as usize;
            }
        }
    }
    Some(BodyMask {
        mask,
        xmin,
        xmax,
        ymin,
        ymax,
        pixels,
    })
}

/// The body box squared up in mm (so anisotropic pixels still give an undistorted patch),
/// plus `margin_mm` on every side.
pub fn square_crop(body: &BodyMask, spacing_xy: [f64; 2], margin_mm: f64) -> CropBox {
    let (sx, sy) = (spacing_xy[0], spacing_xy[1]);
    let wx = (body.xmax + 1 - body.xmin) as f64 * sx;
    let wy = (body.ymax + 1 - body.ymin) as f64 * sy;
    let side = wx.max(wy) + 2.0 * margin_mm;
    let cx = (body.xmin + body.xmax + 1) as f64 / 2.0;
    let cy = (body.ymin + body.ymax + 1) as f64 / 2.0;
    let (w, h) = (side / sx, side / sy);
    CropBox {
        x0: cx - w / 2.0,
        y0: cy - h / 2.0,
        w,
        h,
    }
}

/// The taps of one output axis of [`resize_bilinear`]: per output sample, its first input
/// index and the weights of the inputs from there on.
fn bilinear_taps(origin: f64, extent: f64, p: usize) -> Vec<(isize, Vec<f32>)> {
    let scale = extent / p as f64;
    (0..p)
        .map(|k| {
            let c = origin + (k as f64 + 0.5) * scale - 0.5;
            if scale <= 1.0 {
                let f = c.floor();
                let t = (c - f) as f32;
                return (f as isize, vec![1.0 - t, t]);
            }
            // Shrinking: the triangle widened to the shrink factor, normalised (an
            // antialiased bilinear, as PIL and torchvision resize).
            let lo = (c - scale).floor() as isize + 1;
            let hi = (c + scale).ceil() as isize - 1;
            let raw: Vec<f64> = (lo..=hi)
                .map(|i| (1.0 - (i as f64 - c).abs() / scale).max(0.0))
                .collect();
            let sum: f64 = raw.iter().sum();
            (lo, raw.iter().map(|w| (w / sum) as f32).collect())
        })
        .collect()
}

/// Bilinear resize of the crop window of `slice` into `out` (P×P); outside reads `fill`. When
/// the window is larger than P along an axis, the triangle filter is widened by the shrink
/// factor (antialiasing: every input pixel contributes, so thin structures such as fissures
/// and the noise are averaged rather than sampled); when it is not, this is plain bilinear
/// interpolation of the four nearest pixels.
pub fn resize_bilinear(
    slice: &[f32],
    nx: usize,
    ny: usize,
    crop: &CropBox,
    p: usize,
    fill: f32,
    out: &mut [f32],
) {
    let xs = bilinear_taps(crop.x0, crop.w, p);
    let ys = bilinear_taps(crop.y0, crop.h, p);
    let at = |x: isize, y: isize| -> f32 {
        if x < 0 || y < 0 || x >= nx as isize || y >= ny as isize {
            fill
        } else {
            slice[y as usize * nx + x as usize]
        }
    };
    let mut rows = vec![0f32; p];
    for (v, (y0, wy)) in ys.iter().enumerate() {
        let row = &mut out[v * p..(v + 1) * p];
        row.fill(0.0);
        for (dy, &fy) in wy.iter().enumerate() {
            let y = y0 + dy as isize;
            for (r, (x0, wx)) in rows.iter_mut().zip(&xs) {
                *r = wx
                    .iter()
                    .enumerate()
                    .fold(0.0, |acc, (dx, &fx)| acc + at(x0 + dx as isize, y) * fx);
            }
            for (o, &r) in row.iter_mut().zip(&rows) {
                *o += r * fy;
            }
        }
    }
}

/// Nearest-neighbour resize of the crop window of a label slice into `out` (P×P); outside is 0.
pub fn resize_nearest(
    labels: &[u8],
    nx: usize,
    ny: usize,
    crop: &CropBox,
    p: usize,
    out: &mut [u8],
) {
    let index = |origin: f64, extent: f64, n: usize, k: usize| -> Option<usize> {
        let c = (origin + (k as f64 + 0.5) * extent / p as f64).floor();
        (c >= 0.0 && c < n as f64).then_some(c as usize)
    };
    for v in 0..p {
        let y = index(crop.y0, crop.h, ny, v);
        for u in 0..p {
            let x = index(crop.x0, crop.w, nx, u);
            out[v * p + u] = match (x, y) {
                (Some(x), Some(y)) => labels[y * nx + x],
                _ => 0,
            };
        }
    }
}

/// The inverse of [`resize_nearest`]: each voxel whose centre falls in the crop window takes
/// the label of the patch pixel it lands in; the rest of `out` is left as it is.
pub fn paste_nearest(patch: &[u8], p: usize, crop: &CropBox, nx: usize, ny: usize, out: &mut [u8]) {
    let range = |origin: f64, extent: f64, n: usize| -> (usize, usize) {
        let lo = (origin - 0.5).ceil().max(0.0) as usize;
        let hi = ((origin + extent - 0.5).ceil().max(0.0) as usize).min(n);
        (lo.min(n), hi)
    };
    let (x_lo, x_hi) = range(crop.x0, crop.w, nx);
    let (y_lo, y_hi) = range(crop.y0, crop.h, ny);
    for y in y_lo..y_hi {
        for x in x_lo..x_hi {
            out[y * nx + x] = patch[crop.patch_pixel(x, y, p)];
        }
    }
}

/// The body, crop box and normalised P×P patch of slice `z`; `None` when the slice holds no
/// body (no component of at least `min_body_pixels`).
pub fn slice_patch(
    ct: &CanonicalCt,
    z: usize,
    cfg: &PreprocessConfig,
) -> Option<(CropBox, Vec<f32>)> {
    let [nx, ny, _] = ct.dims;
    let slice = ct.slice(z);
    let body = body_mask(slice, nx, ny, cfg.body_threshold_hu)?;
    if body.pixels < cfg.min_body_pixels {
        return None;
    }
    let crop = square_crop(&body, [ct.spacing[0], ct.spacing[1]], cfg.crop_margin_mm);
    let normalised: Vec<f32> = slice
        .iter()
        .zip(&body.mask)
        .map(|(&hu, &inside)| {
            if inside || !cfg.mask_outside_body {
                cfg.normalise(hu)
            } else {
                0.0
            }
        })
        .collect();
    let mut patch = vec![0f32; cfg.patch * cfg.patch];
    resize_bilinear(&normalised, nx, ny, &crop, cfg.patch, 0.0, &mut patch);
    Some((crop, patch))
}

/// Every body slice of a volume, in z order: crops and patches `[M, P, P]` (parallel over slices).
#[derive(Clone, Debug, Default)]
pub struct VolumePatches {
    pub slices: Vec<SliceCrop>,
    pub patches: Vec<f32>,
}

pub fn volume_patches(ct: &CanonicalCt, cfg: &PreprocessConfig) -> VolumePatches {
    let per_slice: Vec<Option<(CropBox, Vec<f32>)>> = (0..ct.dims[2])
        .into_par_iter()
        .map(|z| slice_patch(ct, z, cfg))
        .collect();
    let mut out = VolumePatches::default();
    for (z, item) in per_slice.into_iter().enumerate() {
        if let Some((crop, patch)) = item {
            out.slices.push(SliceCrop { z, crop });
            out.patches.extend_from_slice(&patch);
        }
    }
    out
}

/// Nearest-resized label patches `[M, P, P]` of a canonical label volume for the given crops.
pub fn label_patches(labels: &[u8], dims: [usize; 3], slices: &[SliceCrop], p: usize) -> Vec<u8> {
    let n = dims[0] * dims[1];
    let mut out = vec![0u8; slices.len() * p * p];
    out.par_chunks_mut(p * p)
        .zip(slices.par_iter())
        .for_each(|(dst, s)| {
            resize_nearest(
                &labels[s.z * n..(s.z + 1) * n],
                dims[0],
                dims[1],
                &s.crop,
                p,
                dst,
            )
        });
    out
}

/// For each of `nz` slices, the index of its patch in `slices` (usize::MAX: none).
pub fn patch_of_slice(slices: &[SliceCrop], nz: usize) -> Vec<usize> {
    let mut which = vec![usize::MAX; nz];
    for (m, s) in slices.iter().enumerate() {
        which[s.z] = m;
    }
    which
}

/// Pastes per-slice label patches `[M, P, P]` back into a canonical volume (zero elsewhere).
pub fn paste_patches(patches: &[u8], slices: &[SliceCrop], dims: [usize; 3], p: usize) -> Vec<u8> {
    let n = dims[0] * dims[1];
    let which = patch_of_slice(slices, dims[2]);
    let mut out = vec![0u8; n * dims[2]];
    out.par_chunks_mut(n).enumerate().for_each(|(z, dst)| {
        let m = which[z];
        if m != usize::MAX {
            let patch = &patches[m * p * p..(m + 1) * p * p];
            paste_nearest(patch, p, &slices[m].crop, dims[0], dims[1], dst);
        }
    });
    out
}

/// A run of equal non-zero labels along x in one row (y, z).
#[derive(Clone, Copy)]
struct Run {
    x0: u32,
    x1: u32,
    label: u8,
}

/// Union-find over run indices: the root of `a` (paths halved on the way).
pub(crate) fn find(parent: &mut [u32], mut a: u32) -> u32 {
    while parent[a as usize] != a {
        let up = parent[parent[a as usize] as usize];
        parent[a as usize] = up;
        a = up;
    }
    a
}

/// Joins the sets of `a` and `b`; the lower index becomes the root.
pub(crate) fn union(parent: &mut [u32], a: u32, b: u32) {
    let (ra, rb) = (find(parent, a), find(parent, b));
    if ra != rb {
        parent[ra.max(rb) as usize] = ra.min(rb);
    }
}

/// Keeps, for every non-zero label, only its largest 6-connected 3D component; every other
/// voxel of that label becomes 0. Runs along x are found in parallel and joined by union-find.
pub fn keep_largest_components(labels: &mut [u8], dims: [usize; 3]) {
    let [nx, ny, nz] = dims;
    let slice_runs: Vec<Vec<Vec<Run>>> = labels
        .par_chunks(nx * ny)
        .map(|slice| {
            slice
                .chunks(nx)
                .map(|row| {
                    let mut runs = Vec::new();
                    let mut x = 0;
                    while x < nx {
                        let l = row[x];
                        if l == 0 {
                            x += 1;
                            continue;
                        }
                        let start = x;
                        while x < nx && row[x] == l {
                            x += 1;
                        }
                        runs.push(Run {
                            x0: start as u32,
                            x1: x as u32,
                            label: l,
                        });
                    }
                    runs
                })
                .collect()
        })
        .collect();
    let mut row_start = Vec::with_capacity(ny * nz + 1);
    let mut runs: Vec<Run> = Vec::new();
    for slice in &slice_runs {
        for row in slice {
            row_start.push(runs.len());
            runs.extend_from_slice(row);
        }
    }
    row_start.push(runs.len());
    drop(slice_runs);
    let mut parent: Vec<u32> = (0..runs.len() as u32).collect();
    let row_range = |r: usize| row_start[r]..row_start[r + 1];
    for z in 0..nz {
        for y in 0..ny {
            let r = z * ny + y;
            let mut neighbours = Vec::with_capacity(2);
            if y > 0 {
                neighbours.push(r - 1);
            }
            if z > 0 {
                neighbours.push(r - ny);
            }
            for other in neighbours {
                let (a_range, b_range) = (row_range(r), row_range(other));
                let (mut i, mut j) = (a_range.start, b_range.start);
                while i < a_range.end && j < b_range.end {
                    let (a, b) = (runs[i], runs[j]);
                    if a.x0 < b.x1 && b.x0 < a.x1 && a.label == b.label {
                        union(&mut parent, i as u32, j as u32);
                    }
                    if a.x1 <= b.x1 {
                        i += 1;
                    } else {
                        j += 1;
                    }
                }
            }
        }
    }
    let mut size = vec![0u64; runs.len()];
    let mut root = vec![0u32; runs.len()];
    for i in 0..runs.len() {
        root[i] = find(&mut parent, i as u32);
        size[root[i] as usize] += (runs[i].x1 - runs[i].x0) as u64;
    }
    let mut best = [(u32::MAX, 0u64); 256];
    for i in 0..runs.len() {
        let r = root[i];
        if r == i as u32 && size[i] > best[runs[i].label as usize].1 {
            best[runs[i].label as usize] = (r, size[i]);
        }
    }
    labels
        .par_chunks_mut(nx * ny)
        .enumerate()
        .for_each(|(z, slice)| {
            for y in 0..ny {
                let r = z * ny + y;
                for i in row_range(r) {
                    let run = runs[i];
                    if root[i] != best[run.label as usize].0 {
                        slice[y * nx + run.x0 as usize..y * nx + run.x1 as usize].fill(0);
                    }
                }
            }
        });
}
