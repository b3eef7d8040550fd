//! The network's parameters: table of PyTorch names, flat storage, initialisation, counts.

mod flops;
mod params;

pub use flops::forward_flops_per_patch;
pub use params::{BnEntry, Model, ParamEntry, ParamTable};
