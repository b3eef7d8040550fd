//! What a training run shows on stderr: a progress bar on a terminal, log lines otherwise.

use crate::cuda::train::StepReport;
use crate::io::checkpoint::TrainState;
use crate::metrics::EvalMetrics;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

/// The run's progress display.
pub struct Progress {
    bar: ProgressBar,
    /// A bar is drawn (stderr is a terminal and the run is not quiet).
    drawn: bool,
    quiet: bool,
}

impl Progress {
    /// A bar over `total_steps`, standing at `step`.
    pub fn new(total_steps: u64, step: u64, quiet: bool) -> Progress {
        let drawn = !quiet && std::io::stderr().is_terminal();
        let bar = if drawn {
            let b = ProgressBar::new(total_steps);
            b.set_style(
                ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] step {pos}/{len} {msg} (eta {eta})",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b.set_position(step);
            b
        } else {
            ProgressBar::hidden()
        };
        Progress { bar, drawn, quiet }
    }

    /// A line before the first step.
    pub fn announce(&self, line: &str) {
        if !self.quiet {
            eprintln!("{line}");
        }
    }

    /// After each step: the bar, or a log line every 10 steps; a loss-scaled engine's scale,
    /// and when its update was skipped.
    pub fn step(&self, state: &TrainState, report: &StepReport, rate: f64) {
        let losses = &report.losses;
        let scale = match (report.loss_scale, report.skipped) {
            (s, true) => format!(" scale {s} (skipped: gradients overflowed)"),
            (s, false) if s != 1.0 => format!(" scale {s}"),
            _ => String::new(),
        };
        let msg = format!(
            "epoch {} loss {:.4} (cls {:.4} ce {:.4} dice {:.4}) {rate:.2} patches/s{scale}",
            state.epoch + 1,
            losses.total,
            losses.cls,
            losses.seg_ce,
            losses.seg_dice
        );
        self.bar.set_position(state.step);
        self.bar.set_message(msg.clone());
        if !self.drawn && !self.quiet && state.step.is_multiple_of(10) {
            eprintln!("step {} {msg}", state.step);
        }
    }

    /// After a validated epoch (`state.epoch` already counts it).
    pub fn epoch(&self, state: &TrainState, m: &EvalMetrics) {
        if !self.quiet {
            self.bar.suspend(|| {
                eprintln!(
                    "epoch {} (step {}): val mean Dice {:.4} AUC {:.4} accuracy {:.4} score {:.4}",
                    state.epoch,
                    state.step,
                    m.mean_dice,
                    m.auc,
                    m.accuracy,
                    m.score()
                )
            });
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
