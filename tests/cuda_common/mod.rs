//! Helpers shared by the CUDA tests: device choice, guarded buffers, fp16 packing, NHWC
//! layout conversions and the normalised error mse(a,b)/mse(a,0).
#![allow(dead_code)]

use half::f16;
use m2unet::cuda::{DevPtr, Device, DeviceKind};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

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
    /// Panics when a sentinel byte changed.
    pub fn check_guards(&self, dev: &Device, what: &str) {
        let mut all = vec![0u8; self.bytes + 2 * GUARD];
        dev.download(self.base, &mut all).unwrap();
        let bad = all[..GUARD]
            .iter()
            .chain(&all[GUARD + self.bytes..])
            .filter(|&&b| b != GUARD_BYTE)
            .count();
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

/// NCHW [n,c,h,w] → NHWC [n,h,w,cp] with channels padded by zeros to cp.
pub fn nchw_to_nhwc(x: &[f32], n: usize, c: usize, h: usize, w: usize, cp: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * h * w * cp];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                out[(i * h * w + p) * cp + ch] = x[(i * c + ch) * h * w + p];
            }
        }
    }
    out
}

/// NHWC [n,h,w,cp] → NCHW [n,c,h,w] (dropping padding channels).
pub fn nhwc_to_nchw(x: &[f32], n: usize, c: usize, h: usize, w: usize, cp: usize) -> Vec<f32> {
    let mut out = vec![0f32; n * c * h * w];
    for i in 0..n {
        for ch in 0..c {
            for p in 0..h * w {
                out[(i * c + ch) * h * w + p] = x[(i * h * w + p) * cp + ch];
            }
        }
    }
    out
}

/// Naive 3×3 convolution, stride 1, zero padding 1, NCHW f32.
#[allow(clippy::too_many_arguments)]
pub fn ref_conv3x3(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    cin: usize,
    cout: usize,
    h: usize,
    wd: usize,
) -> Vec<f32> {
    let mut y = vec![0f32; n * cout * h * wd];
    for i in 0..n {
        for o in 0..cout {
            for yy in 0..h {
                for xx in 0..wd {
                    let mut s = b[o] as f64;
                    for c in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (sy, sx) =
                                    (yy as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                                if sy < 0 || sx < 0 || sy >= h as isize || sx >= wd as isize {
                                    continue;
                                }
                                let v = x[((i * cin + c) * h + sy as usize) * wd + sx as usize];
                                s += (v * w[((o * cin + c) * 3 + ky) * 3 + kx]) as f64;
                            }
                        }
                    }
                    y[((i * cout + o) * h + yy) * wd + xx] = s as f32;
                }
            }
        }
    }
    y
}

pub fn relu(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = x.max(0.0));
}

/// Naive 2×2 max-pool, stride 2, NCHW.
pub fn ref_maxpool(x: &[f32], nc: usize, h: usize, w: usize) -> Vec<f32> {
    let mut y = vec![f32::NEG_INFINITY; nc * (h / 2) * (w / 2)];
    for p in 0..nc {
        for yy in 0..h / 2 * 2 {
            for xx in 0..w / 2 * 2 {
                let o = (p * (h / 2) + yy / 2) * (w / 2) + xx / 2;
                y[o] = y[o].max(x[(p * h + yy) * w + xx]);
            }
        }
    }
    y
}

/// Naive bilinear ×2 upsampling, align_corners=False (PyTorch's source-index rule).
pub fn ref_upsample2x(x: &[f32], nc: usize, h: usize, w: usize) -> Vec<f32> {
    let src = |d: usize, size: usize| {
        let s = ((d as f32 + 0.5) / 2.0 - 0.5).max(0.0);
        let i0 = s.floor() as usize;
        (i0, (i0 + 1).min(size - 1), s - i0 as f32)
    };
    let mut y = vec![0f32; nc * 4 * h * w];
    for p in 0..nc {
        for yy in 0..2 * h {
            let (y0, y1, ly) = src(yy, h);
            for xx in 0..2 * w {
                let (x0, x1, lx) = src(xx, w);
                let at = |a: usize, b: usize| x[(p * h + a) * w + b];
                y[(p * 2 * h + yy) * 2 * w + xx] = (1.0 - ly)
                    * ((1.0 - lx) * at(y0, x0) + lx * at(y0, x1))
                    + ly * ((1.0 - lx) * at(y1, x0) + lx * at(y1, x1));
            }
        }
    }
    y
}
