//! The CUDA engine's training step, all on the device: the train-mode forward keeping what the
//! backward needs, the backward of every op in reverse order of the architecture, then AdamW
//! with dynamic loss scaling over fp32 master weights, which rewrites the fp16 packs the
//! kernels read. Mixed precision: fp16 activations and tensor-core operands, fp32 accumulation,
//! statistics, gradients and weights. Once a batch shape has run, its step is captured as a
//! graph and replayed: no host round trip inside a step, inputs and the learning rate uploaded
//! before it, the losses read after it.

mod backward;
mod scratch;

use super::device::{DevPtr, DeviceKind, Graph};
use super::engine::{reads_patches, CudaEngine, Heads};
use super::kernels::*;
use super::nvtx;
use super::weights::pad8;
use crate::config::TrainConfig;
use crate::cpu::{Losses, StepResult, Trainer};
use crate::engine::{Batch, Mode};
use crate::model::{Model, Src};
use anyhow::{bail, ensure, Result};
use scratch::Scratch;

/// GradScaler's defaults: the first loss scale, growth after this many clean steps, factors.
pub const INITIAL_LOSS_SCALE: f32 = 65536.0;
const GROWTH_INTERVAL: i32 = 2000;
const GROWTH: f32 = 2.0;
const BACKOFF: f32 = 0.5;

/// `run_step` halves an overflowing loss scale at most this many times (2^16 → 2^-24).
const MAX_HALVINGS: i32 = 40;

/// The fp16 weight packs of one conv unit, rewritten from the master weights after each step:
/// the forward pack and one dgrad pack per input part (none for the first layer, which reads
/// its fp32 weights directly and needs no input gradient).
struct UnitPacks {
    fwd: DevPtr,
    dgrad: Vec<DevPtr>,
    /// An up_conv's sub-pixel composite weights (pack_conv_up).
    up: Option<DevPtr>,
}

/// What one optimiser step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepReport {
    pub losses: Losses,
    /// The loss scale the step's gradients carried.
    pub loss_scale: f32,
    /// The gradients held an inf or NaN: the update was skipped and the scale halved.
    pub skipped: bool,
}

/// Everything a captured step's by-value parameters depend on: the batch shape, where the
/// activations and the backward's buffers lie (their layout follows from their own sizes), and
/// the settings other than the learning rate (read from the device).
#[derive(Clone, Copy, PartialEq)]
struct StepKey {
    m: usize,
    p: usize,
    bags: usize,
    arena: (DevPtr, usize, usize),
    scratch: DevPtr,
    config: TrainConfig,
}

/// How many step graphs were captured and how many steps replayed one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphCounts {
    pub captures: u64,
    pub replays: u64,
}

/// M²UNet training on CUDA kernels (a GPU, or the CPU emulator).
pub struct CudaTrainer {
    eng: CudaEngine,
    pub config: TrainConfig,
    /// fp32 master weights, gradients and AdamW moments, laid out as `Model::params`.
    master: DevPtr,
    grads: DevPtr,
    mom: [DevPtr; 2],
    amp: DevPtr,
    /// A zero bias for the dgrad convolutions.
    zeros: DevPtr,
    packs: Vec<Option<UnitPacks>>,
    /// The embedding concepts' weight transposed for mil_concepts_gcp.
    concepts_t: DevPtr,
    scratch: Option<Scratch>,
    /// Train-mode forwards run (each adds one to every BN's num_batches_tracked).
    forwards: i64,
    /// Whether `step` captures and replays graphs.
    graphs: bool,
    /// The last step's key, and the graph of the captured step.
    last: Option<StepKey>,
    graph: Option<(StepKey, Graph)>,
    counts: GraphCounts,
}

impl CudaTrainer {
    /// Moves `trainer` (model, AdamW moments and step count) onto the device, with loss scale
    /// `loss_scale`.
    pub fn new(trainer: &Trainer, kind: DeviceKind, loss_scale: f32) -> Result<Self> {
        ensure!(
            loss_scale.is_finite() && loss_scale > 0.0,
            "the loss scale must be a positive number, not {loss_scale}"
        );
        let model = &trainer.model;
        let mut eng = CudaEngine::new(model, kind)?;
        eng.keep = true;
        let n = model.params.len();
        let alloc_f32 = |eng: &mut CudaEngine, v: &[f32]| -> Result<DevPtr> {
            let p = eng.dev.alloc(v.len() * 4)?;
            eng.dev.upload(p, v)?;
            Ok(p)
        };
        let master = alloc_f32(&mut eng, &model.params)?;
        let grads = eng.dev.alloc(n * 4)?;
        let mom = [
            alloc_f32(&mut eng, &trainer.m)?,
            alloc_f32(&mut eng, &trainer.v)?,
        ];
        let state = AmpState {
            scale: loss_scale,
            steps: i32::try_from(trainer.step)?,
            ..AmpState::default()
        };
        let amp = eng.dev.alloc(std::mem::size_of::<AmpState>())?;
        eng.dev.upload(amp, std::slice::from_ref(&state))?;
        let widest = eng.arch.units.iter().map(|u| pad8(u.cout)).max();
        let widest = widest.into_iter().chain(
            eng.arch
                .units
                .iter()
                .flat_map(|u| u.inputs.iter().map(|&(_, c)| pad8(c))),
        );
        let zeros = eng.dev.alloc(widest.max().unwrap_or(8) * 4)?;
        let mut packs = vec![];
        for u in &eng.arch.units {
            if reads_patches(u) {
                packs.push(None);
                continue;
            }
            let k: usize = u.inputs.iter().map(|&(_, c)| pad8(c)).sum();
            let fwd = eng.dev.alloc(pad8(u.cout) * 9 * k * 2)?;
            let mut dgrad = vec![];
            for &(_, c) in &u.inputs {
                dgrad.push(eng.dev.alloc(pad8(c) * 9 * pad8(u.cout) * 2)?);
            }
            let up = match u.inputs[..] {
                [(Src::Upsampled(_), c)] => Some(eng.dev.alloc(conv_up_pack_len(u.cout, c) * 2)?),
                _ => None,
            };
            packs.push(Some(UnitPacks { fwd, dgrad, up }));
        }
        let mil = &eng.arch.mil.emb_concepts;
        let concepts_t = eng.dev.alloc(mil.fin * mil.fout * 4)?;
        let mut t = CudaTrainer {
            eng,
            config: trainer.config,
            master,
            grads,
            mom,
            amp,
            zeros,
            packs,
            concepts_t,
            scratch: None,
            forwards: 0,
            graphs: true,
            last: None,
            graph: None,
            counts: GraphCounts::default(),
        };
        t.bind_master()?;
        t.publish()?;
        Ok(t)
    }

    /// Device address of parameter `name` in the master weights (or, with `grads`, of its
    /// gradient).
    fn addr(&self, name: &str, grads: bool) -> u64 {
        let base = if grads { self.grads } else { self.master };
        base.offset(self.eng.model.table.range(name).start * 4).0
    }

    fn param(&self, name: &str) -> u64 {
        self.addr(name, false)
    }

    fn grad(&self, name: &str) -> u64 {
        self.addr(name, true)
    }

    /// Points the engine's train-mode reads at the master weights and the packs.
    fn bind_master(&mut self) -> Result<()> {
        let arch = self.eng.arch.clone();
        for (i, u) in arch.units.iter().enumerate() {
            let (w, up) = match &self.packs[i] {
                Some(p) => (p.fwd.0, p.up.map(|a| a.0)),
                None => (self.param(&format!("{}.weight", u.conv)), None),
            };
            let b = self.param(&format!("{}.bias", u.conv));
            let (g, beta) = (
                self.param(&format!("{}.weight", u.bn)),
                self.param(&format!("{}.bias", u.bn)),
            );
            let l = &mut self.eng.w.convs[i];
            l.train.w = w;
            l.train.b = b;
            l.train.up = up;
            l.gamma = g;
            l.beta = beta;
        }
        let mil = &arch.mil;
        let lin = |t: &Self, name: &str| super::engine::Linear {
            w: t.param(&format!("{name}.weight")),
            b: t.param(&format!("{name}.bias")),
        };
        let seg = lin(self, &arch.seg.name);
        let concepts_b = self.param(&format!("{}.bias", mil.emb_concepts.name));
        let emb_proj = lin(self, &mil.emb_proj.name);
        let gamma = self.param(&format!("{}.weight", mil.emb_bn));
        let beta = self.param(&format!("{}.bias", mil.emb_bn));
        let img_concepts = lin(self, &mil.img_concepts.name);
        let img_proj = lin(self, &mil.img_proj.name);
        let classifier = lin(self, &mil.classifier.name);
        let w = &mut self.eng.w;
        w.seg = seg;
        w.concepts_t = super::engine::Linear {
            w: self.concepts_t.0,
            b: concepts_b,
        };
        w.emb_proj = emb_proj;
        w.emb_bn[0] = gamma;
        w.emb_bn[1] = beta;
        w.img_concepts = img_concepts;
        w.img_proj = img_proj;
        w.classifier = classifier;
        Ok(())
    }

    /// Rewrites the fp16 packs and the transposed concepts weight from the master weights.
    fn publish(&self) -> Result<()> {
        let dev = &self.eng.dev;
        for (u, packs) in self.eng.arch.units.iter().zip(&self.packs) {
            let Some(packs) = packs else { continue };
            let (c1, c2) = match u.inputs[..] {
                [(_, c1)] => (c1, 0),
                [(_, c1), (_, c2)] => (c1, c2),
                _ => bail!("{}: more than two input parts", u.conv),
            };
            let mut p = PackConvParams {
                w: self.param(&format!("{}.weight", u.conv)),
                out: packs.fwd.0,
                cout: u.cout as i32,
                c1: c1 as i32,
                c2: c2 as i32,
                part: 0,
            };
            pack_conv_fwd(dev, &p)?;
            if let Some(up) = packs.up {
                let q = PackConvUpParams {
                    w: p.w,
                    out: up.0,
                    cout: p.cout,
                    cin: p.c1,
                };
                pack_conv_up_dev(dev, &q)?;
            }
            for (j, d) in packs.dgrad.iter().enumerate() {
                p.out = d.0;
                p.part = j as i32;
                pack_conv_dgrad(dev, &p)?;
            }
        }
        let c = &self.eng.arch.mil.emb_concepts;
        transpose_f32(
            dev,
            &TransposeParams {
                x: self.param(&format!("{}.weight", c.name)),
                y: self.concepts_t.0,
                rows: c.fout as i32,
                cols: c.fin as i32,
            },
        )
    }

    /// Uploads a labelled batch and sizes the buffers; returns (M, P).
    fn load(&mut self, batch: &Batch) -> Result<(usize, usize)> {
        let cfg = *self.eng.model.config();
        batch.validate(&cfg)?;
        let (Some(seg), Some(cls)) = (batch.seg_labels, batch.cls_labels) else {
            bail!("a training step needs seg_labels and cls_labels");
        };
        if let Some(&l) = seg.iter().find(|&&l| l < -1 || l >= cfg.seg_classes as i64) {
            bail!(
                "seg label {l} is not −1 (ignore) or a class 0..={}",
                cfg.seg_classes - 1
            );
        }
        if let Some(&l) = cls.iter().find(|&&l| l < 0 || l >= cfg.cls_classes as i64) {
            bail!("class label {l} is not a class 0..={}", cfg.cls_classes - 1);
        }
        let (m, p) = (batch.patches_count(), batch.patch);
        self.eng
            .prepare(batch.patches, Some(batch.bag_sizes), m, p)?;
        self.ensure_scratch(m, p, batch.bag_sizes.len())?;
        let s = self.scratch.as_ref().expect("scratch sized");
        let dev = &self.eng.dev;
        let seg: Vec<i32> = seg.iter().map(|&l| l as i32).collect();
        let cls: Vec<i32> = cls.iter().map(|&l| l as i32).collect();
        dev.upload(s.base.offset(s.seg_labels), &seg)?;
        dev.upload(s.base.offset(s.cls_labels), &cls)?;
        if let Some(w) = &self.config.class_weights {
            dev.upload(s.base.offset(s.class_weights), w)?;
        }
        Ok((m, p))
    }

    /// Train-mode forward, losses and backward of a labelled batch: the (loss-scaled)
    /// gradients are left in `grads`, the losses in the scratch. Returns (M, P).
    fn forward_backward(&mut self, batch: &Batch) -> Result<(usize, usize)> {
        let (m, p) = self.load(batch)?;
        self.launch_forward_backward(m, p, batch.bag_sizes.len())?;
        self.forwards += 1;
        Ok((m, p))
    }

    /// The launches of `forward_backward` for a loaded batch (no host round trip).
    fn launch_forward_backward(&self, m: usize, p: usize, bags: usize) -> Result<()> {
        let n = self.eng.model.params.len();
        self.eng.dev.memset_zero(self.grads, n * 4)?;
        self.eng.run(Mode::Train, Heads::All, m, bags)?;
        let _range = nvtx::range("backward");
        self.zero_dys_from(0, m, p)?;
        self.seg_backward(m, p)?;
        {
            let _range = nvtx::range("mil_head");
            self.cls_loss(bags)?;
            self.mil_backward(m, bags)?;
        }
        let units = self.eng.arch.units.len();
        for i in (0..units).rev() {
            self.zero_dys_from(units - i, m, p)?;
            self.unit_backward(i, m, p)?;
        }
        Ok(())
    }

    /// Zeroes the output gradients first written at backward step `step` (their memory may
    /// have held an earlier gradient).
    fn zero_dys_from(&self, step: usize, m: usize, p: usize) -> Result<()> {
        let s = self.scratch();
        for (j, u) in self.eng.arch.units.iter().enumerate() {
            if s.dy_first[j] == step {
                let side = p >> u.level;
                let bytes = m * side * side * pad8(u.cout) * 4;
                self.eng.dev.memset_zero(s.base.offset(s.dy[j]), bytes)?;
            }
        }
        Ok(())
    }

    /// The step's losses (unscaled) and the loss scale state, read back from the device.
    fn read_losses(&self) -> Result<(Losses, AmpState)> {
        let s = self.scratch();
        let mut l = [0f32; 4];
        self.eng.dev.download(s.base.offset(s.losses), &mut l)?;
        let mut amp = [AmpState::default()];
        self.eng.dev.download(self.amp, &mut amp)?;
        let lambda = self.config.lambda_seg;
        let losses = Losses {
            total: l[0] + lambda * (l[1] + l[2]),
            cls: l[0],
            seg_ce: l[1],
            seg_dice: l[2],
        };
        Ok((losses, amp[0]))
    }

    /// One training step on `batch` at the config's learning rate: forward, backward, the
    /// inf/NaN check, AdamW (skipped on inf/NaN) and the loss-scale update. The first step of
    /// a shape runs eagerly (sizing the buffers); the next one captures the step as a graph,
    /// which later steps of the shape replay (unless graphs are off).
    pub fn step(&mut self, batch: &Batch) -> Result<StepReport> {
        let _range = nvtx::range("train_step");
        let (m, p) = self.load(batch)?;
        let bags = batch.bag_sizes.len();
        self.upload_lr()?;
        let a = self.eng.arena.as_ref().expect("arena sized");
        let key = StepKey {
            m,
            p,
            bags,
            arena: (a.base, a.m, a.rows),
            scratch: self.scratch().base,
            config: TrainConfig {
                lr: 0.0,
                ..self.config
            },
        };
        if self.graphs && self.last == Some(key) {
            if self.graph.as_ref().is_none_or(|(k, _)| *k != key) {
                self.graph = None;
                let _range = nvtx::range("capture");
                let dev = &self.eng.dev;
                dev.begin_capture()?;
                let launched = self.launch_step(m, p, bags);
                let graph = dev.end_capture();
                launched?;
                self.graph = Some((key, graph?));
                self.counts.captures += 1;
            }
            let _range = nvtx::range("replay");
            let (_, graph) = self.graph.as_ref().expect("captured");
            self.eng.dev.launch_graph(graph)?;
            self.counts.replays += 1;
        } else {
            self.launch_step(m, p, bags)?;
        }
        self.last = Some(key);
        self.forwards += 1;
        self.report()
    }

    /// Whether `step` captures and replays graphs (on by default; off, every step runs
    /// eagerly).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.graph = None;
        }
    }

    /// The step graphs captured and replayed so far.
    pub fn graph_counts(&self) -> GraphCounts {
        self.counts
    }

    /// Writes the config's learning rate into the device state AdamW reads it from.
    fn upload_lr(&self) -> Result<()> {
        let at = self.amp.offset(std::mem::offset_of!(AmpState, lr));
        self.eng.dev.upload(at, &[self.config.lr])
    }

    /// The launches of one step of a loaded batch (no host round trip).
    fn launch_step(&self, m: usize, p: usize, bags: usize) -> Result<()> {
        self.launch_forward_backward(m, p, bags)?;
        self.optimise()
    }

    /// The finished step's losses, scale and whether it was skipped, read from the device.
    fn report(&self) -> Result<StepReport> {
        let (losses, amp) = self.read_losses()?;
        Ok(StepReport {
            losses,
            loss_scale: amp.last_scale,
            skipped: amp.last_skipped != 0,
        })
    }

    /// The inf/NaN check, AdamW and the loss-scale update, then the packs rewritten.
    fn optimise(&self) -> Result<()> {
        let _range = nvtx::range("optimizer");
        let dev = &self.eng.dev;
        let len = self.eng.model.params.len() as i32;
        grad_check(
            dev,
            &GradCheckParams {
                g: self.grads.0,
                amp: self.amp.0,
                len,
                pad_: 0,
            },
        )?;
        let c = &self.config;
        adamw(
            dev,
            &AdamWParams {
                params: self.master.0,
                grads: self.grads.0,
                m: self.mom[0].0,
                v: self.mom[1].0,
                amp: self.amp.0,
                len,
                pad_: 0,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
            },
        )?;
        amp_update(
            dev,
            &AmpUpdateParams {
                amp: self.amp.0,
                growth_interval: GROWTH_INTERVAL,
                growth: GROWTH,
                backoff: BACKOFF,
                pad_: 0,
            },
        )?;
        self.publish()
    }

    /// A train-mode forward and backward of a labelled batch without an update: outputs,
    /// losses and the unscaled gradients (the CPU engine's `run_step` contract). Running
    /// statistics advance as in any train-mode forward. When the scaled gradients overflow
    /// fp16, the pass is repeated at half the loss scale (the running statistics restored
    /// first), as GradScaler's next steps would; `loss_scale` then tells the scale used.
    pub fn run_step(&mut self, batch: &Batch) -> Result<StepResult> {
        let mut saved = self.eng.model.clone();
        self.eng.download_running_stats(&mut saved)?;
        for _ in 0..MAX_HALVINGS {
            let (m, _) = self.forward_backward(batch)?;
            let amp = self.check_gradients()?;
            if amp.found_inf == 0 {
                let outputs = self.eng.read_outputs(m, batch.bag_sizes.len())?;
                let (losses, _) = self.read_losses()?;
                let mut grads = vec![0f32; self.eng.model.params.len()];
                self.eng.dev.download(self.grads, &mut grads)?;
                grads.iter_mut().for_each(|g| *g /= amp.scale);
                return Ok(StepResult {
                    outputs,
                    losses: Some(losses),
                    grads: Some(grads),
                });
            }
            let (losses, _) = self.read_losses()?;
            if !losses.total.is_finite() {
                bail!("the loss is not finite ({losses:?}): no gradient to compute");
            }
            let state = AmpState {
                scale: amp.scale * BACKOFF,
                found_inf: 0,
                ..amp
            };
            self.eng
                .dev
                .upload(self.amp, std::slice::from_ref(&state))?;
            self.eng.upload_running_stats(&saved)?;
            self.forwards -= 1;
        }
        bail!("the gradients overflow fp16 at every loss scale down to 2^-{MAX_HALVINGS}")
    }

    /// The inf/NaN check of the gradients, and the loss-scale state it leaves.
    fn check_gradients(&self) -> Result<AmpState> {
        grad_check(
            &self.eng.dev,
            &GradCheckParams {
                g: self.grads.0,
                amp: self.amp.0,
                len: self.eng.model.params.len() as i32,
                pad_: 0,
            },
        )?;
        let mut amp = [AmpState::default()];
        self.eng.dev.download(self.amp, &mut amp)?;
        Ok(amp[0])
    }

    /// Writes +inf into the gradients of the next step's first parameter before its inf/NaN
    /// check (for testing the loss scaler's skip and recovery).
    pub fn step_with_inf_gradient(&mut self, batch: &Batch) -> Result<StepReport> {
        self.forward_backward(batch)?;
        self.upload_lr()?;
        self.eng.dev.upload(self.grads, &[f32::INFINITY])?;
        self.optimise()?;
        self.report()
    }

    /// The loss scale and the AdamW steps taken (skipped steps not counted).
    pub fn loss_scale(&self) -> Result<(f32, u64)> {
        let mut amp = [AmpState::default()];
        self.eng.dev.download(self.amp, &mut amp)?;
        Ok((amp[0].scale, amp[0].steps as u64))
    }

    /// The model and AdamW state as a CPU `Trainer` (to checkpoint, validate, or continue on
    /// the CPU engine).
    pub fn to_trainer(&self) -> Result<Trainer> {
        let mut model: Model = self.eng.model.clone();
        let dev = &self.eng.dev;
        dev.download(self.master, &mut model.params)?;
        self.eng.download_running_stats(&mut model)?;
        model
            .batches_tracked
            .iter_mut()
            .for_each(|n| *n += self.forwards);
        let n = model.params.len();
        let mut t = Trainer::new(model, self.config);
        t.m = vec![0f32; n];
        t.v = vec![0f32; n];
        dev.download(self.mom[0], &mut t.m)?;
        dev.download(self.mom[1], &mut t.v)?;
        t.step = self.loss_scale()?.1;
        Ok(t)
    }

    /// Where it runs.
    pub fn describe(&self) -> String {
        self.eng.dev.describe()
    }

    /// The kind of device it runs on (a GPU or the emulator).
    pub fn device_kind(&self) -> DeviceKind {
        if self.eng.dev.is_emulator() {
            DeviceKind::Emu
        } else {
            DeviceKind::Gpu
        }
    }

    /// Device memory the trainer holds: weights, master weights, gradients, moments,
    /// activations and the backward's buffers (all allocated once per batch shape).
    pub fn device_bytes(&self) -> usize {
        self.eng.dev.allocated_bytes()
    }
}
