//! Streaming loaders for the training data and the benchmarks DeepEyes uses.
//!
//! Every format yields the same [`Item`] through the same [`ItemReader`] trait, one row at a
//! time, so memory stays flat whatever the file size:
//!
//! | [`DatasetKind`] | Files | Reader |
//! | --- | --- | --- |
//! | `verl` | DeepEyes-47k / verl parquet (`prompt`, `images`, `reward_model`, …) | [`VerlParquetReader`] (feature `parquet`) |
//! | `vstar` | V* Bench: a folder per category of `.jpg` + `.json` | [`VStarReader`] |
//! | `hrbench` | HR-Bench 4K/8K TSV with base64 images | [`HrBenchReader`] |
//! | `synthv` | SynthV* JSONL index (image paths, options, target box) | [`JsonlReader`] |
//! | `jsonl` | the same JSONL schema with options and boxes optional | [`JsonlReader`] |
//!
//! A row that cannot become an item (an undecodable image, a missing field, a wrong type) is
//! reported as [`ReadError::Skipped`] with its [`Position`] and reading goes on; the
//! [`Summary`] counts rows read, items yielded and rows skipped by reason. Only a problem with the
//! whole source (a missing file, a file that is not parquet, a TSV header without `question`)
//! is fatal. Formats and fields are described in `docs/DATASETS.md`.
//!
//! ```no_run
//! use deepeyes_core::dataset::{self, DatasetKind, ItemReader, LoadOptions, ReadError};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut reader = dataset::open(DatasetKind::VStar, "vstar_bench".as_ref(), &LoadOptions::default())?;
//! for record in &mut reader {
//!     match record {
//!         Ok(item) => println!("{} {:?}", item.id, item.answer_letter()),
//!         Err(ReadError::Skipped(bad)) => eprintln!("skipped {bad}"),
//!         Err(ReadError::Fatal(e)) => return Err(e.into()),
//!     }
//! }
//! println!("{}", reader.summary());
//! # Ok(())
//! # }
//! ```

mod fields;
mod hrbench;
mod item;
mod jsonl;
mod prepared;
mod report;
mod text;
#[cfg(feature = "parquet")]
mod verl;
mod vstar;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::image::ImageLimits;

pub use hrbench::HrBenchReader;
pub use item::{
    GroundTruthBox, Item, ItemImage, Position, PromptMessage, letter_index, option_letter,
};
pub use jsonl::{JsonlReader, JsonlSchema};
pub use prepared::{PreparedItem, prepare_item};
pub use report::{BadRow, DatasetError, ReadError, SkipReason, Summary};
#[cfg(feature = "parquet")]
pub use verl::{VerlParquetReader, VerlParquetWriter, VerlRow, VerlWriterConfig};
pub use vstar::VStarReader;

/// A stream of items from one dataset.
///
/// The iterator yields `Ok(item)` for each good row, [`ReadError::Skipped`] for each bad row (and
/// goes on), and at most one [`ReadError::Fatal`], after which it yields nothing.
pub trait ItemReader: Iterator<Item = Result<Item, ReadError>> + Send {
    /// The counts so far; final once the iterator has returned `None`.
    fn summary(&self) -> &Summary;

    /// The number of rows in the source, when known without reading it (parquet metadata, the
    /// V* file list); for progress bars.
    fn len_hint(&self) -> Option<u64>;

    /// The file or folder being read.
    fn source(&self) -> &Path;

    /// An iterator over the good items that logs and skips bad rows (`tracing` warnings) and
    /// yields a fatal error as `Err`. The counts stay available from [`ItemReader::summary`].
    fn good_items(&mut self) -> GoodItems<'_, Self>
    where
        Self: Sized,
    {
        GoodItems { reader: self }
    }
}

impl<R: ItemReader + ?Sized> ItemReader for Box<R> {
    fn summary(&self) -> &Summary {
        (**self).summary()
    }
    fn len_hint(&self) -> Option<u64> {
        (**self).len_hint()
    }
    fn source(&self) -> &Path {
        (**self).source()
    }
}

/// See [`ItemReader::good_items`].
#[derive(Debug)]
pub struct GoodItems<'r, R> {
    reader: &'r mut R,
}

impl<R: ItemReader> Iterator for GoodItems<'_, R> {
    type Item = Result<Item, DatasetError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            match self.reader.next()? {
                Ok(item) => return Some(Ok(item)),
                Err(ReadError::Skipped(bad)) => tracing::warn!("skipping {bad}"),
                Err(ReadError::Fatal(e)) => return Some(Err(e)),
            }
        }
    }
}

/// How much of each image a loader checks before yielding an item.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageCheck {
    /// Read the header only (format, width, height, limits); pixels are decoded on demand by
    /// [`ItemImage::decode`]. Cheap, and what training wants; a truncated body is found only
    /// when the image is decoded.
    #[default]
    Header,
    /// Decode every image while loading and keep the pixels with the item; finds truncated
    /// bodies up front, costs the decode time and the decoded size per item held.
    Decode,
}

/// Options shared by all loaders.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct LoadOptions {
    /// Limits every image is checked against.
    pub image_limits: ImageLimits,
    /// Header-only check, or a full decode at load time.
    pub image_check: ImageCheck,
    /// Parquet rows decoded per batch; memory grows with `batch-rows ×` the largest row.
    pub batch_rows: usize,
    /// The longest row accepted in text formats (a TSV record or a JSONL line), in bytes;
    /// longer ones are skipped as malformed without being held in memory.
    pub max_row_bytes: u64,
    /// How many skipped rows the [`Summary`] keeps in full.
    pub keep_bad_rows: usize,
    /// Let rows name image files outside the dataset's folder (absolute paths, or `..` above
    /// it); off by default, so a dataset from elsewhere reads nothing but its own files.
    pub allow_paths_outside_root: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            image_limits: ImageLimits::default(),
            image_check: ImageCheck::Header,
            batch_rows: 8,
            // HR-Bench 8K rows carry a base64 7680×4320 JPEG (tens of MB); 512 MiB leaves room.
            max_row_bytes: 512 * 1024 * 1024,
            keep_bad_rows: 100,
            allow_paths_outside_root: false,
        }
    }
}

impl LoadOptions {
    /// Checks the values.
    pub fn validate(&self) -> Result<(), DatasetError> {
        if self.batch_rows == 0 {
            return Err(DatasetError::Config("batch-rows must be at least 1".into()));
        }
        if self.max_row_bytes == 0 {
            return Err(DatasetError::Config(
                "max-row-bytes must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// Wraps encoded image bytes as [`ItemImage`] under these options.
    /// Reads the image file a row names as `written` (relative to the dataset's folder `root`,
    /// which it may not leave unless allowed), under the image limits' file-size cap, and checks
    /// it as [`LoadOptions::image`] does.
    pub(crate) fn image_file(
        &self,
        root: &Path,
        written: &str,
    ) -> Result<ItemImage, (SkipReason, String)> {
        let full = item::resolve(root, written, self.allow_paths_outside_root)
            .map_err(|e| (SkipReason::InvalidValue, e))?;
        let bytes = crate::image::read_image_file(&full, &self.image_limits).map_err(|e| {
            let reason = match e {
                crate::Error::Io { .. } => SkipReason::MissingFile,
                _ => SkipReason::BadImage,
            };
            (reason, format!("image `{written}`: {e}"))
        })?;
        self.image(bytes, full.display().to_string())
            .map_err(|e| (SkipReason::BadImage, e.to_string()))
    }

    pub(crate) fn image(&self, bytes: Vec<u8>, origin: String) -> crate::Result<ItemImage> {
        match self.image_check {
            ImageCheck::Header => ItemImage::from_encoded(bytes, origin, &self.image_limits),
            ImageCheck::Decode => {
                ItemImage::from_encoded_decoded(bytes, origin, &self.image_limits)
            }
        }
    }
}

/// The dataset formats this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    /// A verl-format parquet file such as the DeepEyes-47k training files.
    #[serde(alias = "parquet", alias = "deepeyes47k")]
    Verl,
    /// A V* Bench folder.
    #[serde(rename = "vstar")]
    VStar,
    /// An HR-Bench 4K/8K TSV file.
    #[serde(rename = "hrbench")]
    HrBench,
    /// A SynthV* JSONL index (options and target box required).
    #[serde(rename = "synthv")]
    SynthV,
    /// A JSONL file in the SynthV* schema with options and boxes optional.
    Jsonl,
}

impl DatasetKind {
    /// All kinds, in documentation order.
    pub const ALL: [DatasetKind; 5] = [
        DatasetKind::Verl,
        DatasetKind::VStar,
        DatasetKind::HrBench,
        DatasetKind::SynthV,
        DatasetKind::Jsonl,
    ];

    /// The name used on the command line and in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Verl => "verl",
            Self::VStar => "vstar",
            Self::HrBench => "hrbench",
            Self::SynthV => "synthv",
            Self::Jsonl => "jsonl",
        }
    }

    /// Guesses the kind from a path: a folder is V*, then by extension (`.parquet`, `.tsv`,
    /// `.jsonl`). SynthV* and generic JSONL share an extension; this returns [`DatasetKind::Jsonl`].
    pub fn detect(path: &Path) -> Option<Self> {
        if path.is_dir() {
            return Some(Self::VStar);
        }
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "parquet" => Some(Self::Verl),
            "tsv" => Some(Self::HrBench),
            "jsonl" => Some(Self::Jsonl),
            _ => None,
        }
    }
}

impl fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DatasetKind {
    type Err = DatasetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "verl" | "parquet" | "deepeyes47k" => Ok(Self::Verl),
            "vstar" => Ok(Self::VStar),
            "hrbench" => Ok(Self::HrBench),
            "synthv" => Ok(Self::SynthV),
            "jsonl" => Ok(Self::Jsonl),
            other => Err(DatasetError::Config(format!(
                "unknown dataset kind `{other}` (expected one of verl, vstar, hrbench, synthv, jsonl)"
            ))),
        }
    }
}

/// A dataset named in a config file: its kind, its path and the loader options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct DatasetSpec {
    /// The format.
    pub kind: DatasetKind,
    /// The file (or the V* folder).
    pub path: PathBuf,
    /// Loader options.
    #[serde(default)]
    pub options: LoadOptions,
}

impl DatasetSpec {
    /// Opens the dataset.
    pub fn open(&self) -> Result<Box<dyn ItemReader>, DatasetError> {
        open(self.kind, &self.path, &self.options)
    }
}

/// Opens `path` as a dataset of `kind`.
pub fn open(
    kind: DatasetKind,
    path: &Path,
    options: &LoadOptions,
) -> Result<Box<dyn ItemReader>, DatasetError> {
    Ok(match kind {
        DatasetKind::Verl => open_verl(path, options)?,
        DatasetKind::VStar => Box::new(VStarReader::open(path, options)?),
        DatasetKind::HrBench => Box::new(HrBenchReader::open(path, options)?),
        DatasetKind::SynthV => Box::new(JsonlReader::open(path, JsonlSchema::SynthV, options)?),
        DatasetKind::Jsonl => Box::new(JsonlReader::open(path, JsonlSchema::Generic, options)?),
    })
}

#[cfg(feature = "parquet")]
fn open_verl(path: &Path, options: &LoadOptions) -> Result<Box<dyn ItemReader>, DatasetError> {
    Ok(Box::new(VerlParquetReader::open(path, options)?))
}

#[cfg(not(feature = "parquet"))]
fn open_verl(_path: &Path, _options: &LoadOptions) -> Result<Box<dyn ItemReader>, DatasetError> {
    Err(DatasetError::Config(
        "this build has no parquet support (deepeyes-core's `parquet` feature; scripts/demo.sh \
         builds the CLI without it): build the full CLI with `cargo build --release -p \
         deepeyes-cli`"
            .into(),
    ))
}

/// Shared bookkeeping of the readers: counts what passes through and stops after a fatal error.
#[derive(Debug)]
pub(crate) struct Tally {
    summary: Summary,
    keep: usize,
    finished: bool,
}

impl Tally {
    pub(crate) fn new(options: &LoadOptions) -> Self {
        Self {
            summary: Summary::default(),
            keep: options.keep_bad_rows,
            finished: false,
        }
    }

    pub(crate) fn summary(&self) -> &Summary {
        &self.summary
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// Records `next` and passes it on.
    pub(crate) fn track(
        &mut self,
        next: Option<Result<Item, ReadError>>,
    ) -> Option<Result<Item, ReadError>> {
        if self.finished {
            return None;
        }
        match &next {
            None => self.finished = true,
            Some(Ok(_)) => self.summary.record_item(),
            Some(Err(ReadError::Skipped(bad))) => {
                tracing::debug!("skipping {bad}");
                self.summary.record_bad(bad, self.keep);
            }
            Some(Err(ReadError::Fatal(e))) => {
                self.summary.stopped = Some(e.to_string());
                self.finished = true;
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_reject_unknown_keys_and_accept_partial_ones() {
        let err = toml::from_str::<LoadOptions>("batch-rows = 4\nbatch-size = 3\n").unwrap_err();
        assert!(err.to_string().contains("batch-size"), "{err}");
        let opts: LoadOptions = toml::from_str("image-check = \"decode\"\n").unwrap();
        assert_eq!(opts.image_check, ImageCheck::Decode);
        assert_eq!(opts.batch_rows, LoadOptions::default().batch_rows);
        let opts = LoadOptions {
            batch_rows: 0,
            ..LoadOptions::default()
        };
        assert!(opts.validate().is_err());
    }

    #[test]
    fn spec_rejects_unknown_keys() {
        let spec: DatasetSpec = toml::from_str("kind = \"hrbench\"\npath = \"h.tsv\"\n").unwrap();
        assert_eq!(spec.kind, DatasetKind::HrBench);
        let err = toml::from_str::<DatasetSpec>("kind = \"vstar\"\npath = \"v\"\nsplit = 1\n")
            .unwrap_err();
        assert!(err.to_string().contains("split"), "{err}");
        let spec: DatasetSpec =
            toml::from_str("kind = \"deepeyes47k\"\npath = \"d.parquet\"\n").unwrap();
        assert_eq!(spec.kind, DatasetKind::Verl);
    }

    #[test]
    fn kind_names_round_trip() {
        for kind in DatasetKind::ALL {
            assert_eq!(kind.as_str().parse::<DatasetKind>().unwrap(), kind);
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
        let err = "csv".parse::<DatasetKind>().unwrap_err();
        assert!(err.to_string().contains("csv"), "{err}");
        assert_eq!(
            DatasetKind::detect(Path::new("x/hr_bench_8k.tsv")),
            Some(DatasetKind::HrBench)
        );
        assert_eq!(
            DatasetKind::detect(Path::new("d.PARQUET")),
            Some(DatasetKind::Verl)
        );
        assert_eq!(DatasetKind::detect(Path::new("notes.txt")), None);
    }
}
