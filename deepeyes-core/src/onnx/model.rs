//! [`OnnxModel`]: a Qwen2.5-VL bundle loaded into ONNX Runtime sessions, with the lower-level
//! API (vision features, prefill, decode steps with logits) the generation loop is built on.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::session::{Session, SessionInputValue};
use ort::value::{DynTensor, DynValue, Tensor, TensorElementType, TensorRef};
use serde::{Deserialize, Serialize};

use crate::image::Image;
use crate::model::HfTokenizer;
use crate::preprocess::{PixelValues, Preprocessor};
use crate::protocol::IMAGE_PAD;
use crate::vision::{RopeIndex, VisionGeometry, rope_index, vision_inputs};

use super::batch::{self, Layout, Row};
use super::config::BundleConfig;
use super::error::{OnnxError, OnnxResult};
use super::runtime::{Runtime, RuntimeInfo, runtime};
use super::weights::{WeightMap, Weights, initializer_value, read_safetensors};

/// An execution provider deepeyes can register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// NVIDIA GPUs (needs the `cuda` feature and the onnxruntime-gpu library).
    Cuda,
    /// The CPU.
    Cpu,
}

/// How to run a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct OnnxOptions {
    /// Threads per graph (ONNX Runtime's intra-op threads); 0 lets ONNX Runtime choose.
    pub threads: usize,
    /// Fail instead of falling back to the CPU when no GPU provider can be registered.
    pub require_gpu: bool,
    /// Execution providers in order of preference.
    pub providers: Vec<Provider>,
    /// Most rows decoded together by `generate_batch`.
    pub max_batch: usize,
    /// Prompt tokens per decoder call during prefill (bounds the attention memory of long
    /// prompts).
    pub prefill_chunk: usize,
    /// Images whose vision features are kept for reuse (a multi-turn episode re-reads its
    /// images every turn); 0 disables the cache.
    pub image_cache: usize,
}

impl Default for OnnxOptions {
    fn default() -> Self {
        Self {
            threads: 0,
            require_gpu: false,
            providers: vec![Provider::Cuda, Provider::Cpu],
            max_batch: 16,
            prefill_chunk: 1024,
            image_cache: 64,
        }
    }
}

impl OnnxOptions {
    /// Checks the values make sense.
    pub fn validate(&self) -> OnnxResult<()> {
        let bad =
            |field: &str, why: &str| Err(crate::Error::config(format!("onnx.{field}"), why).into());
        if self.providers.is_empty() {
            return bad("providers", "must list at least one provider");
        }
        if self.max_batch == 0 {
            return bad("max-batch", "must be at least 1");
        }
        if self.prefill_chunk == 0 {
            return bad("prefill-chunk", "must be at least 1");
        }
        Ok(())
    }
}

/// Where the graphs run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceReport {
    /// The provider each session registered first (`CUDAExecutionProvider` or
    /// `CPUExecutionProvider`).
    pub provider: String,
    /// Whether the graphs run on a GPU.
    pub gpu: bool,
    /// Why a GPU provider that was asked for is not used, if so.
    pub fallback: Option<String>,
}

/// Which prefill positions get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsOf {
    /// Only each row's last token (what generation needs).
    Last,
    /// Every token of each row (for scoring and parity tests).
    All,
}

/// A prompt ready for the decoder: image pads expanded, positions computed, image features
/// encoded.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedPrompt {
    /// Token ids, each image's pad repeated to its visual token count.
    pub input_ids: Vec<u32>,
    /// Each image's patch grid `(t, h, w)`.
    pub grids: Vec<[u32; 3]>,
    /// The 3-D positions and the decode-time offset.
    pub rope: RopeIndex,
    /// Visual features `[image tokens, hidden]` (row-major), in pad order.
    pub features: Arc<Vec<f32>>,
}

/// The KV cache and padding layout of rows being decoded together.
#[derive(Debug)]
pub struct DecodeState {
    values: Vec<DynValue>,
    len: usize,
    offsets: Vec<usize>,
    deltas: Vec<i64>,
}

impl DecodeState {
    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.offsets.len()
    }

    /// Cached positions (padded prompt plus decoded steps).
    pub fn cache_len(&self) -> usize {
        self.len
    }
}

/// Vision features of one image, cached by content.
#[derive(Debug)]
struct Encoded {
    grid: [u32; 3],
    features: Vec<f32>,
}

#[derive(Debug, Default)]
struct FeatureCache {
    entries: VecDeque<(u64, (u32, u32), Arc<Encoded>)>,
}

fn image_key(image: &Image) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    image.width().hash(&mut h);
    image.height().hash(&mut h);
    image.as_raw().hash(&mut h);
    h.finish()
}

/// A Qwen2.5-VL bundle (`docs/BUNDLE.md`) loaded into ONNX Runtime.
///
/// ```no_run
/// use deepeyes_core::onnx::{OnnxModel, OnnxOptions};
/// use deepeyes_core::{GenerateRequest, SamplingParams, TokenCodec, VisionLanguageModel};
///
/// let model = OnnxModel::load("tests/data/tiny-qwen2_5_vl/bundle", &OnnxOptions::default())?;
/// let tokens = model.codec().encode("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")?;
/// let out = model.generate(&GenerateRequest {
///     tokens: &tokens,
///     images: &[],
///     sampling: SamplingParams::greedy(),
///     seed: 0,
///     max_new_tokens: 16,
///     stop_sequences: &[],
///     banned_tokens: &[],
/// })?;
/// println!("{}", model.codec().decode(&out.tokens)?);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct OnnxModel {
    dir: PathBuf,
    config: BundleConfig,
    options: OnnxOptions,
    tokenizer: HfTokenizer,
    runtime: Arc<Runtime>,
    device: DeviceReport,
    vision: Mutex<Session>,
    embed: Mutex<Session>,
    decoder: Mutex<Session>,
    kv_type: TensorElementType,
    past_names: Vec<String>,
    present_names: Vec<String>,
    cache: Mutex<FeatureCache>,
    /// The preprocessor and pixel buffer, reused image after image: a fresh multi-megabyte
    /// buffer per image costs a page fault per 4 KiB, as much as the rest of preprocessing.
    pixels: Mutex<(Preprocessor, Vec<f32>)>,
}

impl std::fmt::Debug for OnnxModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnnxModel")
            .field("dir", &self.dir)
            .field("device", &self.device)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

fn run_err(graph: &'static str) -> impl Fn(ort::Error) -> OnnxError {
    move |e| OnnxError::Run {
        graph,
        message: e.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether the CUDA provider could be registered on a builder; gives the builder back either way.
#[cfg(feature = "cuda")]
// The error hands the builder back so the session can still be built on CPU; it is moved once
// per session, so its size does not matter.
#[allow(clippy::result_large_err)]
fn register_cuda(builder: SessionBuilder) -> Result<SessionBuilder, (SessionBuilder, String)> {
    use ort::ep::ExecutionProvider;
    match ort::ep::CUDA::is_available() {
        Ok(true) => {}
        Ok(false) => {
            return Err((
                builder,
                "the loaded ONNX Runtime library has no CUDA provider (install the GPU build: \
                 ORT_PACKAGE=onnxruntime-gpu ORT_VERSION=1.31.1 scripts/setup_ort.sh)"
                    .into(),
            ));
        }
        Err(e) => return Err((builder, format!("cannot query the CUDA provider: {e}"))),
    }
    builder
        .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
        .map_err(|e| {
            let message = format!("the CUDA provider failed to register: {}", e.message());
            (e.recover(), message)
        })
}

#[cfg(not(feature = "cuda"))]
// The error hands the builder back so the session can still be built on CPU; it is moved once
// per session, so its size does not matter.
#[allow(clippy::result_large_err)]
fn register_cuda(builder: SessionBuilder) -> Result<SessionBuilder, (SessionBuilder, String)> {
    Err((
        builder,
        "deepeyes was built without the `cuda` feature".into(),
    ))
}

/// Checks whether the CUDA execution provider can be registered with the loaded ONNX Runtime:
/// `Ok(None)` when it can, `Ok(Some(reason))` when not.
pub fn probe_gpu() -> OnnxResult<Option<String>> {
    let rt = runtime()?;
    let builder = Session::builder(rt.env()).map_err(|e| OnnxError::Runtime {
        library: rt.info().library.clone(),
        message: e.to_string(),
    })?;
    Ok(register_cuda(builder).err().map(|(_, why)| why))
}

impl OnnxModel {
    /// Loads the bundle in `dir` (see `docs/BUNDLE.md`). Finds and loads ONNX Runtime on first
    /// use; fails with a message naming the fix when it cannot be found.
    ///
    /// When the bundle has a weight map (`weights.json`), the graphs run the weights of the
    /// safetensors file beside them (see [`super::weights`]), unless the map says the graphs
    /// already hold them ([`WeightMap::graphs_current`]).
    pub fn load(dir: impl AsRef<Path>, options: &OnnxOptions) -> OnnxResult<Self> {
        let dir = dir.as_ref();
        let weights = match WeightMap::load(dir)? {
            Some(map) if !map.graphs_current => {
                Some((read_safetensors(&map.params_path(dir))?, map))
            }
            _ => None,
        };
        Self::load_inner(dir, options, weights.as_ref().map(|(w, m)| (w, m)))
    }

    /// Loads the bundle in `dir` with `weights` (Hugging Face names) in place of its own, e.g. a
    /// policy just updated by a trainer. The bundle must have a weight map; every parameter it
    /// names must be in `weights`, with the right shape.
    pub fn load_with_weights(
        dir: impl AsRef<Path>,
        options: &OnnxOptions,
        weights: &Weights,
    ) -> OnnxResult<Self> {
        let dir = dir.as_ref();
        let map = WeightMap::load(dir)?.ok_or_else(|| OnnxError::Bundle {
            path: dir.join(super::weights::WEIGHT_MAP_FILE),
            reason: "not found: re-export the bundle (scripts/export_qwen2_5_vl.py) or add one with scripts/map_bundle_weights.py".into(),
        })?;
        Self::load_inner(dir, options, Some((weights, &map)))
    }

    fn load_inner(
        dir: &Path,
        options: &OnnxOptions,
        weights: Option<(&Weights, &WeightMap)>,
    ) -> OnnxResult<Self> {
        let dir = dir.to_path_buf();
        options.validate()?;
        let config = BundleConfig::load(&dir)?;
        if weights.is_some() && config.dtype != "float32" {
            return Err(OnnxError::Bundle {
                path: dir.join(super::config::BUNDLE_FILE),
                reason: format!(
                    "replacing weights needs a float32 bundle, this one is {}",
                    config.dtype
                ),
            });
        }
        let tok_path = dir.join(&config.tokenizer);
        let tokenizer = HfTokenizer::from_file(&tok_path)?;
        match tokenizer.token_id(IMAGE_PAD) {
            Some(id) if id == config.tokens.image_pad => {}
            other => {
                return Err(OnnxError::Bundle {
                    path: tok_path,
                    reason: format!(
                        "{IMAGE_PAD} is {other:?} in the tokenizer but {} in bundle.json",
                        config.tokens.image_pad
                    ),
                });
            }
        }
        let runtime = runtime()?;
        let started = Instant::now();

        let mut fallback = None;
        // The first provider listed decides whether CUDA is tried at all.
        let mut use_cuda = options.providers.first() == Some(&Provider::Cuda);
        let cpu_allowed = options.providers.contains(&Provider::Cpu) && !options.require_gpu;
        let mut sessions = Vec::with_capacity(3);
        for (graph, name) in [
            ("vision", &config.graphs.vision),
            ("embed", &config.graphs.embed),
            ("decoder", &config.graphs.decoder),
        ] {
            let path = dir.join(name);
            if !path.is_file() {
                return Err(OnnxError::Bundle {
                    path,
                    reason: "graph file not found".into(),
                });
            }
            let session_err = |e: ort::Error| OnnxError::Session {
                path: path.clone(),
                message: e.to_string(),
            };
            let mut builder = Session::builder(runtime.env())
                .map_err(session_err)?
                .with_optimization_level(GraphOptimizationLevel::Level3)
                .map_err(|e| session_err(e.into()))?;
            if options.threads > 0 {
                builder = builder
                    .with_intra_threads(options.threads)
                    .map_err(|e| session_err(e.into()))?;
            }
            if use_cuda {
                builder = match register_cuda(builder) {
                    Ok(b) => b,
                    Err((b, why)) => {
                        if !cpu_allowed {
                            return Err(OnnxError::GpuUnavailable(why));
                        }
                        // Reported once: later sessions go straight to the CPU. A build
                        // without GPU support falling back is expected, not a warning.
                        if cfg!(feature = "cuda") {
                            tracing::warn!("{why}; running on the CPU");
                        } else {
                            tracing::info!("{why}; running on the CPU");
                        }
                        fallback = Some(why);
                        use_cuda = false;
                        b
                    }
                };
            } else if !cpu_allowed {
                return Err(OnnxError::GpuUnavailable(
                    "no GPU provider is in the provider list".into(),
                ));
            }
            if let Some((weights, map)) = weights {
                let map_path = dir.join(super::weights::WEIGHT_MAP_FILE);
                for entry in map.entries(graph) {
                    let value = initializer_value(entry, weights, &map_path)?;
                    let tensor =
                        Tensor::from_array((value.shape, value.data)).map_err(session_err)?;
                    builder = builder
                        .with_initializer(&entry.initializer, tensor.into_dyn())
                        .map_err(|e| session_err(e.into()))?;
                }
            }
            let session = builder.commit_from_file(&path).map_err(session_err)?;
            sessions.push(session);
        }
        let mut sessions = sessions.into_iter();
        let (vision, embed, decoder) = match (sessions.next(), sessions.next(), sessions.next()) {
            (Some(v), Some(e), Some(d)) => (v, e, d),
            _ => unreachable!("three graphs were loaded"),
        };
        let layers = config.text.num_layers;
        let mut past_names = Vec::with_capacity(2 * layers);
        let mut present_names = Vec::with_capacity(2 * layers);
        for i in 0..layers {
            for kind in ["key", "value"] {
                past_names.push(format!("past_{kind}_{i}"));
                present_names.push(format!("present_{kind}_{i}"));
            }
        }
        check_io(
            &vision,
            &dir.join(&config.graphs.vision),
            &[
                "pixel_values",
                "pos_ids",
                "window_index",
                "reverse_index",
                "window_mask",
                "full_mask",
            ],
            &["image_embeds"],
        )?;
        check_io(
            &embed,
            &dir.join(&config.graphs.embed),
            &["input_ids"],
            &["inputs_embeds"],
        )?;
        let mut dec_in = vec![
            "inputs_embeds",
            "position_ids",
            "attn_bias",
            "logits_positions",
        ];
        dec_in.extend(past_names.iter().map(String::as_str));
        let mut dec_out = vec!["logits"];
        dec_out.extend(present_names.iter().map(String::as_str));
        check_io(
            &decoder,
            &dir.join(&config.graphs.decoder),
            &dec_in,
            &dec_out,
        )?;
        let kv_type = decoder
            .inputs()
            .iter()
            .find(|i| i.name() == "past_key_0")
            .and_then(|i| i.dtype().tensor_type())
            .unwrap_or(TensorElementType::Float32);

        let device = DeviceReport {
            provider: if use_cuda {
                "CUDAExecutionProvider".into()
            } else {
                "CPUExecutionProvider".into()
            },
            gpu: use_cuda,
            fallback,
        };
        tracing::info!(
            bundle = %dir.display(),
            provider = %device.provider,
            seconds = started.elapsed().as_secs_f64(),
            "loaded model bundle"
        );
        let preprocessor = Preprocessor::new(config.preprocess)?;
        Ok(Self {
            dir,
            config,
            options: options.clone(),
            tokenizer,
            runtime,
            device,
            vision: Mutex::new(vision),
            embed: Mutex::new(embed),
            decoder: Mutex::new(decoder),
            kv_type,
            past_names,
            present_names,
            cache: Mutex::new(FeatureCache::default()),
            pixels: Mutex::new((preprocessor, Vec::new())),
        })
    }

    /// The bundle directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The bundle's configuration.
    pub fn config(&self) -> &BundleConfig {
        &self.config
    }

    /// The options it was loaded with.
    pub fn options(&self) -> &OnnxOptions {
        &self.options
    }

    /// The ONNX Runtime library in use.
    pub fn runtime_info(&self) -> &RuntimeInfo {
        self.runtime.info()
    }

    /// Where the graphs run.
    pub fn device(&self) -> &DeviceReport {
        &self.device
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &HfTokenizer {
        &self.tokenizer
    }

    fn geometry(&self) -> VisionGeometry {
        self.config.vision.geometry()
    }

    /// Runs the vision encoder on one preprocessed image: `[tokens, hidden]` features, row-major.
    pub fn encode_image(&self, pixels: &PixelValues) -> OnnxResult<Vec<f32>> {
        self.encode_pixels(pixels.grid_thw, &pixels.data)
    }

    /// [`encode_image`](Self::encode_image) on pixel values held elsewhere (a reused buffer).
    fn encode_pixels(&self, grid_thw: [u32; 3], data: &[f32]) -> OnnxResult<Vec<f32>> {
        let geo = self.geometry();
        let inputs = vision_inputs(&[grid_thw], &geo)?;
        let n = inputs.patches;
        let d = self.config.vision.patch_dim();
        if data.len() != n * d {
            return Err(crate::Error::Model(format!(
                "pixel values hold {} numbers; grid {:?} needs {n} patches of {d}",
                data.len(),
                grid_thw
            ))
            .into());
        }
        let m = inputs.window_index.len();
        let pos: Vec<i64> = inputs.pos_ids.iter().flat_map(|p| *p).collect();
        let err = run_err("vision");
        let started = Instant::now();
        let mut session = lock(&self.vision);
        let outputs = session
            .run(vec![
                (
                    Cow::from("pixel_values"),
                    SessionInputValue::from(
                        TensorRef::from_array_view(([n, d], data)).map_err(&err)?,
                    ),
                ),
                (
                    "pos_ids".into(),
                    TensorRef::from_array_view(([n, 2], &pos[..]))
                        .map_err(&err)?
                        .into(),
                ),
                (
                    "window_index".into(),
                    TensorRef::from_array_view(([m], &inputs.window_index[..]))
                        .map_err(&err)?
                        .into(),
                ),
                (
                    "reverse_index".into(),
                    TensorRef::from_array_view(([m], &inputs.reverse_index[..]))
                        .map_err(&err)?
                        .into(),
                ),
                (
                    "window_mask".into(),
                    TensorRef::from_array_view(([n, n], &inputs.window_mask[..]))
                        .map_err(&err)?
                        .into(),
                ),
                (
                    "full_mask".into(),
                    TensorRef::from_array_view(([n, n], &inputs.full_mask[..]))
                        .map_err(&err)?
                        .into(),
                ),
            ])
            .map_err(&err)?;
        let (shape, data) = outputs["image_embeds"]
            .try_extract_tensor::<f32>()
            .map_err(&err)?;
        let hidden = self.config.text.hidden_size;
        if shape.len() != 2 || shape[0] as usize != m || shape[1] as usize != hidden {
            return Err(OnnxError::Run {
                graph: "vision",
                message: format!("image_embeds has shape {shape:?}, expected [{m}, {hidden}]"),
            });
        }
        tracing::debug!(grid = ?grid_thw, ms = started.elapsed().as_secs_f64() * 1e3, "vision encoder");
        Ok(data.to_vec())
    }

    /// Preprocesses and encodes one image, reusing cached features of an identical image.
    fn encode_cached(&self, image: &Image) -> OnnxResult<Arc<Encoded>> {
        let cap = self.options.image_cache;
        let key = image_key(image);
        let dims = (image.width(), image.height());
        if cap > 0 {
            let mut cache = lock(&self.cache);
            if let Some(pos) = cache
                .entries
                .iter()
                .position(|(k, d, _)| *k == key && *d == dims)
            {
                let entry = cache.entries.remove(pos).expect("index from position");
                let enc = Arc::clone(&entry.2);
                cache.entries.push_front(entry);
                return Ok(enc);
            }
        }
        let enc = {
            let mut guard = lock(&self.pixels);
            let (preprocessor, buffer) = &mut *guard;
            let grid = preprocessor.preprocess_into(std::slice::from_ref(image), buffer)?[0];
            Arc::new(Encoded {
                grid,
                features: self.encode_pixels(grid, buffer)?,
            })
        };
        if cap > 0 {
            let mut cache = lock(&self.cache);
            cache.entries.push_front((key, dims, Arc::clone(&enc)));
            cache.entries.truncate(cap);
        }
        Ok(enc)
    }

    /// Checks `tokens` (one image pad per image) against the vocabulary and the image count.
    fn check_tokens(&self, tokens: &[u32], images: usize) -> OnnxResult<()> {
        let vocab = self.config.text.vocab_size;
        if let Some((i, t)) = tokens
            .iter()
            .enumerate()
            .find(|&(_, &t)| t as usize >= vocab)
        {
            return Err(crate::Error::Model(format!(
                "token {t} at index {i} is outside the vocabulary of {vocab}"
            ))
            .into());
        }
        let pad = self.config.tokens.image_pad;
        let pads = tokens.iter().filter(|&&t| t == pad).count();
        if pads != images {
            return Err(crate::Error::Model(format!(
                "the context holds {pads} {IMAGE_PAD} tokens for {images} images (each image needs exactly one)"
            ))
            .into());
        }
        Ok(())
    }

    fn assemble(
        &self,
        tokens: &[u32],
        grids: Vec<[u32; 3]>,
        features: Vec<f32>,
    ) -> OnnxResult<PreparedPrompt> {
        let geo = self.geometry();
        let pad = self.config.tokens.image_pad;
        let mut input_ids =
            Vec::with_capacity(tokens.len() + features.len() / self.config.text.hidden_size);
        let mut next = 0usize;
        for &t in tokens {
            if t == pad {
                let count = geo.merged_tokens(grids[next]);
                input_ids.extend(std::iter::repeat_n(pad, count));
                next += 1;
            } else {
                input_ids.push(t);
            }
        }
        let rope = rope_index(&input_ids, pad, &grids, &geo)?;
        let max = self.config.text.max_positions;
        if input_ids.len() >= max {
            return Err(crate::Error::Model(format!(
                "the context is {} tokens long with images expanded; the model takes at most {max}",
                input_ids.len()
            ))
            .into());
        }
        Ok(PreparedPrompt {
            input_ids,
            grids,
            rope,
            features: Arc::new(features),
        })
    }

    /// Prepares a context whose images are already preprocessed (one pad per image in
    /// `tokens`): runs the vision encoder and expands the pads.
    pub fn prepare(&self, tokens: &[u32], images: &[PixelValues]) -> OnnxResult<PreparedPrompt> {
        self.check_tokens(tokens, images.len())?;
        let mut features = Vec::new();
        let mut grids = Vec::with_capacity(images.len());
        for im in images {
            features.extend(self.encode_image(im)?);
            grids.push(im.grid_thw);
        }
        self.assemble(tokens, grids, features)
    }

    /// Prepares a context with raw images: preprocesses them (through the feature cache), runs
    /// the vision encoder and expands the pads.
    pub fn prepare_images(&self, tokens: &[u32], images: &[Image]) -> OnnxResult<PreparedPrompt> {
        self.check_tokens(tokens, images.len())?;
        let mut features = Vec::new();
        let mut grids = Vec::with_capacity(images.len());
        for im in images {
            let enc = self.encode_cached(im)?;
            features.extend_from_slice(&enc.features);
            grids.push(enc.grid);
        }
        self.assemble(tokens, grids, features)
    }

    fn empty_cache(&self, batch: usize) -> OnnxResult<Vec<DynValue>> {
        let t = &self.config.text;
        let session = lock(&self.decoder);
        let shape = [batch as i64, t.num_kv_heads as i64, 0, t.head_dim as i64];
        (0..2 * t.num_layers)
            .map(|_| {
                DynTensor::new(session.allocator(), self.kv_type, shape)
                    .map(DynValue::from)
                    .map_err(run_err("decoder"))
            })
            .collect()
    }

    fn embed(&self, ids: &[i64], batch: usize, seq: usize) -> OnnxResult<Vec<f32>> {
        let err = run_err("embed");
        let mut session = lock(&self.embed);
        let outputs = session
            .run(vec![(
                Cow::from("input_ids"),
                SessionInputValue::from(
                    TensorRef::from_array_view(([batch, seq], ids)).map_err(&err)?,
                ),
            )])
            .map_err(&err)?;
        let (_, data) = outputs["inputs_embeds"]
            .try_extract_tensor::<f32>()
            .map_err(&err)?;
        let hidden = self.config.text.hidden_size;
        if data.len() != batch * seq * hidden {
            return Err(OnnxError::Run {
                graph: "embed",
                message: format!(
                    "inputs_embeds holds {} numbers, expected {batch}×{seq}×{hidden}",
                    data.len()
                ),
            });
        }
        Ok(data.to_vec())
    }

    /// One decoder call: `seq` new positions per row after the cached ones. Returns the logits
    /// `[batch, keep, vocab]` and replaces the cache with the presents.
    fn decode(
        &self,
        state: &mut DecodeState,
        embeds: Vec<f32>,
        positions: Vec<i64>,
        bias: Vec<f32>,
        keep: Vec<i64>,
        seq: usize,
    ) -> OnnxResult<Vec<f32>> {
        let b = state.batch();
        let hidden = self.config.text.hidden_size;
        let total = state.len + seq;
        let k = keep.len() / b;
        let err = run_err("decoder");
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> =
            Vec::with_capacity(4 + state.values.len());
        inputs.push((
            "inputs_embeds".into(),
            Tensor::from_array(([b, seq, hidden], embeds))
                .map_err(&err)?
                .into(),
        ));
        inputs.push((
            "position_ids".into(),
            Tensor::from_array(([3, b, seq], positions))
                .map_err(&err)?
                .into(),
        ));
        inputs.push((
            "attn_bias".into(),
            Tensor::from_array(([b, 1, seq, total], bias))
                .map_err(&err)?
                .into(),
        ));
        inputs.push((
            "logits_positions".into(),
            Tensor::from_array(([b, k], keep)).map_err(&err)?.into(),
        ));
        for (name, value) in self.past_names.iter().zip(&state.values) {
            inputs.push((name.as_str().into(), value.into()));
        }
        let mut session = lock(&self.decoder);
        let mut outputs = session.run(inputs).map_err(&err)?;
        let logits = {
            let (shape, data) = outputs["logits"]
                .try_extract_tensor::<f32>()
                .map_err(&err)?;
            let vocab = self.config.text.vocab_size;
            if shape.len() != 3
                || shape[0] as usize != b
                || shape[1] as usize != k
                || shape[2] as usize != vocab
            {
                return Err(OnnxError::Run {
                    graph: "decoder",
                    message: format!("logits have shape {shape:?}, expected [{b}, {k}, {vocab}]"),
                });
            }
            data.to_vec()
        };
        let mut presents = Vec::with_capacity(self.present_names.len());
        for name in &self.present_names {
            presents.push(
                outputs
                    .remove(name.as_str())
                    .ok_or_else(|| OnnxError::Run {
                        graph: "decoder",
                        message: format!("no output named {name}"),
                    })?,
            );
        }
        drop(outputs);
        drop(session);
        state.values = presents;
        state.len = total;
        Ok(logits)
    }

    /// Runs the prompts through the decoder together (left-padded, in chunks of
    /// `prefill-chunk` positions). Returns each row's logits (`[vocab]` for
    /// [`LogitsOf::Last`], `[len, vocab]` row-major for [`LogitsOf::All`]) and the state to
    /// decode from.
    pub fn prefill(
        &self,
        prompts: &[&PreparedPrompt],
        which: LogitsOf,
    ) -> OnnxResult<(Vec<Vec<f32>>, DecodeState)> {
        if prompts.is_empty() {
            return Err(crate::Error::Model("prefill of an empty batch".into()).into());
        }
        if prompts.iter().any(|p| p.input_ids.is_empty()) {
            return Err(crate::Error::Model("cannot prefill an empty context".into()).into());
        }
        let started = Instant::now();
        let rows: Vec<Row<'_>> = prompts
            .iter()
            .map(|p| Row {
                ids: &p.input_ids,
                rope: &p.rope,
            })
            .collect();
        let layout = Layout::of(&rows);
        let b = rows.len();
        let hidden = self.config.text.hidden_size;
        let vocab = self.config.text.vocab_size;
        let pad = self.config.tokens.image_pad;
        let mut state = DecodeState {
            values: self.empty_cache(b)?,
            len: 0,
            offsets: layout.offsets.clone(),
            deltas: prompts.iter().map(|p| p.rope.delta).collect(),
        };
        // Where each row's image features go: the k-th image pad takes feature row k.
        let pad_positions: Vec<Vec<usize>> = prompts
            .iter()
            .map(|p| {
                p.input_ids
                    .iter()
                    .enumerate()
                    .filter(|&(_, &t)| t == pad)
                    .map(|(i, _)| i)
                    .collect()
            })
            .collect();
        for (p, positions) in prompts.iter().zip(&pad_positions) {
            if positions.len() * hidden != p.features.len() {
                return Err(crate::Error::Model(format!(
                    "{} image pads but {} feature rows",
                    positions.len(),
                    p.features.len() / hidden
                ))
                .into());
            }
        }
        let mut all: Vec<Vec<f32>> = vec![Vec::new(); b];
        let mut last = Vec::new();
        let chunk = self.options.prefill_chunk;
        let mut start = 0;
        while start < layout.len {
            let end = (start + chunk).min(layout.len);
            let seq = end - start;
            let ids = batch::chunk_ids(&rows, &layout, start, end, self.config.tokens.pad);
            let mut embeds = self.embed(&ids, b, seq)?;
            for r in 0..b {
                let off = layout.offsets[r];
                for (k, &pos) in pad_positions[r].iter().enumerate() {
                    let i = pos + off;
                    if i >= start && i < end {
                        let dst = (r * seq + (i - start)) * hidden;
                        embeds[dst..dst + hidden]
                            .copy_from_slice(&prompts[r].features[k * hidden..(k + 1) * hidden]);
                    }
                }
            }
            let positions = batch::chunk_positions(&rows, &layout, start, end);
            let bias = batch::chunk_bias(&layout.offsets, start, end);
            let is_last = end == layout.len;
            let keep: Vec<i64> = match which {
                LogitsOf::All => (0..b).flat_map(|_| 0..seq as i64).collect(),
                LogitsOf::Last => vec![seq as i64 - 1; b],
            };
            let k = keep.len() / b;
            let logits = self.decode(&mut state, embeds, positions, bias, keep, seq)?;
            match which {
                LogitsOf::All => {
                    for (r, rows) in all.iter_mut().enumerate().take(b) {
                        let off = layout.offsets[r];
                        for j in 0..seq {
                            if start + j >= off {
                                let src = (r * k + j) * vocab;
                                rows.extend_from_slice(&logits[src..src + vocab]);
                            }
                        }
                    }
                }
                LogitsOf::Last if is_last => last = logits,
                LogitsOf::Last => {}
            }
            start = end;
        }
        let out = match which {
            LogitsOf::All => all,
            LogitsOf::Last => last.chunks(vocab).map(<[f32]>::to_vec).collect(),
        };
        tracing::debug!(
            batch = b,
            len = layout.len,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "prefill"
        );
        Ok((out, state))
    }

    /// Feeds one token per row and returns each row's next-token logits.
    pub fn step(&self, state: &mut DecodeState, tokens: &[u32]) -> OnnxResult<Vec<Vec<f32>>> {
        let b = state.batch();
        if tokens.len() != b {
            return Err(
                crate::Error::Model(format!("{} tokens for a batch of {b}", tokens.len())).into(),
            );
        }
        let vocab = self.config.text.vocab_size;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(crate::Error::Model(format!(
                "token {t} is outside the vocabulary of {vocab}"
            ))
            .into());
        }
        let ids: Vec<i64> = tokens.iter().map(|&t| i64::from(t)).collect();
        let embeds = self.embed(&ids, b, 1)?;
        let index = state.len;
        let positions = batch::step_positions(&state.offsets, &state.deltas, index);
        let bias = batch::step_bias(&state.offsets, index);
        let logits = self.decode(state, embeds, positions, bias, vec![0; b], 1)?;
        Ok(logits.chunks(vocab).map(<[f32]>::to_vec).collect())
    }

    /// A state whose row `i` is a copy of row `rows[i]` of `state` (for decoding several samples
    /// of one prompt after a single prefill). Needs a `float32` cache.
    pub fn gather_rows(&self, state: &DecodeState, rows: &[usize]) -> OnnxResult<DecodeState> {
        if let Some(&r) = rows.iter().find(|&&r| r >= state.batch()) {
            return Err(
                crate::Error::Model(format!("row {r} of a batch of {}", state.batch())).into(),
            );
        }
        let err = run_err("decoder");
        let mut values = Vec::with_capacity(state.values.len());
        for v in &state.values {
            let (shape, data) = v.try_extract_tensor::<f32>().map_err(&err)?;
            let per_row: usize = shape[1..].iter().map(|&d| d as usize).product();
            let mut out = Vec::with_capacity(per_row * rows.len());
            for &r in rows {
                out.extend_from_slice(&data[r * per_row..(r + 1) * per_row]);
            }
            let mut dims: Vec<i64> = shape.to_vec();
            dims[0] = rows.len() as i64;
            values.push(Tensor::from_array((dims, out)).map_err(&err)?.into_dyn());
        }
        Ok(DecodeState {
            values,
            len: state.len,
            offsets: rows.iter().map(|&r| state.offsets[r]).collect(),
            deltas: rows.iter().map(|&r| state.deltas[r]).collect(),
        })
    }

    /// Whether the KV cache is `float32` (what [`OnnxModel::gather_rows`] needs).
    pub fn cache_is_f32(&self) -> bool {
        self.kv_type == TensorElementType::Float32
    }
}

/// Checks a session has the inputs and outputs the runtime feeds and reads.
fn check_io(session: &Session, path: &Path, inputs: &[&str], outputs: &[&str]) -> OnnxResult<()> {
    for want in inputs {
        if !session.inputs().iter().any(|i| i.name() == *want) {
            return Err(OnnxError::Bundle {
                path: path.to_path_buf(),
                reason: format!(
                    "the graph has no input '{want}' (inputs: {}); re-export it with scripts/export_qwen2_5_vl.py",
                    session
                        .inputs()
                        .iter()
                        .map(|i| i.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            });
        }
    }
    for want in outputs {
        if !session.outputs().iter().any(|o| o.name() == *want) {
            return Err(OnnxError::Bundle {
                path: path.to_path_buf(),
                reason: format!(
                    "the graph has no output '{want}'; re-export it with scripts/export_qwen2_5_vl.py"
                ),
            });
        }
    }
    Ok(())
}
