//! Multiple-choice answers: option letters and option texts.

use super::{Verdict, normalize_text};

/// The options listed in a question, as `(letter, text)` with upper-case letters in order
/// `A, B, C, …`. Recognises one option per line (`A. red`, `(B) blue`, `C: green`, `D) grey`) and
/// inline lists (`(A) red (B) blue`). Fewer than two options means none.
///
/// ```
/// let q = "Which colour?\nOptions:\nA. red\nB. dark blue";
/// assert_eq!(deepeyes_reward::rules::parse_options(q), vec![('A', "red".to_string()), ('B', "dark blue".to_string())]);
/// ```
pub fn parse_options(question: &str) -> Vec<(char, String)> {
    let by_line = consecutive(question.lines().filter_map(option_line).collect());
    if by_line.len() >= 2 {
        return by_line;
    }
    let inline = consecutive(inline_options(question));
    if inline.len() >= 2 {
        inline
    } else {
        Vec::new()
    }
}

/// Keeps the run `A, B, C, …` from the first `A`.
fn consecutive(options: Vec<(char, String)>) -> Vec<(char, String)> {
    let Some(start) = options.iter().position(|(l, _)| *l == 'A') else {
        return Vec::new();
    };
    let mut run: Vec<(char, String)> = Vec::new();
    for (letter, text) in options.into_iter().skip(start) {
        let expected = char::from(b'A' + run.len() as u8);
        if letter != expected || run.len() >= 26 {
            break;
        }
        run.push((letter, text));
    }
    run
}

/// `A. text`, `(A) text`, `A) text`, `A: text` on one line.
fn option_line(line: &str) -> Option<(char, String)> {
    let line = line.trim();
    let (letter, rest) = if let Some(rest) = line.strip_prefix(['(', '[']) {
        let mut chars = rest.chars();
        let letter = chars.next()?;
        let rest = chars.as_str().strip_prefix([')', ']'])?;
        (letter, rest)
    } else {
        let mut chars = line.chars();
        let letter = chars.next()?;
        let rest = chars.as_str().strip_prefix(['.', ')', ':', '：'])?;
        (letter, rest)
    };
    let text = rest.trim();
    if !letter.is_ascii_uppercase() || text.is_empty() {
        return None;
    }
    Some((letter, text.to_string()))
}

/// `(A) red (B) blue (C) green` within one line.
fn inline_options(text: &str) -> Vec<(char, String)> {
    let mut marks: Vec<(usize, usize, char)> = Vec::new();
    let bytes = text.as_bytes();
    for i in 0..bytes.len().saturating_sub(2) {
        if bytes[i] == b'(' && bytes[i + 1].is_ascii_uppercase() && bytes[i + 2] == b')' {
            marks.push((i, i + 3, char::from(bytes[i + 1])));
        }
    }
    let mut options = Vec::new();
    for (k, &(_, body, letter)) in marks.iter().enumerate() {
        let end = marks.get(k + 1).map_or_else(
            || text[body..].find('\n').map_or(text.len(), |e| body + e),
            |next| next.0,
        );
        let option = text[body..end].trim().trim_end_matches([',', ';']).trim();
        if !option.is_empty() {
            options.push((letter, option.to_string()));
        }
    }
    options
}

/// The option letter a prediction names, if any: a lone letter (`B`, `(b)`, `B.`), a leading
/// labelled letter (`B. blue`, `(B) blue`, `B) blue`, `B: blue`) or a phrase such as "the answer
/// is B" / "option (B)". When `valid` is not empty, only those letters count.
pub fn choice_letter(prediction: &str, valid: &[char]) -> Option<char> {
    let allowed = |c: char| valid.is_empty() || valid.contains(&c);
    let text = prediction.trim();
    // A lone letter, possibly bracketed or followed by a period.
    let bare = text
        .trim_start_matches(['(', '['])
        .trim_end_matches(['.', ')', ']', ':'])
        .trim();
    let mut chars = bare.chars();
    if let (Some(c), None) = (chars.next(), chars.next())
        && c.is_ascii_alphabetic()
    {
        let c = c.to_ascii_uppercase();
        return allowed(c).then_some(c);
    }
    // A labelled letter at the start.
    if let Some(c) = labelled_letter(text) {
        return allowed(c).then_some(c);
    }
    // "answer is B", "option (C)", "choice: D".
    // ASCII lower-casing keeps byte offsets valid in `text`.
    let lower = text.to_ascii_lowercase();
    for key in ["answer is", "answer:", "option", "choice"] {
        let mut search = 0;
        while let Some(at) = lower[search..].find(key) {
            let after = search + at + key.len();
            if let Some(tail) = text.get(after..)
                && let Some(c) = leading_letter(tail.trim_start())
                && allowed(c)
            {
                return Some(c);
            }
            search = after;
        }
    }
    None
}

/// `B. …`, `B) …`, `B: …` (upper case) or `(b) …`, `[B] …` at the start of `text`.
fn labelled_letter(text: &str) -> Option<char> {
    let bytes = text.as_bytes();
    match bytes {
        [b'(' | b'[', c, b')' | b']', ..] if c.is_ascii_alphabetic() => {
            Some(char::from(*c).to_ascii_uppercase())
        }
        [c, b'.' | b')' | b':', rest @ ..]
            if c.is_ascii_uppercase() && rest.first().is_none_or(|b| b.is_ascii_whitespace()) =>
        {
            Some(char::from(*c))
        }
        _ => None,
    }
}

/// An upper-case letter (or a bracketed letter of any case) standing alone at the start of
/// `text`.
fn leading_letter(text: &str) -> Option<char> {
    let bytes = text.as_bytes();
    match bytes {
        [b'(' | b'[', c, b')' | b']', ..] if c.is_ascii_alphabetic() => {
            Some(char::from(*c).to_ascii_uppercase())
        }
        [c, rest @ ..]
            if c.is_ascii_uppercase()
                && rest.first().is_none_or(|b| !b.is_ascii_alphanumeric()) =>
        {
            Some(char::from(*c))
        }
        _ => None,
    }
}

/// Decides multiple-choice answers. The reference is a letter (`B`, `(B)`, `B. blue`) or, when
/// `options` are known, one option's text. The prediction may name a letter or repeat an
/// option's text. Undecided when the reference is not a choice or the prediction names none.
pub fn choice(prediction: &str, reference: &str, options: &[(char, String)]) -> Verdict {
    let letters: Vec<char> = options.iter().map(|(l, _)| *l).collect();
    let by_text = |text: &str| {
        let norm = normalize_text(text);
        options
            .iter()
            .find(|(_, option)| normalize_text(option) == norm)
            .map(|(l, _)| *l)
    };
    let reference_letter = choice_letter(reference, &letters).or_else(|| by_text(reference));
    let Some(reference_letter) = reference_letter else {
        return Verdict::Undecided;
    };
    if let Some(letter) = choice_letter(prediction, &letters).or_else(|| by_text(prediction)) {
        return Verdict::from_bool(letter == reference_letter);
    }
    Verdict::Undecided
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(char, &str)]) -> Vec<(char, String)> {
        pairs.iter().map(|(l, t)| (*l, (*t).to_string())).collect()
    }

    #[test]
    fn parses_line_and_inline_options() {
        let q = "What is it?\n(A) a cat\n(B) a dog\n(C) a bird";
        assert_eq!(
            parse_options(q),
            opts(&[('A', "a cat"), ('B', "a dog"), ('C', "a bird")])
        );
        let inline = "Pick one: (A) red, (B) blue (C) green\nAnswer briefly.";
        assert_eq!(
            parse_options(inline),
            opts(&[('A', "red"), ('B', "blue"), ('C', "green")])
        );
        assert!(parse_options("A. only one").is_empty());
        assert!(parse_options("no options here").is_empty());
        // A gap ends the run.
        assert_eq!(parse_options("A. x\nB. y\nD. z").len(), 2);
    }

    #[test]
    fn finds_the_named_letter() {
        assert_eq!(choice_letter("B", &[]), Some('B'));
        assert_eq!(choice_letter("(c)", &[]), Some('C'));
        assert_eq!(choice_letter("B.", &[]), Some('B'));
        assert_eq!(choice_letter("B. the dog", &[]), Some('B'));
        assert_eq!(choice_letter("The answer is (D).", &[]), Some('D'));
        assert_eq!(choice_letter("I pick option C because", &[]), Some('C'));
        assert_eq!(choice_letter("A cat", &[]), None);
        assert_eq!(choice_letter("answer is a cat", &[]), None);
        assert_eq!(choice_letter("E", &['A', 'B']), None);
        assert_eq!(choice_letter("Ünïcode answer is B", &[]), Some('B'));
    }

    #[test]
    fn choice_verdicts() {
        let o = opts(&[('A', "red"), ('B', "dark blue")]);
        assert_eq!(choice("B", "B", &o), Verdict::Match);
        assert_eq!(choice("Dark blue.", "B", &o), Verdict::Match);
        assert_eq!(choice("B", "dark blue", &o), Verdict::Match);
        assert_eq!(choice("A. red", "B", &o), Verdict::NoMatch);
        assert_eq!(choice("red", "B", &o), Verdict::NoMatch);
        assert_eq!(choice("navy", "B", &o), Verdict::Undecided);
        assert_eq!(choice("B", "blue", &[]), Verdict::Undecided);
        assert_eq!(choice("(b)", "B", &[]), Verdict::Match);
    }
}
