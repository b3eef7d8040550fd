//! The command layer: one file per command, holding its clap arguments and `run` function.
//!
//! Built on the library modules, which never import from here; `main.rs` parses and
//! dispatches. It is part of the library so that tests drive the commands in-process.

pub mod assess;
pub mod convert;
pub mod demo;
pub mod evaluate;
pub mod export;
pub mod forward;
pub mod info;
pub mod init;
pub mod synth;
pub mod train;
