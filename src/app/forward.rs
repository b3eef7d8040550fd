//! `m2unet forward`: the network on patches in a safetensors file (the stable tensor contract).
//!
//! tools/torch_reference.py implements the same contract in PyTorch.

use crate::backend::Backend;
use crate::config::{ModelConfig, TrainConfig};
use crate::cpu::ops::loss;
use crate::cpu::{run_step, Losses, StepResult, Trainer};
use crate::cuda::train::{CudaTrainer, INITIAL_LOSS_SCALE};
use crate::cuda::{CudaEngine, DeviceKind};
use crate::engine::{Batch, InferenceEngine, Mode, Outputs};
use crate::io::weights::{load_model, model_tensors, Tensor, TensorFile, WeightDtype};
use crate::model::Model;
use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use std::path::{Path, PathBuf};

/// The BatchNorm mode of the forward.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// BatchNorm with running statistics.
    Eval,
    /// BatchNorm with batch statistics; running statistics are updated and written out.
    Train,
}

/// Input keys: `patches` f32 [M,1,P,P], `bag_sizes` i64 [B] (each ≥ 2, summing to M);
/// optional `seg_labels` i64 [M,P,P] (0–5, −1 = ignore) and `cls_labels` i64 [B].
/// Output keys: `seg_logits` f32 [M,6,P,P], `cls_logits` f32 [B,2]; in train mode also the
/// updated BatchNorm buffers under their state_dict names; with both label sets also `loss`,
/// `loss_cls`, `loss_seg_ce`, `loss_seg_dice` (scalars) and, in train mode, `grad.<name>` for
/// every learnable parameter. The CUDA engine (cuda, emu) computes the gradients in fp16
/// mixed precision at a loss scale of 2^16 (halved until they do not overflow fp16), writes
/// them unscaled, and writes the scale used as `loss_scale`.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ForwardArgs {
    /// Weights (safetensors with PyTorch names; f32, f16 or bf16).
    #[arg(long)]
    pub weights: PathBuf,
    /// Input tensors (safetensors).
    #[arg(long)]
    pub input: PathBuf,
    /// Output tensors (safetensors), written atomically.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value = "eval")]
    pub mode: ModeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Backend,
}

/// `m2unet forward`: reads the input, runs the network on --device and writes the outputs.
pub fn run(a: &ForwardArgs) -> Result<()> {
    let mut model = load_model(&a.weights)?;
    let file = TensorFile::read(&a.input)?;
    let input = ForwardInput::read(&file, model.config(), &a.input)?;
    let mode = match a.mode {
        ModeArg::Eval => Mode::Eval,
        ModeArg::Train => Mode::Train,
    };
    let (result, scale) = run_network(&mut model, &input, mode, a.device)?;
    let mut out = output_tensors(&model, &input, result, mode);
    if let Some(s) = scale {
        out.tensors.insert("loss_scale".into(), Tensor::scalar(s));
    }
    out.write(&a.output)
}

/// The checked tensors of an input file.
struct ForwardInput<'a> {
    path: &'a Path,
    patches: &'a [f32],
    /// Patches M and their side P.
    m: usize,
    p: usize,
    bags: Vec<usize>,
    seg_labels: Option<&'a [i64]>,
    cls_labels: Option<&'a [i64]>,
}

impl<'a> ForwardInput<'a> {
    /// The input's tensors, their shapes checked against each other and the model.
    fn read(file: &'a TensorFile, cfg: &ModelConfig, path: &'a Path) -> Result<ForwardInput<'a>> {
        let ctx = || bad_input(path);
        let name = path.display();
        let (pshape, patches) = file.f32("patches").with_context(ctx)?;
        let [m, c, p, p2] = pshape[..] else {
            bail!(
                "{name}: patches has shape {pshape:?}, expected [M, {}, P, P]",
                cfg.in_channels
            );
        };
        if c != cfg.in_channels || p != p2 {
            bail!(
                "{name}: patches has shape {pshape:?}, expected [M, {}, P, P]",
                cfg.in_channels
            );
        }
        let bags = bag_sizes(file, m, path)?;
        let labels = |key: &str, shape: &[usize]| -> Result<Option<&'a [i64]>> {
            match file.tensors.contains_key(key) {
                true => Ok(Some(int_tensor(file, key, shape).with_context(ctx)?)),
                false => Ok(None),
            }
        };
        Ok(ForwardInput {
            path,
            patches,
            m,
            p,
            seg_labels: labels("seg_labels", &[m, p, p])?,
            cls_labels: labels("cls_labels", &[bags.len()])?,
            bags,
        })
    }

    fn batch(&self) -> Batch<'_> {
        Batch {
            patches: self.patches,
            patch: self.p,
            bag_sizes: &self.bags,
            seg_labels: self.seg_labels,
            cls_labels: self.cls_labels,
        }
    }
}

/// `bag_sizes`: a vector of non-negative sizes summing to the `m` patches.
fn bag_sizes(file: &TensorFile, m: usize, path: &Path) -> Result<Vec<usize>> {
    let name = path.display();
    let (bshape, bag_sizes) = file.i64("bag_sizes").with_context(|| bad_input(path))?;
    if bshape.len() != 1 {
        bail!("{name}: bag_sizes has shape {bshape:?}, expected [B]");
    }
    if let Some(b) = bag_sizes.iter().find(|&&b| b < 0) {
        bail!("{name}: bag size {b} is negative");
    }
    let bags: Vec<usize> = bag_sizes.iter().map(|&b| b as usize).collect();
    let total = bags.iter().sum::<usize>();
    if total != m {
        bail!("{name}: bag_sizes {bags:?} sum to {total}, but patches hold M = {m}");
    }
    Ok(bags)
}

/// The context of the errors an input's contents cause.
fn bad_input(path: &Path) -> String {
    format!("bad input {}", path.display())
}

/// Reads an integer tensor of exactly `shape`.
fn int_tensor<'a>(file: &'a TensorFile, name: &str, shape: &[usize]) -> Result<&'a [i64]> {
    let (s, data) = file.i64(name)?;
    if s != shape {
        bail!("{name} has shape {s:?}, expected {shape:?}");
    }
    Ok(data)
}

/// The forward (with losses when labelled, and gradients in train mode) on `backend`, and the
/// loss scale of the CUDA engine's gradients; `model` takes the BatchNorm buffers a train-mode
/// pass updates.
fn run_network(
    model: &mut Model,
    input: &ForwardInput,
    mode: Mode,
    backend: Backend,
) -> Result<(StepResult, Option<f32>)> {
    match backend.cuda_device() {
        None => Ok((
            run_step(model, &input.batch(), mode, &TrainConfig::default())
                .with_context(|| bad_input(input.path))?,
            None,
        )),
        Some(kind) => run_cuda(model, input, mode, kind),
    }
}

/// The CUDA engine's forward; with labels, its losses, and in train mode its backward (the
/// gradients unscaled from the loss scale they were computed at, which is returned).
fn run_cuda(
    model: &mut Model,
    input: &ForwardInput,
    mode: Mode,
    kind: DeviceKind,
) -> Result<(StepResult, Option<f32>)> {
    let batch = input.batch();
    let labelled = batch.seg_labels.is_some() && batch.cls_labels.is_some();
    if mode == Mode::Train && labelled {
        let trainer = Trainer::new(model.clone(), TrainConfig::default());
        let mut cuda = CudaTrainer::new(&trainer, kind, INITIAL_LOSS_SCALE)?;
        let r = cuda
            .run_step(&batch)
            .with_context(|| bad_input(input.path))?;
        *model = cuda.to_trainer()?.model;
        let (scale, _) = cuda.loss_scale()?;
        if scale < INITIAL_LOSS_SCALE {
            eprintln!(
                "gradients computed at loss scale {scale} (they overflowed fp16 at larger scales)"
            );
        }
        return Ok((r, Some(scale)));
    }
    let mut engine = CudaEngine::new(model, kind)?;
    let outputs = match mode {
        Mode::Eval => engine.forward_eval(input.patches, &input.bags),
        Mode::Train => engine.forward_train(input.patches, &input.bags),
    }
    .with_context(|| bad_input(input.path))?;
    *model = engine.model().clone();
    let losses = match (batch.seg_labels, batch.cls_labels) {
        (Some(seg), Some(cls)) => Some(
            host_losses(model, &batch, &outputs, seg, cls)
                .with_context(|| bad_input(input.path))?,
        ),
        _ => None,
    };
    Ok((
        StepResult {
            outputs,
            losses,
            grads: None,
        },
        None,
    ))
}

/// The losses of a forward's outputs, computed on the host by the CPU engine's loss functions.
fn host_losses(
    model: &Model,
    batch: &Batch,
    out: &Outputs,
    seg: &[i64],
    cls: &[i64],
) -> Result<Losses> {
    let (cfg, t) = (model.config(), TrainConfig::default());
    let (m, p) = (batch.patches_count(), batch.patch);
    let (seg_ce, seg_dice) = loss::seg_loss(
        &out.seg_logits,
        m,
        cfg.seg_classes,
        p * p,
        seg,
        t.lambda_seg,
        None,
    )?;
    let cls = loss::cls_loss(
        &out.cls_logits,
        batch.bag_sizes.len(),
        cfg.cls_classes,
        cls,
        None,
        1.0,
        None,
    )?;
    Ok(Losses {
        total: cls + t.lambda_seg * (seg_ce + seg_dice),
        cls,
        seg_ce,
        seg_dice,
    })
}

/// The output file: logits; in train mode the BatchNorm buffers; the losses and gradients
/// when computed.
fn output_tensors(model: &Model, input: &ForwardInput, r: StepResult, mode: Mode) -> TensorFile {
    let cfg = model.config();
    let (m, p) = (input.m, input.p);
    let mut out = TensorFile::default();
    out.tensors.insert(
        "seg_logits".into(),
        Tensor::f32(&[m, cfg.seg_classes, p, p], r.outputs.seg_logits),
    );
    out.tensors.insert(
        "cls_logits".into(),
        Tensor::f32(&[input.bags.len(), cfg.cls_classes], r.outputs.cls_logits),
    );
    if mode == Mode::Train {
        let state = model_tensors(model, WeightDtype::F32);
        for (name, t) in state.tensors {
            if name.contains(".running_") || name.ends_with(".num_batches_tracked") {
                out.tensors.insert(name, t);
            }
        }
    }
    if let Some(l) = r.losses {
        for (k, v) in [
            ("loss", l.total),
            ("loss_cls", l.cls),
            ("loss_seg_ce", l.seg_ce),
            ("loss_seg_dice", l.seg_dice),
        ] {
            out.tensors.insert(k.into(), Tensor::scalar(v));
        }
    }
    if let Some(g) = r.grads {
        for param in &model.table.params {
            out.tensors.insert(
                format!("grad.{}", param.name),
                Tensor::f32(&param.shape, g[param.range()].to_vec()),
            );
        }
    }
    out
}
