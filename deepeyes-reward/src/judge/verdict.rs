//! Reading a verdict out of a judge's reply.

const POSITIVE: &[&str] = &[
    "correct",
    "yes",
    "true",
    "1",
    "right",
    "equivalent",
    "consistent",
    "match",
    "matches",
    "same",
];
const NEGATIVE: &[&str] = &[
    "incorrect",
    "no",
    "false",
    "0",
    "wrong",
    "inconsistent",
    "different",
    "mismatch",
    "not",
    "nonequivalent",
];
/// How many words after the marker may precede the verdict word ("VERDICT: **the answer is** …").
const WINDOW: usize = 8;

/// The verdict of a judge reply: `Some(true)` for correct, `Some(false)` for incorrect, `None`
/// when the reply says neither clearly.
///
/// Reasoning models' `<think>…</think>` blocks are skipped. When the reply holds `marker`
/// (case-insensitive; punctuation around the marker is ignored, so `VERDICT:` also finds
/// "Verdict -"), the first verdict word among the few words after its last occurrence
/// decides ("not correct" is negative). Without the marker, only a bare verdict ("Correct.", "1",
/// "INCORRECT") is accepted; anything longer is garbage.
///
/// ```
/// use deepeyes_reward::judge::parse_verdict;
/// assert_eq!(parse_verdict("VERDICT: CORRECT", "VERDICT:"), Some(true));
/// assert_eq!(parse_verdict("verdict: **Incorrect**", "VERDICT:"), Some(false));
/// assert_eq!(parse_verdict("Correct.", "VERDICT:"), Some(true));
/// assert_eq!(parse_verdict("I think the candidate is right but maybe not", "VERDICT:"), None);
/// ```
pub fn parse_verdict(reply: &str, marker: &str) -> Option<bool> {
    let reply = match reply.rfind("</think>") {
        Some(at) => &reply[at + "</think>".len()..],
        None => reply,
    };
    let lower = reply.to_lowercase();
    // "VERDICT:" also finds "Verdict -": punctuation around the marker does not matter.
    let marker = marker
        .trim_matches(|c: char| !c.is_alphanumeric())
        .to_lowercase();
    if !marker.is_empty()
        && let Some(at) = lower.rfind(&marker)
    {
        let after = &lower[at + marker.len()..];
        return words(after).take(WINDOW).find_map(polarity);
    }
    let all: Vec<&str> = words(&lower).collect();
    match all.as_slice() {
        [word] => polarity(word),
        ["not", word] => polarity(word).map(|_| false),
        _ => None,
    }
}

fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}

fn polarity(word: &str) -> Option<bool> {
    if POSITIVE.contains(&word) {
        Some(true)
    } else if NEGATIVE.contains(&word) {
        Some(false)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::parse_verdict;

    #[test]
    fn verdicts() {
        let m = "VERDICT:";
        let cases = [
            ("VERDICT: CORRECT", Some(true)),
            ("VERDICT: INCORRECT", Some(false)),
            ("Verdict - correct", Some(true)),
            ("The answers match.\nVERDICT: INCORRECT", Some(false)),
            ("VERDICT: CORRECT\nVERDICT: INCORRECT", Some(false)),
            ("VERDICT: not correct", Some(false)),
            (
                "<think>VERDICT: INCORRECT?</think>VERDICT: CORRECT",
                Some(true),
            ),
            ("**CORRECT**", Some(true)),
            ("1", Some(true)),
            ("0", Some(false)),
            ("not correct", Some(false)),
            ("VERDICT:", None),
            ("VERDICT: the candidate is hard to assess", None),
            ("It could be correct or incorrect", None),
            ("banana", None),
            ("", None),
            ("{\"error\": \"x\"}", None),
        ];
        for (reply, want) in cases {
            assert_eq!(parse_verdict(reply, m), want, "{reply:?}");
        }
    }

    #[test]
    fn custom_markers() {
        let reply = "## Equivalence Judgement\nFALSE";
        assert_eq!(
            parse_verdict(reply, "## Equivalence Judgement"),
            Some(false)
        );
        assert_eq!(parse_verdict("Judgement: 1", "Judgement:"), Some(true));
    }
}
