//! m2unet: M²UNet (lung-lobe segmentation + COVID-19 severity from chest CT), CPU and CUDA engines.

pub mod app;
pub mod assess;
pub mod backend;
pub mod config;
pub mod cpu;
pub mod ct_input;
pub mod cuda;
pub mod data;
pub mod demo;
pub mod engine;
pub mod evaluate;
pub mod io;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod quality;
pub mod reference;
pub mod train;
pub mod weights_source;
