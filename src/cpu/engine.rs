//! CPU engine orchestration: M²UNet forward (eval and train mode), the hand-written backward
//! in reverse order, and AdamW — over the f32 NCHW operators in `ops`.

use super::ops::{conv, linear, loss, mil, norm, optim, pool, tensor, upsample, Dims};
use crate::config::{GcpMode, ModelConfig, TrainConfig};
use crate::engine::{InferenceEngine, Outputs};
use crate::model::Model;
use anyhow::{bail, Result};
use std::cell::RefCell;

thread_local! {
    /// Large activation buffers of the last step on this thread, reused by the next step of the
    /// same shape so that steady-state steps do not pay page faults for fresh allocations.
    static POOL: RefCell<(StepShape, Vec<Vec<f32>>)> = RefCell::new(Default::default());
}

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

/// Which BatchNorm statistics the forward uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Running statistics (BN folded into the convolutions).
    Eval,
    /// Batch statistics; running statistics are updated as PyTorch does.
    Train,
}

/// One batch of bags: patches [M, in_channels, P, P] and optional labels.
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub patches: &'a [f32],
    pub patch: usize,
    /// Consecutive bags over the M patches (each ≥ 2).
    pub bag_sizes: &'a [usize],
    /// [M, P, P], 0..seg_classes or −1 (ignore).
    pub seg_labels: Option<&'a [i64]>,
    /// [bags], 0..cls_classes.
    pub cls_labels: Option<&'a [i64]>,
}

impl Batch<'_> {
    pub fn patches_count(&self) -> usize {
        self.bag_sizes.iter().sum()
    }

    /// Checks shapes and bag sizes against the model config.
    pub fn validate(&self, cfg: &ModelConfig) -> Result<()> {
        let p = self.patch;
        if p == 0 || !p.is_multiple_of(16) {
            bail!("patch side {p} is not a positive multiple of 16");
        }
        if self.bag_sizes.is_empty() {
            bail!("a batch needs at least one bag");
        }
        if let Some((i, n)) = self.bag_sizes.iter().enumerate().find(|(_, &n)| n < 2) {
            bail!("bag {i} has {n} patch(es); a bag needs at least 2 for multi-instance pooling");
        }
        let m = self.patches_count();
        let want = m * cfg.in_channels * p * p;
        if self.patches.len() != want {
            bail!(
                "patches hold {} values, but bag sizes {:?} (M = {m}) with {} channel(s) of {p}×{p} need {want}",
                self.patches.len(),
                self.bag_sizes,
                cfg.in_channels
            );
        }
        if let Some(l) = self.seg_labels {
            if l.len() != m * p * p {
                bail!(
                    "seg_labels hold {} values, expected M·P·P = {}",
                    l.len(),
                    m * p * p
                );
            }
        }
        if let Some(l) = self.cls_labels {
            if l.len() != self.bag_sizes.len() {
                bail!(
                    "cls_labels hold {} values, expected one per bag ({})",
                    l.len(),
                    self.bag_sizes.len()
                );
            }
        }
        Ok(())
    }

    /// (start, len) of each bag over the patches.
    fn bag_ranges(&self) -> Vec<(usize, usize)> {
        let mut start = 0;
        self.bag_sizes
            .iter()
            .map(|&n| {
                start += n;
                (start - n, n)
            })
            .collect()
    }
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

/// Saved activations of one conv3×3 → BatchNorm → ReLU unit.
struct Unit {
    conv: String,
    bn: String,
    /// Input shape; the input itself is the previous stage's output.
    xd: Dims,
    cout: usize,
    /// Convolution output (train mode only).
    z: Vec<f32>,
    /// relu(bn(z)).
    y: Vec<f32>,
    mean: Vec<f32>,
    invstd: Vec<f32>,
}

impl Unit {
    fn buffers(self) -> [Vec<f32>; 2] {
        [self.z, self.y]
    }

    fn yd(&self) -> Dims {
        Dims::new(self.xd.n, self.cout, self.xd.h, self.xd.w)
    }
}

/// One encoder block: two units and (blocks 1–4) the 2×2 max-pooled output.
struct EncBlock {
    c1: Unit,
    c2: Unit,
    pooled: Vec<f32>,
    argmax: Vec<u8>,
}

/// One decoder block: upsampled input, up_conv unit, then two units (the first reads the
/// concat of the up_conv output and the skip).
struct DecBlock {
    up: Vec<f32>,
    u: Unit,
    c1: Unit,
    c2: Unit,
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
    enc: Vec<EncBlock>,
    mil: Option<MilActs>,
    dec: Vec<DecBlock>,
    seg_logits: Vec<f32>,
}

impl Acts {
    /// Hands the large activation buffers back to the pool for the next step.
    fn recycle(self) {
        for b in self.enc {
            recycle(
                b.c1.buffers()
                    .into_iter()
                    .chain(b.c2.buffers())
                    .chain([b.pooled]),
            );
        }
        for b in self.dec {
            let units = [b.u, b.c1, b.c2].into_iter().flat_map(Unit::buffers);
            recycle(units.chain([b.up]));
        }
        recycle([self.seg_logits]);
    }
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

fn add_into(dst: &mut [f32], src: &[f32]) {
    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
}

/// The forward and backward passes over one model.
struct Net<'m> {
    model: &'m mut Model,
    mode: Mode,
}

impl Net<'_> {
    fn p(&self, name: &str) -> &[f32] {
        self.model.param(name)
    }

    /// conv3×3 → BN → ReLU. Train: batch statistics, running stats updated. Eval: BN folded.
    /// The input is the channel concatenation of `parts` ([n, c_i, h, w] each), never copied.
    fn unit(
        &mut self,
        parts: &[(&[f32], usize)],
        xd: Dims,
        conv_name: &str,
        bn_name: &str,
        cout: usize,
    ) -> Unit {
        let (w, b) = (format!("{conv_name}.weight"), format!("{conv_name}.bias"));
        let (gamma, beta) = (format!("{bn_name}.weight"), format!("{bn_name}.bias"));
        let yd = Dims::new(xd.n, cout, xd.h, xd.w);
        let mut y = buffer(yd.len());
        let bn = self.model.table.bn(bn_name).clone();
        let mut unit = Unit {
            conv: conv_name.to_string(),
            bn: bn_name.to_string(),
            xd,
            cout,
            z: vec![],
            y: vec![],
            mean: vec![],
            invstd: vec![],
        };
        match self.mode {
            Mode::Train => {
                let mut z = buffer(yd.len());
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
                let bn_idx = self.bn_index(bn_name);
                let m = &mut *self.model;
                let (g, bt) = (
                    &m.params[m.table.range(&gamma)],
                    &m.params[m.table.range(&beta)],
                );
                let (rm, rv) = m.buffers[bn.offset..bn.offset + 2 * cout].split_at_mut(cout);
                norm::bn_relu_train_forward(
                    &z,
                    xd.n,
                    cout,
                    xd.hw(),
                    g,
                    bt,
                    &mut y,
                    &mut mean,
                    &mut invstd,
                    rm,
                    rv,
                );
                m.batches_tracked[bn_idx] += 1;
                (unit.z, unit.mean, unit.invstd) = (z, mean, invstd);
            }
            Mode::Eval => {
                let k = xd.c * 9;
                let (mut wf, mut bf) = (vec![0f32; cout * k], vec![0f32; cout]);
                let m = &*self.model;
                norm::fold_bn(
                    m.param(&w),
                    m.param(&b),
                    cout,
                    m.param(&gamma),
                    m.param(&beta),
                    &m.buffers[bn.mean_range()],
                    &m.buffers[bn.var_range()],
                    &mut wf,
                    &mut bf,
                );
                conv::conv3x3_forward_concat(parts, xd, &wf, &bf, cout, true, &mut y);
            }
        }
        unit.y = y;
        unit
    }

    fn bn_index(&self, module: &str) -> usize {
        self.model
            .table
            .bns
            .iter()
            .position(|b| b.module == module)
            .expect("known BN")
    }

    fn encoder(&mut self, x: &[f32], m: usize, p: usize) -> Vec<EncBlock> {
        let cfg = *self.model.config();
        let (w, b) = (cfg.enc_width, cfg.bottleneck_width);
        let mut blocks: Vec<EncBlock> = Vec::with_capacity(5);
        for k in 0..5 {
            let side = p >> k;
            let (cin, cout) = match k {
                0 => (cfg.in_channels, w),
                4 => (w, b),
                _ => (w, w),
            };
            let xd = Dims::new(m, cin, side, side);
            let input: &[f32] = match blocks.last() {
                Some(prev) => &prev.pooled,
                None => x,
            };
            let name = format!("enc{}", k + 1);
            let c1 = self.unit(
                &[(input, cin)],
                xd,
                &format!("{name}.conv1"),
                &format!("{name}.bn1"),
                cout,
            );
            let c2 = self.unit(
                &[(&c1.y, cout)],
                c1.yd(),
                &format!("{name}.conv2"),
                &format!("{name}.bn2"),
                cout,
            );
            let (mut pooled, mut argmax) = (vec![], vec![]);
            if k < 4 {
                pooled = buffer(c2.yd().len() / 4);
                argmax = vec![0u8; pooled.len()];
                pool::maxpool2x2_forward(&c2.y, c2.yd(), &mut pooled, &mut argmax);
            }
            blocks.push(EncBlock {
                c1,
                c2,
                pooled,
                argmax,
            });
        }
        blocks
    }

    fn mil_head(&mut self, h: &[f32], hd: Dims, bags: &[(usize, usize)]) -> MilActs {
        let cfg = *self.model.config();
        let (m, bw, s2) = (hd.n, hd.c, hd.hw());
        let (k1, k2, nc) = (cfg.emb_concepts, cfg.img_concepts, cfg.cls_classes);
        let mut ht = vec![0f32; h.len()];
        tensor::transpose_cs(h, m, bw, s2, &mut ht);
        let mut s = vec![0f32; m * s2 * k1];
        linear::linear_forward(
            &ht,
            m * s2,
            bw,
            self.p("mil_emb.concepts.weight"),
            self.p("mil_emb.concepts.bias"),
            k1,
            &mut s,
        );
        let patch_bags: Vec<(usize, usize)> = (0..m).map(|i| (i * s2, s2)).collect();
        let (mut z, mut s_arg) = (vec![0f32; m * k1], vec![0usize; m * k1]);
        mil::gcp_forward(&s, k1, &patch_bags, cfg.gcp, &mut z, &mut s_arg);
        let mut q = vec![0f32; m * k1];
        linear::linear_forward(
            &z,
            m,
            k1,
            self.p("mil_emb.proj.weight"),
            self.p("mil_emb.proj.bias"),
            k1,
            &mut q,
        );
        let mut e = vec![0f32; m * k1];
        let (mut e_mean, mut e_invstd) = (vec![], vec![]);
        let bn = self.model.table.bn("mil_emb.bn").clone();
        let md = &mut *self.model;
        let gamma = &md.params[md.table.range("mil_emb.bn.weight")];
        let beta = &md.params[md.table.range("mil_emb.bn.bias")];
        match self.mode {
            Mode::Train => {
                (e_mean, e_invstd) = (vec![0f32; k1], vec![0f32; k1]);
                let (rm, rv) = md.buffers[bn.offset..bn.offset + 2 * k1].split_at_mut(k1);
                norm::bn_relu_train_forward(
                    &q,
                    m,
                    k1,
                    1,
                    gamma,
                    beta,
                    &mut e,
                    &mut e_mean,
                    &mut e_invstd,
                    rm,
                    rv,
                );
                let i = md
                    .table
                    .bns
                    .iter()
                    .position(|b| b.module == "mil_emb.bn")
                    .expect("known BN");
                md.batches_tracked[i] += 1;
            }
            Mode::Eval => {
                let (rm, rv) = (&md.buffers[bn.mean_range()], &md.buffers[bn.var_range()]);
                norm::bn_relu_eval_forward(&q, m, k1, 1, gamma, beta, rm, rv, &mut e);
            }
        }
        let mut t = vec![0f32; m * k2];
        linear::linear_forward(
            &e,
            m,
            k1,
            self.p("mil_img.concepts.weight"),
            self.p("mil_img.concepts.bias"),
            k2,
            &mut t,
        );
        let nb = bags.len();
        let (mut g, mut t_arg) = (vec![0f32; nb * k2], vec![0usize; nb * k2]);
        mil::gcp_forward(&t, k2, bags, cfg.gcp, &mut g, &mut t_arg);
        let mut r = vec![0f32; nb * k2];
        linear::linear_forward(
            &g,
            nb,
            k2,
            self.p("mil_img.proj.weight"),
            self.p("mil_img.proj.bias"),
            k2,
            &mut r,
        );
        let mut v = vec![0f32; nb * k2];
        tensor::relu_forward(&r, &mut v);
        let mut cls_logits = vec![0f32; nb * nc];
        linear::linear_forward(
            &v,
            nb,
            k2,
            self.p("classifier.weight"),
            self.p("classifier.bias"),
            nc,
            &mut cls_logits,
        );
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

    fn decoder(&mut self, enc: &[EncBlock]) -> (Vec<DecBlock>, Vec<f32>) {
        let cfg = *self.model.config();
        let w = cfg.enc_width;
        let mut blocks: Vec<DecBlock> = Vec::with_capacity(4);
        for (i, k) in [5usize, 4, 3, 2].into_iter().enumerate() {
            let (x, xd) = match blocks.last() {
                Some(prev) => (&prev.c2.y, prev.c2.yd()),
                None => (&enc[4].c2.y, enc[4].c2.yd()),
            };
            let skip = &enc[3 - i].c2;
            let upd = Dims::new(xd.n, xd.c, 2 * xd.h, 2 * xd.w);
            let mut up = buffer(upd.len());
            upsample::upsample2x_forward(x, xd, &mut up);
            let name = format!("dec{k}");
            let u = self.unit(
                &[(&up, upd.c)],
                upd,
                &format!("{name}.up_conv"),
                &format!("{name}.up_bn"),
                w,
            );
            let catd = Dims::new(upd.n, 2 * w, upd.h, upd.w);
            let c1 = self.unit(
                &[(&u.y, w), (&skip.y, w)],
                catd,
                &format!("{name}.conv1"),
                &format!("{name}.bn1"),
                w,
            );
            let c2 = self.unit(
                &[(&c1.y, w)],
                c1.yd(),
                &format!("{name}.conv2"),
                &format!("{name}.bn2"),
                w,
            );
            blocks.push(DecBlock { up, u, c1, c2 });
        }
        let last = &blocks[3].c2;
        let mut seg = buffer(last.yd().n * cfg.seg_classes * last.yd().hw());
        conv::conv1x1_forward(
            &last.y,
            last.yd(),
            self.p("seg_head.weight"),
            self.p("seg_head.bias"),
            cfg.seg_classes,
            &mut seg,
        );
        (blocks, seg)
    }

    /// The whole forward; the MIL head only when `bags` is given.
    fn forward(
        &mut self,
        patches: &[f32],
        m: usize,
        p: usize,
        bags: Option<&[(usize, usize)]>,
    ) -> Acts {
        let enc = self.encoder(patches, m, p);
        let mil = bags.map(|b| self.mil_head(&enc[4].c2.y, enc[4].c2.yd(), b));
        let (dec, seg_logits) = self.decoder(&enc);
        Acts {
            enc,
            mil,
            dec,
            seg_logits,
        }
    }

    /// Backward of one unit given d relu(bn(z)); writes the conv/BN gradients, returns dx when asked.
    /// Backward of one unit given d relu(bn(z)); writes the conv/BN gradients and, when asked,
    /// returns the input gradient of each of the unit's input parts.
    fn unit_backward(
        &self,
        grads: &mut [f32],
        u: &Unit,
        parts: &[(&[f32], usize)],
        dy: &[f32],
        want_dx: bool,
    ) -> Vec<Vec<f32>> {
        let yd = u.yd();
        let mut dz = buffer(yd.len());
        let gamma = self.p(&format!("{}.weight", u.bn));
        let (dgamma, dbeta) = pair_mut(
            grads,
            self.model,
            &format!("{}.weight", u.bn),
            &format!("{}.bias", u.bn),
        );
        norm::bn_relu_backward(
            &u.z,
            &u.y,
            yd.n,
            yd.c,
            yd.hw(),
            gamma,
            &u.mean,
            &u.invstd,
            dy,
            &mut dz,
            dgamma,
            dbeta,
        );
        let hw = u.xd.hw();
        let mut dx: Vec<Vec<f32>> = match want_dx {
            true => parts
                .iter()
                .map(|&(_, c)| buffer(u.xd.n * c * hw))
                .collect(),
            false => vec![],
        };
        let (dw, db) = pair_mut(
            grads,
            self.model,
            &format!("{}.weight", u.conv),
            &format!("{}.bias", u.conv),
        );
        let w = self.p(&format!("{}.weight", u.conv));
        let mut dx_parts: Vec<Option<&mut [f32]>> = match want_dx {
            true => dx.iter_mut().map(|d| Some(d.as_mut_slice())).collect(),
            false => parts.iter().map(|_| None).collect(),
        };
        conv::conv3x3_backward_concat(parts, u.xd, w, &dz, u.cout, &mut dx_parts, dw, db);
        // The bias feeds a train-mode BatchNorm, which removes any per-channel shift.
        db.fill(0.0);
        recycle([dz]);
        dx
    }

    /// Backward of a linear layer. `bias_is_shift_invariant`: the layer feeds an op that removes
    /// a constant shift (train-mode BatchNorm, max − mean pooling), so the bias's exact gradient
    /// is zero.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        grads: &mut [f32],
        module: &str,
        bias_is_shift_invariant: bool,
        x: &[f32],
        rows: usize,
        fin: usize,
        fout: usize,
        dy: &[f32],
    ) -> Vec<f32> {
        let mut dx = vec![0f32; rows * fin];
        let (dw, db) = pair_mut(
            grads,
            self.model,
            &format!("{module}.weight"),
            &format!("{module}.bias"),
        );
        linear::linear_backward(
            x,
            rows,
            fin,
            self.p(&format!("{module}.weight")),
            dy,
            fout,
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
        let cfg = self.model.config();
        let (m, bw, s2) = (hd.n, hd.c, hd.hw());
        let (k1, k2, nc, nb) = (
            cfg.emb_concepts,
            cfg.img_concepts,
            cfg.cls_classes,
            bags.len(),
        );
        let contrast = cfg.gcp == GcpMode::MaxMinusMean;
        let dv = self.linear_backward(grads, "classifier", false, &a.v, nb, k2, nc, dcls);
        let mut dr = vec![0f32; nb * k2];
        tensor::relu_backward(&a.v, &dv, &mut dr);
        let dg = self.linear_backward(grads, "mil_img.proj", false, &a.g, nb, k2, k2, &dr);
        let mut dt = vec![0f32; m * k2];
        mil::gcp_backward(&dg, k2, bags, cfg.gcp, &a.t_arg, &mut dt);
        let de = self.linear_backward(grads, "mil_img.concepts", contrast, &a.e, m, k1, k2, &dt);
        let mut dq = vec![0f32; m * k1];
        let gamma = self.p("mil_emb.bn.weight");
        let (dgamma, dbeta) = pair_mut(grads, self.model, "mil_emb.bn.weight", "mil_emb.bn.bias");
        norm::bn_relu_backward(
            &a.q,
            &a.e,
            m,
            k1,
            1,
            gamma,
            &a.e_mean,
            &a.e_invstd,
            &de,
            &mut dq,
            dgamma,
            dbeta,
        );
        let dz = self.linear_backward(grads, "mil_emb.proj", true, &a.z, m, k1, k1, &dq);
        let patch_bags: Vec<(usize, usize)> = (0..m).map(|i| (i * s2, s2)).collect();
        let mut ds = vec![0f32; m * s2 * k1];
        mil::gcp_backward(&dz, k1, &patch_bags, cfg.gcp, &a.s_arg, &mut ds);
        let dht = self.linear_backward(
            grads,
            "mil_emb.concepts",
            contrast,
            &a.ht,
            m * s2,
            bw,
            k1,
            &ds,
        );
        let mut dh = vec![0f32; m * bw * s2];
        tensor::transpose_cs(&dht, m, s2, bw, &mut dh);
        dh
    }

    /// The whole backward, in reverse order of the forward.
    fn backward(
        &self,
        a: &Acts,
        patches: &[f32],
        bags: &[(usize, usize)],
        dseg: &[f32],
        dcls: &[f32],
    ) -> Vec<f32> {
        let cfg = *self.model.config();
        let w = cfg.enc_width;
        let mut grads = vec![0f32; self.model.params.len()];
        // Segmentation head and decoder, dec2 → dec5, collecting the skip gradients.
        let last = &a.dec[3].c2;
        let mut dx = buffer(last.y.len());
        let (dw, db) = pair_mut(&mut grads, self.model, "seg_head.weight", "seg_head.bias");
        conv::conv1x1_backward(
            &last.y,
            last.yd(),
            self.p("seg_head.weight"),
            dseg,
            cfg.seg_classes,
            Some(&mut dx),
            dw,
            db,
        );
        let mut dskips: Vec<Vec<f32>> = vec![vec![]; 4];
        for (i, blk) in a.dec.iter().enumerate().rev() {
            let skip = &a.enc[3 - i].c2.y;
            let dc1 = self.unit_backward(&mut grads, &blk.c2, &[(&blk.c1.y, w)], &dx, true);
            let [du, dskip] = self
                .unit_backward(
                    &mut grads,
                    &blk.c1,
                    &[(&blk.u.y, w), (skip, w)],
                    &dc1[0],
                    true,
                )
                .try_into()
                .expect("two input parts");
            dskips[3 - i] = dskip;
            let ud = blk.u.yd();
            let dup = self.unit_backward(&mut grads, &blk.u, &[(&blk.up, blk.u.xd.c)], &du, true);
            let xd = Dims::new(ud.n, blk.u.xd.c, ud.h / 2, ud.w / 2);
            let mut dx_next = buffer(xd.len());
            upsample::upsample2x_backward(&dup[0], xd, &mut dx_next);
            recycle(
                [std::mem::replace(&mut dx, dx_next), du]
                    .into_iter()
                    .chain(dc1)
                    .chain(dup),
            );
        }
        // dx is now d h from the decoder; add the MIL head's share.
        let hd = a.enc[4].c2.yd();
        if let Some(mil_acts) = &a.mil {
            let dh = self.mil_backward(&mut grads, mil_acts, hd, bags, dcls);
            add_into(&mut dx, &dh);
        }
        // Encoder, enc5 → enc1.
        for k in (0..5).rev() {
            let blk = &a.enc[k];
            if k < 4 {
                let mut dy = buffer(blk.c2.y.len());
                pool::maxpool2x2_backward(&dx, blk.c2.yd(), &blk.argmax, &mut dy);
                add_into(&mut dy, &dskips[k]);
                recycle([
                    std::mem::replace(&mut dx, dy),
                    std::mem::take(&mut dskips[k]),
                ]);
            }
            let input: &[f32] = if k == 0 {
                patches
            } else {
                &a.enc[k - 1].pooled
            };
            let c = blk.c1.yd().c;
            let dc1 = self.unit_backward(&mut grads, &blk.c2, &[(&blk.c1.y, c)], &dx, true);
            let dx_next =
                self.unit_backward(&mut grads, &blk.c1, &[(input, blk.c1.xd.c)], &dc1[0], k > 0);
            let dx_next = dx_next.into_iter().next().unwrap_or_default();
            recycle([std::mem::replace(&mut dx, dx_next)].into_iter().chain(dc1));
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
    let mut net = Net { model, mode };
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
        let batch = Batch {
            patches,
            patch: self.patch_side(patches, bag_sizes.iter().sum())?,
            bag_sizes,
            seg_labels: None,
            cls_labels: None,
        };
        Ok(run_step(&mut self.model, &batch, Mode::Eval, &TrainConfig::default())?.outputs)
    }

    fn segment(&mut self, patches: &[f32]) -> Result<Vec<u8>> {
        let cfg = *self.model.config();
        let p = cfg.patch;
        let per = cfg.in_channels * p * p;
        if patches.is_empty() || !patches.len().is_multiple_of(per) {
            bail!(
                "segment: {} values are not a whole number of {}×{p}×{p} patches",
                patches.len(),
                cfg.in_channels
            );
        }
        let m = patches.len() / per;
        pool_begin(StepShape { m, p, train: false });
        let mut net = Net {
            model: &mut self.model,
            mode: Mode::Eval,
        };
        let acts = net.forward(patches, m, p, None);
        let labels = argmax_classes(&acts.seg_logits, m, cfg.seg_classes, p * p);
        acts.recycle();
        Ok(labels)
    }
}

impl CpuEngine {
    /// The patch side of M square patches held in `patches`.
    fn patch_side(&self, patches: &[f32], m: usize) -> Result<usize> {
        let per = patches.len() / m.max(1) / self.model.config().in_channels;
        let p = (per as f64).sqrt().round() as usize;
        if m == 0 || p * p * m * self.model.config().in_channels != patches.len() {
            bail!("{} values are not {m} square patches", patches.len());
        }
        Ok(p)
    }
}

/// Per-pixel argmax over classes of logits [m, c, hw] → labels [m, hw] (first maximum wins).
pub fn argmax_classes(logits: &[f32], m: usize, c: usize, hw: usize) -> Vec<u8> {
    let mut out = vec![0u8; m * hw];
    for i in 0..m {
        let img = &logits[i * c * hw..(i + 1) * c * hw];
        for (px, o) in out[i * hw..(i + 1) * hw].iter_mut().enumerate() {
            let mut best = 0;
            for k in 1..c {
                if img[k * hw + px] > img[best * hw + px] {
                    best = k;
                }
            }
            *o = best as u8;
        }
    }
    out
}
