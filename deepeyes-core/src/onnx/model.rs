//! [`OnnxModel`]: a Qwen2.5-VL bundle loaded into ONNX Runtime sessions, with the lower-level
//! API (vision features, prefill, decode steps with logits) the generation loop is built on.
//!
//! This module loads the bundle; the rest of the API lives beside it: the vision encoder and its
//! feature cache in `vision_cache`, prompt assembly in `prompt`, prefill and decoding in
//! `decode`, execution providers in `provider`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor, TensorElementType};

use crate::model::HfTokenizer;
use crate::preprocess::Preprocessor;
use crate::protocol::IMAGE_PAD;
use crate::vision::VisionGeometry;

use super::config::BundleConfig;
use super::error::{OnnxError, OnnxResult};
use super::provider::{DeviceReport, OnnxOptions, Placement};
use super::runtime::{Runtime, RuntimeInfo, runtime};
use super::vision_cache::FeatureCache;
use super::weights::{MapEntry, WeightMap, initializer_value, read_safetensors};
use crate::weights::WeightSource;

/// Whether this process has already logged a bundle load at info level.
static LOAD_REPORTED: AtomicBool = AtomicBool::new(false);

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
    pub(super) dir: PathBuf,
    /// The bundle's configuration.
    pub(super) config: BundleConfig,
    /// The options it was loaded with.
    pub(super) options: OnnxOptions,
    tokenizer: HfTokenizer,
    pub(super) runtime: Arc<Runtime>,
    pub(super) device: DeviceReport,
    /// The vision encoder graph.
    pub(super) vision: Mutex<Session>,
    /// The token embedding graph.
    pub(super) embed: Mutex<Session>,
    /// The decoder graph.
    pub(super) decoder: Mutex<Session>,
    /// The element type of the decoder's KV cache.
    pub(super) kv_type: TensorElementType,
    /// The decoder's cache inputs, `past_{key,value}_{layer}`.
    pub(super) past_names: Vec<String>,
    /// The decoder's cache outputs, `present_{key,value}_{layer}`, in the order of `past_names`.
    pub(super) present_names: Vec<String>,
    /// Vision features of recently encoded images.
    pub(super) cache: Mutex<FeatureCache>,
    /// The preprocessor and pixel buffer, reused image after image: a fresh multi-megabyte
    /// buffer per image costs a page fault per 4 KiB, as much as the rest of preprocessing.
    pub(super) pixels: Mutex<(Preprocessor, Vec<f32>)>,
    /// The parameter buffers the sessions read, when the model was loaded with weights from
    /// memory ([`OnnxModel::load_with_weights`]): new weights are written into them in place.
    pub(super) in_place: Option<InPlaceWeights>,
    /// The weight version the sessions run ([`NO_VERSION`] until one is received).
    pub(super) version: AtomicU64,
}

/// `version` of a model that runs the weights it was loaded with.
pub(super) const NO_VERSION: u64 = u64::MAX;

/// The initializers of a model loaded with weights from memory, and where they came from.
pub(super) struct InPlaceWeights {
    /// The bundle's weight map.
    pub(super) map: WeightMap,
    /// Its file, named in errors.
    pub(super) map_path: PathBuf,
    /// For each graph (vision, embed, decoder), its mapped initializers in map order, each with
    /// the buffer the session reads.
    pub(super) buffers: [Vec<(MapEntry, InitializerBuffer)>; 3],
}

/// The `f32` data of an initializer handed to ONNX Runtime, which reads it in place.
pub(super) struct InitializerBuffer {
    /// The tensor that owns the data (the session holds another reference).
    _owner: Arc<DynValue>,
    /// The data's address, with its provenance exposed (taken through the tensor's mutable
    /// data pointer before it was shared).
    pub(super) address: usize,
    /// Its number of elements.
    pub(super) len: usize,
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

/// Turns an ONNX Runtime error from running `graph` into an [`OnnxError::Run`].
pub(super) fn run_err(graph: &'static str) -> impl Fn(ort::Error) -> OnnxError {
    move |e| OnnxError::Run {
        graph,
        message: e.to_string(),
    }
}

/// Locks `m`, ignoring poisoning.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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
        Self::load_inner(
            dir,
            options,
            weights.as_ref().map(|(w, m)| (w as &dyn WeightSource, m)),
            false,
        )
    }

    /// Loads the bundle in `dir` with `weights` (Hugging Face names) in place of its own, e.g. a
    /// policy just updated by a trainer. The bundle must have a weight map; every parameter it
    /// names must be in `weights`, with the right shape.
    ///
    /// The model then takes later versions of the weights in place
    /// ([`WeightReceiver::receive_weights`]): its sessions read the parameters from buffers it
    /// owns, so ONNX Runtime keeps no transformed copy of them (weight pre-packing is off for
    /// these sessions).
    pub fn load_with_weights(
        dir: impl AsRef<Path>,
        options: &OnnxOptions,
        weights: &dyn WeightSource,
    ) -> OnnxResult<Self> {
        let dir = dir.as_ref();
        let map = WeightMap::load(dir)?.ok_or_else(|| OnnxError::Bundle {
            path: dir.join(super::weights::WEIGHT_MAP_FILE),
            reason: "not found: re-export the bundle (scripts/export_qwen2_5_vl.py) or add one with scripts/map_bundle_weights.py".into(),
        })?;
        Self::load_inner(dir, options, Some((weights, &map)), true)
    }

    fn load_inner(
        dir: &Path,
        options: &OnnxOptions,
        weights: Option<(&dyn WeightSource, &WeightMap)>,
        in_place: bool,
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
        let tokenizer = load_tokenizer(&dir, &config)?;
        let runtime = runtime()?;
        let started = Instant::now();

        let mut place = Placement::new(options);
        let [(vision, vb), (embed, eb), (decoder, db)] = build_sessions(
            &runtime, &dir, &config, options, &mut place, weights, in_place,
        )?;
        let (past_names, present_names) = kv_names(config.text.num_layers);
        check_graphs(
            &dir,
            &config,
            [&vision, &embed, &decoder],
            &past_names,
            &present_names,
        )?;
        let kv_type = decoder
            .inputs()
            .iter()
            .find(|i| i.name() == "past_key_0")
            .and_then(|i| i.dtype().tensor_type())
            .unwrap_or(TensorElementType::Float32);

        let device = place.report();
        // One line for the first load of the process; a trainer reloads its rollout engine with
        // new weights every step, which is not news.
        if super::provider::first_time(&LOAD_REPORTED) {
            tracing::info!(
                bundle = %dir.display(),
                provider = %device.provider,
                seconds = started.elapsed().as_secs_f64(),
                "loaded model bundle"
            );
        } else {
            tracing::debug!(
                bundle = %dir.display(),
                seconds = started.elapsed().as_secs_f64(),
                "loaded model bundle"
            );
        }
        let preprocessor = Preprocessor::new(config.preprocess)?;
        let in_place = match weights {
            Some((_, map)) if in_place => Some(InPlaceWeights {
                map: map.clone(),
                map_path: dir.join(super::weights::WEIGHT_MAP_FILE),
                buffers: [vb, eb, db],
            }),
            _ => None,
        };
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
            in_place,
            version: AtomicU64::new(NO_VERSION),
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

    /// The vision geometry of the bundle's configuration.
    pub(super) fn geometry(&self) -> VisionGeometry {
        self.config.vision.geometry()
    }
}

/// Loads the bundle's tokenizer and checks it agrees with `bundle.json` on the image pad token.
fn load_tokenizer(dir: &Path, config: &BundleConfig) -> OnnxResult<HfTokenizer> {
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
    Ok(tokenizer)
}

/// A session with its mapped initializers, in map order.
pub(super) type BuiltSession = (Session, Vec<(MapEntry, InitializerBuffer)>);

/// The graphs' names in the weight map, in the order of [`InPlaceWeights::buffers`].
const GRAPHS: [&str; 3] = ["vision", "embed", "decoder"];

/// Builds the vision, embed and decoder sessions of the bundle in `dir`; see [`load_session`].
pub(super) fn build_sessions(
    runtime: &Runtime,
    dir: &Path,
    config: &BundleConfig,
    options: &OnnxOptions,
    place: &mut Placement,
    weights: Option<(&dyn WeightSource, &WeightMap)>,
    in_place: bool,
) -> OnnxResult<[BuiltSession; 3]> {
    let files = [
        &config.graphs.vision,
        &config.graphs.embed,
        &config.graphs.decoder,
    ];
    let mut build = |i: usize| {
        let graph = GRAPHS[i];
        load_session(
            runtime, dir, graph, files[i], options, place, weights, in_place,
        )
    };
    Ok([build(0)?, build(1)?, build(2)?])
}

/// Builds the session of one graph: `graph` is its name in the weight map, `name` its file in
/// the bundle directory `dir`. The provider comes from `placement` (which a CUDA failure moves
/// to the CPU); the map's initializers are set from `weights`, if given, and returned with the
/// session. With `in_place` the session reads them without pre-packing, so that writing into
/// their buffers changes the weights it runs.
#[allow(clippy::too_many_arguments)]
fn load_session(
    runtime: &Runtime,
    dir: &Path,
    graph: &str,
    name: &str,
    options: &OnnxOptions,
    placement: &mut Placement,
    weights: Option<(&dyn WeightSource, &WeightMap)>,
    in_place: bool,
) -> OnnxResult<BuiltSession> {
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
    builder = placement.register(builder)?;
    if in_place {
        builder = builder
            .with_prepacking(false)
            .map_err(|e| session_err(e.into()))?;
    }
    let mut buffers = Vec::new();
    if let Some((weights, map)) = weights {
        let map_path = dir.join(super::weights::WEIGHT_MAP_FILE);
        for entry in map.entries(graph) {
            let value = initializer_value(entry, weights, &map_path)?;
            let len = value.data.len();
            let mut tensor = Tensor::from_array((value.shape, value.data)).map_err(session_err)?;
            let address = tensor.data_ptr_mut().cast::<f32>().expose_provenance();
            let owner: Arc<DynValue> = Arc::new(tensor.into_dyn());
            builder = builder
                .with_initializer(&entry.initializer, Arc::clone(&owner))
                .map_err(|e| session_err(e.into()))?;
            let buffer = InitializerBuffer {
                _owner: owner,
                address,
                len,
            };
            buffers.push((entry.clone(), buffer));
        }
    }
    let session = builder.commit_from_file(&path).map_err(session_err)?;
    Ok((session, buffers))
}

/// The decoder's cache inputs (`past_{key,value}_{i}`) and outputs (`present_{key,value}_{i}`)
/// for `layers` layers, in the same order.
fn kv_names(layers: usize) -> (Vec<String>, Vec<String>) {
    let mut past_names = Vec::with_capacity(2 * layers);
    let mut present_names = Vec::with_capacity(2 * layers);
    for i in 0..layers {
        for kind in ["key", "value"] {
            past_names.push(format!("past_{kind}_{i}"));
            present_names.push(format!("present_{kind}_{i}"));
        }
    }
    (past_names, present_names)
}

/// Checks the vision, embedding and decoder sessions have the inputs and outputs the runtime
/// feeds and reads.
fn check_graphs(
    dir: &Path,
    config: &BundleConfig,
    [vision, embed, decoder]: [&Session; 3],
    past_names: &[String],
    present_names: &[String],
) -> OnnxResult<()> {
    check_io(
        vision,
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
        embed,
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
        decoder,
        &dir.join(&config.graphs.decoder),
        &dec_in,
        &dec_out,
    )
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
