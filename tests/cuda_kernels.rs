//! Each CUDA kernel against `m2unet::reference`, on the emulator (or a GPU with
//! M2UNET_TEST_DEVICE=cuda): normalised error against a per-kernel threshold, guard bytes
//! around every output, NaN/Inf checks; shapes include sizes that are not tile multiples.

mod cuda_common;

use cuda_common::*;
use m2unet::cuda::kernels::*;
use m2unet::cuda::weights::{pack_conv3x3, pad8};
use m2unet::reference;

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
    let xs64: Vec<Vec<f64>> = xs.iter().map(|x| to_f64(x)).collect();
    let parts: Vec<(&[f64], usize)> = xs64
        .iter()
        .map(|x| x.as_slice())
        .zip(case.parts.iter().copied())
        .collect();
    let xcat = to_f32(&reference::concat_channels(&parts, n, h * w));
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
    let cin_pad: usize = case.parts.iter().map(|&c| pad8(c)).sum();
    let splits = conv_splits(n * h * w, cp, 9 * cin_pad);
    let gpart = Guarded::new(&mut dev, splits * n * h * w * cp * 4);
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
        partial: gpart.addr(),
        splits: splits as i32,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    conv3x3(&dev, &p, false).unwrap();
    dev.synchronize().unwrap();
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let got = nhwc_to_nchw(&gy.read_f16(&dev), n, cout, h, w, cp);
    let e = nerr(&want, &got);
    println!("conv3x3_igemm n={n} {h}x{w} cin={:?} cout={cout} pool={} split-K {splits}: normalised error {e:.3e} (threshold 1e-5), {ms:.1} ms", case.parts, case.pool);
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
    gpart.check_guards(&dev, "conv split-K partials");
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
fn conv3x3_igemm_split_k_with_pool() {
    // A small grid over a long K (36 rows, 9·64 = 576): K is split over 4 blocks and reduced by
    // conv_splitk_reduce, which also applies bias, ReLU and the 2×2 max-pool.
    assert_eq!(conv_splits(36, 24, 576), 4);
    run_conv_case(
        &ConvCase {
            n: 1,
            h: 6,
            w: 6,
            parts: vec![64],
            cout: 24,
            pool: true,
            relu: true,
        },
        13,
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

#[test]
fn conv3x3_igemm_upsample_in_loader() {
    // up_conv of a decoder block: input 3×5 low-res, upsampled ×2 to 6×10 while loading.
    let mut dev = device();
    let mut r = rng(5);
    let (n, lh, lw, cin, cout) = (2, 3, 5, 16, 24);
    let (h, w) = (2 * lh, 2 * lw);
    let x = round_f16(&uniform(&mut r, n * cin * lh * lw, -1.0, 1.0));
    let wgt = round_f16(&uniform(&mut r, cout * cin * 9, -0.3, 0.3));
    let bias = uniform(&mut r, cout, -0.2, 0.2);
    let up = ref_upsample2x(&x, n * cin, lh, lw);
    let mut want = ref_conv3x3(&up, &wgt, &bias, n, cin, cout, h, w);
    relu(&mut want);
    let gx = Guarded::with(&mut dev, &to_f16(&nchw_to_nhwc(&x, n, cin, lh, lw, cin)));
    let gw = Guarded::with(&mut dev, &pack_conv3x3(&wgt, cout, &[cin]).unwrap());
    let gb = Guarded::with(&mut dev, &bias);
    let gy = Guarded::new(&mut dev, n * h * w * cout * 2);
    let p = ConvParams {
        x: gx.addr(),
        wt: gw.addr(),
        bias: gb.addr(),
        y: gy.addr(),
        n: n as i32,
        h: h as i32,
        w: w as i32,
        cin1: cin as i32,
        cout: cout as i32,
        in_h: lh as i32,
        in_w: lw as i32,
        relu: 1,
        quad: 1,
        ..Default::default()
    };
    conv3x3(&dev, &p, true).unwrap();
    let got = nhwc_to_nchw(&gy.read_f16(&dev), n, cout, h, w, cout);
    let e = nerr(&want, &got);
    println!("conv3x3_igemm_up {lh}x{lw}->{h}x{w} cin={cin} cout={cout}: normalised error {e:.3e} (threshold 1e-5)");
    assert!(e < 1e-5);
    gy.check_guards(&dev, "conv_up y");
}

fn run_first_case(n: usize, cin: usize, cout: usize, h: usize, w: usize, pool: bool, seed: u64) {
    let mut dev = device();
    let mut r = rng(seed);
    let x = uniform(&mut r, n * cin * h * w, 0.0, 1.0);
    let wgt = uniform(&mut r, cout * cin * 9, -0.5, 0.5);
    let bias = uniform(&mut r, cout, -0.2, 0.2);
    let mut want = ref_conv3x3(&x, &wgt, &bias, n, cin, cout, h, w);
    relu(&mut want);
    let cp = pad8(cout);
    let gx = Guarded::with(&mut dev, &x);
    let gw = Guarded::with(&mut dev, &wgt);
    let gb = Guarded::with(&mut dev, &bias);
    let gy = Guarded::new(&mut dev, n * h * w * cp * 2);
    let gp = Guarded::new(&mut dev, n * (h / 2) * (w / 2) * cp * 2);
    let p = ConvFirstParams {
        x: gx.addr(),
        wt: gw.addr(),
        bias: gb.addr(),
        y: gy.addr(),
        y_pool: if pool { gp.addr() } else { 0 },
        n: n as i32,
        cin: cin as i32,
        h: h as i32,
        w: w as i32,
        cout_real: cout as i32,
        cout: cp as i32,
        relu: 1,
        pad_: 0,
    };
    conv3x3_first(&dev, &p).unwrap();
    let got = nhwc_to_nchw(&gy.read_f16(&dev), n, cout, h, w, cp);
    let e = nerr(&want, &got);
    println!("conv3x3_first n={n} cin={cin} cout={cout} {h}x{w} pool={pool}: normalised error {e:.3e} (threshold 1e-5)");
    assert!(e < 1e-5);
    if pool {
        let ep = nerr(
            &ref_maxpool(&want, n * cout, h, w),
            &nhwc_to_nchw(&gp.read_f16(&dev), n, cout, h / 2, w / 2, cp),
        );
        println!("  fused 2x2 max-pool: normalised error {ep:.3e} (threshold 1e-5)");
        assert!(ep < 1e-5);
    }
    gy.check_guards(&dev, "first y");
    gp.check_guards(&dev, "first y_pool");
}

#[test]
fn conv3x3_first_one_channel() {
    run_first_case(2, 1, 12, 6, 10, true, 6);
    run_first_case(1, 1, 8, 5, 3, false, 7);
    run_first_case(1, 3, 8, 4, 4, false, 8);
}

#[test]
fn bn_train_stats_finalize_apply_pool() {
    // Training-mode BatchNorm: per-chunk stats (300 pixels: chunks of 128, 128, 44), the
    // deterministic combination, running-stat update, and BN+ReLU with the fused max-pool.
    let mut dev = device();
    let mut r = rng(9);
    let (n, h, w, c_real) = (3, 10, 10, 20);
    let c = pad8(c_real);
    let pixels = n * h * w;
    let mut x = uniform(&mut r, pixels * c, -1.0, 3.0);
    for (i, v) in x.iter_mut().enumerate() {
        if i % c >= c_real {
            *v = 0.0;
        }
    }
    let x = round_f16(&x);
    let gamma = uniform(&mut r, c_real, 0.5, 1.5);
    let beta = uniform(&mut r, c_real, -0.5, 0.5);
    let rm0 = uniform(&mut r, c_real, -0.1, 0.1);
    let rv0 = uniform(&mut r, c_real, 0.9, 1.1);
    let (eps, mom) = (m2unet::config::BN_EPS, m2unet::config::BN_MOMENTUM);
    // The reference sees NHWC [pixels, c] as NCHW [pixels, c, 1]: the same channel statistics.
    let real: Vec<f64> = (0..pixels * c_real)
        .map(|i| x[i / c_real * c + i % c_real] as f64)
        .collect();
    let batch = reference::bn_train_forward(&real, c_real, 1, &to_f64(&gamma), &to_f64(&beta));
    let y_real = reference::relu_forward(&batch.y);
    let mut want_y = vec![0f32; pixels * c];
    for (i, v) in y_real.iter().enumerate() {
        want_y[i / c_real * c + i % c_real] = *v as f32;
    }
    let (want_rm, want_rv) =
        reference::bn_running_update(&to_f64(&rm0), &to_f64(&rv0), &batch, pixels);
    let (want_rm, want_rv) = (to_f32(&want_rm), to_f32(&want_rv));
    let chunks = bn_chunks(pixels);
    let gx = Guarded::with(&mut dev, &to_f16(&x));
    let gpart = Guarded::new(&mut dev, chunks * 2 * c * 4);
    let gg = Guarded::with(&mut dev, &gamma);
    let gbeta = Guarded::with(&mut dev, &beta);
    let grm = Guarded::with(&mut dev, &rm0);
    let grv = Guarded::with(&mut dev, &rv0);
    let gscale = Guarded::new(&mut dev, c * 4);
    let gshift = Guarded::new(&mut dev, c * 4);
    let gy = Guarded::new(&mut dev, pixels * c * 2);
    let gp = Guarded::new(&mut dev, pixels / 4 * c * 2);
    bn_stats(
        &dev,
        &BnStatsParams {
            x: gx.addr(),
            partial: gpart.addr(),
            pixels: pixels as i32,
            c: c as i32,
            chunk: BN_CHUNK as i32,
            pad_: 0,
        },
    )
    .unwrap();
    bn_finalize(
        &dev,
        &BnFinalizeParams {
            partial: gpart.addr(),
            gamma: gg.addr(),
            beta: gbeta.addr(),
            running_mean: grm.addr(),
            running_var: grv.addr(),
            scale: gscale.addr(),
            shift: gshift.addr(),
            chunks: chunks as i32,
            pixels: pixels as i32,
            chunk: BN_CHUNK as i32,
            c: c as i32,
            c_real: c_real as i32,
            pad_: 0,
            momentum: mom,
            eps,
        },
    )
    .unwrap();
    let p = BnApplyParams {
        x: gx.addr(),
        scale: gscale.addr(),
        shift: gshift.addr(),
        y: gy.addr(),
        y_pool: gp.addr(),
        n: n as i32,
        h: h as i32,
        w: w as i32,
        c: c as i32,
    };
    bn_apply(&dev, &p).unwrap();
    let ey = nerr(&want_y, &gy.read_f16(&dev));
    let erm = nerr(&want_rm, &grm.read_f32(&dev));
    let erv = nerr(&want_rv, &grv.read_f32(&dev));
    let want_nchw = nhwc_to_nchw(&want_y, n, c, h, w, c);
    let ep = nerr(
        &ref_maxpool(&want_nchw, n * c, h, w),
        &nhwc_to_nchw(&gp.read_f16(&dev), n, c, h / 2, w / 2, c),
    );
    println!("bn train: y {ey:.3e}, pooled {ep:.3e}, running_mean {erm:.3e}, running_var {erv:.3e} (thresholds 1e-5, 1e-5, 1e-8, 1e-8)");
    assert!(ey < 1e-5 && ep < 1e-5 && erm < 1e-8 && erv < 1e-8);
    let shift = gshift.read_f32(&dev);
    assert!(
        shift[c_real..].iter().all(|&v| v == 0.0),
        "padding channels get scale = shift = 0"
    );
    for g in [&gpart, &grm, &grv, &gscale, &gshift, &gy, &gp] {
        g.check_guards(&dev, "bn buffers");
    }
}

#[test]
fn seg_head_logits_and_argmax() {
    let mut dev = device();
    let mut r = rng(10);
    let (n, h, w, c_real, classes) = (2, 5, 7, 12, 6);
    let c = pad8(c_real);
    let x = round_f16(&uniform(&mut r, n * c_real * h * w, 0.0, 1.0));
    let wgt = uniform(&mut r, classes * c_real, -0.5, 0.5);
    let bias = uniform(&mut r, classes, -0.1, 0.1);
    let xd = m2unet::cpu::ops::Dims::new(n, c_real, h, w);
    let logits =
        reference::conv1x1_forward(&to_f64(&x), xd, &to_f64(&wgt), &to_f64(&bias), classes);
    let want = to_f32(&logits);
    let want_lab: Vec<u8> = reference::argmax_channels(&logits, classes, h * w)
        .iter()
        .map(|&k| k as u8)
        .collect();
    let gx = Guarded::with(&mut dev, &to_f16(&nchw_to_nhwc(&x, n, c_real, h, w, c)));
    let gw = Guarded::with(&mut dev, &wgt);
    let gb = Guarded::with(&mut dev, &bias);
    let gl = Guarded::new(&mut dev, want.len() * 4);
    let glab = Guarded::new(&mut dev, want_lab.len());
    let p = SegHeadParams {
        x: gx.addr(),
        w: gw.addr(),
        bias: gb.addr(),
        logits: gl.addr(),
        labels: glab.addr(),
        n: n as i32,
        hw: (h * w) as i32,
        c: c as i32,
        c_real: c_real as i32,
        classes: classes as i32,
        pad_: 0,
    };
    seg_head(&dev, &p).unwrap();
    let e = nerr(&want, &gl.read_f32(&dev));
    let lab = glab.read_u8(&dev);
    let mism = lab.iter().zip(&want_lab).filter(|(a, b)| a != b).count();
    println!(
        "seg_head: logits normalised error {e:.3e} (threshold 1e-10), argmax mismatches {mism}/{}",
        lab.len()
    );
    assert!(e < 1e-10 && mism == 0);
    gl.check_guards(&dev, "seg logits");
    glab.check_guards(&dev, "seg labels");
}

#[test]
fn mil_head_kernels() {
    // Concept scores + GCP per patch (2 patches of 2×2 instances, c 20 padded to 24, 70 concepts
    // over two column blocks), then a linear layer with ReLU and GCP over bags of 2 and 3 rows.
    let mut dev = device();
    let mut r = rng(11);
    let (m, inst, c_real, k) = (5, 4, 20, 70);
    let c = pad8(c_real);
    let x = round_f16(&uniform(&mut r, m * inst * c_real, 0.0, 2.0));
    let wc = uniform(&mut r, k * c_real, -0.3, 0.3);
    let bc = uniform(&mut r, k, -0.1, 0.1);
    let mut xh = vec![0f32; m * inst * c];
    for row in 0..m * inst {
        xh[row * c..row * c + c_real].copy_from_slice(&x[row * c_real..(row + 1) * c_real]);
    }
    let gx = Guarded::with(&mut dev, &to_f16(&xh));
    let gw = Guarded::with(&mut dev, &m2unet::cuda::weights::transpose(&wc, k, c_real));
    let gb = Guarded::with(&mut dev, &bc);
    for gcp in 0..3 {
        let gz = Guarded::new(&mut dev, m * k * 4);
        let p = ConceptsGcpParams {
            x: gx.addr(),
            wt: gw.addr(),
            bias: gb.addr(),
            z: gz.addr(),
            m: m as i32,
            inst: inst as i32,
            c: c as i32,
            c_real: c_real as i32,
            k: k as i32,
            gcp,
        };
        mil_concepts_gcp(&dev, &p).unwrap();
        // Concept scores of every instance row, then GCP over each patch's instances.
        let scores =
            reference::linear_forward(&to_f64(&x), m * inst, c_real, &to_f64(&wc), &to_f64(&bc), k);
        let patches: Vec<(usize, usize)> = (0..m).map(|pm| (pm * inst, inst)).collect();
        let want = to_f32(&reference::gcp_forward(&scores, k, &patches, gcp_mode(gcp)));
        let e = nerr(&want, &gz.read_f32(&dev));
        println!("mil_concepts_gcp gcp={gcp}: normalised error {e:.3e} (threshold 1e-9)");
        assert!(e < 1e-9);
        gz.check_guards(&dev, "concepts z");
    }
    // linear_f32 with ReLU: [m, k] → [m, 9].
    let (fin, fout) = (k, 9);
    let xl = uniform(&mut r, m * fin, -1.0, 1.0);
    let wl = uniform(&mut r, fout * fin, -0.3, 0.3);
    let bl = uniform(&mut r, fout, -0.1, 0.1);
    let (gxl, gwl, gbl) = (
        Guarded::with(&mut dev, &xl),
        Guarded::with(&mut dev, &wl),
        Guarded::with(&mut dev, &bl),
    );
    let gyl = Guarded::new(&mut dev, m * fout * 4);
    linear_f32(
        &dev,
        &LinearParams {
            x: gxl.addr(),
            w: gwl.addr(),
            bias: gbl.addr(),
            y: gyl.addr(),
            rows: m as i32,
            fin: fin as i32,
            fout: fout as i32,
            act: 1,
        },
    )
    .unwrap();
    let lin = reference::linear_forward(&to_f64(&xl), m, fin, &to_f64(&wl), &to_f64(&bl), fout);
    let want = to_f32(&reference::relu_forward(&lin));
    let el = nerr(&want, &gyl.read_f32(&dev));
    println!("linear_f32 relu: normalised error {el:.3e} (threshold 1e-10)");
    assert!(el < 1e-10);
    gyl.check_guards(&dev, "linear y");
    // gcp_bags over bags [0,2) and [2,5) of the linear output.
    let starts = [0i32, 2, 5];
    let gs = Guarded::with(&mut dev, &starts);
    let gg = Guarded::new(&mut dev, 2 * fout * 4);
    gcp_bags(
        &dev,
        &GcpBagsParams {
            t: gyl.addr(),
            bag_start: gs.addr(),
            g: gg.addr(),
            bags: 2,
            k: fout as i32,
            gcp: 0,
            pad_: 0,
        },
    )
    .unwrap();
    let yl = to_f64(&gyl.read_f32(&dev));
    let bags = [(0, 2), (2, 3)];
    let want = to_f32(&reference::gcp_forward(&yl, fout, &bags, gcp_mode(0)));
    let eg = nerr(&want, &gg.read_f32(&dev));
    println!("gcp_bags (bags of 2 and 3): normalised error {eg:.3e} (threshold 1e-12)");
    assert!(eg < 1e-12);
    gg.check_guards(&dev, "gcp_bags g");
}

#[test]
fn bn1d_train_relu_rows() {
    let mut dev = device();
    let mut r = rng(12);
    let (rows, c) = (6, 10);
    let x = uniform(&mut r, rows * c, -2.0, 2.0);
    let gamma = uniform(&mut r, c, 0.5, 1.5);
    let beta = uniform(&mut r, c, -0.5, 0.5);
    let (gx, gg, gb) = (
        Guarded::with(&mut dev, &x),
        Guarded::with(&mut dev, &gamma),
        Guarded::with(&mut dev, &beta),
    );
    let grm = Guarded::with(&mut dev, &vec![0f32; c]);
    let grv = Guarded::with(&mut dev, &vec![1f32; c]);
    let gy = Guarded::new(&mut dev, rows * c * 4);
    let p = Bn1dTrainParams {
        x: gx.addr(),
        gamma: gg.addr(),
        beta: gb.addr(),
        running_mean: grm.addr(),
        running_var: grv.addr(),
        y: gy.addr(),
        rows: rows as i32,
        c: c as i32,
        momentum: m2unet::config::BN_MOMENTUM,
        eps: m2unet::config::BN_EPS,
    };
    bn1d_train_relu(&dev, &p).unwrap();
    let batch = reference::bn_train_forward(&to_f64(&x), c, 1, &to_f64(&gamma), &to_f64(&beta));
    let want = to_f32(&reference::relu_forward(&batch.y));
    let (_, want_rv) = reference::bn_running_update(&vec![0.0; c], &vec![1.0; c], &batch, rows);
    let want_rv = to_f32(&want_rv);
    let e = nerr(&want, &gy.read_f32(&dev));
    let ev = nerr(&want_rv, &grv.read_f32(&dev));
    println!(
        "bn1d_train_relu: y normalised error {e:.3e}, running_var {ev:.3e} (thresholds 1e-10)"
    );
    assert!(e < 1e-10 && ev < 1e-10);
    gy.check_guards(&dev, "bn1d y");
}
