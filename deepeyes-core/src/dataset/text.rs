//! Reading text datasets a line (JSONL) or a record (TSV) at a time, with a cap on the length.

use std::io::{self, BufRead};

/// What one call of [`LineReader::next_line`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// End of input.
    Eof,
    /// A line (in the caller's buffer, without the `\n` / `\r\n`), starting on `start`.
    Text {
        /// 1-based line number.
        start: u64,
    },
    /// A line longer than the cap; it was consumed without being kept.
    TooLong {
        /// 1-based line number.
        start: u64,
        /// Its length in bytes.
        len: u64,
    },
}

/// Reads lines of at most `max` bytes, counting line numbers.
#[derive(Debug)]
pub(crate) struct LineReader<R> {
    inner: R,
    lines: u64,
    max: u64,
}

impl<R: BufRead> LineReader<R> {
    pub(crate) fn new(inner: R, max: u64) -> Self {
        Self {
            inner,
            lines: 0,
            max,
        }
    }

    /// Reads the next line into `buf` (cleared first).
    pub(crate) fn next_line(&mut self, buf: &mut Vec<u8>) -> io::Result<Line> {
        buf.clear();
        let mut len: u64 = 0;
        let mut any = false;
        loop {
            let available = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                break;
            }
            any = true;
            let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], true),
                None => (available, false),
            };
            let chunk_len = chunk.len();
            len += chunk_len as u64;
            if len <= self.max {
                buf.extend_from_slice(chunk);
            } else if !buf.is_empty() {
                // Over the cap: drop what was kept so far, keep counting.
                buf.clear();
                buf.shrink_to(64 * 1024);
            }
            self.inner.consume(chunk_len + usize::from(done));
            if done {
                break;
            }
        }
        if !any {
            return Ok(Line::Eof);
        }
        self.lines += 1;
        if len > self.max {
            return Ok(Line::TooLong {
                start: self.lines,
                len,
            });
        }
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        Ok(Line::Text { start: self.lines })
    }
}

/// Splits one TSV record into fields. A field that starts with `"` is quoted: it ends at the
/// next lone `"`, may hold tabs and newlines, and `""` inside stands for `"` (pandas'
/// `QUOTE_MINIMAL`). Returns `None` when a quoted field is still open at the end of `record`
/// (the record continues on the next line).
pub(crate) fn split_tsv(record: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut fields = Vec::new();
    let mut i = 0;
    loop {
        let mut field = Vec::new();
        if record.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match record.get(i) {
                    None => return None,
                    Some(b'"') if record.get(i + 1) == Some(&b'"') => {
                        field.push(b'"');
                        i += 2;
                    }
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(&b) => {
                        field.push(b);
                        i += 1;
                    }
                }
            }
        }
        // Unquoted text, or anything after a closing quote, up to the next tab.
        while let Some(&b) = record.get(i) {
            if b == b'\t' {
                break;
            }
            field.push(b);
            i += 1;
        }
        fields.push(field);
        if i >= record.len() {
            return Some(fields);
        }
        i += 1; // the tab
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lines(input: &[u8], max: u64) -> Vec<(Line, Vec<u8>)> {
        let mut r = LineReader::new(io::BufReader::with_capacity(4, input), max);
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            let line = r.next_line(&mut buf).unwrap();
            if line == Line::Eof {
                return out;
            }
            out.push((line, buf.clone()));
        }
    }

    #[test]
    fn lines_are_numbered_and_capped() {
        let got = lines(b"ab\r\n\nlong line here\nend", 5);
        assert_eq!(got[0], (Line::Text { start: 1 }, b"ab".to_vec()));
        assert_eq!(got[1], (Line::Text { start: 2 }, b"".to_vec()));
        assert_eq!(got[2].0, Line::TooLong { start: 3, len: 14 });
        assert_eq!(got[3], (Line::Text { start: 4 }, b"end".to_vec()));
        assert_eq!(got.len(), 4);
        assert!(lines(b"", 5).is_empty());
    }

    #[test]
    fn tsv_quoting() {
        let f = split_tsv(b"a\t\"b\tc\"\t\"say \"\"hi\"\"\"\t").unwrap();
        assert_eq!(
            f,
            vec![
                b"a".to_vec(),
                b"b\tc".to_vec(),
                b"say \"hi\"".to_vec(),
                vec![]
            ]
        );
        assert_eq!(split_tsv(b"x\t\"open\nstill"), None);
        assert_eq!(
            split_tsv(b"x\t\"two\nlines\"").unwrap()[1],
            b"two\nlines".to_vec()
        );
        assert_eq!(split_tsv(b"").unwrap(), vec![Vec::<u8>::new()]);
    }

    fn quote(field: &str) -> String {
        if field.contains(['\t', '\n', '"']) {
            format!("\"{}\"", field.replace('"', "\"\""))
        } else {
            field.to_string()
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn tsv_round_trips_pandas_style_quoting(fields in prop::collection::vec("[a-z\t\n\" ]{0,8}", 1..6)) {
            let record: Vec<String> = fields.iter().map(|f| quote(f)).collect();
            let got = split_tsv(record.join("\t").as_bytes()).unwrap();
            let want: Vec<Vec<u8>> = fields.iter().map(|f| f.as_bytes().to_vec()).collect();
            prop_assert_eq!(got, want);
        }
    }
}
