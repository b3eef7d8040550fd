//! The network's parameters: table of PyTorch names, flat storage, initialisation, counts.

mod params;

pub use params::{BnEntry, Model, ParamEntry, ParamTable};
