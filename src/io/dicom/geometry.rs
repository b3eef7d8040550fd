//! A series' slice stack: agreement of the slices' grids, order along the slice normal, even spacing (gaps, duplicates), gantry tilt, and the voxel-to-RAS affine.

use super::header::SliceHeader;
use anyhow::{anyhow, bail, Result};

/// Largest accepted angle between the slice stacking direction and the slice normal. The
/// affine keeps a smaller tilt exactly (sheared third column); beyond it the voxel volumes
/// computed from the affine's column lengths would be off by more than 0.06 %.
pub const MAX_TILT_DEGREES: f64 = 2.0;

/// How far apart two slices may be and still count as the same position (mm).
const SAME_POSITION_MM: f64 = 1e-3;

/// Slices in stacking order and the affine of the (columns, rows, slices) array.
#[derive(Clone, Debug)]
pub struct Stack {
    /// Indices into the headers, in increasing position along the slice normal.
    pub order: Vec<usize>,
    /// Voxel (column, row, slice) → world, mm, RAS+ as NIfTI defines it.
    pub affine: [[f64; 4]; 4],
    pub warnings: Vec<String>,
}

fn file(h: &SliceHeader) -> String {
    h.path.display().to_string()
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}

/// The in-plane grid a slice declares.
struct Grid {
    orientation: [f64; 6],
    spacing: [f64; 2],
    rows: u16,
    columns: u16,
}

/// A slice's grid, failing when a geometry tag (position included) is missing.
fn grid(h: &SliceHeader) -> Result<Grid> {
    let missing = |what: &str| anyhow!("{}: {what} is missing", file(h));
    h.position
        .ok_or_else(|| missing("ImagePositionPatient (0020,0032)"))?;
    Ok(Grid {
        orientation: h
            .orientation
            .ok_or_else(|| missing("ImageOrientationPatient (0020,0037)"))?,
        spacing: h
            .pixel_spacing
            .ok_or_else(|| missing("PixelSpacing (0028,0030)"))?,
        rows: h.rows.ok_or_else(|| missing("Rows (0028,0010)"))?,
        columns: h.columns.ok_or_else(|| missing("Columns (0028,0011)"))?,
    })
}

/// Checks that every slice has the same grid as the first and returns it.
fn common_grid(headers: &[SliceHeader], label: &str) -> Result<Grid> {
    let first = &headers[0];
    let g = grid(first)?;
    let (iop, spacing, rows, cols) = (g.orientation, g.spacing, g.rows, g.columns);
    if spacing.iter().any(|&s| s <= 0.0) {
        bail!(
            "{}: PixelSpacing {spacing:?} is invalid (each spacing must be positive)",
            file(first)
        );
    }
    for h in &headers[1..] {
        let other = grid(h)?;
        let (o, s, r, c) = (other.orientation, other.spacing, other.rows, other.columns);
        if (r, c) != (rows, cols) {
            bail!(
                "{label}: {} is {r}×{c} pixels but {} is {rows}×{cols}; a series must hold one \
                 grid (is a localizer or a second reconstruction in the same series?)",
                file(h),
                file(first)
            );
        }
        if o.iter().zip(&iop).any(|(a, b)| (a - b).abs() > 1e-4) {
            bail!(
                "{label}: {} has ImageOrientationPatient {o:?} but {} has {iop:?}; a series \
                 must hold one orientation (is a localizer in the same series?)",
                file(h),
                file(first)
            );
        }
        if s.iter()
            .zip(&spacing)
            .any(|(a, b)| (a - b).abs() > 1e-4 * b.abs().max(1.0))
        {
            bail!(
                "{label}: {} has PixelSpacing {s:?} mm but {} has {spacing:?} mm; a series \
                 must hold one pixel spacing",
                file(h),
                file(first)
            );
        }
    }
    Ok(g)
}

/// Orders the slices along their normal, checks the spacing and builds the affine.
pub fn stack(headers: &[SliceHeader], label: &str) -> Result<Stack> {
    if headers.is_empty() {
        bail!("{label}: the series holds no slice");
    }
    let Grid {
        orientation: iop,
        spacing,
        ..
    } = common_grid(headers, label)?;
    let row_dir = [iop[0], iop[1], iop[2]];
    let col_dir = [iop[3], iop[4], iop[5]];
    let (nr, nc) = (norm(row_dir), norm(col_dir));
    if (nr - 1.0).abs() > 1e-3 || (nc - 1.0).abs() > 1e-3 || dot(row_dir, col_dir).abs() > 1e-3 {
        bail!(
            "{}: ImageOrientationPatient {iop:?} is not two orthogonal unit vectors",
            file(&headers[0])
        );
    }
    let row_dir = row_dir.map(|v| v / nr);
    let col_dir = col_dir.map(|v| v / nc);
    let normal = cross(row_dir, col_dir);
    let position = |i: usize| headers[i].position.expect("checked by common_grid");
    let along = |i: usize| dot(position(i), normal);

    let mut order: Vec<usize> = (0..headers.len()).collect();
    order.sort_by(|&a, &b| along(a).total_cmp(&along(b)));

    let mut warnings = Vec::new();
    let mut kept: Vec<usize> = Vec::with_capacity(order.len());
    for &i in &order {
        if let Some(&prev) = kept.last() {
            let (a, b) = (&headers[prev], &headers[i]);
            let apart = (0..3)
                .map(|k| (position(prev)[k] - position(i)[k]).abs())
                .fold(0.0, f64::max);
            if apart < SAME_POSITION_MM {
                if a.sop_instance_uid == b.sop_instance_uid && !a.sop_instance_uid.is_empty() {
                    warnings.push(format!(
                        "{label}: {} is a copy of {} (same SOPInstanceUID and position); used once",
                        file(b),
                        file(a)
                    ));
                    continue;
                }
                bail!(
                    "{label}: duplicate slices: {} and {} are both at {:.3} mm along the slice \
                     normal (two acquisitions or reconstructions in one series?)",
                    file(a),
                    file(b),
                    along(i)
                );
            }
        }
        kept.push(i);
    }
    let n = kept.len();
    if n < 2 {
        bail!(
            "{label}: the series holds {n} slice; a volume needs at least 2 ({})",
            file(&headers[kept[0]])
        );
    }

    let steps: Vec<f64> = kept.windows(2).map(|w| along(w[1]) - along(w[0])).collect();
    let mut sorted = steps.clone();
    sorted.sort_by(f64::total_cmp);
    let typical = sorted[sorted.len() / 2];
    if typical < SAME_POSITION_MM {
        bail!(
            "{label}: the slices do not advance along the slice normal (median step \
             {typical:.4} mm); they do not form a stack"
        );
    }
    let tolerance = (0.01 * typical).max(0.01);
    let mut problems = Vec::new();
    for (k, &d) in steps.iter().enumerate() {
        if (d - typical).abs() <= tolerance {
            continue;
        }
        let (a, b) = (&headers[kept[k]], &headers[kept[k + 1]]);
        let ratio = d / typical;
        let what = if ratio > 1.5 && (ratio - ratio.round()).abs() < 0.05 {
            format!(
                "{} slice(s) missing between {} and {}",
                ratio.round() as usize - 1,
                file(a),
                file(b)
            )
        } else {
            format!("{} and {} are {d:.3} mm apart", file(a), file(b))
        };
        problems.push(what);
    }
    if !problems.is_empty() {
        let shown = problems.len().min(3);
        bail!(
            "{label}: the slices are not evenly spaced (elsewhere {typical:.3} mm apart): {}{}",
            problems[..shown].join("; "),
            if problems.len() > shown {
                format!("; and {} more", problems.len() - shown)
            } else {
                String::new()
            }
        );
    }

    let first = position(kept[0]);
    let last = position(kept[n - 1]);
    let step: [f64; 3] = std::array::from_fn(|k| (last[k] - first[k]) / (n - 1) as f64);
    let normal_part = dot(step, normal);
    let tilt = (norm(cross(step, normal)).atan2(normal_part)).to_degrees();
    if tilt > MAX_TILT_DEGREES {
        bail!(
            "{label}: the slices are stacked {tilt:.1}° away from the slice normal (gantry \
             tilt); series tilted by more than {MAX_TILT_DEGREES}° are not read: resample it \
             to an untilted grid first (e.g. with dcm2niix, which corrects gantry tilt)"
        );
    }
    if tilt > 0.01 {
        warnings.push(format!(
            "{label}: gantry tilt of {tilt:.2}°: kept exactly in the affine (sheared slice axis)"
        ));
    }
    for (k, &i) in kept.iter().enumerate() {
        let p = position(i);
        let off = (0..3)
            .map(|c| (p[c] - first[c] - k as f64 * step[c]).abs())
            .fold(0.0, f64::max);
        if off > tolerance.max(0.05 * spacing[0].min(spacing[1])) {
            bail!(
                "{label}: {} lies {off:.3} mm off the line through the first and last slices \
                 ({} and {}); the slices do not form one regular stack",
                file(&headers[i]),
                file(&headers[kept[0]]),
                file(&headers[kept[n - 1]])
            );
        }
    }

    // DICOM LPS: pixel (c, r) of slice k sits at first + c·Δc·row_dir + r·Δr·col_dir + k·step,
    // with PixelSpacing = [Δr, Δc]. RAS negates the first two world coordinates.
    let columns = [
        row_dir.map(|v| v * spacing[1]),
        col_dir.map(|v| v * spacing[0]),
        step,
    ];
    let mut affine = [[0.0; 4]; 4];
    for (r, sign) in [-1.0, -1.0, 1.0].into_iter().enumerate() {
        for (c, col) in columns.iter().enumerate() {
            affine[r][c] = sign * col[r];
        }
        affine[r][3] = sign * first[r];
    }
    affine[3][3] = 1.0;
    Ok(Stack {
        order: kept,
        affine,
        warnings,
    })
}
