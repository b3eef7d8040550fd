//! The `m2unet` binary: parses the command line and runs the command (see `m2unet::app`).

use clap::{Parser, Subcommand};
use m2unet::app::{assess, convert, demo, evaluate, export, forward, info, init, synth, train};
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
    Info(info::InfoArgs),
    /// Write freshly initialised weights (PyTorch's default initialisation, seeded).
    Init(init::InitArgs),
    /// Run the network on patches stored in a safetensors file (the stable tool contract).
    Forward(forward::ForwardArgs),
    /// Assess CT volumes: lobe label map, severity report and optional preview per volume.
    Assess(assess::AssessArgs),
    /// Write seeded synthetic chest CT phantoms with ground truth and a manifest.
    Synth(synth::SynthArgs),
    /// Train M²UNet on a manifest of CT volumes, lobe masks and severity labels.
    Train(train::TrainArgs),
    /// Evaluate weights on a manifest: per-lobe 3D Dice and severity metrics.
    Evaluate(evaluate::EvaluateArgs),
    /// Make one synthetic phantom, assess it with the default weights and print the result.
    Demo(demo::DemoArgs),
    /// Write a checkpoint's weights without optimiser state (optionally f16).
    Export(export::ExportArgs),
    /// Write each DICOM CT series in the given folders as NIfTI (HU) with a JSON of its tags.
    Convert(convert::ConvertArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Ok(false): the command ran but some inputs of a batch failed (already reported).
    let result = match cli.command {
        Command::Info(a) => info::run(&a).map(|()| true),
        Command::Init(a) => init::run(&a).map(|()| true),
        Command::Forward(a) => forward::run(&a).map(|()| true),
        Command::Assess(a) => assess::run(&a),
        Command::Synth(a) => synth::run(&a).map(|()| true),
        Command::Train(a) => train::run(&a).map(|_| true),
        Command::Evaluate(a) => evaluate::run(&a).map(|_| true),
        Command::Export(a) => export::run(&a).map(|()| true),
        Command::Demo(a) => demo::run(&a).map(|()| true),
        Command::Convert(a) => convert::run(&a),
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
