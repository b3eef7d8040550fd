//! Device rows: the CUDA kernels of kernels/*.cu on the emulator or a GPU against `m2unet::reference`, with tolerances derived from fp16 and fp32 rounding bounds; helpers shared by the kernel files' rows.
//!
//! Inputs the kernels read as fp16 are rounded to fp16 first and the reference gets the same
//! values, so a row measures what the kernel adds. Outputs are compared in full, padding
//! channels included (they must be exactly zero). Each tolerance is a first-order bound on
//! |got − ref| built from two constants:
//! - U16 = 2^-11, the unit roundoff of fp16 (round to nearest): storing v as fp16 errs by at
//!   most U16·|v|. ReLU and max-pool are monotone, so they commute with that rounding and the
//!   bound carries over to fused ReLU and pooled outputs.
//! - ACC = 2^-23 per fp32 addition, relative to the sum of the |terms|: twice fp32's unit
//!   roundoff, so that tensor-core accumulators that truncate instead of rounding are covered.
//!   A sum of K terms in any order (split-K and tree reductions included) errs by at most
//!   K·ACC·Σ|terms|; Σ|terms| comes from the reference run on absolute values (`abs`).
//!
//! The bound of each output element is divided by max |ref| like the error, so a row's
//! tolerance is max(bound)/max|ref| and the error can only exceed it if some element exceeds
//! its bound.
//!
//! The rows of each kernel file are in the module named after it: `conv_kernels` (conv.cu),
//! `conv_wgmma_kernels` (conv_wgmma.cu), `conv_up_kernels` (conv_up.cu), `conv_grad_kernels` (conv_grad.cu), `norm_kernels`
//! (norm.cu), `norm_grad_kernels` (norm_grad.cu), `head_kernels` (heads.cu),
//! `head_grad_kernels` (heads_grad.cu), `optim_kernels` (optim.cu); each launch's rows go
//! through a [`Launch`].

use crate::cuda_common::{nchw_to_nhwc, uniform, Guarded};
use crate::{
    conv_grad_kernels, conv_kernels, conv_up_kernels, conv_wgmma_kernels, head_grad_kernels,
    head_kernels, max_abs, max_err, norm_grad_kernels, norm_kernels, optim_kernels, Table,
};
use m2unet::cuda::{Device, DeviceKind};
use rand_chacha::ChaCha8Rng;

/// The unit roundoff of fp16.
pub const U16: f64 = 1.0 / 2048.0;
/// The error of one fp32 addition relative to the sum of the |terms| (2^-23).
pub const ACC: f64 = 1.0 / 8_388_608.0;

pub fn table(kind: DeviceKind) -> Table {
    let name = match kind {
        DeviceKind::Emu => "emu",
        DeviceKind::Gpu => "cuda",
    };
    let mut dev = Device::new(kind).expect("device");
    println!("{name}: {}", dev.describe());
    let mut t = Table::new(name);
    conv_kernels::rows(&mut dev, &mut t);
    conv_wgmma_kernels::rows(&mut dev, &mut t);
    conv_up_kernels::rows(&mut dev, &mut t);
    conv_grad_kernels::rows(&mut dev, &mut t);
    norm_kernels::rows(&mut dev, &mut t);
    norm_grad_kernels::rows(&mut dev, &mut t);
    head_kernels::rows(&mut dev, &mut t);
    head_grad_kernels::rows(&mut dev, &mut t);
    optim_kernels::rows(&mut dev, &mut t);
    t
}

/// The rows of one kernel launch: its shape, the guard bytes it overwrote and, for an NHWC
/// output, its real and padded channel counts.
pub struct Launch<'a> {
    t: &'a mut Table,
    shape: String,
    hurt: usize,
    channels: Option<(usize, usize)>,
}

impl<'a> Launch<'a> {
    /// After the launch: counts the guard bytes overwritten in `bufs`.
    pub fn new(t: &'a mut Table, shape: String, dev: &Device, bufs: &[&Guarded]) -> Self {
        let hurt = bufs.iter().map(|g| g.damage(dev)).sum();
        Launch {
            t,
            shape,
            hurt,
            channels: None,
        }
    }

    /// Outputs in NHWC with channels c..cp padding: they must be exactly zero, else the row's
    /// error is infinite.
    pub fn nhwc(mut self, c: usize, cp: usize) -> Self {
        self.channels = Some((c, cp));
        self
    }

    /// A row with its own error and tolerance.
    pub fn add(&mut self, op: &str, err: f64, tol: f64) {
        self.t.add_guarded(op, &self.shape, err, tol, self.hurt);
    }

    /// The row of output `got` against `want`, compared in full. Its tolerance is `rounding`
    /// (relative: U16 for an fp16 output, 0 for fp32) plus the absolute `bound` made relative
    /// like the error.
    pub fn output(&mut self, op: &str, got: &[f32], want: &[f64], rounding: f64, bound: f64) {
        let padding_set = |(c, cp): (usize, usize)| {
            (got.iter().enumerate()).any(|(i, &v)| i % cp >= c && v != 0.0)
        };
        let err = match self.channels {
            Some(channels) if padding_set(channels) => f64::INFINITY,
            _ => max_err(got, want),
        };
        self.add(op, err, rounding + relative(bound, want));
    }

    /// [`Launch::output`] of an NHWC launch's output against its reference in NCHW
    /// [n, c, hw].
    pub fn output_nchw(&mut self, op: &str, got: &[f32], (want, n): (&[f64], usize), bound: f64) {
        let (c, cp) = self.channels.expect("an NHWC launch");
        let want = nchw_to_nhwc(want, n, c, want.len() / (n * c), cp);
        self.output(op, got, &want, U16, bound);
    }
}

/// An absolute bound as a tolerance of `max_err`: relative to max |want| (absolute when want is
/// all zero, as the error).
pub fn relative(bound: f64, want: &[f64]) -> f64 {
    let scale = max_abs(want);
    if scale > 0.0 {
        bound / scale
    } else {
        bound
    }
}

pub fn abs(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| x.abs()).collect()
}

/// Random BatchNorm parameters of c channels: γ, β and the running mean and variance.
pub fn bn_params(r: &mut ChaCha8Rng, c: usize) -> [Vec<f32>; 4] {
    [
        uniform(r, c, 0.5, 1.5),
        uniform(r, c, -0.5, 0.5),
        uniform(r, c, -0.1, 0.1),
        uniform(r, c, 0.9, 1.1),
    ]
}
