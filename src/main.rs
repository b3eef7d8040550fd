//! The `m2unet` command line: info, init, forward (the tensor contract), assess, synth, train,
//! evaluate, export and demo.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use m2unet::assess::{run_assess, AssessArgs, DEFAULT_WEIGHTS};
use m2unet::config::{ModelConfig, TrainConfig};
use m2unet::cpu::{run_step, CpuEngine, StepResult};
use m2unet::cuda::{CudaEngine, DeviceKind};
use m2unet::data::phantom::{run_synth, SynthArgs};
use m2unet::demo::{run_demo, summary, DemoArgs};
use m2unet::engine::InferenceEngine;
use m2unet::engine::{Batch, Mode};
use m2unet::io::weights::{load_model, model_tensors, save_model, Tensor, TensorFile, WeightDtype};
use m2unet::model::{Model, ParamTable};
use m2unet::train::{run_evaluate, run_export, run_train, EvaluateArgs, ExportArgs, TrainArgs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// M²UNet: lung-lobe segmentation and COVID-19 severity assessment from chest CT
/// (He et al., arXiv:2005.03832), with a CPU engine and CUDA kernels.
#[derive(Parser)]
#[command(name = "m2unet", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the model configuration and per-block parameter counts.
    Info(InfoArgs),
    /// Write freshly initialised weights (PyTorch's default initialisation, seeded).
    Init(InitArgs),
    /// Run the network on patches stored in a safetensors file (the stable tool contract).
    Forward(ForwardArgs),
    /// Assess CT volumes: lobe label map, severity report and optional preview per volume.
    Assess(AssessArgs),
    /// Write seeded synthetic chest CT phantoms with ground truth and a manifest.
    Synth(SynthArgs),
    /// Train M²UNet on a manifest of CT volumes, lobe masks and severity labels.
    Train(TrainArgs),
    /// Evaluate weights on a manifest: per-lobe 3D Dice and severity metrics.
    Evaluate(EvaluateArgs),
    /// Make one synthetic phantom, assess it with the default weights and print the result.
    Demo(DemoArgs),
    /// Write a checkpoint's weights without optimiser state (optionally f16).
    Export(ExportArgs),
    /// Write each DICOM CT series in the given folders as NIfTI (HU) with a JSON of its tags.
    Convert(m2unet::convert::ConvertArgs),
}

#[derive(clap::Args)]
struct InfoArgs {
    /// Print the parameter count of every block (as in the paper's Table 1).
    #[arg(long)]
    params: bool,
    /// Describe this preset ...
    #[arg(long, value_parser = ["paper", "tiny"], default_value = "paper", conflicts_with = "weights")]
    preset: String,
    /// ... or the model stored in this weights file.
    #[arg(long)]
    weights: Option<PathBuf>,
}

#[derive(clap::Args)]
struct InitArgs {
    /// Where to write the weights (safetensors, PyTorch state_dict names).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Network size: the paper's (4,015,304 parameters) or the tiny test preset.
    #[arg(long, value_parser = ["paper", "tiny"], default_value = "paper")]
    preset: String,
    /// Store tensors as f16 instead of f32.
    #[arg(long)]
    half: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// BatchNorm with running statistics.
    Eval,
    /// BatchNorm with batch statistics; running statistics are updated and written out.
    Train,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DeviceArg {
    /// The f32 CPU engine.
    Cpu,
    /// The CUDA engine on the first GPU (fp16 kernels, fp32 accumulation).
    Cuda,
    /// The CUDA engine's kernels on the CPU emulator (slow; for checks without a GPU).
    Emu,
}

/// Input keys: `patches` f32 [M,1,P,P], `bag_sizes` i64 [B] (each ≥ 2, summing to M);
/// optional `seg_labels` i64 [M,P,P] (0–5, −1 = ignore) and `cls_labels` i64 [B].
/// Output keys: `seg_logits` f32 [M,6,P,P], `cls_logits` f32 [B,2]; in train mode also the
/// updated BatchNorm buffers under their state_dict names; with both label sets also `loss`,
/// `loss_cls`, `loss_seg_ce`, `loss_seg_dice` (scalars) and, in train mode, `grad.<name>` for
/// every learnable parameter.
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
struct ForwardArgs {
    /// Weights (safetensors with PyTorch names; f32, f16 or bf16).
    #[arg(long)]
    weights: PathBuf,
    /// Input tensors (safetensors).
    #[arg(long)]
    input: PathBuf,
    /// Output tensors (safetensors), written atomically.
    #[arg(long)]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "eval")]
    mode: ModeArg,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Ok(false): the command ran but some inputs of a batch failed (already reported).
    let result = match cli.command {
        Command::Info(a) => info(&a).map(|()| true),
        Command::Init(a) => init(&a).map(|()| true),
        Command::Forward(a) => forward(&a).map(|()| true),
        Command::Assess(a) => run_assess(&a, make_engine),
        Command::Synth(a) => run_synth(&a).map(|()| true),
        Command::Train(a) => train(&a).map(|()| true),
        Command::Evaluate(a) => run_evaluate(&a).map(|_| true),
        Command::Export(a) => run_export(&a).map(|()| true),
        Command::Convert(a) => m2unet::convert::run_convert(&a),
        Command::Demo(a) => run_demo(&a, make_engine).map(|r| {
            let w = a
                .weights
                .as_ref()
                .map_or(DEFAULT_WEIGHTS.to_string(), |w| w.display().to_string());
            println!("{}", summary(&r, &w));
            true
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Builds the inference engine `assess` runs on.
fn make_engine(weights: &Path, device: &str) -> Result<Box<dyn InferenceEngine>> {
    match device {
        "cpu" => Ok(Box::new(CpuEngine::new(load_model(weights)?))),
        "cuda" | "emu" => Ok(Box::new(CudaEngine::new(
            &load_model(weights)?,
            device.parse::<DeviceKind>()?,
        )?)),
        other => bail!("unknown device {other:?} (available: cpu, cuda, emu)"),
    }
}

fn info(a: &InfoArgs) -> Result<()> {
    let cfg = match &a.weights {
        Some(w) => *load_model(w)?.config(),
        None => ModelConfig::preset(&a.preset)?,
    };
    let table = ParamTable::new(cfg);
    println!("m2unet {}", env!("CARGO_PKG_VERSION"));
    println!(
        "model: patch {p}×{p}, in_channels {}, enc_width {}, bottleneck_width {}, emb_concepts {}, img_concepts {}, seg_classes {}, cls_classes {}, gcp {}",
        cfg.in_channels,
        cfg.enc_width,
        cfg.bottleneck_width,
        cfg.emb_concepts,
        cfg.img_concepts,
        cfg.seg_classes,
        cfg.cls_classes,
        cfg.gcp,
        p = cfg.patch
    );
    println!("learnable parameters: {}", group_thousands(table.n_params));
    if a.params {
        println!("{:<12} {:>12} {:>9}", "block", "params", "K (×1024)");
        for (block, n) in table.block_counts() {
            println!(
                "{block:<12} {:>12} {:>9.1}",
                group_thousands(n),
                n as f64 / 1024.0
            );
        }
    }
    println!("cpu engine: {} threads", rayon::current_num_threads());
    print!("{}", m2unet::cuda::describe_devices());
    Ok(())
}

fn group_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn init(a: &InitArgs) -> Result<()> {
    let model = Model::init(ModelConfig::preset(&a.preset)?, a.seed);
    let dtype = if a.half {
        WeightDtype::F16
    } else {
        WeightDtype::F32
    };
    save_model(&model, &a.out, dtype)?;
    println!(
        "wrote {} ({} preset, seed {}, {} parameters)",
        a.out.display(),
        a.preset,
        a.seed,
        model.table.n_params
    );
    Ok(())
}

/// Reads an integer vector tensor of exactly `len` values (any if None).
fn int_tensor<'a>(file: &'a TensorFile, name: &str, shape: &[usize]) -> Result<&'a [i64]> {
    let (s, data) = file.i64(name)?;
    if s != shape {
        bail!("{name} has shape {s:?}, expected {shape:?}");
    }
    Ok(data)
}

fn forward(a: &ForwardArgs) -> Result<()> {
    let mut model = load_model(&a.weights)?;
    let cfg = *model.config();
    let input = TensorFile::read(&a.input)?;
    let ctx = || format!("bad input {}", a.input.display());
    let (pshape, patches) = input.f32("patches").with_context(ctx)?;
    let [m, c, p, p2] = pshape[..] else {
        bail!(
            "{}: patches has shape {pshape:?}, expected [M, {}, P, P]",
            a.input.display(),
            cfg.in_channels
        );
    };
    if c != cfg.in_channels || p != p2 {
        bail!(
            "{}: patches has shape {pshape:?}, expected [M, {}, P, P]",
            a.input.display(),
            cfg.in_channels
        );
    }
    let (bshape, bag_sizes) = input.i64("bag_sizes").with_context(ctx)?;
    if bshape.len() != 1 {
        bail!(
            "{}: bag_sizes has shape {bshape:?}, expected [B]",
            a.input.display()
        );
    }
    if let Some(b) = bag_sizes.iter().find(|&&b| b < 0) {
        bail!("{}: bag size {b} is negative", a.input.display());
    }
    let bags: Vec<usize> = bag_sizes.iter().map(|&b| b as usize).collect();
    if bags.iter().sum::<usize>() != m {
        bail!(
            "{}: bag_sizes {bags:?} sum to {}, but patches hold M = {m}",
            a.input.display(),
            bags.iter().sum::<usize>()
        );
    }
    let seg_labels = match input.tensors.contains_key("seg_labels") {
        true => Some(int_tensor(&input, "seg_labels", &[m, p, p]).with_context(ctx)?),
        false => None,
    };
    let cls_labels = match input.tensors.contains_key("cls_labels") {
        true => Some(int_tensor(&input, "cls_labels", &[bags.len()]).with_context(ctx)?),
        false => None,
    };
    let batch = Batch {
        patches,
        patch: p,
        bag_sizes: &bags,
        seg_labels,
        cls_labels,
    };
    let mode = match a.mode {
        ModeArg::Eval => Mode::Eval,
        ModeArg::Train => Mode::Train,
    };
    let r = match a.device {
        DeviceArg::Cpu => {
            run_step(&mut model, &batch, mode, &TrainConfig::default()).with_context(ctx)?
        }
        DeviceArg::Cuda | DeviceArg::Emu => {
            if seg_labels.is_some() || cls_labels.is_some() {
                bail!("losses and gradients are computed by --device cpu only (the CUDA engine's backward is not written yet); drop the labels or use --device cpu");
            }
            let kind = if a.device == DeviceArg::Cuda {
                DeviceKind::Gpu
            } else {
                DeviceKind::Emu
            };
            let mut engine = CudaEngine::new(&model, kind)?;
            let outputs = match mode {
                Mode::Eval => engine.forward_eval(patches, &bags),
                Mode::Train => engine.forward_train(patches, &bags),
            }
            .with_context(ctx)?;
            model = engine.model().clone();
            StepResult {
                outputs,
                losses: None,
                grads: None,
            }
        }
    };
    let mut out = TensorFile::default();
    out.tensors.insert(
        "seg_logits".into(),
        Tensor::f32(&[m, cfg.seg_classes, p, p], r.outputs.seg_logits),
    );
    out.tensors.insert(
        "cls_logits".into(),
        Tensor::f32(&[bags.len(), cfg.cls_classes], r.outputs.cls_logits),
    );
    if mode == Mode::Train {
        let state = model_tensors(&model, WeightDtype::F32);
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
        for p in &model.table.params {
            out.tensors.insert(
                format!("grad.{}", p.name),
                Tensor::f32(&p.shape, g[p.range()].to_vec()),
            );
        }
    }
    out.write(&a.output)?;
    Ok(())
}

fn train(a: &TrainArgs) -> Result<()> {
    let s = run_train(a)?;
    println!(
        "stopped at epoch {} step {} after {:.1} s ({:.2} patches/s); best validation score {} (epoch {}); checkpoints in {}",
        s.state.epoch,
        s.state.step,
        s.seconds,
        s.patches_per_second,
        s.state
            .best_score
            .map_or("n/a".to_string(), |v| format!("{v:.4}")),
        s.state
            .best_epoch
            .map_or("n/a".to_string(), |v| v.to_string()),
        a.out.display()
    );
    Ok(())
}
