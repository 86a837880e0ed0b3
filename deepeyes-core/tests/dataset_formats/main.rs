//! The dataset loaders on small files in each real format (written by
//! `scripts/make_dataset_fixtures.py`), broken rows included: exact counts, fields and error
//! positions.

mod hrbench;
mod jsonl;
#[cfg(feature = "parquet")]
mod verl;
mod vstar;

use std::path::{Path, PathBuf};

use deepeyes_core::dataset::{BadRow, Item, ItemReader, ReadError, SkipReason};

/// `tests/data/datasets/<rel>` at the repository root.
pub(crate) fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/datasets")
        .join(rel)
}

/// Reads everything: the items and the skipped rows, in order. Panics on a fatal error.
pub(crate) fn drain(reader: &mut dyn ItemReader) -> (Vec<Item>, Vec<BadRow>) {
    let mut items = Vec::new();
    let mut bad = Vec::new();
    for record in &mut *reader {
        match record {
            Ok(item) => items.push(item),
            Err(ReadError::Skipped(b)) => bad.push(b),
            Err(ReadError::Fatal(e)) => panic!("fatal: {e}"),
        }
    }
    (items, bad)
}

/// `(row, reason)` of each skipped row.
#[cfg(feature = "parquet")]
pub(crate) fn rows_and_reasons(bad: &[BadRow]) -> Vec<(Option<u64>, SkipReason)> {
    bad.iter().map(|b| (b.position.row, b.reason)).collect()
}

/// The skipped-by-reason counts as a sorted list.
pub(crate) fn skipped(reader: &dyn ItemReader) -> Vec<(SkipReason, u64)> {
    reader
        .summary()
        .skipped
        .iter()
        .map(|(r, n)| (*r, *n))
        .collect()
}
