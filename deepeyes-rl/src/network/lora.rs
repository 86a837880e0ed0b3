//! LoRA adapters on the model's linear layers, in PEFT's format.
//!
//! An adapted layer computes `y = x Wᵀ + b + s · (x Aᵀ) Bᵀ` with `A: [rank, in]`,
//! `B: [out, rank]` and `s = alpha / rank` (`alpha / √rank` with rsLoRA). The base weights are
//! frozen; only `A` and `B` train. Layers are chosen as PEFT chooses them from
//! `target_modules`, by their module names in transformers'
//! `Qwen2_5_VLForConditionalGeneration` (`model.language_model.layers.0.self_attn.q_proj`,
//! `model.visual.blocks.0.attn.qkv`, `model.visual.merger.mlp.0`, `lm_head`), so a PEFT config
//! selects the same layers here and there, and the adapter files ([`ADAPTER_WEIGHTS`],
//! [`ADAPTER_CONFIG`]) are what PEFT, vLLM and SGLang load.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, Param};
use burn::tensor::{Device, Tensor};
use deepeyes_core::Rng;
use serde::{Deserialize, Serialize};

use super::Qwen25Vl;
use super::error::{ModelError, Result};
use super::init::{HostTensor, canonical_name, named_param, read_safetensors};
use super::layers::{Linear, tensor_from};
use super::weights::{write_atomic, write_safetensors};

/// The adapter's weights as PEFT saves them.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// The adapter's configuration as PEFT saves it.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// The prefix PEFT puts before a module name in [`ADAPTER_WEIGHTS`].
const PEFT_PREFIX: &str = "base_model.model.";

/// The patch embedding: a `Conv3d` in transformers (held here as a matrix), which PEFT would
/// adapt as a convolution; not supported.
const PATCH_EMBED: &str = "model.visual.patch_embed.proj";

/// Which linear layers get adapters, as PEFT's `target_modules` says it.
///
/// * a list of names: a layer is adapted when its module name equals one of them or ends with
///   `.` and one of them. A bare name selects every layer of that name, so `"down_proj"` (like
///   `"gate_proj"` and `"up_proj"`) adapts the vision tower's MLPs as well as the language
///   model's; restrict it with a pattern.
/// * one string: a regular expression the whole module name must match, e.g.
///   `".*language_model.*\.(q_proj|v_proj)"` for the language model's query and value
///   projections only; or `"all-linear"`: every linear layer except the output head `lm_head`
///   (and the patch embedding, a convolution).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A regular expression over the full module name, or `"all-linear"`.
    Pattern(String),
    /// Module names matched by suffix.
    Names(Vec<String>),
}

impl TargetModules {
    /// A matcher for module names; fails on an invalid regular expression or an empty list.
    fn matcher(&self) -> Result<Matcher> {
        Ok(match self {
            Self::Pattern(p) if p == "all-linear" => Matcher::AllLinear,
            Self::Pattern(p) => Matcher::Regex(
                regex::Regex::new(&format!("^(?:{p})$"))
                    .map_err(|e| lora_err(format!("target-modules {p:?}: {e}")))?,
            ),
            Self::Names(names) if names.is_empty() => {
                return Err(lora_err("target-modules is an empty list"));
            }
            Self::Names(names) => Matcher::Names(names.clone()),
        })
    }
}

enum Matcher {
    AllLinear,
    Regex(regex::Regex),
    Names(Vec<String>),
}

impl Matcher {
    fn matches(&self, module: &str) -> bool {
        match self {
            Self::AllLinear => module != "lm_head" && module != PATCH_EMBED,
            Self::Regex(re) => re.is_match(module),
            Self::Names(names) => names.iter().any(|n| {
                module == n
                    || module
                        .strip_suffix(n.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            }),
        }
    }
}

/// The `[lora]` table: which layers get adapters and how they are scaled and initialised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LoraConfig {
    /// The adapters' rank `r`.
    pub rank: usize,
    /// `lora_alpha`: the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Dropout on the adapter's input; only 0 is supported (see [`LoraConfig::validate`]).
    #[serde(default)]
    pub dropout: f64,
    /// The layers to adapt ([`TargetModules`]).
    pub target_modules: TargetModules,
    /// Scale by `alpha / √rank` instead (rsLoRA).
    #[serde(default)]
    pub use_rslora: bool,
    /// PEFT's default start: `A` uniform in `±1/√in`, `B` zero, so training starts from the base
    /// model exactly. `false` draws `B` the same way (PEFT's debugging start; the adapted model
    /// then differs from the base from the outset).
    #[serde(default = "default_true")]
    pub init_lora_weights: bool,
}

fn default_true() -> bool {
    true
}

impl LoraConfig {
    /// Adapters of rank `rank` on every linear layer (PEFT's `"all-linear"`), alpha `2 · rank`,
    /// no rsLoRA, `B` starting at zero: the demo's choice at rank 16.
    pub fn all_linear(rank: usize) -> Self {
        Self {
            rank,
            alpha: 2.0 * rank as f64,
            dropout: 0.0,
            target_modules: TargetModules::Pattern("all-linear".into()),
            use_rslora: false,
            init_lora_weights: true,
        }
    }

    /// The factor `s` of the update `s · B A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Whether adapters made under `other` have the same layers, shapes and scale (dropout and
    /// the start do not change a trained adapter).
    pub fn same_adapters(&self, other: &LoraConfig) -> bool {
        (self.rank, self.alpha, &self.target_modules, self.use_rslora)
            == (
                other.rank,
                other.alpha,
                &other.target_modules,
                other.use_rslora,
            )
    }

    /// The configuration of the PEFT adapter folder `dir` (its `adapter_config.json`).
    pub fn of_adapter(dir: &Path) -> Result<Self> {
        read_adapter_config(dir)
    }

    /// Checks the values. Dropout other than 0 is refused: GRPO compares the policy's log-probs
    /// with the rollout's and the old policy's, which a random mask on the adapter's input
    /// would make differ from step to step.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(lora_err("rank must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(lora_err(format!(
                "alpha must be positive, got {}",
                self.alpha
            )));
        }
        if self.dropout != 0.0 {
            return Err(lora_err(format!(
                "dropout {} is not supported (only 0): GRPO's importance ratios need the same \
                 network for the policy's and the rollout's log-probs",
                self.dropout
            )));
        }
        self.target_modules.matcher().map(|_| ())
    }
}

/// The adapter of one linear layer.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `A`, `[rank, in]` (PEFT's `lora_A.weight`).
    pub lora_a: Param<Tensor<2>>,
    /// `B`, `[out, rank]` (PEFT's `lora_B.weight`).
    pub lora_b: Param<Tensor<2>>,
    /// The factor `s`.
    pub scale: f64,
}

impl LoraAdapter {
    /// `s · (x Aᵀ) Bᵀ` for `x: [rows, in]`.
    pub(crate) fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        x.matmul(self.lora_a.val().transpose())
            .matmul(self.lora_b.val().transpose())
            .mul_scalar(self.scale)
    }

    /// `s · B A`, `[out, in]`: what merging adds to the base weight.
    pub(crate) fn delta_weight(&self) -> Tensor<2> {
        self.lora_b
            .val()
            .matmul(self.lora_a.val())
            .mul_scalar(self.scale)
    }
}

/// The parameter names of `module`'s adapter in this crate's (checkpoint-layout) naming.
fn param_names(module: &str) -> [String; 2] {
    let base = canonical_name(module);
    [
        format!("{base}.lora_A.weight"),
        format!("{base}.lora_B.weight"),
    ]
}

/// The keys PEFT writes for `module`'s adapter.
fn peft_keys(module: &str) -> [String; 2] {
    [
        format!("{PEFT_PREFIX}{module}.lora_A.weight"),
        format!("{PEFT_PREFIX}{module}.lora_B.weight"),
    ]
}

/// A new adapter for `module` (`[d_out, d_in]`), drawn from a stream of `seed` that depends on
/// the module's name only (adding a target does not change the others' start).
fn fresh_adapter(
    module: &str,
    d_in: usize,
    d_out: usize,
    config: &LoraConfig,
    seed: u64,
    device: &Device,
) -> LoraAdapter {
    let name_hash = module.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut rng = Rng::new(Rng::derive_seed(seed, &[name_hash]));
    // kaiming_uniform_(a = √5), PEFT's start for A: uniform in ±1/√fan_in.
    let mut uniform = |n: usize, fan_in: usize| -> Vec<f32> {
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        (0..n)
            .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    let r = config.rank;
    let a = uniform(r * d_in, d_in);
    let b = if config.init_lora_weights {
        vec![0.0; d_out * r]
    } else {
        uniform(d_out * r, r)
    };
    adapter(module, a, b, [r, d_in, d_out], config.scale(), device)
}

fn adapter(
    module: &str,
    a: Vec<f32>,
    b: Vec<f32>,
    [r, d_in, d_out]: [usize; 3],
    scale: f64,
    device: &Device,
) -> LoraAdapter {
    let [name_a, name_b] = param_names(module);
    LoraAdapter {
        lora_a: named_param(&name_a, tensor_from(a, [r, d_in], device)),
        lora_b: named_param(&name_b, tensor_from(b, [d_out, r], device)),
        scale,
    }
}

/// Where new adapters' values come from.
pub(crate) enum AdapterSource {
    /// A fresh start from `seed`.
    Fresh {
        /// The adapters' seed.
        seed: u64,
    },
    /// The tensors of a PEFT adapter file (keys as PEFT writes them), consumed as attached.
    File(BTreeMap<String, HostTensor>),
}

/// Attaches adapters to the layers of `linears` (module name, layer) that `config` targets.
/// Returns how many were attached; fails when none is, when the patch embedding is, or when an
/// adapter file lacks a targeted layer or holds one that is not targeted.
pub(crate) fn attach(
    linears: Vec<(String, &mut Linear)>,
    config: &LoraConfig,
    mut source: AdapterSource,
    device: &Device,
) -> Result<usize> {
    config.validate()?;
    let matcher = config.target_modules.matcher()?;
    let mut attached = 0;
    for (module, linear) in linears {
        if !matcher.matches(&module) {
            continue;
        }
        if module == PATCH_EMBED {
            return Err(lora_err(format!(
                "target-modules {:?} selects {PATCH_EMBED}, a Conv3d in transformers; adapters \
                 on it are not supported (narrow the pattern)",
                config.target_modules
            )));
        }
        let [d_out, d_in] = linear.weight.val().dims();
        linear.lora = Some(match &mut source {
            AdapterSource::Fresh { seed } => {
                fresh_adapter(&module, d_in, d_out, config, *seed, device)
            }
            AdapterSource::File(tensors) => {
                adapter_from_file(tensors, &module, [d_in, d_out], config, device)?
            }
        });
        attached += 1;
    }
    if attached == 0 {
        return Err(lora_err(format!(
            "target-modules {:?} selects no linear layer (module names look like \
             model.language_model.layers.0.self_attn.q_proj, model.visual.blocks.0.attn.qkv, \
             lm_head)",
            config.target_modules
        )));
    }
    if let AdapterSource::File(rest) = &source
        && !rest.is_empty()
    {
        return Err(lora_err(format!(
            "the adapter holds tensors its target_modules do not select: {}",
            rest.keys().take(4).cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(attached)
}

/// The adapter of `module` (`[d_out, d_in]`) taken out of an adapter file's `tensors`.
fn adapter_from_file(
    tensors: &mut BTreeMap<String, HostTensor>,
    module: &str,
    [d_in, d_out]: [usize; 2],
    config: &LoraConfig,
    device: &Device,
) -> Result<LoraAdapter> {
    let r = config.rank;
    let [key_a, key_b] = peft_keys(module);
    let mut take = |key: &str, shape: [usize; 2]| -> Result<Vec<f32>> {
        let t = tensors
            .remove(key)
            .ok_or_else(|| lora_err(format!("the adapter has no tensor {key}")))?;
        if t.shape != shape {
            return Err(ModelError::ShapeMismatch {
                name: key.to_string(),
                expected: shape.to_vec(),
                got: t.shape,
            });
        }
        Ok(t.data)
    };
    let a = take(&key_a, [r, d_in])?;
    let b = take(&key_b, [d_out, r])?;
    Ok(adapter(
        module,
        a,
        b,
        [r, d_in, d_out],
        config.scale(),
        device,
    ))
}

/// Every adapter of `linears` as PEFT names its tensors, `[shape, values]` on the host.
pub(crate) fn adapter_tensors(
    linears: Vec<(String, &mut Linear)>,
) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = BTreeMap::new();
    for (module, linear) in linears {
        let Some(l) = &linear.lora else { continue };
        let [key_a, key_b] = peft_keys(&module);
        for (key, p) in [(key_a, &l.lora_a), (key_b, &l.lora_b)] {
            let t = p.val();
            out.insert(key, (t.dims().to_vec(), super::qwen::to_host(t)));
        }
    }
    out
}

/// Folds each adapter of `linears` into its layer's weight (`W + s·B A`) and removes it.
pub(crate) fn merge(linears: Vec<(String, &mut Linear)>) {
    for (_, linear) in linears {
        let Some(l) = linear.lora.take() else {
            continue;
        };
        let merged = linear.weight.val().detach() + l.delta_weight().detach();
        let id = linear.weight.id;
        let trainable = linear.weight.val().is_require_grad();
        linear.weight = Param::initialized(id, merged.set_require_grad(trainable));
    }
}

/// `adapter_config.json` as PEFT writes and reads it (the fields deepeyes sets; PEFT fills in
/// the rest with its defaults when it loads).
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: f64,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: TargetModules,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default = "default_bias")]
    bias: String,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    lora_bias: bool,
    #[serde(default)]
    target_parameters: Option<serde_json::Value>,
    #[serde(default)]
    trainable_token_indices: Option<serde_json::Value>,
    #[serde(default)]
    layer_replication: Option<serde_json::Value>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    exclude_modules: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default = "default_init")]
    init_lora_weights: serde_json::Value,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
}

fn default_bias() -> String {
    "none".into()
}

fn default_init() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

impl PeftConfig {
    fn from_lora(config: &LoraConfig, base: Option<String>) -> Self {
        Self {
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: config.rank,
            lora_alpha: config.alpha,
            lora_dropout: config.dropout,
            target_modules: config.target_modules.clone(),
            use_rslora: config.use_rslora,
            bias: default_bias(),
            fan_in_fan_out: false,
            use_dora: false,
            modules_to_save: None,
            lora_bias: false,
            target_parameters: None,
            trainable_token_indices: None,
            layer_replication: None,
            layers_to_transform: None,
            exclude_modules: None,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            init_lora_weights: serde_json::Value::Bool(config.init_lora_weights),
            inference_mode: true,
            base_model_name_or_path: base,
        }
    }

    /// The [`LoraConfig`] this adapter was trained with; refuses PEFT options that change
    /// what the adapter computes and that deepeyes does not implement.
    fn to_lora(&self, path: &Path) -> Result<LoraConfig> {
        let refuse = |what: &str| {
            Err(lora_err(format!(
                "{}: {what} is not supported (plain LoRA adapters only)",
                path.display()
            )))
        };
        if self.peft_type != "LORA" {
            return refuse(&format!("peft_type {:?}", self.peft_type));
        }
        if self.bias != "none" {
            return refuse(&format!("bias {:?}", self.bias));
        }
        if self.fan_in_fan_out || self.use_dora || self.lora_bias {
            return refuse("fan_in_fan_out / use_dora / lora_bias");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("modules_to_save");
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return refuse("rank_pattern / alpha_pattern");
        }
        let set = |v: &Option<serde_json::Value>| v.as_ref().is_some_and(|v| !v.is_null());
        for (name, value) in [
            ("layers_to_transform", &self.layers_to_transform),
            ("exclude_modules", &self.exclude_modules),
            ("target_parameters", &self.target_parameters),
            ("trainable_token_indices", &self.trainable_token_indices),
            ("layer_replication", &self.layer_replication),
        ] {
            if set(value) {
                return refuse(name);
            }
        }
        Ok(LoraConfig {
            rank: self.r,
            alpha: self.lora_alpha,
            // Dropout does not change what a loaded adapter computes at inference.
            dropout: 0.0,
            target_modules: self.target_modules.clone(),
            use_rslora: self.use_rslora,
            init_lora_weights: self.init_lora_weights != serde_json::Value::Bool(false),
        })
    }
}

/// Writes `tensors` (PEFT keys) and `config` as a PEFT adapter folder `dir`.
pub(crate) fn save_adapter(
    dir: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    config: &LoraConfig,
    base: Option<String>,
) -> Result<()> {
    let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join(ADAPTER_WEIGHTS), tensors, Some(meta))?;
    let path = dir.join(ADAPTER_CONFIG);
    let text =
        serde_json::to_string_pretty(&PeftConfig::from_lora(config, base)).map_err(|source| {
            ModelError::Json {
                path: path.clone(),
                source,
            }
        })?;
    write_atomic(&path, text.as_bytes())
}

/// Reads a PEFT adapter folder: its [`LoraConfig`] and its tensors (PEFT keys).
pub(crate) fn read_adapter(dir: &Path) -> Result<(LoraConfig, BTreeMap<String, HostTensor>)> {
    let config = read_adapter_config(dir)?;
    let tensors = read_safetensors(&dir.join(ADAPTER_WEIGHTS))?;
    Ok((config, tensors))
}

fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })?;
    let peft: PeftConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.clone(),
        source,
    })?;
    peft.to_lora(&path)
}

pub(crate) fn lora_err(message: impl Into<String>) -> ModelError {
    ModelError::Lora {
        message: message.into(),
    }
}

impl super::layers::SwiGlu {
    fn linears_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        out.push((format!("{prefix}.gate_proj"), &mut self.gate_proj));
        out.push((format!("{prefix}.up_proj"), &mut self.up_proj));
        out.push((format!("{prefix}.down_proj"), &mut self.down_proj));
    }
}

impl Qwen25Vl {
    /// Every linear layer with its module name in transformers'
    /// `Qwen2_5_VLForConditionalGeneration` (the names PEFT matches and writes).
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        let visual = &mut self.visual;
        out.push((PATCH_EMBED.to_string(), &mut visual.patch_embed.proj));
        for (i, block) in visual.blocks.iter_mut().enumerate() {
            let p = format!("model.visual.blocks.{i}");
            out.push((format!("{p}.attn.qkv"), &mut block.attn.qkv));
            out.push((format!("{p}.attn.proj"), &mut block.attn.proj));
            block.mlp.linears_mut(&format!("{p}.mlp"), &mut out);
        }
        out.push(("model.visual.merger.mlp.0".into(), &mut visual.merger.mlp0));
        out.push(("model.visual.merger.mlp.2".into(), &mut visual.merger.mlp2));
        for (i, layer) in self.model.layers.iter_mut().enumerate() {
            let p = format!("model.language_model.layers.{i}");
            let attn = &mut layer.self_attn;
            out.push((format!("{p}.self_attn.q_proj"), &mut attn.q_proj));
            out.push((format!("{p}.self_attn.k_proj"), &mut attn.k_proj));
            out.push((format!("{p}.self_attn.v_proj"), &mut attn.v_proj));
            out.push((format!("{p}.self_attn.o_proj"), &mut attn.o_proj));
            layer.mlp.linears_mut(&format!("{p}.mlp"), &mut out);
        }
        if let Some(head) = &mut self.lm_head {
            out.push(("lm_head".into(), head));
        }
        out
    }

    /// The model with fresh LoRA adapters on the layers `config` targets (drawn from `seed`)
    /// and every base parameter frozen: only the adapters receive gradients and optimizer
    /// state. Fails when the model already has adapters or the targets select nothing.
    pub fn with_lora(self, config: &LoraConfig, seed: u64) -> Result<Self> {
        self.adapt(config.clone(), AdapterSource::Fresh { seed })
    }

    /// The model with the PEFT adapter in `dir` ([`ADAPTER_CONFIG`], [`ADAPTER_WEIGHTS`], as
    /// PEFT's `save_pretrained` writes them for `Qwen2_5_VLForConditionalGeneration`) attached
    /// and the base frozen. Every tensor of the file must belong to a targeted layer and every
    /// targeted layer must have its tensors.
    pub fn load_adapter(self, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let (config, tensors) = read_adapter(dir)?;
        self.adapt(config, AdapterSource::File(tensors))
            .map_err(|e| lora_err(format!("{}: {e}", dir.display())))
    }

    fn adapt(self, config: LoraConfig, source: AdapterSource) -> Result<Self> {
        if self.lora.is_some() {
            return Err(lora_err("the model already has adapters"));
        }
        let device = self.device();
        let mut model = self.no_grad();
        let n = attach(model.linears_mut(), &config, source, &device)?;
        tracing::debug!(layers = n, rank = config.rank, "attached LoRA adapters");
        model.lora = Some(config);
        Ok(model)
    }

    /// Writes the adapters as a PEFT adapter folder `dir`; `base` goes into the config's
    /// `base_model_name_or_path`. Fails when the model has none.
    pub fn save_adapter(&self, dir: impl AsRef<Path>, base: Option<String>) -> Result<()> {
        let config = self
            .lora
            .as_ref()
            .ok_or_else(|| lora_err("the model has no adapters to save"))?;
        let tensors = adapter_tensors(self.clone().linears_mut());
        save_adapter(dir.as_ref(), &tensors, config, base)
    }

    /// The base model: a copy (sharing the weights' storage) with the adapters taken off;
    /// `None` when the model has none. GRPO's KL reference of a LoRA run.
    pub fn without_adapters(&self) -> Option<Self> {
        self.lora.as_ref()?;
        let mut base = self.clone();
        for (_, linear) in base.linears_mut() {
            linear.lora = None;
        }
        base.lora = None;
        Some(base)
    }

    /// The model with every adapter folded into its layer's weight: the same function as a
    /// plain model (its base parameters stay frozen).
    pub fn merged(mut self) -> Self {
        merge(self.linears_mut());
        self.lora = None;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> TargetModules {
        TargetModules::Names(list.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn target_names_match_whole_name_parts_as_peft_does() {
        let m = names(&["q_proj", "mlp.0"]).matcher().unwrap();
        assert!(m.matches("model.language_model.layers.3.self_attn.q_proj"));
        assert!(m.matches("q_proj"));
        assert!(m.matches("model.visual.merger.mlp.0"));
        assert!(!m.matches("model.language_model.layers.3.self_attn.xq_proj"));
        assert!(!m.matches("model.visual.merger.mlp.2"));
        // A bare MLP name selects the vision tower's layers too.
        let m = names(&["down_proj"]).matcher().unwrap();
        assert!(m.matches("model.visual.blocks.0.mlp.down_proj"));
        assert!(m.matches("model.language_model.layers.0.mlp.down_proj"));
    }

    #[test]
    fn a_pattern_must_match_the_whole_name() {
        let m = TargetModules::Pattern(r".*language_model.*\.(q_proj|v_proj)".into())
            .matcher()
            .unwrap();
        assert!(m.matches("model.language_model.layers.0.self_attn.v_proj"));
        assert!(!m.matches("model.language_model.layers.0.self_attn.v_proj.x"));
        assert!(!m.matches("model.visual.blocks.0.attn.qkv"));
        let m = TargetModules::Pattern("q_proj".into()).matcher().unwrap();
        assert!(!m.matches("model.language_model.layers.0.self_attn.q_proj"));
        let all = TargetModules::Pattern("all-linear".into())
            .matcher()
            .unwrap();
        assert!(all.matches("model.visual.merger.mlp.2"));
        assert!(!all.matches("lm_head") && !all.matches(PATCH_EMBED));
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let good = LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: names(&["q_proj"]),
            use_rslora: false,
            init_lora_weights: true,
        };
        assert!(good.validate().is_ok());
        assert_eq!(good.scale(), 2.0);
        let rs = LoraConfig {
            use_rslora: true,
            ..good.clone()
        };
        assert!((rs.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
        for (bad, want) in [
            (
                LoraConfig {
                    rank: 0,
                    ..good.clone()
                },
                "rank",
            ),
            (
                LoraConfig {
                    alpha: -1.0,
                    ..good.clone()
                },
                "alpha",
            ),
            (
                LoraConfig {
                    dropout: 0.05,
                    ..good.clone()
                },
                "dropout",
            ),
            (
                LoraConfig {
                    target_modules: TargetModules::Pattern("(".into()),
                    ..good.clone()
                },
                "target-modules",
            ),
            (
                LoraConfig {
                    target_modules: names(&[]),
                    ..good.clone()
                },
                "empty",
            ),
        ] {
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn the_table_reads_lists_and_patterns() {
        let c: LoraConfig =
            toml::from_str("rank = 4\nalpha = 8\ntarget-modules = [\"q_proj\", \"v_proj\"]")
                .unwrap();
        assert_eq!(c.target_modules, names(&["q_proj", "v_proj"]));
        assert!(c.init_lora_weights);
        let c: LoraConfig =
            toml::from_str("rank = 4\nalpha = 8\ntarget-modules = \"all-linear\"").unwrap();
        assert_eq!(
            c.target_modules,
            TargetModules::Pattern("all-linear".into())
        );
        assert!(toml::from_str::<LoraConfig>("rank = 4\nalpha = 8\ntarget = \"x\"").is_err());
    }
}
