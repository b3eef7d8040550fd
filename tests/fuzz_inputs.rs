//! Seeded structured mutations of valid NIfTI, weights and manifest files: no panic, bounded memory, every rejection an error naming the file.

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use m2unet::config::ModelConfig;
use m2unet::data::dataset::read_manifest;
use m2unet::io::read_volume;
use m2unet::io::weights::{load_model_bytes, model_tensors, WeightDtype};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// The system allocator, counting live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        System.dealloc(p, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, layout, new);
        if !q.is_null() {
            if new >= layout.size() {
                grew(new - layout.size());
            } else {
                LIVE.fetch_sub(layout.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The tests take turns: the allocation counters are process-wide.
static SERIAL: Mutex<()> = Mutex::new(());

/// Fixed heap allowance per input on top of the per-byte factor: header structs, error
/// strings, the gzip inflater's window and buffers, rayon's job bookkeeping.
const FIXED_ALLOWANCE: usize = 1 << 20;

/// Largest accepted growth of the process's resident high-water mark over one test. The
/// largest input is ~100 KB and the per-input heap bound is a few MiB; the rest is allocator
/// caching and the rayon workers' stacks.
const MAX_HWM_GROWTH_KB: u64 = 64 * 1024;

fn vm_hwm_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

/// The bytes a reader sees after inflating (at most `cap`; undecodable streams give what
/// inflated before the error).
fn inflated_len(bytes: &[u8], cap: u64) -> usize {
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        let _ = MultiGzDecoder::new(bytes).take(cap).read_to_end(&mut out);
        out.len()
    } else {
        bytes.len()
    }
}

/// What one family of inputs did.
#[derive(Default)]
struct Tally {
    tried: usize,
    accepted: usize,
    rejected: usize,
    /// Largest heap growth during one input, and that input's size.
    max_growth: usize,
    max_growth_input: usize,
    failures: Vec<String>,
}

impl Tally {
    /// Runs `parse` on one input of `size` bytes (as the parser sees them), allowing
    /// `factor` × size + [`FIXED_ALLOWANCE`] of heap growth. `parse` returns Ok(accepted) or
    /// Err(message of a rejection); a panic, a rejection whose message lacks `name`, a broken
    /// invariant of an accepted input or too much memory is a failure.
    fn run(
        &mut self,
        what: &str,
        name: &str,
        size: usize,
        factor: usize,
        parse: impl FnOnce() -> Result<Result<(), String>, String>,
    ) {
        self.tried += 1;
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let outcome = catch_unwind(AssertUnwindSafe(parse));
        let growth = PEAK.load(Ordering::Relaxed).saturating_sub(base);
        if growth > self.max_growth {
            self.max_growth = growth;
            self.max_growth_input = size;
        }
        let bound = factor * size + FIXED_ALLOWANCE;
        if growth > bound {
            self.failures.push(format!(
                "{what}: heap grew by {growth} bytes for a {size}-byte input (bound {bound})"
            ));
        }
        match outcome {
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.failures.push(format!("{what}: panicked: {msg}"));
            }
            Ok(Err(broken)) => self.failures.push(format!("{what}: {broken}")),
            Ok(Ok(Ok(()))) => self.accepted += 1,
            Ok(Ok(Err(message))) => {
                self.rejected += 1;
                if !message.contains(name) {
                    self.failures
                        .push(format!("{what}: the error does not name {name}: {message}"));
                }
            }
        }
    }

    /// Prints the counts and fails on any failure, on too much resident growth, and, for
    /// random mutations (`mixed`), when the inputs were all accepted or all rejected.
    fn report(&self, family: &str, hwm_growth_kb: u64, mixed: bool) {
        println!(
            "{family}: {} inputs tried, {} accepted, {} rejected; max heap growth {} bytes \
             (for a {}-byte input); VmHWM growth {hwm_growth_kb} kB",
            self.tried, self.accepted, self.rejected, self.max_growth, self.max_growth_input
        );
        for f in self.failures.iter().take(20) {
            println!("  FAIL {f}");
        }
        assert!(
            self.failures.is_empty(),
            "{family}: {} of {} inputs failed (listed above)",
            self.failures.len(),
            self.tried
        );
        assert!(
            hwm_growth_kb < MAX_HWM_GROWTH_KB,
            "{family}: VmHWM grew by {hwm_growth_kb} kB"
        );
        if mixed {
            assert!(
                self.accepted > 0 && self.rejected > 0,
                "{family}: one-sided"
            );
        }
    }
}

fn flip_bits(rng: &mut ChaCha8Rng, b: &mut [u8], range: std::ops::Range<usize>) {
    if b.is_empty() {
        return;
    }
    let end = range.end.min(b.len());
    let start = range.start.min(end.saturating_sub(1));
    for _ in 0..rng.gen_range(1..=8) {
        let i = rng.gen_range(start..end);
        b[i] ^= 1 << rng.gen_range(0..8);
    }
}

fn overwrite_bytes(rng: &mut ChaCha8Rng, b: &mut [u8], range: std::ops::Range<usize>) {
    if b.is_empty() {
        return;
    }
    let end = range.end.min(b.len());
    let start = range.start.min(end.saturating_sub(1));
    for _ in 0..rng.gen_range(1..=4) {
        let i = rng.gen_range(start..end);
        b[i] = *[0x00, 0xff, 0x7f, 0x80, rng.gen()].choose(rng).unwrap();
    }
}

fn truncate_or_extend(rng: &mut ChaCha8Rng, b: &mut Vec<u8>) {
    if rng.gen_bool(0.5) {
        let n = rng.gen_range(0..b.len().max(1));
        b.truncate(n);
    } else {
        let n = rng.gen_range(1..=b.len().max(1));
        let zeros = rng.gen_bool(0.5);
        b.extend((0..n).map(|_| if zeros { 0 } else { rng.gen::<u8>() }));
    }
}

// ---------------------------------------------------------------- NIfTI

/// NIfTI-1 header fields: name, byte offset, kind (2 = i16, 4 = i32, 0 = f32).
const NIFTI_FIELDS: &[(&str, usize, u8)] = &[
    ("sizeof_hdr", 0, 4),
    ("dim[0]", 40, 2),
    ("dim[1]", 42, 2),
    ("dim[2]", 44, 2),
    ("dim[3]", 46, 2),
    ("dim[4]", 48, 2),
    ("dim[5]", 50, 2),
    ("datatype", 70, 2),
    ("bitpix", 72, 2),
    ("pixdim[0]", 76, 0),
    ("pixdim[1]", 80, 0),
    ("pixdim[2]", 84, 0),
    ("pixdim[3]", 88, 0),
    ("vox_offset", 108, 0),
    ("scl_slope", 112, 0),
    ("scl_inter", 116, 0),
    ("qform_code", 252, 2),
    ("sform_code", 254, 2),
    ("quatern_b", 256, 0),
    ("quatern_c", 260, 0),
    ("quatern_d", 264, 0),
    ("qoffset_x", 268, 0),
    ("srow_x[0]", 280, 0),
    ("srow_x[1]", 284, 0),
    ("srow_x[3]", 292, 0),
    ("srow_y[1]", 300, 0),
    ("srow_y[2]", 304, 0),
    ("srow_z[0]", 312, 0),
    ("srow_z[2]", 320, 0),
    ("srow_z[3]", 324, 0),
];

const I16_VALUES: &[i16] = &[
    0,
    1,
    -1,
    2,
    3,
    4,
    7,
    8,
    15,
    16,
    64,
    256,
    512,
    768,
    1024,
    2048,
    i16::MAX,
    i16::MIN,
];
const F32_VALUES: &[f32] = &[
    0.0,
    -0.0,
    1.0,
    -1.0,
    0.5,
    1e-30,
    1e-45,
    1e27,
    1e30,
    -1e30,
    f32::MAX,
    f32::MIN,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    351.0,
    352.0,
    353.5,
    1e6,
    4e9,
    1e10,
];

/// Sets a header field in the file's byte order (from sizeof_hdr).
fn set_field(b: &mut [u8], off: usize, kind: u8, rng: &mut ChaCha8Rng) -> String {
    let big = b[0..4] != 348i32.to_le_bytes();
    let put = |b: &mut [u8], bytes: &[u8]| {
        let mut v = bytes.to_vec();
        if big {
            v.reverse();
        }
        b[off..off + v.len()].copy_from_slice(&v);
    };
    match kind {
        2 => {
            let v = if rng.gen_bool(0.8) {
                *I16_VALUES.choose(rng).unwrap()
            } else {
                rng.gen()
            };
            put(b, &v.to_le_bytes());
            v.to_string()
        }
        4 => {
            let v = *[0, -1, 348, 540, 348i32.swap_bytes(), i32::MAX, i32::MIN]
                .choose(rng)
                .unwrap();
            put(b, &v.to_le_bytes());
            v.to_string()
        }
        _ => {
            let v = if rng.gen_bool(0.8) {
                *F32_VALUES.choose(rng).unwrap()
            } else {
                f32::from_bits(rng.gen())
            };
            put(b, &v.to_le_bytes());
            format!("{v:e}")
        }
    }
}

/// One mutation of a plain (inflated) NIfTI file; returns its description.
fn mutate_nifti(rng: &mut ChaCha8Rng, b: &mut Vec<u8>) -> String {
    let header_ops = if b.len() >= 352 { 0 } else { 5 };
    match rng.gen_range(header_ops..7) {
        0..=2 => {
            let (field, off, kind) = *NIFTI_FIELDS.choose(rng).unwrap();
            let v = set_field(b, off, kind, rng);
            format!("{field} = {v}")
        }
        3 => {
            let code = *[
                2i16, 4, 8, 16, 64, 512, 1, 128, 256, 768, 1024, 1792, 2304, -1,
            ]
            .choose(rng)
            .unwrap();
            let bits = *[8i16, 16, 32, 64, 0, 128].choose(rng).unwrap();
            let big = b[0..4] != 348i32.to_le_bytes();
            let enc = |v: i16| {
                if big {
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
                }
            };
            b[70..72].copy_from_slice(&enc(code));
            b[72..74].copy_from_slice(&enc(bits));
            format!("datatype {code}, bitpix {bits}")
        }
        4 => {
            flip_bits(rng, b, 0..352);
            "header bit flips".into()
        }
        5 => {
            let len = b.len();
            if rng.gen_bool(0.5) {
                flip_bits(rng, b, 0..len);
            } else {
                overwrite_bytes(rng, b, 0..len);
            }
            "bit flips / byte overwrites anywhere".into()
        }
        _ => {
            truncate_or_extend(rng, b);
            format!("length {}", b.len())
        }
    }
}

/// Every rejection names the file; every accepted volume holds its declared voxels, all
/// finite, on a grid no smaller than the reader's minimum, with a finite voxel volume.
fn check_volume(path: &Path, plain_len: usize) -> Result<Result<(), String>, String> {
    let volume = match read_volume(path) {
        Ok(v) => v,
        Err(e) => return Ok(Err(format!("{e:#}"))),
    };
    let nvox: usize = volume.dims.iter().product();
    let size = match volume.dtype {
        "uint8" => 1,
        "int16" | "uint16" => 2,
        "int32" | "float32" => 4,
        _ => 8,
    };
    let declared_end = volume.header.vox_offset as usize + nvox * size;
    if declared_end > plain_len {
        return Err(format!(
            "accepted, but the header promises {declared_end} bytes and the file has {plain_len}"
        ));
    }
    if volume.data.len() != nvox || volume.canonical_data().len() != nvox {
        return Err(format!(
            "{} values for dims {:?}",
            volume.data.len(),
            volume.dims
        ));
    }
    if volume.data.iter().any(|v| !v.is_finite()) || !volume.voxel_ml().is_finite() {
        return Err("accepted non-finite values".into());
    }
    let c = volume.canonical_dims();
    if c[0] < 16 || c[1] < 16 || c[2] < 2 {
        return Err(format!("accepted a {c:?} grid"));
    }
    Ok(Ok(()))
}

fn nifti_seeds() -> Vec<(String, Vec<u8>)> {
    let corpus = root().join("fuzz/corpus/nifti");
    let mut names: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("seed-")
        })
        .collect();
    names.sort();
    for f in [
        "big_endian_int16_lps.nii",
        "qform_only_las_uint16.nii.gz",
        "sform_only_oblique_float32.nii.gz",
        "sform_wins_int32.nii",
    ] {
        names.push(root().join("tests/fixtures/nifti").join(f));
    }
    names
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).unwrap();
            let mut plain = Vec::new();
            if bytes.starts_with(&[0x1f, 0x8b]) {
                MultiGzDecoder::new(&bytes[..])
                    .read_to_end(&mut plain)
                    .unwrap();
            } else {
                plain = bytes;
            }
            (p.file_name().unwrap().to_string_lossy().into_owned(), plain)
        })
        .collect()
}

/// Heap growth per byte the NIfTI reader sees: the raw bytes (1×), the f32 voxels (≤ 4× for
/// uint8), the canonical copy (4×) and vector growth slack (≤ 2×), with margin.
const NIFTI_FACTOR: usize = 16;

#[test]
fn mutated_nifti_files_are_rejected_cleanly_within_bounded_memory() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let seeds = nifti_seeds();
    for (name, plain) in &seeds {
        let path = dir.path().join(name);
        std::fs::write(&path, plain).unwrap();
        let v = read_volume(&path).unwrap_or_else(|e| panic!("seed {name}: {e:#}"));
        println!("seed {name}: {:?} {} accepted", v.dims, v.dtype);
    }
    let hwm = vm_hwm_kb();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut tally = Tally::default();
    for i in 0..3000 {
        let (seed, plain) = seeds.choose(&mut rng).unwrap();
        let mut b = plain.clone();
        let mut what: Vec<String> = (0..rng.gen_range(1..=3))
            .map(|_| mutate_nifti(&mut rng, &mut b))
            .collect();
        let plain_len = b.len();
        let bytes = match rng.gen_range(0..6) {
            0..=2 => b,
            3 | 4 => {
                what.push("gzip".into());
                gzip(&b)
            }
            _ => {
                let mut z = gzip(&b);
                let len = z.len();
                match rng.gen_range(0..3) {
                    0 => flip_bits(&mut rng, &mut z, 10..len),
                    1 => truncate_or_extend(&mut rng, &mut z),
                    _ => z.extend(gzip(&b[..b.len() / 2])),
                }
                what.push("corrupted gzip stream".into());
                z
            }
        };
        let ext = if bytes.starts_with(&[0x1f, 0x8b]) {
            "nii.gz"
        } else {
            "nii"
        };
        let name = format!("input{i}.{ext}");
        let path = dir.path().join(&name);
        std::fs::write(&path, &bytes).unwrap();
        let seen = inflated_len(&bytes, 1 << 26).max(bytes.len());
        let what = format!("#{i} {seed}: {}", what.join(", "));
        tally.run(&what, &name, seen, NIFTI_FACTOR, || {
            check_volume(&path, plain_len.max(seen))
        });
        let _ = std::fs::remove_file(&path);
    }
    tally.report("nifti", vm_hwm_kb() - hwm, true);
}

// ---------------------------------------------------------------- safetensors weights

/// One tensor of a safetensors file as the mutations see it.
#[derive(Clone)]
struct Entry {
    name: String,
    dtype: String,
    shape: Vec<u64>,
    bytes: Vec<u8>,
}

fn dtype_size(dtype: &str) -> u64 {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

/// Splits a safetensors file into its tensors (in data order) and metadata.
fn split_safetensors(bytes: &[u8]) -> (Vec<Entry>, Value) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let mut entries = vec![];
    let mut metadata = Value::Null;
    for (name, v) in header.as_object().unwrap() {
        if name == "__metadata__" {
            metadata = v.clone();
            continue;
        }
        let offsets: Vec<usize> = serde_json::from_value(v["data_offsets"].clone()).unwrap();
        entries.push((
            offsets[0],
            Entry {
                name: name.clone(),
                dtype: v["dtype"].as_str().unwrap().to_string(),
                shape: serde_json::from_value(v["shape"].clone()).unwrap(),
                bytes: data[offsets[0]..offsets[1]].to_vec(),
            },
        ));
    }
    entries.sort_by_key(|(start, _)| *start);
    (entries.into_iter().map(|(_, e)| e).collect(), metadata)
}

/// The header JSON of `entries` laid out back to back.
fn header_json(entries: &[Entry], metadata: &Value) -> Value {
    let mut header = serde_json::Map::new();
    if !metadata.is_null() {
        header.insert("__metadata__".into(), metadata.clone());
    }
    let mut at = 0;
    for e in entries {
        header.insert(
            e.name.clone(),
            json!({"dtype": e.dtype, "shape": e.shape, "data_offsets": [at, at + e.bytes.len()]}),
        );
        at += e.bytes.len();
    }
    Value::Object(header)
}

/// A safetensors file: u64 header length, the header text space-padded to 8 bytes, the data.
fn encode_safetensors(header: &str, entries: &[Entry]) -> Vec<u8> {
    let mut text = header.as_bytes().to_vec();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    entries.iter().for_each(|e| out.extend(&e.bytes));
    out
}

/// Resizes a tensor's bytes to what its dtype and shape need (when that is at most 1 MiB),
/// so that the file stays a well-formed safetensors file that lies about the model.
fn fit_bytes(e: &mut Entry, rng: &mut ChaCha8Rng) {
    let need = e
        .shape
        .iter()
        .try_fold(dtype_size(&e.dtype), |a, &d| a.checked_mul(d));
    if let Some(need) = need.filter(|&n| n <= 1 << 20) {
        let fill: u8 = rng.gen();
        e.bytes.resize(need as usize, fill);
    }
}

/// One mutation of a weights file; returns the new bytes and a description.
fn mutate_weights(rng: &mut ChaCha8Rng, seed: &[u8]) -> (Vec<u8>, String) {
    let (mut entries, mut metadata) = split_safetensors(seed);
    let k = rng.gen_range(0..entries.len());
    let tensor = entries[k].name.clone();
    let consistent = |entries: &[Entry], metadata: &Value| {
        encode_safetensors(&header_json(entries, metadata).to_string(), entries)
    };
    match rng.gen_range(0..10) {
        0 => {
            let e = &mut entries[k];
            let big = [
                0u64,
                1,
                2,
                3,
                1 << 20,
                1 << 31,
                1 << 40,
                u64::MAX / 2,
                u64::MAX,
            ];
            let what = match rng.gen_range(0..4) {
                0 if !e.shape.is_empty() => {
                    let i = rng.gen_range(0..e.shape.len());
                    e.shape[i] = *big.choose(rng).unwrap();
                    format!("shape[{i}] = {}", e.shape[i])
                }
                1 if !e.shape.is_empty() => {
                    let i = rng.gen_range(0..e.shape.len());
                    e.shape[i] = e.shape[i] * 2 + 1;
                    format!("shape[{i}] grown to {}", e.shape[i])
                }
                2 => {
                    e.shape.push(*big.choose(rng).unwrap());
                    format!("extra dim, shape {:?}", e.shape)
                }
                _ => {
                    e.shape.pop();
                    format!("dim dropped, shape {:?}", e.shape)
                }
            };
            fit_bytes(e, rng);
            (consistent(&entries, &metadata), format!("{tensor}: {what}"))
        }
        1 => {
            // The tensors whose shapes give the model config: a zero-element tensor with a
            // huge first dimension, or a huge width with real data behind it.
            let name = *[
                "enc1.conv1.weight",
                "enc5.conv1.weight",
                "mil_emb.concepts.weight",
                "mil_img.concepts.weight",
                "seg_head.weight",
                "classifier.weight",
            ]
            .choose(rng)
            .unwrap();
            let e = entries.iter_mut().find(|e| e.name == name).unwrap();
            let width = *[1u64 << 12, 1 << 20, 1 << 40, u64::MAX / 16]
                .choose(rng)
                .unwrap();
            if rng.gen_bool(0.7) {
                e.shape = vec![width, 1, 3, 0];
            } else {
                e.shape = vec![1 << 12, 1, 3, 3];
            }
            fit_bytes(e, rng);
            let what = format!("{name}: shape {:?}", e.shape);
            (consistent(&entries, &metadata), what)
        }
        2 => {
            let e = &mut entries[k];
            e.dtype = [
                "F32", "F16", "BF16", "F64", "I64", "I32", "U8", "I8", "BOOL", "U16", "F8_E4M3",
                "XYZ",
            ]
            .choose(rng)
            .unwrap()
            .to_string();
            let refit = rng.gen_bool(0.5);
            if refit {
                fit_bytes(e, rng);
            }
            let what = format!("{tensor}: dtype {} (bytes refitted: {refit})", e.dtype);
            (consistent(&entries, &metadata), what)
        }
        3 => {
            let what = match rng.gen_range(0..3) {
                0 => {
                    entries.remove(k);
                    format!("{tensor} removed")
                }
                1 => {
                    entries[k].name = format!("{tensor}.x");
                    format!("{tensor} renamed")
                }
                _ => {
                    let mut copy = entries[k].clone();
                    copy.name = "extra.weight".into();
                    entries.push(copy);
                    format!("{tensor} duplicated")
                }
            };
            (consistent(&entries, &metadata), what)
        }
        4 => {
            let key = *["patch", "gcp", "format", "depth"].choose(rng).unwrap();
            let value = *[
                "0",
                "-16",
                "16",
                "NaN",
                "inf",
                "1e308",
                "32.0",
                "",
                "1073741824",
                "18446744073709551600",
                "99999999999999999999999",
                "max",
                "bogus",
            ]
            .choose(rng)
            .unwrap();
            if !metadata.is_object() {
                metadata = json!({});
            }
            if rng.gen_bool(0.1) {
                metadata[key] = json!(12345);
            } else {
                metadata[key] = json!(value);
            }
            let what = format!("metadata {key} = {}", metadata[key]);
            (consistent(&entries, &metadata), what)
        }
        5 => {
            // Non-finite values in a float tensor.
            let e = &mut entries[k];
            let size = dtype_size(&e.dtype) as usize;
            if !e.bytes.is_empty() && e.dtype.starts_with('F') {
                let i = rng.gen_range(0..e.bytes.len() / size) * size;
                let v: &[u8] = match (e.dtype.as_str(), rng.gen_bool(0.5)) {
                    ("F16", true) => &[0x00, 0x7c],
                    ("F16", false) => &[0x00, 0x7e],
                    (_, true) => &[0x00, 0x00, 0x80, 0xff],
                    _ => &[0x00, 0x00, 0xc0, 0x7f],
                };
                e.bytes[i..i + size].copy_from_slice(&v[..size]);
            }
            let what = format!("{tensor}: a non-finite value");
            (consistent(&entries, &metadata), what)
        }
        6 => {
            // Offsets that lie about where the data is.
            let mut header = header_json(&entries, &metadata);
            let offsets = &mut header[&tensor]["data_offsets"];
            let (s, e) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
            *offsets = match rng.gen_range(0..5) {
                0 => json!([e, s]),
                1 => json!([s, e + 2]),
                2 => json!([s, u64::MAX]),
                3 => json!([s + 1, e + 1]),
                _ => json!([0, e - s]),
            };
            let what = format!("{tensor}: data_offsets {offsets}");
            (encode_safetensors(&header.to_string(), &entries), what)
        }
        7 => {
            // The header text itself: cut, garbage, invalid UTF-8, deep nesting.
            let mut text = header_json(&entries, &metadata).to_string().into_bytes();
            let what = match rng.gen_range(0..4) {
                0 => {
                    text.truncate(rng.gen_range(0..text.len()));
                    "header text cut"
                }
                1 => {
                    let i = rng.gen_range(0..text.len());
                    text[i] = *b"{}[],:\"0x".choose(rng).unwrap();
                    "header punctuation"
                }
                2 => {
                    let i = rng.gen_range(0..text.len());
                    text[i] = 0xff;
                    "header not UTF-8"
                }
                _ => {
                    text = vec![b'['; 100_000];
                    "header nested 100000 deep"
                }
            };
            let mut out = (text.len() as u64).to_le_bytes().to_vec();
            out.extend(text);
            entries.iter().for_each(|e| out.extend(&e.bytes));
            (out, what.into())
        }
        8 => {
            let mut out = seed.to_vec();
            let n = *[
                0u64,
                1,
                7,
                8,
                9,
                seed.len() as u64,
                1 << 27,
                1 << 40,
                u64::MAX,
            ]
            .choose(rng)
            .unwrap();
            out[..8].copy_from_slice(&n.to_le_bytes());
            (out, format!("header length {n}"))
        }
        _ => {
            let mut out = seed.to_vec();
            let header_end = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
            let len = out.len();
            let what = match rng.gen_range(0..4) {
                0 => {
                    flip_bits(rng, &mut out, 0..header_end);
                    "header bit flips"
                }
                1 => {
                    overwrite_bytes(rng, &mut out, 0..len);
                    "byte overwrites"
                }
                2 => {
                    flip_bits(rng, &mut out, header_end..len);
                    "data bit flips"
                }
                _ => {
                    truncate_or_extend(rng, &mut out);
                    "truncated or extended"
                }
            };
            (out, what.into())
        }
    }
}

/// Float values a safetensors file holds, by its header (0 when the header does not parse).
fn float_values(bytes: &[u8]) -> u64 {
    let header = bytes
        .get(..8)
        .map(|n| u64::from_le_bytes(n.try_into().unwrap()) as usize)
        .and_then(|n| bytes.get(8..8usize.checked_add(n)?))
        .and_then(|h| serde_json::from_slice::<Value>(h).ok());
    let Some(Value::Object(map)) = header else {
        return 0;
    };
    map.values()
        .filter(|v| {
            v["dtype"]
                .as_str()
                .is_some_and(|d| d.starts_with(['F', 'B']))
        })
        .filter_map(|v| {
            v["shape"]
                .as_array()?
                .iter()
                .try_fold(1u64, |a, d| a.checked_mul(d.as_u64()?))
        })
        .sum()
}

/// Heap growth per byte of a weights file: u8 tensors widen to i64 (8×), f16 ones to f32
/// (2×), and the model the shapes describe holds at most the file's float values again (≤ 2×
/// for f16); the parsed header's names and shapes, with margin.
const WEIGHTS_FACTOR: usize = 16;

/// The largest patch side an accepted weights file may declare.
const MAX_PATCH: usize = 1024;

#[test]
fn mutated_weights_files_are_rejected_cleanly_within_bounded_memory() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let f16 = std::fs::read(root().join("fuzz/corpus/weights/seed-tiny-f16.safetensors")).unwrap();
    let model = load_model_bytes(&f16, "seed").unwrap();
    assert_eq!(*model.config(), ModelConfig::tiny());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f32.safetensors");
    model_tensors(&model, WeightDtype::F32)
        .write(&path)
        .unwrap();
    let seeds = [f16, std::fs::read(&path).unwrap()];
    println!(
        "seeds: tiny preset, {} parameters, f16 {} bytes and f32 {} bytes, both accepted",
        model.params.len(),
        seeds[0].len(),
        seeds[1].len()
    );
    let hwm = vm_hwm_kb();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut tally = Tally::default();
    for i in 0..2000 {
        let seed = seeds.choose(&mut rng).unwrap();
        let (bytes, what) = mutate_weights(&mut rng, seed);
        let name = format!("input{i}.safetensors");
        let floats = float_values(&bytes);
        tally.run(
            &format!("#{i} {what}"),
            &name,
            bytes.len(),
            WEIGHTS_FACTOR,
            || {
                let model = match load_model_bytes(&bytes, &name) {
                    Ok(m) => m,
                    Err(e) => return Ok(Err(format!("{e:#}"))),
                };
                let (n, cfg) = (model.table.n_params + model.table.n_buffers, model.config());
                if n as u64 > floats {
                    return Err(format!("accepted {n} values from a file holding {floats}"));
                }
                if cfg.patch > MAX_PATCH || model.params.iter().any(|v| !v.is_finite()) {
                    return Err(format!(
                        "accepted patch {} or non-finite weights",
                        cfg.patch
                    ));
                }
                Ok(Ok(()))
            },
        );
    }
    tally.report("weights", vm_hwm_kb() - hwm, true);
}

// ---------------------------------------------------------------- manifest

const FIELD_VALUES: &[&str] = &[
    "",
    " ",
    "2",
    "-1",
    "1.0",
    "01",
    "NaN",
    "inf",
    "１",
    "0x1",
    "99999999999999999999999999",
    "\"a,b\"",
    "a\0b",
    "../../etc/passwd",
    "/",
    "case.nii.gz",
    "\u{feff}image",
];

/// One mutation of a manifest's text; returns its description.
fn mutate_manifest(rng: &mut ChaCha8Rng, text: &mut Vec<u8>) -> String {
    let s = String::from_utf8_lossy(text).into_owned();
    let mut lines: Vec<String> = s.lines().map(str::to_string).collect();
    if lines.is_empty() {
        lines.push(String::new());
    }
    let r = rng.gen_range(0..lines.len());
    let what = match rng.gen_range(0..9) {
        0 | 1 => {
            let mut fields: Vec<String> = lines[r].split(',').map(str::to_string).collect();
            let f = rng.gen_range(0..fields.len());
            fields[f] = if rng.gen_bool(0.1) {
                "x".repeat(rng.gen_range(1000..20000))
            } else {
                FIELD_VALUES.choose(rng).unwrap().to_string()
            };
            lines[r] = fields.join(",");
            format!("line {r} field {f} mangled")
        }
        2 => {
            let extra = if rng.gen_bool(0.5) { "," } else { ",x,y" };
            lines[r].push_str(extra);
            format!("line {r} + {extra:?}")
        }
        3 => {
            let line = lines[r].clone();
            lines.truncate(rng.gen_range(0..=lines.len()));
            if rng.gen_bool(0.5) {
                lines.extend(std::iter::repeat_n(line, rng.gen_range(1..500)));
            }
            format!("{} lines", lines.len())
        }
        4 => {
            lines.swap(0, r);
            format!("line {r} first")
        }
        5 => {
            *text = lines.join("\r\n").into_bytes();
            return "CRLF".into();
        }
        6 => {
            let len = text.len();
            flip_bits(rng, text, 0..len);
            return "bit flips".into();
        }
        7 => {
            truncate_or_extend(rng, text);
            return format!("length {}", text.len());
        }
        _ => {
            let len = text.len();
            overwrite_bytes(rng, text, 0..len);
            return "byte overwrites".into();
        }
    };
    *text = lines.join("\n").into_bytes();
    what
}

/// Heap growth per byte of a manifest: the text (1×), and per row two paths joined to the
/// manifest's folder (~20 bytes here), a case id and a field vector: ~200 bytes for the
/// shortest (6-byte) row.
const MANIFEST_FACTOR: usize = 64;

#[test]
fn mutated_manifests_are_rejected_cleanly_within_bounded_memory() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let corpus = root().join("fuzz/corpus/manifest");
    let mut seeds: Vec<Vec<u8>> = ["seed-synth.csv", "seed-no-case-id.csv"]
        .iter()
        .map(|f| std::fs::read(corpus.join(f)).unwrap())
        .collect();
    let mut long = String::from("case_id,label,mask,image\n");
    for i in 0..100 {
        long += &format!("c{i},{},m{i}.nii.gz,i{i}.nii\n", i % 2);
    }
    seeds.push(long.into_bytes());
    for seed in &seeds {
        let path = dir.path().join("seed.csv");
        std::fs::write(&path, seed).unwrap();
        let rows = read_manifest(&path).unwrap();
        println!("seed manifest: {} rows accepted", rows.len());
    }
    let hwm = vm_hwm_kb();
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut tally = Tally::default();
    for i in 0..3000 {
        let mut text = seeds.choose(&mut rng).unwrap().clone();
        let what: Vec<String> = (0..rng.gen_range(1..=3))
            .map(|_| mutate_manifest(&mut rng, &mut text))
            .collect();
        let name = format!("input{i}.csv");
        let path = dir.path().join(&name);
        std::fs::write(&path, &text).unwrap();
        // Independent count of the data rows: non-blank lines after the first non-blank one.
        let rows = std::str::from_utf8(&text).map(|t| {
            t.split('\n')
                .filter(|l| !l.trim().is_empty())
                .count()
                .saturating_sub(1)
        });
        let what = format!("#{i} {}", what.join(", "));
        tally.run(&what, &name, text.len(), MANIFEST_FACTOR, || {
            let entries = match read_manifest(&path) {
                Ok(e) => e,
                Err(e) => return Ok(Err(format!("{e:#}"))),
            };
            if rows != Ok(entries.len()) || entries.iter().any(|e| e.label > 1) {
                return Err(format!("accepted {} rows of {rows:?}", entries.len()));
            }
            Ok(Ok(()))
        });
        let _ = std::fs::remove_file(&path);
    }
    tally.report("manifest", vm_hwm_kb() - hwm, true);
}

// ---------------------------------------------------------------- found inputs

/// Runs one input that must be rejected with a message saying `why`.
fn expect_rejected(
    tally: &mut Tally,
    (what, name): (&str, &str),
    (size, factor): (usize, usize),
    why: &str,
    parse: impl FnOnce() -> Result<(), String>,
) {
    tally.run(what, name, size, factor, || match parse() {
        Ok(()) => Err("accepted".into()),
        Err(e) if e.contains(why) => {
            println!("{what}: {e}");
            Ok(Err(e))
        }
        Err(e) => Err(format!("rejected without saying {why:?}: {e}")),
    });
}

/// The inputs that broke the readers before their fixes: each is now an error naming the file
/// and saying why, within the heap bound.
#[test]
fn inputs_that_broke_the_readers_stay_rejected() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let hwm = vm_hwm_kb();
    let mut tally = Tally::default();
    // NIfTI: a bare 352-byte header whose data would start at 4 GB, or whose dims declare a
    // 1024×1024×2048 float64 volume (the reader used to reserve 4 and 16 GiB up front).
    let seed = std::fs::read(root().join("fuzz/corpus/nifti/seed-int16-ras.nii")).unwrap();
    let mut far = seed[..352].to_vec();
    far[108..112].copy_from_slice(&4e9f32.to_le_bytes());
    let mut huge = seed[..352].to_vec();
    for (off, v) in [(42, 1024i16), (44, 1024), (46, 2048), (70, 64), (72, 64)] {
        huge[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    for (i, (what, bytes)) in [("vox_offset 4e9", far), ("1024×1024×2048 float64", huge)]
        .into_iter()
        .enumerate()
    {
        for (ext, file) in [("nii", bytes.clone()), ("nii.gz", gzip(&bytes))] {
            let name = format!("found{i}.{ext}");
            let path = dir.path().join(&name);
            std::fs::write(&path, file).unwrap();
            let parse = || read_volume(&path).map(|_| ()).map_err(|e| format!("{e:#}"));
            let size = (bytes.len(), NIFTI_FACTOR);
            expect_rejected(&mut tally, (what, &name), size, "truncated", parse);
        }
    }
    // Weights whose shapes describe a model far larger than the file: a zero-element
    // enc1.conv1.weight 2^40 wide (an 88 TB allocation: abort), one 4096 wide with its data
    // (a 4.8 GB model filled with random values); and a 2^30 patch side (was accepted).
    let seed = std::fs::read(root().join("fuzz/corpus/weights/seed-tiny-f16.safetensors")).unwrap();
    let (entries, metadata) = split_safetensors(&seed);
    let lie = |shape: Vec<u64>, metadata: &Value| {
        let mut entries = entries.clone();
        let e = entries
            .iter_mut()
            .find(|e| e.name == "enc1.conv1.weight")
            .unwrap();
        e.bytes = vec![0; (shape.iter().product::<u64>() * 2) as usize];
        e.shape = shape;
        encode_safetensors(&header_json(&entries, metadata).to_string(), &entries)
    };
    let mut big_patch = metadata.clone();
    big_patch["patch"] = json!("1073741824");
    let cases = [
        (
            "zero-element 2^40-wide enc1",
            lie(vec![1 << 40, 1, 3, 0], &metadata),
            "beyond the 65536 channels",
        ),
        (
            "4096-wide enc1",
            lie(vec![4096, 1, 3, 3], &metadata),
            "the file holds only",
        ),
        ("patch 2^30", lie(vec![8, 1, 3, 3], &big_patch), "patch"),
    ];
    for (i, (what, bytes, why)) in cases.into_iter().enumerate() {
        let name = format!("found{i}.safetensors");
        let parse = || {
            load_model_bytes(&bytes, &name)
                .map(|_| ())
                .map_err(|e| format!("{e:#}"))
        };
        let size = (bytes.len(), WEIGHTS_FACTOR);
        expect_rejected(&mut tally, (what, &name), size, why, parse);
    }
    tally.report("found inputs", vm_hwm_kb() - hwm, false);
    assert_eq!(tally.rejected, tally.tried);
}
