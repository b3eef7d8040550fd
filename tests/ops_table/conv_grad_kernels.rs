//! Device rows of kernels/conv_grad.cu: the device weight packs (pack_conv_fwd, pack_conv_dgrad), the input gradient through conv3x3_igemm with the dgrad pack, conv_wgrad (+ reduce) and conv_wgrad_first (+ reduce) against reference::conv3x3_backward.

use crate::cuda_common::*;
use crate::device::{abs, Launch, ACC};
use crate::{max_abs, Table};
use m2unet::cpu::ops::Dims;
use m2unet::cuda::kernels::*;
use m2unet::cuda::weights::{pack_conv3x3, pad8};
use m2unet::cuda::Device;
use m2unet::reference;

pub fn rows(dev: &mut Device, t: &mut Table) {
    pack_rows(dev, t);
    let splits: Vec<usize> = DGRADS.iter().map(|case| dgrad_rows(dev, t, case)).collect();
    // Split-K must stay covered: (1, 9, 11, [13], 40) splits its K = 9·40 three ways.
    assert!(
        splits.iter().any(|&s| s > 1),
        "no dgrad case splits K: {splits:?}"
    );
    let splits: Vec<usize> = WGRADS
        .iter()
        .flat_map(|case| wgrad_rows(dev, t, case))
        .collect();
    // wgrad_splits' own choice must split somewhere: (1, 32, 33, [8], 8) has 33 k-tiles.
    assert!(
        splits.iter().any(|&s| s > 1),
        "wgrad_splits never splits: {splits:?}"
    );
    first_rows(dev, t);
}

/// `chosen`, then the `extra` split counts that differ from it.
fn split_list(chosen: usize, extra: &[usize]) -> Vec<usize> {
    let mut v = vec![chosen];
    v.extend(extra.iter().filter(|&&s| s != chosen));
    v
}

/// Values that differ bit for bit between two fp16 tensors (read back as f32, which keeps the
/// sign of zero).
fn bit_mismatches(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "pack length");
    (got.iter().zip(want))
        .filter(|(g, w)| g.to_bits() != w.to_bits())
        .count() as f64
}

/// The host's dgrad pack of part `part` of weights [cout][Σparts][3][3]:
/// [pad8(c_j)][9][pad8(cout)], out[c][t][o] = w[o][off_j + c][8 − t] rounded to fp16.
fn host_dgrad_pack(w: &[f32], cout: usize, parts: &[usize], part: usize) -> Vec<f32> {
    let cin: usize = parts.iter().sum();
    let (cj, off) = (parts[part], parts[..part].iter().sum::<usize>());
    let co = pad8(cout);
    let mut out = vec![0f32; pad8(cj) * 9 * co];
    for c in 0..cj {
        for t in 0..9 {
            for o in 0..cout {
                out[(c * 9 + t) * co + o] = w[(o * cin + off + c) * 9 + 8 - t];
            }
        }
    }
    round_f16(&out)
}

/// pack_conv_fwd against the host pack_conv3x3 and pack_conv_dgrad against its definition,
/// bit for bit (error = values that differ, tolerance 0), from fp32 weights the device rounds.
fn pack_rows(dev: &mut Device, t: &mut Table) {
    for (cout, parts) in [
        (5usize, &[3usize][..]),
        (11, &[5, 13]),
        (16, &[8, 8]),
        (1, &[1]),
    ] {
        let cin: usize = parts.iter().sum();
        let mut r = rng((cout * 100 + cin) as u64);
        let mut w = uniform(&mut r, cout * cin * 9, -0.3, 0.3);
        // A negative zero and a value halfway between two fp16 numbers (ties to even).
        w[0] = -0.0;
        w[1] = 1.0 + 1.0 / 2048.0;
        let gw = Guarded::with(dev, &w);
        let (c1, c2) = (parts[0], parts.get(1).copied().unwrap_or(0));
        let shape = format!("{parts:?}→{cout}");

        let want: Vec<f32> = (pack_conv3x3(&w, cout, parts).unwrap().iter())
            .map(|h| h.to_f32())
            .collect();
        let go = Guarded::new(dev, want.len() * 2);
        let p = PackConvParams {
            w: gw.addr(),
            out: go.addr(),
            cout: cout as i32,
            c1: c1 as i32,
            c2: c2 as i32,
            part: 0,
        };
        pack_conv_fwd(dev, &p).unwrap();
        let err = bit_mismatches(&go.read_f16(dev), &want);
        Launch::new(t, shape.clone(), dev, &[&gw, &go]).add("pack_conv_fwd", err, 0.0);

        for part in 0..parts.len() {
            let want = host_dgrad_pack(&w, cout, parts, part);
            let go = Guarded::new(dev, want.len() * 2);
            pack_conv_dgrad(
                dev,
                &PackConvParams {
                    part: part as i32,
                    out: go.addr(),
                    ..p
                },
            )
            .unwrap();
            let err = bit_mismatches(&go.read_f16(dev), &want);
            let shape = format!("{shape} part {part}");
            Launch::new(t, shape, dev, &[&gw, &go]).add("pack_conv_dgrad", err, 0.0);
        }
    }
}

/// A conv case of the backward: (n, h, w, input channel parts, cout).
type GradCase = (usize, usize, usize, &'static [usize], usize);

const DGRADS: [GradCase; 4] = [
    (1, 5, 7, &[3], 5),
    (2, 7, 3, &[5, 11], 9),
    (1, 9, 11, &[13], 40),
    (3, 3, 5, &[16, 6], 20),
];

/// Channels off..off + c of NCHW [n, call, hw].
fn channels(v: &[f64], n: usize, call: usize, hw: usize, off: usize, c: usize) -> Vec<f64> {
    (0..n)
        .flat_map(|i| {
            v[(i * call + off) * hw..(i * call + off + c) * hw]
                .iter()
                .copied()
        })
        .collect()
}

/// Random conv backward inputs of a case: the parts x_j (NCHW, fp16 values), the weights
/// (fp16 values: the device packs round them, which is then exact) and dy (NCHW, fp16 values).
fn grad_inputs(&(n, h, w, parts, cout): &GradCase) -> (Vec<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let cin: usize = parts.iter().sum();
    let mut r = rng((n * 1000 + h * 100 + w * 10 + cout + cin) as u64);
    let xs = (parts.iter())
        .map(|&c| round_f16(&uniform(&mut r, n * c * h * w, -1.0, 1.0)))
        .collect();
    let wgt = round_f16(&uniform(&mut r, cout * cin * 9, -0.3, 0.3));
    let dy = round_f16(&uniform(&mut r, n * cout * h * w, -1.0, 1.0));
    (xs, wgt, dy)
}

/// dgrad of each input part: pack_conv_dgrad, then the forward conv3x3_igemm of dz (split-K
/// as the engine chooses it) against conv3x3_backward's dx of that part; returns the splits.
fn dgrad_rows(dev: &mut Device, t: &mut Table, case: &GradCase) -> usize {
    let &(n, h, w, parts, cout) = case;
    let cin: usize = parts.iter().sum();
    let (_, wgt, dy) = grad_inputs(case);
    let d = Dims::new(n, cin, h, w);
    let zeros = vec![0.0; n * cin * h * w];
    let (wf, dyf) = (to_f64(&wgt), to_f64(&dy));
    let dx = reference::conv3x3_backward(&zeros, d, &wf, &dyf, cout).dx;
    // Bound: fp16 output rounding (U16) + the fp32 sum of K = 9·cout products (exact products
    // of fp16 values; padding terms are exact zeros), split-K partials included:
    // K·ACC·Σ|terms|, Σ|terms| = the dx of |w| and |dy|.
    let dx_abs = reference::conv3x3_backward(&zeros, d, &abs(&wf), &abs(&dyf), cout).dx;
    let k = (9 * cout) as f64;

    let co = pad8(cout);
    let gz = Guarded::with(dev, &to_f16(&nchw_to_nhwc(&dy, n, cout, h * w, co)));
    let gw = Guarded::with(dev, &wgt);
    let mut max_splits = 1;
    let (c1, c2) = (parts[0], parts.get(1).copied().unwrap_or(0));
    for (j, &cj) in parts.iter().enumerate() {
        let off: usize = parts[..j].iter().sum();
        let cp = pad8(cj);
        let splits = conv_splits(n * h * w, cp, 9 * co);
        max_splits = max_splits.max(splits);
        let gpack = Guarded::new(dev, cp * 9 * co * 2);
        let pack = PackConvParams {
            w: gw.addr(),
            out: gpack.addr(),
            cout: cout as i32,
            c1: c1 as i32,
            c2: c2 as i32,
            part: j as i32,
        };
        pack_conv_dgrad(dev, &pack).unwrap();
        let gb = Guarded::with(dev, &vec![0f32; cp]);
        let gy = Guarded::new(dev, n * h * w * cp * 2);
        let gpart = Guarded::new(dev, splits * n * h * w * cp * 4);
        let p = ConvParams {
            x: gz.addr(),
            wt: gpack.addr(),
            bias: gb.addr(),
            y: gy.addr(),
            partial: gpart.addr(),
            stats: 0,
            n: n as i32,
            h: h as i32,
            w: w as i32,
            cin1: co as i32,
            cout: cp as i32,
            splits: splits as i32,
            ..Default::default()
        };
        conv3x3(dev, &p, false).unwrap();
        let shape = format!("n{n} {h}×{w} {parts:?}→{cout} part {j} split-K {splits}");
        let bufs = [&gz, &gw, &gpack, &gb, &gy, &gpart];
        let mut run = Launch::new(t, shape, dev, &bufs).nhwc(cj, cp);
        let want = channels(&dx, n, cin, h * w, off, cj);
        let bound = k * ACC * max_abs(&channels(&dx_abs, n, cin, h * w, off, cj));
        run.output_nchw("conv dgrad (igemm)", &gy.read_f16(dev), (&want, n), bound);
    }
    max_splits
}

/// A conv_wgrad case and the pixel splits to run it with (beyond wgrad_splits' choice; more
/// splits than k-tiles leaves blocks without pixels, which must write zero partials).
type WgradCase = (GradCase, &'static [usize]);

const WGRADS: [WgradCase; 7] = [
    ((1, 5, 7, &[3], 5), &[1, 2, 5]),
    ((2, 7, 3, &[5, 11], 9), &[1, 3]),
    ((3, 9, 11, &[20], 70), &[1, 4]),
    ((2, 6, 10, &[16, 40], 24), &[1, 2, 3]),
    ((1, 1, 1, &[1], 1), &[1, 2]),
    ((2, 3, 1, &[8], 16), &[1, 2]),
    ((1, 32, 33, &[8], 8), &[1]),
];

/// What the dw buffer holds before conv_wgrad: the values outside the launched part's slice
/// must keep it.
const UNTOUCHED: f32 = 7777.0;

/// conv_wgrad of each input part, alone into a dw buffer of UNTOUCHED values: its slice
/// against conv3x3_backward's dw, the rest unchanged (else the row's error is infinite).
/// Returns wgrad_splits' choices.
fn wgrad_rows(dev: &mut Device, t: &mut Table, (case, extra): &WgradCase) -> Vec<usize> {
    let &(n, h, w, parts, cout) = case;
    let cin: usize = parts.iter().sum();
    let (xs, _, dy) = grad_inputs(case);
    let d = Dims::new(n, cin, h, w);
    let xs64: Vec<Vec<f64>> = xs.iter().map(|x| to_f64(x)).collect();
    let refs: Vec<(&[f64], usize)> = (xs64.iter().map(|x| x.as_slice()))
        .zip(parts.iter().copied())
        .collect();
    let x = reference::concat_channels(&refs, n, h * w);
    let zeros = vec![0.0; cout * cin * 9];
    let dyf = to_f64(&dy);
    let dw = reference::conv3x3_backward(&x, d, &zeros, &dyf, cout).dw;
    // Bound: fp32 output; each dw value is a sum of at most `pixels` exact products of fp16
    // values, accumulated by the MMAs and the split partials in some order: ≤ pixels·ACC·Σ|terms|,
    // Σ|terms| = the dw of |x| and |dy|.
    let dw_abs = reference::conv3x3_backward(&abs(&x), d, &zeros, &abs(&dyf), cout).dw;
    let pixels = n * h * w;

    let cz = pad8(cout);
    let gz = Guarded::with(dev, &to_f16(&nchw_to_nhwc(&dy, n, cout, h * w, cz)));
    let mut chosen = vec![];
    for (j, (&cj, xj)) in parts.iter().zip(&xs).enumerate() {
        let (off, cx) = (parts[..j].iter().sum::<usize>(), pad8(cj));
        let gx = Guarded::with(dev, &to_f16(&nchw_to_nhwc(xj, n, cj, h * w, cx)));
        let in_slice = |i: usize| (off..off + cj).contains(&(i / 9 % cin));
        let want: Vec<f64> = (0..dw.len())
            .filter(|&i| in_slice(i))
            .map(|i| dw[i])
            .collect();
        let a: Vec<f64> = (0..dw.len())
            .filter(|&i| in_slice(i))
            .map(|i| dw_abs[i])
            .collect();
        let bound = pixels as f64 * ACC * max_abs(&a);
        chosen.push(wgrad_splits(pixels, cz, cx));
        for s in split_list(chosen[j], extra) {
            let gdw = Guarded::with(dev, &vec![UNTOUCHED; dw.len()]);
            let mut p = WgradParams {
                dz: gz.addr(),
                x: gx.addr(),
                dw: gdw.addr(),
                n: n as i32,
                h: h as i32,
                w: w as i32,
                cz: cz as i32,
                cx: cx as i32,
                cout: cout as i32,
                cin: cin as i32,
                c_off: off as i32,
                c_real: cj as i32,
                splits: s as i32,
                ..Default::default()
            };
            let gpart = Guarded::new(dev, wgrad_partial_len(&p) * 4);
            p.partial = gpart.addr();
            conv_wgrad(dev, &p).unwrap();
            let shape = format!("n{n} {h}×{w} {parts:?}→{cout} part {j} splits {s}");
            let mut run = Launch::new(t, shape, dev, &[&gz, &gx, &gdw, &gpart]);
            let all = gdw.read_f32(dev);
            let untouched = (all.iter().enumerate()).all(|(i, &v)| in_slice(i) || v == UNTOUCHED);
            let got: Vec<f32> = (0..all.len())
                .filter(|&i| in_slice(i))
                .map(|i| all[i])
                .collect();
            if untouched {
                run.output("conv wgrad", &got, &want, 0.0, bound);
            } else {
                run.add("conv wgrad (wrote outside its slice)", f64::INFINITY, 0.0);
            }
        }
    }
    chosen
}

/// conv_wgrad_first: fp32 NCHW input with 1 or 2 channels, fp16 dz, against
/// conv3x3_backward's dw; the pixel splits as wgrad_first_splits chooses and forced.
fn first_rows(dev: &mut Device, t: &mut Table) {
    for (n, cin, cout, h, w, extra) in [
        (2, 1, 12, 6, 10, &[3usize][..]),
        (1, 2, 8, 5, 3, &[2]),
        (3, 2, 20, 7, 9, &[4, 200]),
        (1, 1, 64, 9, 13, &[5]),
        (1, 1, 16, 40, 40, &[1]),
    ] {
        let mut r = rng((1000 * n + 100 * cin + cout) as u64);
        let x = uniform(&mut r, n * cin * h * w, 0.0, 1.0);
        let dy = round_f16(&uniform(&mut r, n * cout * h * w, -1.0, 1.0));
        let d = Dims::new(n, cin, h, w);
        let zeros = vec![0.0; cout * cin * 9];
        let (xf, dyf) = (to_f64(&x), to_f64(&dy));
        let dw = reference::conv3x3_backward(&xf, d, &zeros, &dyf, cout).dw;
        // Bound: fp32 output; each dw value sums at most `pixels` products, each rounded once
        // in fp32 (x is fp32), in some order: ≤ (pixels + 1)·ACC·Σ|terms|, Σ|terms| = the dw of
        // |x| and |dy|.
        let dw_abs = reference::conv3x3_backward(&abs(&xf), d, &zeros, &abs(&dyf), cout).dw;
        let pixels = n * h * w;
        let bound = (pixels + 1) as f64 * ACC * max_abs(&dw_abs);

        let cz = pad8(cout);
        let gz = Guarded::with(dev, &to_f16(&nchw_to_nhwc(&dy, n, cout, h * w, cz)));
        let gx = Guarded::with(dev, &x);
        for s in split_list(wgrad_first_splits(pixels), extra) {
            let gdw = Guarded::with(dev, &vec![UNTOUCHED; dw.len()]);
            let mut p = WgradFirstParams {
                dz: gz.addr(),
                x: gx.addr(),
                dw: gdw.addr(),
                n: n as i32,
                cin: cin as i32,
                h: h as i32,
                w: w as i32,
                cz: cz as i32,
                cout: cout as i32,
                splits: s as i32,
                ..Default::default()
            };
            let gpart = Guarded::new(dev, wgrad_first_partial_len(&p) * 4);
            p.partial = gpart.addr();
            conv_wgrad_first(dev, &p).unwrap();
            let shape = format!("n{n} {h}×{w} [{cin}]→{cout} splits {s}");
            let mut run = Launch::new(t, shape, dev, &[&gz, &gx, &gdw, &gpart]);
            run.output("conv wgrad first", &gdw.read_f32(dev), &dw, 0.0, bound);
        }
    }
}
