//! HR-Bench 4K/8K: a TSV file with a header, one question per row, the image in base64.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Map, Value};

use super::item::{Item, Position, letter_index};
use super::report::{BadRow, DatasetError, ReadError, SkipReason, Summary};
use super::text::{Line, LineReader, split_tsv};
use super::{ItemReader, LoadOptions, Tally};

/// Where the columns the loader uses are; every other column goes to [`Item::extra`].
#[derive(Debug)]
struct Columns {
    names: Vec<String>,
    question: usize,
    answer: usize,
    image: usize,
    index: Option<usize>,
    category: Option<usize>,
    /// `A`, `B`, … in letter order.
    options: Vec<usize>,
}

impl Columns {
    fn from_header(path: &Path, names: Vec<String>) -> Result<Self, DatasetError> {
        let find = |name: &str| names.iter().position(|n| n == name);
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return Err(DatasetError::format(
                    path,
                    format!("the header names column `{name}` twice"),
                ));
            }
        }
        let missing: Vec<&str> = ["question", "answer", "image"]
            .into_iter()
            .filter(|c| find(c).is_none())
            .collect();
        if !missing.is_empty() {
            return Err(DatasetError::format(
                path,
                format!(
                    "not an HR-Bench TSV: the header has no column {} (columns: {})",
                    missing
                        .iter()
                        .map(|c| format!("`{c}`"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    names.join(", ")
                ),
            ));
        }
        let options: Vec<usize> = (b'A'..=b'Z')
            .map(|l| find(&char::from(l).to_string()))
            .take_while(Option::is_some)
            .flatten()
            .collect();
        if options.len() < 2 {
            return Err(DatasetError::format(
                path,
                format!(
                    "not an HR-Bench TSV: expected option columns `A`, `B`, … (columns: {})",
                    names.join(", ")
                ),
            ));
        }
        Ok(Self {
            question: find("question").unwrap_or_default(),
            answer: find("answer").unwrap_or_default(),
            image: find("image").unwrap_or_default(),
            index: find("index"),
            category: find("category"),
            options,
            names,
        })
    }
}

/// A record's position and its fields, not yet interpreted.
type RawRecord = (Position, Vec<Vec<u8>>);

/// Reads an HR-Bench TSV (`hr_bench_4k.tsv`, `hr_bench_8k.tsv`) a row at a time.
///
/// Required columns: `question`, `answer` (a letter), `image` (base64) and option columns `A`,
/// `B`, … (HR-Bench has `A`–`D`); optional: `index` (the id), `category` (`single`/`cross`).
/// Other columns (such as `cycle_category`) are kept in [`Item::extra`] as text. Fields may be
/// quoted the way pandas writes them. Items have `data_source = "hrbench"` and ids
/// `<file stem>/<index>`.
#[derive(Debug)]
pub struct HrBenchReader {
    path: PathBuf,
    stem: String,
    lines: LineReader<BufReader<File>>,
    columns: Columns,
    options: LoadOptions,
    tally: Tally,
    row: u64,
    line: Vec<u8>,
    record: Vec<u8>,
}

impl HrBenchReader {
    /// Opens `path` and reads its header.
    pub fn open(path: &Path, options: &LoadOptions) -> Result<Self, DatasetError> {
        options.validate()?;
        let file = File::open(path).map_err(|e| DatasetError::io(path, e))?;
        let mut lines = LineReader::new(BufReader::new(file), options.max_row_bytes);
        let mut buf = Vec::new();
        let header = loop {
            match lines
                .next_line(&mut buf)
                .map_err(|e| DatasetError::io(path, e))?
            {
                Line::Eof => {
                    return Err(DatasetError::format(path, "empty file: no TSV header"));
                }
                Line::TooLong { start, len } => {
                    return Err(DatasetError::format(
                        path,
                        format!("line {start}: header of {len} bytes is over max-row-bytes"),
                    ));
                }
                Line::Text { .. } if buf.iter().all(u8::is_ascii_whitespace) => continue,
                Line::Text { start } => {
                    let bytes = buf.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&buf);
                    let fields = split_tsv(bytes).ok_or_else(|| {
                        DatasetError::format(
                            path,
                            format!("line {start}: unclosed quote in header"),
                        )
                    })?;
                    break fields
                        .into_iter()
                        .map(|f| String::from_utf8_lossy(&f).trim().to_string())
                        .collect::<Vec<_>>();
                }
            }
        };
        let columns = Columns::from_header(path, header)?;
        Ok(Self {
            path: path.to_path_buf(),
            stem: path
                .file_stem()
                .map_or_else(|| "hrbench".into(), |s| s.to_string_lossy().into_owned()),
            lines,
            columns,
            options: options.clone(),
            tally: Tally::new(options),
            row: 0,
            line: Vec::new(),
            record: Vec::new(),
        })
    }

    /// The column names of the header.
    pub fn columns(&self) -> &[String] {
        &self.columns.names
    }

    fn fatal(&self, e: std::io::Error) -> ReadError {
        ReadError::Fatal(DatasetError::io(&self.path, e))
    }

    /// Reads the next record into `self.record`; `None` at the end of the file.
    fn next_record(&mut self) -> Option<Result<RawRecord, ReadError>> {
        let start = loop {
            match self.lines.next_line(&mut self.line) {
                Err(e) => return Some(Err(self.fatal(e))),
                Ok(Line::Eof) => return None,
                Ok(Line::TooLong { start, len }) => {
                    let pos = Position::line(&self.path, self.row, start);
                    self.row += 1;
                    return Some(Err(ReadError::Skipped(BadRow::new(
                        pos,
                        SkipReason::Malformed,
                        format!("row of {len} bytes is over max-row-bytes"),
                    ))));
                }
                Ok(Line::Text { .. }) if self.line.iter().all(u8::is_ascii_whitespace) => {}
                Ok(Line::Text { start }) => break start,
            }
        };
        let pos = Position::line(&self.path, self.row, start);
        self.row += 1;
        std::mem::swap(&mut self.record, &mut self.line);
        loop {
            if let Some(fields) = split_tsv(&self.record) {
                return Some(Ok((pos, fields)));
            }
            // A quoted field runs on to the next line.
            match self.lines.next_line(&mut self.line) {
                Err(e) => return Some(Err(self.fatal(e))),
                Ok(Line::Text { .. })
                    if (self.record.len() + 1 + self.line.len()) as u64
                        <= self.options.max_row_bytes =>
                {
                    self.record.push(b'\n');
                    self.record.extend_from_slice(&self.line);
                }
                Ok(Line::Text { .. } | Line::TooLong { .. }) => {
                    // Over the cap: drop this record; the rest of it may be misread as rows,
                    // each of which will be reported.
                    return Some(Err(ReadError::Skipped(BadRow::new(
                        pos,
                        SkipReason::Malformed,
                        "quoted row is over max-row-bytes",
                    ))));
                }
                Ok(Line::Eof) => {
                    return Some(Err(ReadError::Skipped(BadRow::new(
                        pos,
                        SkipReason::Malformed,
                        "a quoted field is never closed before the end of the file",
                    ))));
                }
            }
        }
    }

    fn build(&self, pos: Position, raw: Vec<Vec<u8>>) -> Result<Item, BadRow> {
        let c = &self.columns;
        let bad = |reason, detail: String| BadRow::new(pos.clone(), reason, detail);
        if raw.len() != c.names.len() {
            return Err(bad(
                SkipReason::Malformed,
                format!(
                    "{} fields, but the header has {} columns",
                    raw.len(),
                    c.names.len()
                ),
            ));
        }
        let mut fields = Vec::with_capacity(raw.len());
        for (i, f) in raw.into_iter().enumerate() {
            fields.push(String::from_utf8(f).map_err(|e| {
                bad(
                    SkipReason::Malformed,
                    format!("column `{}` is not UTF-8: {e}", c.names[i]),
                )
            })?);
        }
        let required = |i: usize| {
            let v = fields[i].trim();
            if v.is_empty() {
                Err(bad(
                    SkipReason::MissingField,
                    format!("column `{}` is empty", c.names[i]),
                ))
            } else {
                Ok(v)
            }
        };
        let question = required(c.question)?.to_string();
        let mut options = Vec::new();
        for &col in &c.options {
            let v = &fields[col];
            if v.trim().is_empty() {
                continue;
            }
            if options.len() < c.options.iter().position(|&o| o == col).unwrap_or(0) {
                return Err(bad(
                    SkipReason::InvalidValue,
                    format!(
                        "option column `{}` is filled but an earlier option is empty",
                        c.names[col]
                    ),
                ));
            }
            options.push(v.clone());
        }
        if options.len() < 2 {
            return Err(bad(
                SkipReason::MissingField,
                format!("only {} option column(s) are filled", options.len()),
            ));
        }
        let answer = required(c.answer)?;
        let correct = match answer.chars().collect::<Vec<_>>().as_slice() {
            [letter] => letter_index(*letter).filter(|&i| i < options.len()),
            _ => options.iter().position(|o| o.trim() == answer),
        }
        .ok_or_else(|| {
            bad(
                SkipReason::InvalidValue,
                format!(
                    "column `answer` is `{answer}`, which is neither one of the {} option letters nor an option's text",
                    options.len()
                ),
            )
        })?;
        let image_text = required(c.image)?;
        let bytes = decode_base64(image_text).map_err(|e| {
            bad(
                SkipReason::BadImage,
                format!(
                    "column `image` ({} characters) is not base64: {e}",
                    image_text.len()
                ),
            )
        })?;
        let image = self
            .options
            .image(bytes, format!("{pos} column `image`"))
            .map_err(|e| bad(SkipReason::BadImage, e.to_string()))?;
        let index = c.index.map(|i| fields[i].trim()).filter(|s| !s.is_empty());
        let id = match index {
            Some(index) => format!("{}/{index}", self.stem),
            None => format!("{}/row{}", self.stem, pos.row.unwrap_or_default()),
        };
        let category = c
            .category
            .map(|i| fields[i].trim().to_string())
            .filter(|s| !s.is_empty());
        let mut used = vec![c.question, c.answer, c.image];
        used.extend(c.index);
        used.extend(c.category);
        used.extend(&c.options);
        let extra: Map<String, Value> = fields
            .iter()
            .enumerate()
            .filter(|(i, v)| !used.contains(i) && !v.is_empty())
            .map(|(i, v)| (c.names[i].clone(), Value::String(v.clone())))
            .collect();
        Ok(Item {
            id,
            data_source: "hrbench".into(),
            question,
            answer: options[correct].clone(),
            correct_option: Some(correct),
            options,
            images: vec![image],
            boxes: Vec::new(),
            category,
            prompt: Vec::new(),
            extra,
            position: pos,
        })
    }
}

/// Decodes standard base64, padded or not, ignoring whitespace and a `data:…;base64,` prefix.
pub(crate) fn decode_base64(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let text = match text.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => text,
    };
    if text.bytes().any(|b| b.is_ascii_whitespace()) {
        let compact: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        ENGINE.decode(compact)
    } else {
        ENGINE.decode(text)
    }
}

impl Iterator for HrBenchReader {
    type Item = Result<Item, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.tally.is_finished() {
            return None;
        }
        let next = self.next_record().map(|r| {
            r.and_then(|(pos, fields)| self.build(pos, fields).map_err(ReadError::Skipped))
        });
        self.tally.track(next)
    }
}

impl ItemReader for HrBenchReader {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_variants() {
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("aGk").unwrap(), b"hi");
        assert_eq!(decode_base64("aG\nk=").unwrap(), b"hi");
        assert_eq!(decode_base64("data:image/png;base64,aGk=").unwrap(), b"hi");
        assert!(decode_base64("not base64!").is_err());
    }
}
