//! safetensors files: generic tensor maps (read any float dtype as f32, ints as i64; atomic
//! writes) and model weights under the PyTorch state_dict names of docs/model.md.

use crate::config::{GcpMode, ModelConfig};
use crate::io::atomic::write_atomic;
use crate::model::{Model, ParamTable};
use anyhow::{anyhow, bail, Context, Result};
use half::{bf16, f16};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// One tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub enum Tensor {
    F32 {
        shape: Vec<usize>,
        data: Vec<f32>,
    },
    /// Stored as f16 when written (weights shipped at half size).
    F16 {
        shape: Vec<usize>,
        data: Vec<f32>,
    },
    I64 {
        shape: Vec<usize>,
        data: Vec<i64>,
    },
}

impl Tensor {
    pub fn f32(shape: &[usize], data: Vec<f32>) -> Self {
        Tensor::F32 {
            shape: shape.to_vec(),
            data,
        }
    }
    pub fn i64(shape: &[usize], data: Vec<i64>) -> Self {
        Tensor::I64 {
            shape: shape.to_vec(),
            data,
        }
    }
    pub fn scalar(v: f32) -> Self {
        Tensor::F32 {
            shape: vec![],
            data: vec![v],
        }
    }
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::F32 { shape, .. } | Tensor::F16 { shape, .. } | Tensor::I64 { shape, .. } => {
                shape
            }
        }
    }
}

/// The named tensors and string metadata of one safetensors file.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

fn floats<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
    bytes
        .chunks_exact(N)
        .map(|c| f(c.try_into().unwrap()))
        .collect()
}

fn ints<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> i64) -> Vec<i64> {
    bytes
        .chunks_exact(N)
        .map(|c| f(c.try_into().unwrap()))
        .collect()
}

impl TensorFile {
    /// Reads every tensor: floating types become f32, integer types i64.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// [`TensorFile::read`] of a file's bytes; `name` says which file in errors.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow!("{name} is not a valid safetensors file: {e:?}"))?;
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("{name}: bad safetensors header: {e:?}"))?;
        let mut tensors = BTreeMap::new();
        for (tensor, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let d = view.data();
            let t = match view.dtype() {
                Dtype::F32 => Tensor::F32 {
                    shape,
                    data: floats(d, f32::from_le_bytes),
                },
                Dtype::F64 => Tensor::F32 {
                    shape,
                    data: floats(d, |b| f64::from_le_bytes(b) as f32),
                },
                Dtype::F16 => Tensor::F32 {
                    shape,
                    data: floats(d, |b| f16::from_le_bytes(b).to_f32()),
                },
                Dtype::BF16 => Tensor::F32 {
                    shape,
                    data: floats(d, |b| bf16::from_le_bytes(b).to_f32()),
                },
                Dtype::I64 => Tensor::I64 {
                    shape,
                    data: ints(d, i64::from_le_bytes),
                },
                Dtype::I32 => Tensor::I64 {
                    shape,
                    data: ints(d, |b| i32::from_le_bytes(b) as i64),
                },
                Dtype::U8 => Tensor::I64 {
                    shape,
                    data: d.iter().map(|&v| v as i64).collect(),
                },
                other => bail!("{name}: tensor {tensor} has unsupported dtype {other:?}"),
            };
            tensors.insert(tensor, t);
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(TensorFile { tensors, metadata })
    }

    /// Writes the file atomically (a temporary file beside it, then a rename). The bytes are a
    /// function of the contents alone: tensors and metadata keys in sorted order.
    pub fn write(&self, path: &Path) -> Result<()> {
        let bytes = self
            .encode()
            .with_context(|| format!("{} was not written", path.display()))?;
        write_atomic(path, &bytes)
    }

    /// The safetensors encoding: u64 header length, JSON header (space-padded to 8 bytes), data.
    /// Fails when an f16 tensor holds a value that f16 cannot represent (beyond ±65504).
    fn encode(&self) -> Result<Vec<u8>> {
        let mut header = serde_json::Map::new();
        let mut data: Vec<u8> = vec![];
        for (name, t) in &self.tensors {
            let start = data.len();
            let dtype = match t {
                Tensor::F32 { data: v, .. } => {
                    v.iter()
                        .for_each(|x| data.extend_from_slice(&x.to_le_bytes()));
                    "F32"
                }
                Tensor::F16 { data: v, .. } => {
                    if let Some(x) = v
                        .iter()
                        .find(|x| x.is_finite() && x.abs() > f16::MAX.to_f32())
                    {
                        bail!("tensor {name:?} holds {x}, beyond the f16 range (±65504); store it as f32");
                    }
                    v.iter()
                        .for_each(|x| data.extend_from_slice(&f16::from_f32(*x).to_le_bytes()));
                    "F16"
                }
                Tensor::I64 { data: v, .. } => {
                    v.iter()
                        .for_each(|x| data.extend_from_slice(&x.to_le_bytes()));
                    "I64"
                }
            };
            let entry = serde_json::json!({
                "dtype": dtype,
                "shape": t.shape(),
                "data_offsets": [start, data.len()],
            });
            header.insert(name.clone(), entry);
        }
        let mut text = String::from("{");
        if !self.metadata.is_empty() {
            let meta: BTreeMap<&String, &String> = self.metadata.iter().collect();
            text += &format!(
                "\"__metadata__\":{}",
                serde_json::to_string(&meta).expect("strings encode")
            );
        }
        for (name, entry) in &header {
            if text.len() > 1 {
                text.push(',');
            }
            text += &format!("{}:{}", serde_json::Value::String(name.clone()), entry);
        }
        text.push('}');
        while text.len() % 8 != 0 {
            text.push(' ');
        }
        let mut out = Vec::with_capacity(8 + text.len() + data.len());
        out.extend_from_slice(&(text.len() as u64).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
        out.extend_from_slice(&data);
        Ok(out)
    }

    fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| anyhow!("missing tensor {name:?}"))
    }

    /// A floating tensor with its shape.
    pub fn f32(&self, name: &str) -> Result<(&[usize], &[f32])> {
        match self.get(name)? {
            Tensor::F32 { shape, data } | Tensor::F16 { shape, data } => Ok((shape, data)),
            Tensor::I64 { .. } => {
                bail!("tensor {name:?} must be floating point, found an integer dtype")
            }
        }
    }

    /// An integer tensor with its shape.
    pub fn i64(&self, name: &str) -> Result<(&[usize], &[i64])> {
        match self.get(name)? {
            Tensor::I64 { shape, data } => Ok((shape, data)),
            _ => bail!("tensor {name:?} must have an integer dtype, found floating point"),
        }
    }
}

/// Prefix of the tensors a weights file may hold besides the state_dict and that loading
/// ignores: a training checkpoint's optimiser state (`optim.m.<name>`, `optim.v.<name>`).
pub const OPTIM_PREFIX: &str = "optim.";

/// Precision of the learnable tensors and running statistics in a saved weights file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightDtype {
    F32,
    F16,
}

/// The model's state_dict (learnable tensors, running_mean/var, num_batches_tracked) with the
/// model config in the metadata.
pub fn model_tensors(model: &Model, dtype: WeightDtype) -> TensorFile {
    let float = |shape: &[usize], data: &[f32]| match dtype {
        WeightDtype::F32 => Tensor::f32(shape, data.to_vec()),
        WeightDtype::F16 => Tensor::F16 {
            shape: shape.to_vec(),
            data: data.to_vec(),
        },
    };
    let mut file = TensorFile::default();
    for p in &model.table.params {
        file.tensors
            .insert(p.name.clone(), float(&p.shape, &model.params[p.range()]));
    }
    for (i, bn) in model.table.bns.iter().enumerate() {
        let c = [bn.channels];
        file.tensors.insert(
            format!("{}.running_mean", bn.module),
            float(&c, &model.buffers[bn.mean_range()]),
        );
        file.tensors.insert(
            format!("{}.running_var", bn.module),
            float(&c, &model.buffers[bn.var_range()]),
        );
        file.tensors.insert(
            format!("{}.num_batches_tracked", bn.module),
            Tensor::i64(&[], vec![model.batches_tracked[i]]),
        );
    }
    file.metadata = config_metadata(model.config());
    file
}

/// The config fields that tensor shapes cannot tell, as safetensors metadata.
pub fn config_metadata(cfg: &ModelConfig) -> HashMap<String, String> {
    HashMap::from([
        ("gcp".to_string(), cfg.gcp.to_string()),
        ("patch".to_string(), cfg.patch.to_string()),
        ("format".to_string(), "m2unet".to_string()),
    ])
}

/// Largest channel, concept or class count a weights file may declare (the paper's widest
/// layer has 512): keeps the parameter-count arithmetic of any accepted config far from overflow.
const MAX_WIDTH: usize = 1 << 16;

/// Largest patch side a weights file may declare (the paper's is 256); preprocessing
/// allocates patches of this side for every slice of a bag.
const MAX_PATCH: usize = 1024;

/// Infers the model config from tensor names and shapes (depth, widths, concepts, classes) and the metadata
/// (gcp mode, patch side; defaults max_minus_mean and 256).
pub fn infer_config(file: &TensorFile) -> Result<ModelConfig> {
    let dim = |name: &str, axis: usize| -> Result<usize> {
        let (shape, _) = file.f32(name)?;
        match shape.get(axis) {
            Some(&v) if v <= MAX_WIDTH => Ok(v),
            Some(v) => bail!("tensor {name:?} has shape {shape:?}: {v} is beyond the {MAX_WIDTH} channels a layer may have"),
            None => bail!("tensor {name:?} has shape {shape:?}"),
        }
    };
    let gcp = match file.metadata.get("gcp") {
        Some(s) => s.parse::<GcpMode>()?,
        None => GcpMode::MaxMinusMean,
    };
    let patch =
        match file.metadata.get("patch") {
            Some(s) => s.parse().ok().filter(|p| *p <= MAX_PATCH).ok_or_else(|| {
                anyhow!("metadata patch={s:?} is not an integer up to {MAX_PATCH}")
            })?,
            None => 256,
        };
    let depth = (1..)
        .take_while(|k| file.tensors.contains_key(&format!("enc{k}.conv1.weight")))
        .count();
    if depth < 2 {
        bail!("found {depth} encoder stage(s) (enc1.conv1.weight, enc2.conv1.weight, …); M²UNet has at least 2");
    }
    let cfg = ModelConfig {
        patch,
        depth,
        in_channels: dim("enc1.conv1.weight", 1)?,
        enc_width: dim("enc1.conv1.weight", 0)?,
        bottleneck_width: dim(&format!("enc{depth}.conv1.weight"), 0)?,
        emb_concepts: dim("mil_emb.concepts.weight", 0)?,
        img_concepts: dim("mil_img.concepts.weight", 0)?,
        seg_classes: dim("seg_head.weight", 0)?,
        cls_classes: dim("classifier.weight", 0)?,
        gcp,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// Builds a model from a state_dict: every tensor must be present with its exact shape, and
/// nothing else may be there except a training checkpoint's optimiser state (names starting
/// with `optim.`), which is ignored.
pub fn model_from_tensors(file: &TensorFile) -> Result<Model> {
    let cfg = infer_config(file)?;
    let table = ParamTable::new(cfg);
    // The shapes read so far may describe a model far larger than the file: refuse it before
    // allocating one.
    let held: usize = file
        .tensors
        .values()
        .map(|t| t.shape().iter().product::<usize>())
        .sum();
    if table.n_params + table.n_buffers > held {
        bail!(
            "the tensor shapes describe a model of {} values, but the file holds only {held}",
            table.n_params + table.n_buffers
        );
    }
    let mut model = Model::init(cfg, 0);
    let mut expected: Vec<String> = vec![];
    let mut take = |name: String, shape: &[usize], dst: &mut [f32]| -> Result<()> {
        let (s, data) = file.f32(&name)?;
        if s != shape {
            bail!("tensor {name:?} has shape {s:?}, expected {shape:?}");
        }
        dst.copy_from_slice(data);
        expected.push(name);
        Ok(())
    };
    for p in &table.params {
        take(p.name.clone(), &p.shape, &mut model.params[p.range()])?;
    }
    if let Some(p) = table
        .params
        .iter()
        .find(|p| model.params[p.range()].iter().any(|v| !v.is_finite()))
    {
        bail!("tensor {:?} holds NaN or infinite values", p.name);
    }
    for bn in &table.bns {
        let c = [bn.channels];
        take(
            format!("{}.running_mean", bn.module),
            &c,
            &mut model.buffers[bn.mean_range()],
        )?;
        take(
            format!("{}.running_var", bn.module),
            &c,
            &mut model.buffers[bn.var_range()],
        )?;
    }
    for bn in &table.bns {
        let (mean, var) = (
            &model.buffers[bn.mean_range()],
            &model.buffers[bn.var_range()],
        );
        if mean.iter().any(|v| !v.is_finite()) {
            bail!(
                "tensor \"{}.running_mean\" holds NaN or infinite values",
                bn.module
            );
        }
        if let Some(v) = var.iter().find(|v| !(v.is_finite() && **v > 0.0)) {
            bail!(
                "tensor \"{}.running_var\" holds {v}; a running variance must be positive and finite",
                bn.module
            );
        }
    }
    for (i, bn) in table.bns.iter().enumerate() {
        let name = format!("{}.num_batches_tracked", bn.module);
        let (s, data) = file.i64(&name)?;
        if !s.is_empty() && s != [1] {
            bail!("tensor {name:?} has shape {s:?}, expected a scalar");
        }
        model.batches_tracked[i] = data[0];
        expected.push(name);
    }
    if let Some(extra) = file
        .tensors
        .keys()
        .find(|k| !expected.contains(k) && !k.starts_with(OPTIM_PREFIX))
    {
        bail!("unexpected tensor {extra:?} (not a parameter or buffer of M²UNet)");
    }
    Ok(model)
}

/// Loads a weights file (f32, f16 or bf16 tensors, PyTorch names).
pub fn load_model(path: &Path) -> Result<Model> {
    let file = TensorFile::read(path)?;
    model_from_tensors(&file)
        .with_context(|| format!("{} is not a usable M²UNet weights file", path.display()))
}

/// [`load_model`] of a weights file's bytes; `name` says which weights in errors.
pub fn load_model_bytes(bytes: &[u8], name: &str) -> Result<Model> {
    let file = TensorFile::from_bytes(bytes, name)?;
    model_from_tensors(&file).with_context(|| format!("{name} is not a usable M²UNet weights file"))
}

/// Saves the model's state_dict atomically.
pub fn save_model(model: &Model, path: &Path, dtype: WeightDtype) -> Result<()> {
    model_tensors(model, dtype).write(path)
}
