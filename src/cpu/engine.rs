//! CPU engine orchestration: M²UNet forward (eval and train mode), the hand-written backward
//! in reverse order, and AdamW — over the f32 NCHW operators in `ops`.

use super::ops::{conv, linear, loss, mil, norm, optim, pool, tensor, upsample, Dims};
use crate::config::{GcpMode, ModelConfig, TrainConfig};
use crate::engine::{segment_count, Batch, InferenceEngine, LobeScores, Mode, Outputs};
use crate::model::{Arch, ConvUnit, Linear, Model, Src};
use anyhow::{bail, Result};
use std::cell::RefCell;

thread_local! {
    /// Large activation buffers of the last step on this thread, reused by the next step of the
    /// same shape so that steady-state steps do not pay page faults for fresh allocations.
    static POOL: RefCell<(StepShape, Vec<Vec<f32>>)> = RefCell::new(Default::default());
}

/// Patches per encoder pass of `classify` (bounds its memory whatever the bag size).
const CLASSIFY_CHUNK: usize = 4;

/// What decides a step's buffer sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct StepShape {
    m: usize,
    p: usize,
    train: bool,
}

/// Prepares this thread's pool for a step: buffers of a differently shaped step are released.
fn pool_begin(shape: StepShape) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.0 != shape {
            *pool = (shape, Vec::new());
        }
    });
}

/// A buffer of `n` values for an operator to overwrite: recycled from the pool (holding a
/// previous step's values) when one of that length is there, else freshly zeroed.
fn buffer(n: usize) -> Vec<f32> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let i = pool.1.iter().position(|v| v.len() == n)?;
        Some(pool.1.swap_remove(i))
    })
    .unwrap_or_else(|| vec![0f32; n])
}

/// Returns buffers to the pool (small ones are simply dropped).
fn recycle(bufs: impl IntoIterator<Item = Vec<f32>>) {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        pool.1
            .extend(bufs.into_iter().filter(|v| v.capacity() >= 1 << 16));
    });
}

/// The losses of one training forward.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Losses {
    /// `cls + λ_seg (seg_ce + seg_dice)`.
    pub total: f32,
    pub cls: f32,
    pub seg_ce: f32,
    pub seg_dice: f32,
}

/// What a forward (and, with labels in train mode, a backward) produced.
#[derive(Clone, Debug, Default)]
pub struct StepResult {
    pub outputs: Outputs,
    pub losses: Option<Losses>,
    /// Gradients of `losses.total`, laid out as the flat parameter buffer.
    pub grads: Option<Vec<f32>>,
}

/// Saved activations of one conv3×3 → BatchNorm → ReLU unit of the architecture.
struct UnitActs {
    /// Input shape (channels: all concatenated parts).
    xd: Dims,
    cout: usize,
    /// The materialised ×2 upsampling of an `Src::Upsampled` input part (else empty).
    up: Vec<f32>,
    /// Convolution output (train mode only).
    z: Vec<f32>,
    /// relu(bn(z)).
    y: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
    /// 2×2 max-pool of y and its window argmax (units the architecture marks `pooled`).
    pooled: Vec<f32>,
    argmax: Vec<u8>,
}

impl UnitActs {
    /// Hands the large buffers back to the pool for the next step.
    fn recycle(self) {
        recycle([self.up, self.z, self.y, self.pooled]);
    }

    fn yd(&self) -> Dims {
        Dims::new(self.xd.n, self.cout, self.xd.h, self.xd.w)
    }
}

/// The hierarchical MIL head's activations (names as in docs/model.md).
struct MilActs {
    /// h transposed to [M, S², B] (one row per instance).
    ht: Vec<f32>,
    /// GCP argmax of the concept scores [M·S², K1].
    s_arg: Vec<usize>,
    /// [M, K1]
    z: Vec<f32>,
    /// proj(z) before BN, [M, K1].
    q: Vec<f32>,
    e: Vec<f32>,
    e_mean: Vec<f32>,
    e_invstd: Vec<f32>,
    /// GCP argmax of the image-level concept scores [M, K2].
    t_arg: Vec<usize>,
    /// [bags, K2]
    g: Vec<f32>,
    v: Vec<f32>,
    cls_logits: Vec<f32>,
}

/// Everything the backward needs from a forward.
struct Acts {
    /// One entry per `Arch::units`, same order.
    units: Vec<UnitActs>,
    mil: Option<MilActs>,
    seg_logits: Vec<f32>,
}

impl Acts {
    /// Hands the large activation buffers back to the pool for the next step.
    fn recycle(self) {
        self.units.into_iter().for_each(UnitActs::recycle);
        recycle([self.seg_logits]);
    }
}

/// The input parts of `unit`, in concatenation order, with their channels.
fn input_parts<'a>(
    unit: &ConvUnit,
    patches: &'a [f32],
    units: &'a [UnitActs],
    up: &'a [f32],
) -> Vec<(&'a [f32], usize)> {
    unit.inputs
        .iter()
        .map(|&(src, c)| {
            let x: &[f32] = match src {
                Src::Input => patches,
                Src::Unit(j) => &units[j].y,
                Src::Pooled(j) => &units[j].pooled,
                Src::Upsampled(_) => up,
            };
            (x, c)
        })
        .collect()
}

/// Two disjoint mutable slices of one buffer: `a` must end where `b` starts (a weight and its
/// bias, a BN's γ and β — adjacent by the parameter table's construction).
fn pair_mut<'a>(
    buf: &'a mut [f32],
    model: &Model,
    a: &str,
    b: &str,
) -> (&'a mut [f32], &'a mut [f32]) {
    let (ra, rb) = (model.table.range(a), model.table.range(b));
    debug_assert_eq!(ra.end, rb.start);
    let (x, y) = buf[ra.start..rb.end].split_at_mut(ra.len());
    (x, y)
}

/// Adds `d` into the gradient slot `slot` (taking it over when the slot is still empty).
fn accumulate(slot: &mut Vec<f32>, d: Vec<f32>) {
    if slot.is_empty() {
        *slot = d;
    } else {
        slot.iter_mut().zip(&d).for_each(|(s, v)| *s += v);
        recycle([d]);
    }
}

/// The forward and backward passes over one model, walking its `Arch`.
struct Net<'m> {
    model: &'m mut Model,
    arch: Arch,
    mode: Mode,
}

impl<'m> Net<'m> {
    fn new(model: &'m mut Model, mode: Mode) -> Self {
        let arch = model.arch().clone();
        Net { model, arch, mode }
    }

    fn p(&self, name: &str) -> &[f32] {
        self.model.param(name)
    }

    /// conv3×3 → BN → ReLU. Train: batch statistics, running stats updated. Eval: BN folded.
    /// The input is the channel concatenation of `parts` ([n, c_i, h, w] each), never copied.
    fn unit(&mut self, parts: &[(&[f32], usize)], xd: Dims, u: &ConvUnit) -> UnitActs {
        let cout = u.cout;
        let yd = Dims::new(xd.n, cout, xd.h, xd.w);
        let mut y = buffer(yd.len());
        let mut acts = UnitActs {
            xd,
            cout,
            up: vec![],
            z: vec![],
            y: vec![],
            mean: vec![],
            invstd: vec![],
            pooled: vec![],
            argmax: vec![],
        };
        match self.mode {
            Mode::Train => {
                let mut z = buffer(yd.len());
                let (w, b) = (format!("{}.weight", u.conv), format!("{}.bias", u.conv));
                conv::conv3x3_forward_concat(
                    parts,
                    xd,
                    self.p(&w),
                    self.p(&b),
                    cout,
                    false,
                    &mut z,
                );
                let (mut mean, mut invstd) = (vec![0f32; cout], vec![0f32; cout]);
                self.bn_relu_train(
                    &u.bn,
                    &z,
                    xd.n,
                    cout,
                    xd.hw(),
                    &mut y,
                    &mut mean,
                    &mut invstd,
                );
                (acts.z, acts.mean, acts.invstd) = (z, mean, invstd);
            }
            Mode::Eval => {
                let (wf, bf) = self.model.folded(&u.conv, &u.bn);
                conv::conv3x3_forward_concat(parts, xd, &wf, &bf, cout, true, &mut y);
            }
        }
        acts.y = y;
        acts
    }

    /// Train-mode BatchNorm `bn` + ReLU of x [n, c, hw]: batch statistics (kept in `mean`,
    /// `invstd`), running statistics and the batch counter updated.
    #[allow(clippy::too_many_arguments)]
    fn bn_relu_train(
        &mut self,
        bn: &str,
        x: &[f32],
        n: usize,
        c: usize,
        hw: usize,
        y: &mut [f32],
        mean: &mut [f32],
        invstd: &mut [f32],
    ) {
        let m = &mut *self.model;
        let e = m.table.bn(bn).clone();
        let (g, b) = (
            &m.params[m.table.range(&format!("{bn}.weight"))],
            &m.params[m.table.range(&format!("{bn}.bias"))],
        );
        let (rm, rv) = m.buffers[e.offset..e.offset + 2 * c].split_at_mut(c);
        norm::bn_relu_train_forward(x, n, c, hw, g, b, y, mean, invstd, rm, rv);
        m.batches_tracked[m.table.bn_position(bn)] += 1;
    }

    /// The first `count` conv units of the architecture, in order, on patches
    /// [m, in_channels, p, p] (a unit only reads the input or earlier units).
    fn units(&mut self, patches: &[f32], m: usize, p: usize, count: usize) -> Vec<UnitActs> {
        let arch_units = std::mem::take(&mut self.arch.units);
        let mut acts: Vec<UnitActs> = Vec::with_capacity(count);
        for u in &arch_units[..count] {
            let side = p >> u.level;
            let mut up = vec![];
            if let Some(&(Src::Upsampled(j), c)) = u
                .inputs
                .iter()
                .find(|(s, _)| matches!(s, Src::Upsampled(_)))
            {
                let low = Dims::new(m, c, side / 2, side / 2);
                up = buffer(4 * low.len());
                upsample::upsample2x_forward(&acts[j].y, low, &mut up);
            }
            let parts = input_parts(u, patches, &acts, &up);
            let mut a = self.unit(&parts, Dims::new(m, u.cin(), side, side), u);
            if u.pooled {
                a.pooled = buffer(a.yd().len() / 4);
                a.argmax = vec![0u8; a.pooled.len()];
                pool::maxpool2x2_forward(&a.y, a.yd(), &mut a.pooled, &mut a.argmax);
            }
            a.up = up;
            acts.push(a);
        }
        self.arch.units = arch_units;
        acts
    }

    fn linear(&self, l: &Linear, x: &[f32], rows: usize, y: &mut [f32]) {
        let (w, b) = (format!("{}.weight", l.name), format!("{}.bias", l.name));
        linear::linear_forward(x, rows, l.fin, self.p(&w), self.p(&b), l.fout, y);
    }

    fn mil_head(&mut self, h: &[f32], hd: Dims, bags: &[(usize, usize)]) -> MilActs {
        let mil = self.arch.mil.clone();
        let gcp = self.arch.config.gcp;
        let (m, bw, s2) = (hd.n, hd.c, hd.hw());
        let (k1, k2, nc) = (mil.emb_proj.fout, mil.img_proj.fout, mil.classifier.fout);
        let mut ht = vec![0f32; h.len()];
        tensor::transpose_cs(h, m, bw, s2, &mut ht);
        let mut s = vec![0f32; m * s2 * k1];
        self.linear(&mil.emb_concepts, &ht, m * s2, &mut s);
        let patch_bags: Vec<(usize, usize)> = (0..m).map(|i| (i * s2, s2)).collect();
        let (mut z, mut s_arg) = (vec![0f32; m * k1], vec![0usize; m * k1]);
        mil::gcp_forward(&s, k1, &patch_bags, gcp, &mut z, &mut s_arg);
        let mut q = vec![0f32; m * k1];
        self.linear(&mil.emb_proj, &z, m, &mut q);
        let mut e = vec![0f32; m * k1];
        let (mut e_mean, mut e_invstd) = (vec![], vec![]);
        match self.mode {
            Mode::Train => {
                (e_mean, e_invstd) = (vec![0f32; k1], vec![0f32; k1]);
                self.bn_relu_train(
                    &mil.emb_bn,
                    &q,
                    m,
                    k1,
                    1,
                    &mut e,
                    &mut e_mean,
                    &mut e_invstd,
                );
            }
            Mode::Eval => {
                let md = &*self.model;
                let bn = md.table.bn(&mil.emb_bn);
                norm::bn_relu_eval_forward(
                    &q,
                    m,
                    k1,
                    1,
                    md.param(&format!("{}.weight", mil.emb_bn)),
                    md.param(&format!("{}.bias", mil.emb_bn)),
                    &md.buffers[bn.mean_range()],
                    &md.buffers[bn.var_range()],
                    &mut e,
                );
            }
        }
        let mut t = vec![0f32; m * k2];
        self.linear(&mil.img_concepts, &e, m, &mut t);
        let nb = bags.len();
        let (mut g, mut t_arg) = (vec![0f32; nb * k2], vec![0usize; nb * k2]);
        mil::gcp_forward(&t, k2, bags, gcp, &mut g, &mut t_arg);
        let mut r = vec![0f32; nb * k2];
        self.linear(&mil.img_proj, &g, nb, &mut r);
        let mut v = vec![0f32; nb * k2];
        tensor::relu_forward(&r, &mut v);
        let mut cls_logits = vec![0f32; nb * nc];
        self.linear(&mil.classifier, &v, nb, &mut cls_logits);
        MilActs {
            ht,
            s_arg,
            z,
            q,
            e,
            e_mean,
            e_invstd,
            t_arg,
            g,
            v,
            cls_logits,
        }
    }

    /// The whole forward; the MIL head only when `bags` is given.
    fn forward(
        &mut self,
        patches: &[f32],
        m: usize,
        p: usize,
        bags: Option<&[(usize, usize)]>,
    ) -> Acts {
        let units = self.units(patches, m, p, self.arch.units.len());
        let h = &units[self.arch.mil.src];
        let mil = bags.map(|b| self.mil_head(&h.y, h.yd(), b));
        let seg = &self.arch.seg;
        let last = &units[seg.src];
        let mut seg_logits = buffer(m * seg.classes * last.xd.hw());
        conv::conv1x1_forward(
            &last.y,
            last.yd(),
            self.p(&format!("{}.weight", seg.name)),
            self.p(&format!("{}.bias", seg.name)),
            seg.classes,
            &mut seg_logits,
        );
        Acts {
            units,
            mil,
            seg_logits,
        }
    }

    /// Backward of one unit given d relu(bn(z)); writes the conv/BN gradients and, when asked,
    /// returns the input gradient of each of the unit's input parts.
    fn unit_backward(
        &self,
        grads: &mut [f32],
        u: &ConvUnit,
        a: &UnitActs,
        parts: &[(&[f32], usize)],
        dy: &[f32],
        want_dx: bool,
    ) -> Vec<Vec<f32>> {
        let yd = a.yd();
        let mut dz = buffer(yd.len());
        let (gamma, beta) = (format!("{}.weight", u.bn), format!("{}.bias", u.bn));
        let (dgamma, dbeta) = pair_mut(grads, self.model, &gamma, &beta);
        norm::bn_relu_backward(
            &a.z,
            &a.y,
            yd.n,
            yd.c,
            yd.hw(),
            self.p(&gamma),
            &a.mean,
            &a.invstd,
            dy,
            &mut dz,
            dgamma,
            dbeta,
        );
        let hw = a.xd.hw();
        let mut dx: Vec<Vec<f32>> = match want_dx {
            true => parts
                .iter()
                .map(|&(_, c)| buffer(a.xd.n * c * hw))
                .collect(),
            false => vec![],
        };
        let (w, b) = (format!("{}.weight", u.conv), format!("{}.bias", u.conv));
        let (dw, db) = pair_mut(grads, self.model, &w, &b);
        let mut dx_parts: Vec<Option<&mut [f32]>> = match want_dx {
            true => dx.iter_mut().map(|d| Some(d.as_mut_slice())).collect(),
            false => parts.iter().map(|_| None).collect(),
        };
        conv::conv3x3_backward_concat(parts, a.xd, self.p(&w), &dz, a.cout, &mut dx_parts, dw, db);
        // The bias feeds a train-mode BatchNorm, which removes any per-channel shift.
        db.fill(0.0);
        recycle([dz]);
        dx
    }

    /// Backward of a linear layer. `bias_is_shift_invariant`: the layer feeds an op that removes
    /// a constant shift (train-mode BatchNorm, max − mean pooling), so the bias's exact gradient
    /// is zero.
    fn linear_backward(
        &self,
        grads: &mut [f32],
        l: &Linear,
        bias_is_shift_invariant: bool,
        x: &[f32],
        rows: usize,
        dy: &[f32],
    ) -> Vec<f32> {
        let mut dx = vec![0f32; rows * l.fin];
        let (w, b) = (format!("{}.weight", l.name), format!("{}.bias", l.name));
        let (dw, db) = pair_mut(grads, self.model, &w, &b);
        linear::linear_backward(
            x,
            rows,
            l.fin,
            self.p(&w),
            dy,
            l.fout,
            Some(&mut dx),
            dw,
            db,
        );
        if bias_is_shift_invariant {
            db.fill(0.0);
        }
        dx
    }

    /// Backward of the MIL head from d cls_logits; returns dh [M, B, S²].
    fn mil_backward(
        &self,
        grads: &mut [f32],
        a: &MilActs,
        hd: Dims,
        bags: &[(usize, usize)],
        dcls: &[f32],
    ) -> Vec<f32> {
        let mil = &self.arch.mil;
        let gcp = self.arch.config.gcp;
        let (m, bw, s2) = (hd.n, hd.c, hd.hw());
        let (k1, k2, nb) = (mil.emb_proj.fout, mil.img_proj.fout, bags.len());
        let contrast = gcp == GcpMode::MaxMinusMean;
        let dv = self.linear_backward(grads, &mil.classifier, false, &a.v, nb, dcls);
        let mut dr = vec![0f32; nb * k2];
        tensor::relu_backward(&a.v, &dv, &mut dr);
        let dg = self.linear_backward(grads, &mil.img_proj, false, &a.g, nb, &dr);
        let mut dt = vec![0f32; m * k2];
        mil::gcp_backward(&dg, k2, bags, gcp, &a.t_arg, &mut dt);
        let de = self.linear_backward(grads, &mil.img_concepts, contrast, &a.e, m, &dt);
        let mut dq = vec![0f32; m * k1];
        let (gamma, beta) = (
            format!("{}.weight", mil.emb_bn),
            format!("{}.bias", mil.emb_bn),
        );
        let (dgamma, dbeta) = pair_mut(grads, self.model, &gamma, &beta);
        norm::bn_relu_backward(
            &a.q,
            &a.e,
            m,
            k1,
            1,
            self.p(&gamma),
            &a.e_mean,
            &a.e_invstd,
            &de,
            &mut dq,
            dgamma,
            dbeta,
        );
        let dz = self.linear_backward(grads, &mil.emb_proj, true, &a.z, m, &dq);
        let patch_bags: Vec<(usize, usize)> = (0..m).map(|i| (i * s2, s2)).collect();
        let mut ds = vec![0f32; m * s2 * k1];
        mil::gcp_backward(&dz, k1, &patch_bags, gcp, &a.s_arg, &mut ds);
        // Whatever the GCP mode, the concepts reach a train-mode BatchNorm through emb_proj,
        // which centres them: their bias's exact gradient is 0.
        let dht = self.linear_backward(grads, &mil.emb_concepts, true, &a.ht, m * s2, &ds);
        let mut dh = vec![0f32; m * bw * s2];
        tensor::transpose_cs(&dht, m, s2, bw, &mut dh);
        dh
    }

    /// The whole backward: the heads, then every unit in reverse order, each routing its
    /// input gradients to the units it read (through the pooling or upsampling it read by).
    fn backward(
        &self,
        a: &Acts,
        patches: &[f32],
        bags: &[(usize, usize)],
        dseg: &[f32],
        dcls: &[f32],
    ) -> Vec<f32> {
        let (arch, n) = (&self.arch, self.arch.units.len());
        let mut grads = vec![0f32; self.model.params.len()];
        // dy of every unit's output, filled by the units (and heads) that read it.
        let mut dys: Vec<Vec<f32>> = vec![vec![]; n];
        let seg = &arch.seg;
        let last = &a.units[seg.src];
        let mut dx = buffer(last.y.len());
        let (w, b) = (format!("{}.weight", seg.name), format!("{}.bias", seg.name));
        let (dw, db) = pair_mut(&mut grads, self.model, &w, &b);
        conv::conv1x1_backward(
            &last.y,
            last.yd(),
            self.p(&w),
            dseg,
            seg.classes,
            Some(&mut dx),
            dw,
            db,
        );
        accumulate(&mut dys[seg.src], dx);
        if let Some(mil_acts) = &a.mil {
            let h = &a.units[arch.mil.src];
            let dh = self.mil_backward(&mut grads, mil_acts, h.yd(), bags, dcls);
            accumulate(&mut dys[arch.mil.src], dh);
        }
        for (i, u) in arch.units.iter().enumerate().rev() {
            let ua = &a.units[i];
            let dy = std::mem::take(&mut dys[i]);
            let parts = input_parts(u, patches, &a.units, &ua.up);
            let want_dx = u.inputs.iter().any(|&(s, _)| s != Src::Input);
            let dparts = self.unit_backward(&mut grads, u, ua, &parts, &dy, want_dx);
            for (&(src, _), d) in u.inputs.iter().zip(dparts) {
                match src {
                    Src::Input => recycle([d]),
                    Src::Unit(j) => accumulate(&mut dys[j], d),
                    Src::Pooled(j) => {
                        let mut dj = buffer(a.units[j].y.len());
                        pool::maxpool2x2_backward(&d, a.units[j].yd(), &a.units[j].argmax, &mut dj);
                        accumulate(&mut dys[j], dj);
                        recycle([d]);
                    }
                    Src::Upsampled(j) => {
                        let mut dj = buffer(a.units[j].y.len());
                        upsample::upsample2x_backward(&d, a.units[j].yd(), &mut dj);
                        accumulate(&mut dys[j], dj);
                        recycle([d]);
                    }
                }
            }
            recycle([dy]);
        }
        grads
    }
}

/// Runs one forward (and, in train mode with both label sets, the backward) of `batch`.
/// Train mode updates the model's BN running statistics.
pub fn run_step(
    model: &mut Model,
    batch: &Batch,
    mode: Mode,
    train: &TrainConfig,
) -> Result<StepResult> {
    let cfg = *model.config();
    batch.validate(&cfg)?;
    let (m, p) = (batch.patches_count(), batch.patch);
    pool_begin(StepShape {
        m,
        p,
        train: mode == Mode::Train,
    });
    let bags = batch.bag_ranges();
    let mut net = Net::new(model, mode);
    let mut acts = net.forward(batch.patches, m, p, Some(&bags));
    let cls_logits = acts
        .mil
        .as_ref()
        .expect("the MIL head ran")
        .cls_logits
        .clone();
    let (losses, grads) = match (batch.seg_labels, batch.cls_labels) {
        (Some(seg_labels), Some(cls_labels)) => {
            let backward = mode == Mode::Train;
            let mut dseg = if backward {
                buffer(acts.seg_logits.len())
            } else {
                vec![]
            };
            let mut dcls = if backward {
                vec![0f32; cls_logits.len()]
            } else {
                vec![]
            };
            let (seg_ce, seg_dice) = loss::seg_loss(
                &acts.seg_logits,
                m,
                cfg.seg_classes,
                p * p,
                seg_labels,
                train.lambda_seg,
                backward.then_some(dseg.as_mut_slice()),
            )?;
            let cls = loss::cls_loss(
                &cls_logits,
                bags.len(),
                cfg.cls_classes,
                cls_labels,
                train.class_weights.as_ref().map(|w| w.as_slice()),
                1.0,
                backward.then_some(dcls.as_mut_slice()),
            )?;
            let total = cls + train.lambda_seg * (seg_ce + seg_dice);
            let grads = backward.then(|| net.backward(&acts, batch.patches, &bags, &dseg, &dcls));
            recycle([dseg]);
            (
                Some(Losses {
                    total,
                    cls,
                    seg_ce,
                    seg_dice,
                }),
                grads,
            )
        }
        _ => (None, None),
    };
    let seg_logits = std::mem::take(&mut acts.seg_logits);
    acts.recycle();
    Ok(StepResult {
        outputs: Outputs {
            seg_logits,
            cls_logits,
        },
        losses,
        grads,
    })
}

/// A model with its AdamW state.
#[derive(Clone, Debug)]
pub struct Trainer {
    pub model: Model,
    pub config: TrainConfig,
    /// First and second moments, laid out as the parameters.
    pub m: Vec<f32>,
    pub v: Vec<f32>,
    /// Optimiser steps taken.
    pub step: u64,
}

impl Trainer {
    pub fn new(model: Model, config: TrainConfig) -> Self {
        let n = model.params.len();
        Trainer {
            model,
            config,
            m: vec![0f32; n],
            v: vec![0f32; n],
            step: 0,
        }
    }

    /// One training step: train-mode forward, backward, AdamW. Returns the step's losses
    /// (computed before the update).
    pub fn step(&mut self, batch: &Batch) -> Result<Losses> {
        if batch.seg_labels.is_none() || batch.cls_labels.is_none() {
            bail!("a training step needs seg_labels and cls_labels");
        }
        let r = run_step(&mut self.model, batch, Mode::Train, &self.config)?;
        let grads = r.grads.expect("labels given");
        self.step += 1;
        optim::adamw_step(
            &mut self.model.params,
            &grads,
            &mut self.m,
            &mut self.v,
            self.step,
            &self.config,
        );
        Ok(r.losses.expect("labels given"))
    }
}

/// The CPU engine for inference.
pub struct CpuEngine {
    pub model: Model,
}

impl CpuEngine {
    pub fn new(model: Model) -> Self {
        CpuEngine { model }
    }
}

impl InferenceEngine for CpuEngine {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }

    fn forward_eval(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Outputs> {
        let batch = Batch::unlabelled(patches, bag_sizes, self.model.config().in_channels)?;
        Ok(run_step(&mut self.model, &batch, Mode::Eval, &TrainConfig::default())?.outputs)
    }

    fn classify(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Vec<f32>> {
        let batch = Batch::unlabelled(patches, bag_sizes, self.model.config().in_channels)?;
        batch.validate(self.model.config())?;
        let (m, p) = (batch.patches_count(), batch.patch);
        let mut net = Net::new(&mut self.model, Mode::Eval);
        let mil = net.arch.mil.clone();
        let side = p >> mil.level;
        let per = patches.len() / m;
        // Eval-mode BatchNorm treats every patch alone, so the encoder runs in chunks and only
        // h (the MIL head's input) is kept for the whole bag.
        let mut h = Vec::with_capacity(m * mil.channels * side * side);
        for start in (0..m).step_by(CLASSIFY_CHUNK) {
            let n = CLASSIFY_CHUNK.min(m - start);
            pool_begin(StepShape {
                m: n,
                p,
                train: false,
            });
            let chunk = &patches[start * per..(start + n) * per];
            let acts = net.units(chunk, n, p, mil.src + 1);
            h.extend_from_slice(&acts[mil.src].y);
            acts.into_iter().for_each(UnitActs::recycle);
        }
        let hd = Dims::new(m, mil.channels, side, side);
        Ok(net.mil_head(&h, hd, &batch.bag_ranges()).cls_logits)
    }

    fn segment(&mut self, patches: &[f32], p: usize, costs: bool) -> Result<LobeScores> {
        let m = segment_count(self.model.config(), patches, p)?;
        pool_begin(StepShape { m, p, train: false });
        let mut net = Net::new(&mut self.model, Mode::Eval);
        let acts = net.forward(patches, m, p, None);
        let scores = LobeScores::from_logits(&acts.seg_logits, net.arch.seg.classes, p * p, costs);
        acts.recycle();
        Ok(scores)
    }
}
