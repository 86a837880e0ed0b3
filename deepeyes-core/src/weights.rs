//! Policy weights on the host, and the seam through which a trainer hands new versions of them
//! to whatever runs its rollouts.
//!
//! A trainer *publishes* a numbered version of its parameters ([`WeightUpdate`]); a rollout
//! engine ([`WeightReceiver`]) takes it before the next rollout and reports the version it runs.
//! ONNX Runtime takes it in place (`OnnxModel` overwrites the buffers its sessions read); a
//! remote inference server or an adapter-serving engine takes the same update its own way.
//! The update reads the parameters through [`WeightSource`], so a training engine can hand out
//! views of its own buffers instead of copying every weight first.

use std::collections::BTreeMap;

use crate::Result;

/// A host tensor of `f32` values in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values, `shape.iter().product()` of them.
    pub data: Vec<f32>,
}

/// Model parameters by Hugging Face name.
pub type Weights = BTreeMap<String, HostTensor>;

/// One parameter as a rollout engine reads it: its shape and row-major values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TensorView<'a> {
    /// Dimensions.
    pub shape: &'a [usize],
    /// Values, `shape.iter().product()` of them.
    pub data: &'a [f32],
}

/// Parameters by Hugging Face name: host copies ([`Weights`]) or views of a training engine's
/// own buffers.
pub trait WeightSource: Send + Sync {
    /// The parameter `name`, if there is one.
    fn tensor(&self, name: &str) -> Option<TensorView<'_>>;
}

impl WeightSource for Weights {
    fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.get(name).map(|t| TensorView {
            shape: &t.shape,
            data: &t.data,
        })
    }
}

/// One published version of the policy's parameters.
#[derive(Clone, Copy)]
pub struct WeightUpdate<'a> {
    /// Increases with every update the trainer publishes (the trainer uses its step count).
    pub version: u64,
    /// Every parameter, by Hugging Face name.
    pub tensors: &'a dyn WeightSource,
}

impl std::fmt::Debug for WeightUpdate<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightUpdate")
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// A rollout engine that takes new policy weights between rollouts.
///
/// Taking an update must not overlap a generation: the trainer publishes between rollouts.
pub trait WeightReceiver {
    /// Runs `update`'s weights from the next generation on. On error the engine keeps the
    /// version it held before, or reports none when it can no longer tell.
    fn receive_weights(&self, update: &WeightUpdate<'_>) -> Result<()>;

    /// The version it runs now; `None` while it runs the weights it was loaded with.
    fn weights_version(&self) -> Option<u64>;
}

/// What a trainer rolls out with: a model that generates and takes new weights between
/// rollouts (ONNX Runtime in process, remote servers, …).
pub trait RolloutEngine: crate::model::VisionLanguageModel + WeightReceiver {}

impl<T: crate::model::VisionLanguageModel + WeightReceiver + ?Sized> RolloutEngine for T {}
