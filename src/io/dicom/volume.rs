//! A DICOM series as a [`Volume`]: pixel data decoded (dicom-pixeldata) and rescaled to HU, slices stacked on the grid and in the conventions of the NIfTI reader.

use super::geometry::stack;
use super::header::{transfer_syntax_name, transfer_syntax_supported, SliceHeader};
use super::scan::{DicomSeries, SeriesTags};
use crate::io::nifti::{oriented, set_header_affine, AffineSource, Volume};
use ::nifti::NiftiHeader;
use anyhow::{anyhow, bail, Result};
use dicom_pixeldata::PixelDecoder;
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;

/// What a report says about the series it assessed (no patient tags).
#[derive(Clone, Debug, Serialize)]
pub struct SeriesInfo {
    pub folder: String,
    pub name: String,
    #[serde(flatten)]
    pub tags: SeriesTags,
    /// Slices stacked into the volume.
    pub slices: usize,
    /// The transfer syntaxes of its files (names and UIDs).
    pub transfer_syntaxes: Vec<String>,
}

/// A series read into a volume.
#[derive(Clone, Debug)]
pub struct SeriesVolume {
    pub volume: Volume,
    pub info: SeriesInfo,
    pub warnings: Vec<String>,
}

/// One slice's values after RescaleSlope/RescaleIntercept (row by row, columns fastest).
#[derive(Clone, Debug)]
pub struct SliceImage {
    pub rows: usize,
    pub columns: usize,
    pub values: Vec<f32>,
}

/// Checks that a slice's pixel format is one this reader converts.
fn check_format(h: &SliceHeader) -> Result<(u16, u16)> {
    let name = h.path.display();
    if !transfer_syntax_supported(&h.transfer_syntax) {
        bail!(
            "{name}: the transfer syntax {} is not supported (supported: uncompressed, \
             deflated, RLE Lossless and JPEG Lossless); decompress the series first (e.g. \
             `gdcmconv --raw` or `dcmdjpeg`)",
            transfer_syntax_name(&h.transfer_syntax)
        );
    }
    if h.samples_per_pixel != 1 {
        bail!(
            "{name}: {} samples per pixel; CT slices hold one (greyscale)",
            h.samples_per_pixel
        );
    }
    match h.photometric.as_deref() {
        Some("MONOCHROME1") | Some("MONOCHROME2") | None => {}
        Some(p) => bail!("{name}: photometric interpretation {p}; CT slices are MONOCHROME2"),
    }
    let allocated = h
        .bits_allocated
        .ok_or_else(|| anyhow!("{name}: BitsAllocated (0028,0100) is missing"))?;
    if ![8, 16, 32].contains(&allocated) {
        bail!("{name}: BitsAllocated {allocated} is not supported (8, 16 or 32)");
    }
    let stored = h.bits_stored.unwrap_or(allocated);
    if stored == 0 || stored > allocated {
        bail!("{name}: BitsStored {stored} does not fit BitsAllocated {allocated}");
    }
    if !(h.slope.is_finite() && h.slope != 0.0 && h.intercept.is_finite()) {
        bail!(
            "{name}: RescaleSlope {} and RescaleIntercept {} do not define a usable scaling",
            h.slope,
            h.intercept
        );
    }
    Ok((allocated, stored))
}

/// Decodes one file's pixel data into rescaled values.
fn decode(h: &SliceHeader) -> Result<SliceImage> {
    let name = h.path.display();
    let (allocated, stored) = check_format(h)?;
    let obj = dicom_object::open_file(&h.path).map_err(|e| {
        anyhow!(
            "{name}: cannot read the file to its end ({:#}); is it truncated?",
            anyhow::Error::new(e)
        )
    })?;
    let pixels = obj.decode_pixel_data().map_err(|e| {
        anyhow!(
            "{name}: cannot decode the pixel data ({}): {:#}",
            transfer_syntax_name(&h.transfer_syntax),
            anyhow::Error::new(e)
        )
    })?;
    let (rows, columns) = (pixels.rows() as usize, pixels.columns() as usize);
    if pixels.number_of_frames() != 1 {
        bail!(
            "{name}: {} frames; one frame per file is read",
            pixels.number_of_frames()
        );
    }
    let width = allocated as usize / 8;
    let n = rows * columns;
    let bytes = pixels.data();
    if bytes.len() < n * width {
        bail!(
            "{name}: the pixel data holds {} bytes but {rows}×{columns} pixels of {allocated} \
             bits need {}; the file is truncated or corrupt",
            bytes.len(),
            n * width
        );
    }
    let mask: u64 = (1u64 << stored) - 1;
    let sign_bit: u64 = 1u64 << (stored - 1);
    let (slope, intercept) = (h.slope, h.intercept);
    let signed = h.signed;
    let values = bytes[..n * width]
        .par_chunks(width)
        .map(|b| {
            let raw = match width {
                1 => b[0] as u64,
                2 => u16::from_ne_bytes([b[0], b[1]]) as u64,
                _ => u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as u64,
            } & mask;
            let v = if signed && raw & sign_bit != 0 {
                raw as i64 - (1i64 << stored)
            } else {
                raw as i64
            };
            (v as f64 * slope + intercept) as f32
        })
        .collect();
    Ok(SliceImage {
        rows,
        columns,
        values,
    })
}

/// Reads one DICOM file's pixel values after RescaleSlope/RescaleIntercept (HU for CT),
/// whatever its modality.
pub fn read_slice(path: &Path) -> Result<SliceImage> {
    decode(&SliceHeader::read(path)?)
}

/// The stored type's name for reports (e.g. int16).
fn dtype_name(h: &SliceHeader) -> &'static str {
    match (h.bits_allocated, h.signed) {
        (Some(8), false) => "uint8",
        (Some(8), true) => "int8",
        (Some(32), false) => "uint32",
        (Some(32), true) => "int32",
        (_, false) => "uint16",
        (_, true) => "int16",
    }
}

/// Reads a series into a volume: native array (columns, rows, slices) with the slices in
/// increasing position along their normal; the affine from ImageOrientationPatient,
/// PixelSpacing and the slices' ImagePositionPatient, turned from DICOM's LPS into the RAS+
/// world of NIfTI (x and y negated). The volume's header is the NIfTI header of that grid,
/// so outputs written with it (lobe map, conversion) lie on the series' grid.
pub fn read_series(series: &DicomSeries) -> Result<SeriesVolume> {
    let label = series.label();
    let geometry = stack(&series.headers, &label)?;
    let slices: Vec<&SliceHeader> = geometry.order.iter().map(|&i| &series.headers[i]).collect();
    for h in &slices {
        check_format(h)?;
    }
    let first = slices[0];
    let rows = first.rows.expect("checked by the stack geometry") as usize;
    let columns = first.columns.expect("checked by the stack geometry") as usize;
    let dims = [columns, rows, slices.len()];
    if dims.iter().any(|&d| d > i16::MAX as usize) {
        bail!("{label}: {dims:?} voxels do not fit a NIfTI-1 header (at most 32767 per axis)");
    }
    let orientation = oriented(&geometry.affine, dims, &label)?;
    // Each slice is decoded straight into its place, so memory holds one volume and the
    // slices in flight.
    let mut data = vec![0f32; dims.iter().product()];
    data.par_chunks_mut(rows * columns)
        .zip(slices.par_iter())
        .try_for_each(|(dst, h)| -> Result<()> {
            let img = decode(h)?;
            if (img.rows, img.columns) != (rows, columns) {
                bail!(
                    "{}: its pixel data is {}×{} but the series' slices are {rows}×{columns}",
                    h.path.display(),
                    img.rows,
                    img.columns
                );
            }
            dst.copy_from_slice(&img.values);
            Ok(())
        })?;
    let mut header = NiftiHeader {
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
        xyzt_units: 2,
        descrip: b"m2unet from DICOM".to_vec(),
        ..NiftiHeader::default()
    };
    set_header_affine(&mut header, &geometry.affine, true, true);
    let mut syntaxes: Vec<String> = slices
        .iter()
        .map(|h| transfer_syntax_name(&h.transfer_syntax))
        .collect();
    syntaxes.sort();
    syntaxes.dedup();
    let volume = Volume {
        path: series.path(),
        header,
        dims,
        dtype: dtype_name(first),
        data,
        affine: geometry.affine,
        affine_source: AffineSource::Dicom,
        orientation,
    };
    Ok(SeriesVolume {
        volume,
        info: SeriesInfo {
            folder: series.folder.display().to_string(),
            name: series.name.clone(),
            tags: series.tags.clone(),
            slices: slices.len(),
            transfer_syntaxes: syntaxes,
        },
        warnings: geometry.warnings,
    })
}
