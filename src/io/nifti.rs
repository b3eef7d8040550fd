//! NIfTI-1 volumes: read and validate `.nii`/`.nii.gz`, affines, canonical RAS+ orientation, write.
//!
//! Reading uses the `nifti` crate's header parser; the voxel bytes are converted here (in
//! parallel, with `scl_slope`/`scl_inter` applied) so that every data type and byte order
//! takes one path. Writing serialises the NIfTI-1 header here as well: the crate's writer
//! always resets `scl_slope`/`scl_inter`, which the phantoms' uint16 volumes need.

use crate::io::atomic::write_atomic_with;
use ::nifti::{Endianness, NiftiHeader};
use anyhow::{anyhow, bail, Result};
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use rayon::prelude::*;
use serde::Serialize;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Smallest accepted in-plane size (voxels along canonical x and y).
pub const MIN_INPLANE: usize = 16;
/// Smallest accepted number of axial slices (a bag needs two patches).
pub const MIN_SLICES: usize = 2;

/// Largest accepted voxel count (1024 × 1024 × 2048; 8 GiB as f32).
const MAX_VOXELS: usize = 1 << 31;

/// NIfTI-1 header size and the offset of the voxel data in a single `.nii` file.
const HEADER_BYTES: usize = 348;
const DATA_OFFSET: usize = 352;

/// Which header fields the voxel-to-world affine came from (data.md: sform, else qform, else
/// pixdim; or a DICOM series' geometry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AffineSource {
    Sform,
    Qform,
    Pixdim,
    /// A DICOM series' ImageOrientationPatient, PixelSpacing and ImagePositionPatient.
    Dicom,
}

/// The voxel data types this reader accepts, with their NIfTI codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoredType {
    U8,
    I16,
    I32,
    F32,
    F64,
    U16,
}

impl StoredType {
    fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            2 => StoredType::U8,
            4 => StoredType::I16,
            8 => StoredType::I32,
            16 => StoredType::F32,
            64 => StoredType::F64,
            512 => StoredType::U16,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            StoredType::U8 => 1,
            StoredType::I16 | StoredType::U16 => 2,
            StoredType::I32 | StoredType::F32 => 4,
            StoredType::F64 => 8,
        }
    }

    fn name(self) -> &'static str {
        match self {
            StoredType::U8 => "uint8",
            StoredType::I16 => "int16",
            StoredType::I32 => "int32",
            StoredType::F32 => "float32",
            StoredType::F64 => "float64",
            StoredType::U16 => "uint16",
        }
    }
}

/// How the native voxel axes map onto the canonical RAS+ axes.
///
/// Canonical axis `j` (0 = towards the patient's Right, 1 = Anterior, 2 = Superior) is native
/// axis `perm[j]`, reversed when `flip[j]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Orientation {
    pub perm: [usize; 3],
    pub flip: [bool; 3],
    pub native_dims: [usize; 3],
}

impl Orientation {
    /// The nearest axis permutation and flips of an affine's 3×3 part: the largest entries
    /// are assigned first, so that even a 45° oblique affine gives a permutation.
    pub fn from_affine(affine: &[[f64; 4]; 4], native_dims: [usize; 3]) -> Self {
        let mut used_world = [false; 3];
        let mut used_voxel = [false; 3];
        let mut perm = [0usize; 3];
        let mut flip = [false; 3];
        for _ in 0..3 {
            let mut best = (0usize, 0usize, -1.0f64);
            for (j, &uw) in used_world.iter().enumerate() {
                for (i, &uv) in used_voxel.iter().enumerate() {
                    if uw || uv {
                        continue;
                    }
                    let norm = column_norm(affine, i).max(f64::MIN_POSITIVE);
                    let v = affine[j][i].abs() / norm;
                    if v > best.2 {
                        best = (j, i, v);
                    }
                }
            }
            let (j, i, _) = best;
            used_world[j] = true;
            used_voxel[i] = true;
            perm[j] = i;
            flip[j] = affine[j][i] < 0.0;
        }
        Orientation {
            perm,
            flip,
            native_dims,
        }
    }

    /// The orientation of a volume written in the given axis codes (e.g. "LPS": native axis 0
    /// runs towards the Left, 1 towards Posterior, 2 towards Superior).
    pub fn from_axcodes(codes: &str, native_dims: [usize; 3]) -> Result<Self> {
        let letters: Vec<char> = codes.to_ascii_uppercase().chars().collect();
        if letters.len() != 3 {
            bail!("orientation {codes:?} must be three letters such as RAS, LPS or LAS");
        }
        let mut perm = [usize::MAX; 3];
        let mut flip = [false; 3];
        for (i, c) in letters.iter().enumerate() {
            let (j, f) = match c {
                'R' => (0, false),
                'L' => (0, true),
                'A' => (1, false),
                'P' => (1, true),
                'S' => (2, false),
                'I' => (2, true),
                _ => bail!("orientation {codes:?}: {c:?} is not one of R, L, A, P, S, I"),
            };
            if perm[j] != usize::MAX {
                bail!("orientation {codes:?} names the same axis twice");
            }
            perm[j] = i;
            flip[j] = f;
        }
        Ok(Orientation {
            perm,
            flip,
            native_dims,
        })
    }

    /// The three-letter code of the native array (the direction each native axis runs to).
    pub fn axcodes(&self) -> String {
        let mut out = [' '; 3];
        for j in 0..3 {
            let letters = [['R', 'L'], ['A', 'P'], ['S', 'I']][j];
            out[self.perm[j]] = letters[self.flip[j] as usize];
        }
        out.iter().collect()
    }

    pub fn canonical_dims(&self) -> [usize; 3] {
        [
            self.native_dims[self.perm[0]],
            self.native_dims[self.perm[1]],
            self.native_dims[self.perm[2]],
        ]
    }

    /// Per canonical axis, the native linear offset of each canonical index.
    fn offset_tables(&self) -> [Vec<usize>; 3] {
        let d = self.native_dims;
        let strides = [1, d[0], d[0] * d[1]];
        let c = self.canonical_dims();
        std::array::from_fn(|j| {
            (0..c[j])
                .map(|k| {
                    let idx = if self.flip[j] { c[j] - 1 - k } else { k };
                    idx * strides[self.perm[j]]
                })
                .collect()
        })
    }

    /// Native array (x fastest) → canonical RAS+ array (x fastest).
    pub fn to_canonical<T: Copy + Default + Send + Sync>(&self, native: &[T]) -> Vec<T> {
        let c = self.canonical_dims();
        let [ox, oy, oz] = self.offset_tables();
        let mut out = vec![T::default(); c[0] * c[1] * c[2]];
        out.par_chunks_mut(c[0] * c[1])
            .enumerate()
            .for_each(|(z, slice)| {
                for (y, row) in slice.chunks_mut(c[0]).enumerate() {
                    let base = oy[y] + oz[z];
                    for (x, v) in row.iter_mut().enumerate() {
                        *v = native[base + ox[x]];
                    }
                }
            });
        out
    }

    /// Canonical RAS+ array → native array: the exact inverse of [`Self::to_canonical`].
    pub fn from_canonical<T: Copy + Default + Send + Sync>(&self, canonical: &[T]) -> Vec<T> {
        let d = self.native_dims;
        let c = self.canonical_dims();
        let cstrides = [1, c[0], c[0] * c[1]];
        let mut inv = [0usize; 3];
        for j in 0..3 {
            inv[self.perm[j]] = j;
        }
        let tables: [Vec<usize>; 3] = std::array::from_fn(|i| {
            let j = inv[i];
            (0..d[i])
                .map(|k| {
                    let idx = if self.flip[j] { c[j] - 1 - k } else { k };
                    idx * cstrides[j]
                })
                .collect()
        });
        let mut out = vec![T::default(); d[0] * d[1] * d[2]];
        out.par_chunks_mut(d[0] * d[1])
            .enumerate()
            .for_each(|(z, slice)| {
                for (y, row) in slice.chunks_mut(d[0]).enumerate() {
                    let base = tables[1][y] + tables[2][z];
                    for (x, v) in row.iter_mut().enumerate() {
                        *v = canonical[base + tables[0][x]];
                    }
                }
            });
        out
    }

    /// The affine of the canonical array, given the native one.
    pub fn canonical_affine(&self, native: &[[f64; 4]; 4]) -> [[f64; 4]; 4] {
        let c = self.canonical_dims();
        let mut out = [[0.0; 4]; 4];
        out[3][3] = 1.0;
        for r in 0..3 {
            out[r][3] = native[r][3];
        }
        for j in 0..3 {
            let i = self.perm[j];
            let s = if self.flip[j] { -1.0 } else { 1.0 };
            for r in 0..3 {
                out[r][j] = s * native[r][i];
                if self.flip[j] {
                    out[r][3] += native[r][i] * (c[j] - 1) as f64;
                }
            }
        }
        out
    }
}

fn column_norm(a: &[[f64; 4]; 4], i: usize) -> f64 {
    (a[0][i] * a[0][i] + a[1][i] * a[1][i] + a[2][i] * a[2][i]).sqrt()
}

/// A validated 3D volume in Hounsfield units on its native grid.
#[derive(Clone, Debug)]
pub struct Volume {
    pub path: PathBuf,
    /// The header as read (kept to write outputs on the same grid).
    pub header: NiftiHeader,
    /// Native array size (x, y, z).
    pub dims: [usize; 3],
    /// The stored data type's name (uint8, int16, uint16, int32, float32, float64).
    pub dtype: &'static str,
    /// Values after `scl_slope`/`scl_inter`, native order, x fastest.
    pub data: Vec<f32>,
    /// Voxel index → world (mm, RAS+ as NIfTI defines it).
    pub affine: [[f64; 4]; 4],
    pub affine_source: AffineSource,
    pub orientation: Orientation,
}

impl Volume {
    pub fn canonical_dims(&self) -> [usize; 3] {
        self.orientation.canonical_dims()
    }

    /// The volume in canonical RAS+ order (x fastest).
    pub fn canonical_data(&self) -> Vec<f32> {
        self.orientation.to_canonical(&self.data)
    }

    pub fn canonical_affine(&self) -> [[f64; 4]; 4] {
        self.orientation.canonical_affine(&self.affine)
    }

    /// Voxel spacing in mm along the canonical axes (the affine's column lengths).
    pub fn canonical_spacing(&self) -> [f64; 3] {
        std::array::from_fn(|j| column_norm(&self.affine, self.orientation.perm[j]))
    }

    /// One voxel's volume in millilitres.
    pub fn voxel_ml(&self) -> f64 {
        let s = self.canonical_spacing();
        s[0] * s[1] * s[2] / 1000.0
    }

    /// The lowest and highest voxel value.
    pub fn value_range(&self) -> (f32, f32) {
        self.data
            .par_iter()
            .fold(
                || (f32::INFINITY, f32::NEG_INFINITY),
                |(lo, hi), &v| (lo.min(v), hi.max(v)),
            )
            .reduce(
                || (f32::INFINITY, f32::NEG_INFINITY),
                |a, b| (a.0.min(b.0), a.1.max(b.1)),
            )
    }

    /// A message when the values do not look like Hounsfield units (max < 100 or min > −500).
    pub fn hu_range_problem(&self) -> Option<String> {
        let (lo, hi) = self.value_range();
        if hi < 100.0 || lo > -500.0 {
            Some(format!(
                "{}: values span {lo}…{hi}, which does not look like CT in Hounsfield units \
                 (expected a minimum below −500 and a maximum above 100)",
                self.path.display()
            ))
        } else {
            None
        }
    }
}

/// Reads a `.nii` or `.nii.gz` file (gzip is recognised by its magic bytes) and validates it.
/// The header is checked before any voxel is read, and no more than the header's declared
/// voxel bytes are read or inflated, and the buffer grows with the data read, so memory stays
/// bounded by the declared volume and by the data actually present.
pub fn read_volume(path: &Path) -> Result<Volume> {
    let file =
        File::open(path).map_err(|e| anyhow!("{}: cannot read the file ({e})", path.display()))?;
    read_volume_from(path, file)
}

/// [`read_volume`] of a stream holding a `.nii` or `.nii.gz` file's bytes; `path` names the
/// file in errors and in the returned volume.
pub fn read_volume_from(path: &Path, source: impl Read) -> Result<Volume> {
    let name = path.display().to_string();
    let Opened {
        mut reader,
        head,
        header,
        dims,
        stored,
    } = open_header(source, &name)?;
    let nvox = dims[0] * dims[1] * dims[2];
    let offset = header.vox_offset as usize;
    let need = offset + nvox * stored.size();
    let what = format!(
        "the {}×{}×{} {} voxels the header declares",
        dims[0],
        dims[1],
        dims[2],
        stored.name()
    );
    let mut bytes = head;
    read_declared(&mut reader, &mut bytes, need, &name, &what)?;
    drop(reader);
    if bytes.len() < need {
        bail!(
            "{name}: the file is truncated: the header promises {nvox} {} voxels ({need} bytes \
             with the header) but only {} bytes are present",
            stored.name(),
            bytes.len()
        );
    }
    let mut data = decode_voxels(
        &bytes[offset..need],
        stored,
        header.endianness == Endianness::Big,
    );
    drop(bytes);
    apply_scaling(&mut data, header.scl_slope, header.scl_inter);
    let bad = data.par_iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        bail!("{name}: {bad} voxels are NaN or infinite; the volume cannot be used");
    }
    let (affine, affine_source, orientation) = geometry(&header, dims, &name)?;
    Ok(Volume {
        path: path.to_path_buf(),
        header,
        dims,
        dtype: stored.name(),
        data,
        affine,
        affine_source,
        orientation,
    })
}

/// The grid a volume's voxels lie on: array size and voxel-to-world affine.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    pub dims: [usize; 3],
    pub affine: [[f64; 4]; 4],
}

impl Grid {
    /// How `other` differs from this grid: other dimensions, or an affine entry that differs
    /// by more than 1e-3 relative (mm for the offsets); `None` when they match.
    pub fn mismatch(&self, other: &Grid) -> Option<String> {
        let [a, b] = [self.dims, other.dims];
        if a != b {
            return Some(format!(
                "dimensions {}×{}×{} vs {}×{}×{}",
                a[0], a[1], a[2], b[0], b[1], b[2]
            ));
        }
        let pairs = self
            .affine
            .iter()
            .flatten()
            .zip(other.affine.iter().flatten());
        let worst = pairs
            .filter(|(x, y)| (*x - *y).abs() > 1e-3 * (1.0 + x.abs()))
            .map(|(x, y)| (x - y).abs())
            .fold(None, |m: Option<f64>, d| Some(m.map_or(d, |m| m.max(d))));
        worst.map(|d| format!("affines differ by up to {d:.4} (beyond 1e-3 relative)"))
    }
}

impl Volume {
    pub fn grid(&self) -> Grid {
        Grid {
            dims: self.dims,
            affine: self.affine,
        }
    }
}

/// Reads and validates only the header of a `.nii`/`.nii.gz` file (as [`read_volume`] does,
/// without the voxels) and returns its grid.
pub fn read_grid(path: &Path) -> Result<Grid> {
    let name = path.display().to_string();
    let file = File::open(path).map_err(|e| anyhow!("{name}: cannot read the file ({e})"))?;
    let opened = open_header(file, &name)?;
    let (affine, _, _) = geometry(&opened.header, opened.dims, &name)?;
    Ok(Grid {
        dims: opened.dims,
        affine,
    })
}

/// A file whose header has been read and validated, positioned after it.
struct Opened<'a> {
    reader: Box<dyn Read + 'a>,
    /// The bytes read so far (the header and its extension flag).
    head: Vec<u8>,
    header: NiftiHeader,
    dims: [usize; 3],
    stored: StoredType,
}

/// Opens a volume and validates its header: signature, dimensions, spacing, data type, voxel
/// count and data offset.
fn open_header<'a>(source: impl Read + 'a, name: &str) -> Result<Opened<'a>> {
    let mut reader = maybe_gunzip(source, name)?;
    let mut head = Vec::with_capacity(DATA_OFFSET);
    read_up_to(&mut reader, &mut head, DATA_OFFSET as u64, name)?;
    check_signature(&head, name)?;
    let dims = validate_dims(&head, name)?;
    let header = NiftiHeader::from_reader(&head[..])
        .map_err(|e| anyhow!("{name}: the NIfTI-1 header cannot be parsed ({e})"))?;
    let spacing = [header.pixdim[1], header.pixdim[2], header.pixdim[3]];
    if spacing.iter().any(|s| !s.is_finite() || *s <= 0.0) {
        bail!(
            "{name}: voxel spacing (pixdim) {spacing:?} is invalid: every spacing must be a \
             positive finite number of mm"
        );
    }
    let stored = StoredType::from_code(header.datatype).ok_or_else(|| {
        anyhow!(
            "{name}: NIfTI data type code {} is not supported (use uint8, int16, uint16, int32, \
             float32 or float64)",
            header.datatype
        )
    })?;
    let nvox = dims[0] * dims[1] * dims[2];
    if nvox > MAX_VOXELS {
        bail!(
            "{name}: the header declares {}×{}×{} = {nvox} voxels, more than the {MAX_VOXELS} this reader accepts (a 1024×1024×2048 CT)",
            dims[0],
            dims[1],
            dims[2]
        );
    }
    if !(header.vox_offset >= DATA_OFFSET as f32 && header.vox_offset < (1u64 << 32) as f32) {
        bail!(
            "{name}: vox_offset {} is invalid (a single-file NIfTI-1 volume starts its data at \
             byte 352 or later)",
            header.vox_offset
        );
    }
    Ok(Opened {
        reader,
        head,
        header,
        dims,
        stored,
    })
}

/// The orientation of a `dims` grid with voxel-to-world `affine`, checked: at least
/// [`MIN_INPLANE`]² in-plane and [`MIN_SLICES`] axial slices in canonical order.
pub(crate) fn oriented(
    affine: &[[f64; 4]; 4],
    dims: [usize; 3],
    name: &str,
) -> Result<Orientation> {
    let orientation = Orientation::from_affine(affine, dims);
    let c = orientation.canonical_dims();
    if c[0] < MIN_INPLANE || c[1] < MIN_INPLANE || c[2] < MIN_SLICES {
        bail!(
            "{name}: the volume is too small ({}×{}×{} voxels in RAS order); at least \
             {MIN_INPLANE}×{MIN_INPLANE} in-plane and {MIN_SLICES} axial slices are needed",
            c[0],
            c[1],
            c[2]
        );
    }
    Ok(orientation)
}

/// The header's affine, where it came from and the orientation, checked: a usable affine and
/// at least the smallest accepted size in canonical order.
fn geometry(
    header: &NiftiHeader,
    dims: [usize; 3],
    name: &str,
) -> Result<([[f64; 4]; 4], AffineSource, Orientation)> {
    let (affine, affine_source) = header_affine(header, name)?;
    Ok((affine, affine_source, oriented(&affine, dims, name)?))
}

/// A reader of the file's bytes, inflating on the fly when it starts with the gzip magic.
fn maybe_gunzip<'a>(source: impl Read + 'a, name: &str) -> Result<Box<dyn Read + 'a>> {
    let mut source = std::io::BufReader::new(source);
    let mut magic = Vec::with_capacity(2);
    (&mut source)
        .take(2)
        .read_to_end(&mut magic)
        .map_err(|e| anyhow!("{name}: cannot read the file ({e})"))?;
    let gzip = magic == [0x1f, 0x8b];
    let raw = std::io::Cursor::new(magic).chain(source);
    Ok(if gzip {
        Box::new(std::io::BufReader::new(MultiGzDecoder::new(raw)))
    } else {
        Box::new(raw)
    })
}

/// Appends bytes from `reader` to `out` until it holds `limit` bytes or the stream ends.
fn read_up_to(reader: &mut dyn Read, out: &mut Vec<u8>, limit: u64, name: &str) -> Result<()> {
    let want = limit.saturating_sub(out.len() as u64);
    reader.take(want).read_to_end(out).map_err(|e| {
        anyhow!("{name}: the file cannot be read: it is corrupt or truncated ({e})")
    })?;
    Ok(())
}

/// Appends bytes from `reader` to `out` until it holds `need` bytes or the stream ends. The
/// buffer grows with the data (doubling, never past `need`), so that a short file declaring a
/// huge volume allocates no more than it holds; a failed allocation is an error naming `what`.
fn read_declared(
    reader: &mut dyn Read,
    out: &mut Vec<u8>,
    need: usize,
    name: &str,
    what: &str,
) -> Result<()> {
    while out.len() < need {
        let target = need.min(out.len().max(1 << 16) * 2);
        out.try_reserve_exact(target - out.len())
            .map_err(|_| anyhow!("{name}: cannot allocate {} for {what}", human_bytes(need)))?;
        read_up_to(reader, out, target as u64, name)?;
        if out.len() < target {
            break;
        }
    }
    Ok(())
}

/// `n` bytes as KiB, MiB or GiB with one decimal.
fn human_bytes(n: usize) -> String {
    let n = n as f64;
    match n {
        n if n >= (1u64 << 30) as f64 => format!("{:.1} GiB", n / (1u64 << 30) as f64),
        n if n >= (1u64 << 20) as f64 => format!("{:.1} MiB", n / (1u64 << 20) as f64),
        n => format!("{:.1} KiB", n / 1024.0),
    }
}

fn check_signature(bytes: &[u8], name: &str) -> Result<()> {
    if bytes.len() < 4 {
        bail!("{name}: not a NIfTI file (only {} bytes)", bytes.len());
    }
    let first: [u8; 4] = bytes[0..4].try_into().expect("four bytes");
    let sizes = [i32::from_le_bytes(first), i32::from_be_bytes(first)];
    if sizes.contains(&540) {
        bail!(
            "{name}: NIfTI-2 files are not supported; save the volume as NIfTI-1 \
             (e.g. nibabel.Nifti1Image(img.dataobj, img.affine).to_filename(...))"
        );
    }
    if !sizes.contains(&(HEADER_BYTES as i32)) {
        bail!("{name}: not a NIfTI file (the first four bytes are not a NIfTI-1 header size)");
    }
    if bytes.len() < DATA_OFFSET {
        bail!(
            "{name}: the file is truncated ({} bytes, shorter than a NIfTI-1 header)",
            bytes.len()
        );
    }
    match &bytes[344..348] {
        b"n+1\0" => Ok(()),
        b"ni1\0" => bail!(
            "{name}: a separate .hdr/.img pair is not supported; convert it to a single .nii file"
        ),
        _ => bail!("{name}: not a NIfTI-1 file (magic bytes missing)"),
    }
}

/// Checks `dim[0..8]` of the raw header (byte order from sizeof_hdr, so that an invalid
/// dim[0] is reported as written rather than byte-swapped) and returns the 3D size.
fn validate_dims(head: &[u8], name: &str) -> Result<[usize; 3]> {
    let little = i32::from_le_bytes(head[0..4].try_into().expect("four bytes")) == 348;
    let dim: Vec<i64> = (0..8)
        .map(|i| {
            let b = [head[40 + 2 * i], head[41 + 2 * i]];
            (if little {
                i16::from_le_bytes(b)
            } else {
                i16::from_be_bytes(b)
            }) as i64
        })
        .collect();
    let nd = dim[0];
    if !(1..=7).contains(&nd) {
        bail!("{name}: dim[0] = {nd} is not a dimension count (NIfTI allows 1 to 7)");
    }
    if nd < 3 {
        bail!("{name}: the volume has {nd} dimension(s); a 3D CT volume is needed");
    }
    let nd = nd as usize;
    if let Some(i) = (1..=nd).find(|&i| dim[i] < 1) {
        bail!(
            "{name}: dim[{i}] = {} (dimensions {:?}); every size must be at least 1",
            dim[i],
            &dim[1..=nd]
        );
    }
    let frames: i64 = dim[4..=nd.max(3)].iter().product();
    if frames > 1 {
        bail!(
            "{name}: a {nd}D volume with {frames} frames ({:?}); pass a single 3D CT volume \
             (extract one frame first)",
            &dim[1..=nd]
        );
    }
    Ok([dim[1] as usize, dim[2] as usize, dim[3] as usize])
}

fn decode_voxels(bytes: &[u8], stored: StoredType, big_endian: bool) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let size = stored.size();
    let mut out = vec![0f32; bytes.len() / size];
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * size))
        .for_each(|(dst, src)| {
            for (v, b) in dst.iter_mut().zip(src.chunks_exact(size)) {
                *v = decode_one(b, stored, big_endian);
            }
        });
    out
}

fn decode_one(b: &[u8], stored: StoredType, big: bool) -> f32 {
    macro_rules! num {
        ($t:ty, $n:expr) => {{
            let a: [u8; $n] = b.try_into().expect("element width");
            if big {
                <$t>::from_be_bytes(a)
            } else {
                <$t>::from_le_bytes(a)
            }
        }};
    }
    match stored {
        StoredType::U8 => b[0] as f32,
        StoredType::I16 => num!(i16, 2) as f32,
        StoredType::U16 => num!(u16, 2) as f32,
        StoredType::I32 => num!(i32, 4) as f32,
        StoredType::F32 => num!(f32, 4),
        StoredType::F64 => num!(f64, 8) as f32,
    }
}

/// `value · slope + inter` when the slope is a non-zero finite number (the NIfTI rule).
fn apply_scaling(data: &mut [f32], slope: f32, inter: f32) {
    if slope == 0.0 || !slope.is_finite() {
        return;
    }
    let inter = if inter.is_finite() { inter } else { 0.0 };
    if slope == 1.0 && inter == 0.0 {
        return;
    }
    let (s, i) = (slope as f64, inter as f64);
    data.par_iter_mut()
        .for_each(|v| *v = (*v as f64 * s + i) as f32);
}

/// The affine by data.md's rule: sform when `sform_code > 0`, else qform when
/// `qform_code > 0`, else pixdim scaling.
pub fn header_affine(header: &NiftiHeader, name: &str) -> Result<([[f64; 4]; 4], AffineSource)> {
    let (affine, source) = if header.sform_code > 0 {
        let rows = [header.srow_x, header.srow_y, header.srow_z];
        let mut a = [[0.0; 4]; 4];
        for (r, row) in rows.iter().enumerate() {
            for c in 0..4 {
                a[r][c] = row[c] as f64;
            }
        }
        a[3][3] = 1.0;
        (a, AffineSource::Sform)
    } else if header.qform_code > 0 {
        (qform_affine(header, name)?, AffineSource::Qform)
    } else {
        let p = &header.pixdim;
        let a = [
            [p[1] as f64, 0.0, 0.0, 0.0],
            [0.0, p[2] as f64, 0.0, 0.0],
            [0.0, 0.0, p[3] as f64, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        (a, AffineSource::Pixdim)
    };
    if affine.iter().flatten().any(|v| !v.is_finite()) {
        bail!("{name}: the {source:?} affine holds non-finite numbers");
    }
    let det = det3(&affine);
    if det.abs() < 1e-12 {
        bail!("{name}: the {source:?} affine is singular (determinant {det})");
    }
    Ok((affine, source))
}

fn det3(a: &[[f64; 4]; 4]) -> f64 {
    a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
        - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
}

fn qform_affine(h: &NiftiHeader, name: &str) -> Result<[[f64; 4]; 4]> {
    let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
    if !(b.is_finite() && c.is_finite() && d.is_finite()) {
        bail!("{name}: the qform quaternion is not finite");
    }
    let bcd = b * b + c * c + d * d;
    if bcd > 1.0 + 1e-4 {
        bail!("{name}: the qform quaternion (b, c, d) = ({b}, {c}, {d}) has norm above 1");
    }
    let a = (1.0 - bcd).max(0.0).sqrt();
    let r = [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - c * c - b * b,
        ],
    ];
    let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
    let s = [
        h.pixdim[1] as f64,
        h.pixdim[2] as f64,
        qfac * h.pixdim[3] as f64,
    ];
    let t = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
    let mut out = [[0.0; 4]; 4];
    for row in 0..3 {
        for col in 0..3 {
            out[row][col] = r[row][col] * s[col];
        }
        out[row][3] = t[row];
    }
    out[3][3] = 1.0;
    Ok(out)
}

/// Stores an affine in a header as both sform and qform (the qform holds the nearest
/// rotation, exact for axis-aligned affines), with pixdim set to the column lengths.
pub fn set_header_affine(h: &mut NiftiHeader, affine: &[[f64; 4]; 4], sform: bool, qform: bool) {
    let spacing: [f64; 3] = std::array::from_fn(|i| column_norm(affine, i));
    let mut r = [[0.0; 3]; 3];
    for row in 0..3 {
        for col in 0..3 {
            r[row][col] = affine[row][col] / spacing[col];
        }
    }
    let det = r[0][0] * (r[1][1] * r[2][2] - r[1][2] * r[2][1])
        - r[0][1] * (r[1][0] * r[2][2] - r[1][2] * r[2][0])
        + r[0][2] * (r[1][0] * r[2][1] - r[1][1] * r[2][0]);
    let qfac = if det < 0.0 { -1.0 } else { 1.0 };
    for row in r.iter_mut() {
        row[2] *= qfac;
    }
    let (_, qb, qc, qd) = rotation_to_quaternion(&r);
    h.pixdim[0] = qfac as f32;
    for (dst, s) in h.pixdim[1..4].iter_mut().zip(spacing) {
        *dst = s as f32;
    }
    h.quatern_b = qb as f32;
    h.quatern_c = qc as f32;
    h.quatern_d = qd as f32;
    h.quatern_x = affine[0][3] as f32;
    h.quatern_y = affine[1][3] as f32;
    h.quatern_z = affine[2][3] as f32;
    h.qform_code = if qform { 1 } else { 0 };
    h.sform_code = if sform { 1 } else { 0 };
    let row = |r: usize| -> [f32; 4] { std::array::from_fn(|c| affine[r][c] as f32) };
    h.srow_x = row(0);
    h.srow_y = row(1);
    h.srow_z = row(2);
}

/// Unit quaternion (a ≥ 0) of a proper rotation matrix.
fn rotation_to_quaternion(r: &[[f64; 3]; 3]) -> (f64, f64, f64, f64) {
    let trace = r[0][0] + r[1][1] + r[2][2];
    let (a, b, c, d) = if trace > 0.0 {
        let s = 2.0 * (1.0 + trace).sqrt();
        (
            s / 4.0,
            (r[2][1] - r[1][2]) / s,
            (r[0][2] - r[2][0]) / s,
            (r[1][0] - r[0][1]) / s,
        )
    } else if r[0][0] >= r[1][1] && r[0][0] >= r[2][2] {
        let s = 2.0 * (1.0 + r[0][0] - r[1][1] - r[2][2]).sqrt();
        (
            (r[2][1] - r[1][2]) / s,
            s / 4.0,
            (r[0][1] + r[1][0]) / s,
            (r[0][2] + r[2][0]) / s,
        )
    } else if r[1][1] >= r[2][2] {
        let s = 2.0 * (1.0 + r[1][1] - r[0][0] - r[2][2]).sqrt();
        (
            (r[0][2] - r[2][0]) / s,
            (r[0][1] + r[1][0]) / s,
            s / 4.0,
            (r[1][2] + r[2][1]) / s,
        )
    } else {
        let s = 2.0 * (1.0 + r[2][2] - r[0][0] - r[1][1]).sqrt();
        (
            (r[1][0] - r[0][1]) / s,
            (r[0][2] + r[2][0]) / s,
            (r[1][2] + r[2][1]) / s,
            s / 4.0,
        )
    };
    if a < 0.0 {
        (-a, -b, -c, -d)
    } else {
        (a, b, c, d)
    }
}

/// Voxel values to write, in native order (x fastest).
#[derive(Clone, Copy, Debug)]
pub enum VoxelData<'a> {
    U8(&'a [u8]),
    I16(&'a [i16]),
    U16(&'a [u16]),
    F32(&'a [f32]),
}

impl VoxelData<'_> {
    fn len(&self) -> usize {
        match self {
            VoxelData::U8(v) => v.len(),
            VoxelData::I16(v) => v.len(),
            VoxelData::U16(v) => v.len(),
            VoxelData::F32(v) => v.len(),
        }
    }

    fn code_and_bits(&self) -> (i16, i16) {
        match self {
            VoxelData::U8(_) => (2, 8),
            VoxelData::I16(_) => (4, 16),
            VoxelData::U16(_) => (512, 16),
            VoxelData::F32(_) => (16, 32),
        }
    }

    /// Writes the values little-endian, a block at a time.
    fn write_le(&self, w: &mut dyn Write) -> std::io::Result<()> {
        const BLOCK: usize = 1 << 16;
        let mut buf = Vec::with_capacity(BLOCK * 4);
        macro_rules! blocks {
            ($v:expr) => {
                for chunk in $v.chunks(BLOCK) {
                    buf.clear();
                    chunk
                        .iter()
                        .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
                    w.write_all(&buf)?;
                }
            };
        }
        match self {
            VoxelData::U8(v) => w.write_all(v)?,
            VoxelData::I16(v) => blocks!(v),
            VoxelData::U16(v) => blocks!(v),
            VoxelData::F32(v) => blocks!(v),
        }
        Ok(())
    }
}

/// Writes a single-file NIfTI-1 volume (little-endian), gzip-compressed when `gzip`, atomically:
/// through a temporary beside `path` and a rename ([`crate::io::atomic`]), so a failed or killed
/// write leaves no partial volume.
///
/// `header` supplies every field except the data type, bit width, data offset, magic and
/// header size, which follow from `data`; `header.dim` must describe `data.len()` voxels.
pub fn write_nifti(path: &Path, header: &NiftiHeader, data: VoxelData, gzip: bool) -> Result<()> {
    write_atomic_with(path, |w| write_nifti_to(w, header, data, gzip))
}

/// The bytes of [`write_nifti`]'s file, streamed into `w`.
pub fn write_nifti_to(
    w: &mut dyn Write,
    header: &NiftiHeader,
    data: VoxelData,
    gzip: bool,
) -> Result<()> {
    let nd = header.dim[0] as usize;
    let nvox: usize = header.dim[1..=nd.clamp(1, 7)]
        .iter()
        .map(|&d| d as usize)
        .product();
    if nvox != data.len() {
        bail!(
            "the header describes {nvox} voxels but {} values were given",
            data.len()
        );
    }
    let (code, bits) = data.code_and_bits();
    let mut h = header.clone();
    h.datatype = code;
    h.bitpix = bits;
    h.vox_offset = DATA_OFFSET as f32;
    h.sizeof_hdr = HEADER_BYTES as i32;
    h.magic = *b"n+1\0";
    let mut head = Vec::with_capacity(DATA_OFFSET);
    serialise_header(&h, &mut head);
    head.extend_from_slice(&[0u8; 4]);
    if gzip {
        let mut enc = GzEncoder::new(w, Compression::fast());
        enc.write_all(&head)?;
        data.write_le(&mut enc)?;
        enc.finish()?;
    } else {
        w.write_all(&head)?;
        data.write_le(w)?;
    }
    Ok(())
}

fn serialise_header(h: &NiftiHeader, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&h.sizeof_hdr.to_le_bytes());
    out.extend_from_slice(&h.data_type);
    out.extend_from_slice(&h.db_name);
    out.extend_from_slice(&h.extents.to_le_bytes());
    out.extend_from_slice(&h.session_error.to_le_bytes());
    out.push(h.regular);
    out.push(h.dim_info);
    h.dim
        .iter()
        .for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
    for f in [h.intent_p1, h.intent_p2, h.intent_p3] {
        out.extend_from_slice(&f.to_le_bytes());
    }
    for s in [h.intent_code, h.datatype, h.bitpix, h.slice_start] {
        out.extend_from_slice(&s.to_le_bytes());
    }
    h.pixdim
        .iter()
        .for_each(|f| out.extend_from_slice(&f.to_le_bytes()));
    for f in [h.vox_offset, h.scl_slope, h.scl_inter] {
        out.extend_from_slice(&f.to_le_bytes());
    }
    out.extend_from_slice(&h.slice_end.to_le_bytes());
    out.push(h.slice_code);
    out.push(h.xyzt_units);
    for f in [h.cal_max, h.cal_min, h.slice_duration, h.toffset] {
        out.extend_from_slice(&f.to_le_bytes());
    }
    out.extend_from_slice(&h.glmax.to_le_bytes());
    out.extend_from_slice(&h.glmin.to_le_bytes());
    let mut descrip = [0u8; 80];
    let n = h.descrip.len().min(80);
    descrip[..n].copy_from_slice(&h.descrip[..n]);
    out.extend_from_slice(&descrip);
    out.extend_from_slice(&h.aux_file);
    out.extend_from_slice(&h.qform_code.to_le_bytes());
    out.extend_from_slice(&h.sform_code.to_le_bytes());
    for f in [
        h.quatern_b,
        h.quatern_c,
        h.quatern_d,
        h.quatern_x,
        h.quatern_y,
        h.quatern_z,
    ] {
        out.extend_from_slice(&f.to_le_bytes());
    }
    for f in h.srow_x.iter().chain(&h.srow_y).chain(&h.srow_z) {
        out.extend_from_slice(&f.to_le_bytes());
    }
    out.extend_from_slice(&h.intent_name);
    out.extend_from_slice(&h.magic);
    debug_assert_eq!(out.len() - start, HEADER_BYTES);
}

/// Writes a uint8 label map (native order) on `reference`'s exact grid (atomically, as
/// [`write_nifti`]).
pub fn write_label_map(path: &Path, reference: &Volume, labels: &[u8], gzip: bool) -> Result<()> {
    write_nifti(
        path,
        &label_map_header(reference, labels),
        VoxelData::U8(labels),
        gzip,
    )
}

/// The header of a uint8 label map on `reference`'s exact grid: same dimensions, pixdim, sform
/// and qform; label intent, no scaling.
pub fn label_map_header(reference: &Volume, labels: &[u8]) -> NiftiHeader {
    let mut h = reference.header.clone();
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    h.cal_min = 0.0;
    h.cal_max = labels.iter().copied().max().unwrap_or(0) as f32;
    h.intent_code = 1002;
    h.descrip = b"m2unet lobe labels".to_vec();
    h.endianness = Endianness::Little;
    h
}
