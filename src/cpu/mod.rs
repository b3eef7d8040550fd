//! The CPU engine: the f32 reference implementation of docs/model.md.

mod engine;
pub mod ops;

pub use engine::{run_step, CpuEngine, Losses, StepResult, Trainer};
