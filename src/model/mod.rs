//! The network: its layer list (`Arch`), parameter table of PyTorch names, flat storage,
//! initialisation and counts.

mod arch;
mod params;

pub use arch::{Arch, ConvUnit, Linear, MilHead, Module, ModuleKind, SegHead, Src};
pub use params::{fold_bn, BnEntry, Model, ParamEntry, ParamTable};
