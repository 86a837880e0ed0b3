//! Rule-based equivalence of math answers: LaTeX normalisation, then numbers, fractions,
//! percentages, small numeric expressions and tuples.

use super::Verdict;
use super::numeric::{Number, Tolerance, parse_number};

/// Commands dropped outright (spacing, sizing).
const DROPPED: &[&str] = &[
    "\\left",
    "\\right",
    "\\displaystyle",
    "\\!",
    "\\,",
    "\\;",
    "\\:",
    "\\ ",
    "\\quad",
    "\\qquad",
];
/// Commands whose braced argument is kept as plain text.
const UNWRAPPED: &[&str] = &[
    "\\text",
    "\\textbf",
    "\\textit",
    "\\mathrm",
    "\\mathbf",
    "\\mathit",
    "\\mbox",
    "\\operatorname",
    "\\boxed",
];
/// Degree markers, longest first.
const DEGREES: &[&str] = &["^{\\circ}", "^\\circ", "\\degree", "\\circ", "°"];
/// Unit words stripped after a number. Single letters are left alone: `2x` is not "2 of x".
const UNITS: &[&str] = &[
    "units", "unit", "degrees", "degree", "deg", "cm", "mm", "km", "meters", "metres", "meter",
    "metre", "kg", "mg", "grams", "gram", "ml", "liters", "litres", "liter", "litre", "inches",
    "inch", "feet", "foot", "ft", "yards", "yard", "miles", "mile", "mph", "kmh", "hours", "hour",
    "hrs", "hr", "minutes", "minute", "mins", "min", "seconds", "second", "secs", "sec", "days",
    "day", "weeks", "week", "years", "year", "dollars", "dollar", "cents", "cent", "people",
    "persons", "students", "sq",
];

/// A normalised answer and whether a degree marker was removed from it.
#[derive(Debug, Clone, PartialEq)]
struct Normalized {
    text: String,
    degree: bool,
}

/// Normalises a LaTeX answer for comparison: strips math delimiters, spacing commands,
/// `\left`/`\right`, `\text{…}`-style wrappers, degree marks, `x =` prefixes and whitespace, and
/// writes `\dfrac`/`\tfrac` as `\frac` and `\%` as `%`.
///
/// ```
/// use deepeyes_reward::rules::normalize_latex;
/// assert_eq!(normalize_latex(r"$x = \dfrac{1}{2}\text{ cm}$"), r"\frac{1}{2}cm");
/// assert_eq!(normalize_latex(r"\left( 1, 2 \right)"), "(1,2)");
/// ```
pub fn normalize_latex(answer: &str) -> String {
    normalize(answer).text
}

fn normalize(answer: &str) -> Normalized {
    let mut text = answer.trim().to_string();
    for (open, close) in [("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")] {
        if text.len() >= open.len() + close.len() && text.starts_with(open) && text.ends_with(close)
        {
            text = text[open.len()..text.len() - close.len()].to_string();
            break;
        }
    }
    for wrapper in UNWRAPPED {
        text = unwrap_command(&text, wrapper);
    }
    text = text
        .replace("\\dfrac", "\\frac")
        .replace("\\tfrac", "\\frac")
        .replace("\\%", "%")
        .replace("{,}", "")
        .replace('~', "");
    for dropped in DROPPED {
        text = replace_command(&text, dropped, "");
    }
    let mut degree = false;
    for mark in DEGREES {
        if text.contains(mark) {
            degree = true;
            text = text.replace(mark, "");
        }
    }
    text.retain(|c| !c.is_whitespace());
    let text = text.trim_end_matches('.').to_string();
    // `x=5` → `5`, when a single variable is assigned once.
    let text = match text.split_once('=') {
        Some((lhs, rhs))
            if !rhs.contains('=')
                && !rhs.is_empty()
                && lhs.len() == 1
                && lhs.chars().all(|c| c.is_ascii_alphabetic()) =>
        {
            rhs.to_string()
        }
        _ => text,
    };
    Normalized { text, degree }
}

/// Replaces `command` with `with`, unless it is the prefix of a longer command name
/// (`\left` must not eat `\leftarrow`).
fn replace_command(text: &str, command: &str, with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(command) {
        let after = &rest[at + command.len()..];
        let alphabetic_command = command.chars().last().is_some_and(char::is_alphabetic);
        let longer = alphabetic_command && after.chars().next().is_some_and(char::is_alphabetic);
        out.push_str(&rest[..at]);
        out.push_str(if longer { command } else { with });
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Replaces every `\cmd{arg}` by `arg` (balanced braces); other uses of `\cmd` stay.
fn unwrap_command(text: &str, command: &str) -> String {
    let pattern = format!("{command}{{");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(&pattern) {
        let body = at + pattern.len();
        match close_brace(rest, body) {
            Some(end) => {
                out.push_str(&rest[..at]);
                out.push_str(&unwrap_command(&rest[body..end], command));
                rest = &rest[end + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// The index of the `}` closing a group whose content starts at `body`.
fn close_brace(text: &str, body: usize) -> Option<usize> {
    let mut depth = 1usize;
    for (i, b) in text.bytes().enumerate().skip(body) {
        match b {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Evaluates a small numeric LaTeX expression: numbers, `+ - * / ^`, parentheses and braces,
/// `\frac`, `\sqrt` (also `\sqrt[n]{…}`), `\pi`, `\cdot`, `\times`, implicit products such as
/// `2\sqrt{3}`. Anything else (variables, functions) gives `None`.
///
/// ```
/// use deepeyes_reward::rules::evaluate;
/// assert_eq!(evaluate(r"\frac{3}{4}"), Some(0.75));
/// assert_eq!(evaluate(r"2\sqrt{4} + 1"), Some(5.0));
/// assert_eq!(evaluate("x + 1"), None);
/// ```
pub fn evaluate(expression: &str) -> Option<f64> {
    let expr = latex_to_expression(&normalize(expression).text)?;
    let mut parser = Parser {
        chars: expr.chars().filter(|c| !c.is_whitespace()).collect(),
        at: 0,
        depth: 0,
    };
    let value = parser.sum()?;
    (parser.at == parser.chars.len() && value.is_finite()).then_some(value)
}

/// Rewrites LaTeX into the plain grammar of [`Parser`].
fn latex_to_expression(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("\\frac") {
            let (num, after) = argument(after)?;
            let (den, after) = argument(after)?;
            out.push_str(&format!(
                "(({})/({}))",
                latex_to_expression(num)?,
                latex_to_expression(den)?
            ));
            rest = after;
        } else if let Some(after) = rest.strip_prefix("\\sqrt") {
            if let Some(index) = after.strip_prefix('[') {
                let close = index.find(']')?;
                let degree = latex_to_expression(&index[..close])?;
                let (radicand, after) = argument(&index[close + 1..])?;
                out.push_str(&format!(
                    "(({})^(1/({})))",
                    latex_to_expression(radicand)?,
                    degree
                ));
                rest = after;
            } else {
                let (radicand, after) = argument(after)?;
                out.push_str(&format!("s({})", latex_to_expression(radicand)?));
                rest = after;
            }
        } else if let Some(after) = rest.strip_prefix("\\pi") {
            if after.chars().next().is_some_and(char::is_alphabetic) {
                return None;
            }
            out.push('p');
            rest = after;
        } else if let Some(after) = rest
            .strip_prefix("\\cdot")
            .or_else(|| rest.strip_prefix("\\times"))
        {
            out.push('*');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("\\div") {
            out.push('/');
            rest = after;
        } else if c == '\\' || c.is_alphabetic() {
            // Unknown commands and variables are not numbers.
            return None;
        } else {
            out.push(match c {
                '{' | '[' => '(',
                '}' | ']' => ')',
                other => other,
            });
            rest = &rest[c.len_utf8()..];
        }
    }
    Some(out)
}

/// A braced argument or a single character, after optional spaces.
fn argument(text: &str) -> Option<(&str, &str)> {
    let text = text.trim_start();
    if let Some(inner) = text.strip_prefix('{') {
        let end = close_brace(inner, 0)?;
        Some((&inner[..end], &inner[end + 1..]))
    } else {
        let c = text.chars().next()?;
        Some(text.split_at(c.len_utf8()))
    }
}

/// Recursive descent over `+ - * / ^ ( )`, numbers, `p` (π) and `s(…)` (square root).
struct Parser {
    chars: Vec<char>,
    at: usize,
    depth: usize,
}

impl Parser {
    const MAX_DEPTH: usize = 64;

    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn sum(&mut self) -> Option<f64> {
        self.depth += 1;
        if self.depth > Self::MAX_DEPTH {
            return None;
        }
        let mut value = self.product()?;
        while let Some(op @ ('+' | '-')) = self.peek() {
            self.at += 1;
            let rhs = self.product()?;
            value = if op == '+' { value + rhs } else { value - rhs };
        }
        self.depth -= 1;
        Some(value)
    }

    fn product(&mut self) -> Option<f64> {
        let mut value = self.power()?;
        loop {
            match self.peek() {
                Some('*') => {
                    self.at += 1;
                    value *= self.power()?;
                }
                Some('/') => {
                    self.at += 1;
                    value /= self.power()?;
                }
                // Implicit product: `2(3)`, `2p`, `2s(3)`, `(1)(2)`.
                Some('(' | 'p' | 's') => value *= self.power()?,
                _ => return Some(value),
            }
        }
    }

    fn power(&mut self) -> Option<f64> {
        let base = self.unary()?;
        if self.peek() == Some('^') {
            self.at += 1;
            let exponent = self.power()?;
            return Some(base.powf(exponent));
        }
        Some(base)
    }

    fn unary(&mut self) -> Option<f64> {
        match self.peek() {
            Some('-') => {
                self.at += 1;
                Some(-self.unary()?)
            }
            Some('+') => {
                self.at += 1;
                self.unary()
            }
            _ => self.atom(),
        }
    }

    fn atom(&mut self) -> Option<f64> {
        match self.peek()? {
            '(' => {
                self.at += 1;
                let value = self.sum()?;
                (self.peek() == Some(')')).then_some(())?;
                self.at += 1;
                Some(value)
            }
            'p' => {
                self.at += 1;
                Some(std::f64::consts::PI)
            }
            's' => {
                self.at += 1;
                let radicand = self.atom()?;
                (radicand >= 0.0).then(|| radicand.sqrt())
            }
            c if c.is_ascii_digit() || c == '.' => {
                let start = self.at;
                while self.peek().is_some_and(|c| c.is_ascii_digit() || c == '.') {
                    self.at += 1;
                }
                let text: String = self.chars[start..self.at].iter().collect();
                text.parse().ok()
            }
            _ => None,
        }
    }
}

/// The numeric value of a normalised answer: a plain number (thousands separators, `%`, a
/// trailing unit word allowed) or a numeric expression.
fn value_of(text: &str) -> Option<Number> {
    let stripped = strip_unit(text);
    for candidate in [text, stripped] {
        if let Some(number) = parse_number(candidate).filter(|_| candidate_is_plain(candidate)) {
            return Some(number);
        }
        if let Some(percent) = candidate.strip_suffix('%')
            && let Some(value) = evaluate_plain(percent)
        {
            return Some(Number {
                value,
                percent: true,
            });
        }
        if let Some(value) = evaluate_plain(candidate) {
            return Some(Number {
                value,
                percent: false,
            });
        }
    }
    None
}

/// `parse_number` accepts trailing words; here the unit must already be gone.
fn candidate_is_plain(text: &str) -> bool {
    !text.chars().any(char::is_alphabetic)
}

fn evaluate_plain(text: &str) -> Option<f64> {
    // Thousands separators were handled by `parse_number`; a comma here is a list.
    if text.contains(',') {
        return None;
    }
    evaluate(text)
}

/// `12cm` → `12`: drops a known unit word after a numeric prefix.
fn strip_unit(text: &str) -> &str {
    let split = text
        .char_indices()
        .rev()
        .take_while(|(_, c)| c.is_ascii_alphabetic() || *c == '^' || c.is_ascii_digit())
        .filter(|(_, c)| c.is_ascii_alphabetic())
        .last()
        .map(|(i, _)| i);
    let Some(split) = split else { return text };
    let (number, unit) = text.split_at(split);
    let unit = unit
        .trim_end_matches(|c: char| c.is_ascii_digit())
        .trim_end_matches('^');
    if !number.is_empty() && UNITS.contains(&unit.to_ascii_lowercase().as_str()) {
        number
    } else {
        text
    }
}

/// The opening and closing bracket of a list, if it has them.
type Brackets = Option<(char, char)>;

/// The parts of a top-level comma-separated list and its brackets, or `None` for a single item.
fn list_parts(text: &str) -> Option<(Brackets, Vec<&str>)> {
    let (brackets, inner) = match (text.chars().next(), text.chars().last()) {
        (Some(open @ ('(' | '[' | '{')), Some(close @ (')' | ']' | '}'))) if text.len() >= 2 => {
            (Some((open, close)), &text[1..text.len() - 1])
        }
        _ => (None, text),
    };
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in inner.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    (parts.len() > 1).then_some((brackets, parts))
}

/// Compares two lists. Parenthesised and bracketed lists (tuples, intervals) are ordered; bare
/// and braced lists (solution sets) are compared as multisets and never rejected on order.
fn lists_equivalent(
    pred_brackets: Brackets,
    pred: &[&str],
    ref_brackets: Brackets,
    reference: &[&str],
    depth: usize,
) -> Verdict {
    if pred_brackets != ref_brackets {
        return Verdict::Undecided;
    }
    if pred.len() != reference.len() {
        let numeric = |parts: &[&str]| parts.iter().all(|p| value_of(p).is_some());
        return if numeric(pred) && numeric(reference) {
            Verdict::NoMatch
        } else {
            Verdict::Undecided
        };
    }
    let item = |text: &str| Normalized {
        text: text.to_string(),
        degree: false,
    };
    let same = |p: &str, r: &str| equivalent(&item(p), &item(r), depth + 1);
    let ordered = matches!(pred_brackets, Some(('(' | '[', _)));
    if ordered {
        let mut all_match = true;
        for (p, r) in pred.iter().zip(reference) {
            match same(p, r) {
                Verdict::NoMatch => return Verdict::NoMatch,
                Verdict::Undecided => all_match = false,
                Verdict::Match => {}
            }
        }
        return if all_match {
            Verdict::Match
        } else {
            Verdict::Undecided
        };
    }
    let mut used = vec![false; reference.len()];
    for p in pred {
        let hit =
            (0..reference.len()).find(|&j| !used[j] && same(p, reference[j]) == Verdict::Match);
        match hit {
            Some(j) => used[j] = true,
            None => return Verdict::Undecided,
        }
    }
    Verdict::Match
}

/// Whether `text` is a plain decimal (`0.667`) that `other` rounds to at its precision.
fn rounds_to(text: &str, value: f64, other: f64) -> bool {
    let Some(dot) = text.find('.') else {
        return false;
    };
    if !text
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+'))
    {
        return false;
    }
    let places = text[dot + 1..]
        .chars()
        .take_while(char::is_ascii_digit)
        .count();
    if places == 0 || places > 12 {
        return false;
    }
    let scale = 10f64.powi(places as i32);
    (other * scale).round() == (value * scale).round()
}

/// Decides whether two math answers are equal: identical after [`normalize_latex`], or equal
/// numbers/expressions (fractions, percentages — `50%` also matches `0.5` — degrees, units), or
/// lists of such with the same brackets, element by element. Two different numbers are a
/// [`Verdict::NoMatch`]; symbolic answers that differ are [`Verdict::Undecided`].
pub fn math_equivalent(prediction: &str, reference: &str) -> Verdict {
    let pred = normalize(prediction);
    let reference = normalize(reference);
    equivalent(&pred, &reference, 0)
}

fn equivalent(pred: &Normalized, reference: &Normalized, depth: usize) -> Verdict {
    if pred.text.is_empty() || reference.text.is_empty() {
        return if pred.text == reference.text {
            Verdict::Match
        } else {
            Verdict::Undecided
        };
    }
    if pred.text == reference.text {
        return Verdict::Match;
    }
    if let (Some(a), Some(b)) = (value_of(&pred.text), value_of(&reference.text)) {
        let tolerance = Tolerance {
            absolute: 1e-9,
            relative: 1e-6,
        };
        if a.matches(b, tolerance) {
            return Verdict::Match;
        }
        // 30° and π/6 are the same angle in different units; 0.667 may be 2/3 rounded: leave
        // both to the judge.
        let mixed_units = pred.degree != reference.degree
            && (pred.text.contains("\\pi") || reference.text.contains("\\pi"));
        let rounded =
            rounds_to(&pred.text, a.value, b.value) || rounds_to(&reference.text, b.value, a.value);
        return if mixed_units || rounded {
            Verdict::Undecided
        } else {
            Verdict::NoMatch
        };
    }
    if depth < 4
        && let (Some((pb, pp)), Some((rb, rp))) =
            (list_parts(&pred.text), list_parts(&reference.text))
    {
        return lists_equivalent(pb, &pp, rb, &rp, depth);
    }
    Verdict::Undecided
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        assert_eq!(
            normalize_latex(r"\left(\frac{1}{2}\right)"),
            r"(\frac{1}{2})"
        );
        assert_eq!(normalize_latex(r"\text{ 5 apples }"), "5apples");
        assert_eq!(normalize_latex(r"$$45^{\circ}$$"), "45");
        assert_eq!(normalize_latex(r"y = 3"), "3");
        assert_eq!(normalize_latex(r"a=b=c"), "a=b=c");
        assert_eq!(normalize_latex(r"\leftarrow"), r"\leftarrow");
        assert_eq!(normalize_latex(r"12\%."), "12%");
        assert_eq!(normalize_latex(r"1{,}000"), "1000");
        assert_eq!(normalize_latex(r"\boxed{\textbf{7}}"), "7");
    }

    #[test]
    fn evaluation() {
        assert_eq!(evaluate(r"\dfrac{3}{4}"), Some(0.75));
        assert_eq!(evaluate(r"\frac12"), Some(0.5));
        assert_eq!(evaluate(r"2^3^2"), Some(512.0));
        assert_eq!(evaluate(r"-(1+2)\cdot 3"), Some(-9.0));
        assert!((evaluate(r"\sqrt[3]{27}").unwrap() - 3.0).abs() < 1e-12);
        assert!((evaluate(r"2\pi").unwrap() - std::f64::consts::TAU).abs() < 1e-12);
        assert_eq!(evaluate(r"\sqrt{-1}"), None);
        assert_eq!(evaluate(r"1/0"), None);
        assert_eq!(evaluate(r"\sin(1)"), None);
        assert_eq!(evaluate(r"(1+2"), None);
        assert_eq!(evaluate(r"1+"), None);
        assert_eq!(evaluate(&"(".repeat(200)), None);
        assert_eq!(evaluate("pi"), None);
    }

    #[test]
    fn equivalences() {
        let m = Verdict::Match;
        let n = Verdict::NoMatch;
        let u = Verdict::Undecided;
        let cases = [
            (r"\frac{1}{2}", "0.5", m),
            (r"\dfrac{1}{2}", r"\tfrac12", m),
            ("1/2", "0.5", m),
            ("50%", "0.5", m),
            (r"50\%", "50", m),
            ("1,000", "1000", m),
            (r"30^\circ", "30", m),
            (r"30^\circ", r"\frac{\pi}{6}", u),
            (r"12\text{ cm}", "12", m),
            ("12 units", "12", m),
            ("2x", "2", u),
            ("x=4", "4", m),
            (r"2\sqrt{3}", r"\sqrt{12}", m),
            ("3", "4", n),
            (r"\frac{2}{3}", "0.667", u),
            (r"\frac{2}{3}", "0.7", u),
            (r"\frac{2}{3}", "0.6", n),
            ("3.14", r"\pi", u),
            ("{1,2}", "{2,1}", m),
            ("1,2", "2,3", u),
            ("(1,2]", "(1,2]", m),
            ("(1, 2)", r"\left(1,2\right)", m),
            ("(1,2)", "(2,1)", n),
            ("(1,2)", "[1,2]", u),
            ("(1,2,3)", "(1,2)", n),
            ("(a,2)", "(a,2)", m),
            ("(a,2)", "(b,2)", u),
            ("x^2+1", "1+x^2", u),
            ("", "", m),
            ("", "3", u),
        ];
        for (pred, reference, want) in cases {
            assert_eq!(
                math_equivalent(pred, reference),
                want,
                "{pred} vs {reference}"
            );
        }
    }

    #[test]
    fn units_are_stripped_only_when_known() {
        assert_eq!(strip_unit("12cm"), "12");
        assert_eq!(strip_unit("12cm^2"), "12");
        assert_eq!(strip_unit("12x"), "12x");
        assert_eq!(strip_unit("cm"), "cm");
    }
}
