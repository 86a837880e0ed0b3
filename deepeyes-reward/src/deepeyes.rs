//! DeepEyes' two reward functions as ready-made compositions.
//!
//! - [`DeepEyesVisual`] (V*-style and chart data): `0.8·accuracy + 0.2·format + 1.2·tool`,
//!   range −0.2 … 2.0.
//! - [`DeepEyesMath`] (reasoning data): `1.2·accuracy + 0.4·format`, range −0.4 … 1.2, no tool
//!   bonus.
//!
//! Both differ from the reference in one deliberate way: accuracy asks the rule matchers first
//! and the judge only when they cannot decide (the reference asks the judge for every visual
//! answer and math_verify first for math). Set `use-rules = false` to send every answer to the
//! judge.

use std::sync::Arc;

use deepeyes_core::reward::{RewardBreakdown, RewardInput, RewardTerm};
use serde::{Deserialize, Serialize};

use crate::components::{
    Accuracy, AnswerStyle, Bounds, Component, Format, JudgeHandle, Sum, ToolBonus,
    reward_fn_for_component,
};
use crate::error::Result;
use crate::format::{BoxedMode, DEFAULT_MAX_ANSWER_CHARS};
use crate::rules::Tolerance;

/// The settings of [`DeepEyesVisual`] (`type = "deepeyes-visual"` in config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct VisualConfig {
    /// Weight of accuracy.
    pub accuracy_weight: f64,
    /// Weight of format (whose value is 0 or −1).
    pub format_weight: f64,
    /// Weight of the conditional tool bonus; 0 removes it (the "no tool reward" ablation).
    pub tool_weight: f64,
    /// The accuracy the answer must exceed for the tool bonus.
    pub tool_min_accuracy: f64,
    /// Answers this long or longer score no accuracy and break the format; 0 disables the limit.
    pub max_answer_chars: usize,
    /// Whether rule matchers run before the judge.
    pub use_rules: bool,
    /// Whether undecided answers go to the pipeline's judge.
    pub use_judge: bool,
    /// The judge prompt name.
    pub prompt: String,
    /// Numeric tolerance of the rules.
    pub tolerance: Tolerance,
}

impl Default for VisualConfig {
    fn default() -> Self {
        Self {
            accuracy_weight: 0.8,
            format_weight: 0.2,
            tool_weight: 1.2,
            tool_min_accuracy: 0.5,
            max_answer_chars: DEFAULT_MAX_ANSWER_CHARS,
            use_rules: true,
            use_judge: true,
            prompt: "visual".into(),
            tolerance: Tolerance::default(),
        }
    }
}

/// The settings of [`DeepEyesMath`] (`type = "deepeyes-math"` in config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct MathConfig {
    /// Weight of accuracy.
    pub accuracy_weight: f64,
    /// Weight of format (whose value is 0 or −1).
    pub format_weight: f64,
    /// How `\boxed{…}` is found.
    pub boxed: BoxedMode,
    /// Whether rule matchers run before the judge.
    pub use_rules: bool,
    /// Whether undecided answers go to the pipeline's judge.
    pub use_judge: bool,
    /// The judge prompt name.
    pub prompt: String,
}

impl Default for MathConfig {
    fn default() -> Self {
        Self {
            accuracy_weight: 1.2,
            format_weight: 0.4,
            boxed: BoxedMode::default(),
            use_rules: true,
            use_judge: true,
            prompt: "math".into(),
        }
    }
}

/// `0` in config means "no limit".
pub(crate) fn limit(max_answer_chars: usize) -> Option<usize> {
    (max_answer_chars > 0).then_some(max_answer_chars)
}

/// DeepEyes' reward for V*-style and chart data.
///
/// ```
/// use deepeyes_core::reward::{RewardFn, RewardInput};
/// use deepeyes_reward::{DeepEyesVisual, VisualConfig};
///
/// let reward = DeepEyesVisual::new(VisualConfig::default(), None);
/// let response = "<think>zoom</think><tool_call>{}</tool_call><tool_response><|vision_start|><|image_pad|><|vision_end|></tool_response><think>red</think><answer>Red</answer>";
/// let input = RewardInput { data_source: "vstar", question: "Colour?", ground_truth: "red", response, trajectory: None };
/// let score = reward.score(&input).unwrap();
/// assert_eq!(score.term("accuracy"), Some(1.0));
/// assert_eq!(score.term("tool"), Some(1.0));
/// assert!((score.total - 2.0).abs() < 1e-12);
/// ```
#[derive(Debug, Clone)]
pub struct DeepEyesVisual {
    name: String,
    sum: Sum,
}

impl VisualConfig {
    /// The accuracy term of this reward; `judge` decides what the rules cannot (ignored when
    /// `use_judge` is off). As an [`deepeyes_core::AnswerGrader`] it is `deepeyes eval`'s notion
    /// of a correct answer.
    pub fn accuracy(&self, judge: Option<JudgeHandle>) -> Accuracy {
        Accuracy::new(AnswerStyle::Visual, self.accuracy_weight)
            .with_max_answer_chars(limit(self.max_answer_chars))
            .with_rules(self.use_rules)
            .with_tolerance(self.tolerance)
            .with_prompt(self.prompt.clone())
            .with_judge(judge.filter(|_| self.use_judge))
    }
}

impl DeepEyesVisual {
    /// The reward with `config`; `judge` decides what the rules cannot (ignored when
    /// `use_judge` is off).
    pub fn new(config: VisualConfig, judge: Option<JudgeHandle>) -> Self {
        let max = limit(config.max_answer_chars);
        let mut parts: Vec<Arc<dyn Component>> = vec![
            Arc::new(config.accuracy(judge)),
            Arc::new(
                Format::new(AnswerStyle::Visual, config.format_weight).with_max_answer_chars(max),
            ),
        ];
        if config.tool_weight != 0.0 {
            parts.push(Arc::new(
                ToolBonus::new(config.tool_weight).with_min_accuracy(config.tool_min_accuracy),
            ));
        }
        // The parts have distinct names and the bonus follows the accuracy it reads.
        let sum = Sum::from_checked_parts("deepeyes-visual", parts);
        Self {
            name: "deepeyes-visual".into(),
            sum,
        }
    }
}

impl Component for DeepEyesVisual {
    fn score_with(
        &self,
        input: &RewardInput<'_>,
        earlier: &[RewardTerm],
    ) -> Result<RewardBreakdown> {
        self.sum.score_with(input, earlier)
    }

    fn bounds(&self) -> Bounds {
        self.sum.bounds()
    }

    fn term_names(&self) -> Option<Vec<String>> {
        self.sum.term_names()
    }
}

/// DeepEyes' reward for math/reasoning data.
///
/// ```
/// use deepeyes_core::reward::{RewardFn, RewardInput};
/// use deepeyes_reward::{DeepEyesMath, MathConfig};
///
/// let reward = DeepEyesMath::new(MathConfig::default(), None);
/// let input = RewardInput { data_source: "thinklite_eureka", question: "1/2 + 1/4?", ground_truth: "3/4", response: r"<think>sum</think> \boxed{\dfrac{3}{4}}", trajectory: None };
/// let score = reward.score(&input).unwrap();
/// assert_eq!((score.term("accuracy"), score.term("format")), (Some(1.0), Some(0.0)));
/// assert!((score.total - 1.2).abs() < 1e-12);
/// ```
#[derive(Debug, Clone)]
pub struct DeepEyesMath {
    name: String,
    sum: Sum,
}

impl DeepEyesMath {
    /// The reward with `config`; `judge` decides what the rules cannot (ignored when
    /// `use_judge` is off).
    pub fn new(config: MathConfig, judge: Option<JudgeHandle>) -> Self {
        let judge = judge.filter(|_| config.use_judge);
        let parts: Vec<Arc<dyn Component>> = vec![
            Arc::new(
                Accuracy::new(AnswerStyle::Math, config.accuracy_weight)
                    .with_boxed(config.boxed)
                    .with_rules(config.use_rules)
                    .with_prompt(config.prompt.clone())
                    .with_judge(judge),
            ),
            Arc::new(Format::new(AnswerStyle::Math, config.format_weight).with_boxed(config.boxed)),
        ];
        let sum = Sum::from_checked_parts("deepeyes-math", parts);
        Self {
            name: "deepeyes-math".into(),
            sum,
        }
    }
}

impl Component for DeepEyesMath {
    fn score_with(
        &self,
        input: &RewardInput<'_>,
        earlier: &[RewardTerm],
    ) -> Result<RewardBreakdown> {
        self.sum.score_with(input, earlier)
    }

    fn bounds(&self) -> Bounds {
        self.sum.bounds()
    }

    fn term_names(&self) -> Option<Vec<String>> {
        self.sum.term_names()
    }
}

reward_fn_for_component!(DeepEyesVisual => name, DeepEyesMath => name);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ranges_match_the_paper() {
        let visual = DeepEyesVisual::new(VisualConfig::default(), None).bounds();
        assert!((visual.min + 0.2).abs() < 1e-12 && (visual.max - 2.0).abs() < 1e-12);
        let math = DeepEyesMath::new(MathConfig::default(), None).bounds();
        assert!((math.min + 0.4).abs() < 1e-12 && (math.max - 1.2).abs() < 1e-12);
    }

    #[test]
    fn unknown_preset_keys_are_rejected() {
        let err = toml::from_str::<VisualConfig>("tool-weigth = 1.0").unwrap_err();
        assert!(err.to_string().contains("tool-weigth"), "{err}");
        let err = toml::from_str::<MathConfig>("boxd = 'balanced'").unwrap_err();
        assert!(err.to_string().contains("boxd"), "{err}");
    }
}
