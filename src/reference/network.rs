//! The whole network as reference ops in f64, walking the model's layer list: forward (eval or
//! train-mode BatchNorm), losses and, in train mode, every parameter's gradient — the truth the
//! engines' whole passes are tested against. Optionally with every tensor the CUDA engine
//! stores in fp16 rounded to fp16: the network's own sensitivity to fp16 rounding, which
//! calibrates the CUDA engine's tolerances.

use super::{
    bn_eval_forward, bn_running_update, bn_train_backward, bn_train_forward, cls_loss,
    concat_channels, conv1x1_backward, conv1x1_forward, conv3x3_backward, conv3x3_forward,
    gcp_backward, gcp_forward, linear_backward, linear_forward, maxpool2x2_backward,
    maxpool2x2_forward, relu_backward, relu_forward, seg_loss, split_channels, upsample2x_backward,
    upsample2x_forward, BnBatch,
};
use crate::config::TrainConfig;
use crate::cpu::ops::Dims;
use crate::engine::Mode;
use crate::model::{Linear, Model, Src};
use half::f16;

/// Which tensors a pass keeps exact.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Storage {
    /// Everything in f64.
    Exact,
    /// f64 arithmetic, but the tensors the CUDA engine stores in fp16 rounded to fp16: the
    /// weights of the tensor-core convs, every conv's output before and after BN + ReLU, the
    /// upsampled inputs, and in the backward every conv output's and input part's gradient,
    /// rounded at the loss scale (value·S in fp16, then /S) as the CUDA engine holds them.
    Fp16(f64),
}

impl Storage {
    fn round(self, mut v: Vec<f64>) -> Vec<f64> {
        if let Storage::Fp16(scale) = self {
            for x in &mut v {
                *x = f16::from_f64(*x * scale).to_f64() / scale;
            }
        }
        v
    }

    /// A forward tensor (unscaled).
    fn act(self, v: Vec<f64>) -> Vec<f64> {
        match self {
            Storage::Exact => v,
            Storage::Fp16(_) => Storage::Fp16(1.0).round(v),
        }
    }
}

/// What one pass of the reference network computed.
#[derive(Clone, Debug)]
pub struct NetworkPass {
    /// [M, seg_classes, P, P]
    pub seg_logits: Vec<f64>,
    /// [bags, cls_classes]
    pub cls_logits: Vec<f64>,
    /// The running statistics after the pass (updated in train mode), laid out as
    /// `Model::buffers`.
    pub buffers: Vec<f64>,
    /// With labels: total, classification, segmentation CE and Dice losses.
    pub losses: Option<[f64; 4]>,
    /// With labels in train mode: d total / d parameter, laid out as `Model::params`.
    pub grads: Option<Vec<f64>>,
}

/// One conv unit's saved tensors.
struct UnitSave {
    /// The concatenated input and its dims.
    x: Vec<f64>,
    xd: Dims,
    /// Convolution output, BatchNorm output (before ReLU), ReLU output.
    z: Vec<f64>,
    bn: Vec<f64>,
    y: Vec<f64>,
    /// Train mode: the batch statistics.
    batch: Option<BnBatch>,
}

impl UnitSave {
    fn yd(&self, cout: usize) -> Dims {
        Dims::new(self.xd.n, cout, self.xd.h, self.xd.w)
    }
}

/// The MIL head's saved tensors (names as docs/model.md).
struct MilSave {
    ht: Vec<f64>,
    s: Vec<f64>,
    z: Vec<f64>,
    q: Vec<f64>,
    bn: Vec<f64>,
    batch: Option<BnBatch>,
    e: Vec<f64>,
    t: Vec<f64>,
    g: Vec<f64>,
    r: Vec<f64>,
    v: Vec<f64>,
}

struct Net<'a> {
    model: &'a Model,
    mode: Mode,
    buffers: Vec<f64>,
    storage: Storage,
}

impl Net<'_> {
    fn p(&self, name: &str) -> Vec<f64> {
        self.model.param(name).iter().map(|&v| v as f64).collect()
    }

    /// BatchNorm `bn` over x [n, c, hw]: batch statistics (running ones updated) in train mode,
    /// running statistics in eval mode.
    fn batchnorm(
        &mut self,
        bn: &str,
        x: &[f64],
        c: usize,
        hw: usize,
    ) -> (Vec<f64>, Option<BnBatch>) {
        let (gamma, beta) = (
            self.p(&format!("{bn}.weight")),
            self.p(&format!("{bn}.bias")),
        );
        let e = self.model.table.bn(bn);
        match self.mode {
            Mode::Train => {
                let batch = bn_train_forward(x, c, hw, &gamma, &beta);
                let (rm, rv) = bn_running_update(
                    &self.buffers[e.mean_range()],
                    &self.buffers[e.var_range()],
                    &batch,
                    x.len() / c,
                );
                self.buffers[e.mean_range()].copy_from_slice(&rm);
                self.buffers[e.var_range()].copy_from_slice(&rv);
                (batch.y.clone(), Some(batch))
            }
            Mode::Eval => {
                let (rm, rv) = (&self.buffers[e.mean_range()], &self.buffers[e.var_range()]);
                (bn_eval_forward(x, c, hw, &gamma, &beta, rm, rv), None)
            }
        }
    }

    /// The weight of conv unit `u` as the convolution reads it (fp16 packs for the
    /// tensor-core convs when storing in fp16; the first layer reads fp32).
    fn conv_weight(&self, u: &crate::model::ConvUnit) -> Vec<f64> {
        let w = self.p(&format!("{}.weight", u.conv));
        match u.inputs[..] {
            [(Src::Input, _)] => w,
            _ => self.storage.act(w),
        }
    }

    fn linear(&self, l: &Linear, x: &[f64], rows: usize) -> Vec<f64> {
        let (w, b) = (
            self.p(&format!("{}.weight", l.name)),
            self.p(&format!("{}.bias", l.name)),
        );
        linear_forward(x, rows, l.fin, &w, &b, l.fout)
    }
}

/// h [m, c, s2] ↔ [m, s2, c].
fn transpose(x: &[f64], m: usize, a: usize, b: usize) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for i in 0..m {
        for u in 0..a {
            for v in 0..b {
                y[(i * b + v) * a + u] = x[(i * a + u) * b + v];
            }
        }
    }
    y
}

fn add(dst: &mut Vec<f64>, src: &[f64]) {
    if dst.is_empty() {
        *dst = src.to_vec();
    } else {
        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
    }
}

/// One pass of `model` over patches [M, in_channels, p, p] in consecutive bags of
/// `bag_sizes`. With `labels` (seg [M, p, p], cls [bags]) it computes the losses of
/// docs/model.md and, in train mode, every parameter's gradient.
pub fn network_pass(
    model: &Model,
    patches: &[f32],
    p: usize,
    bag_sizes: &[usize],
    mode: Mode,
    labels: Option<(&[i64], &[i64])>,
    train: &TrainConfig,
) -> NetworkPass {
    network_pass_stored(
        model,
        patches,
        p,
        bag_sizes,
        mode,
        labels,
        train,
        Storage::Exact,
    )
}

/// [`network_pass`] with the tensors kept as `storage` says.
#[allow(clippy::too_many_arguments)]
pub fn network_pass_stored(
    model: &Model,
    patches: &[f32],
    p: usize,
    bag_sizes: &[usize],
    mode: Mode,
    labels: Option<(&[i64], &[i64])>,
    train: &TrainConfig,
    storage: Storage,
) -> NetworkPass {
    let arch = model.arch();
    let m: usize = bag_sizes.iter().sum();
    let mut net = Net {
        model,
        mode,
        buffers: model.buffers.iter().map(|&v| v as f64).collect(),
        storage,
    };
    let input: Vec<f64> = patches.iter().map(|&v| v as f64).collect();
    // Conv units, in order.
    let mut units: Vec<UnitSave> = vec![];
    for u in &arch.units {
        let r = p >> u.level;
        let parts: Vec<(Vec<f64>, usize)> = u
            .inputs
            .iter()
            .map(|&(src, c)| {
                let x = match src {
                    Src::Input => input.clone(),
                    Src::Unit(j) => units[j].y.clone(),
                    Src::Pooled(j) => maxpool2x2_forward(&units[j].y, units[j].yd(c)),
                    Src::Upsampled(j) => {
                        storage.act(upsample2x_forward(&units[j].y, units[j].yd(c)))
                    }
                };
                (x, c)
            })
            .collect();
        let refs: Vec<(&[f64], usize)> = parts.iter().map(|(x, c)| (x.as_slice(), *c)).collect();
        let x = concat_channels(&refs, m, r * r);
        let xd = Dims::new(m, u.cin(), r, r);
        let w = net.conv_weight(u);
        let b = net.p(&format!("{}.bias", u.conv));
        let z = storage.act(conv3x3_forward(&x, xd, &w, &b, u.cout));
        let (bn, batch) = net.batchnorm(&u.bn, &z, u.cout, r * r);
        let y = storage.act(relu_forward(&bn));
        units.push(UnitSave {
            x,
            xd,
            z,
            bn,
            y,
            batch,
        });
    }
    // Seg head.
    let seg = &arch.seg;
    let last = &units[seg.src];
    let seg_w = net.p(&format!("{}.weight", seg.name));
    let seg_b = net.p(&format!("{}.bias", seg.name));
    let seg_logits = conv1x1_forward(&last.y, last.yd(seg.cin), &seg_w, &seg_b, seg.classes);
    // MIL head.
    let mil = &arch.mil;
    let gcp = arch.config.gcp;
    let (bw, s2) = (mil.channels, (p >> mil.level) * (p >> mil.level));
    let (k1, k2) = (mil.emb_proj.fout, mil.img_proj.fout);
    let patch_bags: Vec<(usize, usize)> = (0..m).map(|i| (i * s2, s2)).collect();
    let mut start = 0;
    let bags: Vec<(usize, usize)> = bag_sizes
        .iter()
        .map(|&n| {
            start += n;
            (start - n, n)
        })
        .collect();
    let ht = transpose(&units[mil.src].y, m, bw, s2);
    let s = net.linear(&mil.emb_concepts, &ht, m * s2);
    let z = gcp_forward(&s, k1, &patch_bags, gcp);
    let q = net.linear(&mil.emb_proj, &z, m);
    let (bn, batch) = net.batchnorm(&mil.emb_bn, &q, k1, 1);
    let e = relu_forward(&bn);
    let t = net.linear(&mil.img_concepts, &e, m);
    let g = gcp_forward(&t, k2, &bags, gcp);
    let r = net.linear(&mil.img_proj, &g, bags.len());
    let v = relu_forward(&r);
    let cls_logits = net.linear(&mil.classifier, &v, bags.len());
    let mil_save = MilSave {
        ht,
        s,
        z,
        q,
        bn,
        batch,
        e,
        t,
        g,
        r,
        v,
    };
    let mut pass = NetworkPass {
        seg_logits,
        cls_logits,
        buffers: net.buffers.clone(),
        losses: None,
        grads: None,
    };
    let Some((seg_labels, cls_labels)) = labels else {
        return pass;
    };
    let sl = seg_loss(&pass.seg_logits, m, seg.classes, p * p, seg_labels);
    let weights = train.class_weights.map(|w| w.map(|v| v as f64));
    let (lc, dcls) = cls_loss(
        &pass.cls_logits,
        bags.len(),
        mil.classifier.fout,
        cls_labels,
        weights.as_ref().map(|w| w.as_slice()),
    );
    let lambda = train.lambda_seg as f64;
    pass.losses = Some([lc + lambda * (sl.ce + sl.dice), lc, sl.ce, sl.dice]);
    if mode == Mode::Train {
        let dseg: Vec<f64> = sl.dlogits.iter().map(|d| lambda * d).collect();
        pass.grads = Some(backward(
            &net,
            &units,
            &mil_save,
            &bags,
            &patch_bags,
            p,
            &dseg,
            &dcls,
        ));
    }
    pass
}

/// The reverse pass: the heads, then every unit in reverse order, routing input gradients
/// back through the pooling and upsampling they came through.
#[allow(clippy::too_many_arguments)]
fn backward(
    net: &Net,
    units: &[UnitSave],
    a: &MilSave,
    bags: &[(usize, usize)],
    patch_bags: &[(usize, usize)],
    p: usize,
    dseg: &[f64],
    dcls: &[f64],
) -> Vec<f64> {
    let (model, arch) = (net.model, net.model.arch());
    let mut grads = vec![0.0; model.params.len()];
    let mut put = |name: &str, g: &[f64]| {
        let r = model.table.range(name);
        grads[r].iter_mut().zip(g).for_each(|(d, s)| *d += s);
    };
    let mut dys: Vec<Vec<f64>> = vec![vec![]; units.len()];
    // Seg head.
    let seg = &arch.seg;
    let last = &units[seg.src];
    let gs = conv1x1_backward(
        &last.y,
        last.yd(seg.cin),
        &net.p(&format!("{}.weight", seg.name)),
        dseg,
        seg.classes,
    );
    put(&format!("{}.weight", seg.name), &gs.dw);
    put(&format!("{}.bias", seg.name), &gs.db);
    add(&mut dys[seg.src], &gs.dx);
    // MIL head.
    let mil = &arch.mil;
    let gcp = arch.config.gcp;
    let m = patch_bags.len();
    let (k1, k2, nb) = (mil.emb_proj.fout, mil.img_proj.fout, bags.len());
    let (bw, s2) = (mil.channels, (p >> mil.level) * (p >> mil.level));
    let mut lin = |l: &Linear, x: &[f64], rows: usize, dy: &[f64]| {
        let g = linear_backward(
            x,
            rows,
            l.fin,
            &net.p(&format!("{}.weight", l.name)),
            dy,
            l.fout,
        );
        put(&format!("{}.weight", l.name), &g.dw);
        put(&format!("{}.bias", l.name), &g.db);
        g.dx
    };
    let dv = lin(&mil.classifier, &a.v, nb, dcls);
    let dr = relu_backward(&a.r, &dv);
    let dg = lin(&mil.img_proj, &a.g, nb, &dr);
    let dt = gcp_backward(&a.t, k2, bags, gcp, &dg);
    let de = lin(&mil.img_concepts, &a.e, m, &dt);
    let dbn = relu_backward(&a.bn, &de);
    let gamma = net.p(&format!("{}.weight", mil.emb_bn));
    let gb = bn_train_backward(
        &a.q,
        k1,
        1,
        &gamma,
        a.batch.as_ref().expect("train mode"),
        &dbn,
    );
    let dq = gb.dx;
    let dz = lin(&mil.emb_proj, &a.z, m, &dq);
    let ds = gcp_backward(&a.s, k1, patch_bags, gcp, &dz);
    let dht = lin(&mil.emb_concepts, &a.ht, m * s2, &ds);
    put(&format!("{}.weight", mil.emb_bn), &gb.dgamma);
    put(&format!("{}.bias", mil.emb_bn), &gb.dbeta);
    add(&mut dys[mil.src], &transpose(&dht, m, s2, bw));
    // Conv units, in reverse.
    for (i, u) in arch.units.iter().enumerate().rev() {
        let s = &units[i];
        let r = s.xd.h;
        let dbn = relu_backward(&s.bn, &dys[i]);
        let gamma = net.p(&format!("{}.weight", u.bn));
        let gb = bn_train_backward(
            &s.z,
            u.cout,
            r * r,
            &gamma,
            s.batch.as_ref().expect("train mode"),
            &dbn,
        );
        let dz = net.storage.round(gb.dx);
        let gc = conv3x3_backward(&s.x, s.xd, &net.conv_weight(u), &dz, u.cout);
        put(&format!("{}.weight", u.bn), &gb.dgamma);
        put(&format!("{}.bias", u.bn), &gb.dbeta);
        put(&format!("{}.weight", u.conv), &gc.dw);
        put(&format!("{}.bias", u.conv), &gc.db);
        let channels: Vec<usize> = u.inputs.iter().map(|&(_, c)| c).collect();
        let dparts = split_channels(&gc.dx, s.xd.n, r * r, &channels);
        for (&(src, c), d) in u.inputs.iter().zip(dparts) {
            let d = net.storage.round(d);
            match src {
                Src::Input => {}
                Src::Unit(j) => add(&mut dys[j], &d),
                Src::Pooled(j) => {
                    let dj = maxpool2x2_backward(&units[j].y, units[j].yd(c), &d);
                    add(&mut dys[j], &dj);
                }
                Src::Upsampled(j) => {
                    let dj = upsample2x_backward(&d, units[j].yd(c));
                    add(&mut dys[j], &dj);
                }
            }
        }
    }
    grads
}
