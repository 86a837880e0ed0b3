//! Errors, skipped rows and the per-file summary.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use super::item::Position;

/// A failure that stops a whole dataset (as opposed to one row, see [`BadRow`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatasetError {
    /// A file or folder could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file at fault.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not in the expected format (not a parquet file, a TSV header without a
    /// required column, a folder with no V* annotations, …).
    #[error("{path}: {reason}")]
    Format {
        /// The file at fault.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An invalid dataset kind or option.
    #[error("dataset config: {0}")]
    Config(String),
}

impl DatasetError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn format(path: impl Into<PathBuf>, reason: impl fmt::Display) -> Self {
        Self::Format {
            path: path.into(),
            reason: reason.to_string(),
        }
    }
}

/// Why a row was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SkipReason {
    /// A required field is absent, null or empty.
    MissingField,
    /// A field has the wrong type (a number where text was expected, …).
    WrongType,
    /// A field has the right type but an unusable value (an answer letter with no option, a
    /// box with no area, …).
    InvalidValue,
    /// An image is not a readable image, or is over the [`ImageLimits`](crate::ImageLimits).
    BadImage,
    /// A file the row refers to (an image, an annotation) does not exist or cannot be read.
    MissingFile,
    /// The row itself cannot be parsed (invalid JSON, a wrong number of TSV fields, invalid
    /// UTF-8, an over-long line).
    Malformed,
    /// Part of a binary file is corrupt (a parquet row group whose pages cannot be read); every
    /// row of that part is skipped.
    CorruptData,
}

impl SkipReason {
    /// The kebab-case name used in summaries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingField => "missing-field",
            Self::WrongType => "wrong-type",
            Self::InvalidValue => "invalid-value",
            Self::BadImage => "bad-image",
            Self::MissingFile => "missing-file",
            Self::Malformed => "malformed",
            Self::CorruptData => "corrupt-data",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A row that was skipped, with where it is and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{position}: {reason}: {detail}")]
pub struct BadRow {
    /// Where the row is (for [`SkipReason::CorruptData`], the first row of the skipped part).
    pub position: Position,
    /// The kind of problem.
    pub reason: SkipReason,
    /// What exactly was wrong, naming the field.
    pub detail: String,
    /// How many rows this report covers (1, except for [`SkipReason::CorruptData`]).
    pub rows: u64,
}

impl BadRow {
    /// A report for one row.
    pub fn new(position: Position, reason: SkipReason, detail: impl Into<String>) -> Self {
        Self {
            position,
            reason,
            detail: detail.into(),
            rows: 1,
        }
    }
}

/// What a reader yields besides items.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A row was skipped; reading goes on.
    #[error("skipped {0}")]
    Skipped(BadRow),
    /// Reading cannot go on; this is the last thing the reader yields.
    #[error(transparent)]
    Fatal(DatasetError),
}

/// Counts for one pass over a dataset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Data rows seen, good and bad.
    pub rows_read: u64,
    /// Items yielded.
    pub items: u64,
    /// Rows skipped, by reason.
    pub skipped: BTreeMap<SkipReason, u64>,
    /// The first skipped rows in full (at most [`LoadOptions::keep_bad_rows`](super::LoadOptions)).
    pub bad_rows: Vec<BadRow>,
    /// Set when a fatal error ended the pass early.
    pub stopped: Option<String>,
}

impl Summary {
    /// Rows skipped, all reasons together.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }

    /// Whether the pass reached the end of the data.
    pub fn completed(&self) -> bool {
        self.stopped.is_none()
    }

    pub(crate) fn record_item(&mut self) {
        self.rows_read += 1;
        self.items += 1;
    }

    pub(crate) fn record_bad(&mut self, bad: &BadRow, keep: usize) {
        self.rows_read += bad.rows;
        *self.skipped.entry(bad.reason).or_insert(0) += bad.rows;
        if self.bad_rows.len() < keep {
            self.bad_rows.push(bad.clone());
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} rows read, {} items, {} skipped",
            self.rows_read,
            self.items,
            self.skipped_total()
        )?;
        if !self.skipped.is_empty() {
            let parts: Vec<String> = self
                .skipped
                .iter()
                .map(|(reason, n)| format!("{reason}: {n}"))
                .collect();
            write!(f, " ({})", parts.join(", "))?;
        }
        if let Some(stop) = &self.stopped {
            write!(f, "; stopped early: {stop}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_counts_and_display() {
        let mut s = Summary::default();
        s.record_item();
        let bad = BadRow::new(Position::row("f.parquet", 1), SkipReason::BadImage, "junk");
        s.record_bad(&bad, 1);
        s.record_bad(
            &BadRow::new(Position::row("f.parquet", 2), SkipReason::BadImage, "junk"),
            1,
        );
        assert_eq!(s.rows_read, 3);
        assert_eq!(s.skipped_total(), 2);
        assert_eq!(s.bad_rows, vec![bad]);
        assert_eq!(
            s.to_string(),
            "3 rows read, 1 items, 2 skipped (bad-image: 2)"
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["skipped"]["bad-image"], 2);
    }

    #[test]
    fn bad_row_display_names_file_row_and_reason() {
        let bad = BadRow::new(
            Position::line("h.tsv", 3, 5),
            SkipReason::MissingField,
            "column `answer` is empty",
        );
        assert_eq!(
            bad.to_string(),
            "h.tsv:5 (row 3): missing-field: column `answer` is empty"
        );
    }
}
