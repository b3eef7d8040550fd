//! Validation metrics: 3D Dice of label maps, confusion-matrix scores and ROC AUC (ties count
//! one half) of the severity prediction.

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
            if (1..=NUM_LOBES as u8).contains(&p) {
                band[p as usize - 1].pred += 1;
            }
            if (1..=NUM_LOBES as u8).contains(&t) {
                band[t as usize - 1].truth += 1;
                band[t as usize - 1].both += (p == t) as usize;
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
    let class = |l: u8| {
        if (1..=NUM_LOBES as u8).contains(&l) {
            l as usize
        } else {
            0
        }
    };
    let mut out = LobeConfusion::default();
    for (&p, &t) in pred.iter().zip(truth) {
        out[class(t)][class(p)] += 1;
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
