//! Helpers shared by the CUDA tests: device choice, guarded buffers, fp16 packing, the NHWC
//! layout, the normalised error mse(a,b)/mse(a,0), f32/f64 conversions, a model with random
//! BatchNorm parameters, and the PyTorch fixtures' paths.
#![allow(dead_code)]

use half::f16;
use m2unet::config::{GcpMode, ModelConfig};
use m2unet::cuda::kernels::ConvParams;
use m2unet::cuda::{DevPtr, Device, DeviceKind};
use m2unet::model::Model;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// The emulator, always; the tests run on a GPU instead when M2UNET_TEST_DEVICE=cuda.
pub fn device_kind() -> DeviceKind {
    match std::env::var("M2UNET_TEST_DEVICE").as_deref() {
        Ok("cuda") => DeviceKind::Gpu,
        _ => DeviceKind::Emu,
    }
}

/// A device of `device_kind()`.
pub fn device() -> Device {
    let dev = Device::new(device_kind()).expect("device");
    println!("device: {}", dev.describe());
    dev
}

const GUARD: usize = 256;
const GUARD_BYTE: u8 = 0xA5;

/// A device buffer with GUARD sentinel bytes on both sides that kernels must not touch.
pub struct Guarded {
    base: DevPtr,
    pub ptr: DevPtr,
    pub bytes: usize,
}

impl Guarded {
    pub fn new(dev: &mut Device, bytes: usize) -> Self {
        let base = dev.alloc(bytes + 2 * GUARD).unwrap();
        let mut fill = vec![GUARD_BYTE; bytes + 2 * GUARD];
        fill[GUARD..GUARD + bytes].fill(0);
        dev.upload(base, &fill).unwrap();
        Guarded {
            base,
            ptr: base.offset(GUARD),
            bytes,
        }
    }
    pub fn with<T: bytemuck::Pod>(dev: &mut Device, data: &[T]) -> Self {
        let g = Self::new(dev, std::mem::size_of_val(data));
        dev.upload(g.ptr, data).unwrap();
        g
    }
    pub fn addr(&self) -> u64 {
        self.ptr.0
    }
    /// How many sentinel bytes changed.
    pub fn damage(&self, dev: &Device) -> usize {
        let mut all = vec![0u8; self.bytes + 2 * GUARD];
        dev.download(self.base, &mut all).unwrap();
        all[..GUARD]
            .iter()
            .chain(&all[GUARD + self.bytes..])
            .filter(|&&b| b != GUARD_BYTE)
            .count()
    }
    /// Panics when a sentinel byte changed.
    pub fn check_guards(&self, dev: &Device, what: &str) {
        let bad = self.damage(dev);
        assert_eq!(bad, 0, "{what}: {bad} guard bytes overwritten");
    }
    pub fn read_f16(&self, dev: &Device) -> Vec<f32> {
        let mut v = vec![f16::ZERO; self.bytes / 2];
        dev.download(self.ptr, &mut v).unwrap();
        v.iter().map(|h| h.to_f32()).collect()
    }
    pub fn read_f32(&self, dev: &Device) -> Vec<f32> {
        let mut v = vec![0f32; self.bytes / 4];
        dev.download(self.ptr, &mut v).unwrap();
        v
    }
    pub fn read_i32(&self, dev: &Device) -> Vec<i32> {
        let mut v = vec![0i32; self.bytes / 4];
        dev.download(self.ptr, &mut v).unwrap();
        v
    }
    pub fn read_u8(&self, dev: &Device) -> Vec<u8> {
        let mut v = vec![0u8; self.bytes];
        dev.download(self.ptr, &mut v).unwrap();
        v
    }
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn uniform(rng: &mut ChaCha8Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(lo..hi)).collect()
}

pub fn to_f16(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

/// Values rounded through fp16 (what the device sees of an fp32 input).
pub fn round_f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| f16::from_f32(x).to_f32()).collect()
}

/// mse(reference, got) / mse(reference, 0); also asserts every value is finite.
pub fn nerr(reference: &[f32], got: &[f32]) -> f64 {
    assert_eq!(reference.len(), got.len());
    let bad = got.iter().filter(|v| !v.is_finite()).count();
    assert_eq!(bad, 0, "{bad} non-finite outputs");
    let num: f64 = reference
        .iter()
        .zip(got)
        .map(|(&a, &b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|&a| (a as f64).powi(2)).sum();
    num / den.max(1e-30)
}

/// NCHW [n, c, hw] → NHWC [n, hw, cp], channels c..cp zero (the device layout). With hw = 1
/// it pads the rows of a [n, c] matrix to cp.
pub fn nchw_to_nhwc<T: Copy + Default>(
    x: &[T],
    n: usize,
    c: usize,
    hw: usize,
    cp: usize,
) -> Vec<T> {
    let mut out = vec![T::default(); n * hw * cp];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..hw {
                out[(i * hw + p) * cp + ch] = x[(i * c + ch) * hw + p];
            }
        }
    }
    out
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// The GcpMode of the kernels' `gcp` parameter (0: max − mean, 1: max, 2: mean).
pub fn gcp_mode(gcp: i32) -> GcpMode {
    match gcp {
        0 => GcpMode::MaxMinusMean,
        1 => GcpMode::Max,
        _ => GcpMode::Mean,
    }
}

/// conv3x3 parameters over fresh device buffers (contents unset), for timing: n images of
/// h × h pixels, cin1 input channels (+ cin2 concatenated), cout outputs, ReLU, quad order,
/// no split-K. `up`: the input is h/2 × h/2, upsampled ×2 by the loader; `pool`: with the
/// fused 2×2 max-pool.
pub fn timing_conv_params(
    dev: &mut Device,
    (n, h, cin1, cin2, cout): (usize, usize, usize, usize, usize),
    up: bool,
    pool: bool,
) -> ConvParams {
    let m = n * h * h;
    let src_px = if up { m / 4 } else { m };
    let mut alloc = |bytes: usize| dev.alloc(bytes).expect("device allocation").0;
    ConvParams {
        x: alloc(src_px * cin1 * 2),
        x2: alloc(m * cin2.max(8) * 2),
        wt: alloc(cout * 9 * (cin1 + cin2) * 2),
        bias: alloc(cout * 4),
        y: alloc(m * cout * 2),
        y_pool: if pool { alloc(m / 4 * cout * 2) } else { 0 },
        n: n as i32,
        h: h as i32,
        w: h as i32,
        cin1: cin1 as i32,
        cin2: cin2 as i32,
        cout: cout as i32,
        in_h: (h / 2) as i32,
        in_w: (h / 2) as i32,
        relu: 1,
        quad: 1,
        partial: 0,
        stats: 0,
        splits: 1,
        pad_: 0,
    }
}

/// Milliseconds (CUDA events) that `iters` calls of `launch` take.
pub fn time_launches(
    dev: &Device,
    iters: u64,
    mut launch: impl FnMut() -> anyhow::Result<()>,
) -> f32 {
    (dev.time_ms(|| (0..iters).try_for_each(|_| launch()))).expect("timed launches")
}

/// A model with random BatchNorm affine parameters and running statistics (so eval-mode BN
/// is far from the identity). The BN shifts are positive: with zero-centred shifts a freshly
/// initialised BN-ReLU stack amplifies any perturbation ~1.15× per layer in train mode (the f32
/// reference itself moves by ~1e-2 for 5e-4 input noise), which would measure the network's
/// conditioning rather than the engine's fp16 error.
pub fn random_model(c: ModelConfig, seed: u64) -> Model {
    let mut m = Model::init(c, seed);
    let mut r = rng(seed + 100);
    for bn in m.table.bns.clone() {
        let g = m.table.range(&format!("{}.weight", bn.module));
        let b = m.table.range(&format!("{}.bias", bn.module));
        m.params[g]
            .iter_mut()
            .for_each(|v| *v = r.gen_range(0.6..1.4));
        m.params[b]
            .iter_mut()
            .for_each(|v| *v = r.gen_range(0.3..0.8));
        m.buffers[bn.mean_range()]
            .iter_mut()
            .for_each(|v| *v = r.gen_range(-0.1..0.1));
        m.buffers[bn.var_range()]
            .iter_mut()
            .for_each(|v| *v = r.gen_range(0.5..1.5));
    }
    m
}

/// A file of tests/fixtures (the PyTorch fixtures of tools/torch_reference.py).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}
