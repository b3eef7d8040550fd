//! Losses with logit gradients: segmentation CE + soft Dice, classification CE; row softmax.

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

/// Softmax of the c logits of one pixel (stride hw apart in `logits`, starting at `p`), in f64.
/// Writes the probabilities into `probs` and returns log Σ exp(z).
fn pixel_softmax(logits: &[f32], hw: usize, p: usize, probs: &mut [f64]) -> f64 {
    let zmax = (0..probs.len())
        .map(|j| logits[j * hw + p] as f64)
        .fold(f64::NEG_INFINITY, f64::max);
    let mut s = 0.0;
    for (j, q) in probs.iter_mut().enumerate() {
        *q = (logits[j * hw + p] as f64 - zmax).exp();
        s += *q;
    }
    for q in probs.iter_mut() {
        *q /= s;
    }
    zmax + s.ln()
}

/// Per-image partial sums of the segmentation loss (f64; combined in image order).
struct SegSums {
    ce: f64,
    count: u64,
    /// Σ p_c·y_c, Σ p_c and Σ y_c per class over the non-ignored pixels.
    inter: Vec<f64>,
    psum: Vec<f64>,
    ysum: Vec<f64>,
}

impl SegSums {
    fn new(c: usize) -> Self {
        SegSums {
            ce: 0.0,
            count: 0,
            inter: vec![0.0; c],
            psum: vec![0.0; c],
            ysum: vec![0.0; c],
        }
    }

    fn add(&mut self, o: &SegSums) {
        self.ce += o.ce;
        self.count += o.count;
        for (a, b) in [
            (&mut self.inter, &o.inter),
            (&mut self.psum, &o.psum),
            (&mut self.ysum, &o.ysum),
        ] {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
    }
}

/// Segmentation loss over logits [m, c, hw] and labels [m, hw] (0..c, −1 = ignore):
/// ce = mean over the non-ignored pixels of −log softmax[label];
/// dice_k = (2 Σ p_k y_k + 1) / (Σ p_k + Σ y_k + 1) for the classes k = 1..c (not the
/// background), sums over all non-ignored pixels of the batch; dice_loss = 1 − mean_k dice_k.
/// If no pixel is labelled both are 0. If `dlogits` is given it receives
/// d(scale·(ce + dice_loss))/dlogits (0 at ignored pixels). Sums are taken in f64 per image,
/// then combined in image order, so the result does not depend on the thread count.
/// Returns (ce, dice_loss).
pub fn seg_loss(
    logits: &[f32],
    m: usize,
    c: usize,
    hw: usize,
    labels: &[i64],
    scale: f32,
    dlogits: Option<&mut [f32]>,
) -> Result<(f32, f32)> {
    ensure!(
        c >= 2,
        "segmentation loss needs at least 2 classes (background and one foreground), got {c}"
    );
    ensure!(
        logits.len() == m * c * hw,
        "segmentation logits have {} values, expected [m={m}, c={c}, hw={hw}] = {}",
        logits.len(),
        m * c * hw
    );
    ensure!(
        labels.len() == m * hw,
        "segmentation labels have {} values, expected [m={m}, hw={hw}] = {}",
        labels.len(),
        m * hw
    );
    if let Some(pos) = labels.iter().position(|&l| l < -1 || l >= c as i64) {
        bail!(
            "segmentation label {} at image {}, pixel {} is not −1 (ignore) or a class 0..={}",
            labels[pos],
            pos / hw.max(1),
            pos % hw.max(1),
            c - 1
        );
    }
    if let Some(d) = &dlogits {
        ensure!(
            d.len() == logits.len(),
            "segmentation dlogits has {} values, expected {}",
            d.len(),
            logits.len()
        );
    }
    let img = c * hw;
    let per_image: Vec<SegSums> = (0..m)
        .into_par_iter()
        .map(|i| {
            let (z, lab) = (
                &logits[i * img..(i + 1) * img],
                &labels[i * hw..(i + 1) * hw],
            );
            let mut s = SegSums::new(c);
            let mut probs = vec![0.0; c];
            for (p, &l) in lab.iter().enumerate() {
                if l < 0 {
                    continue;
                }
                let l = l as usize;
                let lse = pixel_softmax(z, hw, p, &mut probs);
                s.ce += lse - z[l * hw + p] as f64;
                s.count += 1;
                for (k, &q) in probs.iter().enumerate() {
                    s.psum[k] += q;
                }
                s.inter[l] += probs[l];
                s.ysum[l] += 1.0;
            }
            s
        })
        .collect();
    let mut tot = SegSums::new(c);
    for s in &per_image {
        tot.add(s);
    }
    if tot.count == 0 {
        if let Some(d) = dlogits {
            d.fill(0.0);
        }
        return Ok((0.0, 0.0));
    }
    let n = tot.count as f64;
    let fg = (c - 1) as f64;
    let num: Vec<f64> = tot.inter.iter().map(|v| 2.0 * v + 1.0).collect();
    let den: Vec<f64> = (0..c).map(|k| tot.psum[k] + tot.ysum[k] + 1.0).collect();
    let dice_mean = (1..c).map(|k| num[k] / den[k]).sum::<f64>() / fg;
    let ce = tot.ce / n;
    let dice_loss = 1.0 - dice_mean;
    if let Some(d) = dlogits {
        let scale = scale as f64;
        d.par_chunks_mut(img)
            .zip(logits.par_chunks(img).zip(labels.par_chunks(hw)))
            .for_each(|(dz, (z, lab))| {
                let mut probs = vec![0.0; c];
                let mut gp = vec![0.0; c];
                for (p, &l) in lab.iter().enumerate() {
                    if l < 0 {
                        for k in 0..c {
                            dz[k * hw + p] = 0.0;
                        }
                        continue;
                    }
                    let l = l as usize;
                    pixel_softmax(z, hw, p, &mut probs);
                    // gp_k = d dice_loss / d p_k at this pixel (0 for the background).
                    gp[0] = 0.0;
                    for k in 1..c {
                        let y = if k == l { 1.0 } else { 0.0 };
                        gp[k] = -(2.0 * y / den[k] - num[k] / (den[k] * den[k])) / fg;
                    }
                    let pg: f64 = probs.iter().zip(&gp).map(|(q, g)| q * g).sum();
                    for k in 0..c {
                        let y = if k == l { 1.0 } else { 0.0 };
                        let dce = (probs[k] - y) / n;
                        let ddice = probs[k] * (gp[k] - pg);
                        dz[k * hw + p] = (scale * (dce + ddice)) as f32;
                    }
                }
            });
    }
    Ok((ce as f32, dice_loss as f32))
}

/// Classification cross-entropy over logits [b, c] and labels [b] (0..c), with optional class
/// weights w [c] as PyTorch: loss = Σ_i w_{y_i}·nll_i / Σ_i w_{y_i} (plain mean without
/// weights). If `dlogits` is given it receives d(scale·loss)/dlogits. Computed in f64.
pub fn cls_loss(
    logits: &[f32],
    b: usize,
    c: usize,
    labels: &[i64],
    class_weights: Option<&[f32]>,
    scale: f32,
    dlogits: Option<&mut [f32]>,
) -> Result<f32> {
    ensure!(
        b > 0 && c > 0,
        "classification loss needs a non-empty batch, got b={b}, c={c}"
    );
    ensure!(
        logits.len() == b * c,
        "classification logits have {} values, expected [b={b}, c={c}] = {}",
        logits.len(),
        b * c
    );
    ensure!(
        labels.len() == b,
        "classification labels have {} entries, expected one per bag ({b})",
        labels.len()
    );
    if let Some(pos) = labels.iter().position(|&l| l < 0 || l >= c as i64) {
        bail!(
            "classification label {} of bag {pos} is not a class 0..={}",
            labels[pos],
            c - 1
        );
    }
    if let Some(w) = class_weights {
        ensure!(
            w.len() == c,
            "{} class weights given for {c} classes",
            w.len()
        );
    }
    if let Some(d) = &dlogits {
        ensure!(
            d.len() == logits.len(),
            "classification dlogits has {} values, expected {}",
            d.len(),
            logits.len()
        );
    }
    let weight = |l: usize| class_weights.map_or(1.0, |w| w[l] as f64);
    let wsum: f64 = labels.iter().map(|&l| weight(l as usize)).sum();
    ensure!(
        wsum > 0.0,
        "the class weights of this batch's labels sum to {wsum}; they must sum to a positive value"
    );
    let mut probs = vec![0.0; c];
    let mut loss = 0.0;
    for (i, &l) in labels.iter().enumerate() {
        let l = l as usize;
        let row = &logits[i * c..(i + 1) * c];
        let lse = pixel_softmax(row, 1, 0, &mut probs);
        loss += weight(l) * (lse - row[l] as f64);
    }
    if let Some(d) = dlogits {
        for (i, &l) in labels.iter().enumerate() {
            let l = l as usize;
            pixel_softmax(&logits[i * c..(i + 1) * c], 1, 0, &mut probs);
            let f = scale as f64 * weight(l) / wsum;
            for (k, dv) in d[i * c..(i + 1) * c].iter_mut().enumerate() {
                let y = if k == l { 1.0 } else { 0.0 };
                *dv = (f * (probs[k] - y)) as f32;
            }
        }
    }
    Ok((loss / wsum) as f32)
}

/// Softmax over each row of logits [b, c] into out [b, c] (computed in f64).
pub fn softmax_rows(logits: &[f32], b: usize, c: usize, out: &mut [f32]) {
    assert_eq!(logits.len(), b * c, "softmax_rows: logits is not [b, c]");
    assert_eq!(out.len(), b * c, "softmax_rows: bad out length");
    let mut probs = vec![0.0; c];
    for i in 0..b {
        pixel_softmax(&logits[i * c..(i + 1) * c], 1, 0, &mut probs);
        for (o, &q) in out[i * c..(i + 1) * c].iter_mut().zip(&probs) {
            *o = q as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ops::tensor::test_support::*;

    fn random_labels(g: &mut rand_chacha::ChaCha8Rng, len: usize, c: usize) -> Vec<i64> {
        use rand::Rng;
        (0..len).map(|_| g.gen_range(-1..c as i64)).collect()
    }

    #[test]
    fn seg_ce_of_uniform_logits_is_ln_c() {
        let (m, c, hw) = (2, 6, 9);
        let z = vec![0.37f32; m * c * hw];
        let labels: Vec<i64> = (0..m * hw).map(|i| (i % 7) as i64 - 1).collect();
        let (ce, _) = seg_loss(&z, m, c, hw, &labels, 1.0, None).unwrap();
        let err = (ce as f64 - (c as f64).ln()).abs();
        println!("seg CE of uniform logits: {ce} vs ln 6, error {err:.3e}");
        assert!(err < 1e-6);
    }

    #[test]
    fn seg_dice_of_perfect_logits_is_zero() {
        let (m, c, hw) = (2, 6, 20);
        let labels: Vec<i64> = (0..m * hw).map(|i| (i * 7 % 6) as i64).collect();
        let mut z = vec![0.0f32; m * c * hw];
        for i in 0..m {
            for p in 0..hw {
                z[(i * c + labels[i * hw + p] as usize) * hw + p] = 40.0;
            }
        }
        let (ce, dice) = seg_loss(&z, m, c, hw, &labels, 1.0, None).unwrap();
        println!("perfect one-hot logits: ce {ce:.3e}, dice loss {dice:.3e}");
        assert!(dice.abs() < 1e-6 && ce.abs() < 1e-6);
    }

    #[test]
    fn seg_ignored_pixels_contribute_nothing() {
        let mut g = rng(51);
        let (m, c, hw) = (2, 4, 10);
        let z = rand_vec(&mut g, m * c * hw, -2.0, 2.0);
        let labels = random_labels(&mut g, m * hw, c);
        let ignored = labels.iter().filter(|&&l| l < 0).count();
        let mut z2 = z.clone();
        for i in 0..m {
            for p in 0..hw {
                if labels[i * hw + p] < 0 {
                    for k in 0..c {
                        z2[(i * c + k) * hw + p] += 5.0 * (k as f32 + 1.0);
                    }
                }
            }
        }
        let (mut d1, mut d2) = (vec![0.0; z.len()], vec![0.0; z.len()]);
        let a = seg_loss(&z, m, c, hw, &labels, 1.0, Some(&mut d1)).unwrap();
        let b = seg_loss(&z2, m, c, hw, &labels, 1.0, Some(&mut d2)).unwrap();
        let grad_at_ignored = (0..m * c * hw)
            .filter(|&i| labels[(i / (c * hw)) * hw + i % hw] < 0)
            .map(|i| d1[i].abs())
            .fold(0.0f32, f32::max);
        let grad_diff = max_abs_diff(&d1, &d2);
        println!("{ignored} ignored pixels: losses {a:?} vs {b:?}, gradient diff {grad_diff:.3e}, max |grad| at ignored {grad_at_ignored:.3e}");
        assert!(ignored > 0);
        assert_eq!(a, b);
        assert_eq!(grad_diff, 0.0);
        assert_eq!(grad_at_ignored, 0.0);
        let all_ignored = vec![-1i64; m * hw];
        let mut d3 = vec![f32::NAN; z.len()];
        let none = seg_loss(&z, m, c, hw, &all_ignored, 1.0, Some(&mut d3)).unwrap();
        println!("no labelled pixel: losses {none:?}");
        assert_eq!(none, (0.0, 0.0));
        assert!(d3.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn losses_reject_bad_labels() {
        let z = vec![0.0f32; 2 * 3 * 4];
        let mut labels = vec![0i64; 2 * 4];
        labels[5] = 3;
        let seg = seg_loss(&z, 2, 3, 4, &labels, 1.0, None)
            .unwrap_err()
            .to_string();
        labels[5] = -2;
        let seg_neg = seg_loss(&z, 2, 3, 4, &labels, 1.0, None).is_err();
        let cls = cls_loss(&z[..6], 2, 3, &[0, -1], None, 1.0, None)
            .unwrap_err()
            .to_string();
        let cls_hi = cls_loss(&z[..6], 2, 3, &[3, 0], None, 1.0, None).is_err();
        println!("seg: {seg}; cls: {cls}");
        assert!(seg.contains("image 1, pixel 1"), "{seg}");
        assert!(seg_neg && cls_hi);
        assert!(cls.contains("bag 1"), "{cls}");
    }

    #[test]
    fn cls_loss_with_class_weights_matches_hand_computation() {
        // Two bags, two classes: logits (0, ln 3) with label 1 → p = 3/4, nll = ln(4/3);
        // logits (0, 0) with label 0 → nll = ln 2. Weights (2, 0.5):
        // loss = (0.5·ln(4/3) + 2·ln 2) / 2.5.
        let z = [0.0, 3.0f32.ln(), 0.0, 0.0];
        let labels = [1, 0];
        let w = [2.0f32, 0.5];
        let mut d = [f32::NAN; 4];
        let loss = cls_loss(&z, 2, 2, &labels, Some(&w), 1.0, Some(&mut d)).unwrap();
        let want = (0.5 * (4.0f64 / 3.0).ln() + 2.0 * 2.0f64.ln()) / 2.5;
        // d/dz = w_y·(p − y)/Σw: bag 0 (0.5/2.5)·(1/4 − 0, 3/4 − 1); bag 1 (2/2.5)·(1/2 − 1, 1/2).
        let want_d = [0.05, -0.05, -0.4, 0.4];
        let unweighted = cls_loss(&z, 2, 2, &labels, None, 1.0, None).unwrap();
        let want_unweighted = ((4.0f64 / 3.0).ln() + 2.0f64.ln()) / 2.0;
        let err = (loss as f64 - want).abs();
        let derr = rel_err(&d, &want_d);
        let uerr = (unweighted as f64 - want_unweighted).abs();
        println!("cls loss: weighted error {err:.3e}, gradient error {derr:.3e}, unweighted error {uerr:.3e}");
        assert!(err < 1e-6 && derr < 1e-6 && uerr < 1e-6);
    }

    #[test]
    fn softmax_rows_sums_to_one_and_matches_exp() {
        let z = [1.0f32, 2.0, 3.0, -1000.0, 0.0, 1000.0];
        let mut p = [0.0f32; 6];
        softmax_rows(&z, 2, 3, &mut p);
        let e = [1.0f64, 1.0f64.exp(), 2.0f64.exp()];
        let s: f64 = e.iter().sum();
        let want = [e[0] / s, e[1] / s, e[2] / s, 0.0, 0.0, 1.0];
        let err = rel_err(&p, &want);
        println!("softmax rows: error {err:.3e}");
        assert!(err < 1e-7);
    }
}
