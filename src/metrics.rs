//! Validation metrics: 3D Dice, lobe confusion and fissure placement of label maps,
//! confusion-matrix scores and ROC AUC (ties count one half) of the severity prediction.

use crate::data::{lobe_slices, NUM_LOBES};

/// Dice of label `label` between two label maps of equal size: `2|A∩B| / (|A| + |B|)`; 1 when
/// the label is absent from both.
pub fn dice(pred: &[u8], truth: &[u8], label: u8) -> f64 {
    let (mut inter, mut a, mut b) = (0usize, 0usize, 0usize);
    for (&p, &t) in pred.iter().zip(truth) {
        let (ip, it) = (p == label, t == label);
        inter += (ip && it) as usize;
        a += ip as usize;
        b += it as usize;
    }
    if a + b == 0 {
        1.0
    } else {
        2.0 * inter as f64 / (a + b) as f64
    }
}

/// The index (label − 1) of a lobe label 1–5; None for background and any other label.
fn lobe_index(l: u8) -> Option<usize> {
    (1..=NUM_LOBES as u8).contains(&l).then(|| l as usize - 1)
}

/// Dice of every lobe (labels 1–5, index = label − 1).
pub fn lobe_dice(pred: &[u8], truth: &[u8]) -> [f64; NUM_LOBES] {
    std::array::from_fn(|l| dice(pred, truth, l as u8 + 1))
}

/// Voxel counts of one lobe in one region: predicted, true, and both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Overlap {
    pub pred: usize,
    pub truth: usize,
    pub both: usize,
}

impl Overlap {
    /// Dice of the counts; `None` when the lobe is neither predicted nor true there.
    pub fn dice(&self) -> Option<f64> {
        (self.pred + self.truth > 0)
            .then(|| 2.0 * self.both as f64 / (self.pred + self.truth) as f64)
    }

    fn add(&mut self, o: &Overlap) {
        self.pred += o.pred;
        self.truth += o.truth;
        self.both += o.both;
    }
}

/// Height bands of the true lung's axial extent that [`by_height`] splits a volume into.
pub const HEIGHT_BANDS: usize = 10;

/// Per-lobe overlaps in each height band (band 0 at the lung base, the last at the apex).
pub type ByHeight = [[Overlap; NUM_LOBES]; HEIGHT_BANDS];

/// The per-lobe overlaps of canonical label maps (`dims`, z = inferior → superior) in
/// [`HEIGHT_BANDS`] equal bands of the slices where the truth holds lung; slices below or above
/// count in the first or last band.
pub fn by_height(pred: &[u8], truth: &[u8], dims: [usize; 3]) -> ByHeight {
    let n = dims[0] * dims[1];
    let lung = lobe_slices(truth, dims);
    let mut out = ByHeight::default();
    let (Some(&lo), Some(&hi)) = (lung.first(), lung.last()) else {
        return out;
    };
    let span = (hi + 1 - lo) as f64;
    for z in 0..dims[2] {
        let t = (z.clamp(lo, hi) - lo) as f64 / span;
        let band = &mut out[((t * HEIGHT_BANDS as f64) as usize).min(HEIGHT_BANDS - 1)];
        for (&p, &t) in pred[z * n..(z + 1) * n]
            .iter()
            .zip(&truth[z * n..(z + 1) * n])
        {
            if let Some(k) = lobe_index(p) {
                band[k].pred += 1;
            }
            if let Some(k) = lobe_index(t) {
                band[k].truth += 1;
                band[k].both += (p == t) as usize;
            }
        }
    }
    out
}

/// The overlaps of several cases added up, band by band (a Dice pooled over the cases).
pub fn pooled(cases: &[ByHeight]) -> ByHeight {
    let mut out = ByHeight::default();
    for case in cases {
        for (o, c) in out.iter_mut().flatten().zip(case.iter().flatten()) {
            o.add(c);
        }
    }
    out
}

/// Voxel counts of true label (row) against predicted label (column): 0 is background or any
/// other label, 1..=5 the lobes.
pub type LobeConfusion = [[u64; NUM_LOBES + 1]; NUM_LOBES + 1];

/// The [`LobeConfusion`] of two label maps on one grid.
pub fn lobe_confusion(pred: &[u8], truth: &[u8]) -> LobeConfusion {
    let class = |l: u8| lobe_index(l).map_or(0, |k| k + 1);
    let mut out = LobeConfusion::default();
    for (&p, &t) in pred.iter().zip(truth) {
        out[class(t)][class(p)] += 1;
    }
    out
}

/// The lobe pairs that meet at a fissure, (lobe below, lobe above) along a craniocaudal
/// column: LLL/LUL (left oblique), RLL/RML and RLL/RUL (right oblique), RML/RUL (horizontal).
pub const FISSURES: [(u8, u8); 4] = [(2, 1), (5, 4), (4, 3), (5, 3)];

/// How far a predicted fissure lies from the true one, summed over the craniocaudal columns
/// that cross it in both maps; positive offsets: the predicted boundary lies too high.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct FissureOffset {
    /// Columns whose lobe below lies wholly under the lobe above, in both maps.
    pub columns: usize,
    /// Sums over those columns of (predicted − true boundary height) and of its magnitude, mm.
    pub sum_mm: f64,
    pub sum_abs_mm: f64,
}

impl FissureOffset {
    /// Mean signed offset and mean distance (mm); `None` without columns.
    pub fn means(&self) -> Option<(f64, f64)> {
        (self.columns > 0).then(|| {
            let n = self.columns as f64;
            (self.sum_mm / n, self.sum_abs_mm / n)
        })
    }

    pub fn add(&mut self, o: &FissureOffset) {
        self.columns += o.columns;
        self.sum_mm += o.sum_mm;
        self.sum_abs_mm += o.sum_abs_mm;
    }
}

/// The boundary height of every [`FISSURES`] pair in each column of a canonical label map
/// (z = inferior → superior), in slices: midway between the lobe below's highest voxel and the
/// lobe above's lowest one; NaN where the column lacks either lobe or they interleave.
fn fissure_heights(labels: &[u8], dims: [usize; 3]) -> Vec<[f32; FISSURES.len()]> {
    let n = dims[0] * dims[1];
    // Lowest and highest z of each lobe per column (u32::MAX / 0 when absent).
    let mut low = vec![[u32::MAX; NUM_LOBES]; n];
    let mut high = vec![[0u32; NUM_LOBES]; n];
    for (z, slice) in labels.chunks(n).enumerate() {
        for (i, &l) in slice.iter().enumerate() {
            if let Some(k) = lobe_index(l) {
                low[i][k] = low[i][k].min(z as u32);
                high[i][k] = high[i][k].max(z as u32);
            }
        }
    }
    (0..n)
        .map(|i| {
            FISSURES.map(|(below, above)| {
                let (b, a) = (below as usize - 1, above as usize - 1);
                if low[i][b] == u32::MAX || low[i][a] == u32::MAX || high[i][b] >= low[i][a] {
                    f32::NAN
                } else {
                    (high[i][b] + 1 + low[i][a]) as f32 / 2.0
                }
            })
        })
        .collect()
}

/// The offset of each predicted fissure ([`FISSURES`]) from the true one in canonical label
/// maps `dims` with slice spacing `dz` (mm), over the columns that cross it in both maps.
pub fn fissure_offsets(
    pred: &[u8],
    truth: &[u8],
    dims: [usize; 3],
    dz: f64,
) -> [FissureOffset; FISSURES.len()] {
    let (p, t) = (fissure_heights(pred, dims), fissure_heights(truth, dims));
    let mut out = [FissureOffset::default(); FISSURES.len()];
    for (hp, ht) in p.iter().zip(&t) {
        for (o, (&a, &b)) in out.iter_mut().zip(hp.iter().zip(ht)) {
            if !a.is_nan() && !b.is_nan() {
                let d = (a - b) as f64 * dz;
                o.columns += 1;
                o.sum_mm += d;
                o.sum_abs_mm += d.abs();
            }
        }
    }
    out
}

/// Counts of a binary prediction against binary truth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Confusion {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    pub fn_: usize,
}

/// `a / b`, NaN when `b` is 0 (a metric that the data leave undefined).
fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        f64::NAN
    } else {
        a as f64 / b as f64
    }
}

impl Confusion {
    /// Tallies predictions (`true` = severe) against labels (`true` = severe).
    pub fn new(pred: &[bool], truth: &[bool]) -> Self {
        let mut c = Confusion::default();
        for (&p, &t) in pred.iter().zip(truth) {
            match (p, t) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, false) => c.tn += 1,
                (false, true) => c.fn_ += 1,
            }
        }
        c
    }

    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.tp + self.tn + self.fp + self.fn_)
    }

    /// True-positive rate (recall); NaN without positives.
    pub fn sensitivity(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// True-negative rate; NaN without negatives.
    pub fn specificity(&self) -> f64 {
        ratio(self.tn, self.tn + self.fp)
    }

    /// `2TP / (2TP + FP + FN)`; NaN when there are neither positives nor positive predictions.
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }
}

/// Area under the ROC curve of `scores` for binary `truth` (Mann–Whitney: the fraction of
/// (positive, negative) pairs ranked correctly, ties counting one half). `None` when either
/// class is missing.
pub fn roc_auc(scores: &[f64], truth: &[bool]) -> Option<f64> {
    let n_pos = truth.iter().filter(|&&t| t).count();
    let n_neg = truth.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (tie-averaged, 1-based) ranks of the positives.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += avg_rank * idx[i..=j].iter().filter(|&&k| truth[k]).count() as f64;
        i = j + 1;
    }
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos * n_neg) as f64)
}

/// The validation metrics of one evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalMetrics {
    /// Mean over cases of each lobe's 3D Dice.
    pub lobe_dice: [f64; NUM_LOBES],
    pub mean_dice: f64,
    pub accuracy: f64,
    pub sensitivity: f64,
    pub specificity: f64,
    pub f1: f64,
    /// NaN when the set holds one class only.
    pub auc: f64,
}

impl EvalMetrics {
    /// Aggregates per-case lobe Dice, severity probabilities and labels (threshold 0.5, as
    /// `assess` reports the class).
    pub fn from_cases(dice: &[[f64; NUM_LOBES]], prob: &[f64], severe: &[bool]) -> Self {
        let n = dice.len().max(1) as f64;
        let lobe_dice: [f64; NUM_LOBES] =
            std::array::from_fn(|l| dice.iter().map(|d| d[l]).sum::<f64>() / n);
        let pred: Vec<bool> = prob.iter().map(|&p| p >= 0.5).collect();
        let c = Confusion::new(&pred, severe);
        EvalMetrics {
            mean_dice: lobe_dice.iter().sum::<f64>() / NUM_LOBES as f64,
            lobe_dice,
            accuracy: c.accuracy(),
            sensitivity: c.sensitivity(),
            specificity: c.specificity(),
            f1: c.f1(),
            auc: roc_auc(prob, severe).unwrap_or(f64::NAN),
        }
    }

    /// The model-selection score: the mean of mean lobe Dice and ROC AUC (AUC counted as 0.5
    /// when undefined).
    pub fn score(&self) -> f64 {
        let auc = if self.auc.is_nan() { 0.5 } else { self.auc };
        (self.mean_dice + auc) / 2.0
    }
}
