//! Numbers: parsing them out of answers and comparing them with a tolerance.

use serde::{Deserialize, Serialize};

use super::Verdict;

/// How close two numbers must be to match: `|a − b| ≤ max(absolute, relative · max(|a|, |b|))`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct Tolerance {
    /// The absolute tolerance.
    pub absolute: f64,
    /// The relative tolerance.
    pub relative: f64,
}

impl Default for Tolerance {
    fn default() -> Self {
        Self {
            absolute: 1e-9,
            relative: 1e-6,
        }
    }
}

impl Tolerance {
    /// Whether `a` and `b` are within this tolerance.
    pub fn close(self, a: f64, b: f64) -> bool {
        if !a.is_finite() || !b.is_finite() {
            return a == b;
        }
        let scale = a.abs().max(b.abs());
        (a - b).abs() <= self.absolute.max(self.relative * scale)
    }
}

/// A number read from text.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Number {
    /// Its value as written (`50` for `50%`).
    pub value: f64,
    /// Whether it carried a percent sign or the word "percent".
    pub percent: bool,
}

impl Number {
    /// The values it may stand for: `50%` may be compared as 50 or as 0.5.
    pub fn candidates(self) -> impl Iterator<Item = f64> {
        let scaled = self.percent.then_some(self.value / 100.0);
        std::iter::once(self.value).chain(scaled)
    }

    /// Whether `self` and `other` can be the same quantity within `tolerance`.
    pub fn matches(self, other: Number, tolerance: Tolerance) -> bool {
        self.candidates()
            .any(|a| other.candidates().any(|b| tolerance.close(a, b)))
    }
}

/// Parses a text that is one number and nothing else (surrounding spaces, a leading currency
/// sign and trailing unit words allowed): `-1,234.5`, `1/2`, `50%`, `$3`, `2.5e3`, `7 cm`,
/// `three`.
pub fn parse_number(text: &str) -> Option<Number> {
    let text = text.trim().trim_end_matches('.');
    let text = text
        .strip_prefix(['$', '€', '£', '¥'])
        .unwrap_or(text)
        .trim_start();
    let chars: Vec<char> = text.chars().collect();
    if let Some(value) = number_word(&text.to_lowercase()) {
        return Some(Number {
            value,
            percent: false,
        });
    }
    let (negative, start) = match chars.first() {
        Some('-' | '−') => (true, 1),
        Some('+') => (false, 1),
        _ => (false, 0),
    };
    let (mut number, end) = scan_numeral(&chars, start, true)?;
    if negative {
        number.value = -number.value;
    }
    let rest: String = chars[end..].iter().collect();
    let rest = rest.trim();
    if rest.is_empty() || is_unit_tail(rest, &mut number) {
        Some(number)
    } else {
        None
    }
}

/// Whether `rest` (after a number) is only unit words; "percent" marks the number.
fn is_unit_tail(rest: &str, number: &mut Number) -> bool {
    let mut words = rest.split_whitespace().peekable();
    if words.peek().is_none() {
        return true;
    }
    let mut all_words = true;
    for word in words {
        let word = word.trim_end_matches(['.', ',']);
        if word.eq_ignore_ascii_case("percent") || word == "%" {
            number.percent = true;
        } else if word.is_empty() || !word.chars().all(char::is_alphabetic) {
            all_words = false;
        }
    }
    all_words && rest.split_whitespace().count() <= 3
}

/// Every number in a free text, in order: numerals (with thousands separators, decimals,
/// fractions, exponents, percent signs) and the number words zero to ninety. Digits glued to a
/// preceding letter (`A4`, `x2`) are not numbers.
pub fn numbers_in(text: &str) -> Vec<Number> {
    let chars: Vec<char> = text.chars().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let starts_numeral =
            c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit));
        if starts_numeral {
            let glued = i > 0 && (chars[i - 1].is_alphabetic() || chars[i - 1] == '_');
            let signed = i > 0
                && matches!(chars[i - 1], '-' | '−')
                && (i < 2 || !chars[i - 2].is_alphanumeric());
            match scan_numeral(&chars, i, false) {
                Some((mut number, end)) => {
                    if signed {
                        number.value = -number.value;
                    }
                    if !glued {
                        found.push(number);
                    }
                    i = end;
                }
                None => i += 1,
            }
        } else if c.is_alphabetic() {
            let end = (i..chars.len())
                .find(|&j| !chars[j].is_alphabetic())
                .unwrap_or(chars.len());
            let word: String = chars[i..end]
                .iter()
                .flat_map(|c| c.to_lowercase())
                .collect();
            if let Some(value) = number_word(&word) {
                found.push(Number {
                    value,
                    percent: false,
                });
            } else if word == "percent"
                && let Some(last) = found.last_mut()
            {
                last.percent = true;
            }
            i = end;
        } else {
            i += 1;
        }
    }
    found
}

/// Reads a numeral at `chars[start..]`; returns it and the index after it.
fn scan_numeral(chars: &[char], start: usize, whole: bool) -> Option<(Number, usize)> {
    let digits = |from: usize| {
        (from..chars.len())
            .find(|&j| !chars[j].is_ascii_digit())
            .unwrap_or(chars.len())
    };
    let mut text = String::new();
    let mut i = start;
    let int_end = digits(i);
    text.extend(&chars[i..int_end]);
    i = int_end;
    // Thousands separators: groups of exactly three digits.
    if int_end > start && int_end - start <= 3 {
        while chars.get(i) == Some(&',') {
            let group_end = digits(i + 1);
            let next_is_digit = chars.get(group_end).is_some_and(char::is_ascii_digit);
            if group_end - (i + 1) == 3 && !next_is_digit {
                text.extend(&chars[i + 1..group_end]);
                i = group_end;
            } else {
                break;
            }
        }
    }
    if chars.get(i) == Some(&'.') && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
        let frac_end = digits(i + 1);
        text.push('.');
        text.extend(&chars[i + 1..frac_end]);
        i = frac_end;
    }
    if text.is_empty() || text == "." {
        return None;
    }
    // An exponent, only when nothing alphabetic follows it.
    if matches!(chars.get(i), Some('e' | 'E')) {
        let mut j = i + 1;
        if matches!(chars.get(j), Some('+' | '-')) {
            j += 1;
        }
        let exp_end = digits(j);
        let clean_after = !chars.get(exp_end).is_some_and(|c| c.is_alphabetic());
        if exp_end > j && clean_after {
            text.push('e');
            text.extend(&chars[i + 1..exp_end]);
            i = exp_end;
        }
    }
    let mut value: f64 = text.parse().ok()?;
    // A fraction of two numerals: `3/4`.
    if chars.get(i) == Some(&'/') && chars.get(i + 1).is_some_and(char::is_ascii_digit) {
        let den_end = digits(i + 1);
        let den_text: String = chars[i + 1..den_end].iter().collect();
        let den: f64 = den_text.parse().ok()?;
        if den != 0.0 {
            value /= den;
            i = den_end;
        } else if whole {
            return None;
        }
    }
    let mut percent = false;
    if chars.get(i) == Some(&'%') {
        percent = true;
        i += 1;
    } else if chars.get(i) == Some(&' ') && chars.get(i + 1) == Some(&'%') {
        percent = true;
        i += 2;
    }
    Some((Number { value, percent }, i))
}

/// The value of an English number word from zero to ninety.
fn number_word(word: &str) -> Option<f64> {
    const WORDS: [&str; 21] = [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
        "twenty",
    ];
    const TENS: [(&str, f64); 7] = [
        ("thirty", 30.0),
        ("forty", 40.0),
        ("fifty", 50.0),
        ("sixty", 60.0),
        ("seventy", 70.0),
        ("eighty", 80.0),
        ("ninety", 90.0),
    ];
    if let Some(n) = WORDS.iter().position(|w| *w == word) {
        return Some(n as f64);
    }
    TENS.iter().find(|(w, _)| *w == word).map(|(_, v)| *v)
}

/// Decides when the reference is a number: the prediction must hold numbers that all agree
/// (within `tolerance`) and one of them must match. Undecided when the reference is not a number,
/// the prediction holds none, or it holds several different ones.
pub fn numeric(prediction: &str, reference: &str, tolerance: Tolerance) -> Verdict {
    let Some(reference) = parse_number(reference) else {
        return Verdict::Undecided;
    };
    let found = numbers_in(prediction);
    let Some(&first) = found.first() else {
        return Verdict::Undecided;
    };
    if found.iter().any(|n| !n.matches(first, tolerance)) {
        return Verdict::Undecided;
    }
    Verdict::from_bool(first.matches(reference, tolerance))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> Option<f64> {
        parse_number(text).map(|n| n.value)
    }

    #[test]
    fn parses_whole_numbers() {
        assert_eq!(value("42"), Some(42.0));
        assert_eq!(value(" -1,234.5 "), Some(-1234.5));
        assert_eq!(value("3/4"), Some(0.75));
        assert_eq!(value("$3"), Some(3.0));
        assert_eq!(value("2.5e3"), Some(2500.0));
        assert_eq!(value("7 cm"), Some(7.0));
        assert_eq!(value("seven"), Some(7.0));
        assert_eq!(value(".5"), Some(0.5));
        assert_eq!(value("12."), Some(12.0));
        assert_eq!(parse_number("50%").map(|n| n.percent), Some(true));
        assert_eq!(parse_number("50 percent").map(|n| n.percent), Some(true));
        assert_eq!(value("1/0"), None);
        assert_eq!(value("3 + 4"), None);
        assert_eq!(value("red"), None);
        assert_eq!(value("1,23"), None);
    }

    #[test]
    fn finds_numbers_in_text() {
        let found: Vec<f64> = numbers_in("There are 3 cats, 1,200 dogs and two A4 pages at -4.5%")
            .iter()
            .map(|n| n.value)
            .collect();
        assert_eq!(found, vec![3.0, 1200.0, 2.0, -4.5]);
        assert!(numbers_in("it is 40 percent").iter().all(|n| n.percent));
        assert_eq!(numbers_in("2019-2020").len(), 2);
        assert_eq!(numbers_in("2019-2020")[1].value, 2020.0);
    }

    #[test]
    fn numeric_verdicts() {
        let tol = Tolerance::default();
        assert_eq!(numeric("about 12.0 m", "12", tol), Verdict::Match);
        assert_eq!(numeric("three", "3", tol), Verdict::Match);
        assert_eq!(numeric("50%", "0.5", tol), Verdict::Match);
        assert_eq!(numeric("0.5", "50%", tol), Verdict::Match);
        assert_eq!(numeric("50", "50%", tol), Verdict::Match);
        assert_eq!(numeric("13", "12", tol), Verdict::NoMatch);
        assert_eq!(numeric("3 or 4", "3", tol), Verdict::Undecided);
        assert_eq!(numeric("a few", "3", tol), Verdict::Undecided);
        assert_eq!(numeric("3", "three cats", tol), Verdict::Undecided);
        let loose = Tolerance {
            absolute: 0.01,
            relative: 0.0,
        };
        assert_eq!(numeric("3.141", "3.14", loose), Verdict::Match);
        assert_eq!(numeric("3.141", "3.14", tol), Verdict::NoMatch);
    }

    #[test]
    fn unknown_tolerance_key_is_rejected() {
        let err = toml::from_str::<Tolerance>("absolute = 1.0\nrelativ = 2.0").unwrap_err();
        assert!(err.to_string().contains("relativ"), "{err}");
    }
}
