//! The CPU engine: the f32 reference implementation of docs/model.md.

pub mod ops;
