//! Checkpoints of a run (the bundle of the current weights, the optimizer state and where the
//! run stands) and bundle export.

use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use deepeyes_core::Rng;

use super::{TrainError, TrainResult, Trainer, io_err};
use crate::network::PolicyNetwork;

impl<N: PolicyNetwork> Trainer<N> {
    /// Writes a checkpoint of the run after the steps done so far into
    /// `checkpoint.dir/step-NNNNNN`: a bundle that runs the current weights (so any checkpoint can
    /// be evaluated), the optimizer state and the trainer state. It is written in a temporary
    /// folder renamed into place, so a kill never leaves a half-written checkpoint; older ones
    /// beyond `checkpoint.keep-last` are removed.
    pub fn save_checkpoint(&self) -> TrainResult<PathBuf> {
        let root = self.config.checkpoint_dir();
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let name = format!("step-{:06}", self.step);
        let dir = root.join(&name);
        let tmp = root.join(format!(".{name}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        export_bundle(self.model(), &self.config.model.bundle, &tmp)?;
        let bytes = self.optim.into_bytes().map_err(|e| TrainError::Data {
            path: tmp.join(OPTIMIZER_FILE),
            reason: format!("cannot serialise the optimizer state: {e:?}"),
        })?;
        let path = tmp.join(OPTIMIZER_FILE);
        std::fs::write(&path, &bytes[..]).map_err(io_err(&path))?;
        let state = TrainerState {
            step: self.step,
            data_rng: self.data_rng.clone(),
            order: self.order.clone(),
            cursor: self.cursor,
        };
        let path = tmp.join(STATE_FILE);
        let text = serde_json::to_string_pretty(&state).expect("the state serialises");
        std::fs::write(&path, text).map_err(io_err(&path))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        let keep = self.config.checkpoint.keep_last;
        if keep > 0 {
            let all = checkpoints(&root)?;
            for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
                std::fs::remove_dir_all(old).map_err(io_err(old))?;
            }
        }
        Ok(dir)
    }
}

/// Reads the optimizer state and the trainer state of `dir` into `optim`, checking that the
/// checkpoint's data has `items` items.
pub(super) fn restore(
    dir: &Path,
    optim: ModuleOptimizer,
    items: usize,
) -> TrainResult<(ModuleOptimizer, TrainerState)> {
    let path = dir.join(OPTIMIZER_FILE);
    let bytes = std::fs::read(&path).map_err(io_err(&path))?;
    let optim = optim
        .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
        .map_err(|e| TrainError::Data {
            path: path.clone(),
            reason: format!("not an optimizer state: {e:?}"),
        })?;
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Data {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if state.order.len() != items {
        return Err(TrainError::Data {
            path,
            reason: format!(
                "the checkpoint's data has {} items, the configured data {}",
                state.order.len(),
                items
            ),
        });
    }
    Ok((optim, state))
}

/// The optimizer state inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
/// The trainer state inside a checkpoint.
pub const STATE_FILE: &str = "trainer-state.json";

/// Where a run stands, saved with each checkpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TrainerState {
    /// RL steps completed.
    pub(super) step: u64,
    /// The data-order stream.
    pub(super) data_rng: Rng,
    /// The current epoch's item order.
    pub(super) order: Vec<usize>,
    /// The next position in `order`.
    pub(super) cursor: usize,
}

/// The complete checkpoints in `root`, oldest first, with their step.
pub fn checkpoints(root: &Path) -> TrainResult<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(root)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err(root))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if entry.path().join(STATE_FILE).is_file() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Writes `model`'s weights as a bundle in `out`, next to copies of the files of `source` (a
/// bundle with a weight map).
pub fn export_bundle<N: PolicyNetwork>(
    model: &N,
    source: &Path,
    out: &Path,
) -> TrainResult<PathBuf> {
    if !source
        .join(deepeyes_core::onnx::weights::WEIGHT_MAP_FILE)
        .is_file()
    {
        return Err(TrainError::Data {
            path: source.to_path_buf(),
            reason: "the bundle has no weights.json, so it cannot run new weights; re-export it"
                .into(),
        });
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let entries = std::fs::read_dir(source).map_err(io_err(source))?;
    for entry in entries {
        let entry = entry.map_err(io_err(source))?;
        let name = entry.file_name();
        if name == "model.safetensors" || name == "config.json" || !entry.path().is_file() {
            continue;
        }
        let to = out.join(&name);
        std::fs::copy(entry.path(), &to).map_err(io_err(&to))?;
    }
    model.save_pretrained(out)?;
    // The copied graphs hold the source's weights, not these: they must be replaced at load.
    if let Some(mut map) = deepeyes_core::onnx::WeightMap::load(out)?
        && map.graphs_current
    {
        map.graphs_current = false;
        map.save(out)?;
    }
    Ok(out.to_path_buf())
}
