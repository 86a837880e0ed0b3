//! The trainer's checkpoints, in the one checkpoint format ([`crate::checkpoint`]: built in a
//! temporary folder, every file fsynced and listed with its SHA-256 in the manifest with the
//! resolved config, published by one rename), and bundle export.
//!
//! A checkpoint is a bundle that runs the current weights (so any checkpoint can be evaluated
//! or served as is), plus the optimizer state; the manifest's state holds the step, the data
//! stream's generator and the epoch's item order and position.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::optim::ModuleOptimizer;
use deepeyes_core::Rng;

use super::{TrainError, TrainResult, Trainer, io_err};
use crate::checkpoint::{Checkpoint, CheckpointWriter, DataCursor, TrainState, prune_checkpoints};
use crate::network::PolicyNetwork;

/// The optimizer state inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.bpk";

/// The name of the data stream's generator in a checkpoint's state.
const DATA_RNG: &str = "data";

impl<N: PolicyNetwork> Trainer<N> {
    /// Writes a checkpoint of the run after the steps done so far into
    /// `checkpoint.dir/step-NNNNNNNN`. A kill at any moment leaves the previous checkpoints
    /// intact and this one either complete or absent; older ones beyond
    /// `checkpoint.keep-last` are removed only once it is durable.
    pub fn save_checkpoint(&self) -> TrainResult<PathBuf> {
        let root = self.config.checkpoint_dir();
        let mut writer = CheckpointWriter::begin(&root, self.step)?;
        self.export_into(writer.dir())?;
        self.model().save_adapter(writer.dir())?;
        let mut names: Vec<String> = std::fs::read_dir(writer.dir())
            .map_err(io_err(writer.dir()))?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()
            .map_err(io_err(writer.dir()))?;
        names.sort();
        for name in &names {
            writer.adopt(name)?;
        }
        let bytes = self.optim.into_bytes().map_err(|e| TrainError::Data {
            path: root.clone(),
            reason: format!("cannot serialise the optimizer state: {e:?}"),
        })?;
        writer.add_bytes(OPTIMIZER_FILE, &bytes[..])?;
        let dir = writer.commit(&self.run_state(), &self.config.to_toml_string()?)?;
        prune_checkpoints(&root, self.config.checkpoint.keep_last)?;
        Ok(dir)
    }

    /// Where the run stands, as a checkpoint records it.
    fn run_state(&self) -> TrainState {
        TrainState {
            step: self.step,
            rngs: BTreeMap::from([(DATA_RNG.to_string(), self.data_rng.clone())]),
            data_cursor: DataCursor {
                epoch: 0,
                position: self.cursor as u64,
            },
            extra: serde_json::json!({ "order": self.order }),
        }
    }
}

/// Where a resumed run stands: the data stream's generator, the epoch's item order and the
/// next position in it, and the steps completed.
pub(super) struct RunPosition {
    pub(super) step: u64,
    pub(super) data_rng: Rng,
    pub(super) order: Vec<usize>,
    pub(super) cursor: usize,
}

/// Reads a verified checkpoint's optimizer state into `optim` and its run position, checking
/// that its data had `items` items.
pub(super) fn restore(
    checkpoint: &Checkpoint,
    optim: ModuleOptimizer,
    items: usize,
) -> TrainResult<(ModuleOptimizer, RunPosition)> {
    let dir = checkpoint.dir();
    let bad = |reason: String| TrainError::Data {
        path: dir.to_path_buf(),
        reason,
    };
    let bytes = checkpoint.read_blob(OPTIMIZER_FILE)?;
    let optim = optim
        .from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes))
        .map_err(|e| bad(format!("not an optimizer state: {e:?}")))?;
    let state = checkpoint.state();
    let data_rng = state
        .rngs
        .get(DATA_RNG)
        .cloned()
        .ok_or_else(|| bad(format!("the state has no {DATA_RNG:?} generator")))?;
    let order: Vec<usize> = serde_json::from_value(state.extra["order"].clone())
        .map_err(|e| bad(format!("the state's item order: {e}")))?;
    if order.len() != items {
        return Err(bad(format!(
            "the checkpoint's data has {} items, the configured data {items}",
            order.len()
        )));
    }
    let cursor = usize::try_from(state.data_cursor.position).unwrap_or(usize::MAX);
    Ok((
        optim,
        RunPosition {
            step: state.step,
            data_rng,
            order,
            cursor,
        },
    ))
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
    if let Some(mut map) = deepeyes_core::onnx::WeightMap::load(out)? {
        map.check_shapes(&map.params_path(out))
            .map_err(|e| TrainError::Data {
                path: source.to_path_buf(),
                reason: format!(
                    "its graphs cannot run these weights ({e}); export a bundle for this \
                     checkpoint with scripts/export_qwen2_5_vl.py"
                ),
            })?;
        // The copied graphs hold the source's weights, not these: they must be replaced at load.
        if map.graphs_current {
            map.graphs_current = false;
            map.save(out)?;
        }
    }
    Ok(out.to_path_buf())
}

/// Writes the training config's `[tools]` table as the bundle's tools configuration
/// ([`BUNDLE_TOOLS_FILE`](deepeyes_core::tool::BUNDLE_TOOLS_FILE)), so that the bundle's boxes
/// are read in the frame, and under the limits, they were trained with. A bundle resolves
/// relative plugin paths against its own folder, so the table's (relative to where training
/// runs) are written absolute.
pub fn write_tools_table(table: &toml::Table, out: &Path) -> TrainResult<()> {
    let mut table = table.clone();
    if let Some(toml::Value::Array(plugins)) = table.get_mut("plugins") {
        let cwd = std::env::current_dir().map_err(io_err(Path::new(".")))?;
        for plugin in plugins.iter_mut().filter_map(toml::Value::as_table_mut) {
            if let Some(toml::Value::String(path)) = plugin.get_mut("path")
                && Path::new(path.as_str()).is_relative()
            {
                *path = cwd.join(path.as_str()).display().to_string();
            }
        }
    }
    let path = out.join(deepeyes_core::tool::BUNDLE_TOOLS_FILE);
    let text = toml::to_string(&table).map_err(|e| TrainError::Data {
        path: path.clone(),
        reason: format!("the [tools] table cannot be written: {e}"),
    })?;
    std::fs::write(&path, text).map_err(io_err(&path))
}
