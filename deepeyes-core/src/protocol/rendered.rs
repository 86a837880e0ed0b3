//! Rendered protocol text that remembers which special markers the templates put in it, so that
//! text from outside (a dataset question, a tool's output or error, a tool's signature) is only
//! ever encoded as text: a question that spells `<|image_pad|>` gets the characters of it, never
//! a second image slot.

use std::ops::Range;

use super::{IM_END, IM_START, IMAGE_PAD, VISION_END, VISION_START};
use crate::error::{Error, Result};
use crate::model::TokenCodec;

/// The protocol's special markers: the only special tokens a template may place.
const MARKERS: [&str; 5] = [IM_START, IM_END, VISION_START, IMAGE_PAD, VISION_END];

/// Text rendered from trusted templates and untrusted values, with the byte ranges that came
/// from templates: only there is a special token's spelling a special token.
///
/// ```
/// use deepeyes_core::protocol::{IMAGE_PAD, Rendered};
///
/// let mut prompt = Rendered::trusted(IMAGE_PAD);
/// prompt.push_untrusted(&format!("What does {IMAGE_PAD} mean?"));
/// assert_eq!(prompt.text(), format!("{IMAGE_PAD}What does {IMAGE_PAD} mean?"));
/// assert!(prompt.is_trusted(0) && !prompt.is_trusted(IMAGE_PAD.len()));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rendered {
    text: String,
    /// Sorted, non-overlapping byte ranges of template text.
    trusted: Vec<Range<usize>>,
}

impl Rendered {
    /// Template text: the special tokens it spells are special tokens.
    pub fn trusted(text: &str) -> Self {
        let mut out = Self::default();
        out.push_trusted(text);
        out
    }

    /// Text from outside the templates: encoded as text whatever it spells.
    pub fn untrusted(text: &str) -> Self {
        let mut out = Self::default();
        out.push_untrusted(text);
        out
    }

    /// Appends template text.
    pub fn push_trusted(&mut self, text: &str) {
        let range = self.text.len()..self.text.len() + text.len();
        self.text.push_str(text);
        self.mark(range);
    }

    /// Appends text from outside the templates.
    pub fn push_untrusted(&mut self, text: &str) {
        self.text.push_str(text);
    }

    /// Appends another rendering, keeping what of it is template text.
    pub fn push(&mut self, other: &Rendered) {
        let base = self.text.len();
        self.text.push_str(&other.text);
        for r in &other.trusted {
            self.mark(r.start + base..r.end + base);
        }
    }

    /// Records `range` (at the end of the text) as template text, merging with a touching one.
    fn mark(&mut self, range: Range<usize>) {
        if range.is_empty() {
            return;
        }
        match self.trusted.last_mut() {
            Some(last) if last.end == range.start => last.end = range.end,
            _ => self.trusted.push(range),
        }
    }

    /// `template` with each `{name}` of `values` replaced by its rendering; the template's own
    /// text is trusted.
    pub fn fill(template: &str, values: &[(&str, &Rendered)]) -> Self {
        let mut out = Self::default();
        let mut rest = template;
        'scan: while !rest.is_empty() {
            for (i, _) in rest.match_indices('{') {
                let key = &rest[i + 1..];
                for (name, value) in values {
                    if key.strip_prefix(name).is_some_and(|k| k.starts_with('}')) {
                        out.push_trusted(&rest[..i]);
                        out.push(value);
                        rest = &rest[i + name.len() + 2..];
                        continue 'scan;
                    }
                }
            }
            out.push_trusted(rest);
            break;
        }
        out
    }

    /// The text.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The text, owned.
    pub fn into_text(self) -> String {
        self.text
    }

    /// Whether the byte at `at` came from a template.
    pub fn is_trusted(&self, at: usize) -> bool {
        self.trusted.iter().any(|r| r.contains(&at))
    }

    /// The token ids: every special token spelled inside template text as its one id, every
    /// stretch between them (template and outside text alike) as plain text. For outside text
    /// that spells no special token this is exactly `codec.encode(self.text())`, since special
    /// tokens split the text there anyway.
    pub fn encode(&self, codec: &dyn TokenCodec) -> Result<Vec<u32>> {
        let mut specials = codec.special_tokens();
        specials.extend(MARKERS.iter().map(|m| (*m).to_string()));
        // Longest first, as a tokenizer's added-token matcher prefers.
        specials.sort_by_key(|s| std::cmp::Reverse(s.len()));
        specials.dedup();
        let mut ids = Vec::new();
        let mut run = 0;
        for r in &self.trusted {
            let mut at = r.start;
            while at < r.end {
                let here = &self.text[at..r.end];
                let Some(special) = specials.iter().find(|s| here.starts_with(s.as_str())) else {
                    at += here.chars().next().map_or(1, char::len_utf8);
                    continue;
                };
                if run < at {
                    ids.extend(codec.encode_plain(&self.text[run..at])?);
                }
                match codec.encode(special)?.as_slice() {
                    [id] => ids.push(*id),
                    other => {
                        return Err(Error::Tokenizer(format!(
                            "{special} must be one special token, but encodes to {other:?}"
                        )));
                    }
                }
                at += special.len();
                run = at;
            }
        }
        if run < self.text.len() {
            ids.extend(codec.encode_plain(&self.text[run..])?);
        }
        Ok(ids)
    }
}
