//! The CUDA engine's orchestration: weights prepared once on the host (BN folded for eval,
//! repacked to fp16), one activation arena sized from the config and the batch, and the
//! forward pass (eval or train-mode BatchNorm) as a short sequence of kernel launches that
//! runs unchanged on a GPU or on the emulator.

use super::device::{ConvTier, DevPtr, Device, DeviceKind, Graph, Mark};
use super::kernels::*;
use super::nvtx;
use super::weights::{
    concepts_row, pack_concepts, pack_conv3x3, pack_conv_up, pad8, padded, transpose,
};
use crate::config::{ModelConfig, BN_EPS, BN_MOMENTUM};
use crate::engine::{segment_count, Batch, InferenceEngine, LobeScores, Mode, Outputs};
use crate::model::{Arch, ConvUnit, Model, Src};
use anyhow::{bail, ensure, Result};
use bytemuck::Pod;
use std::cell::RefCell;

pub(super) const ALIGN: usize = 256;

/// Offsets of buffers carved one after another from one allocation, each 256-byte aligned.
#[derive(Default)]
pub(super) struct Carve {
    end: usize,
}

impl Carve {
    /// The offset of the next `bytes`.
    pub(super) fn take(&mut self, bytes: usize) -> usize {
        let at = self.end;
        self.end = (at + bytes).next_multiple_of(ALIGN);
        at
    }

    /// The bytes of the allocation the buffers taken so far need.
    pub(super) fn len(&self) -> usize {
        self.end
    }
}

/// Host image of the device weight buffer, built section by section (256-byte aligned).
#[derive(Default)]
struct Blob {
    bytes: Vec<u8>,
}

impl Blob {
    /// Appends `v`; returns its offset (made an address by `Weights::rebased`).
    fn push<T: Pod>(&mut self, v: &[T]) -> u64 {
        let off = self.bytes.len().next_multiple_of(ALIGN);
        self.bytes.resize(off, 0);
        self.bytes.extend_from_slice(bytemuck::cast_slice(v));
        off as u64
    }
}

/// Device addresses of one conv's weights and bias, and for an up_conv its sub-pixel
/// composite weights (`pack_conv_up`).
#[derive(Clone, Copy, Default)]
pub(super) struct ConvW {
    pub w: u64,
    pub b: u64,
    pub up: Option<u64>,
}

/// One conv unit of the architecture: 3×3 conv followed by BatchNorm and ReLU. Addresses of
/// what train-mode passes read (`train`, `gamma`, `beta`) are re-pointed by a `CudaTrainer`
/// to its master weights and fp16 packs.
pub(super) struct ConvLayer {
    /// Module name, e.g. `dec2.conv1`.
    pub name: String,
    /// Real input channels of each concatenated input tensor.
    pub parts: Vec<usize>,
    pub cout: usize,
    /// BN folded (eval), and as trained (train mode: batch statistics).
    pub eval: ConvW,
    pub train: ConvW,
    pub gamma: u64,
    pub beta: u64,
    pub running_mean: u64,
    pub running_var: u64,
    /// Offset of running_mean in the model's buffer vector.
    pub bn_buffer: usize,
}

/// Device addresses of a fully connected layer's weight and bias.
#[derive(Clone, Copy, Default)]
pub(super) struct Linear {
    pub w: u64,
    pub b: u64,
}

/// Every weight the forward pass reads, as device addresses (in the engine's weight buffer,
/// or, for train-mode reads under a `CudaTrainer`, in its master weights).
pub(super) struct Weights {
    /// One per `Arch::units`, same order.
    pub convs: Vec<ConvLayer>,
    pub seg: Linear,
    /// The embedding concepts' weight transposed to [in][out].
    pub concepts_t: Linear,
    /// The same weight as fp16 [out][in] rows for the eval kernel (`pack_concepts`).
    pub concepts_h: u64,
    pub emb_proj_eval: Linear,
    pub emb_proj: Linear,
    /// γ, β, running mean, running var.
    pub emb_bn: [u64; 4],
    pub emb_bn_buffer: usize,
    pub img_concepts: Linear,
    pub img_proj: Linear,
    pub classifier: Linear,
}

impl Weights {
    /// Offsets in the weight buffer made addresses of the buffer at `base`.
    fn rebased(mut self, base: u64) -> Weights {
        for l in &mut self.convs {
            for a in [
                &mut l.eval.w,
                &mut l.eval.b,
                &mut l.train.w,
                &mut l.train.b,
                &mut l.gamma,
                &mut l.beta,
                &mut l.running_mean,
                &mut l.running_var,
            ] {
                *a += base;
            }
            for a in [&mut l.eval.up, &mut l.train.up].into_iter().flatten() {
                *a += base;
            }
        }
        for l in [
            &mut self.seg,
            &mut self.concepts_t,
            &mut self.emb_proj_eval,
            &mut self.emb_proj,
            &mut self.img_concepts,
            &mut self.img_proj,
            &mut self.classifier,
        ] {
            l.w += base;
            l.b += base;
        }
        self.emb_bn.iter_mut().for_each(|a| *a += base);
        self.concepts_h += base;
        self
    }
}

/// The conv units' weights (the first layer, which reads the fp32 patches directly, keeps
/// PyTorch's layout; the others are packed for the tensor-core kernel) and the heads'.
fn build_weights(model: &Model) -> Result<(Weights, Vec<u8>)> {
    let arch = model.arch();
    let mut blob = Blob::default();
    let mut convs = vec![];
    for u in &arch.units {
        let w = model.param(&format!("{}.weight", u.conv));
        let b = model.param(&format!("{}.bias", u.conv));
        let (wf, bf) = model.folded(&u.conv, &u.bn);
        let parts: Vec<usize> = u.inputs.iter().map(|&(_, c)| c).collect();
        let (eval, train) = if reads_patches(u) {
            (
                ConvW {
                    w: blob.push(&wf),
                    b: blob.push(&bf),
                    up: None,
                },
                ConvW {
                    w: blob.push(w),
                    b: blob.push(b),
                    up: None,
                },
            )
        } else {
            let cp = pad8(u.cout);
            let upsampled = matches!(u.inputs[..], [(Src::Upsampled(_), _)]);
            let mut up = |w: &[f32]| -> Result<Option<u64>> {
                Ok(match upsampled {
                    true => Some(blob.push(&pack_conv_up(w, u.cout, parts[0])?)),
                    false => None,
                })
            };
            let (up_eval, up_train) = (up(&wf)?, up(w)?);
            (
                ConvW {
                    w: blob.push(&pack_conv3x3(&wf, u.cout, &parts)?),
                    b: blob.push(&padded(&bf, cp)),
                    up: up_eval,
                },
                ConvW {
                    w: blob.push(&pack_conv3x3(w, u.cout, &parts)?),
                    b: blob.push(&padded(b, cp)),
                    up: up_train,
                },
            )
        };
        let e = model.table.bn(&u.bn);
        convs.push(ConvLayer {
            name: u.conv.clone(),
            parts,
            cout: u.cout,
            eval,
            train,
            gamma: blob.push(model.param(&format!("{}.weight", u.bn))),
            beta: blob.push(model.param(&format!("{}.bias", u.bn))),
            running_mean: blob.push(&model.buffers[e.mean_range()]),
            running_var: blob.push(&model.buffers[e.var_range()]),
            bn_buffer: e.offset,
        });
    }
    let linear = |blob: &mut Blob, m: &str| Linear {
        w: blob.push(model.param(&format!("{m}.weight"))),
        b: blob.push(model.param(&format!("{m}.bias"))),
    };
    let mil = &arch.mil;
    let seg = linear(&mut blob, &arch.seg.name);
    let concepts = &mil.emb_concepts;
    let concepts_t = Linear {
        w: blob.push(&transpose(
            model.param(&format!("{}.weight", concepts.name)),
            concepts.fout,
            concepts.fin,
        )),
        b: blob.push(model.param(&format!("{}.bias", concepts.name))),
    };
    let concepts_h = blob.push(&pack_concepts(
        model.param(&format!("{}.weight", concepts.name)),
        concepts.fout,
        concepts.fin,
    )?);
    let (pw, pb) = model.folded(&mil.emb_proj.name, &mil.emb_bn);
    let emb_proj_eval = Linear {
        w: blob.push(&pw),
        b: blob.push(&pb),
    };
    let emb_proj = linear(&mut blob, &mil.emb_proj.name);
    let e = model.table.bn(&mil.emb_bn);
    let emb_bn = [
        blob.push(model.param(&format!("{}.weight", mil.emb_bn))),
        blob.push(model.param(&format!("{}.bias", mil.emb_bn))),
        blob.push(&model.buffers[e.mean_range()]),
        blob.push(&model.buffers[e.var_range()]),
    ];
    let img_concepts = linear(&mut blob, &mil.img_concepts.name);
    let img_proj = linear(&mut blob, &mil.img_proj.name);
    let classifier = linear(&mut blob, &mil.classifier.name);
    let weights = Weights {
        convs,
        seg,
        concepts_t,
        concepts_h,
        emb_proj_eval,
        emb_proj,
        emb_bn,
        emb_bn_buffer: e.offset,
        img_concepts,
        img_proj,
        classifier,
    };
    Ok((weights, blob.bytes))
}

/// Whether `u` reads the input patches (the first layer's direct kernel).
pub(super) fn reads_patches(u: &ConvUnit) -> bool {
    matches!(u.inputs[..], [(Src::Input, _)])
}

/// The input loaders the conv kernels have: the patches, one tensor (plain, max-pooled by its
/// producer, or upsampled while loading), or two plain tensors concatenated.
fn check_loader(u: &ConvUnit) -> Result<()> {
    match u.inputs[..] {
        [(Src::Input | Src::Unit(_) | Src::Pooled(_) | Src::Upsampled(_), _)] => Ok(()),
        [(Src::Unit(_), _), (Src::Unit(_), _)] => Ok(()),
        _ => bail!(
            "{}: the CUDA engine has no loader for the inputs {:?}",
            u.conv,
            u.inputs
        ),
    }
}

/// The activations of one forward pass for `m` patches of side `patch`, carved from one
/// allocation.
pub(super) struct Arena {
    pub m: usize,
    pub patch: usize,
    /// Patches the MIL head's buffers hold (≥ m: `classify` runs the encoder in chunks).
    pub rows: usize,
    /// Train-mode passes keep every unit's pre-BN output and BN statistics for a backward.
    pub keep: bool,
    pub base: DevPtr,
    pub input: usize,
    /// Per arch unit: its output and (units marked `pooled`) its 2×2 max-pooled output.
    pub units: Vec<[usize; 2]>,
    /// Train mode, per unit (one shared buffer unless `keep`): the raw conv output before
    /// BatchNorm (fp16), and its BN scale, shift, batch mean and 1/sd (fp32, padded channels).
    pub z: Vec<usize>,
    pub stats: Vec<[usize; 4]>,
    /// Split-K partial sums (the largest any conv of the pass needs).
    pub splitk: usize,
    /// BN partial statistics.
    pub partial: usize,
    pub seg_logits: usize,
    pub labels: usize,
    /// `segment`'s lobe-order costs, [m·p·p][classes − 1] bytes.
    pub costs: usize,
    pub mil_z: usize,
    /// The first-argmax instance of each patch's concept scores (train mode).
    pub mil_arg: usize,
    pub mil_pre: usize,
    pub mil_e: usize,
    pub mil_t: usize,
    pub mil_g: usize,
    pub mil_v: usize,
    pub cls: usize,
    pub bag_start: usize,
}

impl Arena {
    fn layout(arch: &Arch, m: usize, p: usize, rows: usize, keep: bool) -> (Arena, usize) {
        let mut carve = Carve::default();
        let mut take = |bytes: usize| carve.take(bytes);
        let c = &arch.config;
        let input = take(m * c.in_channels * p * p * 4);
        // (pixels, padded channels) of every unit's output.
        let outs: Vec<(usize, usize)> = arch
            .units
            .iter()
            .map(|u| (m * (p >> u.level) * (p >> u.level), pad8(u.cout)))
            .collect();
        let units = arch
            .units
            .iter()
            .zip(&outs)
            .map(|(u, &(px, ch))| {
                [
                    take(px * ch * 2),
                    take(if u.pooled { px / 4 * ch * 2 } else { 0 }),
                ]
            })
            .collect();
        let max_c = outs.iter().map(|&(_, ch)| ch).max().unwrap_or(0);
        let (z, stats) = if keep {
            outs.iter()
                .map(|&(px, ch)| (take(px * ch * 2), [(); 4].map(|_| take(ch * 4))))
                .unzip()
        } else {
            let z = take(outs.iter().map(|&(px, ch)| px * ch).max().unwrap_or(0) * 2);
            let stats = [(); 4].map(|_| take(max_c * 4));
            (vec![z; outs.len()], vec![stats; outs.len()])
        };
        let splitk_bytes = conv_shapes(arch, m, p)
            .into_iter()
            .map(|(rows, cout, k)| {
                let s = conv_splits(rows, cout, k);
                if s > 1 {
                    s * rows * cout * 4
                } else {
                    0
                }
            })
            .max()
            .unwrap_or(0);
        let splitk = take(splitk_bytes);
        let partial = take(
            outs.iter()
                .map(|&(px, ch)| bn_chunks(px) * 2 * ch)
                .max()
                .unwrap_or(0)
                * 4,
        );
        let seg_logits = take(m * arch.seg.classes * p * p * 4);
        let labels = take(m * p * p);
        let costs = take(m * p * p * (arch.seg.classes - 1));
        let (k1, k2) = (arch.mil.emb_proj.fout, arch.mil.img_proj.fout);
        let a = Arena {
            m,
            patch: p,
            rows,
            keep,
            base: DevPtr::NULL,
            input,
            units,
            z,
            stats,
            splitk,
            partial,
            seg_logits,
            labels,
            costs,
            mil_z: take(rows * k1 * 4),
            mil_arg: take(rows * k1 * 4),
            mil_pre: take(rows * k1 * 4),
            mil_e: take(rows * k1 * 4),
            mil_t: take(rows * k2 * 4),
            mil_g: take(rows * k2 * 4),
            mil_v: take(rows * k2 * 4),
            cls: take(rows * arch.mil.classifier.fout * 4),
            bag_start: take((rows + 1) * 4),
        };
        (a, carve.len())
    }
    pub fn at(&self, off: usize) -> u64 {
        self.base.offset(off).0
    }
}

/// (GEMM rows, padded cout, K) of every tensor-core conv of the forward pass for m patches of
/// side p (all units but the first layer's direct kernel).
fn conv_shapes(arch: &Arch, m: usize, p: usize) -> Vec<(usize, usize, usize)> {
    arch.units
        .iter()
        .filter(|u| !reads_patches(u))
        .map(|u| {
            let r = p >> u.level;
            let k: usize = u.inputs.iter().map(|&(_, c)| 9 * pad8(c)).sum();
            (m * r * r, pad8(u.cout), k)
        })
        .collect()
}

/// The input of one convolution.
#[derive(Clone, Copy)]
enum ConvIn {
    /// fp32 NCHW patches (the first layer).
    Patches(u64),
    /// An NHWC fp16 tensor at the conv's resolution.
    Plain(u64),
    /// Two NHWC tensors concatenated along channels.
    Concat(u64, u64),
    /// An NHWC tensor at half the conv's resolution, upsampled ×2 while loading.
    Upsample(u64),
}

/// What a forward pass computes beyond the decoder.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Heads {
    /// Segmentation logits and the MIL head.
    All,
    /// Argmax labels only, with or without their lobe-order costs.
    Labels { costs: bool },
}

/// M²UNet's forward pass on CUDA kernels (a GPU, or the CPU emulator).
pub struct CudaEngine {
    pub(super) dev: Device,
    pub(super) model: Model,
    pub(super) arch: Arch,
    pub(super) w: Weights,
    wbase: DevPtr,
    /// Running statistics changed on the device since the eval weights were folded.
    stale_eval: bool,
    /// Train-mode passes keep what a backward needs (set by a `CudaTrainer`).
    pub(super) keep: bool,
    pub(super) arena: Option<Arena>,
    /// While profiling: a device mark after each stage of the forward pass.
    marks: RefCell<Option<Vec<(String, Mark)>>>,
    /// The kernel of the decoders' up_conv (M2UNET_UPCONV, or `set_upconv`).
    upconv: UpConvKernel,
    /// Whether eval forwards are captured as graphs and replayed (see `run_eval`).
    graphs: bool,
    /// The last eval forward's shape, and the graph captured for it.
    eval_last: Option<EvalKey>,
    eval_graph: Option<(EvalKey, Graph)>,
}

/// What a captured eval forward's by-value parameters depend on: the batch shape, where the
/// activations and weights lie, and the up_conv kernel.
#[derive(Clone, Copy, PartialEq)]
struct EvalKey {
    m: usize,
    bags: usize,
    arena: (DevPtr, usize, usize, usize),
    weights: DevPtr,
    upconv: UpConvKernel,
}

impl CudaEngine {
    pub fn new(model: &Model, kind: DeviceKind) -> Result<Self> {
        model.config().validate()?;
        let c = model.config();
        ensure!(
            c.in_channels * c.enc_width * 9 <= 4608,
            "in_channels·enc_width ≤ 512 is required by the first-layer kernel"
        );
        ensure!(
            c.seg_classes <= 16 && c.seg_classes * c.enc_width <= 4096,
            "seg head: at most 16 classes and 4096 weights"
        );
        ensure!(
            c.bottleneck_width <= 2048,
            "bottleneck_width ≤ 2048 is required by the MIL kernel"
        );
        let arch = model.arch().clone();
        for u in &arch.units {
            check_loader(u)?;
        }
        let mut dev = Device::new(kind)?;
        let (w, bytes) = build_weights(model)?;
        let wbase = dev.alloc(bytes.len())?;
        dev.upload(wbase, &bytes)?;
        Ok(CudaEngine {
            dev,
            model: model.clone(),
            arch,
            w: w.rebased(wbase.0),
            wbase,
            stale_eval: false,
            keep: false,
            arena: None,
            marks: RefCell::new(None),
            upconv: UpConvKernel::from_env()?,
            graphs: true,
            eval_last: None,
            eval_graph: None,
        })
    }

    /// Selects the kernel of the decoders' up_conv.
    pub fn set_upconv(&mut self, k: UpConvKernel) {
        self.upconv = k;
    }

    /// Selects the tier of the tensor-core convolutions (`Device::set_conv_tier`); a captured
    /// eval graph, recorded with the other tier's kernels, is dropped.
    pub fn set_conv_tier(&mut self, tier: ConvTier) -> Result<()> {
        self.dev.set_conv_tier(tier)?;
        self.eval_graph = None;
        self.eval_last = None;
        Ok(())
    }

    /// The device the engine runs on.
    pub fn device(&self) -> &Device {
        &self.dev
    }

    /// The model with the running statistics the train-mode passes have updated.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Forward pass with training-mode BatchNorm (batch statistics; running statistics and
    /// num_batches_tracked updated as PyTorch does).
    pub fn forward_train(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Outputs> {
        let m = self.load_batch(patches, bag_sizes)?;
        self.run(Mode::Train, Heads::All, m, bag_sizes.len())?;
        let out = self.read_outputs(m, bag_sizes.len())?;
        self.read_running_stats()?;
        Ok(out)
    }

    /// Uploads the batch and launches one eval forward of both heads (weights refreshed if
    /// stale). Returns M.
    fn launch_eval(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<usize> {
        let m = self.load_batch(patches, bag_sizes)?;
        self.run_eval(m, bag_sizes.len())?;
        Ok(m)
    }

    /// The eval forward of the loaded batch: the first of a shape runs eagerly, the next one is
    /// captured as a graph, which later forwards of the shape replay (unless graphs are off).
    fn run_eval(&mut self, m: usize, bags: usize) -> Result<()> {
        let a = self.arena.as_ref().expect("arena sized");
        let key = EvalKey {
            m,
            bags,
            arena: (a.base, a.m, a.patch, a.rows),
            weights: self.wbase,
            upconv: self.upconv,
        };
        let last = self.eval_last.replace(key);
        if !self.graphs || last != Some(key) {
            return self.run(Mode::Eval, Heads::All, m, bags);
        }
        if self.eval_graph.as_ref().is_none_or(|(k, _)| *k != key) {
            self.eval_graph = None;
            let _range = nvtx::range("capture");
            self.dev.begin_capture()?;
            let launched = self.run(Mode::Eval, Heads::All, m, bags);
            let graph = self.dev.end_capture();
            launched?;
            self.eval_graph = Some((key, graph?));
        }
        let _range = nvtx::range("replay");
        let (_, graph) = self.eval_graph.as_ref().expect("captured");
        self.dev.launch_graph(graph)
    }

    /// Whether eval forwards are captured as graphs and replayed (on by default).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
        self.eval_graph = None;
    }

    /// One eval forward run to completion, so that timed runs that follow start warm. Returns M.
    fn warm_up_eval(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<usize> {
        let m = self.launch_eval(patches, bag_sizes)?;
        self.dev.synchronize()?;
        Ok(m)
    }

    /// Device milliseconds of one eval forward (inputs already uploaded; mean over `iters`
    /// runs after one warm-up), timed with CUDA events on a GPU.
    pub fn time_forward_eval(
        &mut self,
        patches: &[f32],
        bag_sizes: &[usize],
        iters: usize,
    ) -> Result<f32> {
        let m = self.warm_up_eval(patches, bag_sizes)?;
        // A second run captures the graph the timed runs replay.
        self.run_eval(m, bag_sizes.len())?;
        let iters = iters.max(1);
        let ms = {
            let this = &mut *self;
            let start = this.dev.mark()?;
            for _ in 0..iters {
                this.run_eval(m, bag_sizes.len())?;
            }
            let end = this.dev.mark()?;
            this.dev.elapsed_ms(&start, &end)?
        };
        Ok(ms / iters as f32)
    }

    /// Device milliseconds of each stage (every conv + BN + ReLU, the seg head, the MIL head)
    /// of one eval forward, after a warm-up run.
    pub fn profile_forward_eval(
        &mut self,
        patches: &[f32],
        bag_sizes: &[usize],
    ) -> Result<Vec<(String, f32)>> {
        let m = self.warm_up_eval(patches, bag_sizes)?;
        *self.marks.borrow_mut() = Some(vec![("start".to_string(), self.dev.mark()?)]);
        let result = self.run(Mode::Eval, Heads::All, m, bag_sizes.len());
        let marks = self.marks.borrow_mut().take().unwrap_or_default();
        result?;
        let mut out = vec![];
        for pair in marks.windows(2) {
            out.push((
                pair[1].0.clone(),
                self.dev.elapsed_ms(&pair[0].1, &pair[1].1)?,
            ));
        }
        Ok(out)
    }

    /// Marks the end of a forward stage while profiling.
    fn mark(&self, stage: &str) -> Result<()> {
        if let Some(marks) = self.marks.borrow_mut().as_mut() {
            marks.push((stage.to_string(), self.dev.mark()?));
        }
        Ok(())
    }

    /// Checks a batch of bags (its patch side read off the data) and loads it. Returns M.
    fn load_batch(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<usize> {
        let batch = Batch::unlabelled(patches, bag_sizes, self.model.config().in_channels)?;
        batch.validate(self.model.config())?;
        let m = batch.patches_count();
        self.prepare(patches, Some(bag_sizes), m, batch.patch)?;
        Ok(m)
    }

    /// Refreshes stale eval weights, sizes the arena for `m` patches of side `p` and uploads
    /// the inputs.
    pub(super) fn prepare(
        &mut self,
        patches: &[f32],
        bag_sizes: Option<&[usize]>,
        m: usize,
        p: usize,
    ) -> Result<()> {
        self.ensure_arena(m, p, m)?;
        self.upload_input(patches)?;
        if let Some(bags) = bag_sizes {
            self.upload_bags(bags)?;
        }
        Ok(())
    }

    /// Refreshes stale eval weights and makes the arena hold `m` patches of side `p` and
    /// `rows` patches in the MIL head (growing it when needed).
    fn ensure_arena(&mut self, m: usize, p: usize, rows: usize) -> Result<()> {
        if self.stale_eval {
            self.refresh_weights()?;
        }
        if self
            .arena
            .as_ref()
            .is_none_or(|a| a.m < m || a.patch != p || a.rows < rows || a.keep != self.keep)
        {
            if let Some(a) = self.arena.take() {
                self.dev.free(a.base)?;
            }
            let (mut a, bytes) = Arena::layout(&self.arch, m, p, rows, self.keep);
            a.base = self.dev.alloc(bytes)?;
            self.arena = Some(a);
        }
        Ok(())
    }

    fn upload_input(&mut self, patches: &[f32]) -> Result<()> {
        let a = self.arena.as_ref().expect("arena sized");
        self.dev.upload(a.base.offset(a.input), patches)
    }

    /// The bags' first patch indices (and the end) for the bag-level GCP.
    fn upload_bags(&mut self, bags: &[usize]) -> Result<()> {
        let a = self.arena.as_ref().expect("arena sized");
        let mut starts = vec![0i32];
        for &b in bags {
            starts.push(starts.last().unwrap() + b as i32);
        }
        self.dev.upload(a.base.offset(a.bag_start), &starts)
    }

    /// Re-folds the eval weights after train-mode passes changed the running statistics.
    fn refresh_weights(&mut self) -> Result<()> {
        let (w, bytes) = build_weights(&self.model)?;
        self.dev.upload(self.wbase, &bytes)?;
        self.w = w.rebased(self.wbase.0);
        self.stale_eval = false;
        Ok(())
    }

    /// Conv unit `i` (3×3 conv + BN + ReLU) at resolution h×h for m patches, writing its
    /// output (and 2×2 max-pool) in the arena.
    fn conv(&self, i: usize, input: ConvIn, m: usize, h: usize, mode: Mode) -> Result<()> {
        let a = self.arena.as_ref().expect("arena");
        let l = &self.w.convs[i];
        let _range = nvtx::range(&l.name);
        let [out, pooled] = a.units[i];
        let (out, pool) = (a.at(out), self.arch.units[i].pooled.then(|| a.at(pooled)));
        let [scale, shift, mean, invstd] = a.stats[i].map(|o| a.at(o));
        let cp = pad8(l.cout);
        let (wts, y, relu, y_pool) = match mode {
            Mode::Eval => (l.eval, out, 1, pool.unwrap_or(0)),
            Mode::Train => (l.train, a.at(a.z[i]), 0, 0),
        };
        // Train mode: the tensor-core conv without split-K writes the BN chunk statistics in
        // its epilogue; the other kernels leave them to bn_stats.
        let mut stats_done = false;
        match input {
            ConvIn::Patches(x) => conv3x3_first(
                &self.dev,
                &ConvFirstParams {
                    x,
                    wt: (wts.w),
                    bias: (wts.b),
                    y,
                    y_pool,
                    n: m as i32,
                    cin: l.parts[0] as i32,
                    h: h as i32,
                    w: h as i32,
                    cout_real: l.cout as i32,
                    cout: cp as i32,
                    relu,
                    pad_: 0,
                },
            )?,
            ConvIn::Upsample(x) if self.upconv == UpConvKernel::Subpixel && y_pool == 0 => {
                let (cin, lh) = (pad8(l.parts[0]), h / 2);
                let wt = wts.up.expect("an up_conv has its composite weights");
                let splits = conv_up_splits(m, lh, lh, cin, cp);
                conv3x3_up(
                    &self.dev,
                    &ConvUpParams {
                        x,
                        wt,
                        bias: wts.b,
                        y,
                        partial: a.at(a.splitk),
                        n: m as i32,
                        h: lh as i32,
                        w: lh as i32,
                        cin: cin as i32,
                        cout: cp as i32,
                        relu,
                        splits: splits as i32,
                        border_only: 0,
                    },
                )?;
            }
            ConvIn::Plain(_) | ConvIn::Concat(..) | ConvIn::Upsample(_) => {
                let mut p = self.igemm_params(i, input, m, h, mode);
                stats_done = mode == Mode::Train && p.splits == 1;
                if stats_done {
                    p.stats = a.at(a.partial);
                }
                conv3x3(&self.dev, &p, matches!(input, ConvIn::Upsample(_)))?;
            }
        }
        if mode == Mode::Train {
            let pixels = m * h * h;
            let chunks = bn_chunks(pixels);
            if !stats_done {
                bn_stats(
                    &self.dev,
                    &BnStatsParams {
                        x: y,
                        partial: a.at(a.partial),
                        pixels: pixels as i32,
                        c: cp as i32,
                        chunk: BN_CHUNK as i32,
                        pad_: 0,
                    },
                )?;
            }
            bn_finalize(
                &self.dev,
                &BnFinalizeParams {
                    partial: a.at(a.partial),
                    gamma: l.gamma,
                    beta: l.beta,
                    running_mean: l.running_mean,
                    running_var: l.running_var,
                    scale,
                    shift,
                    mean,
                    invstd,
                    chunks: chunks as i32,
                    pixels: pixels as i32,
                    chunk: BN_CHUNK as i32,
                    c: cp as i32,
                    c_real: l.cout as i32,
                    pad_: 0,
                    momentum: BN_MOMENTUM,
                    eps: BN_EPS,
                },
            )?;
            bn_apply(
                &self.dev,
                &BnApplyParams {
                    x: y,
                    scale,
                    shift,
                    y: out,
                    y_pool: pool.unwrap_or(0),
                    n: m as i32,
                    h: h as i32,
                    w: h as i32,
                    c: cp as i32,
                },
            )?;
        }
        self.mark(&l.name)
    }

    /// The implicit-GEMM parameters of unit `i` on a plain, concatenated or (fused loader)
    /// upsampled input at resolution h×h, writing its output (eval) or its pre-BN z (train).
    fn igemm_params(&self, i: usize, input: ConvIn, m: usize, h: usize, mode: Mode) -> ConvParams {
        let a = self.arena.as_ref().expect("arena");
        let l = &self.w.convs[i];
        let cp = pad8(l.cout);
        let (wts, y, relu, y_pool) = match mode {
            Mode::Eval => (
                l.eval,
                a.at(a.units[i][0]),
                1,
                if self.arch.units[i].pooled {
                    a.at(a.units[i][1])
                } else {
                    0
                },
            ),
            Mode::Train => (l.train, a.at(a.z[i]), 0, 0),
        };
        let (x, x2, cin2) = match input {
            ConvIn::Concat(x, x2) => (x, x2, pad8(l.parts[1])),
            ConvIn::Plain(x) | ConvIn::Upsample(x) => (x, 0, 0),
            ConvIn::Patches(_) => unreachable!("the first layer has its own kernel"),
        };
        let cin1 = pad8(l.parts[0]);
        let splits = conv_splits(m * h * h, cp, 9 * (cin1 + cin2));
        ConvParams {
            x,
            x2,
            wt: wts.w,
            bias: wts.b,
            y,
            y_pool,
            n: m as i32,
            h: h as i32,
            w: h as i32,
            cin1: cin1 as i32,
            cin2: cin2 as i32,
            cout: cp as i32,
            in_h: (h / 2) as i32,
            in_w: (h / 2) as i32,
            relu,
            quad: h.is_multiple_of(2) as i32,
            partial: a.at(a.splitk),
            stats: 0,
            splits: splits as i32,
            pad_: 0,
        }
    }

    /// `segment`'s last conv with the seg head and argmax in its epilogue, when the kernel can
    /// take it (the seg head reads the last unit, a plain or concatenated input, one column
    /// block, no split-K, no pooling). Returns whether it ran.
    fn conv_with_seg_head(&self, m: usize, heads: Heads) -> Result<bool> {
        let a = self.arena.as_ref().expect("arena");
        let (seg, last) = (&self.arch.seg, self.arch.units.len() - 1);
        let u = &self.arch.units[last];
        let input = self.conv_input(u, a);
        if seg.src != last || u.pooled || !matches!(input, ConvIn::Plain(_) | ConvIn::Concat(..)) {
            return Ok(false);
        }
        let conv = self.igemm_params(last, input, m, a.patch >> u.level, Mode::Eval);
        if !seg_fusable(conv.cout as usize, conv.splits as usize, seg.classes) {
            return Ok(false);
        }
        let _range = nvtx::range(&seg.name);
        conv3x3_seg(
            &self.dev,
            &ConvSegParams {
                conv,
                w: self.w.seg.w,
                bias: self.w.seg.b,
                labels: a.at(a.labels),
                costs: self.costs_at(heads),
                classes: seg.classes as i32,
                c_real: seg.cin as i32,
            },
        )?;
        self.mark(&seg.name)?;
        Ok(true)
    }

    /// Where conv unit `u` loads its input from in the arena `a`.
    fn conv_input(&self, u: &ConvUnit, a: &Arena) -> ConvIn {
        let out = |j: usize| a.at(a.units[j][0]);
        match u.inputs[..] {
            [(Src::Input, _)] => ConvIn::Patches(a.at(a.input)),
            [(Src::Unit(j), _)] => ConvIn::Plain(out(j)),
            [(Src::Pooled(j), _)] => ConvIn::Plain(a.at(a.units[j][1])),
            [(Src::Upsampled(j), _)] => ConvIn::Upsample(out(j)),
            [(Src::Unit(i), _), (Src::Unit(j), _)] => ConvIn::Concat(out(i), out(j)),
            _ => unreachable!("CudaEngine::new checked every unit's loader"),
        }
    }

    /// The whole forward pass on the device for m patches in `bags` bags: every conv unit of
    /// the architecture in order, the seg head, then the MIL head (an NVTX range each, inside
    /// one `forward`).
    pub(super) fn run(&self, mode: Mode, heads: Heads, m: usize, bags: usize) -> Result<()> {
        let _range = nvtx::range("forward");
        let n = self.arch.units.len();
        self.run_units(mode, m, 0..n - 1)?;
        let fused = matches!(heads, Heads::Labels { .. })
            && mode == Mode::Eval
            && self.conv_with_seg_head(m, heads)?;
        if !fused {
            self.run_units(mode, m, n - 1..n)?;
            self.run_seg_head(heads, m)?;
        }
        if heads == Heads::All {
            let _range = nvtx::range("mil_head");
            self.run_mil_patches(mode, m, 0)?;
            self.run_mil_bags(m, bags)?;
            self.mark("mil_head")?;
        }
        Ok(())
    }

    /// The conv units `units` (in order) for m patches.
    fn run_units(&self, mode: Mode, m: usize, units: std::ops::Range<usize>) -> Result<()> {
        let a = self.arena.as_ref().expect("arena");
        for i in units {
            let u = &self.arch.units[i];
            self.conv(i, self.conv_input(u, a), m, a.patch >> u.level, mode)?;
        }
        Ok(())
    }

    /// Where the seg head writes the lobe-order costs for `heads` (0: not at all).
    fn costs_at(&self, heads: Heads) -> DevAddr {
        let a = self.arena.as_ref().expect("arena");
        match heads {
            Heads::Labels { costs: true } => a.at(a.costs),
            _ => 0,
        }
    }

    /// The seg head on the last unit: logits, or argmax labels only.
    fn run_seg_head(&self, heads: Heads, m: usize) -> Result<()> {
        let a = self.arena.as_ref().expect("arena");
        let (seg, p) = (&self.arch.seg, a.patch);
        let _range = nvtx::range(&seg.name);
        let (logits, labels) = match heads {
            Heads::All => (a.at(a.seg_logits), 0),
            Heads::Labels { .. } => (0, a.at(a.labels)),
        };
        seg_head(
            &self.dev,
            &SegHeadParams {
                x: a.at(a.units[seg.src][0]),
                w: (self.w.seg.w),
                bias: (self.w.seg.b),
                logits,
                labels,
                costs: self.costs_at(heads),
                n: m as i32,
                hw: (p * p) as i32,
                c: pad8(seg.cin) as i32,
                c_real: seg.cin as i32,
                classes: seg.classes as i32,
                pad_: 0,
            },
        )?;
        self.mark(&seg.name)
    }

    /// One fully connected layer over arena rows (offsets), with an optional ReLU.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        l: &Linear,
        x: usize,
        y: usize,
        rows: usize,
        fin: usize,
        fout: usize,
        relu: bool,
    ) -> Result<()> {
        let a = self.arena.as_ref().expect("arena");
        linear_f32(
            &self.dev,
            &LinearParams {
                x: a.at(x),
                w: (l.w),
                bias: (l.b),
                y: a.at(y),
                rows: rows as i32,
                fin: fin as i32,
                fout: fout as i32,
                act: relu as i32,
            },
        )
    }

    /// The embedding level of the MIL head for m patches whose h is in the bottleneck unit's
    /// output: concept scores pooled per patch (on tensor cores in eval mode), proj, BatchNorm
    /// (folded in eval mode), ReLU, written to rows `row0..row0 + m` of the embeddings e.
    fn run_mil_patches(&self, mode: Mode, m: usize, row0: usize) -> Result<()> {
        let a = self.arena.as_ref().expect("arena");
        let mil = &self.arch.mil;
        let k1 = mil.emb_proj.fout;
        let side = a.patch >> mil.level;
        let (z, e) = (a.mil_z + row0 * k1 * 4, a.mil_e + row0 * k1 * 4);
        let (c, inst) = (pad8(mil.channels), side * side);
        if mode == Mode::Eval {
            mil_concepts_mma(
                &self.dev,
                &ConceptsMmaParams {
                    x: a.at(a.units[mil.src][0]),
                    wt: self.w.concepts_h,
                    bias: self.w.concepts_t.b,
                    z: a.at(z),
                    m: m as i32,
                    inst: inst as i32,
                    c: c as i32,
                    kc: concepts_row(mil.channels) as i32,
                    k: k1 as i32,
                    gcp: gcp_code(self.arch.config.gcp),
                    pad_: [0; 2],
                },
            )?;
            return self.linear(&self.w.emb_proj_eval, z, e, m, k1, k1, true);
        }
        mil_concepts_gcp(
            &self.dev,
            &ConceptsGcpParams {
                x: a.at(a.units[mil.src][0]),
                wt: (self.w.concepts_t.w),
                bias: (self.w.concepts_t.b),
                z: a.at(z),
                arg: match mode {
                    Mode::Train if self.keep => a.at(a.mil_arg + row0 * k1 * 4),
                    _ => 0,
                },
                m: m as i32,
                inst: inst as i32,
                c: c as i32,
                c_real: mil.channels as i32,
                k: k1 as i32,
                gcp: gcp_code(self.arch.config.gcp),
            },
        )?;
        self.linear(&self.w.emb_proj, z, a.mil_pre, m, k1, k1, false)?;
        let [g, b, rm, rv] = self.w.emb_bn;
        bn1d_train_relu(
            &self.dev,
            &Bn1dTrainParams {
                x: a.at(a.mil_pre),
                gamma: (g),
                beta: (b),
                running_mean: (rm),
                running_var: (rv),
                y: a.at(e),
                rows: m as i32,
                c: k1 as i32,
                momentum: BN_MOMENTUM,
                eps: BN_EPS,
            },
        )
    }

    /// The image level of the MIL head over the m embeddings: concepts, GCP per bag, proj +
    /// ReLU, classifier → class logits.
    fn run_mil_bags(&self, m: usize, bags: usize) -> Result<()> {
        let a = self.arena.as_ref().expect("arena");
        let mil = &self.arch.mil;
        let (k1, k2) = (mil.emb_proj.fout, mil.img_proj.fout);
        self.linear(&self.w.img_concepts, a.mil_e, a.mil_t, m, k1, k2, false)?;
        gcp_bags(
            &self.dev,
            &GcpBagsParams {
                t: a.at(a.mil_t),
                bag_start: a.at(a.bag_start),
                g: a.at(a.mil_g),
                bags: bags as i32,
                k: k2 as i32,
                gcp: gcp_code(self.arch.config.gcp),
                pad_: 0,
            },
        )?;
        self.linear(&self.w.img_proj, a.mil_g, a.mil_v, bags, k2, k2, true)?;
        let classes = mil.classifier.fout;
        self.linear(&self.w.classifier, a.mil_v, a.cls, bags, k2, classes, false)
    }

    pub(super) fn read_outputs(&self, m: usize, bags: usize) -> Result<Outputs> {
        let a = self.arena.as_ref().expect("arena");
        let (classes, p) = (self.arch.seg.classes, a.patch);
        let mut out = Outputs {
            seg_logits: vec![0f32; m * classes * p * p],
            cls_logits: vec![0f32; bags * self.arch.mil.classifier.fout],
        };
        self.dev
            .download(a.base.offset(a.seg_logits), &mut out.seg_logits)?;
        self.dev
            .download(a.base.offset(a.cls), &mut out.cls_logits)?;
        Ok(out)
    }

    /// Copies the device's running statistics back into the host model after a train pass.
    fn read_running_stats(&mut self) -> Result<()> {
        let mut model = self.model.clone();
        self.download_running_stats(&mut model)?;
        self.model = model;
        self.model.batches_tracked.iter_mut().for_each(|n| *n += 1);
        self.stale_eval = true;
        Ok(())
    }

    /// `model`'s BatchNorm running statistics written to the device.
    pub(super) fn upload_running_stats(&self, model: &Model) -> Result<()> {
        for (rm, rv, off, c) in self.running_stat_slots() {
            self.dev.upload(DevPtr(rm), &model.buffers[off..off + c])?;
            self.dev
                .upload(DevPtr(rv), &model.buffers[off + c..off + 2 * c])?;
        }
        Ok(())
    }

    /// (running mean, running var addresses, offset in `Model::buffers`, channels) of every BN.
    fn running_stat_slots(&self) -> Vec<(u64, u64, usize, usize)> {
        let mut layers: Vec<(u64, u64, usize, usize)> = vec![];
        for l in &self.w.convs {
            layers.push((l.running_mean, l.running_var, l.bn_buffer, l.cout));
        }
        let [_, _, rm, rv] = self.w.emb_bn;
        layers.push((rm, rv, self.w.emb_bn_buffer, self.arch.mil.emb_proj.fout));
        layers
    }

    /// The device's BatchNorm running statistics written into `model`'s buffers.
    pub(super) fn download_running_stats(&self, model: &mut Model) -> Result<()> {
        for (rm, rv, off, c) in self.running_stat_slots() {
            self.dev
                .download(DevPtr(rm), &mut model.buffers[off..off + c])?;
            self.dev
                .download(DevPtr(rv), &mut model.buffers[off + c..off + 2 * c])?;
        }
        Ok(())
    }
}

/// Patches per encoder pass of `classify`.
const CLASSIFY_CHUNK: usize = 8;

impl InferenceEngine for CudaEngine {
    fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    fn describe(&self) -> String {
        self.dev.describe()
    }

    fn forward_eval(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Outputs> {
        let m = self.launch_eval(patches, bag_sizes)?;
        self.read_outputs(m, bag_sizes.len())
    }

    fn classify(&mut self, patches: &[f32], bag_sizes: &[usize]) -> Result<Vec<f32>> {
        let batch = Batch::unlabelled(patches, bag_sizes, self.model.config().in_channels)?;
        batch.validate(self.model.config())?;
        let (m, p) = (batch.patches_count(), batch.patch);
        let chunk = CLASSIFY_CHUNK.min(m);
        self.ensure_arena(chunk, p, m)?;
        self.upload_bags(bag_sizes)?;
        let per = patches.len() / m;
        let encoder = self.arch.mil.src + 1;
        for start in (0..m).step_by(chunk) {
            let n = chunk.min(m - start);
            self.upload_input(&patches[start * per..(start + n) * per])?;
            self.run_units(Mode::Eval, n, 0..encoder)?;
            self.run_mil_patches(Mode::Eval, n, start)?;
        }
        self.run_mil_bags(m, bag_sizes.len())?;
        let a = self.arena.as_ref().expect("arena");
        let mut cls = vec![0f32; bag_sizes.len() * self.arch.mil.classifier.fout];
        self.dev.download(a.base.offset(a.cls), &mut cls)?;
        Ok(cls)
    }

    fn segment(&mut self, patches: &[f32], p: usize, costs: bool) -> Result<LobeScores> {
        let m = segment_count(self.model.config(), patches, p)?;
        self.prepare(patches, None, m, p)?;
        self.run(Mode::Eval, Heads::Labels { costs }, m, 0)?;
        let a = self.arena.as_ref().expect("arena");
        let mut labels = vec![0u8; m * p * p];
        self.dev.download(a.base.offset(a.labels), &mut labels)?;
        let stride = self.arch.seg.classes - 1;
        let mut cost = vec![0u8; if costs { labels.len() * stride } else { 0 }];
        if costs {
            self.dev.download(a.base.offset(a.costs), &mut cost)?;
        }
        Ok(LobeScores::from_parts(labels, cost, stride))
    }
}
