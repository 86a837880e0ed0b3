//! The seam between the trainer and a network family.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use burn::tensor::Device;

use super::weights::param_infos;
use super::{Batch, LoraConfig, PadLayout, ParamInfo, Qwen25Vl, Result, Sequence, TokenScores};

/// How [`PolicyNetwork::score_sequences`] scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScoreOptions {
    /// Also return the predictive entropy.
    pub entropy: bool,
    /// Run a beginning that several sequences share once (the prompt of a GRPO group's samples;
    /// see [`crate::network::SharedPrefixes`]); the results are the same.
    pub share_prefixes: bool,
}

/// Where [`PolicyNetwork::adapt`] takes its adapters from.
#[derive(Debug, Clone, Copy)]
pub enum Adapters<'a> {
    /// Fresh adapters for the layers `config` targets, drawn from `seed`.
    Fresh {
        /// Which layers, rank, scale, start.
        config: &'a LoraConfig,
        /// The adapters' seed.
        seed: u64,
    },
    /// A PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`).
    Saved(&'a Path),
}

/// What the GRPO trainer needs of a trainable vision-language network, and all it uses.
///
/// [`Qwen25Vl`] implements it. A second family (Qwen3-VL, say) adds its own burn module beside
/// it in [`crate::network`] with its own host-side batching, and implements this trait; the
/// trainer (generic over it), the agent loop, the tools and the rewards stay as they are. The
/// rollout side needs only an exported bundle whose `weights.json` maps the graphs' initializers
/// to the names [`PolicyNetwork::hf_tensors`] gives (`docs/BUNDLE.md`).
pub trait PolicyNetwork: Module + Sized {
    /// Loads the family's Hugging Face checkpoint in `dir` (`config.json` and safetensors
    /// weights) onto `device`.
    fn from_pretrained(dir: &Path, device: &Device) -> Result<Self>;

    /// Writes `config.json` and `model.safetensors` into `dir`, as transformers saves them.
    fn save_pretrained(&self, dir: &Path) -> Result<()>;

    /// Every parameter with its Hugging Face name and shape, as host copies: what a rollout
    /// engine takes to run the current weights.
    fn hf_tensors(&self) -> BTreeMap<String, (Vec<usize>, Vec<f32>)>;

    /// [`PolicyNetwork::hf_tensors`] as a rollout engine takes them
    /// ([`deepeyes_core::WeightUpdate`]).
    fn host_weights(&self) -> deepeyes_core::Weights {
        self.hf_tensors()
            .into_iter()
            .map(|(name, (shape, data))| (name, deepeyes_core::HostTensor { shape, data }))
            .collect()
    }

    /// The weights a rollout engine takes ([`deepeyes_core::WeightUpdate`]): views of the
    /// network's own buffers where it can lend them, else host copies
    /// ([`PolicyNetwork::host_weights`]).
    fn weight_source(&self) -> Box<dyn deepeyes_core::WeightSource> {
        Box::new(self.host_weights())
    }

    /// Per-token log-probs of `sequences` (each image once, as one `<|image_pad|>` token) from
    /// each one's [`Sequence::score_from`] on, and the predictive entropy when asked:
    /// `[sequences, longest]` tensors aligned with the tokens, carrying the autodiff graph on an
    /// autodiff device.
    fn score_sequences(&self, sequences: &[Sequence], options: ScoreOptions)
    -> Result<TokenScores>;

    /// The same network with its vision encoder frozen (no gradients, no optimizer state).
    fn freeze_vision(self) -> Self;

    /// The same network attending `chunk` query rows at a time in longer sequences, so that
    /// the memory of attention grows linearly with the length (same results).
    fn with_attention_chunk(self, chunk: usize) -> Self;

    /// The network with LoRA adapters attached and every base parameter frozen, so that only
    /// the adapters train; the weights it hands out ([`PolicyNetwork::hf_tensors`]) are the
    /// merged ones.
    fn adapt(self, adapters: Adapters<'_>) -> Result<Self>;

    /// Writes the adapters as a PEFT adapter folder `dir`; `Ok(false)` when the network has
    /// none.
    fn save_adapter(&self, dir: &Path) -> Result<bool>;

    /// The base network (the adapters off, the weights shared), `None` without adapters: the
    /// KL reference of a LoRA run, which needs no second copy of the weights.
    fn without_adapters(&self) -> Option<Self>;

    /// The device the parameters live on.
    fn device(&self) -> Device;

    /// Every float parameter: name, id, shape and whether it trains.
    fn params(&self) -> Vec<ParamInfo> {
        param_infos(self)
    }
}

impl PolicyNetwork for Qwen25Vl {
    fn from_pretrained(dir: &Path, device: &Device) -> Result<Self> {
        Qwen25Vl::from_pretrained(dir, device)
    }

    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        Qwen25Vl::save_pretrained(self, dir)
    }

    fn hf_tensors(&self) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        Qwen25Vl::hf_tensors(self)
    }

    fn score_sequences(
        &self,
        sequences: &[Sequence],
        options: ScoreOptions,
    ) -> Result<TokenScores> {
        let mut batch = Batch::new(&self.config, sequences, PadLayout::OnePerImage)?;
        if options.share_prefixes {
            batch = batch.share_prefixes()?;
        }
        self.score_tokens(&batch, options.entropy)
    }

    fn weight_source(&self) -> Box<dyn deepeyes_core::WeightSource> {
        Box::new(self.weight_views())
    }

    fn freeze_vision(self) -> Self {
        Qwen25Vl::freeze_vision(self)
    }

    fn with_attention_chunk(self, chunk: usize) -> Self {
        Qwen25Vl::with_attention_chunk(self, chunk)
    }

    fn adapt(self, adapters: Adapters<'_>) -> Result<Self> {
        match adapters {
            Adapters::Fresh { config, seed } => self.with_lora(config, seed),
            Adapters::Saved(dir) => self.load_adapter(dir),
        }
    }

    fn save_adapter(&self, dir: &Path) -> Result<bool> {
        if self.lora.is_none() {
            return Ok(false);
        }
        Qwen25Vl::save_adapter(self, dir, None)?;
        Ok(true)
    }

    fn without_adapters(&self) -> Option<Self> {
        Qwen25Vl::without_adapters(self)
    }

    fn device(&self) -> Device {
        Qwen25Vl::device(self)
    }
}

/// Runs `job` once per item, side by side, and returns the results in item order: the first item
/// on this thread with `model`, every other one on its own thread with a fork of it (the same
/// weights as new leaves of their own autodiff graph, so the backward passes, which hold their
/// graph's lock throughout, run at once). Each job computes exactly what it computes alone.
pub(crate) fn on_forks<N, I, T>(model: &N, items: &[I], job: impl Fn(&N, &I) -> T + Sync) -> Vec<T>
where
    N: PolicyNetwork + Send,
    I: Sync,
    T: Send,
{
    let Some((first, rest)) = items.split_first() else {
        return Vec::new();
    };
    let device = model.device();
    let job = &job;
    std::thread::scope(|scope| {
        let others: Vec<_> = rest
            .iter()
            .map(|item| {
                let fork = model.clone().fork(&device);
                scope.spawn(move || job(&fork, item))
            })
            .collect();
        let mut out = vec![job(model, first)];
        out.extend(others.into_iter().map(|t| {
            t.join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }));
        out
    })
}
