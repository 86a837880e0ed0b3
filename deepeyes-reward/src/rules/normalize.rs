//! Text normalisation shared by the rule matchers.

/// Lower-cases `text`, turns punctuation and symbols into spaces, drops the articles "a", "an"
/// and "the" (unless the text is nothing but articles, as a bare choice letter "A" is), and
/// collapses whitespace.
///
/// ```
/// assert_eq!(deepeyes_reward::rules::normalize_text("  The RED-ish car, left!"), "red ish car left");
/// ```
pub fn normalize_text(text: &str) -> String {
    let lowered: String = text
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    let all: Vec<&str> = lowered.split_whitespace().collect();
    let kept: Vec<&str> = all
        .iter()
        .copied()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect();
    if kept.is_empty() {
        all.join(" ")
    } else {
        kept.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::normalize_text;

    #[test]
    fn normalises_case_punctuation_articles_and_spaces() {
        assert_eq!(normalize_text("The Apple."), "apple");
        assert_eq!(normalize_text("an\tapple\n"), "apple");
        assert_eq!(normalize_text("A"), "a");
        assert_eq!(normalize_text("the"), "the");
        assert_eq!(normalize_text("Théâtre—Ça"), "théâtre ça");
        assert_eq!(normalize_text("there"), "there");
    }
}
