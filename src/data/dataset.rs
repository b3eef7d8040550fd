//! Training data: manifest → bags (image patches, mask patches, label) with seeded slice
//! sampling stratified over the lung's z-range, background prefetch, patient-level split.

use crate::data::preprocess::{resize_nearest, slice_patch, CanonicalCt, PreprocessConfig};
use crate::io::read_volume;
use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One row of a manifest CSV (paths resolved against the manifest's folder).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestEntry {
    pub image: PathBuf,
    pub mask: PathBuf,
    pub label: u8,
    pub case_id: String,
}

/// Reads a manifest CSV with a header naming the columns `image`, `mask`, `label` and
/// optionally `case_id` (default: the image file name without extension). Relative paths are
/// taken from the manifest's folder.
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestEntry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the manifest {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("{}: the manifest is empty", path.display()))?
        .split(',')
        .map(str::trim)
        .collect();
    let column = |name: &str| header.iter().position(|h| *h == name);
    let (Some(ci), Some(cm), Some(cl)) = (column("image"), column("mask"), column("label")) else {
        bail!(
            "{}: the manifest header must name the columns image, mask and label (found {header:?})",
            path.display()
        );
    };
    let cc = column("case_id");
    let mut out = Vec::new();
    for (n, line) in lines.enumerate() {
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() != header.len() {
            bail!(
                "{}: row {} has {} fields, the header {}",
                path.display(),
                n + 2,
                fields.len(),
                header.len()
            );
        }
        let label: u8 = match fields[cl] {
            "0" => 0,
            "1" => 1,
            other => bail!(
                "{}: row {}: label {other:?} must be 0 (non-severe) or 1 (severe)",
                path.display(),
                n + 2
            ),
        };
        let image = base.join(fields[ci]);
        let case_id = match cc {
            Some(c) => fields[c].to_string(),
            None => stem(&image),
        };
        out.push(ManifestEntry {
            mask: base.join(fields[cm]),
            image,
            label,
            case_id,
        });
    }
    if out.is_empty() {
        bail!("{}: the manifest has no rows", path.display());
    }
    Ok(out)
}

/// Reads a manifest and checks every row before training: field count, label 0/1, image and
/// mask files present. Errors name the file's line number.
pub fn read_checked_manifest(path: &Path) -> Result<Vec<ManifestEntry>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the manifest {}", path.display()))?;
    let mut rows = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let header: Vec<&str> = match rows.next() {
        Some((_, h)) => h.split(',').map(str::trim).collect(),
        None => bail!("{}: the manifest is empty", path.display()),
    };
    let label_col = header.iter().position(|h| *h == "label");
    let rows: Vec<(usize, Vec<&str>)> = rows
        .map(|(i, l)| (i + 1, l.split(',').map(str::trim).collect()))
        .collect();
    for (line, fields) in &rows {
        if fields.len() != header.len() {
            bail!(
                "{} line {line}: {} fields, but the header names {}",
                path.display(),
                fields.len(),
                header.len()
            );
        }
        if let Some(c) = label_col {
            if !matches!(fields[c], "0" | "1") {
                bail!(
                    "{} line {line}: label {:?} must be 0 (non-severe) or 1 (severe)",
                    path.display(),
                    fields[c]
                );
            }
        }
    }
    let entries = read_manifest(path)?;
    for (e, (line, _)) in entries.iter().zip(&rows) {
        for (what, file) in [("image", &e.image), ("mask", &e.mask)] {
            if !file.is_file() {
                bail!(
                    "{} line {line}: the {what} file {} does not exist",
                    path.display(),
                    file.display()
                );
            }
        }
    }
    Ok(entries)
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
    if image.dims != mask.dims
        || image
            .affine
            .iter()
            .flatten()
            .zip(mask.affine.iter().flatten())
            .any(|(a, b)| (a - b).abs() > 1e-3 * (1.0 + a.abs()))
    {
        bail!(
            "{} and {} are not on the same grid (dimensions or affine differ)",
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

/// Builds a bag from a loaded case with slices drawn by `rng`.
pub fn make_bag(
    entry: &ManifestEntry,
    ct: &CanonicalCt,
    labels: &[u8],
    cfg: &BagConfig,
    rng: &mut impl Rng,
) -> Result<Bag> {
    let [nx, ny, nz] = ct.dims;
    let n = nx * ny;
    let lung: Vec<usize> = (0..nz)
        .filter(|&z| labels[z * n..(z + 1) * n].iter().any(|&l| l > 0))
        .collect();
    if lung.is_empty() {
        bail!("{}: the lobe mask marks no lung", entry.mask.display());
    }
    let slices = stratified_slices(&lung, cfg.bag_size, rng);
    let p = cfg.preprocess.patch;
    let mut patches = Vec::with_capacity(slices.len() * p * p);
    let mut masks = vec![0u8; slices.len() * p * p];
    for (k, &z) in slices.iter().enumerate() {
        let (crop, patch) = slice_patch(ct, z, &cfg.preprocess).ok_or_else(|| {
            anyhow!(
                "{}: slice {z} holds lung in the mask but no body in the image",
                entry.image.display()
            )
        })?;
        patches.extend_from_slice(&patch);
        resize_nearest(
            &labels[z * n..(z + 1) * n],
            nx,
            ny,
            &crop,
            p,
            &mut masks[k * p * p..(k + 1) * p * p],
        );
    }
    Ok(Bag {
        case_id: entry.case_id.clone(),
        label: entry.label,
        slices,
        patches,
        masks,
    })
}

fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The bag of manifest row `index` in `epoch`: its slices depend only on (seed, epoch, index).
pub fn load_bag(
    entry: &ManifestEntry,
    index: usize,
    cfg: &BagConfig,
    seed: u64,
    epoch: u64,
) -> Result<Bag> {
    let (ct, labels) = load_case(entry)?;
    let mut rng = ChaCha8Rng::seed_from_u64(mix(mix(seed, epoch), index as u64));
    make_bag(entry, &ct, &labels, cfg, &mut rng)
}

/// The order in which an epoch visits the manifest rows (a seeded shuffle).
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(seed, epoch)));
    order
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
        workers: usize,
        depth: usize,
    ) -> Self {
        Self::start_at(entries, cfg, seed, epoch, 0, workers, depth)
    }

    /// The bags of `epoch` from `position` in its order on.
    pub fn start_at(
        entries: Vec<ManifestEntry>,
        cfg: BagConfig,
        seed: u64,
        epoch: u64,
        position: usize,
        workers: usize,
        depth: usize,
    ) -> Self {
        let workers = workers.max(1);
        let order = Arc::new(epoch_order(entries.len(), seed, epoch));
        let entries = Arc::new(entries);
        let first = position.min(order.len());
        let total = order.len() - first;
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = sync_channel(depth.max(1));
            let (order, entries) = (Arc::clone(&order), Arc::clone(&entries));
            handles.push(std::thread::spawn(move || {
                for pos in (first + w..order.len()).step_by(workers) {
                    let idx = order[pos];
                    let bag = load_bag(&entries[idx], idx, &cfg, seed, epoch);
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
