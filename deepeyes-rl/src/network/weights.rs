//! Named access to the model's parameters (Hugging Face names), their gradients, and writing
//! them to safetensors.

use std::collections::BTreeMap;
use std::path::Path;

use burn::backend::Flex;
use burn::backend::flex::FlexTensor;
use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Gradients, Tensor};
use deepeyes_core::{TensorView, WeightSource};

use super::error::{ModelError, Result};

/// The Hugging Face name of the parameter at a module path of this crate's structs.
pub(crate) fn hf_name(path: &[String]) -> String {
    let joined = path.join(".");
    joined
        .replace("visual.merger.mlp0.", "visual.merger.mlp.0.")
        .replace("visual.merger.mlp2.", "visual.merger.mlp.2.")
        .replace(".lora.lora_a", ".lora_A.weight")
        .replace(".lora.lora_b", ".lora_B.weight")
}

/// A parameter's name, id, shape and whether it is trainable.
#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// Hugging Face name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// burn's parameter id (what optimizers key their state by).
    pub id: ParamId,
    /// Shape as held in memory (the patch embedding is `[hidden, patch_dim]`).
    pub shape: Vec<usize>,
    /// Whether it receives gradients.
    pub trainable: bool,
}

/// Host copy of a parameter value or gradient.
#[derive(Debug, Clone)]
pub struct HostParam {
    /// Hugging Face name.
    pub name: String,
    /// Shape as held in memory.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// A model's parameters by Hugging Face name as a rollout engine reads them, without a copy
/// where the engine lends its buffer: burn's CPU backend keeps a contiguous parameter as one
/// shared block, which these views hold on to (a later optimizer step writes new blocks, so the
/// views keep the version they were taken of). Anything else is copied.
#[derive(Debug, Default)]
pub struct ParamViews {
    tensors: BTreeMap<String, (Vec<usize>, ParamBuffer)>,
}

/// Where a viewed parameter's values are.
#[derive(Debug)]
enum ParamBuffer {
    /// burn's own buffer (contiguous `f32`, checked when taken).
    Lent(FlexTensor),
    /// A host copy.
    Copied(Vec<f32>),
}

impl ParamViews {
    /// Gives the parameter `name` the shape `shape` (same number of values), as a file stores it.
    pub(crate) fn reshape(&mut self, name: &str, shape: Vec<usize>) {
        if let Some((s, _)) = self.tensors.get_mut(name) {
            debug_assert_eq!(s.iter().product::<usize>(), shape.iter().product::<usize>());
            *s = shape;
        }
    }

    /// How many of the parameters are burn's own buffers (the rest are copies).
    pub fn lent(&self) -> usize {
        self.tensors
            .values()
            .filter(|(_, b)| matches!(b, ParamBuffer::Lent(_)))
            .count()
    }
}

impl WeightSource for ParamViews {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        let (shape, buffer) = self.tensors.get(name)?;
        let data = match buffer {
            ParamBuffer::Lent(t) => t.as_slice::<f32>().expect("checked when lent"),
            ParamBuffer::Copied(v) => v,
        };
        Some(TensorView { shape, data })
    }
}

/// The values of `t`: burn's buffer when it lends one, else a copy.
fn buffer<const D: usize>(t: Tensor<D>) -> ParamBuffer {
    let t = t.inner();
    match t.clone().try_into_primitive::<Flex>() {
        Ok(flex) if flex.as_slice::<f32>().is_some() => ParamBuffer::Lent(flex),
        _ => ParamBuffer::Copied(super::qwen::to_host(t)),
    }
}

enum Mode<'a> {
    Info,
    Values,
    Views,
    Grads(&'a Gradients),
}

struct Collector<'a> {
    path: Vec<String>,
    mode: Mode<'a>,
    infos: Vec<ParamInfo>,
    values: Vec<(String, Option<HostParam>)>,
    views: ParamViews,
}

fn host<const D: usize>(name: &str, t: Tensor<D>) -> HostParam {
    let shape = t.dims().to_vec();
    let values = super::qwen::to_host(t);
    HostParam {
        name: name.to_string(),
        shape,
        values,
    }
}

impl ModuleVisitor for Collector<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = hf_name(&self.path);
        match self.mode {
            Mode::Info => {
                let t = param.val();
                self.infos.push(ParamInfo {
                    name,
                    id: param.id,
                    shape: t.dims().to_vec(),
                    trainable: t.is_require_grad(),
                });
            }
            Mode::Values => {
                let v = host(&name, param.val());
                self.values.push((name, Some(v)));
            }
            Mode::Views => {
                let t = param.val();
                let shape = t.dims().to_vec();
                self.views.tensors.insert(name, (shape, buffer(t)));
            }
            Mode::Grads(grads) => {
                let g = param.val().grad(grads).map(|g| host(&name, g));
                self.values.push((name, g));
            }
        }
    }
}

fn collect<'a, M: Module>(module: &M, mode: Mode<'a>) -> Collector<'a> {
    let mut c = Collector {
        path: Vec::new(),
        mode,
        infos: Vec::new(),
        values: Vec::new(),
        views: ParamViews::default(),
    };
    module.visit(&mut c);
    c
}

/// Names, ids and shapes of every float parameter of `module`, in module order.
pub(crate) fn param_infos<M: Module>(module: &M) -> Vec<ParamInfo> {
    collect(module, Mode::Info).infos
}

/// Views of every parameter of `module`, burn's own buffers where it lends them.
pub(crate) fn param_views<M: Module>(module: &M) -> ParamViews {
    collect(module, Mode::Views).views
}

/// Host copies of every parameter of `module`.
pub(crate) fn param_values<M: Module>(module: &M) -> Vec<HostParam> {
    collect(module, Mode::Values)
        .values
        .into_iter()
        .filter_map(|(_, v)| v)
        .collect()
}

/// The gradient of every parameter of `module` in `grads` (`None` where it has none).
pub fn param_grads<M: Module>(module: &M, grads: &Gradients) -> Vec<(String, Option<HostParam>)> {
    collect(module, Mode::Grads(grads)).values
}

/// Writes `tensors` (name → shape, f32 values) to a safetensors file, atomically (temporary file
/// in the same directory, then rename).
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let mut bytes: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, (shape, values)) in tensors {
        let mut b = Vec::with_capacity(values.len() * 4);
        for v in values {
            b.extend_from_slice(&v.to_le_bytes());
        }
        bytes.push((name.clone(), shape.clone(), b));
    }
    let mut views = Vec::with_capacity(bytes.len());
    for (name, shape, b) in &bytes {
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
            .map_err(|e| ModelError::SafeTensors {
                path: path.to_path_buf(),
                message: format!("tensor `{name}`: {e}"),
            })?;
        views.push((name.clone(), view));
    }
    let data =
        safetensors::tensor::serialize(views, metadata).map_err(|e| ModelError::SafeTensors {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    write_atomic(path, &data)
}

/// Writes `data` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let file_name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "weights".into());
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(|source| ModelError::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(io)
}
