//! m2unet: M²UNet (lung-lobe segmentation + COVID-19 severity from chest CT), CPU and CUDA engines.

pub mod config;
pub mod cpu;
pub mod engine;
pub mod model;
pub mod assess;
pub mod data;
pub mod io;
