//! DeepEyes' format rules over the decoded response region, and the extraction of the answer
//! text they imply.
//!
//! The rules are count-based on purpose: they are what the reference reward computes, and a
//! trainer that wants to reproduce DeepEyes must punish exactly the same strings.
//!
//! - Visual data ([`visual_format`]): `<think>` and `</think>` occur equally often;
//!   `<|vision_start|><|image_pad|>` and `<|image_pad|><|vision_end|>` occur equally often; in the
//!   text after the last `</think>`, `<answer>` and `</answer>` occur equally often; the answer text
//!   is shorter than 1000 characters. A response without any `<answer>` is *not* a format error;
//!   its answer text is then the whole response.
//! - Math data ([`math_format`]): the `<think>` tags balance and the text after the last
//!   `</think>` holds exactly one `\boxed{…}`.

use serde::{Deserialize, Serialize};

/// `<think>`.
pub const THINK_OPEN: &str = "<think>";
/// `</think>`.
pub const THINK_CLOSE: &str = "</think>";
/// `<answer>`.
pub const ANSWER_OPEN: &str = "<answer>";
/// `</answer>`.
pub const ANSWER_CLOSE: &str = "</answer>";
/// The start of an image in the token stream: the vision-start marker followed by a pad.
pub const VISION_OPEN: &str = "<|vision_start|><|image_pad|>";
/// The end of an image in the token stream: a pad followed by the vision-end marker.
pub const VISION_CLOSE: &str = "<|image_pad|><|vision_end|>";
/// The opening of a boxed answer.
pub const BOXED_OPEN: &str = "\\boxed{";
/// DeepEyes' anti-judge-hacking limit: an answer of this many characters or more is a format
/// error and scores no accuracy.
pub const DEFAULT_MAX_ANSWER_CHARS: usize = 1000;

/// One broken format rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatViolation {
    /// `<think>` and `</think>` counts differ.
    UnbalancedThink,
    /// The image start and end marker counts differ.
    UnbalancedVision,
    /// `<answer>` and `</answer>` counts differ after the last `</think>`.
    UnbalancedAnswer,
    /// The answer text is at or over the length limit.
    AnswerTooLong,
    /// No `\boxed{…}` after the last `</think>` (math).
    NoBoxed,
    /// More than one `\boxed{…}` after the last `</think>` (math).
    MultipleBoxed,
}

impl FormatViolation {
    /// The flag this violation adds to a reward breakdown.
    pub fn flag(self) -> &'static str {
        match self {
            Self::UnbalancedThink => "format_unbalanced_think",
            Self::UnbalancedVision => "format_unbalanced_vision",
            Self::UnbalancedAnswer => "format_unbalanced_answer",
            Self::AnswerTooLong => "format_answer_too_long",
            Self::NoBoxed => "format_no_boxed",
            Self::MultipleBoxed => "format_multiple_boxed",
        }
    }
}

/// Trims like Python's `str.strip()`: Unicode whitespace plus the ASCII separators
/// U+001C‥U+001F, which Python also treats as whitespace.
pub fn py_strip(text: &str) -> &str {
    text.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// The text after the last `</think>`, or the whole response when there is none.
pub fn after_last_think(response: &str) -> &str {
    match response.rfind(THINK_CLOSE) {
        Some(at) => &response[at + THINK_CLOSE.len()..],
        None => response,
    }
}

/// The answer text: after the last `<answer>` (or from the start when there is none), up to
/// the next `</answer>` (or the end), trimmed.
pub fn answer_text(response: &str) -> &str {
    let from = match response.rfind(ANSWER_OPEN) {
        Some(at) => &response[at + ANSWER_OPEN.len()..],
        None => response,
    };
    let upto = match from.find(ANSWER_CLOSE) {
        Some(at) => &from[..at],
        None => from,
    };
    py_strip(upto)
}

/// How many image observations the response holds, counted by their start markers as DeepEyes
/// does. Only a successful crop puts image tokens into the response.
pub fn returned_images(response: &str) -> usize {
    response.matches(VISION_OPEN).count()
}

/// The counts and verdict of the visual format rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VisualFormat {
    /// Count of `<think>`.
    pub think_open: usize,
    /// Count of `</think>`.
    pub think_close: usize,
    /// Count of [`VISION_OPEN`].
    pub vision_open: usize,
    /// Count of [`VISION_CLOSE`].
    pub vision_close: usize,
    /// Count of `<answer>` after the last `</think>`.
    pub answer_open: usize,
    /// Count of `</answer>` after the last `</think>`.
    pub answer_close: usize,
    /// Length of the answer text in characters (Unicode scalar values, like Python's `len`).
    pub answer_chars: usize,
    /// The rules broken, in rule order; empty when the format is fine.
    pub violations: Vec<FormatViolation>,
}

impl VisualFormat {
    /// Whether no rule is broken.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// Whether the answer is too long to be scored.
    pub fn answer_too_long(&self) -> bool {
        self.violations.contains(&FormatViolation::AnswerTooLong)
    }
}

/// Checks the visual format rules; `max_answer_chars` is the length limit (`None`: no limit).
pub fn visual_format(response: &str, max_answer_chars: Option<usize>) -> VisualFormat {
    let think_open = response.matches(THINK_OPEN).count();
    let think_close = response.matches(THINK_CLOSE).count();
    let vision_open = response.matches(VISION_OPEN).count();
    let vision_close = response.matches(VISION_CLOSE).count();
    let tail = after_last_think(response);
    let answer_open = tail.matches(ANSWER_OPEN).count();
    let answer_close = tail.matches(ANSWER_CLOSE).count();
    let answer_chars = answer_text(response).chars().count();
    let mut violations = Vec::new();
    if think_open != think_close {
        violations.push(FormatViolation::UnbalancedThink);
    }
    if vision_open != vision_close {
        violations.push(FormatViolation::UnbalancedVision);
    }
    if answer_open != answer_close {
        violations.push(FormatViolation::UnbalancedAnswer);
    }
    if max_answer_chars.is_some_and(|max| answer_chars >= max) {
        violations.push(FormatViolation::AnswerTooLong);
    }
    VisualFormat {
        think_open,
        think_close,
        vision_open,
        vision_close,
        answer_open,
        answer_close,
        answer_chars,
        violations,
    }
}

/// How `\boxed{…}` contents are found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BoxedMode {
    /// Braces are balanced, so `\boxed{\frac{1}{2}}` yields `\frac{1}{2}`; escaped braces
    /// (`\{`, `\}`) do not count. Empty boxes are skipped. For contents without `{` this finds
    /// exactly what [`BoxedMode::DeepEyesRegex`] finds.
    #[default]
    Balanced,
    /// DeepEyes' regex `\\boxed{([^}]+)}`: the content stops at the first `}`, so nested braces
    /// are cut (`\boxed{\frac{1}{2}}` yields `\frac{1`). For exact reproduction only.
    DeepeyesRegex,
}

/// The contents of the `\boxed{…}` groups of `text`, left to right, non-overlapping.
pub fn boxed_contents(text: &str, mode: BoxedMode) -> Vec<&str> {
    let mut found = Vec::new();
    let mut cursor = 0;
    while let Some(rel) = text[cursor..].find(BOXED_OPEN) {
        let start = cursor + rel;
        let body = start + BOXED_OPEN.len();
        let close = match mode {
            BoxedMode::DeepeyesRegex => text[body..].find('}').map(|at| body + at),
            BoxedMode::Balanced => balanced_close(text, body),
        };
        match close {
            Some(end) if end > body => {
                found.push(&text[body..end]);
                cursor = end + 1;
            }
            // An empty box: the regex needs at least one character, so it moves on.
            Some(_) => cursor = start + 1,
            None => match mode {
                // No `}` anywhere after this point: no later box can close either.
                BoxedMode::DeepeyesRegex => break,
                // This box never closes, but a later one may (it is nested inside this one).
                BoxedMode::Balanced => cursor = start + 1,
            },
        }
    }
    found
}

/// The byte index of the `}` that closes the group whose content starts at `body`.
fn balanced_close(text: &str, body: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 1usize;
    let mut i = body;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1,
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// The counts and verdict of the math format rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MathFormat<'a> {
    /// Count of `<think>`.
    pub think_open: usize,
    /// Count of `</think>`.
    pub think_close: usize,
    /// The boxed contents after the last `</think>`.
    pub boxed: Vec<&'a str>,
    /// The rules broken; empty when the format is fine.
    pub violations: Vec<FormatViolation>,
}

impl<'a> MathFormat<'a> {
    /// Whether no rule is broken.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The scored answer: the last boxed content, if any.
    pub fn answer(&self) -> Option<&'a str> {
        self.boxed.last().copied()
    }
}

/// Checks the math format rules.
pub fn math_format(response: &str, mode: BoxedMode) -> MathFormat<'_> {
    let think_open = response.matches(THINK_OPEN).count();
    let think_close = response.matches(THINK_CLOSE).count();
    let boxed = boxed_contents(after_last_think(response), mode);
    let mut violations = Vec::new();
    if think_open != think_close {
        violations.push(FormatViolation::UnbalancedThink);
    }
    match boxed.len() {
        0 => violations.push(FormatViolation::NoBoxed),
        1 => {}
        _ => violations.push(FormatViolation::MultipleBoxed),
    }
    MathFormat {
        think_open,
        think_close,
        boxed,
        violations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CROP: &str =
        "<tool_response><|vision_start|><|image_pad|><|image_pad|><|vision_end|></tool_response>";

    #[test]
    fn a_well_formed_tool_response_has_no_violation() {
        let response = format!(
            "<think>zoom on the sign</think><tool_call>{{}}</tool_call>{CROP}<think>it is red</think><answer>red</answer>"
        );
        let check = visual_format(&response, Some(DEFAULT_MAX_ANSWER_CHARS));
        assert!(check.is_ok(), "{check:?}");
        assert_eq!((check.vision_open, check.vision_close), (1, 1));
        assert_eq!(answer_text(&response), "red");
        assert_eq!(returned_images(&response), 1);
    }

    #[test]
    fn missing_answer_tags_are_not_a_format_error() {
        let check = visual_format("<think>x</think> just red", Some(1000));
        assert!(check.is_ok());
        assert_eq!(
            answer_text("<think>x</think> just red"),
            "<think>x</think> just red"
        );
    }

    #[test]
    fn each_rule_is_caught() {
        let cases = [
            (
                "<think>a<answer>b</answer>",
                FormatViolation::UnbalancedThink,
            ),
            (
                "<|vision_start|><|image_pad|> <answer>b</answer>",
                FormatViolation::UnbalancedVision,
            ),
            (
                "<think>a</think><answer>b",
                FormatViolation::UnbalancedAnswer,
            ),
            (
                "<think>a</think><answer>b</answer></answer>",
                FormatViolation::UnbalancedAnswer,
            ),
        ];
        for (response, rule) in cases {
            let check = visual_format(response, Some(1000));
            assert_eq!(check.violations, vec![rule], "{response}");
        }
    }

    #[test]
    fn answer_tags_before_the_last_think_do_not_count() {
        // An unclosed <answer> inside the reasoning is out of scope of the answer rule.
        let response = "<think>maybe <answer> later</think><answer>x</answer>";
        assert!(visual_format(response, Some(1000)).is_ok());
    }

    #[test]
    fn the_length_limit_is_inclusive_and_counts_characters() {
        let at_limit = format!("<answer>{}</answer>", "é".repeat(1000));
        let below = format!("<answer>{}</answer>", "é".repeat(999));
        assert!(visual_format(&at_limit, Some(1000)).answer_too_long());
        assert!(!visual_format(&below, Some(1000)).answer_too_long());
        assert!(visual_format(&at_limit, None).is_ok());
    }

    #[test]
    fn answer_text_takes_the_last_open_tag_and_the_next_close() {
        assert_eq!(
            answer_text("<answer>a</answer> <answer> b </answer> c</answer>"),
            "b"
        );
        assert_eq!(answer_text("x</answer>y"), "x");
        assert_eq!(answer_text("\u{1f} a \n"), "a");
    }

    #[test]
    fn boxed_modes_differ_only_on_nested_braces() {
        let text = r"\boxed{\frac{1}{2}} and \boxed{3}";
        assert_eq!(
            boxed_contents(text, BoxedMode::Balanced),
            vec![r"\frac{1}{2}", "3"]
        );
        assert_eq!(
            boxed_contents(text, BoxedMode::DeepeyesRegex),
            vec![r"\frac{1", "3"]
        );
        for mode in [BoxedMode::Balanced, BoxedMode::DeepeyesRegex] {
            assert_eq!(boxed_contents(r"\boxed{} \boxed{7}", mode), vec!["7"]);
            assert!(boxed_contents(r"\boxed{", mode).is_empty());
        }
        assert_eq!(
            boxed_contents(r"\boxed{a \{ b}", BoxedMode::Balanced),
            vec![r"a \{ b"]
        );
        assert_eq!(
            boxed_contents(r"\boxed{open \boxed{4}", BoxedMode::Balanced),
            vec!["4"]
        );
    }

    #[test]
    fn math_rules() {
        let ok = math_format(r"<think>2+2</think> so \boxed{4}", BoxedMode::Balanced);
        assert!(ok.is_ok());
        assert_eq!(ok.answer(), Some("4"));
        let none = math_format(r"<think>\boxed{4}</think> four", BoxedMode::Balanced);
        assert_eq!(none.violations, vec![FormatViolation::NoBoxed]);
        assert_eq!(none.answer(), None);
        let two = math_format(r"\boxed{3} or \boxed{4}", BoxedMode::Balanced);
        assert_eq!(two.violations, vec![FormatViolation::MultipleBoxed]);
        assert_eq!(two.answer(), Some("4"));
        let think = math_format(r"<think> \boxed{4}", BoxedMode::Balanced);
        assert_eq!(think.violations, vec![FormatViolation::UnbalancedThink]);
    }
}
