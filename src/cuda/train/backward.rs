//! The CUDA trainer's backward: the losses and their gradients, the MIL head, and every conv
//! unit in reverse order of the architecture, each input part's gradient routed into the unit
//! it came from.

use super::scratch::{wgrad_first_shape, wgrad_shape};
use super::CudaTrainer;
use crate::config::{GcpMode, BN_EPS};
use crate::cuda::kernels::*;
use crate::cuda::nvtx;
use crate::cuda::weights::pad8;
use crate::model::Src;
use anyhow::Result;

impl CudaTrainer {
    /// The classification loss and its gradient d cls_logits.
    pub(super) fn cls_loss(&self, bags: usize) -> Result<()> {
        let (a, s) = (self.eng.arena.as_ref().expect("arena"), self.scratch());
        let classes = self.eng.arch.mil.classifier.fout;
        cls_loss(
            &self.eng.dev,
            &ClsLossParams {
                logits: a.at(a.cls),
                labels: s.at(s.cls_labels),
                weights: if self.config.class_weights.is_some() {
                    s.at(s.class_weights)
                } else {
                    0
                },
                amp: self.amp.0,
                losses: s.at(s.losses),
                dlogits: s.at(s.dcls),
                bags: bags as i32,
                classes: classes as i32,
            },
        )
    }

    /// The segmentation loss and the seg head's backward into the last unit's dY.
    pub(super) fn seg_backward(&self, m: usize, p: usize) -> Result<()> {
        let (a, s) = (self.eng.arena.as_ref().expect("arena"), self.scratch());
        let seg = &self.eng.arch.seg;
        let _range = nvtx::range(&seg.name);
        let last = &self.eng.arch.units[seg.src];
        seg_loss_backward(
            &self.eng.dev,
            &SegLossParams {
                logits: a.at(a.seg_logits),
                labels: s.at(s.seg_labels),
                x: a.at(a.units[seg.src][0]),
                w: self.param(&format!("{}.weight", seg.name)),
                amp: self.amp.0,
                partial: s.at(s.seg),
                losses: s.at(s.losses),
                dx: s.at(s.dy[seg.src]),
                dw: self.grad(&format!("{}.weight", seg.name)),
                db: self.grad(&format!("{}.bias", seg.name)),
                n: m as i32,
                hw: (p * p) as i32,
                c: pad8(last.cout) as i32,
                c_real: last.cout as i32,
                classes: seg.classes as i32,
                lambda: self.config.lambda_seg,
            },
        )
    }

    /// One linear layer's backward; `bias` false: its bias gradient is exactly 0 (the layer
    /// feeds a train-mode BatchNorm or max − mean pooling).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        name: &str,
        x: u64,
        dy: u64,
        y_relu: u64,
        dx: u64,
        rows: usize,
        (fin, fout): (usize, usize),
        bias: bool,
    ) -> Result<()> {
        linear_bwd(
            &self.eng.dev,
            &LinearBwdParams {
                x,
                w: self.param(&format!("{name}.weight")),
                dy,
                y_relu,
                dx,
                dw: self.grad(&format!("{name}.weight")),
                db: if bias {
                    self.grad(&format!("{name}.bias"))
                } else {
                    0
                },
                rows: rows as i32,
                fin: fin as i32,
                fout: fout as i32,
                pad_: 0,
            },
        )
    }

    /// The MIL head's backward from d cls_logits to the bottleneck unit's dY.
    pub(super) fn mil_backward(&self, m: usize, bags: usize) -> Result<()> {
        let (a, s) = (self.eng.arena.as_ref().expect("arena"), self.scratch());
        let dev = &self.eng.dev;
        let mil = &self.eng.arch.mil;
        let gcp = self.eng.arch.config.gcp;
        let contrast = gcp == GcpMode::MaxMinusMean;
        let (k1, k2, classes) = (mil.emb_proj.fout, mil.img_proj.fout, mil.classifier.fout);
        let (x, d) = (|o: usize| a.at(o), |o: usize| s.at(o));
        self.linear_backward(
            &mil.classifier.name,
            x(a.mil_v),
            d(s.dcls),
            0,
            d(s.dv),
            bags,
            (k2, classes),
            true,
        )?;
        self.linear_backward(
            &mil.img_proj.name,
            x(a.mil_g),
            d(s.dv),
            x(a.mil_v),
            d(s.dg),
            bags,
            (k2, k2),
            true,
        )?;
        gcp_bwd(
            dev,
            &GcpBwdParams {
                t: x(a.mil_t),
                bag_start: x(a.bag_start),
                dg: d(s.dg),
                dt: d(s.dt),
                bags: bags as i32,
                k: k2 as i32,
                gcp: gcp_code(gcp),
                pad_: 0,
            },
        )?;
        self.linear_backward(
            &mil.img_concepts.name,
            x(a.mil_e),
            d(s.dt),
            0,
            d(s.de),
            m,
            (k1, k2),
            !contrast,
        )?;
        bn1d_bwd_relu(
            dev,
            &Bn1dBwdParams {
                x: x(a.mil_pre),
                gamma: self.param(&format!("{}.weight", mil.emb_bn)),
                beta: self.param(&format!("{}.bias", mil.emb_bn)),
                dy: d(s.de),
                dx: d(s.dq),
                dgamma: self.grad(&format!("{}.weight", mil.emb_bn)),
                dbeta: self.grad(&format!("{}.bias", mil.emb_bn)),
                rows: m as i32,
                c: k1 as i32,
                eps: BN_EPS,
                pad_: 0,
            },
        )?;
        self.linear_backward(
            &mil.emb_proj.name,
            x(a.mil_z),
            d(s.dq),
            0,
            d(s.dzm),
            m,
            (k1, k1),
            false,
        )?;
        let side = a.patch >> mil.level;
        let name = &mil.emb_concepts.name;
        concepts_bwd(
            dev,
            &ConceptsBwdParams {
                x: x(a.units[mil.src][0]),
                w: self.param(&format!("{name}.weight")),
                dz: d(s.dzm),
                arg: x(a.mil_arg),
                dx: d(s.dy[mil.src]),
                dw: self.grad(&format!("{name}.weight")),
                // The concepts feed emb_proj, whose output a train-mode BatchNorm centres: the
                // bias's exact gradient is 0 in every GCP mode.
                db: 0,
                partial: d(s.concepts),
                m: m as i32,
                inst: (side * side) as i32,
                c: pad8(mil.channels) as i32,
                c_real: mil.channels as i32,
                k: k1 as i32,
                gcp: gcp_code(gcp),
            },
        )
    }

    /// Unit i's backward: BN + ReLU, then per input part the weight gradient and (unless it
    /// reads the patches) the input gradient, routed into the dY of the unit it came from.
    pub(super) fn unit_backward(&self, i: usize, m: usize, p: usize) -> Result<()> {
        let (a, s) = (self.eng.arena.as_ref().expect("arena"), self.scratch());
        let dev = &self.eng.dev;
        let u = &self.eng.arch.units[i];
        let _range = nvtx::range(&u.conv);
        let side = p >> u.level;
        let (pixels, cz) = (m * side * side, pad8(u.cout));
        let [scale, shift, mean, invstd] = a.stats[i].map(|o| a.at(o));
        bn_backward(
            dev,
            &BnBwdParams {
                dy: s.at(s.dy[i]),
                z: a.at(a.z[i]),
                scale,
                shift,
                mean,
                invstd,
                gamma: self.param(&format!("{}.weight", u.bn)),
                partial: s.at(s.bn),
                dgamma: self.grad(&format!("{}.weight", u.bn)),
                dbeta: self.grad(&format!("{}.bias", u.bn)),
                dz: s.at(s.dz),
                pixels: pixels as i32,
                c: cz as i32,
                c_real: u.cout as i32,
                chunk: BN_CHUNK as i32,
            },
        )?;
        let dw = self.grad(&format!("{}.weight", u.conv));
        let mut c_off = 0;
        for (j, &(src, c)) in u.inputs.iter().enumerate() {
            let cx = pad8(c);
            let x = match src {
                Src::Input => {
                    conv_wgrad_first(
                        dev,
                        &WgradFirstParams {
                            dz: s.at(s.dz),
                            x: a.at(a.input),
                            partial: s.at(s.wgrad),
                            dw,
                            ..wgrad_first_shape(u, c, m, p)
                        },
                    )?;
                    c_off += c;
                    continue;
                }
                Src::Unit(k) => a.at(a.units[k][0]),
                Src::Pooled(k) => a.at(a.units[k][1]),
                Src::Upsampled(k) => {
                    upsample2x(
                        dev,
                        &Upsample2xParams {
                            x: a.at(a.units[k][0]),
                            y: s.at(s.up),
                            n: m as i32,
                            h: (side / 2) as i32,
                            w: (side / 2) as i32,
                            c: cx as i32,
                        },
                    )?;
                    s.at(s.up)
                }
            };
            conv_wgrad(
                dev,
                &WgradParams {
                    dz: s.at(s.dz),
                    x,
                    partial: s.at(s.wgrad),
                    dw,
                    ..wgrad_shape(u, c_off, c, m, p)
                },
            )?;
            c_off += c;
            // dgrad: the forward kernel over dz with the flipped, transposed pack of part j.
            let packs = self.packs[i].as_ref().expect("packed unit");
            conv3x3(
                dev,
                &ConvParams {
                    x: s.at(s.dz),
                    x2: 0,
                    wt: packs.dgrad[j].0,
                    bias: self.zeros.0,
                    y: s.at(s.dpart),
                    y_pool: 0,
                    partial: s.at(s.splitk),
                    stats: 0,
                    n: m as i32,
                    h: side as i32,
                    w: side as i32,
                    cin1: cz as i32,
                    cin2: 0,
                    cout: cx as i32,
                    in_h: 0,
                    in_w: 0,
                    relu: 0,
                    quad: 0,
                    splits: conv_splits(pixels, cx, 9 * cz) as i32,
                    pad_: 0,
                },
                false,
            )?;
            let (k, route): (usize, fn(&_, &_) -> Result<()>) = match src {
                Src::Unit(k) => (k, grad_add),
                Src::Pooled(k) => (k, maxpool_bwd),
                Src::Upsampled(k) => (k, upsample_bwd),
                Src::Input => unreachable!("handled above"),
            };
            let ks = p >> self.eng.arch.units[k].level;
            route(
                dev,
                &GradRouteParams {
                    src: s.at(s.dpart),
                    y: if matches!(src, Src::Pooled(_)) {
                        a.at(a.units[k][0])
                    } else {
                        0
                    },
                    dst: s.at(s.dy[k]),
                    n: m as i32,
                    h: ks as i32,
                    w: ks as i32,
                    c: cx as i32,
                },
            )?;
        }
        Ok(())
    }
}
