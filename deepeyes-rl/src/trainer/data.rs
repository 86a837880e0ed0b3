//! The training data, held a window at a time.
//!
//! The trainer draws items in a per-epoch shuffled order of the whole data set, which needs
//! every item's index but not every item: a window of the next `data.window` items of the order
//! is held, and when the draw leaves it the files are streamed again and only the items of the
//! next window kept (the loaders stream with bounded memory). Memory is then bounded by the
//! window whatever the data's size, and the items drawn are exactly those of a run that held
//! everything, so metrics and resume are unchanged. A data set no larger than the window is
//! read once and held whole.

use std::collections::{BTreeSet, HashMap};
use std::ops::ControlFlow;

use deepeyes_core::dataset::{self, Item, LoadOptions, ReadError};

use super::{TrainError, TrainResult};
use crate::config::{DatasetKind, TrainConfig};

/// The configured data: how many items it has, and the ones of the current window.
pub(super) struct DataWindow {
    config: TrainConfig,
    len: usize,
    /// Items by index in the data (the order the files yield them, bad rows skipped).
    held: HashMap<usize, Item>,
}

impl DataWindow {
    /// Reads the data once to count its items, logging bad rows; keeps them all when they fit
    /// in one window.
    pub(super) fn open(config: &TrainConfig) -> TrainResult<Self> {
        let window = config.data.window;
        let mut held = HashMap::new();
        let mut len = 0;
        stream_items(config, true, |index, item| {
            len = index + 1;
            if index < window {
                held.insert(index, item);
            } else {
                held.clear();
            }
            ControlFlow::Continue(())
        })?;
        if len == 0 {
            return Err(TrainError::Data {
                path: config.data.paths.first().cloned().unwrap_or_default(),
                reason: "no usable items".into(),
            });
        }
        Ok(Self {
            config: config.clone(),
            len,
            held,
        })
    }

    /// How many items the data has.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// How many items are in memory now.
    pub(super) fn held(&self) -> usize {
        self.held.len()
    }

    /// The item at `order[cursor]`, reading the window `order[cursor..]` first when it is not
    /// held. `order` is a permutation of the data's indices.
    pub(super) fn item(&mut self, order: &[usize], cursor: usize) -> TrainResult<&Item> {
        let index = order[cursor];
        if !self.held.contains_key(&index) {
            let end = (cursor + self.config.data.window).min(order.len());
            self.read_window(order[cursor..end].iter().copied().collect())?;
        }
        self.held.get(&index).ok_or_else(|| TrainError::Data {
            path: self.config.data.paths.first().cloned().unwrap_or_default(),
            reason: format!(
                "item {index} of {} is gone: the data files changed during the run",
                self.len
            ),
        })
    }

    /// Streams the files again and keeps only the items of `wanted`.
    fn read_window(&mut self, wanted: BTreeSet<usize>) -> TrainResult<()> {
        self.held.clear();
        let last = wanted.last().copied().unwrap_or(0);
        let held = &mut self.held;
        stream_items(&self.config, false, |index, item| {
            if wanted.contains(&index) {
                held.insert(index, item);
            }
            if index >= last {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })?;
        tracing::debug!(
            items = held.len(),
            "read the next window of the training data"
        );
        Ok(())
    }
}

/// Streams every good item of the configured data, in file order and up to `data.limit`, into
/// `visit` with its index; bad rows are skipped (and logged when `log_bad`).
pub(super) fn stream_items(
    config: &TrainConfig,
    log_bad: bool,
    mut visit: impl FnMut(usize, Item) -> ControlFlow<()>,
) -> TrainResult<()> {
    let kind = match config.data.kind {
        DatasetKind::DeepeyesParquet => dataset::DatasetKind::Verl,
        DatasetKind::Vstar => dataset::DatasetKind::VStar,
        DatasetKind::Hrbench => dataset::DatasetKind::HrBench,
        DatasetKind::Synthv => dataset::DatasetKind::SynthV,
        DatasetKind::Jsonl => dataset::DatasetKind::Jsonl,
    };
    let limit = config.data.limit.unwrap_or(usize::MAX);
    let mut index = 0;
    for path in &config.data.paths {
        let data_err = |reason: String| TrainError::Data {
            path: path.clone(),
            reason,
        };
        let load = LoadOptions {
            allow_paths_outside_root: config.data.allow_paths_outside_root,
            ..LoadOptions::default()
        };
        let reader = dataset::open(kind, path, &load).map_err(|e| data_err(e.to_string()))?;
        for next in reader {
            if index >= limit {
                return Ok(());
            }
            match next {
                Ok(item) => {
                    let flow = visit(index, item);
                    index += 1;
                    if flow.is_break() {
                        return Ok(());
                    }
                }
                Err(ReadError::Skipped(bad)) if log_bad => {
                    tracing::warn!(row = %bad, "skipping a bad row");
                }
                Err(ReadError::Skipped(_)) => {}
                Err(ReadError::Fatal(e)) => return Err(data_err(e.to_string())),
            }
        }
    }
    Ok(())
}
