//! V* Bench: a folder per category, each holding `<name>.jpg` + `<name>.json` pairs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::fields::{Fields, type_name};
use super::item::{GroundTruthBox, Item, Position};
use super::report::{BadRow, DatasetError, ReadError, SkipReason, Summary};
use super::{ItemReader, LoadOptions, Tally};

const IMAGE_EXTENSIONS: [&str; 4] = ["jpg", "jpeg", "png", "webp"];

/// One annotation/image pair (either side may be missing).
#[derive(Debug, Default)]
struct Entry {
    category: String,
    stem: String,
    json: Option<PathBuf>,
    image: Option<PathBuf>,
}

/// Reads a V* Bench folder (`vstar_bench/`), one item per `.json` annotation.
///
/// The folder holds one sub-folder per category (`direct_attributes`, `relative_position`); a
/// folder with the `.json` files directly in it is read as one category named after the folder.
/// Each annotation has `question`, `options` (the **first** option is the correct one) and
/// optionally `bbox` (a list of `[x, y, w, h]` boxes, converted to `[x1, y1, x2, y2]`) and
/// `target_object` (the boxes' labels); its image is the file with the same name and a `.jpg`,
/// `.jpeg`, `.png` or `.webp` extension. Files are read in name order; ids are
/// `<category>/<name>`, `data_source = "vstar"`.
#[derive(Debug)]
pub struct VStarReader {
    root: PathBuf,
    entries: std::vec::IntoIter<Entry>,
    total: u64,
    options: LoadOptions,
    tally: Tally,
}

impl VStarReader {
    /// Lists the folder (file names only; nothing is read yet).
    pub fn open(root: &Path, options: &LoadOptions) -> Result<Self, DatasetError> {
        options.validate()?;
        if !root.is_dir() {
            let reason = if root.exists() {
                "not a folder (a V* Bench is a folder of category folders)"
            } else {
                "no such folder"
            };
            return Err(DatasetError::format(root, reason));
        }
        let mut entries = Vec::new();
        let mut subdirs = Vec::new();
        for entry in read_dir_sorted(root)? {
            if entry.is_dir() {
                subdirs.push(entry);
            }
        }
        for dir in &subdirs {
            entries.extend(scan(dir)?);
        }
        if !entries.iter().any(|e| e.json.is_some()) {
            entries = scan(root)?;
        }
        if !entries.iter().any(|e| e.json.is_some()) {
            return Err(DatasetError::format(
                root,
                "no V* annotation (.json) files in the folder or its sub-folders",
            ));
        }
        Ok(Self {
            root: root.to_path_buf(),
            total: entries.len() as u64,
            entries: entries.into_iter(),
            options: options.clone(),
            tally: Tally::new(options),
        })
    }

    fn build(&self, entry: Entry) -> Result<Item, BadRow> {
        let Some(json_path) = entry.json else {
            let image = entry.image.unwrap_or_default();
            return Err(BadRow::new(
                Position::file(&image),
                SkipReason::MissingFile,
                format!("image has no annotation `{}.json` next to it", entry.stem),
            ));
        };
        let pos = Position::file(&json_path);
        let bad = |reason, detail: String| BadRow::new(pos.clone(), reason, detail);
        let Some(image_path) = entry.image else {
            return Err(bad(
                SkipReason::MissingFile,
                format!(
                    "no image `{}.{{jpg,jpeg,png,webp}}` next to the annotation",
                    entry.stem
                ),
            ));
        };
        let size = std::fs::metadata(&json_path).map_or(0, |m| m.len());
        if size > self.options.max_row_bytes {
            return Err(bad(
                SkipReason::Malformed,
                format!(
                    "annotation of {size} bytes, over max-row-bytes ({})",
                    self.options.max_row_bytes
                ),
            ));
        }
        let text = std::fs::read(&json_path)
            .map_err(|e| bad(SkipReason::MissingFile, format!("cannot read: {e}")))?;
        let value: Value = serde_json::from_slice(&text)
            .map_err(|e| bad(SkipReason::Malformed, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(bad(
                SkipReason::WrongType,
                format!(
                    "annotation should be a JSON object, got {}",
                    type_name(&value)
                ),
            ));
        };
        let f = Fields::new(&obj, &pos);
        let question = f.req_str("question")?;
        let options = f
            .opt_str_list("options")?
            .ok_or_else(|| f.missing("options"))?;
        if options.len() < 2 {
            return Err(f.invalid(
                "options",
                format!("needs at least 2 options, got {}", options.len()),
            ));
        }
        let labels = f.opt_str_list("target_object")?.unwrap_or_default();
        let mut boxes = Vec::new();
        if let Some(v) = f.get("bbox") {
            let list: Vec<&Value> = match v {
                // A single box written flat.
                Value::Array(items) if items.iter().all(Value::is_number) => vec![v],
                Value::Array(items) => items.iter().collect(),
                other => return Err(f.wrong_type("bbox", "a list of [x, y, w, h] boxes", other)),
            };
            for (i, b) in list.into_iter().enumerate() {
                let key = format!("bbox[{i}]");
                let [x, y, w, h] = f.four_numbers(&key, b)?;
                if w <= 0.0 || h <= 0.0 {
                    return Err(f.invalid(
                        &key,
                        format!("[x, y, w, h] box {:?} has no area", [x, y, w, h]),
                    ));
                }
                boxes.push(GroundTruthBox {
                    bbox: [x, y, x + w, y + h],
                    label: labels.get(i).cloned(),
                    image: 0,
                });
            }
        }
        // Found by listing the folder, so inside it; read under the file-size cap.
        let folder = image_path.parent().unwrap_or_else(|| Path::new("."));
        let name = image_path.file_name().unwrap_or_default().to_string_lossy();
        let image = self
            .options
            .image_file(folder, &name)
            .map_err(|(reason, detail)| bad(reason, detail))?;
        Ok(Item {
            id: format!("{}/{}", entry.category, entry.stem),
            data_source: "vstar".into(),
            question,
            answer: options[0].clone(),
            correct_option: Some(0),
            options,
            images: vec![image],
            boxes,
            category: Some(entry.category),
            prompt: Vec::new(),
            extra: f.rest(&["question", "options", "bbox", "target_object"]),
            position: pos,
        })
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DatasetError::io(dir, e))? {
        let entry = entry.map_err(|e| DatasetError::io(dir, e))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden {
            paths.push(entry.path());
        }
    }
    paths.sort();
    Ok(paths)
}

/// Pairs the annotations and images of one category folder by file stem.
fn scan(dir: &Path) -> Result<Vec<Entry>, DatasetError> {
    let category = dir
        .file_name()
        .map_or_else(|| "vstar".into(), |n| n.to_string_lossy().into_owned());
    let mut by_stem: BTreeMap<String, Entry> = BTreeMap::new();
    for path in read_dir_sorted(dir)? {
        if !path.is_file() {
            continue;
        }
        let (Some(stem), Some(ext)) = (path.file_stem(), path.extension()) else {
            continue;
        };
        let ext = ext.to_string_lossy().to_ascii_lowercase();
        let stem = stem.to_string_lossy().into_owned();
        let is_json = ext == "json";
        if !is_json && !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            continue;
        }
        let entry = by_stem.entry(stem.clone()).or_insert_with(|| Entry {
            category: category.clone(),
            stem,
            ..Entry::default()
        });
        if is_json {
            entry.json = Some(path);
        } else if entry.image.is_none() {
            entry.image = Some(path);
        }
    }
    Ok(by_stem.into_values().collect())
}

impl Iterator for VStarReader {
    type Item = Result<Item, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.tally.is_finished() {
            return None;
        }
        let next = self
            .entries
            .next()
            .map(|entry| self.build(entry).map_err(ReadError::Skipped));
        self.tally.track(next)
    }
}

impl ItemReader for VStarReader {
    fn summary(&self) -> &Summary {
        self.tally.summary()
    }

    fn len_hint(&self) -> Option<u64> {
        Some(self.total)
    }

    fn source(&self) -> &Path {
        &self.root
    }
}
