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
//! `norm_kernels` (norm.cu), `head_kernels` (heads.cu).

use crate::cuda_common::Guarded;
use crate::{conv_kernels, head_kernels, max_abs, norm_kernels, Table};
use m2unet::cuda::{Device, DeviceKind};

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
    norm_kernels::rows(&mut dev, &mut t);
    head_kernels::rows(&mut dev, &mut t);
    t
}

/// Guard bytes overwritten in any of `bufs`.
pub fn damage(dev: &Device, bufs: &[&Guarded]) -> usize {
    bufs.iter().map(|g| g.damage(dev)).sum()
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

/// NCHW [n, c, hw] → NHWC [n, hw, cp], channels c..cp zero (the device layout). With hw = 1
/// it pads the rows of a [n, c] matrix to cp.
pub fn to_nhwc(x: &[f64], n: usize, c: usize, hw: usize, cp: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * hw * cp];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..hw {
                out[(i * hw + p) * cp + ch] = x[(i * c + ch) * hw + p];
            }
        }
    }
    out
}
