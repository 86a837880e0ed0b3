//! DeepEyes-47k / verl parquet: one row per question, images stored as encoded bytes.
//!
//! Reading goes one row group at a time and, inside a row group, `batch-rows` rows at a time;
//! the parquet reader fetches column pages on demand, so memory is a few pages plus one batch,
//! whatever the file size (see `docs/DATASETS.md` for the measurement).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::OffsetBufferBuilder;
use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int8Type, Int16Type, Int32Type, Int64Type, UInt8Type, UInt16Type,
    UInt32Type, UInt64Type,
};
use arrow_array::{
    Array, ArrayRef, BinaryArray, Int64Array, ListArray, RecordBatch, StringArray, StructArray,
};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader,
    ParquetRecordBatchReaderBuilder,
};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde_json::{Map, Number, Value};

use super::fields::Fields as JsonFields;
use super::item::{Item, Position, PromptMessage};
use super::report::{BadRow, DatasetError, ReadError, SkipReason, Summary};
use super::{ItemReader, LoadOptions, Tally};

/// Columns every verl row has; the reader refuses a file without them.
const REQUIRED: [&str; 4] = ["prompt", "images", "data_source", "reward_model"];

/// Reads a verl-format parquet file (the DeepEyes-47k training files) row by row.
///
/// Columns used: `prompt` (list of `{role, content}`), `images` (list of `{bytes, path}`; a row
/// whose `bytes` is null is read from `path`, relative to the parquet file), `data_source`,
/// `reward_model.ground_truth` (the answer; `extra_info.answer` if it is null) and
/// `extra_info.question` (the question; if absent, the last user message without `<image>`
/// markers). Ids are `<file stem>/<extra_info.index>`. Every column other than `prompt`,
/// `images` and `data_source` (`ability`, `env_name`, `reward_model`, `extra_info`, …) is kept
/// in [`Item::extra`] as JSON. A row group whose pages cannot be read is reported as one
/// [`SkipReason::CorruptData`] entry covering its remaining rows, and reading goes on with the
/// next row group.
#[derive(Debug)]
pub struct VerlParquetReader {
    path: PathBuf,
    dir: PathBuf,
    stem: String,
    file: File,
    metadata: ArrowReaderMetadata,
    images_col: usize,
    options: LoadOptions,
    tally: Tally,
    /// The next row group to open.
    next_group: usize,
    current: Option<ParquetRecordBatchReader>,
    batch: Option<RecordBatch>,
    batch_row: usize,
    /// Global index of the next row to yield.
    next_row: u64,
    /// Global index one past the current row group's last row.
    group_end: u64,
    total_rows: u64,
}

impl VerlParquetReader {
    /// Opens `path`, reads its footer and checks the columns.
    pub fn open(path: &Path, options: &LoadOptions) -> Result<Self, DatasetError> {
        options.validate()?;
        let file = File::open(path).map_err(|e| DatasetError::io(path, e))?;
        let metadata = ArrowReaderMetadata::load(&file, ArrowReaderOptions::new())
            .map_err(|e| DatasetError::format(path, format!("not a readable parquet file: {e}")))?;
        let schema = metadata.schema().clone();
        let missing: Vec<&str> = REQUIRED
            .into_iter()
            .filter(|c| schema.index_of(c).is_err())
            .collect();
        if !missing.is_empty() {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(DatasetError::format(
                path,
                format!(
                    "not a verl dataset: no column {} (columns: {})",
                    missing
                        .iter()
                        .map(|c| format!("`{c}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    names.join(", ")
                ),
            ));
        }
        let images_col = schema.index_of("images").unwrap_or_default();
        check_images_type(path, schema.field(images_col).data_type())?;
        let total_rows = metadata
            .metadata()
            .row_groups()
            .iter()
            .map(|g| u64::try_from(g.num_rows()).unwrap_or(0))
            .sum();
        Ok(Self {
            path: path.to_path_buf(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            stem: path
                .file_stem()
                .map_or_else(|| "verl".into(), |s| s.to_string_lossy().into_owned()),
            file,
            metadata,
            images_col,
            options: options.clone(),
            tally: Tally::new(options),
            next_group: 0,
            current: None,
            batch: None,
            batch_row: 0,
            next_row: 0,
            group_end: 0,
            total_rows,
        })
    }

    /// The Arrow schema of the file.
    pub fn schema(&self) -> SchemaRef {
        self.metadata.schema().clone()
    }

    /// The number of row groups.
    pub fn row_groups(&self) -> usize {
        self.metadata.metadata().num_row_groups()
    }

    /// Skips the rest of the current row group, reporting its unread rows as corrupt.
    fn abandon_group(&mut self, why: String) -> Option<BadRow> {
        self.current = None;
        self.batch = None;
        let remaining = self.group_end.saturating_sub(self.next_row);
        let first = self.next_row;
        self.next_row = self.group_end;
        (remaining > 0).then(|| BadRow {
            position: Position::row(&self.path, first),
            reason: SkipReason::CorruptData,
            detail: format!(
                "row group {} (rows {first}..{}): {why}; {remaining} rows skipped",
                self.next_group - 1,
                self.group_end
            ),
            rows: remaining,
        })
    }

    fn next_record(&mut self) -> Option<Result<Item, ReadError>> {
        loop {
            if let Some(batch) = &self.batch {
                if self.batch_row < batch.num_rows() {
                    let i = self.batch_row;
                    self.batch_row += 1;
                    let pos = Position::row(&self.path, self.next_row);
                    self.next_row += 1;
                    let item = self.build(batch, i, pos);
                    return Some(item.map_err(ReadError::Skipped));
                }
                self.batch = None;
            }
            if let Some(reader) = &mut self.current {
                match reader.next() {
                    Some(Ok(batch)) => {
                        self.batch = Some(batch);
                        self.batch_row = 0;
                    }
                    Some(Err(e)) => {
                        if let Some(bad) = self.abandon_group(format!("cannot be read: {e}")) {
                            return Some(Err(ReadError::Skipped(bad)));
                        }
                    }
                    None => {
                        let short = self.next_row < self.group_end;
                        if let Some(bad) = self.abandon_group("ended early".into()) {
                            debug_assert!(short);
                            return Some(Err(ReadError::Skipped(bad)));
                        }
                    }
                }
                continue;
            }
            // Open the next row group.
            let groups = self.metadata.metadata().row_groups();
            let g = self.next_group;
            let group = groups.get(g)?;
            self.next_group += 1;
            self.group_end = self.next_row + u64::try_from(group.num_rows()).unwrap_or(0);
            let reader = self
                .file
                .try_clone()
                .map_err(|e| e.to_string())
                .and_then(|file| {
                    ParquetRecordBatchReaderBuilder::new_with_metadata(file, self.metadata.clone())
                        .with_batch_size(self.options.batch_rows)
                        .with_row_groups(vec![g])
                        .build()
                        .map_err(|e| e.to_string())
                });
            match reader {
                Ok(reader) => self.current = Some(reader),
                Err(e) => {
                    if let Some(bad) = self.abandon_group(format!("cannot be opened: {e}")) {
                        return Some(Err(ReadError::Skipped(bad)));
                    }
                }
            }
        }
    }

    fn build(&self, batch: &RecordBatch, i: usize, pos: Position) -> Result<Item, BadRow> {
        let bad = |reason, detail: String| BadRow::new(pos.clone(), reason, detail);
        // Every column but the images, as JSON.
        let mut obj = Map::new();
        for (c, field) in batch.schema().fields().iter().enumerate() {
            if c != self.images_col {
                obj.insert(field.name().clone(), to_json(batch.column(c).as_ref(), i));
            }
        }
        let f = JsonFields::new(&obj, &pos);
        let data_source = f.req_str("data_source")?;
        let prompt = prompt_of(&f)?;
        let reward = f.object("reward_model", "reward_model.")?;
        let extra_info = f.object("extra_info", "extra_info.")?;
        let answer = match &reward {
            Some(r) => r.opt_text("ground_truth")?,
            None => None,
        };
        let answer = match (answer, &extra_info) {
            (Some(a), _) => a,
            (None, Some(e)) => e.opt_text("answer")?.ok_or_else(|| {
                f.bad(
                    SkipReason::MissingField,
                    "field `reward_model.ground_truth` is missing (and so is `extra_info.answer`)",
                )
            })?,
            (None, None) => {
                return Err(f.bad(
                    SkipReason::MissingField,
                    "field `reward_model.ground_truth` is missing",
                ));
            }
        };
        let question = match &extra_info {
            Some(e) => e.opt_str("question")?,
            None => None,
        };
        let question = match question {
            Some(q) => q,
            None => question_from_prompt(&prompt).ok_or_else(|| {
                f.bad(
                    SkipReason::MissingField,
                    "field `extra_info.question` is missing and the prompt has no user text",
                )
            })?,
        };
        let index = match &extra_info {
            Some(e) => e.opt_text("index")?,
            None => None,
        };
        let id = match index {
            Some(index) => format!("{}/{index}", self.stem),
            None => format!("{}/row{}", self.stem, pos.row.unwrap_or_default()),
        };

        let raw = images_at(batch.column(self.images_col).as_ref(), i)
            .map_err(|e| bad(SkipReason::WrongType, format!("field `images`: {e}")))?;
        if raw.is_empty() {
            return Err(bad(
                SkipReason::MissingField,
                "field `images` is missing or empty".into(),
            ));
        }
        let mut images = Vec::with_capacity(raw.len());
        for (j, (bytes, path)) in raw.into_iter().enumerate() {
            let image = match (bytes, path) {
                (Some(bytes), _) => self
                    .options
                    .image(bytes, format!("{pos} image {j}"))
                    .map_err(|e| bad(SkipReason::BadImage, e.to_string()))?,
                (None, Some(p)) => {
                    self.options
                        .image_file(&self.dir, &p)
                        .map_err(|(reason, detail)| {
                            bad(reason, format!("`images[{j}].path`: {detail}"))
                        })?
                }
                (None, None) => {
                    return Err(bad(
                        SkipReason::MissingField,
                        format!("`images[{j}]` has neither bytes nor a path"),
                    ));
                }
            };
            images.push(image);
        }
        obj.remove("prompt");
        obj.remove("data_source");
        Ok(Item {
            id,
            data_source,
            question,
            options: Vec::new(),
            correct_option: None,
            answer,
            images,
            boxes: Vec::new(),
            category: None,
            prompt,
            extra: obj,
            position: pos,
        })
    }
}

fn prompt_of(f: &JsonFields<'_>) -> Result<Vec<PromptMessage>, BadRow> {
    let Some(v) = f.get("prompt") else {
        return Err(f.missing("prompt"));
    };
    let Value::Array(messages) = v else {
        return Err(f.wrong_type("prompt", "a list of {role, content} messages", v));
    };
    if messages.is_empty() {
        return Err(f.bad(SkipReason::MissingField, "field `prompt` is empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(k, m)| {
            let (Some(role), Some(content)) = (
                m.get("role").and_then(Value::as_str),
                m.get("content").and_then(Value::as_str),
            ) else {
                return Err(f.wrong_type(
                    &format!("prompt[{k}]"),
                    "a {role, content} message with text",
                    m,
                ));
            };
            Ok(PromptMessage {
                role: role.to_string(),
                content: content.to_string(),
            })
        })
        .collect()
}

/// The last user message without its `<image>` markers.
fn question_from_prompt(prompt: &[PromptMessage]) -> Option<String> {
    let user = prompt.iter().rev().find(|m| m.role == "user")?;
    let text = user.content.replace("<image>", "");
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

fn check_images_type(path: &Path, dt: &DataType) -> Result<(), DatasetError> {
    let element = match dt {
        DataType::List(f) | DataType::LargeList(f) => f.data_type(),
        _ => {
            return Err(DatasetError::format(
                path,
                format!("column `images` has type {dt}; expected a list of {{bytes, path}}"),
            ));
        }
    };
    let ok = match element {
        DataType::Struct(fields) => fields.iter().any(|f| {
            f.name() == "bytes"
                && matches!(
                    f.data_type(),
                    DataType::Binary | DataType::LargeBinary | DataType::BinaryView
                )
        }),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => true,
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(DatasetError::format(
            path,
            format!(
                "column `images` has type {dt}; expected a list of {{bytes: binary, path: string}}"
            ),
        ))
    }
}

/// One encoded image: its bytes (if stored) and its path (if any).
type RawImage = (Option<Vec<u8>>, Option<String>);

/// The `(bytes, path)` pairs of row `i` of the `images` column.
fn images_at(col: &dyn Array, i: usize) -> Result<Vec<RawImage>, String> {
    if col.is_null(i) {
        return Ok(Vec::new());
    }
    let values: ArrayRef = if let Some(list) = col.as_list_opt::<i32>() {
        list.value(i)
    } else if let Some(list) = col.as_list_opt::<i64>() {
        list.value(i)
    } else {
        return Err(format!("unexpected type {}", col.data_type()));
    };
    let n = values.len();
    if let Some(s) = values.as_struct_opt() {
        let bytes = s.column_by_name("bytes");
        let path = s.column_by_name("path");
        (0..n)
            .map(|j| {
                if s.is_null(j) {
                    return Ok((None, None));
                }
                let b = match bytes {
                    Some(b) => binary_at(b.as_ref(), j)?,
                    None => None,
                };
                let p = match path {
                    Some(p) => string_at(p.as_ref(), j)?,
                    None => None,
                };
                Ok((b, p))
            })
            .collect()
    } else {
        (0..n)
            .map(|j| Ok((binary_at(values.as_ref(), j)?, None)))
            .collect()
    }
}

fn binary_at(a: &dyn Array, j: usize) -> Result<Option<Vec<u8>>, String> {
    if a.is_null(j) {
        return Ok(None);
    }
    let v = if let Some(b) = a.as_binary_opt::<i32>() {
        b.value(j)
    } else if let Some(b) = a.as_binary_opt::<i64>() {
        b.value(j)
    } else if let Some(b) = a.as_binary_view_opt() {
        b.value(j)
    } else {
        return Err(format!("image bytes have type {}", a.data_type()));
    };
    Ok(Some(v.to_vec()))
}

fn string_at(a: &dyn Array, j: usize) -> Result<Option<String>, String> {
    if a.is_null(j) {
        return Ok(None);
    }
    let v = if let Some(s) = a.as_string_opt::<i32>() {
        s.value(j)
    } else if let Some(s) = a.as_string_opt::<i64>() {
        s.value(j)
    } else if let Some(s) = a.as_string_view_opt() {
        s.value(j)
    } else {
        return Err(format!("image path has type {}", a.data_type()));
    };
    Ok((!v.is_empty()).then(|| v.to_string()))
}

fn float(x: f64) -> Value {
    Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// Row `i` of `a` as JSON. Binary values become `{"binary_bytes": n}`; types with no JSON
/// counterpart (dates, decimals, …) become a string naming the type.
fn to_json(a: &dyn Array, i: usize) -> Value {
    if a.is_null(i) {
        return Value::Null;
    }
    macro_rules! prim {
        ($t:ty) => {
            Value::from(a.as_primitive::<$t>().value(i))
        };
    }
    match a.data_type() {
        DataType::Null => Value::Null,
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => prim!(Int8Type),
        DataType::Int16 => prim!(Int16Type),
        DataType::Int32 => prim!(Int32Type),
        DataType::Int64 => prim!(Int64Type),
        DataType::UInt8 => prim!(UInt8Type),
        DataType::UInt16 => prim!(UInt16Type),
        DataType::UInt32 => prim!(UInt32Type),
        DataType::UInt64 => prim!(UInt64Type),
        DataType::Float32 => float(f64::from(a.as_primitive::<Float32Type>().value(i))),
        DataType::Float64 => float(a.as_primitive::<Float64Type>().value(i)),
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => {
            let n = binary_at(a, i).ok().flatten().map_or(0, |b| b.len());
            serde_json::json!({ "binary_bytes": n })
        }
        DataType::List(_) => list_json(a.as_list::<i32>().value(i).as_ref()),
        DataType::LargeList(_) => list_json(a.as_list::<i64>().value(i).as_ref()),
        DataType::FixedSizeList(..) => list_json(a.as_fixed_size_list().value(i).as_ref()),
        DataType::Struct(fields) => {
            let s = a.as_struct();
            Value::Object(
                fields
                    .iter()
                    .zip(s.columns())
                    .map(|(f, c)| (f.name().clone(), to_json(c.as_ref(), i)))
                    .collect(),
            )
        }
        DataType::Map(..) => {
            let entries = a.as_map().value(i);
            let (keys, values) = (entries.column(0), entries.column(1));
            let mut obj = Map::new();
            for j in 0..entries.len() {
                let key = match to_json(keys.as_ref(), j) {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                obj.insert(key, to_json(values.as_ref(), j));
            }
            Value::Object(obj)
        }
        DataType::Dictionary(..) => match a.as_any_dictionary_opt() {
            Some(d) => {
                let key = d.normalized_keys()[i];
                to_json(d.values().as_ref(), key)
            }
            None => Value::Null,
        },
        other => Value::String(format!("<{other} value>")),
    }
}

fn list_json(values: &dyn Array) -> Value {
    Value::Array((0..values.len()).map(|j| to_json(values, j)).collect())
}

impl Iterator for VerlParquetReader {
    type Item = Result<Item, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.tally.is_finished() {
            return None;
        }
        let next = self.next_record();
        self.tally.track(next)
    }
}

impl ItemReader for VerlParquetReader {
    fn summary(&self) -> &Summary {
        self.tally.summary()
    }

    fn len_hint(&self) -> Option<u64> {
        Some(self.total_rows)
    }

    fn source(&self) -> &Path {
        &self.path
    }
}

/// One row to write in the verl format.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerlRow {
    /// `data_source` (`vstar`, `chart`, `thinklite_eureka`, `synthv`, …).
    pub data_source: String,
    /// `prompt`: the chat messages, with `<image>` markers in the user text.
    pub prompt: Vec<PromptMessage>,
    /// `images[*].bytes`: encoded images (PNG, JPEG, …), stored as they are.
    pub images: Vec<Vec<u8>>,
    /// `ability`.
    pub ability: String,
    /// `env_name` (`visual_toolbox_v2` for tool rows).
    pub env_name: String,
    /// `reward_model.style` (`model` in DeepEyes-47k).
    pub reward_style: String,
    /// `reward_model.ground_truth`.
    pub ground_truth: String,
    /// `extra_info.split`.
    pub split: String,
    /// `extra_info.index`.
    pub index: i64,
    /// `extra_info.answer`.
    pub answer: String,
    /// `extra_info.question`.
    pub question: String,
}

/// How [`VerlParquetWriter`] lays out the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerlWriterConfig {
    /// Rows per row group (what a reader holds at most per column chunk).
    pub row_group_rows: usize,
    /// Zstd compression (level 3) instead of Snappy.
    pub zstd: bool,
}

impl Default for VerlWriterConfig {
    fn default() -> Self {
        Self {
            row_group_rows: 256,
            zstd: false,
        }
    }
}

/// Writes rows in the verl parquet layout that [`VerlParquetReader`] (and verl itself) reads.
///
/// Rows are buffered up to one row group and written with [`VerlParquetWriter::write`]; call
/// [`VerlParquetWriter::finish`] to write the footer.
pub struct VerlParquetWriter {
    path: PathBuf,
    writer: ArrowWriter<File>,
    schema: SchemaRef,
    pending: Vec<VerlRow>,
    rows_per_group: usize,
    written: u64,
}

impl std::fmt::Debug for VerlParquetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerlParquetWriter")
            .field("path", &self.path)
            .field("written", &self.written)
            .finish_non_exhaustive()
    }
}

fn string_field(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn message_fields() -> Fields {
    Fields::from(vec![
        string_field("content", true),
        string_field("role", true),
    ])
}

fn image_fields() -> Fields {
    Fields::from(vec![
        Field::new("bytes", DataType::Binary, true),
        string_field("path", true),
    ])
}

fn reward_fields() -> Fields {
    Fields::from(vec![
        string_field("ground_truth", true),
        string_field("style", true),
    ])
}

fn extra_info_fields() -> Fields {
    Fields::from(vec![
        string_field("answer", true),
        Field::new("index", DataType::Int64, true),
        string_field("question", true),
        string_field("split", true),
    ])
}

/// The verl schema: the column order and types of the DeepEyes-47k files.
pub(crate) fn verl_schema() -> SchemaRef {
    let list_of = |fields: Fields| {
        DataType::List(Arc::new(Field::new("item", DataType::Struct(fields), true)))
    };
    Arc::new(Schema::new(vec![
        string_field("data_source", true),
        Field::new("prompt", list_of(message_fields()), true),
        Field::new("images", list_of(image_fields()), true),
        string_field("ability", true),
        string_field("env_name", true),
        Field::new("reward_model", DataType::Struct(reward_fields()), true),
        Field::new("extra_info", DataType::Struct(extra_info_fields()), true),
    ]))
}

impl VerlParquetWriter {
    /// Creates (or truncates) `path`.
    pub fn create(path: &Path, config: VerlWriterConfig) -> Result<Self, DatasetError> {
        if config.row_group_rows == 0 {
            return Err(DatasetError::Config(
                "row_group_rows must be at least 1".into(),
            ));
        }
        let file = File::create(path).map_err(|e| DatasetError::io(path, e))?;
        let compression = if config.zstd {
            Compression::ZSTD(ZstdLevel::try_new(3).unwrap_or_default())
        } else {
            Compression::SNAPPY
        };
        // The page is what a reader holds in memory (compressed and decompressed). Checking the
        // 1 MB page limit every 4 values keeps pages near 1 MB even with large images; with the
        // default check every 1024 values a whole row group's images end up in one page.
        let props = WriterProperties::builder()
            .set_compression(compression)
            .set_max_row_group_size(config.row_group_rows)
            .set_write_batch_size(4)
            .build();
        let schema = verl_schema();
        let writer = ArrowWriter::try_new(file, schema.clone(), Some(props))
            .map_err(|e| DatasetError::format(path, format!("cannot start parquet: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            writer,
            schema,
            pending: Vec::new(),
            rows_per_group: config.row_group_rows,
            written: 0,
        })
    }

    /// Adds a row; a full row group is written out.
    pub fn write(&mut self, row: VerlRow) -> Result<(), DatasetError> {
        self.pending.push(row);
        if self.pending.len() >= self.rows_per_group {
            self.flush_pending()?;
        }
        Ok(())
    }

    fn flush_pending(&mut self) -> Result<(), DatasetError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.pending);
        let batch = rows_to_batch(self.schema.clone(), &rows)
            .map_err(|e| DatasetError::format(&self.path, format!("cannot build rows: {e}")))?;
        let fail = |e: parquet::errors::ParquetError| {
            DatasetError::format(&self.path, format!("cannot write parquet: {e}"))
        };
        self.writer.write(&batch).map_err(fail)?;
        self.writer.flush().map_err(fail)?;
        self.written += rows.len() as u64;
        Ok(())
    }

    /// Writes the remaining rows and the footer; returns the number of rows written.
    pub fn finish(mut self) -> Result<u64, DatasetError> {
        self.flush_pending()?;
        let path = self.path.clone();
        self.writer
            .close()
            .map_err(|e| DatasetError::format(&path, format!("cannot finish parquet: {e}")))?;
        Ok(self.written)
    }
}

fn rows_to_batch(
    schema: SchemaRef,
    rows: &[VerlRow],
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let strings = |get: &dyn Fn(&VerlRow) -> &str| -> ArrayRef {
        Arc::new(StringArray::from_iter_values(rows.iter().map(get)))
    };
    // prompt: list<struct<content, role>>
    let mut offsets = OffsetBufferBuilder::<i32>::new(rows.len());
    let mut contents = Vec::new();
    let mut roles = Vec::new();
    for r in rows {
        offsets.push_length(r.prompt.len());
        for m in &r.prompt {
            contents.push(m.content.as_str());
            roles.push(m.role.as_str());
        }
    }
    let messages = StructArray::try_new(
        message_fields(),
        vec![
            Arc::new(StringArray::from(contents)) as ArrayRef,
            Arc::new(StringArray::from(roles)),
        ],
        None,
    )?;
    let prompt = ListArray::try_new(
        Arc::new(Field::new("item", DataType::Struct(message_fields()), true)),
        offsets.finish(),
        Arc::new(messages),
        None,
    )?;
    // images: list<struct<bytes, path>>
    let mut offsets = OffsetBufferBuilder::<i32>::new(rows.len());
    let mut blobs: Vec<&[u8]> = Vec::new();
    for r in rows {
        offsets.push_length(r.images.len());
        blobs.extend(r.images.iter().map(Vec::as_slice));
    }
    let paths: Vec<Option<&str>> = vec![None; blobs.len()];
    let images = StructArray::try_new(
        image_fields(),
        vec![
            Arc::new(BinaryArray::from_vec(blobs)) as ArrayRef,
            Arc::new(StringArray::from(paths)),
        ],
        None,
    )?;
    let images = ListArray::try_new(
        Arc::new(Field::new("item", DataType::Struct(image_fields()), true)),
        offsets.finish(),
        Arc::new(images),
        None,
    )?;
    let reward = StructArray::try_new(
        reward_fields(),
        vec![
            strings(&|r| r.ground_truth.as_str()),
            strings(&|r| r.reward_style.as_str()),
        ],
        None,
    )?;
    let extra_info = StructArray::try_new(
        extra_info_fields(),
        vec![
            strings(&|r| r.answer.as_str()),
            Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.index))),
            strings(&|r| r.question.as_str()),
            strings(&|r| r.split.as_str()),
        ],
        None,
    )?;
    RecordBatch::try_new(
        schema,
        vec![
            strings(&|r| r.data_source.as_str()),
            Arc::new(prompt),
            Arc::new(images),
            strings(&|r| r.ability.as_str()),
            strings(&|r| r.env_name.as_str()),
            Arc::new(reward),
            Arc::new(extra_info),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(seed: u8) -> Vec<u8> {
        crate::Image::from_rgb(image::RgbImage::from_pixel(4, 3, image::Rgb([seed, 0, 0])))
            .unwrap()
            .to_png()
            .unwrap()
    }

    fn row(i: i64) -> VerlRow {
        VerlRow {
            data_source: "vstar".into(),
            prompt: vec![
                PromptMessage {
                    role: "system".into(),
                    content: "sys".into(),
                },
                PromptMessage {
                    role: "user".into(),
                    content: format!("<image>\nq{i}?"),
                },
            ],
            images: vec![png(u8::try_from(i).unwrap())],
            ability: "vl".into(),
            env_name: "visual_toolbox_v2".into(),
            reward_style: "model".into(),
            ground_truth: format!("a{i}"),
            split: "train".into(),
            index: i,
            answer: format!("a{i}"),
            question: format!("q{i}?"),
        }
    }

    #[test]
    fn writer_and_reader_round_trip_across_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rt.parquet");
        let mut w = VerlParquetWriter::create(
            &path,
            VerlWriterConfig {
                row_group_rows: 3,
                zstd: true,
            },
        )
        .unwrap();
        for i in 0..7 {
            w.write(row(i)).unwrap();
        }
        assert_eq!(w.finish().unwrap(), 7);
        let opts = LoadOptions {
            batch_rows: 2,
            ..LoadOptions::default()
        };
        let mut r = VerlParquetReader::open(&path, &opts).unwrap();
        assert_eq!(r.row_groups(), 3);
        assert_eq!(r.len_hint(), Some(7));
        let items: Vec<Item> = r.by_ref().map(Result::unwrap).collect();
        assert_eq!(items.len(), 7);
        for (i, item) in items.iter().enumerate() {
            assert_eq!(item.id, format!("rt/{i}"));
            assert_eq!(item.question, format!("q{i}?"));
            assert_eq!(item.answer, format!("a{i}"));
            assert_eq!(item.position, Position::row(&path, i as u64));
            assert_eq!(item.images[0].bytes(), png(i as u8).as_slice());
            assert_eq!(item.extra["env_name"], "visual_toolbox_v2");
            assert_eq!(item.extra["reward_model"]["style"], "model");
            assert_eq!(item.prompt[1].content, format!("<image>\nq{i}?"));
        }
        assert_eq!(r.summary().items, 7);
        assert!(r.summary().completed());
    }

    #[test]
    fn question_falls_back_to_the_user_message() {
        let prompt = vec![
            PromptMessage {
                role: "user".into(),
                content: "<image>\n What is it? ".into(),
            },
            PromptMessage {
                role: "assistant".into(),
                content: "x".into(),
            },
        ];
        assert_eq!(question_from_prompt(&prompt).unwrap(), "What is it?");
        assert_eq!(question_from_prompt(&prompt[1..]), None);
    }
}
