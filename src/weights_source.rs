//! Where weights come from: `--weights`, else `$M2UNET_WEIGHTS`, else the embedded default.
//!
//! The default weights are compiled into the binary, so it works from any folder.

use crate::io::weights::{load_model, load_model_bytes};
use crate::model::Model;
use anyhow::{Context, Result};
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

/// The environment variable naming a weights file for commands run without `--weights`.
pub const WEIGHTS_ENV: &str = "M2UNET_WEIGHTS";

/// Name of the default weights (weights/MODEL_CARD.md).
pub const DEFAULT_WEIGHTS_NAME: &str = "m2unet_synthetic_p112";

/// The default weights' file: the paper network trained on synthetic phantoms at P = 112 (f16).
pub static DEFAULT_WEIGHTS: &[u8] = include_bytes!("../weights/m2unet_synthetic_p112.safetensors");

/// The weights a command uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WeightsSource {
    /// Named by `--weights`.
    Flag(PathBuf),
    /// Named by the environment variable [`WEIGHTS_ENV`].
    Env(PathBuf),
    /// [`DEFAULT_WEIGHTS`], compiled into the binary.
    EmbeddedDefault,
}

impl WeightsSource {
    /// The search order: the `--weights` value, else `env` (the value of [`WEIGHTS_ENV`]) when
    /// set and not empty, else the embedded default.
    pub fn resolve(flag: Option<&Path>, env: Option<OsString>) -> WeightsSource {
        match (flag, env) {
            (Some(path), _) => WeightsSource::Flag(path.to_path_buf()),
            (None, Some(value)) if !value.is_empty() => WeightsSource::Env(PathBuf::from(value)),
            (None, _) => WeightsSource::EmbeddedDefault,
        }
    }

    /// [`WeightsSource::resolve`] with this process's environment.
    pub fn search(flag: Option<&Path>) -> WeightsSource {
        Self::resolve(flag, std::env::var_os(WEIGHTS_ENV))
    }

    pub fn load(&self) -> Result<Model> {
        match self {
            WeightsSource::Flag(path) => load_model(path),
            WeightsSource::Env(path) => load_model(path).with_context(|| {
                format!("{WEIGHTS_ENV}={} names unusable weights", path.display())
            }),
            WeightsSource::EmbeddedDefault => load_model_bytes(DEFAULT_WEIGHTS, &self.to_string()),
        }
    }
}

/// The weights file's path, or "embedded default m2unet_synthetic_p112".
impl fmt::Display for WeightsSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightsSource::Flag(path) | WeightsSource::Env(path) => path.display().fmt(f),
            WeightsSource::EmbeddedDefault => write!(f, "embedded default {DEFAULT_WEIGHTS_NAME}"),
        }
    }
}
