//! One DICOM file's header: the identity, geometry and pixel-format tags that series reading needs.

use anyhow::{anyhow, bail, Result};
use dicom_dictionary_std::tags;
use dicom_encoding::transfer_syntax::TransferSyntaxIndex;
use dicom_object::{DefaultDicomObject, OpenFileOptions, Tag};
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Transfer syntaxes whose pixel data is read: uncompressed (implicit and explicit VR little
/// endian, explicit VR big endian, deflated, encapsulated uncompressed) and the lossless codecs
/// with pure-Rust decoders (RLE Lossless; JPEG Lossless process 14, any predictor, and SV1).
/// Lossy codecs are refused, and so are JPEG-LS and JPEG 2000 (C/C++ decoders only).
pub const SUPPORTED_TRANSFER_SYNTAXES: [&str; 8] = [
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.1.98",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
];

/// The SOP classes read as CT slices.
pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";
/// Multi-frame CT SOP classes (Enhanced, Legacy Converted Enhanced), recognised to refuse clearly.
pub const MULTIFRAME_CT_STORAGE: [&str; 2] =
    ["1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2"];
/// The SOP class of a DICOMDIR (a media directory index).
pub const MEDIA_DIRECTORY_STORAGE: &str = "1.2.840.10008.1.3.10";

/// A transfer syntax's name (from the registry when it knows the UID).
pub fn transfer_syntax_name(uid: &str) -> String {
    let uid = uid.trim_end_matches(['\0', ' ']);
    match TransferSyntaxRegistry.get(uid) {
        Some(ts) => format!("{} ({uid})", ts.name()),
        None => format!("unknown transfer syntax {uid}"),
    }
}

/// Whether a transfer syntax's pixel data is read here.
pub fn transfer_syntax_supported(uid: &str) -> bool {
    let uid = uid.trim_end_matches(['\0', ' ']);
    SUPPORTED_TRANSFER_SYNTAXES.contains(&uid)
}

/// Whether a file starts like a DICOM Part 10 file (128-byte preamble, then "DICM").
pub fn has_dicom_magic(path: &Path) -> bool {
    let mut head = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head[128..132] == b"DICM"
}

/// The tags of one file that grouping, geometry and pixel conversion use. Patient tags are
/// never read.
#[derive(Clone, Debug)]
pub struct SliceHeader {
    pub path: PathBuf,
    pub sop_class_uid: String,
    pub sop_instance_uid: String,
    pub transfer_syntax: String,
    pub modality: Option<String>,
    pub manufacturer: Option<String>,
    pub study_instance_uid: Option<String>,
    pub series_instance_uid: Option<String>,
    pub series_number: Option<i64>,
    pub series_description: Option<String>,
    /// ImagePositionPatient: the centre of the first pixel, mm, DICOM LPS.
    pub position: Option<[f64; 3]>,
    /// ImageOrientationPatient: row direction (along a row, increasing column), then column
    /// direction (down a column, increasing row), DICOM LPS.
    pub orientation: Option<[f64; 6]>,
    /// PixelSpacing: [between rows, between columns] in mm.
    pub pixel_spacing: Option<[f64; 2]>,
    pub rows: Option<u16>,
    pub columns: Option<u16>,
    pub frames: u32,
    pub samples_per_pixel: u16,
    pub photometric: Option<String>,
    pub bits_allocated: Option<u16>,
    pub bits_stored: Option<u16>,
    pub signed: bool,
    /// RescaleSlope and RescaleIntercept (1 and 0 when absent).
    pub slope: f64,
    pub intercept: f64,
}

impl SliceHeader {
    /// Reads the header of a DICOM Part 10 file (everything before the pixel data).
    pub fn read(path: &Path) -> Result<SliceHeader> {
        let obj = OpenFileOptions::new()
            .read_until(tags::PIXEL_DATA)
            .open_file(path)
            .map_err(|e| {
                anyhow!(
                    "{}: not a readable DICOM file ({:#}); is it truncated or corrupt?",
                    path.display(),
                    anyhow::Error::new(e)
                )
            })?;
        SliceHeader::from_object(path, &obj)
    }

    /// Collects the header fields of an opened object.
    fn from_object(path: &Path, obj: &DefaultDicomObject) -> Result<SliceHeader> {
        let f = Fields { obj, path };
        let meta = obj.meta();
        let sop_class_uid = f
            .text(tags::SOP_CLASS_UID)
            .unwrap_or_else(|| clean(&meta.media_storage_sop_class_uid));
        let sop_instance_uid = f
            .text(tags::SOP_INSTANCE_UID)
            .unwrap_or_else(|| clean(&meta.media_storage_sop_instance_uid));
        Ok(SliceHeader {
            path: path.to_path_buf(),
            sop_class_uid,
            sop_instance_uid,
            transfer_syntax: clean(&meta.transfer_syntax),
            modality: f.text(tags::MODALITY),
            manufacturer: f.text(tags::MANUFACTURER),
            study_instance_uid: f.text(tags::STUDY_INSTANCE_UID),
            series_instance_uid: f.text(tags::SERIES_INSTANCE_UID),
            series_number: f.int(tags::SERIES_NUMBER, "SeriesNumber")?,
            series_description: f.text(tags::SERIES_DESCRIPTION),
            position: f.floats::<3>(tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient")?,
            orientation: f
                .floats::<6>(tags::IMAGE_ORIENTATION_PATIENT, "ImageOrientationPatient")?,
            pixel_spacing: f.floats::<2>(tags::PIXEL_SPACING, "PixelSpacing")?,
            rows: f.uint(tags::ROWS, "Rows")?,
            columns: f.uint(tags::COLUMNS, "Columns")?,
            frames: f
                .int(tags::NUMBER_OF_FRAMES, "NumberOfFrames")?
                .unwrap_or(1)
                .max(1) as u32,
            samples_per_pixel: f
                .uint(tags::SAMPLES_PER_PIXEL, "SamplesPerPixel")?
                .unwrap_or(1),
            photometric: f.text(tags::PHOTOMETRIC_INTERPRETATION),
            bits_allocated: f.uint(tags::BITS_ALLOCATED, "BitsAllocated")?,
            bits_stored: f.uint(tags::BITS_STORED, "BitsStored")?,
            signed: f.uint(tags::PIXEL_REPRESENTATION, "PixelRepresentation")? == Some(1),
            slope: f
                .floats::<1>(tags::RESCALE_SLOPE, "RescaleSlope")?
                .map_or(1.0, |v| v[0]),
            intercept: f
                .floats::<1>(tags::RESCALE_INTERCEPT, "RescaleIntercept")?
                .map_or(0.0, |v| v[0]),
        })
    }

    /// Whether the file holds an image at all (Rows and Columns present).
    pub fn has_image(&self) -> bool {
        self.rows.is_some() && self.columns.is_some()
    }
}

/// Trims the padding that DICOM strings and UIDs carry.
fn clean(s: &str) -> String {
    s.trim_matches(|c: char| c == '\0' || c.is_whitespace())
        .to_string()
}

/// Typed access to optional tags, with errors naming the file and the tag.
struct Fields<'a> {
    obj: &'a DefaultDicomObject,
    path: &'a Path,
}

impl Fields<'_> {
    fn text(&self, tag: Tag) -> Option<String> {
        let e = self.obj.get(tag)?;
        let s = clean(&e.to_str().ok()?);
        (!s.is_empty()).then_some(s)
    }

    fn int(&self, tag: Tag, name: &str) -> Result<Option<i64>> {
        match self.text(tag) {
            None => Ok(None),
            Some(s) => {
                let v = s.parse::<f64>().ok().filter(|v| v.fract() == 0.0);
                match v {
                    Some(v) => Ok(Some(v as i64)),
                    None => bail!(
                        "{}: {name} {tag} is {s:?}, not an integer",
                        self.path.display()
                    ),
                }
            }
        }
    }

    fn uint(&self, tag: Tag, name: &str) -> Result<Option<u16>> {
        let Some(e) = self.obj.get(tag) else {
            return Ok(None);
        };
        match e.to_int::<u16>() {
            Ok(v) => Ok(Some(v)),
            Err(_) if clean(&e.to_str().unwrap_or_default()).is_empty() => Ok(None),
            Err(err) => bail!(
                "{}: {name} {tag} cannot be read as an unsigned integer ({err})",
                self.path.display()
            ),
        }
    }

    fn floats<const N: usize>(&self, tag: Tag, name: &str) -> Result<Option<[f64; N]>> {
        let Some(e) = self.obj.get(tag) else {
            return Ok(None);
        };
        if clean(&e.to_str().unwrap_or_default()).is_empty() {
            return Ok(None);
        }
        let values = e.to_multi_float64().map_err(|err| {
            anyhow!(
                "{}: {name} {tag} cannot be read as numbers ({err})",
                self.path.display()
            )
        })?;
        let arr: [f64; N] = values.as_slice().try_into().map_err(|_| {
            anyhow!(
                "{}: {name} {tag} holds {} value(s) {values:?}, expected {N}",
                self.path.display(),
                values.len()
            )
        })?;
        if arr.iter().any(|v| !v.is_finite()) {
            bail!(
                "{}: {name} {tag} holds non-finite values {arr:?}",
                self.path.display()
            );
        }
        Ok(Some(arr))
    }
}
