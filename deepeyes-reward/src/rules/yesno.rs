//! Yes/no answers.

use super::{Verdict, normalize_text};

const YES: &[&str] = &[
    "yes",
    "yeah",
    "yep",
    "true",
    "correct",
    "right",
    "affirmative",
];
const NO: &[&str] = &[
    "no",
    "nope",
    "false",
    "incorrect",
    "wrong",
    "not",
    "negative",
];

/// The yes/no value a text starts with: `Some(true)` for "Yes, …", `Some(false)` for "No."; `None`
/// when it starts with neither, or also holds the opposite word ("yes and no").
pub fn yes_no_value(text: &str) -> Option<bool> {
    let norm = normalize_text(text);
    let mut words = norm.split_whitespace();
    let first = words.next()?;
    let value = if YES.contains(&first) {
        true
    } else if NO.contains(&first) {
        false
    } else {
        return None;
    };
    let opposite = if value { NO } else { YES };
    if words.any(|w| opposite.contains(&w)) {
        return None;
    }
    Some(value)
}

/// Decides when the reference is a bare yes or no: the prediction must start with the same
/// word. Undecided when the reference is not yes/no or the prediction does not start with
/// either.
pub fn yes_no(prediction: &str, reference: &str) -> Verdict {
    let norm_ref = normalize_text(reference);
    let reference = match norm_ref.as_str() {
        "yes" | "true" => true,
        "no" | "false" => false,
        _ => return Verdict::Undecided,
    };
    match yes_no_value(prediction) {
        Some(value) => Verdict::from_bool(value == reference),
        None => Verdict::Undecided,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yes_no_cases() {
        assert_eq!(yes_no("Yes.", "yes"), Verdict::Match);
        assert_eq!(yes_no("no, it is not", "No"), Verdict::Match);
        assert_eq!(yes_no("No.", "yes"), Verdict::NoMatch);
        assert_eq!(yes_no("yes and no", "yes"), Verdict::Undecided);
        assert_eq!(yes_no("It is", "yes"), Verdict::Undecided);
        assert_eq!(yes_no("yes", "red"), Verdict::Undecided);
        assert_eq!(yes_no("True", "yes"), Verdict::Match);
    }
}
