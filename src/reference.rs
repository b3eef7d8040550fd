//! Reference operators: plain f64 loops written straight from the math (PyTorch semantics), the truth the CPU ops and CUDA kernels are tested against.
//!
//! Nothing here is fast or clever: every forward is the defining formula as nested loops, and
//! every backward is the chain rule applied to that formula, element by element. Tensors are
//! flat NCHW (`[n, c, h, w]`) or row-major matrices (`[rows, cols]`); the backward functions
//! return fresh gradients. The tests at the bottom check each backward against central finite
//! differences of its forward, and each forward against hand-computed values.

mod network;

pub use network::{network_pass, network_pass_stored, NetworkPass, Storage};

use crate::config::{GcpMode, BN_EPS, BN_MOMENTUM};
use crate::cpu::ops::Dims;

/// Gradients of a layer with weights and bias (convolution or linear).
#[derive(Clone, Debug)]
pub struct Grads {
    /// With respect to the input, shaped as the input.
    pub dx: Vec<f64>,
    /// With respect to the weights, shaped as the weights.
    pub dw: Vec<f64>,
    /// With respect to the bias.
    pub db: Vec<f64>,
}

/// k×k convolution (k odd), stride 1, zero padding k/2, with bias: x [n, cin, h, w] (xd),
/// w [cout, cin, k, k], b [cout] → y [n, cout, h, w]:
/// y[i,o,oy,ox] = b[o] + Σ_{c,ky,kx} w[o,c,ky,kx] · x[i, c, oy + ky − k/2, ox + kx − k/2].
fn conv_forward(x: &[f64], xd: Dims, w: &[f64], b: &[f64], cout: usize, k: usize) -> Vec<f64> {
    check_conv(x, xd, w, cout, k);
    assert_eq!(b.len(), cout, "conv: bias length");
    let mut y = vec![0.0; xd.n * cout * xd.hw()];
    for i in 0..xd.n {
        for o in 0..cout {
            for oy in 0..xd.h {
                for ox in 0..xd.w {
                    let mut s = b[o];
                    for c in 0..xd.c {
                        for ky in 0..k {
                            for kx in 0..k {
                                if let Some((sy, sx)) = source(xd, oy, ox, ky, kx, k) {
                                    s += w[((o * xd.c + c) * k + ky) * k + kx]
                                        * x[((i * xd.c + c) * xd.h + sy) * xd.w + sx];
                                }
                            }
                        }
                    }
                    y[((i * cout + o) * xd.h + oy) * xd.w + ox] = s;
                }
            }
        }
    }
    y
}

/// Gradients of [`conv_forward`] for dy [n, cout, h, w]: every term w·x of every output adds
/// dy·x to its weight, dy·w to its input, and dy to the output's bias.
fn conv_backward(x: &[f64], xd: Dims, w: &[f64], dy: &[f64], cout: usize, k: usize) -> Grads {
    check_conv(x, xd, w, cout, k);
    assert_eq!(dy.len(), xd.n * cout * xd.hw(), "conv backward: dy length");
    let mut g = Grads {
        dx: vec![0.0; x.len()],
        dw: vec![0.0; w.len()],
        db: vec![0.0; cout],
    };
    for i in 0..xd.n {
        for o in 0..cout {
            for oy in 0..xd.h {
                for ox in 0..xd.w {
                    let d = dy[((i * cout + o) * xd.h + oy) * xd.w + ox];
                    g.db[o] += d;
                    for c in 0..xd.c {
                        for ky in 0..k {
                            for kx in 0..k {
                                if let Some((sy, sx)) = source(xd, oy, ox, ky, kx, k) {
                                    let wi = ((o * xd.c + c) * k + ky) * k + kx;
                                    let xi = ((i * xd.c + c) * xd.h + sy) * xd.w + sx;
                                    g.dw[wi] += d * x[xi];
                                    g.dx[xi] += d * w[wi];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    g
}

/// The input pixel tap (ky, kx) of a k×k kernel reads for output (oy, ox), None in the padding.
fn source(
    xd: Dims,
    oy: usize,
    ox: usize,
    ky: usize,
    kx: usize,
    k: usize,
) -> Option<(usize, usize)> {
    let (sy, sx) = ((oy + ky).checked_sub(k / 2)?, (ox + kx).checked_sub(k / 2)?);
    (sy < xd.h && sx < xd.w).then_some((sy, sx))
}

fn check_conv(x: &[f64], xd: Dims, w: &[f64], cout: usize, k: usize) {
    assert_eq!(x.len(), xd.len(), "conv: x does not match its dims");
    assert_eq!(w.len(), cout * xd.c * k * k, "conv: weight length");
}

/// 3×3 convolution, stride 1, zero padding 1, with bias: x [n, cin, h, w] (xd),
/// w [cout, cin, 3, 3], b [cout] → [n, cout, h, w].
pub fn conv3x3_forward(x: &[f64], xd: Dims, w: &[f64], b: &[f64], cout: usize) -> Vec<f64> {
    conv_forward(x, xd, w, b, cout, 3)
}

/// Gradients of [`conv3x3_forward`] for dy [n, cout, h, w].
pub fn conv3x3_backward(x: &[f64], xd: Dims, w: &[f64], dy: &[f64], cout: usize) -> Grads {
    conv_backward(x, xd, w, dy, cout, 3)
}

/// 1×1 convolution with bias: w [cout, cin], x [n, cin, h, w] → [n, cout, h, w].
pub fn conv1x1_forward(x: &[f64], xd: Dims, w: &[f64], b: &[f64], cout: usize) -> Vec<f64> {
    conv_forward(x, xd, w, b, cout, 1)
}

/// Gradients of [`conv1x1_forward`] for dy [n, cout, h, w].
pub fn conv1x1_backward(x: &[f64], xd: Dims, w: &[f64], dy: &[f64], cout: usize) -> Grads {
    conv_backward(x, xd, w, dy, cout, 1)
}

/// Linear layer y = x·wᵀ + b: x [m, fin], w [fout, fin], b [fout] → [m, fout].
pub fn linear_forward(
    x: &[f64],
    m: usize,
    fin: usize,
    w: &[f64],
    b: &[f64],
    fout: usize,
) -> Vec<f64> {
    check_linear(x, m, fin, w, fout);
    assert_eq!(b.len(), fout, "linear: bias length");
    let mut y = vec![0.0; m * fout];
    for r in 0..m {
        for o in 0..fout {
            let mut s = b[o];
            for i in 0..fin {
                s += x[r * fin + i] * w[o * fin + i];
            }
            y[r * fout + o] = s;
        }
    }
    y
}

/// Gradients of [`linear_forward`] for dy [m, fout]: dx = dy·w, dw = dyᵀ·x, db = Σ_rows dy.
pub fn linear_backward(
    x: &[f64],
    m: usize,
    fin: usize,
    w: &[f64],
    dy: &[f64],
    fout: usize,
) -> Grads {
    check_linear(x, m, fin, w, fout);
    assert_eq!(dy.len(), m * fout, "linear: dy length");
    let mut g = Grads {
        dx: vec![0.0; m * fin],
        dw: vec![0.0; fout * fin],
        db: vec![0.0; fout],
    };
    for r in 0..m {
        for o in 0..fout {
            let d = dy[r * fout + o];
            g.db[o] += d;
            for i in 0..fin {
                g.dw[o * fin + i] += d * x[r * fin + i];
                g.dx[r * fin + i] += d * w[o * fin + i];
            }
        }
    }
    g
}

fn check_linear(x: &[f64], m: usize, fin: usize, w: &[f64], fout: usize) {
    assert_eq!(x.len(), m * fin, "linear: x is not [m, fin]");
    assert_eq!(w.len(), fout * fin, "linear: weight is not [fout, fin]");
}

/// What training-mode BatchNorm computed: its output and the batch statistics.
#[derive(Clone, Debug)]
pub struct BnBatch {
    /// γ·(x − mean)/sqrt(var + eps) + β.
    pub y: Vec<f64>,
    /// Per-channel mean over the n·hw values of the batch.
    pub mean: Vec<f64>,
    /// Per-channel biased variance (divided by n·hw), the one that normalises.
    pub var: Vec<f64>,
}

/// Gradients of training-mode BatchNorm.
#[derive(Clone, Debug)]
pub struct BnGrads {
    pub dx: Vec<f64>,
    pub dgamma: Vec<f64>,
    pub dbeta: Vec<f64>,
}

/// The flat indices of channel `ch`'s values in x [n, c, hw].
fn channel(len: usize, c: usize, hw: usize, ch: usize) -> impl Iterator<Item = usize> {
    let n = len / (c * hw).max(1);
    (0..n).flat_map(move |i| (0..hw).map(move |p| (i * c + ch) * hw + p))
}

fn check_bn(x: &[f64], c: usize, hw: usize, per_channel: &[usize]) {
    assert!(c > 0 && hw > 0, "batchnorm: c and hw must be positive");
    assert!(
        x.len().is_multiple_of(c * hw),
        "batchnorm: x is not [n, c, hw]"
    );
    for &len in per_channel {
        assert_eq!(
            len, c,
            "batchnorm: a per-channel buffer does not have {c} entries"
        );
    }
}

/// Training-mode BatchNorm over x [n, c, hw] (BatchNorm1d is hw = 1) with batch statistics:
/// per channel, mean and biased variance over its n·hw values, y = γ·(x − mean)/sqrt(var + eps) + β.
pub fn bn_train_forward(x: &[f64], c: usize, hw: usize, gamma: &[f64], beta: &[f64]) -> BnBatch {
    check_bn(x, c, hw, &[gamma.len(), beta.len()]);
    let cnt = (x.len() / c) as f64;
    let mut out = BnBatch {
        y: vec![0.0; x.len()],
        mean: vec![0.0; c],
        var: vec![0.0; c],
    };
    for ch in 0..c {
        let mean = channel(x.len(), c, hw, ch).map(|i| x[i]).sum::<f64>() / cnt;
        let var = channel(x.len(), c, hw, ch)
            .map(|i| (x[i] - mean).powi(2))
            .sum::<f64>()
            / cnt;
        let sd = (var + BN_EPS as f64).sqrt();
        for i in channel(x.len(), c, hw, ch) {
            out.y[i] = gamma[ch] * (x[i] - mean) / sd + beta[ch];
        }
        out.mean[ch] = mean;
        out.var[ch] = var;
    }
    out
}

/// Gradients of [`bn_train_forward`] for dy, with the statistics it returned. Per channel, with
/// N values, sd = sqrt(var + eps) and x̂ = (x − mean)/sd: dβ = Σ dy, dγ = Σ dy·x̂,
/// dx = γ/(N·sd) · (N·dy − dβ − x̂·dγ) (the mean and variance depend on every x).
pub fn bn_train_backward(
    x: &[f64],
    c: usize,
    hw: usize,
    gamma: &[f64],
    batch: &BnBatch,
    dy: &[f64],
) -> BnGrads {
    check_bn(x, c, hw, &[gamma.len(), batch.mean.len(), batch.var.len()]);
    assert_eq!(dy.len(), x.len(), "batchnorm backward: dy length");
    let cnt = (x.len() / c) as f64;
    let mut g = BnGrads {
        dx: vec![0.0; x.len()],
        dgamma: vec![0.0; c],
        dbeta: vec![0.0; c],
    };
    for (ch, &gamma) in gamma.iter().enumerate() {
        let sd = (batch.var[ch] + BN_EPS as f64).sqrt();
        let xhat = |i: usize| (x[i] - batch.mean[ch]) / sd;
        let dbeta: f64 = channel(x.len(), c, hw, ch).map(|i| dy[i]).sum();
        let dgamma: f64 = channel(x.len(), c, hw, ch).map(|i| dy[i] * xhat(i)).sum();
        for i in channel(x.len(), c, hw, ch) {
            g.dx[i] = gamma / (cnt * sd) * (cnt * dy[i] - dbeta - xhat(i) * dgamma);
        }
        g.dgamma[ch] = dgamma;
        g.dbeta[ch] = dbeta;
    }
    g
}

/// PyTorch's running-statistics update after a training step over `cnt` values per channel
/// (momentum BN_MOMENTUM; the running variance takes the unbiased batch variance):
/// rm ← (1 − m)·rm + m·mean, rv ← (1 − m)·rv + m·var·cnt/(cnt − 1). Returns (rm, rv).
pub fn bn_running_update(
    running_mean: &[f64],
    running_var: &[f64],
    batch: &BnBatch,
    cnt: usize,
) -> (Vec<f64>, Vec<f64>) {
    assert!(
        cnt >= 2,
        "batchnorm: the unbiased variance needs at least 2 values per channel"
    );
    let m = BN_MOMENTUM as f64;
    let rm = running_mean
        .iter()
        .zip(&batch.mean)
        .map(|(r, v)| (1.0 - m) * r + m * v);
    let unbiased = |v: f64| v * cnt as f64 / (cnt - 1) as f64;
    let rv = running_var
        .iter()
        .zip(&batch.var)
        .map(|(r, &v)| (1.0 - m) * r + m * unbiased(v));
    (rm.collect(), rv.collect())
}

/// Evaluation-mode BatchNorm over x [n, c, hw] with the running statistics:
/// y = γ·(x − rm)/sqrt(rv + eps) + β.
pub fn bn_eval_forward(
    x: &[f64],
    c: usize,
    hw: usize,
    gamma: &[f64],
    beta: &[f64],
    running_mean: &[f64],
    running_var: &[f64],
) -> Vec<f64> {
    check_bn(
        x,
        c,
        hw,
        &[
            gamma.len(),
            beta.len(),
            running_mean.len(),
            running_var.len(),
        ],
    );
    let mut y = vec![0.0; x.len()];
    for ch in 0..c {
        let sd = (running_var[ch] + BN_EPS as f64).sqrt();
        for i in channel(x.len(), c, hw, ch) {
            y[i] = gamma[ch] * (x[i] - running_mean[ch]) / sd + beta[ch];
        }
    }
    y
}

/// max(x, 0) elementwise.
pub fn relu_forward(x: &[f64]) -> Vec<f64> {
    x.iter().map(|&v| v.max(0.0)).collect()
}

/// Gradient of [`relu_forward`]: dy where x > 0, else 0 (PyTorch's choice at 0).
pub fn relu_backward(x: &[f64], dy: &[f64]) -> Vec<f64> {
    assert_eq!(
        x.len(),
        dy.len(),
        "relu backward: x and dy differ in length"
    );
    x.iter()
        .zip(dy)
        .map(|(&v, &d)| if v > 0.0 { d } else { 0.0 })
        .collect()
}

/// The first maximum of the 2×2 window (oy, ox) of plane p in row-major window order, as an
/// index into x.
fn window_argmax(x: &[f64], xd: Dims, p: usize, oy: usize, ox: usize) -> usize {
    let mut best = p * xd.hw() + 2 * oy * xd.w + 2 * ox;
    for (dy, dx) in [(0, 1), (1, 0), (1, 1)] {
        let i = p * xd.hw() + (2 * oy + dy) * xd.w + 2 * ox + dx;
        if x[i] > x[best] {
            best = i;
        }
    }
    best
}

/// 2×2 max-pool, stride 2: x [n, c, h, w] → [n, c, h/2, w/2] (an odd last row or column is
/// dropped, as PyTorch's floor mode).
pub fn maxpool2x2_forward(x: &[f64], xd: Dims) -> Vec<f64> {
    assert_eq!(x.len(), xd.len(), "maxpool: x does not match its dims");
    let (oh, ow) = (xd.h / 2, xd.w / 2);
    let mut y = Vec::with_capacity(xd.n * xd.c * oh * ow);
    for p in 0..xd.n * xd.c {
        for oy in 0..oh {
            for ox in 0..ow {
                y.push(x[window_argmax(x, xd, p, oy, ox)]);
            }
        }
    }
    y
}

/// Gradient of [`maxpool2x2_forward`]: each dy goes to the first maximum of its window
/// (row-major window order: top-left, top-right, bottom-left, bottom-right); 0 elsewhere.
pub fn maxpool2x2_backward(x: &[f64], xd: Dims, dy: &[f64]) -> Vec<f64> {
    assert_eq!(x.len(), xd.len(), "maxpool: x does not match its dims");
    let (oh, ow) = (xd.h / 2, xd.w / 2);
    assert_eq!(
        dy.len(),
        xd.n * xd.c * oh * ow,
        "maxpool backward: dy length"
    );
    let mut dx = vec![0.0; x.len()];
    for p in 0..xd.n * xd.c {
        for oy in 0..oh {
            for ox in 0..ow {
                dx[window_argmax(x, xd, p, oy, ox)] += dy[(p * oh + oy) * ow + ox];
            }
        }
    }
    dx
}

/// The two source indices and weights of output coordinate `dst` of a ×2 bilinear upsampling
/// along an axis of `len` inputs, as PyTorch with align_corners=False: src = (dst + 0.5)/2 − 0.5
/// clamped at 0 below, i0 = ⌊src⌋, i1 = min(i0 + 1, len − 1), weights (1 − λ, λ) with λ = src − i0.
fn upsample_taps(dst: usize, len: usize) -> [(usize, f64); 2] {
    let src = ((dst as f64 + 0.5) / 2.0 - 0.5).max(0.0);
    let i0 = src.floor() as usize;
    let lambda = src - i0 as f64;
    [(i0, 1.0 - lambda), ((i0 + 1).min(len - 1), lambda)]
}

/// Bilinear ×2 upsampling (align_corners=False): x [n, c, h, w] → [n, c, 2h, 2w].
pub fn upsample2x_forward(x: &[f64], xd: Dims) -> Vec<f64> {
    assert_eq!(x.len(), xd.len(), "upsample: x does not match its dims");
    let (h, w) = (xd.h, xd.w);
    let mut y = vec![0.0; 4 * xd.len()];
    for p in 0..xd.n * xd.c {
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                let mut s = 0.0;
                for (iy, wy) in upsample_taps(oy, h) {
                    for (ix, wx) in upsample_taps(ox, w) {
                        s += wy * wx * x[(p * h + iy) * w + ix];
                    }
                }
                y[(p * 2 * h + oy) * 2 * w + ox] = s;
            }
        }
    }
    y
}

/// Gradient of [`upsample2x_forward`] for dy [n, c, 2h, 2w] → dx [xd]: each output's gradient
/// goes back to its four taps with their weights.
pub fn upsample2x_backward(dy: &[f64], xd: Dims) -> Vec<f64> {
    assert_eq!(dy.len(), 4 * xd.len(), "upsample backward: dy length");
    let (h, w) = (xd.h, xd.w);
    let mut dx = vec![0.0; xd.len()];
    for p in 0..xd.n * xd.c {
        for oy in 0..2 * h {
            for ox in 0..2 * w {
                let d = dy[(p * 2 * h + oy) * 2 * w + ox];
                for (iy, wy) in upsample_taps(oy, h) {
                    for (ix, wx) in upsample_taps(ox, w) {
                        dx[(p * h + iy) * w + ix] += wy * wx * d;
                    }
                }
            }
        }
    }
    dx
}

/// Channel concatenation of `parts` ([n, c_i, hw] each, in order) → [n, Σ c_i, hw].
pub fn concat_channels(parts: &[(&[f64], usize)], n: usize, hw: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n * hw * parts.iter().map(|p| p.1).sum::<usize>());
    for i in 0..n {
        for &(data, c) in parts {
            assert_eq!(
                data.len(),
                n * c * hw,
                "concat: a part does not have {c} channels"
            );
            out.extend_from_slice(&data[i * c * hw..(i + 1) * c * hw]);
        }
    }
    out
}

/// Splits x [n, Σ c_i, hw] into parts [n, c_i, hw]: the inverse of [`concat_channels`], and so
/// its backward (the gradient of each part is its slice of the gradient of the concatenation).
pub fn split_channels(x: &[f64], n: usize, hw: usize, channels: &[usize]) -> Vec<Vec<f64>> {
    let total: usize = channels.iter().sum();
    assert_eq!(x.len(), n * total * hw, "split: x is not [n, Σc, hw]");
    let mut parts: Vec<Vec<f64>> = channels
        .iter()
        .map(|&c| Vec::with_capacity(n * c * hw))
        .collect();
    for i in 0..n {
        let mut c0 = 0;
        for (part, &c) in parts.iter_mut().zip(channels) {
            part.extend_from_slice(&x[(i * total + c0) * hw..(i * total + c0 + c) * hw]);
            c0 += c;
        }
    }
    parts
}

/// The rows of one bag's column j of x [rows, k], first to last.
fn bag_column(
    x: &[f64],
    k: usize,
    (start, len): (usize, usize),
    j: usize,
) -> impl Iterator<Item = f64> + '_ {
    (start..start + len).map(move |r| x[r * k + j])
}

/// Global contrast pooling over the instances of each bag: bag b is rows bags[b].0 ..
/// bags[b].0 + bags[b].1 of x [rows, k]; out [bags, k] is, per column, max − mean, max or mean
/// over the bag's rows.
pub fn gcp_forward(x: &[f64], k: usize, bags: &[(usize, usize)], mode: GcpMode) -> Vec<f64> {
    let mut out = Vec::with_capacity(bags.len() * k);
    for &bag in bags {
        assert!(
            bag.1 > 0 && (bag.0 + bag.1) * k <= x.len(),
            "gcp: bag {bag:?} is empty or out of range"
        );
        for j in 0..k {
            let max = bag_column(x, k, bag, j).fold(f64::NEG_INFINITY, f64::max);
            let mean = bag_column(x, k, bag, j).sum::<f64>() / bag.1 as f64;
            out.push(match mode {
                GcpMode::MaxMinusMean => max - mean,
                GcpMode::Max => max,
                GcpMode::Mean => mean,
            });
        }
    }
    out
}

/// Gradient of [`gcp_forward`] for dout [bags, k] → dx shaped as x: per bag of n rows and
/// column, d(max)/dx is 1 at the first maximum and 0 elsewhere, d(mean)/dx is 1/n, so
/// max − mean gives [row = first argmax] − 1/n. Rows in no bag get 0.
pub fn gcp_backward(
    x: &[f64],
    k: usize,
    bags: &[(usize, usize)],
    mode: GcpMode,
    dout: &[f64],
) -> Vec<f64> {
    assert_eq!(dout.len(), bags.len() * k, "gcp backward: dout length");
    let mut dx = vec![0.0; x.len()];
    for (b, &bag) in bags.iter().enumerate() {
        let (start, len) = bag;
        for j in 0..k {
            let mut first_max = start;
            for r in start..start + len {
                if x[r * k + j] > x[first_max * k + j] {
                    first_max = r;
                }
            }
            let (at_max, mean) = match mode {
                GcpMode::MaxMinusMean => (1.0, -1.0 / len as f64),
                GcpMode::Max => (1.0, 0.0),
                GcpMode::Mean => (0.0, 1.0 / len as f64),
            };
            for r in start..start + len {
                let here = if r == first_max { at_max } else { 0.0 };
                dx[r * k + j] += (here + mean) * dout[b * k + j];
            }
        }
    }
    dx
}

/// The index of the first maximum over the c channels of each pixel of x [n, c, hw] → [n, hw].
pub fn argmax_channels(x: &[f64], c: usize, hw: usize) -> Vec<usize> {
    assert!(
        c > 0 && x.len().is_multiple_of(c * hw.max(1)),
        "argmax: x is not [n, c, hw]"
    );
    let n = x.len() / (c * hw.max(1));
    let mut out = Vec::with_capacity(n * hw);
    for i in 0..n {
        for p in 0..hw {
            let at = |k: usize| x[(i * c + k) * hw + p];
            out.push((1..c).fold(0, |best, k| if at(k) > at(best) { k } else { best }));
        }
    }
    out
}

/// Softmax of one vector of logits.
fn softmax(z: &[f64]) -> Vec<f64> {
    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// The segmentation losses and the gradient of their sum.
#[derive(Clone, Debug)]
pub struct SegLoss {
    /// Mean over the labelled pixels of −log softmax(z)[label].
    pub ce: f64,
    /// 1 − mean over the classes 1..c of (2 Σ p·y + 1)/(Σ p + Σ y + 1).
    pub dice: f64,
    /// d(ce + dice)/dlogits, 0 at ignored pixels.
    pub dlogits: Vec<f64>,
}

/// Segmentation loss over logits [m, c, hw] and labels [m, hw] (0..c, −1 = ignore). With
/// p = softmax over the classes of a pixel and y its one-hot label, over the N labelled pixels
/// of the whole batch: ce = (1/N) Σ −log p[label]; per foreground class k = 1..c,
/// dice_k = (2 Σ p_k y_k + 1)/(Σ p_k + Σ y_k + 1), and dice = 1 − mean_k dice_k. With no
/// labelled pixel both are 0. The gradient: dce/dz = (p − y)/N; with g_k = d dice/d p_k =
/// −(2 y_k/den_k − num_k/den_k²)/(c − 1) (g_0 = 0), d dice/dz_j = p_j·(g_j − Σ_k p_k g_k).
pub fn seg_loss(logits: &[f64], m: usize, c: usize, hw: usize, labels: &[i64]) -> SegLoss {
    assert!(c >= 2, "seg loss: needs at least 2 classes");
    assert_eq!(
        logits.len(),
        m * c * hw,
        "seg loss: logits are not [m, c, hw]"
    );
    assert_eq!(labels.len(), m * hw, "seg loss: labels are not [m, hw]");
    let pixel = |i: usize, p: usize| -> Vec<f64> {
        softmax(
            &(0..c)
                .map(|k| logits[(i * c + k) * hw + p])
                .collect::<Vec<_>>(),
        )
    };
    let onehot = |l: i64, k: usize| if l == k as i64 { 1.0 } else { 0.0 };
    let (mut ce, mut count) = (0.0, 0.0);
    let (mut inter, mut psum, mut ysum) = (vec![0.0; c], vec![0.0; c], vec![0.0; c]);
    for i in 0..m {
        for p in 0..hw {
            let l = labels[i * hw + p];
            assert!(
                (-1..c as i64).contains(&l),
                "seg loss: label {l} is not −1 (ignore) or a class 0..={}",
                c - 1
            );
            if l < 0 {
                continue;
            }
            let q = pixel(i, p);
            ce -= q[l as usize].ln();
            count += 1.0;
            for k in 0..c {
                inter[k] += q[k] * onehot(l, k);
                psum[k] += q[k];
                ysum[k] += onehot(l, k);
            }
        }
    }
    let mut out = SegLoss {
        ce: 0.0,
        dice: 0.0,
        dlogits: vec![0.0; logits.len()],
    };
    if count == 0.0 {
        return out;
    }
    let fg = (c - 1) as f64;
    let num: Vec<f64> = inter.iter().map(|v| 2.0 * v + 1.0).collect();
    let den: Vec<f64> = (0..c).map(|k| psum[k] + ysum[k] + 1.0).collect();
    out.ce = ce / count;
    out.dice = 1.0 - (1..c).map(|k| num[k] / den[k]).sum::<f64>() / fg;
    for i in 0..m {
        for p in 0..hw {
            let l = labels[i * hw + p];
            if l < 0 {
                continue;
            }
            let q = pixel(i, p);
            let g: Vec<f64> = (0..c)
                .map(|k| match k {
                    0 => 0.0,
                    _ => -(2.0 * onehot(l, k) / den[k] - num[k] / (den[k] * den[k])) / fg,
                })
                .collect();
            let qg: f64 = q.iter().zip(&g).map(|(a, b)| a * b).sum();
            for j in 0..c {
                let dce = (q[j] - onehot(l, j)) / count;
                out.dlogits[(i * c + j) * hw + p] = dce + q[j] * (g[j] - qg);
            }
        }
    }
    out
}

/// Classification cross-entropy over logits [b, c] and labels [b] (0..c), with optional class
/// weights w [c] as PyTorch: loss = Σ_i w[y_i]·(−log softmax(z_i)[y_i]) / Σ_i w[y_i] (the plain
/// mean without weights). Returns (loss, dloss/dlogits), the gradient being
/// w[y_i]·(p_i − onehot(y_i))/Σ w.
pub fn cls_loss(
    logits: &[f64],
    b: usize,
    c: usize,
    labels: &[i64],
    weights: Option<&[f64]>,
) -> (f64, Vec<f64>) {
    assert_eq!(logits.len(), b * c, "cls loss: logits are not [b, c]");
    assert_eq!(labels.len(), b, "cls loss: one label per bag");
    let weight = |l: usize| weights.map_or(1.0, |w| w[l]);
    let wsum: f64 = labels.iter().map(|&l| weight(l as usize)).sum();
    let (mut loss, mut d) = (0.0, vec![0.0; b * c]);
    for (i, &l) in labels.iter().enumerate() {
        let l = l as usize;
        let q = softmax(&logits[i * c..(i + 1) * c]);
        loss += weight(l) * -q[l].ln();
        for k in 0..c {
            let y = if k == l { 1.0 } else { 0.0 };
            d[i * c + k] = weight(l) * (q[k] - y) / wsum;
        }
    }
    (loss / wsum, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ops::tensor::test_support::rel_err;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rand_vec(g: &mut ChaCha8Rng, len: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..len).map(|_| g.gen_range(lo..hi)).collect()
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Central differences of f at x with step h.
    fn fd_grad(f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64) -> Vec<f64> {
        let mut t = x.to_vec();
        (0..x.len())
            .map(|i| {
                let v = t[i];
                t[i] = v + h;
                let up = f(&t);
                t[i] = v - h;
                let down = f(&t);
                t[i] = v;
                (up - down) / (2.0 * h)
            })
            .collect()
    }

    /// Checks `analytic` against the finite-difference gradient of f at x, printing the error.
    fn check(what: &str, analytic: &[f64], f: impl Fn(&[f64]) -> f64, x: &[f64], h: f64, tol: f64) {
        let err = rel_err(analytic, &fd_grad(f, x, h));
        println!(
            "{what}: backward vs central differences, rel err {err:.2e} (tolerance {tol:.0e})"
        );
        assert!(err < tol, "{what}: {err}");
    }

    /// Step and tolerance of the smooth ops: central differences err by O(h²) ≈ 1e-10 and
    /// round off by O(1e-16/h) ≈ 1e-11.
    const H: f64 = 1e-5;
    const TOL: f64 = 1e-7;

    /// Checks the named gradients of f with respect to its three arguments against f's
    /// central differences at `args`, with the smooth ops' step and tolerance.
    fn check_args(
        what: &str,
        [(nx, dx), (nw, dw), (nb, db)]: [(&str, &[f64]); 3],
        f: impl Fn(&[f64], &[f64], &[f64]) -> f64,
        [x, w, b]: [&[f64]; 3],
    ) {
        check(&format!("{what} {nx}"), dx, |t| f(t, w, b), x, H, TOL);
        check(&format!("{what} {nw}"), dw, |t| f(x, t, b), w, H, TOL);
        check(&format!("{what} {nb}"), db, |t| f(x, w, t), b, H, TOL);
    }

    /// A layer's gradients with their names, for [`check_args`].
    fn named(g: &Grads) -> [(&'static str, &[f64]); 3] {
        [("dx", &g.dx), ("dw", &g.dw), ("db", &g.db)]
    }

    #[test]
    fn conv_backward_matches_finite_differences() {
        let mut g = ChaCha8Rng::seed_from_u64(1);
        for (ks, d, cout) in [
            (3, Dims::new(2, 3, 4, 5), 2),
            (3, Dims::new(1, 2, 1, 3), 3),
            (1, Dims::new(2, 3, 3, 2), 4),
        ] {
            let x = rand_vec(&mut g, d.len(), -1.0, 1.0);
            let w = rand_vec(&mut g, cout * d.c * ks * ks, -1.0, 1.0);
            let b = rand_vec(&mut g, cout, -1.0, 1.0);
            let r = rand_vec(&mut g, d.n * cout * d.hw(), -1.0, 1.0);
            let fwd = |x: &[f64], w: &[f64], b: &[f64]| conv_forward(x, d, w, b, cout, ks);
            let grads = if ks == 3 {
                conv3x3_backward(&x, d, &w, &r, cout)
            } else {
                conv1x1_backward(&x, d, &w, &r, cout)
            };
            let what = format!("conv{ks}x{ks} {d:?} → {cout}");
            let f = |x: &[f64], w: &[f64], b: &[f64]| dot(&r, &fwd(x, w, b));
            check_args(&what, named(&grads), f, [&x, &w, &b]);
        }
    }

    #[test]
    fn conv_forward_with_a_one_hot_kernel_shifts_the_image() {
        // The kernel that picks tap (ky, kx) = (0, 2) reads x[oy − 1, ox + 1]: the image moves
        // one row down and one column left, zeros entering from the padding.
        let d = Dims::new(1, 1, 3, 4);
        let x: Vec<f64> = (1..=12).map(f64::from).collect();
        let mut w = vec![0.0; 9];
        w[2] = 1.0;
        let y = conv3x3_forward(&x, d, &w, &[0.5], 1);
        let want = [
            0.0, 0.0, 0.0, 0.0, //
            2.0, 3.0, 4.0, 0.0, //
            6.0, 7.0, 8.0, 0.0,
        ]
        .map(|v| v + 0.5);
        let err = rel_err(&y, &want);
        println!("one-hot 3×3 kernel: y {y:?}, error {err:.1e}");
        assert_eq!(err, 0.0);
        let y1 = conv1x1_forward(&x, Dims::new(1, 2, 3, 2), &[2.0, -1.0], &[1.0], 1);
        let want1: Vec<f64> = (0..6).map(|p| 2.0 * x[p] - x[6 + p] + 1.0).collect();
        println!("1×1 conv as a channel mix: {y1:?}");
        assert_eq!(y1, want1);
    }

    #[test]
    fn linear_backward_matches_finite_differences() {
        let mut g = ChaCha8Rng::seed_from_u64(2);
        for (m, fin, fout) in [(1, 1, 1), (3, 5, 2), (4, 0, 3)] {
            let x = rand_vec(&mut g, m * fin, -1.0, 1.0);
            let w = rand_vec(&mut g, fout * fin, -1.0, 1.0);
            let b = rand_vec(&mut g, fout, -1.0, 1.0);
            let r = rand_vec(&mut g, m * fout, -1.0, 1.0);
            let grads = linear_backward(&x, m, fin, &w, &r, fout);
            let f =
                |x: &[f64], w: &[f64], b: &[f64]| dot(&r, &linear_forward(x, m, fin, w, b, fout));
            let what = format!("linear {m}×{fin}→{fout}");
            check_args(&what, named(&grads), f, [&x, &w, &b]);
        }
        let y = linear_forward(&[1.0, 2.0], 1, 2, &[3.0, -1.0, 0.5, 0.25], &[10.0, 0.0], 2);
        println!("linear [1, 2]·[[3, −1], [0.5, 0.25]]ᵀ + [10, 0] = {y:?}");
        assert_eq!(y, [11.0, 1.0]);
    }

    #[test]
    fn bn_train_backward_matches_finite_differences() {
        let mut g = ChaCha8Rng::seed_from_u64(3);
        for (n, c, hw) in [(3, 2, 5), (6, 1, 1), (4, 5, 1)] {
            let x = rand_vec(&mut g, n * c * hw, -2.0, 2.0);
            let gamma = rand_vec(&mut g, c, 0.5, 1.5);
            let beta = rand_vec(&mut g, c, -0.3, 0.3);
            let r = rand_vec(&mut g, x.len(), -1.0, 1.0);
            let batch = bn_train_forward(&x, c, hw, &gamma, &beta);
            let grads = bn_train_backward(&x, c, hw, &gamma, &batch, &r);
            let f =
                |x: &[f64], ga: &[f64], be: &[f64]| dot(&r, &bn_train_forward(x, c, hw, ga, be).y);
            let what = format!("bn train n{n} c{c} hw{hw}");
            let g = &grads;
            let named = [
                ("dx", &g.dx[..]),
                ("dgamma", &g.dgamma),
                ("dbeta", &g.dbeta),
            ];
            check_args(&what, named, f, [&x, &gamma, &beta]);
        }
    }

    #[test]
    fn bn_forward_matches_closed_forms() {
        // Train mode: each channel of y has mean β and variance γ²·var/(var + eps); eval mode
        // with the batch's own statistics as running statistics gives the same y; the running
        // update follows PyTorch's formula, written out here (momentum 0.1 as the config's f32).
        let mom = BN_MOMENTUM as f64;
        let mut g = ChaCha8Rng::seed_from_u64(4);
        let (n, c, hw) = (4, 3, 10);
        let x = rand_vec(&mut g, n * c * hw, -1.0, 3.0);
        let (gamma, beta) = ([0.5, 2.0, 1.5], [1.0, -2.0, 0.25]);
        let batch = bn_train_forward(&x, c, hw, &gamma, &beta);
        let eval = bn_eval_forward(&x, c, hw, &gamma, &beta, &batch.mean, &batch.var);
        let (rm, rv) = bn_running_update(&[0.5; 3], &[2.0; 3], &batch, n * hw);
        let mut worst = rel_err(&eval, &batch.y);
        for ch in 0..c {
            let ys: Vec<f64> = channel(x.len(), c, hw, ch).map(|i| batch.y[i]).collect();
            let xs: Vec<f64> = channel(x.len(), c, hw, ch).map(|i| x[i]).collect();
            let cnt = ys.len() as f64;
            let ym = ys.iter().sum::<f64>() / cnt;
            let yv = ys.iter().map(|v| (v - ym).powi(2)).sum::<f64>() / cnt;
            let xm = xs.iter().sum::<f64>() / cnt;
            let xss = xs.iter().map(|v| (v - xm).powi(2)).sum::<f64>();
            let var = xss / cnt;
            let errs = [
                (ym - beta[ch]).abs(),
                (yv - gamma[ch] * gamma[ch] * var / (var + 1e-5)).abs(),
                (rm[ch] - ((1.0 - mom) * 0.5 + mom * xm)).abs(),
                (rv[ch] - ((1.0 - mom) * 2.0 + mom * xss / (cnt - 1.0))).abs(),
            ];
            let shown = errs.map(|e| format!("{e:.1e}"));
            println!(
                "bn channel {ch}: errors (mean y, var y, running mean, running var) {shown:?}"
            );
            worst = errs.iter().cloned().fold(worst, f64::max);
        }
        assert!(worst < 1e-12, "bn closed forms: {worst}");
    }

    #[test]
    fn relu_and_maxpool_backward_match_finite_differences() {
        // Piecewise linear: with random inputs no kink or tie lies within h of a value.
        let mut g = ChaCha8Rng::seed_from_u64(5);
        let x = rand_vec(&mut g, 200, -1.0, 1.0);
        let r = rand_vec(&mut g, 200, -1.0, 1.0);
        check(
            "relu",
            &relu_backward(&x, &r),
            |t| dot(&r, &relu_forward(t)),
            &x,
            1e-7,
            1e-8,
        );
        for d in [Dims::new(2, 3, 4, 6), Dims::new(1, 2, 5, 3)] {
            let x = rand_vec(&mut g, d.len(), -1.0, 1.0);
            let r = rand_vec(&mut g, d.n * d.c * (d.h / 2) * (d.w / 2), -1.0, 1.0);
            let dx = maxpool2x2_backward(&x, d, &r);
            check(
                &format!("maxpool {d:?}"),
                &dx,
                |t| dot(&r, &maxpool2x2_forward(t, d)),
                &x,
                1e-7,
                1e-8,
            );
        }
    }

    #[test]
    fn maxpool_ties_go_to_the_first_maximum() {
        // One 4×4 plane, four windows: all equal; tie top-right/bottom-left; unique max
        // bottom-right; tie top-left/bottom-right.
        let x = [
            1.0, 1.0, 0.0, 5.0, //
            1.0, 1.0, 5.0, 2.0, //
            -3.0, -2.0, 7.0, 0.0, //
            -4.0, -1.0, 6.0, 7.0,
        ];
        let d = Dims::new(1, 1, 4, 4);
        let y = maxpool2x2_forward(&x, d);
        let dx = maxpool2x2_backward(&x, d, &[10.0, 20.0, 30.0, 40.0]);
        println!("maxpool ties: y {y:?}, dx {dx:?}");
        assert_eq!(y, [1.0, 5.0, -1.0, 7.0]);
        let mut want = [0.0; 16];
        (want[0], want[3], want[13], want[10]) = (10.0, 20.0, 30.0, 40.0);
        assert_eq!(dx, want);
    }

    #[test]
    fn upsample_matches_pytorch_values_and_its_backward_is_the_adjoint() {
        // PyTorch: F.interpolate([[1, 2], [3, 4]], scale_factor=2, mode="bilinear",
        // align_corners=False).
        let y = upsample2x_forward(&[1.0, 2.0, 3.0, 4.0], Dims::new(1, 1, 2, 2));
        let want = [
            1.0, 1.25, 1.75, 2.0, //
            1.5, 1.75, 2.25, 2.5, //
            2.5, 2.75, 3.25, 3.5, //
            3.0, 3.25, 3.75, 4.0,
        ];
        println!("upsample 2×2 → 4×4: {y:?}");
        assert_eq!(y, want);
        let mut g = ChaCha8Rng::seed_from_u64(6);
        for d in [
            Dims::new(1, 1, 1, 1),
            Dims::new(2, 3, 4, 1),
            Dims::new(1, 2, 3, 5),
        ] {
            let x = rand_vec(&mut g, d.len(), -1.0, 1.0);
            let r = rand_vec(&mut g, 4 * d.len(), -1.0, 1.0);
            let dx = upsample2x_backward(&r, d);
            check(
                &format!("upsample {d:?}"),
                &dx,
                |t| dot(&r, &upsample2x_forward(t, d)),
                &x,
                H,
                TOL,
            );
        }
    }

    #[test]
    fn split_inverts_concat_and_is_its_backward() {
        let mut g = ChaCha8Rng::seed_from_u64(7);
        let (n, hw, cs) = (3, 5, [2, 1, 4]);
        let parts: Vec<Vec<f64>> = cs
            .iter()
            .map(|&c| rand_vec(&mut g, n * c * hw, -1.0, 1.0))
            .collect();
        let refs: Vec<(&[f64], usize)> = parts.iter().map(|p| p.as_slice()).zip(cs).collect();
        let cat = concat_channels(&refs, n, hw);
        // Channel 2 of image 1 is channel 0 of the second part.
        let picked = &cat[(7 + 2) * hw..(7 + 3) * hw];
        assert_eq!(picked, &parts[1][hw..2 * hw]);
        let back = split_channels(&cat, n, hw, &cs);
        assert_eq!(back, parts);
        let r = rand_vec(&mut g, cat.len(), -1.0, 1.0);
        let dparts = split_channels(&r, n, hw, &cs);
        for (i, dp) in dparts.iter().enumerate() {
            let f = |t: &[f64]| {
                let with_t: Vec<(&[f64], usize)> = (refs.iter().enumerate())
                    .map(|(j, &(p, c))| (if j == i { t } else { p }, c))
                    .collect();
                dot(&r, &concat_channels(&with_t, n, hw))
            };
            check(&format!("concat part {i}"), dp, f, &parts[i], H, TOL);
        }
    }

    #[test]
    fn gcp_matches_a_hand_computed_bag_and_finite_differences() {
        // Rows 1..5 with k = 2: column 0 is (1, 4, −1, 4) (tie: the first maximum is row 2),
        // column 1 is (−2, −1, −5, −3).
        let x = [100.0, 100.0, 1.0, -2.0, 4.0, -1.0, -1.0, -5.0, 4.0, -3.0];
        for (mode, want) in [
            (GcpMode::MaxMinusMean, [2.0, 1.75]),
            (GcpMode::Max, [4.0, -1.0]),
            (GcpMode::Mean, [2.0, -2.75]),
        ] {
            let out = gcp_forward(&x, 2, &[(1, 4)], mode);
            let dx = gcp_backward(&x, 2, &[(1, 4)], mode, &[1.0, 1.0]);
            println!("gcp {mode}: {out:?}, dx {dx:?}");
            assert_eq!(out, want);
            let at_max = if mode == GcpMode::Mean { 0.0 } else { 1.0 };
            let spread = if mode == GcpMode::Max {
                0.0
            } else if mode == GcpMode::Mean {
                0.25
            } else {
                -0.25
            };
            assert_eq!(dx[4], at_max + spread);
            assert_eq!(dx[8], spread);
            assert_eq!(dx[..2], [0.0, 0.0]);
        }
        let mut g = ChaCha8Rng::seed_from_u64(8);
        let (k, bags) = (3, [(8, 2), (0, 5), (5, 1), (10, 2)]);
        for mode in [GcpMode::MaxMinusMean, GcpMode::Max, GcpMode::Mean] {
            let x = rand_vec(&mut g, 13 * k, -1.0, 1.0);
            let r = rand_vec(&mut g, bags.len() * k, -1.0, 1.0);
            let dx = gcp_backward(&x, k, &bags, mode, &r);
            check(
                &format!("gcp {mode}"),
                &dx,
                |t| dot(&r, &gcp_forward(t, k, &bags, mode)),
                &x,
                1e-7,
                1e-8,
            );
        }
    }

    #[test]
    fn seg_loss_matches_closed_forms_and_finite_differences() {
        // Uniform logits: ce = ln c. One-hot logits of size 40: ce ≈ 0 and dice ≈ 0.
        let (m, c, hw) = (2, 6, 9);
        let labels: Vec<i64> = (0..m * hw).map(|i| (i % 7) as i64 - 1).collect();
        let uniform = seg_loss(&vec![0.37; m * c * hw], m, c, hw, &labels);
        let mut z = vec![0.0; m * c * hw];
        let all: Vec<i64> = (0..m * hw).map(|i| (i * 5 % 6) as i64).collect();
        for (i, &l) in all.iter().enumerate() {
            z[(i / hw * c + l as usize) * hw + i % hw] = 40.0;
        }
        let perfect = seg_loss(&z, m, c, hw, &all);
        let none = seg_loss(&z, m, c, hw, &vec![-1; m * hw]);
        println!(
            "seg loss: uniform ce {} (ln 6 = {}), perfect ce {:.1e} dice {:.1e}, unlabelled {:?}",
            uniform.ce,
            6f64.ln(),
            perfect.ce,
            perfect.dice,
            (none.ce, none.dice)
        );
        assert!((uniform.ce - 6f64.ln()).abs() < 1e-12);
        assert!(perfect.ce < 1e-12 && perfect.dice < 1e-12);
        assert_eq!((none.ce, none.dice), (0.0, 0.0));
        assert!(none.dlogits.iter().all(|&v| v == 0.0));
        let mut g = ChaCha8Rng::seed_from_u64(9);
        for (m, c, hw) in [(1, 2, 5), (2, 6, 7), (3, 3, 4)] {
            let z = rand_vec(&mut g, m * c * hw, -2.0, 2.0);
            let labels: Vec<i64> = (0..m * hw).map(|_| g.gen_range(-1..c as i64)).collect();
            let loss = seg_loss(&z, m, c, hw, &labels);
            let f = |t: &[f64]| {
                let l = seg_loss(t, m, c, hw, &labels);
                l.ce + l.dice
            };
            check(
                &format!("seg loss m{m} c{c} hw{hw}"),
                &loss.dlogits,
                f,
                &z,
                H,
                TOL,
            );
        }
    }

    #[test]
    fn cls_loss_matches_a_hand_computation_and_finite_differences() {
        // Logits (0, ln 3) with label 1: p = 3/4, nll = ln(4/3); (0, 0) with label 0: ln 2.
        // Weights (2, 0.5): loss = (0.5·ln(4/3) + 2·ln 2)/2.5.
        let z = [0.0, 3f64.ln(), 0.0, 0.0];
        let (loss, d) = cls_loss(&z, 2, 2, &[1, 0], Some(&[2.0, 0.5]));
        let (plain, _) = cls_loss(&z, 2, 2, &[1, 0], None);
        let want = (0.5 * (4f64 / 3.0).ln() + 2.0 * 2f64.ln()) / 2.5;
        let want_plain = ((4f64 / 3.0).ln() + 2f64.ln()) / 2.0;
        let err = rel_err(
            &[loss, plain, d[0], d[1], d[2], d[3]],
            &[want, want_plain, 0.05, -0.05, -0.4, 0.4],
        );
        println!("cls loss: weighted {loss}, plain {plain}, gradient {d:?}: error {err:.1e}");
        assert!(err < 1e-15);
        let mut g = ChaCha8Rng::seed_from_u64(10);
        let (b, c, labels) = (5, 3, [0i64, 2, 1, 2, 2]);
        let z = rand_vec(&mut g, b * c, -3.0, 3.0);
        for weights in [None, Some(&[0.3, 1.0, 2.5][..])] {
            let (_, d) = cls_loss(&z, b, c, &labels, weights);
            let f = |t: &[f64]| cls_loss(t, b, c, &labels, weights).0;
            check(&format!("cls loss weights {weights:?}"), &d, f, &z, H, TOL);
        }
    }

    #[test]
    fn argmax_takes_the_first_maximum() {
        // [n = 1, c = 3, hw = 3]: pixel 0 unique max at class 2, pixel 1 tie of classes 0 and 1,
        // pixel 2 all equal.
        let x = [0.0, 1.0, 5.0, 0.0, 1.0, 5.0, 3.0, 0.5, 5.0];
        let am = argmax_channels(&x, 3, 3);
        println!("argmax: {am:?}");
        assert_eq!(am, [2, 0, 0]);
    }
}
