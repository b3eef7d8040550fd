//! Training data: manifest → bags (image patches, mask patches, label) with seeded slice
//! sampling stratified over the lung's z-range, background prefetch, patient-level split.

use crate::data::lobe_slices;
use crate::data::preprocess::{resize_nearest, slice_patch, CanonicalCt, PreprocessConfig};
use crate::io::nifti::{read_grid, read_volume, Grid, Volume};
use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One row of a manifest CSV (paths resolved against the manifest's folder).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    pub image: PathBuf,
    pub mask: PathBuf,
    pub label: u8,
    pub case_id: String,
    /// The row's line in the manifest file (1-based, blank lines counted).
    pub line: usize,
}

/// Parses a manifest CSV with a header naming the columns `image`, `mask`, `label` and
/// optionally `case_id` (default: the image file name without extension). Relative paths are
/// taken from the manifest's folder; blank lines are skipped. Syntax errors (field count,
/// empty paths, a label other than 0 or 1) name the file and line. The rows are not checked
/// against the files: [`read_checked_manifest`] does that.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestEntry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the manifest {}", path.display()))?;
    let name = path.display();
    let base = path.parent().unwrap_or(Path::new("."));
    let mut rows = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty());
    let header: Vec<&str> = rows
        .next()
        .ok_or_else(|| anyhow!("{name}: the manifest is empty"))?
        .1
        .split(',')
        .map(str::trim)
        .collect();
    let column = |col: &str| header.iter().position(|h| *h == col);
    let (Some(ci), Some(cm), Some(cl)) = (column("image"), column("mask"), column("label")) else {
        bail!(
            "{name}: the manifest header must name the columns image, mask and label (found {header:?})"
        );
    };
    let cc = column("case_id");
    let mut out = Vec::new();
    for (line, row) in rows {
        let fields: Vec<&str> = row.split(',').map(str::trim).collect();
        if fields.len() != header.len() {
            bail!(
                "{name} line {line}: {} fields, but the header names {}",
                fields.len(),
                header.len()
            );
        }
        if let Some(col) = [ci, cm].into_iter().find(|&c| fields[c].is_empty()) {
            bail!("{name} line {line}: the {} field is empty", header[col]);
        }
        let label: u8 = match fields[cl] {
            "0" => 0,
            "1" => 1,
            other => {
                bail!("{name} line {line}: label {other:?} must be 0 (non-severe) or 1 (severe)")
            }
        };
        let image = base.join(fields[ci]);
        let case_id = match cc.map(|c| fields[c]) {
            Some(id) if !id.is_empty() => id.to_string(),
            _ => stem(&image),
        };
        out.push(ManifestEntry {
            mask: base.join(fields[cm]),
            image,
            label,
            case_id,
            line,
        });
    }
    if out.is_empty() {
        bail!("{name}: the manifest has no rows");
    }
    Ok(out)
}

/// The lobe labels a mask may hold (0 background, 1–5 the lobes).
const MASK_LABELS: std::ops::RangeInclusive<f32> = 0.0..=5.0;

/// Reads a manifest ([`read_manifest`]) and checks every row before anything trains or
/// evaluates on it: the image and mask files exist; no image is listed twice; a case id keeps
/// one label; image and mask lie on the same grid (dimensions, and affines within 1e-3
/// relative: headers only); every mask voxel is a lobe label 0–5. Every problem is reported,
/// each with its line.
///
/// The masks are read whole, once each, [`PARALLEL_MASKS`] files at a time: the check costs
/// one read of every mask and holds up to that many masks' stored bytes and f32 values.
pub fn read_checked_manifest(path: &Path) -> Result<Vec<ManifestEntry>> {
    let entries = read_manifest(path)?;
    let mut problems: Vec<(usize, String)> = Vec::new();
    let mut images: HashMap<PathBuf, usize> = HashMap::new();
    let mut labels: HashMap<&str, (u8, usize)> = HashMap::new();
    let mut to_read: Vec<&ManifestEntry> = Vec::new();
    for e in &entries {
        if let Some((label, first)) = labels.get(e.case_id.as_str()) {
            if *label != e.label {
                problems.push((
                    e.line,
                    format!(
                        "case id {:?} is labelled {} here but {label} on line {first}",
                        e.case_id, e.label
                    ),
                ));
            }
        } else {
            labels.insert(&e.case_id, (e.label, e.line));
        }
        let missing: Vec<String> = [("image", &e.image), ("mask", &e.mask)]
            .iter()
            .filter(|(_, f)| !f.is_file())
            .map(|(what, f)| format!("the {what} file {} does not exist", f.display()))
            .collect();
        if !missing.is_empty() {
            problems.extend(missing.into_iter().map(|m| (e.line, m)));
            continue;
        }
        let key = std::fs::canonicalize(&e.image).unwrap_or_else(|_| e.image.clone());
        match images.get(&key) {
            Some(first) => problems.push((
                e.line,
                format!(
                    "the image {} is already listed on line {first}",
                    e.image.display()
                ),
            )),
            None => {
                images.insert(key, e.line);
                to_read.push(e);
            }
        }
    }
    problems.extend(check_masks(&to_read));
    if problems.is_empty() {
        return Ok(entries);
    }
    problems.sort_by_key(|(line, _)| *line);
    const SHOWN: usize = 20;
    let mut msg = format!("{}: {} problem(s)", path.display(), problems.len());
    for (line, problem) in problems.iter().take(SHOWN) {
        msg += &format!("\n  line {line}: {problem}");
    }
    if problems.len() > SHOWN {
        msg += &format!("\n  … and {} more", problems.len() - SHOWN);
    }
    bail!(msg)
}

/// Masks read at once by [`read_checked_manifest`]: enough to overlap their inflation, few
/// enough to bound the memory (5 bytes per voxel of a uint8 mask each).
const PARALLEL_MASKS: usize = 4;

/// The grid and label problems of rows whose files exist: each mask read once
/// ([`PARALLEL_MASKS`] at a time), the images' headers only (in parallel).
fn check_masks(rows: &[&ManifestEntry]) -> Vec<(usize, String)> {
    let mut masks: Vec<&Path> = rows.iter().map(|e| e.mask.as_path()).collect();
    masks.sort();
    masks.dedup();
    let mut read: HashMap<&Path, Result<Grid>> = HashMap::new();
    for batch in masks.chunks(PARALLEL_MASKS) {
        let grids: Vec<(&Path, Result<Grid>)> = batch
            .par_iter()
            .map(|&m| {
                (
                    m,
                    read_volume(m).and_then(|v| check_labels(&v).map(|_| v.grid())),
                )
            })
            .collect();
        read.extend(grids);
    }
    rows.par_iter()
        .filter_map(|e| {
            let problem = match (&read[e.mask.as_path()], &read_grid(&e.image)) {
                (Err(err), _) | (_, Err(err)) => format!("{err:#}"),
                (Ok(mask), Ok(image)) => format!(
                    "the image {} and the mask {} are not on the same grid: {}",
                    e.image.display(),
                    e.mask.display(),
                    image.mismatch(mask)?
                ),
            };
            Some((e.line, problem))
        })
        .collect()
}

/// Fails when a mask holds values other than the lobe labels 0–5 (within 1e-3 of an
/// integer), naming the values (the first 8 distinct ones) and their voxel counts.
fn check_labels(mask: &Volume) -> Result<()> {
    let mut bad: Vec<(f32, usize)> = Vec::new();
    let mut total = 0usize;
    for &v in &mask.data {
        if MASK_LABELS.contains(&v) && (v - v.round()).abs() <= 1e-3 {
            continue;
        }
        total += 1;
        if let Some(k) = bad.iter().position(|(b, _)| *b == v) {
            bad[k].1 += 1;
        } else if bad.len() < 8 {
            bad.push((v, 1));
        }
    }
    if total == 0 {
        return Ok(());
    }
    let listed: Vec<String> = bad
        .iter()
        .map(|(v, n)| format!("{v} ({n} voxels)"))
        .collect();
    bail!(
        "the mask {} holds {total} voxels outside the lobe labels 0–5: {}{}",
        mask.path.display(),
        listed.join(", "),
        if total > bad.iter().map(|b| b.1).sum() {
            ", …"
        } else {
            ""
        }
    )
}

/// A file name without its `.nii`/`.nii.gz` extension.
pub fn stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for ext in [".nii.gz", ".nii"] {
        if let Some(s) = name.strip_suffix(ext) {
            return s.to_string();
        }
    }
    name
}

/// Patient-level split: every row of a case id lands on the same side. Case ids are split per
/// class (the label of their first row), `val_fraction` of each class to validation (at least
/// one when the class has two cases or more and the fraction is positive), seeded.
pub fn split_by_case(
    entries: &[ManifestEntry],
    val_fraction: f64,
    seed: u64,
) -> (Vec<ManifestEntry>, Vec<ManifestEntry>) {
    let mut case_label: BTreeMap<&str, u8> = BTreeMap::new();
    for e in entries {
        case_label.entry(&e.case_id).or_insert(e.label);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut val_cases: Vec<&str> = Vec::new();
    for class in [0u8, 1] {
        let mut ids: Vec<&str> = case_label
            .iter()
            .filter(|(_, &l)| l == class)
            .map(|(id, _)| *id)
            .collect();
        ids.shuffle(&mut rng);
        let mut n = (val_fraction * ids.len() as f64).round() as usize;
        if val_fraction > 0.0 && ids.len() >= 2 {
            n = n.clamp(1, ids.len() - 1);
        }
        val_cases.extend(ids.into_iter().take(n));
    }
    entries
        .iter()
        .cloned()
        .partition(|e| !val_cases.contains(&e.case_id.as_str()))
}

/// How bags are built.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BagConfig {
    /// Slices per bag (data.md default 8).
    pub bag_size: usize,
    pub preprocess: PreprocessConfig,
}

/// One training bag: `bag_size` patches of one case.
#[derive(Clone, Debug, PartialEq)]
pub struct Bag {
    pub case_id: String,
    pub label: u8,
    /// Canonical z of each patch.
    pub slices: Vec<usize>,
    /// [N, 1, P, P] normalised HU.
    pub patches: Vec<f32>,
    /// [N, P, P] lobe labels.
    pub masks: Vec<u8>,
}

/// `n` slices from the sorted lung slices, stratified along z: stratum k covers positions
/// [k·L/n, (k+1)·L/n) of the L lung slices and gives one uniform draw (with fewer lung slices
/// than `n`, some repeat).
pub fn stratified_slices(lung_slices: &[usize], n: usize, rng: &mut impl Rng) -> Vec<usize> {
    let len = lung_slices.len() as f64;
    (0..n)
        .map(|k| {
            let pos = ((k as f64 + rng.gen::<f64>()) * len / n as f64).floor() as usize;
            lung_slices[pos.min(lung_slices.len() - 1)]
        })
        .collect()
}

/// Reads a case: CT and lobe mask on the same grid, both canonical.
pub fn load_case(entry: &ManifestEntry) -> Result<(CanonicalCt, Vec<u8>)> {
    let image = read_volume(&entry.image)?;
    let mask = read_volume(&entry.mask)?;
    if let Some(mismatch) = image.grid().mismatch(&mask.grid()) {
        bail!(
            "manifest line {}: the image {} and the mask {} are not on the same grid: {mismatch}",
            entry.line,
            entry.image.display(),
            entry.mask.display()
        );
    }
    let labels: Vec<u8> = mask
        .canonical_data()
        .iter()
        .map(|&v| v.round().clamp(0.0, 255.0) as u8)
        .collect();
    Ok((CanonicalCt::from_volume(&image), labels))
}

/// The lung slices of a case (ascending z): those where the mask marks a lobe.
fn lung_slices(entry: &ManifestEntry, dims: [usize; 3], labels: &[u8]) -> Result<Vec<usize>> {
    let lung = lobe_slices(labels, dims);
    if lung.is_empty() {
        bail!("{}: the lobe mask marks no lung", entry.mask.display());
    }
    Ok(lung)
}

/// Slices of one case preprocessed for bags: its lung slices, and the patch and mask patch of
/// each slice in `patches` (a subset of the lung slices, or all of them).
pub struct CaseSlices {
    lung: Vec<usize>,
    /// z → (P×P normalised patch, P×P lobe labels).
    patches: BTreeMap<usize, (Vec<f32>, Vec<u8>)>,
}

impl CaseSlices {
    /// Preprocesses slices `zs` of a loaded case.
    fn prepare(
        entry: &ManifestEntry,
        ct: &CanonicalCt,
        labels: &[u8],
        lung: Vec<usize>,
        zs: &[usize],
        cfg: &PreprocessConfig,
    ) -> Result<CaseSlices> {
        let [nx, ny, _] = ct.dims;
        let (n, p) = (nx * ny, cfg.patch);
        let mut patches = BTreeMap::new();
        for &z in zs {
            let (crop, patch) = slice_patch(ct, z, cfg).ok_or_else(|| {
                anyhow!(
                    "{}: slice {z} holds lung in the mask but no body in the image",
                    entry.image.display()
                )
            })?;
            let mut mask = vec![0u8; p * p];
            resize_nearest(&labels[z * n..(z + 1) * n], nx, ny, &crop, p, &mut mask);
            patches.insert(z, (patch, mask));
        }
        Ok(CaseSlices { lung, patches })
    }

    /// Bytes the prepared patches of `slices` lung slices take at patch side `p`.
    fn bytes(slices: usize, p: usize) -> usize {
        slices * p * p * (std::mem::size_of::<f32>() + 1)
    }

    /// The bag of slices `zs` (each prepared).
    fn bag(&self, entry: &ManifestEntry, zs: Vec<usize>) -> Bag {
        let (patches, masks) = zs.iter().map(|z| &self.patches[z]).fold(
            (Vec::new(), Vec::new()),
            |(mut ps, mut ms), (p, m)| {
                ps.extend_from_slice(p);
                ms.extend_from_slice(m);
                (ps, ms)
            },
        );
        Bag {
            case_id: entry.case_id.clone(),
            label: entry.label,
            slices: zs,
            patches,
            masks,
        }
    }
}

/// Training cases' preprocessed lung slices kept in memory across epochs, up to a byte budget:
/// a cached case is read and preprocessed once instead of once per bag (a 512×512×300 volume
/// takes about a second to read). Cases beyond the budget are read for every bag. Bags are the
/// same with or without the cache.
pub struct BagCache {
    budget: usize,
    /// Bytes reserved so far, and the cached cases by image path.
    state: Mutex<(usize, HashMap<PathBuf, Arc<CaseSlices>>)>,
}

impl BagCache {
    pub fn new(budget_bytes: usize) -> Self {
        BagCache {
            budget: budget_bytes,
            state: Mutex::new((0, HashMap::new())),
        }
    }

    fn get(&self, image: &Path) -> Option<Arc<CaseSlices>> {
        self.lock().1.get(image).cloned()
    }

    /// Reserves `bytes` of the budget; false when they do not fit.
    fn reserve(&self, bytes: usize) -> bool {
        let mut state = self.lock();
        let fits = state.0 + bytes <= self.budget;
        if fits {
            state.0 += bytes;
        }
        fits
    }

    fn insert(&self, image: &Path, case: Arc<CaseSlices>) {
        self.lock().1.insert(image.to_path_buf(), case);
    }

    /// Bytes reserved by cached cases.
    pub fn used(&self) -> usize {
        self.lock().0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (usize, HashMap<PathBuf, Arc<CaseSlices>>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The bag of manifest row `index` in `epoch`: its slices depend only on (seed, epoch, index).
/// With a cache, the case's prepared slices are taken from it, or all its lung slices are
/// prepared and kept when the budget has room.
pub fn load_bag(
    entry: &ManifestEntry,
    index: usize,
    cfg: &BagConfig,
    seed: u64,
    epoch: u64,
    cache: Option<&BagCache>,
) -> Result<Bag> {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(mix(seed, epoch), index as u64));
    if let Some(case) = cache.and_then(|c| c.get(&entry.image)) {
        let zs = stratified_slices(&case.lung, cfg.bag_size, &mut rng);
        return Ok(case.bag(entry, zs));
    }
    let (ct, labels) = load_case(entry)?;
    let lung = lung_slices(entry, ct.dims, &labels)?;
    let zs = stratified_slices(&lung, cfg.bag_size, &mut rng);
    let p = cfg.preprocess.patch;
    match cache.filter(|c| c.reserve(CaseSlices::bytes(lung.len(), p))) {
        Some(cache) => {
            let all = lung.clone();
            let case = Arc::new(CaseSlices::prepare(
                entry,
                &ct,
                &labels,
                lung,
                &all,
                &cfg.preprocess,
            )?);
            cache.insert(&entry.image, Arc::clone(&case));
            Ok(case.bag(entry, zs))
        }
        None => {
            let case = CaseSlices::prepare(entry, &ct, &labels, lung, &zs, &cfg.preprocess)?;
            Ok(case.bag(entry, zs))
        }
    }
}

/// The order in which an epoch visits the manifest rows (a seeded shuffle).
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(seed, epoch)));
    order
}

/// How a [`Prefetcher`] loads: its threads, the bags each loads ahead, and the slice cache.
#[derive(Clone, Default)]
pub struct Loading {
    pub workers: usize,
    pub depth: usize,
    pub cache: Option<Arc<BagCache>>,
}

/// Loads one epoch's bags on background threads, `depth` bags ahead per worker, and yields
/// them in [`epoch_order`] (the result does not depend on the number of workers); a resumed
/// epoch starts at a position in that order.
pub struct Prefetcher {
    receivers: Vec<Receiver<Result<Bag>>>,
    next: usize,
    total: usize,
    workers: Vec<JoinHandle<()>>,
}

impl Prefetcher {
    /// All bags of `epoch`.
    pub fn start(
        entries: Vec<ManifestEntry>,
        cfg: BagConfig,
        seed: u64,
        epoch: u64,
        loading: Loading,
    ) -> Self {
        Self::start_at(entries, cfg, seed, epoch, 0, loading)
    }

    /// The bags of `epoch` from `position` in its order on.
    pub fn start_at(
        entries: Vec<ManifestEntry>,
        cfg: BagConfig,
        seed: u64,
        epoch: u64,
        position: usize,
        loading: Loading,
    ) -> Self {
        let workers = loading.workers.max(1);
        let order = Arc::new(epoch_order(entries.len(), seed, epoch));
        let entries = Arc::new(entries);
        let first = position.min(order.len());
        let total = order.len() - first;
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = sync_channel(loading.depth.max(1));
            let (order, entries) = (Arc::clone(&order), Arc::clone(&entries));
            let cache = loading.cache.clone();
            handles.push(std::thread::spawn(move || {
                for pos in (first + w..order.len()).step_by(workers) {
                    let idx = order[pos];
                    let bag = load_bag(&entries[idx], idx, &cfg, seed, epoch, cache.as_deref());
                    if tx.send(bag).is_err() {
                        return;
                    }
                }
            }));
            receivers.push(rx);
        }
        Prefetcher {
            receivers,
            next: 0,
            total,
            workers: handles,
        }
    }
}

impl Iterator for Prefetcher {
    type Item = Result<Bag>;

    fn next(&mut self) -> Option<Result<Bag>> {
        if self.next >= self.total {
            return None;
        }
        let rx = &self.receivers[self.next % self.receivers.len()];
        self.next += 1;
        Some(
            rx.recv()
                .unwrap_or_else(|_| Err(anyhow!("a data loader thread stopped unexpectedly"))),
        )
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.receivers.clear();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
