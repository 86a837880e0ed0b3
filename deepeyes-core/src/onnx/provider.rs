//! Execution providers: the [`OnnxOptions`] that choose them, registering CUDA on a session
//! builder (with the CPU fallback), the resulting [`DeviceReport`], and [`probe_gpu`].

use std::sync::atomic::{AtomicBool, Ordering};

use ort::session::Session;
use ort::session::builder::SessionBuilder;
use serde::{Deserialize, Serialize};

use super::error::{OnnxError, OnnxResult};
use super::runtime::runtime;

/// Whether this process has already said that CUDA fell back to the CPU.
static FALLBACK_REPORTED: AtomicBool = AtomicBool::new(false);

/// True the first time it is called with `flag` in this process.
pub(super) fn first_time(flag: &AtomicBool) -> bool {
    !flag.swap(true, Ordering::Relaxed)
}

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

/// The provider a model's sessions are built for, updated as they are built: the first session
/// on which CUDA cannot be registered moves it and every later session to the CPU (when the
/// options allow the CPU).
#[derive(Debug)]
pub(super) struct Placement {
    use_cuda: bool,
    cpu_allowed: bool,
    fallback: Option<String>,
}

impl Placement {
    /// Where `options` ask the sessions to run.
    pub(super) fn new(options: &OnnxOptions) -> Self {
        Self {
            // The first provider listed decides whether CUDA is tried at all.
            use_cuda: options.providers.first() == Some(&Provider::Cuda),
            cpu_allowed: options.providers.contains(&Provider::Cpu) && !options.require_gpu,
            fallback: None,
        }
    }

    /// Registers the provider on a session's builder, falling back to the CPU when CUDA cannot
    /// be registered and the CPU is allowed.
    pub(super) fn register(&mut self, builder: SessionBuilder) -> OnnxResult<SessionBuilder> {
        if self.use_cuda {
            Ok(match register_cuda(builder) {
                Ok(b) => b,
                Err((b, why)) => {
                    if !self.cpu_allowed {
                        return Err(OnnxError::GpuUnavailable(why));
                    }
                    // Reported once per process: later sessions of this load go straight
                    // to the CPU, and later loads (a trainer's every step) say nothing. A
                    // build without GPU support falling back is expected, not a warning.
                    if first_time(&FALLBACK_REPORTED) {
                        if cfg!(feature = "cuda") {
                            tracing::warn!("{why}; running on the CPU");
                        } else {
                            tracing::info!("{why}; running on the CPU");
                        }
                    } else {
                        tracing::debug!("{why}; running on the CPU");
                    }
                    self.fallback = Some(why);
                    self.use_cuda = false;
                    b
                }
            })
        } else if !self.cpu_allowed {
            Err(OnnxError::GpuUnavailable(
                "no GPU provider is in the provider list".into(),
            ))
        } else {
            Ok(builder)
        }
    }

    /// Where the sessions built so far run.
    pub(super) fn report(self) -> DeviceReport {
        DeviceReport {
            provider: if self.use_cuda {
                "CUDAExecutionProvider".into()
            } else {
                "CPUExecutionProvider".into()
            },
            gpu: self.use_cuda,
            fallback: self.fallback,
        }
    }
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
