//! Rule matchers: cheap, deterministic answer checks that say "match", "no match" or "cannot
//! decide". The judge runs only when the rules cannot decide.
//!
//! Each matcher is usable alone:
//!
//! ```
//! use deepeyes_reward::rules::{self, Verdict};
//!
//! assert_eq!(rules::yes_no("Yes, it is.", "yes"), Verdict::Match);
//! assert_eq!(rules::numeric("about 12.0 m", "12", rules::Tolerance::default()), Verdict::Match);
//! assert_eq!(rules::choice("(B) the red one", "B", &[]), Verdict::Match);
//! assert_eq!(rules::exact("The Red Car!", "red car"), Verdict::Match);
//! assert_eq!(rules::math_equivalent(r"\dfrac{1}{2}", "0.5"), Verdict::Match);
//! // Paraphrases are for the judge:
//! assert_eq!(rules::exact("crimson", "red"), Verdict::Undecided);
//! ```

mod choice;
mod math;
mod normalize;
mod numeric;
mod yesno;

use serde::{Deserialize, Serialize};

pub use choice::{choice, choice_letter, parse_options};
pub use math::{evaluate, math_equivalent, normalize_latex};
pub use normalize::normalize_text;
pub use numeric::{Tolerance, numbers_in, numeric, parse_number};
pub use yesno::{yes_no, yes_no_value};

/// What a rule concluded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The prediction is the reference answer.
    Match,
    /// The prediction is certainly not the reference answer.
    NoMatch,
    /// The rule cannot tell (a paraphrase, an unparseable answer, a question it does not cover).
    Undecided,
}

impl Verdict {
    /// Whether the rule reached a conclusion.
    pub fn is_decided(self) -> bool {
        self != Self::Undecided
    }

    /// The accuracy this verdict is worth, when decided.
    pub fn accuracy(self) -> Option<f64> {
        match self {
            Self::Match => Some(1.0),
            Self::NoMatch => Some(0.0),
            Self::Undecided => None,
        }
    }

    fn from_bool(hit: bool) -> Self {
        if hit { Self::Match } else { Self::NoMatch }
    }
}

/// A verdict and the rule that reached it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RuleOutcome {
    /// The conclusion.
    pub verdict: Verdict,
    /// The rule that reached it (`empty`, `choice`, `yes_no`, `numeric`, `exact`, `math`), or
    /// `none` when no rule could decide.
    pub rule: &'static str,
}

/// Normalised exact match: equal after lower-casing, dropping punctuation and the articles
/// "a", "an", "the", and collapsing whitespace. Never says [`Verdict::NoMatch`] for two
/// answers with content, since different words may still mean the same thing; a prediction
/// without any letter or digit is a [`Verdict::NoMatch`].
pub fn exact(prediction: &str, reference: &str) -> Verdict {
    let pred = normalize_text(prediction);
    let reference = normalize_text(reference);
    if pred == reference {
        Verdict::Match
    } else if !has_content(prediction) {
        Verdict::NoMatch
    } else {
        Verdict::Undecided
    }
}

/// The rule chain for short visual-question answers (V*, charts): an empty prediction, then
/// multiple choice (letters and the options found in `question`), yes/no, numbers, and the
/// normalised exact match. The first rule that decides wins.
pub fn visual_answer(
    prediction: &str,
    reference: &str,
    question: &str,
    tolerance: Tolerance,
) -> RuleOutcome {
    let prediction = strip_boxed(prediction);
    if !has_content(prediction) && has_content(reference) {
        return outcome(Verdict::NoMatch, "empty");
    }
    let options = parse_options(question);
    let checks: [(&'static str, &dyn Fn() -> Verdict); 4] = [
        ("choice", &|| choice(prediction, reference, &options)),
        ("yes_no", &|| yes_no(prediction, reference)),
        ("numeric", &|| numeric(prediction, reference, tolerance)),
        ("exact", &|| exact(prediction, reference)),
    ];
    first_decided(&checks)
}

/// The rule chain for math answers: an empty prediction, a multiple-choice letter, then
/// [`math_equivalent`].
pub fn math_answer(prediction: &str, reference: &str) -> RuleOutcome {
    if !has_content(prediction) && has_content(reference) {
        return outcome(Verdict::NoMatch, "empty");
    }
    let checks: [(&'static str, &dyn Fn() -> Verdict); 2] = [
        ("choice", &|| choice(prediction, reference, &[])),
        ("math", &|| math_equivalent(prediction, reference)),
    ];
    first_decided(&checks)
}

fn first_decided(checks: &[(&'static str, &dyn Fn() -> Verdict)]) -> RuleOutcome {
    for (rule, check) in checks {
        let verdict = check();
        if verdict.is_decided() {
            return outcome(verdict, rule);
        }
    }
    outcome(Verdict::Undecided, "none")
}

/// Whether `text` holds any letter or digit.
fn has_content(text: &str) -> bool {
    text.chars().any(char::is_alphanumeric)
}

fn outcome(verdict: Verdict, rule: &'static str) -> RuleOutcome {
    RuleOutcome { verdict, rule }
}

/// The content of a lone `\boxed{…}` wrapping the whole prediction, else the prediction.
fn strip_boxed(prediction: &str) -> &str {
    let trimmed = prediction.trim();
    let contents = crate::format::boxed_contents(trimmed, crate::format::BoxedMode::Balanced);
    match contents.as_slice() {
        [inner] if trimmed.starts_with(crate::format::BOXED_OPEN) && trimmed.ends_with('}') => {
            inner
        }
        _ => trimmed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visual(pred: &str, reference: &str, question: &str) -> RuleOutcome {
        visual_answer(pred, reference, question, Tolerance::default())
    }

    #[test]
    fn the_visual_chain_decides_what_it_can() {
        let q = "What colour is the bus?\nA. red\nB. blue\nC. green";
        assert_eq!(visual("B", "B", q).verdict, Verdict::Match);
        assert_eq!(visual("blue", "B", q).rule, "choice");
        assert_eq!(visual("C. green", "B", q).verdict, Verdict::NoMatch);
        assert_eq!(visual("No.", "yes", "Is it?").rule, "yes_no");
        assert_eq!(visual("No.", "yes", "Is it?").verdict, Verdict::NoMatch);
        assert_eq!(visual("3 cats", "4", "How many?").verdict, Verdict::NoMatch);
        assert_eq!(visual(r"\boxed{left}", "Left", "").verdict, Verdict::Match);
        assert_eq!(visual("  ", "left", "").rule, "empty");
        let open = visual("the person", "boy", "Who is there?");
        assert_eq!((open.verdict, open.rule), (Verdict::Undecided, "none"));
    }

    #[test]
    fn the_math_chain() {
        assert_eq!(math_answer("(C)", "C").verdict, Verdict::Match);
        assert_eq!(math_answer(r"\frac{3}{4}", "0.75").rule, "math");
        assert_eq!(math_answer("", "1").verdict, Verdict::NoMatch);
        assert_eq!(math_answer("x^2+1", "1+x^2").verdict, Verdict::Undecided);
    }

    #[test]
    fn exact_never_rejects_a_paraphrase() {
        assert_eq!(exact("An apple.", "apple"), Verdict::Match);
        assert_eq!(exact("pear", "apple"), Verdict::Undecided);
        assert_eq!(exact("", "apple"), Verdict::NoMatch);
        assert_eq!(exact("...", "apple"), Verdict::NoMatch);
    }
}
