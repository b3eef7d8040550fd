//! The `m2unet` command line.

use clap::{Parser, Subcommand};
use m2unet::data::phantom::{run_synth, SynthArgs};
use std::process::ExitCode;

/// M²UNet: lung-lobe segmentation and COVID-19 severity from chest CT.
#[derive(Parser)]
#[command(name = "m2unet", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Synth(SynthArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Synth(args) => run_synth(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
