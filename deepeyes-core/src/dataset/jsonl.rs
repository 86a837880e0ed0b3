//! SynthV* and generic JSONL: one JSON object per line, images as paths next to the file.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fields::{Fields, type_name};
use super::item::{Item, ItemImage, Position, letter_index, option_letter};
use super::report::{BadRow, DatasetError, ReadError, SkipReason, Summary};
use super::text::{Line, LineReader};
use super::{ItemReader, LoadOptions, Tally};

/// Fields the loader interprets; all others go to [`Item::extra`].
const KNOWN: [&str; 11] = [
    "id",
    "image",
    "images",
    "question",
    "options",
    "answer",
    "answer_index",
    "bbox",
    "bboxes",
    "category",
    "data_source",
];

/// How strict a JSONL file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JsonlSchema {
    /// The SynthV* index: `options` and a target box (`bbox`) are required, every box must lie
    /// inside its image, and `data_source` defaults to `"synthv"`.
    SynthV,
    /// Any dataset in the same schema: options and boxes are optional, and `data_source`
    /// defaults to `"jsonl"`.
    Generic,
}

/// Reads a JSONL dataset a line at a time.
///
/// Each line is an object with `question` (required), `image` (a path) or `images` (a list of
/// paths), relative to the JSONL file's folder, `options` (a list of strings), `answer` (an
/// option's text or letter, or the free-form answer), `answer_index` (0-based, optional, wins
/// over `answer`), `bbox` (`[x1, y1, x2, y2]` in pixels of the first image) or `bboxes` (a list
/// of them), `category`, `data_source` and `id` (the id defaults to `<file stem>/<row>`).
/// Other fields are kept in [`Item::extra`]. Blank lines are ignored.
#[derive(Debug)]
pub struct JsonlReader {
    path: PathBuf,
    dir: PathBuf,
    stem: String,
    schema: JsonlSchema,
    lines: LineReader<BufReader<File>>,
    options: LoadOptions,
    tally: Tally,
    row: u64,
    buf: Vec<u8>,
}

impl JsonlReader {
    /// Opens `path`.
    pub fn open(
        path: &Path,
        schema: JsonlSchema,
        options: &LoadOptions,
    ) -> Result<Self, DatasetError> {
        options.validate()?;
        let file = File::open(path).map_err(|e| DatasetError::io(path, e))?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(DatasetError::format(path, "is a folder, not a JSONL file"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            stem: path
                .file_stem()
                .map_or_else(|| "jsonl".into(), |s| s.to_string_lossy().into_owned()),
            schema,
            lines: LineReader::new(BufReader::new(file), options.max_row_bytes),
            options: options.clone(),
            tally: Tally::new(options),
            row: 0,
            buf: Vec::new(),
        })
    }

    fn build(&self, pos: Position) -> Result<Item, BadRow> {
        let bad = |reason, detail: String| BadRow::new(pos.clone(), reason, detail);
        let value: Value = serde_json::from_slice(&self.buf)
            .map_err(|e| bad(SkipReason::Malformed, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(bad(
                SkipReason::WrongType,
                format!("row should be a JSON object, got {}", type_name(&value)),
            ));
        };
        let f = Fields::new(&obj, &pos);
        let question = f.req_str("question")?;

        let paths = match (f.get("image"), f.get("images")) {
            (Some(_), Some(_)) => {
                return Err(f.invalid("images", "give `image` or `images`, not both"));
            }
            (Some(_), None) => vec![f.req_str("image")?],
            (None, Some(_)) => {
                let list = f.opt_str_list("images")?.unwrap_or_default();
                if list.is_empty() {
                    return Err(f.missing("images"));
                }
                list
            }
            (None, None) => return Err(f.missing("image")),
        };
        let mut images = Vec::with_capacity(paths.len());
        for p in &paths {
            let image = self
                .options
                .image_file(&self.dir, p)
                .map_err(|(reason, detail)| bad(reason, detail))?;
            images.push(image);
        }

        let options = f.opt_str_list("options")?.unwrap_or_default();
        if options.is_empty() && self.schema == JsonlSchema::SynthV {
            return Err(f.missing("options"));
        }
        if options.len() == 1 {
            return Err(f.invalid("options", "a multiple-choice item needs at least 2 options"));
        }
        let (answer, correct_option) = answer_of(&f, &options)?;

        let boxes = f.boxes()?;
        if self.schema == JsonlSchema::SynthV {
            if boxes.is_empty() {
                return Err(f.missing("bbox"));
            }
            check_inside(&f, &boxes, &images[0])?;
        }
        let id = match f.opt_text("id")? {
            Some(id) => id,
            None => format!("{}/{}", self.stem, pos.row.unwrap_or_default()),
        };
        let data_source = f.opt_str("data_source")?.unwrap_or_else(|| {
            match self.schema {
                JsonlSchema::SynthV => "synthv",
                JsonlSchema::Generic => "jsonl",
            }
            .into()
        });
        Ok(Item {
            id,
            data_source,
            question,
            options,
            correct_option,
            answer,
            images,
            boxes,
            category: f.opt_str("category")?,
            prompt: Vec::new(),
            extra: f.rest(&KNOWN),
            position: pos,
        })
    }
}

/// The answer text and correct option index of a row.
fn answer_of(f: &Fields<'_>, options: &[String]) -> Result<(String, Option<usize>), BadRow> {
    let answer = f.opt_text("answer")?;
    if options.is_empty() {
        if f.get("answer_index").is_some() {
            return Err(f.invalid("answer_index", "given without `options`"));
        }
        return Ok((answer.ok_or_else(|| f.missing("answer"))?, None));
    }
    if let Some(v) = f.get("answer_index") {
        let index = v
            .as_u64()
            .ok_or_else(|| f.wrong_type("answer_index", "a non-negative integer", v))?;
        let index = usize::try_from(index)
            .ok()
            .filter(|&i| i < options.len())
            .ok_or_else(|| {
                f.invalid(
                    "answer_index",
                    format!("{index} is out of range for {} options", options.len()),
                )
            })?;
        if let Some(a) = &answer {
            let letter = option_letter(index).map(String::from);
            if a.trim() != options[index].trim() && Some(a.trim().to_string()) != letter {
                return Err(f.invalid(
                    "answer",
                    format!(
                        "`{a}` disagrees with answer_index {index} (`{}`)",
                        options[index]
                    ),
                ));
            }
        }
        return Ok((options[index].clone(), Some(index)));
    }
    let answer = answer.ok_or_else(|| f.missing("answer"))?;
    let wanted = answer.trim();
    // The option's text first, so that an option literally called "A" is not misread.
    let index = options
        .iter()
        .position(|o| o.trim() == wanted)
        .or_else(|| match wanted.chars().collect::<Vec<_>>().as_slice() {
            [letter] => letter_index(*letter).filter(|&i| i < options.len()),
            _ => None,
        })
        .ok_or_else(|| {
            f.invalid(
                "answer",
                format!(
                    "`{answer}` is neither one of the {} options nor their letter",
                    options.len()
                ),
            )
        })?;
    Ok((options[index].clone(), Some(index)))
}

fn check_inside(
    f: &Fields<'_>,
    boxes: &[super::GroundTruthBox],
    image: &ItemImage,
) -> Result<(), BadRow> {
    let (w, h) = (f64::from(image.width()), f64::from(image.height()));
    for b in boxes {
        let [x1, y1, x2, y2] = b.bbox;
        if x1 < 0.0 || y1 < 0.0 || x2 > w || y2 > h {
            return Err(f.invalid(
                "bbox",
                format!(
                    "box {:?} is outside the {}×{} image",
                    b.bbox,
                    image.width(),
                    image.height()
                ),
            ));
        }
    }
    Ok(())
}

impl Iterator for JsonlReader {
    type Item = Result<Item, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.tally.is_finished() {
            return None;
        }
        let next = loop {
            match self.lines.next_line(&mut self.buf) {
                Err(e) => break Some(Err(ReadError::Fatal(DatasetError::io(&self.path, e)))),
                Ok(Line::Eof) => break None,
                Ok(Line::TooLong { start, len }) => {
                    let pos = Position::line(&self.path, self.row, start);
                    self.row += 1;
                    break Some(Err(ReadError::Skipped(BadRow::new(
                        pos,
                        SkipReason::Malformed,
                        format!("line of {len} bytes is over max-row-bytes"),
                    ))));
                }
                Ok(Line::Text { .. }) if self.buf.iter().all(u8::is_ascii_whitespace) => {}
                Ok(Line::Text { start }) => {
                    let pos = Position::line(&self.path, self.row, start);
                    self.row += 1;
                    break Some(self.build(pos).map_err(ReadError::Skipped));
                }
            }
        };
        self.tally.track(next)
    }
}

impl ItemReader for JsonlReader {
    fn summary(&self) -> &Summary {
        self.tally.summary()
    }

    fn len_hint(&self) -> Option<u64> {
        None
    }

    fn source(&self) -> &Path {
        &self.path
    }
}
