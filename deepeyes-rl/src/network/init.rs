//! Where parameter values come from when a model is built: a seeded random initialisation or a
//! Hugging Face safetensors checkpoint (single file or sharded with `model.safetensors.index.json`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::{Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};
use deepeyes_core::Rng;

use super::error::{ModelError, Result};

/// How a parameter is initialised when no checkpoint provides it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum InitKind {
    /// A matrix: normal with standard deviation `std`.
    Normal { std: f32 },
    /// Zeros (biases).
    Zeros,
    /// Ones (norm scales).
    Ones,
}

/// A supplier of named parameter values.
pub(crate) trait ParamSource {
    /// The device the parameters are created on.
    fn device(&self) -> &Device;

    /// The values of `name`, row-major with shape `shape`. `file_shape`, when given, is the shape
    /// the checkpoint stores (same element order, e.g. the 5-D Conv3d patch kernel).
    fn fetch(
        &mut self,
        name: &str,
        shape: &[usize],
        file_shape: Option<&[usize]>,
        kind: InitKind,
    ) -> Result<Vec<f32>>;

    /// A `[rows, cols]` matrix.
    fn weight(&mut self, name: &str, rows: usize, cols: usize) -> Result<Param<Tensor<2>>> {
        let std = 1.0 / (cols.max(1) as f32).sqrt();
        let v = self.fetch(name, &[rows, cols], None, InitKind::Normal { std })?;
        Ok(param2(name, v, [rows, cols], self.device()))
    }

    /// A bias vector.
    fn bias(&mut self, name: &str, n: usize) -> Result<Param<Tensor<1>>> {
        let v = self.fetch(name, &[n], None, InitKind::Zeros)?;
        Ok(param1(name, v, n, self.device()))
    }

    /// A norm scale.
    fn norm(&mut self, name: &str, n: usize) -> Result<Param<Tensor<1>>> {
        let v = self.fetch(name, &[n], None, InitKind::Ones)?;
        Ok(param1(name, v, n, self.device()))
    }
}

/// The id of parameter `name`: a stable hash (FNV-1a) of its Hugging Face name, so that every
/// load of a model gives each parameter the same id and an optimizer state saved in a checkpoint
/// (keyed by id) fits the model reloaded from that checkpoint.
pub(crate) fn param_id(name: &str) -> ParamId {
    ParamId::from(name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    }))
}

/// A trainable parameter named `name` holding `value`.
pub(crate) fn named_param<const D: usize>(name: &str, value: Tensor<D>) -> Param<Tensor<D>> {
    let mut param = Param::from_tensor(value);
    param.id = param_id(name);
    param
}

fn param2(name: &str, v: Vec<f32>, shape: [usize; 2], device: &Device) -> Param<Tensor<2>> {
    named_param(name, Tensor::from_data(TensorData::new(v, shape), device))
}

fn param1(name: &str, v: Vec<f32>, n: usize, device: &Device) -> Param<Tensor<1>> {
    named_param(name, Tensor::from_data(TensorData::new(v, [n]), device))
}

/// Seeded random values: normal matrices (std `1/sqrt(fan_in)` unless given), zero biases, unit
/// norms. Deterministic for a seed, independent of the device.
pub(crate) struct RandomSource {
    device: Device,
    seed: u64,
    counter: u64,
}

impl RandomSource {
    pub(crate) fn new(seed: u64, device: &Device) -> Self {
        Self {
            device: device.clone(),
            seed,
            counter: 0,
        }
    }
}

impl ParamSource for RandomSource {
    fn device(&self) -> &Device {
        &self.device
    }

    fn fetch(
        &mut self,
        _name: &str,
        shape: &[usize],
        _file_shape: Option<&[usize]>,
        kind: InitKind,
    ) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        self.counter += 1;
        Ok(match kind {
            InitKind::Zeros => vec![0.0; n],
            InitKind::Ones => vec![1.0; n],
            InitKind::Normal { std } => {
                let mut rng = Rng::new(Rng::derive_seed(self.seed, &[self.counter]));
                (0..n).map(|_| rng.normal() as f32 * std).collect()
            }
        })
    }
}

/// One tensor as read from a checkpoint: its shape and values converted to f32.
pub(crate) use deepeyes_core::HostTensor;

/// Reads every tensor of a safetensors file (F32, F16, BF16 and F64 are converted to f32).
pub(crate) fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    deepeyes_core::onnx::weights::parse_safetensors(&bytes).map_err(|message| {
        ModelError::SafeTensors {
            path: path.to_path_buf(),
            message,
        }
    })
}

/// The safetensors files of a checkpoint: a file, or a directory with `model.safetensors` or a
/// sharded `model.safetensors.index.json`.
pub(crate) fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let single = path.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = path.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
        path: index.clone(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: index.clone(),
        source,
    })?;
    let map = v
        .get("weight_map")
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| ModelError::SafeTensors {
            path: index.clone(),
            message: "no `weight_map` object".into(),
        })?;
    let files: BTreeSet<&str> = map.values().filter_map(serde_json::Value::as_str).collect();
    Ok(files.into_iter().map(|f| path.join(f)).collect())
}

/// Hugging Face names of older saves (`model.visual.*`, `model.language_model.*`) mapped to the
/// layout transformers writes today (`visual.*`, `model.*`).
pub(crate) fn canonical_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else {
        name.to_string()
    }
}

/// Values from a checkpoint; every requested name must be present with a matching shape.
pub(crate) struct CheckpointSource {
    device: Device,
    path: PathBuf,
    tensors: BTreeMap<String, HostTensor>,
}

impl CheckpointSource {
    pub(crate) fn open(path: &Path, device: &Device) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for file in checkpoint_files(path)? {
            for (name, t) in read_safetensors(&file)? {
                tensors.insert(canonical_name(&name), t);
            }
        }
        Ok(Self {
            device: device.clone(),
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// Drops a tensor the architecture may ignore (e.g. `lm_head.weight` of a tied model).
    pub(crate) fn discard(&mut self, name: &str) -> Option<HostTensor> {
        self.tensors.remove(name)
    }

    /// Fails when tensors remain that nothing consumed.
    pub(crate) fn finish(self) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        Err(ModelError::UnexpectedTensors {
            path: self.path,
            names: self.tensors.keys().take(8).cloned().collect(),
        })
    }
}

impl ParamSource for CheckpointSource {
    fn device(&self) -> &Device {
        &self.device
    }

    fn fetch(
        &mut self,
        name: &str,
        shape: &[usize],
        file_shape: Option<&[usize]>,
        _kind: InitKind,
    ) -> Result<Vec<f32>> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::MissingTensor {
                path: self.path.clone(),
                name: name.to_string(),
            })?;
        let expected = file_shape.unwrap_or(shape);
        if t.shape != expected && t.shape != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: expected.to_vec(),
                got: t.shape,
            });
        }
        Ok(t.data)
    }
}
