//! Device rows of kernels/heads.cu: seg_head (logits, labels and lobe-order costs), mil_concepts_gcp, linear_f32
//! and gcp_bags.

use crate::cuda_common::*;
use crate::device::{abs, Launch, ACC, U16};
use crate::{max_abs, Table};
use m2unet::cpu::ops::Dims;
use m2unet::cuda::kernels::*;
use m2unet::cuda::weights::{concepts_row, pack_concepts, pad8, transpose};
use m2unet::cuda::Device;
use m2unet::reference;

pub fn rows(dev: &mut Device, t: &mut Table) {
    seg_head_rows(dev, t);
    concepts_rows(dev, t);
    concepts_mma_rows(dev, t);
    linear_rows(dev, t);
    gcp_bags_rows(dev, t);
}

/// seg_head: 1×1 conv of fp16 NHWC features to fp32 logits (= reference::conv1x1) and their
/// argmax (= reference::argmax_channels).
fn seg_head_rows(dev: &mut Device, t: &mut Table) {
    for (n, h, w, c_real, classes) in [
        (2, 5, 7, 12, 6),
        (1, 1, 3, 3, 2),
        (3, 4, 4, 16, 16),
        (1, 9, 11, 5, 3),
    ] {
        let mut r = rng((n * 100 + h * 10 + c_real) as u64);
        let c = pad8(c_real);
        let hw = h * w;
        let x = round_f16(&uniform(&mut r, n * c_real * hw, 0.0, 1.0));
        let wgt = uniform(&mut r, classes * c_real, -0.5, 0.5);
        let bias = uniform(&mut r, classes, -0.1, 0.1);
        let d = Dims::new(n, c_real, h, w);
        let (xf, wf, bf) = (to_f64(&x), to_f64(&wgt), to_f64(&bias));
        let logits = reference::conv1x1_forward(&xf, d, &wf, &bf, classes);
        let labels = reference::argmax_channels(&logits, classes, hw);
        // Bound: the fp32 sum of c_real products and the bias (fp32 output, no rounding).
        let a = reference::conv1x1_forward(&abs(&xf), d, &abs(&wf), &abs(&bf), classes);
        let k = (c_real + 1) as f64;

        let gx = Guarded::with(dev, &to_f16(&nchw_to_nhwc(&x, n, c_real, hw, c)));
        let gw = Guarded::with(dev, &wgt);
        let gb = Guarded::with(dev, &bias);
        let gl = Guarded::new(dev, logits.len() * 4);
        let glab = Guarded::new(dev, n * hw);
        let gcost = Guarded::new(dev, n * hw * (classes - 1));
        let p = SegHeadParams {
            x: gx.addr(),
            w: gw.addr(),
            bias: gb.addr(),
            logits: gl.addr(),
            labels: glab.addr(),
            costs: gcost.addr(),
            n: n as i32,
            hw: hw as i32,
            c: c as i32,
            c_real: c_real as i32,
            classes: classes as i32,
            pad_: 0,
        };
        seg_head(dev, &p).unwrap();
        let shape = format!("n{n} {h}×{w} c{c_real}→{classes}");
        let mut run = Launch::new(t, shape, dev, &[&gx, &gw, &gb, &gl, &glab, &gcost]);
        let bound = k * ACC * max_abs(&a);
        run.output("seg_head logits", &gl.read_f32(dev), &logits, 0.0, bound);
        // Labels: the share of pixels whose label differs from the reference's argmax, among
        // those whose top two logits are further apart than twice the logits' error bound
        // (closer ones are numerically tied); it must be zero.
        let got = glab.read_u8(dev);
        let (mut wrong, mut clear) = (0, 0);
        for i in 0..n {
            for p in 0..hw {
                let at = |k: usize| logits[(i * classes + k) * hw + p];
                let top = at(labels[i * hw + p]);
                let second = (0..classes)
                    .filter(|&k| k != labels[i * hw + p])
                    .map(at)
                    .fold(f64::NEG_INFINITY, f64::max);
                let slack = (0..classes)
                    .map(|k| a[(i * classes + k) * hw + p])
                    .fold(0.0, f64::max);
                if top - second > 2.0 * k * ACC * slack {
                    clear += 1;
                    wrong += usize::from(got[i * hw + p] as usize != labels[i * hw + p]);
                }
            }
        }
        let share = wrong as f64 / clear.max(1) as f64;
        run.add(&format!("seg_head labels ({clear} clear)"), share, 0.0);
        // Lobe-order costs: −ln softmax of classes 1.. in 1/16-nat steps (saturated at 255)
        // against the reference logits' exact value in steps; the device rounds its own fp32
        // logits, so the bound is half a step plus the logits' error bound (twice: the
        // log-sum-exp moves by at most the largest logit error) in steps, plus float slack.
        let costs = gcost.read_u8(dev);
        let mut worst = 0f64;
        for i in 0..n {
            for p in 0..hw {
                let at = |k: usize| logits[(i * classes + k) * hw + p];
                let top = (0..classes).map(at).fold(f64::NEG_INFINITY, f64::max);
                let lse = top + (0..classes).map(|k| (at(k) - top).exp()).sum::<f64>().ln();
                for k in 1..classes {
                    let exact = ((lse - at(k)) * 16.0).min(255.0);
                    let got = costs[(i * hw + p) * (classes - 1) + k - 1] as f64;
                    worst = worst.max((got - exact).abs());
                }
            }
        }
        run.add(
            "seg_head lobe costs (1/16 nat)",
            worst,
            0.5 + 32.0 * bound + 1e-3,
        );
    }
}

/// Instance rows of [m·inst, c] with exact duplicates in every patch, so that the concept
/// scores tie exactly: the last instance copies the first (the same warp of mil_concepts_gcp
/// when inst = 9) and, with more than 3 instances, the third copies the second (another warp).
pub fn with_duplicates(mut x: Vec<f32>, m: usize, inst: usize, c: usize) -> Vec<f32> {
    let copy = |x: &mut Vec<f32>, pm: usize, from: usize, to: usize| {
        let (f, t) = ((pm * inst + from) * c, (pm * inst + to) * c);
        x.copy_within(f..f + c, t);
    };
    for pm in 0..m {
        if inst > 1 {
            copy(&mut x, pm, 0, inst - 1);
        }
        if inst > 3 {
            copy(&mut x, pm, 1, 2);
        }
    }
    x
}

/// The data of a concept-scores row: instance rows x [m·inst][c_real] (fp16 values, with the
/// duplicates of `with_duplicates`) and the same rows padded to pad8(c_real) channels, Linear
/// weight [k][c_real] and bias, the f64 reference scores and scores of the absolute values
/// (for error bounds), and each patch's (first row, rows).
struct ConceptsCase {
    x: Vec<f32>,
    xh: Vec<f32>,
    wc: Vec<f32>,
    bc: Vec<f32>,
    scores: Vec<f64>,
    a: Vec<f64>,
    patches: Vec<(usize, usize)>,
}

fn concepts_case((m, inst, c_real, k): (usize, usize, usize, usize), seed: u64) -> ConceptsCase {
    let mut r = rng(seed);
    let c = pad8(c_real);
    let x = uniform(&mut r, m * inst * c_real, 0.0, 2.0);
    let x = with_duplicates(round_f16(&x), m, inst, c_real);
    let wc = uniform(&mut r, k * c_real, -0.3, 0.3);
    let bc = uniform(&mut r, k, -0.1, 0.1);
    let mut xh = vec![0f32; m * inst * c];
    for row in 0..m * inst {
        xh[row * c..row * c + c_real].copy_from_slice(&x[row * c_real..(row + 1) * c_real]);
    }
    let (xf, wf, bf) = (to_f64(&x), to_f64(&wc), to_f64(&bc));
    let scores = reference::linear_forward(&xf, m * inst, c_real, &wf, &bf, k);
    let a = reference::linear_forward(&abs(&xf), m * inst, c_real, &abs(&wf), &abs(&bf), k);
    let patches = (0..m).map(|pm| (pm * inst, inst)).collect();
    ConceptsCase {
        x,
        xh,
        wc,
        bc,
        scores,
        a,
        patches,
    }
}

/// mil_concepts_gcp: concept scores of every instance (= reference::linear over the instance
/// rows) pooled by GCP over each patch's instances (= reference::gcp_forward), and the first
/// instance attaining each max. Shapes: every row in one stage (U = 4 rows per warp), three
/// stages of 24 rows (U = 3) with a short last one, and one row per warp (c_real = 2048).
fn concepts_rows(dev: &mut Device, t: &mut Table) {
    let shapes = [
        (5, 4, 20, 70),
        (2, 9, 5, 3),
        (3, 1, 8, 33),
        (2, 70, 600, 40),
        (1, 10, 2048, 5),
    ];
    for (m, inst, c_real, k) in shapes {
        let seed = (m * 100 + inst * 10 + c_real) as u64;
        let ConceptsCase {
            x,
            xh,
            wc,
            bc,
            scores,
            a,
            patches,
        } = concepts_case((m, inst, c_real, k), seed);
        let c = pad8(c_real);
        // Bound: each score errs by at most (c_real + 1)·ACC·Σ|terms|; max takes one score's
        // error, the mean at most that plus the fp32 sum of `inst` scores; max − mean both
        // and one more rounding.
        let kk = (c_real + 1) as f64;
        let bound = 2.0 * kk * ACC * max_abs(&a) + (inst + 2) as f64 * ACC * max_abs(&scores);
        let a_bound = kk * ACC * max_abs(&a);

        let gx = Guarded::with(dev, &to_f16(&xh));
        let gw = Guarded::with(dev, &transpose(&wc, k, c_real));
        let gb = Guarded::with(dev, &bc);
        for gcp in 0..3 {
            let mode = gcp_mode(gcp);
            let want = reference::gcp_forward(&scores, k, &patches, mode);
            let gz = Guarded::new(dev, m * k * 4);
            let garg = Guarded::new(dev, m * k * 4);
            let p = ConceptsGcpParams {
                x: gx.addr(),
                wt: gw.addr(),
                bias: gb.addr(),
                z: gz.addr(),
                arg: garg.addr(),
                m: m as i32,
                inst: inst as i32,
                c: c as i32,
                c_real: c_real as i32,
                k: k as i32,
                gcp,
            };
            mil_concepts_gcp(dev, &p).unwrap();
            let shape = format!("m{m} inst{inst} c{c_real}→{k}");
            let mut run = Launch::new(t, shape, dev, &[&gx, &gw, &gb, &gz, &garg]);
            // One instance: max − mean is exactly zero, an absolute comparison.
            let op = format!("concepts+gcp {mode}");
            run.output(&op, &gz.read_f32(dev), &want, 0.0, bound);
            let (wrong, clear) =
                argmax_mismatches(&garg.read_i32(dev), &scores, &x, inst, k, a_bound);
            let share = wrong as f64 / clear.max(1) as f64;
            run.add(&format!("concepts arg ({clear} clear)"), share, 0.0);
        }
    }
}

/// mil_concepts_mma (eval): the concept scores on tensor cores from fp16 weights, pooled by
/// GCP, against reference::linear_forward → gcp_forward with the f32 weights. Shapes: channels
/// not a multiple of 32 (zero-filled k-tile tails), one instance, concepts past one 64-column
/// block, and 256 and 300 instances (two and three row tiles of 128) at the paper's 512
/// channels.
fn concepts_mma_rows(dev: &mut Device, t: &mut Table) {
    let shapes = [
        (5, 4, 20, 70),
        (2, 9, 5, 3),
        (3, 1, 8, 33),
        (2, 70, 600, 40),
        (1, 256, 512, 130),
        (2, 300, 40, 64),
    ];
    for (m, inst, c_real, k) in shapes {
        let seed = (m * 1000 + inst * 10 + c_real) as u64;
        let ConceptsCase {
            xh,
            wc,
            bc,
            scores,
            a,
            patches,
            ..
        } = concepts_case((m, inst, c_real, k), seed);
        let c = pad8(c_real);
        // Bound: as the fp32-weight kernel's (tests above), plus the weights' fp16 rounding
        // (at most U16 of each product, so U16·Σ|terms| per score, twice for max − mean).
        let kk = (c_real + 1) as f64;
        let bound =
            2.0 * (kk * ACC + U16) * max_abs(&a) + (inst + 2) as f64 * ACC * max_abs(&scores);

        let gx = Guarded::with(dev, &to_f16(&xh));
        let pack = pack_concepts(&wc, k, c_real).unwrap();
        let gw = Guarded::with(dev, &pack);
        let gb = Guarded::with(dev, &bc);
        for gcp in 0..3 {
            let mode = gcp_mode(gcp);
            let want = reference::gcp_forward(&scores, k, &patches, mode);
            let gz = Guarded::new(dev, m * k * 4);
            let p = ConceptsMmaParams {
                x: gx.addr(),
                wt: gw.addr(),
                bias: gb.addr(),
                z: gz.addr(),
                m: m as i32,
                inst: inst as i32,
                c: c as i32,
                kc: concepts_row(c_real) as i32,
                k: k as i32,
                gcp,
                pad_: [0; 2],
            };
            mil_concepts_mma(dev, &p).unwrap();
            let shape = format!("m{m} inst{inst} c{c_real}→{k}");
            let mut run = Launch::new(t, shape, dev, &[&gx, &gw, &gb, &gz]);
            run.output(
                &format!("concepts mma+gcp {mode}"),
                &gz.read_f32(dev),
                &want,
                0.0,
                bound,
            );
        }
    }
}

/// The (patch, concept) pairs whose argmax `got` differs from the first maximum of the
/// reference scores [m·inst, k], among those whose top score is further than twice the scores'
/// error bound from every instance with a different input row (closer ones are numerically
/// tied; identical rows tie exactly, so the first of them must win): (wrong, clear).
pub fn argmax_mismatches(
    got: &[i32],
    scores: &[f64],
    x: &[f32],
    inst: usize,
    k: usize,
    bound: f64,
) -> (usize, usize) {
    let (mut wrong, mut clear) = (0, 0);
    let c = x.len() / (scores.len() / k);
    for (u, &g) in got.iter().enumerate() {
        let (pm, j) = (u / k, u % k);
        let s = |i: usize| scores[(pm * inst + i) * k + j];
        let row = |i: usize| &x[(pm * inst + i) * c..(pm * inst + i + 1) * c];
        let first = (1..inst).fold(0, |b, i| if s(i) > s(b) { i } else { b });
        let second = (0..inst)
            .filter(|&i| row(i) != row(first))
            .map(s)
            .fold(f64::NEG_INFINITY, f64::max);
        if s(first) - second > 2.0 * bound {
            clear += 1;
            wrong += usize::from(g != first as i32);
        }
    }
    (wrong, clear)
}

/// linear_f32: y = act(x·wᵀ + b) in fp32.
fn linear_rows(dev: &mut Device, t: &mut Table) {
    for (rows, fin, fout, relu) in [
        (5, 70, 9, true),
        (1, 1, 1, false),
        (33, 17, 130, false),
        (4, 0, 3, true),
    ] {
        let mut r = rng((rows * 100 + fin * 10 + fout) as u64);
        let x = uniform(&mut r, rows * fin, -1.0, 1.0);
        let w = uniform(&mut r, fout * fin, -0.3, 0.3);
        let b = uniform(&mut r, fout, -0.1, 0.1);
        let (xf, wf, bf) = (to_f64(&x), to_f64(&w), to_f64(&b));
        let mut want = reference::linear_forward(&xf, rows, fin, &wf, &bf, fout);
        if relu {
            want = reference::relu_forward(&want);
        }
        // Bound: the fp32 sum of fin products and the bias.
        let a = reference::linear_forward(&abs(&xf), rows, fin, &abs(&wf), &abs(&bf), fout);
        let bound = (fin + 1) as f64 * ACC * max_abs(&a);

        let (gx, gw, gb) = (
            Guarded::with(dev, &x),
            Guarded::with(dev, &w),
            Guarded::with(dev, &b),
        );
        let gy = Guarded::new(dev, rows * fout * 4);
        let p = LinearParams {
            x: gx.addr(),
            w: gw.addr(),
            bias: gb.addr(),
            y: gy.addr(),
            rows: rows as i32,
            fin: fin as i32,
            fout: fout as i32,
            act: relu as i32,
        };
        linear_f32(dev, &p).unwrap();
        let shape = format!("{rows}×{fin}→{fout}");
        let mut run = Launch::new(t, shape, dev, &[&gx, &gw, &gb, &gy]);
        let op = if relu { "linear+relu" } else { "linear" };
        run.output(op, &gy.read_f32(dev), &want, 0.0, bound);
    }
}

/// gcp_bags: GCP over the rows of each bag of an fp32 [rows, k] tensor.
fn gcp_bags_rows(dev: &mut Device, t: &mut Table) {
    for (k, sizes) in [(9, &[2, 3][..]), (1, &[1][..]), (70, &[4, 1, 7][..])] {
        let rows: usize = sizes.iter().sum();
        let mut r = rng((k * 100 + rows) as u64);
        let x = uniform(&mut r, rows * k, -1.0, 1.0);
        let mut starts = vec![0i32];
        let mut bags = vec![];
        for &s in sizes {
            bags.push((*starts.last().unwrap() as usize, s));
            starts.push(starts.last().unwrap() + s as i32);
        }
        let xf = to_f64(&x);
        // Bound: the mean is an fp32 sum of at most max(sizes) values, then a division and
        // (max − mean) a subtraction.
        let longest = *sizes.iter().max().unwrap();
        let bound = (longest + 2) as f64 * ACC * max_abs(&xf);
        let (gx, gs) = (Guarded::with(dev, &x), Guarded::with(dev, &starts));
        for gcp in 0..3 {
            let mode = gcp_mode(gcp);
            let want = reference::gcp_forward(&xf, k, &bags, mode);
            let gg = Guarded::new(dev, sizes.len() * k * 4);
            let p = GcpBagsParams {
                t: gx.addr(),
                bag_start: gs.addr(),
                g: gg.addr(),
                bags: sizes.len() as i32,
                k: k as i32,
                gcp,
                pad_: 0,
            };
            gcp_bags(dev, &p).unwrap();
            let shape = format!("k{k} bags {sizes:?}");
            let mut run = Launch::new(t, shape, dev, &[&gx, &gs, &gg]);
            run.output(
                &format!("gcp bags {mode}"),
                &gg.read_f32(dev),
                &want,
                0.0,
                bound,
            );
        }
    }
}
