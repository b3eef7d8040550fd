//! Each CUDA kernel against a naive f32 reference written here, on the emulator (or a GPU with
//! M2UNET_TEST_DEVICE=cuda): normalised error against a per-kernel threshold, guard bytes
//! around every output, NaN/Inf checks; shapes include sizes that are not tile multiples.

mod cuda_common;

use cuda_common::*;
use m2unet::cuda::kernels::*;
use m2unet::cuda::weights::{pack_conv3x3, pad8};

/// Naive 3×3 convolution, stride 1, zero padding 1, NCHW f32.
fn ref_conv3x3(
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

fn relu(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = x.max(0.0));
}

/// Naive 2×2 max-pool, stride 2, NCHW.
fn ref_maxpool(x: &[f32], nc: usize, h: usize, w: usize) -> Vec<f32> {
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
fn ref_upsample2x(x: &[f32], nc: usize, h: usize, w: usize) -> Vec<f32> {
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

#[test]
fn emulator_round_trip_bn_apply() {
    // The simplest kernel end to end: upload, launch, download, compared with y = relu(x·s + t).
    let mut dev = device();
    let (n, h, w, c) = (2, 3, 5, 16);
    let mut r = rng(1);
    let x = round_f16(&uniform(&mut r, n * h * w * c, -2.0, 2.0));
    let scale = uniform(&mut r, c, -1.5, 1.5);
    let shift = uniform(&mut r, c, -0.5, 0.5);
    let gx = Guarded::with(&mut dev, &to_f16(&x));
    let gs = Guarded::with(&mut dev, &scale);
    let gt = Guarded::with(&mut dev, &shift);
    let gy = Guarded::new(&mut dev, x.len() * 2);
    let p = BnApplyParams {
        x: gx.addr(),
        scale: gs.addr(),
        shift: gt.addr(),
        y: gy.addr(),
        n: n as i32,
        h: h as i32,
        w: w as i32,
        c: c as i32,
        ..Default::default()
    };
    bn_apply(&dev, &p).unwrap();
    let got = gy.read_f16(&dev);
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, v)| (v * scale[i % c] + shift[i % c]).max(0.0))
        .collect();
    let e = nerr(&want, &got);
    println!("bn_apply round trip: normalised error {e:.3e} (threshold 1e-6)");
    assert!(e < 1e-6);
    gy.check_guards(&dev, "bn_apply y");
}

struct ConvCase {
    n: usize,
    h: usize,
    w: usize,
    parts: Vec<usize>,
    cout: usize,
    pool: bool,
    relu: bool,
}

fn run_conv_case(case: &ConvCase, seed: u64) {
    let mut dev = device();
    let mut r = rng(seed);
    let (n, h, w, cout) = (case.n, case.h, case.w, case.cout);
    let cin: usize = case.parts.iter().sum();
    // One NCHW input per part, each its own NHWC tensor on the device.
    let xs: Vec<Vec<f32>> = case
        .parts
        .iter()
        .map(|&c| round_f16(&uniform(&mut r, n * c * h * w, -1.0, 1.0)))
        .collect();
    let wgt = round_f16(&uniform(&mut r, cout * cin * 9, -0.3, 0.3));
    let bias = uniform(&mut r, cout, -0.2, 0.2);
    let mut xcat = vec![0f32; n * cin * h * w];
    for i in 0..n {
        let mut c0 = 0;
        for (part, x) in case.parts.iter().zip(&xs) {
            let len = part * h * w;
            xcat[(i * cin + c0) * h * w..][..len].copy_from_slice(&x[i * len..(i + 1) * len]);
            c0 += part;
        }
    }
    let mut want = ref_conv3x3(&xcat, &wgt, &bias, n, cin, cout, h, w);
    if case.relu {
        relu(&mut want);
    }
    let gx: Vec<Guarded> = case
        .parts
        .iter()
        .zip(&xs)
        .map(|(&c, x)| Guarded::with(&mut dev, &to_f16(&nchw_to_nhwc(x, n, c, h, w, pad8(c)))))
        .collect();
    let gw = Guarded::with(&mut dev, &pack_conv3x3(&wgt, cout, &case.parts).unwrap());
    let cp = pad8(cout);
    let gb = Guarded::with(&mut dev, &m2unet::cuda::weights::padded(&bias, cp));
    let gy = Guarded::new(&mut dev, n * h * w * cp * 2);
    let gp = Guarded::new(&mut dev, n * (h / 2) * (w / 2) * cp * 2);
    let p = ConvParams {
        x: gx[0].addr(),
        x2: gx.get(1).map_or(0, |g| g.addr()),
        wt: gw.addr(),
        bias: gb.addr(),
        y: gy.addr(),
        y_pool: if case.pool { gp.addr() } else { 0 },
        n: n as i32,
        h: h as i32,
        w: w as i32,
        cin1: pad8(case.parts[0]) as i32,
        cin2: case.parts.get(1).map_or(0, |&c| pad8(c)) as i32,
        cout: cp as i32,
        relu: case.relu as i32,
        quad: (h % 2 == 0 && w % 2 == 0) as i32,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    conv3x3(&dev, &p, false).unwrap();
    dev.synchronize().unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let got = nhwc_to_nchw(&gy.read_f16(&dev), n, cout, h, w, cp);
    let e = nerr(&want, &got);
    println!("conv3x3_igemm n={n} {h}x{w} cin={:?} cout={cout} pool={}: normalised error {e:.3e} (threshold 1e-5), {ms:.1} ms", case.parts, case.pool);
    assert!(e < 1e-5, "error {e}");
    gy.check_guards(&dev, "conv y");
    let pad_out: Vec<f32> = gy
        .read_f16(&dev)
        .iter()
        .enumerate()
        .filter(|(i, _)| i % cp >= cout)
        .map(|(_, v)| *v)
        .collect();
    assert!(
        pad_out.iter().all(|&v| v == 0.0 || !case.relu),
        "padding channels must stay 0 after ReLU"
    );
    if case.pool {
        let wantp = ref_maxpool(&want, n * cout, h, w);
        let gotp = nhwc_to_nchw(&gp.read_f16(&dev), n, cout, h / 2, w / 2, cp);
        let ep = nerr(&wantp, &gotp);
        println!("  fused 2x2 max-pool: normalised error {ep:.3e} (threshold 1e-5)");
        assert!(ep < 1e-5);
    }
    gp.check_guards(&dev, "conv y_pool");
}

#[test]
fn conv3x3_igemm_small_odd_sizes() {
    // 5×7 pixels (M = 35, far from the 128-row tile), 3 input channels padded to 8, 5 outputs.
    run_conv_case(
        &ConvCase {
            n: 1,
            h: 5,
            w: 7,
            parts: vec![3],
            cout: 5,
            pool: false,
            relu: false,
        },
        2,
    );
}

#[test]
fn conv3x3_igemm_multi_tile_with_pool() {
    // M = 2·10·14 = 280 rows (3 row tiles), cout 72 (2 column tiles), K = 9·24 (7 k-tiles).
    run_conv_case(
        &ConvCase {
            n: 2,
            h: 10,
            w: 14,
            parts: vec![24],
            cout: 72,
            pool: true,
            relu: true,
        },
        3,
    );
}

#[test]
fn conv3x3_igemm_concat_two_inputs() {
    // conv1 of a decoder block: the concatenation [u, s] read from two tensors.
    run_conv_case(
        &ConvCase {
            n: 2,
            h: 6,
            w: 6,
            parts: vec![8, 16],
            cout: 16,
            pool: false,
            relu: true,
        },
        4,
    );
}
