//! The building blocks of a reward: accuracy, format, the conditional tool bonus, weighted sums
//! and registered Rust functions. Each produces named, weighted terms; a [`Sum`] passes the terms
//! produced so far to the next component, which is how the tool bonus sees the accuracy.

use std::fmt;
use std::sync::Arc;

use deepeyes_core::reward::{
    AnswerGrader, Grade, GradeInput, GradedBy, RewardBreakdown, RewardFn, RewardInput, RewardTerm,
};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{
    self, BoxedMode, DEFAULT_MAX_ANSWER_CHARS, answer_text, math_format, returned_images,
    visual_format,
};
use crate::judge::{FailurePolicy, JudgeError, JudgeRequest, Verifier};
use crate::rules::{self, Tolerance};

/// Flags a breakdown may carry, so degraded or notable scoring is never silent.
pub mod flags {
    /// The answer text reached the length limit: accuracy 0 (and a format error).
    pub const ANSWER_TOO_LONG: &str = "answer_too_long";
    /// A math response had no `\boxed{…}` after its last `</think>`: accuracy 0.
    pub const NO_BOXED_ANSWER: &str = "no_boxed_answer";
    /// The rules could not decide and no judge is configured (or it is disabled): accuracy 0.
    pub const UNDECIDED_NO_JUDGE: &str = "undecided_no_judge";
    /// The judge gave no verdict and the policy is `rule-fallback`: accuracy from the rules
    /// alone, 0 for an undecided answer.
    pub const JUDGE_FALLBACK: &str = "judge_unavailable_rule_fallback";
    /// The judge decided the accuracy.
    pub const BY_JUDGE: &str = "accuracy_by_judge";
    /// The trajectory's tool outcomes and the response's image markers disagree on whether a
    /// crop was returned (the trajectory wins).
    pub const TOOL_EVIDENCE_MISMATCH: &str = "tool_evidence_mismatch";
}

/// The range a reward's total can take.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bounds {
    /// The lowest total.
    pub min: f64,
    /// The highest total.
    pub max: f64,
}

impl Bounds {
    /// No known bounds.
    pub const UNBOUNDED: Self = Self {
        min: f64::NEG_INFINITY,
        max: f64::INFINITY,
    };

    /// The range `[min, max]`.
    pub fn new(min: f64, max: f64) -> Self {
        Self { min, max }
    }

    /// The range of `weight · x` for `x` in this range.
    pub fn scaled(self, weight: f64) -> Self {
        if weight == 0.0 {
            return Self::new(0.0, 0.0);
        }
        let (a, b) = (self.min * weight, self.max * weight);
        Self::new(a.min(b), a.max(b))
    }

    /// The range of `x + y`.
    pub fn plus(self, other: Self) -> Self {
        Self::new(self.min + other.min, self.max + other.max)
    }

    /// Whether `value` lies in the range (with a rounding allowance).
    pub fn contains(self, value: f64) -> bool {
        let slack = 1e-9 * (1.0 + self.min.abs().max(self.max.abs()).min(1e12));
        value >= self.min - slack && value <= self.max + slack
    }
}

/// A part of a reward. Unlike [`RewardFn`], it sees the terms that earlier parts of the same
/// pipeline produced.
pub trait Component: Send + Sync + fmt::Debug {
    /// Scores one sample; `earlier` holds the terms produced before this component.
    fn score_with(
        &self,
        input: &RewardInput<'_>,
        earlier: &[RewardTerm],
    ) -> Result<RewardBreakdown>;

    /// The range of its total.
    fn bounds(&self) -> Bounds;

    /// The names of the terms it produces, when known in advance.
    fn term_names(&self) -> Option<Vec<String>>;

    /// The name of an earlier term it needs, if any (the tool bonus reads the accuracy).
    fn reads_term(&self) -> Option<&str> {
        None
    }
}

/// Implements [`RewardFn`] for a component, scoring it with no earlier terms; `$field` is the
/// `String` field that names it.
macro_rules! reward_fn_for_component {
    ($($ty:ty => $field:ident),* $(,)?) => {$(
        impl deepeyes_core::reward::RewardFn for $ty {
            fn score(
                &self,
                input: &deepeyes_core::reward::RewardInput<'_>,
            ) -> deepeyes_core::Result<deepeyes_core::reward::RewardBreakdown> {
                Ok($crate::components::Component::score_with(self, input, &[])?)
            }
            fn name(&self) -> &str {
                &self.$field
            }
        }
    )*};
}
pub(crate) use reward_fn_for_component;

/// Which kind of answer a component reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AnswerStyle {
    /// The text of the last `<answer>` (the whole response without one), checked by the
    /// visual rule chain, and the visual format rules.
    #[default]
    Visual,
    /// The last `\boxed{…}` after the last `</think>`, checked by the math rules, and the math
    /// format rules.
    Math,
}

impl AnswerStyle {
    /// The built-in judge prompt of this style.
    pub fn prompt(self) -> &'static str {
        match self {
            Self::Visual => "visual",
            Self::Math => "math",
        }
    }
}

/// A judge and what to do when it fails.
#[derive(Clone)]
pub struct JudgeHandle {
    /// The judge.
    pub verifier: Arc<dyn Verifier>,
    /// What happens when it gives no verdict.
    pub on_failure: FailurePolicy,
}

impl JudgeHandle {
    /// A handle over `verifier` with the policy `on_failure`.
    pub fn new(verifier: Arc<dyn Verifier>, on_failure: FailurePolicy) -> Self {
        Self {
            verifier,
            on_failure,
        }
    }
}

impl fmt::Debug for JudgeHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JudgeHandle")
            .field("verifier", &self.verifier.describe())
            .field("on_failure", &self.on_failure)
            .finish()
    }
}

/// Accuracy: 1 when the answer matches the reference, else 0. Rules first; the judge only when
/// the rules cannot decide.
#[derive(Debug, Clone)]
pub struct Accuracy {
    name: String,
    weight: f64,
    style: AnswerStyle,
    max_answer_chars: Option<usize>,
    boxed: BoxedMode,
    tolerance: Tolerance,
    use_rules: bool,
    prompt: String,
    judge: Option<JudgeHandle>,
}

impl Accuracy {
    /// An accuracy term called `accuracy` of the given style and weight, with that style's
    /// defaults (a 1000-character answer limit for visual answers), rules on and no judge.
    pub fn new(style: AnswerStyle, weight: f64) -> Self {
        Self {
            name: "accuracy".into(),
            weight,
            style,
            max_answer_chars: match style {
                AnswerStyle::Visual => Some(DEFAULT_MAX_ANSWER_CHARS),
                AnswerStyle::Math => None,
            },
            boxed: BoxedMode::default(),
            tolerance: Tolerance::default(),
            use_rules: true,
            prompt: style.prompt().into(),
            judge: None,
        }
    }

    /// Renames the term.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the answer length limit (`None`: no limit).
    #[must_use]
    pub fn with_max_answer_chars(mut self, max: Option<usize>) -> Self {
        self.max_answer_chars = max;
        self
    }

    /// Sets how boxed answers are found.
    #[must_use]
    pub fn with_boxed(mut self, boxed: BoxedMode) -> Self {
        self.boxed = boxed;
        self
    }

    /// Sets the numeric tolerance of the rules.
    #[must_use]
    pub fn with_tolerance(mut self, tolerance: Tolerance) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// Turns the rules off (every answer goes to the judge, as in DeepEyes' visual reward).
    #[must_use]
    pub fn with_rules(mut self, on: bool) -> Self {
        self.use_rules = on;
        self
    }

    /// Sets the judge prompt name.
    #[must_use]
    pub fn with_prompt(mut self, prompt: impl Into<String>) -> Self {
        self.prompt = prompt.into();
        self
    }

    /// Sets the judge.
    #[must_use]
    pub fn with_judge(mut self, judge: Option<JudgeHandle>) -> Self {
        self.judge = judge;
        self
    }

    /// The judge prompt name.
    pub fn prompt(&self) -> &str {
        &self.prompt
    }

    /// The accuracy value and its flags.
    fn value(&self, input: &RewardInput<'_>) -> Result<(f64, Vec<&'static str>)> {
        let prediction = match self.style {
            AnswerStyle::Visual => answer_text(input.response),
            AnswerStyle::Math => match math_format(input.response, self.boxed).answer() {
                Some(answer) => format::py_strip(answer),
                None => return Ok((0.0, vec![flags::NO_BOXED_ANSWER])),
            },
        };
        match self.decide(prediction, input.question, input.ground_truth) {
            Decision::TooLong => Ok((0.0, vec![flags::ANSWER_TOO_LONG])),
            Decision::Rule(value) => Ok((value, Vec::new())),
            Decision::Undecided => Ok((0.0, vec![flags::UNDECIDED_NO_JUDGE])),
            Decision::Judge { correct, .. } => {
                Ok((f64::from(u8::from(correct)), vec![flags::BY_JUDGE]))
            }
            Decision::JudgeFailed(err) => match self.judge.as_ref().map(|j| j.on_failure) {
                Some(FailurePolicy::RuleFallback) => {
                    // An open breaker was reported once when it opened; one line per answer
                    // after that would bury the log.
                    if matches!(err, JudgeError::CircuitOpen { .. }) {
                        tracing::debug!(data_source = input.data_source, error = %err, "judge not asked; scoring by the rules alone");
                    } else {
                        tracing::warn!(
                            data_source = input.data_source,
                            error = %err,
                            "judge unavailable; scoring by the rules alone"
                        );
                    }
                    Ok((0.0, vec![flags::JUDGE_FALLBACK]))
                }
                _ => Err(Error::Judge(err)),
            },
        }
    }

    /// Whether `prediction` (an extracted answer) is `ground_truth`: the length limit, the rules
    /// of this style, then the judge. Training's accuracy and evaluation's grade both come from
    /// here.
    fn decide(&self, prediction: &str, question: &str, ground_truth: &str) -> Decision {
        if self
            .max_answer_chars
            .is_some_and(|max| prediction.chars().count() >= max)
        {
            return Decision::TooLong;
        }
        if self.use_rules {
            let outcome = match self.style {
                AnswerStyle::Visual => {
                    rules::visual_answer(prediction, ground_truth, question, self.tolerance)
                }
                AnswerStyle::Math => rules::math_answer(prediction, ground_truth),
            };
            if let Some(value) = outcome.verdict.accuracy() {
                tracing::trace!(rule = outcome.rule, value, "accuracy decided by a rule");
                return Decision::Rule(value);
            }
        }
        let Some(judge) = &self.judge else {
            return Decision::Undecided;
        };
        let request = JudgeRequest {
            prompt: &self.prompt,
            question,
            reference: ground_truth,
            prediction,
        };
        match judge.verifier.verify(&request) {
            Ok(verdict) => Decision::Judge {
                correct: verdict.correct,
                reply: verdict.raw_reply,
            },
            Err(err) => Decision::JudgeFailed(err),
        }
    }
}

/// How [`Accuracy`] decided one answer.
enum Decision {
    /// The answer reached the length limit: wrong.
    TooLong,
    /// A rule decided (1 or 0).
    Rule(f64),
    /// No rule decided and there is no judge.
    Undecided,
    /// The judge decided.
    Judge {
        /// Its verdict.
        correct: bool,
        /// Its raw reply.
        reply: String,
    },
    /// The judge gave no verdict.
    JudgeFailed(JudgeError),
}

/// The accuracy term as evaluation's grader: `deepeyes eval` counts an answer correct exactly
/// when this term would pay 1 for it in training. A failing judge is reported, never an error.
impl AnswerGrader for Accuracy {
    fn grade(&self, input: &GradeInput<'_>) -> Grade {
        let prediction = input.prediction.trim();
        if prediction.is_empty() {
            return Grade::no_answer();
        }
        let (correct, by, judge_reply) =
            match self.decide(prediction, input.question, input.ground_truth) {
                Decision::TooLong => (false, GradedBy::Rule, None),
                Decision::Rule(value) => (value > 0.5, GradedBy::Rule, None),
                Decision::Undecided => (false, GradedBy::Undecided, None),
                Decision::Judge { correct, reply } => (correct, GradedBy::Judge, Some(reply)),
                Decision::JudgeFailed(err) => {
                    tracing::warn!(
                        data_source = input.data_source,
                        error = %err,
                        "the judge failed; the answer counts as wrong"
                    );
                    (false, GradedBy::JudgeFailed, Some(err.to_string()))
                }
            };
        Grade {
            correct,
            by,
            judge_reply,
        }
    }
}

impl Component for Accuracy {
    fn score_with(&self, input: &RewardInput<'_>, _: &[RewardTerm]) -> Result<RewardBreakdown> {
        let (value, flags) = self.value(input)?;
        Ok(breakdown(&self.name, value, self.weight, flags))
    }

    fn bounds(&self) -> Bounds {
        Bounds::new(0.0, 1.0).scaled(self.weight)
    }

    fn term_names(&self) -> Option<Vec<String>> {
        Some(vec![self.name.clone()])
    }
}

/// Format: 0 when the response follows DeepEyes' format rules of its style, else −1; each
/// broken rule adds a `format_*` flag.
#[derive(Debug, Clone)]
pub struct Format {
    name: String,
    weight: f64,
    style: AnswerStyle,
    max_answer_chars: Option<usize>,
    boxed: BoxedMode,
}

impl Format {
    /// A format term called `format` of the given style and weight, with that style's defaults.
    pub fn new(style: AnswerStyle, weight: f64) -> Self {
        Self {
            name: "format".into(),
            weight,
            style,
            max_answer_chars: match style {
                AnswerStyle::Visual => Some(DEFAULT_MAX_ANSWER_CHARS),
                AnswerStyle::Math => None,
            },
            boxed: BoxedMode::default(),
        }
    }

    /// Renames the term.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the answer length limit of the visual rules (`None`: no limit).
    #[must_use]
    pub fn with_max_answer_chars(mut self, max: Option<usize>) -> Self {
        self.max_answer_chars = max;
        self
    }

    /// Sets how boxed answers are found (math rules).
    #[must_use]
    pub fn with_boxed(mut self, boxed: BoxedMode) -> Self {
        self.boxed = boxed;
        self
    }
}

impl Component for Format {
    fn score_with(&self, input: &RewardInput<'_>, _: &[RewardTerm]) -> Result<RewardBreakdown> {
        let violations = match self.style {
            AnswerStyle::Visual => visual_format(input.response, self.max_answer_chars).violations,
            AnswerStyle::Math => math_format(input.response, self.boxed).violations,
        };
        let value = if violations.is_empty() { 0.0 } else { -1.0 };
        let flags = violations.iter().map(|v| v.flag()).collect();
        Ok(breakdown(&self.name, value, self.weight, flags))
    }

    fn bounds(&self) -> Bounds {
        Bounds::new(-1.0, 0.0).scaled(self.weight)
    }

    fn term_names(&self) -> Option<Vec<String>> {
        Some(vec![self.name.clone()])
    }
}

/// The conditional tool bonus: 1 when an earlier accuracy term exceeds `min_accuracy` *and* at
/// least one image observation was really returned, else 0.
///
/// Evidence of a returned image: with a [`Trajectory`](deepeyes_core::Trajectory), a tool call
/// whose outcome returned an image; without one, an image start marker in the response (only a
/// successful crop puts one there). When both are available and disagree, the trajectory wins
/// and the breakdown is flagged.
#[derive(Debug, Clone)]
pub struct ToolBonus {
    name: String,
    weight: f64,
    min_accuracy: f64,
    accuracy_term: String,
}

impl ToolBonus {
    /// A bonus called `tool` paid when the `accuracy` term exceeds 0.5.
    pub fn new(weight: f64) -> Self {
        Self {
            name: "tool".into(),
            weight,
            min_accuracy: 0.5,
            accuracy_term: "accuracy".into(),
        }
    }

    /// Renames the term.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the accuracy the answer must exceed.
    #[must_use]
    pub fn with_min_accuracy(mut self, min_accuracy: f64) -> Self {
        self.min_accuracy = min_accuracy;
        self
    }

    /// Pays for every returned crop whatever the accuracy (the ablation of DeepEyes'
    /// condition); the accuracy term must still be there.
    #[must_use]
    pub fn unconditional(mut self) -> Self {
        self.min_accuracy = f64::NEG_INFINITY;
        self
    }

    /// Sets the name of the accuracy term it reads.
    #[must_use]
    pub fn with_accuracy_term(mut self, term: impl Into<String>) -> Self {
        self.accuracy_term = term.into();
        self
    }

    /// The accuracy term it reads.
    pub fn accuracy_term(&self) -> &str {
        &self.accuracy_term
    }
}

/// Whether a crop was returned to the model, and whether the two kinds of evidence disagree.
pub fn image_returned(input: &RewardInput<'_>) -> (bool, bool) {
    let in_text = returned_images(input.response) > 0;
    match input.trajectory {
        Some(trajectory) => {
            let recorded = trajectory.successful_image_calls() > 0;
            (recorded, recorded != in_text)
        }
        None => (in_text, false),
    }
}

impl Component for ToolBonus {
    fn score_with(
        &self,
        input: &RewardInput<'_>,
        earlier: &[RewardTerm],
    ) -> Result<RewardBreakdown> {
        let accuracy = earlier
            .iter()
            .rev()
            .find(|t| t.name == self.accuracy_term)
            .ok_or_else(|| Error::MissingTerm {
                component: format!("tool bonus {:?}", self.name),
                term: self.accuracy_term.clone(),
            })?
            .value;
        let (returned, mismatch) = image_returned(input);
        let mut flags = Vec::new();
        if mismatch {
            flags.push(flags::TOOL_EVIDENCE_MISMATCH);
        }
        let paid = accuracy > self.min_accuracy && returned;
        Ok(breakdown(
            &self.name,
            f64::from(u8::from(paid)),
            self.weight,
            flags,
        ))
    }

    fn bounds(&self) -> Bounds {
        Bounds::new(0.0, 1.0).scaled(self.weight)
    }

    fn term_names(&self) -> Option<Vec<String>> {
        Some(vec![self.name.clone()])
    }

    fn reads_term(&self) -> Option<&str> {
        Some(&self.accuracy_term)
    }
}

/// A weighted sum of components, scored in order; each sees the terms of those before it.
/// Its terms are its components' terms with their weights multiplied by its own.
#[derive(Debug, Clone)]
pub struct Sum {
    label: String,
    weight: f64,
    components: Vec<Arc<dyn Component>>,
}

impl Sum {
    /// A sum of `components` with weight 1. Fails when a tool bonus comes before the accuracy it
    /// reads, or two components produce the same term name.
    pub fn new(label: impl Into<String>, components: Vec<Arc<dyn Component>>) -> Result<Self> {
        let label = label.into();
        let mut seen: Vec<String> = Vec::new();
        let mut known = true;
        for component in &components {
            let Some(names) = component.term_names() else {
                known = false;
                continue;
            };
            for name in names {
                if seen.contains(&name) {
                    return Err(Error::config(
                        &label,
                        format!(
                            "two components produce the term {name:?}; rename one (`name = …`)"
                        ),
                    ));
                }
                seen.push(name);
            }
        }
        if known {
            // Term names are all known: check every tool bonus finds its accuracy earlier.
            let mut before: Vec<String> = Vec::new();
            for component in &components {
                if let Some(term) = component.reads_term()
                    && !before.iter().any(|b| b == term)
                {
                    return Err(Error::config(
                        &label,
                        format!(
                            "a tool bonus reads the term {term:?}, but no component before it produces it"
                        ),
                    ));
                }
                before.extend(component.term_names().unwrap_or_default());
            }
        }
        Ok(Self {
            label,
            weight: 1.0,
            components,
        })
    }

    /// A sum whose parts the caller has already checked.
    pub(crate) fn from_checked_parts(
        label: impl Into<String>,
        components: Vec<Arc<dyn Component>>,
    ) -> Self {
        Self {
            label: label.into(),
            weight: 1.0,
            components,
        }
    }

    /// Sets its weight.
    #[must_use]
    pub fn with_weight(mut self, weight: f64) -> Self {
        self.weight = weight;
        self
    }

    /// Its label (the config path it was built from).
    pub fn label(&self) -> &str {
        &self.label
    }
}

impl Component for Sum {
    fn score_with(
        &self,
        input: &RewardInput<'_>,
        earlier: &[RewardTerm],
    ) -> Result<RewardBreakdown> {
        let mut context: Vec<RewardTerm> = earlier.to_vec();
        let mut terms = Vec::new();
        let mut all_flags: Vec<String> = Vec::new();
        for component in &self.components {
            let part = component.score_with(input, &context)?;
            for term in part.terms {
                let scaled = RewardTerm {
                    weight: term.weight * self.weight,
                    ..term
                };
                context.push(scaled.clone());
                terms.push(scaled);
            }
            for flag in part.flags {
                if !all_flags.contains(&flag) {
                    all_flags.push(flag);
                }
            }
        }
        let mut out = RewardBreakdown::from_terms(terms);
        out.flags = all_flags;
        Ok(out)
    }

    fn bounds(&self) -> Bounds {
        self.components
            .iter()
            .fold(Bounds::new(0.0, 0.0), |acc, c| acc.plus(c.bounds()))
            .scaled(self.weight)
    }

    fn term_names(&self) -> Option<Vec<String>> {
        let mut names = Vec::new();
        for component in &self.components {
            names.extend(component.term_names()?);
        }
        Some(names)
    }
}

/// A reward function written in Rust and registered by name, weighted.
#[derive(Clone)]
pub struct Custom {
    name: String,
    weight: f64,
    inner: Arc<dyn RewardFn>,
    bounds: Bounds,
}

impl Custom {
    /// Wraps `inner`; `bounds` is the range of its own total (before `weight`).
    pub fn new(
        name: impl Into<String>,
        weight: f64,
        inner: Arc<dyn RewardFn>,
        bounds: Bounds,
    ) -> Self {
        Self {
            name: name.into(),
            weight,
            inner,
            bounds,
        }
    }
}

impl fmt::Debug for Custom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Custom")
            .field("name", &self.name)
            .field("weight", &self.weight)
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

impl Component for Custom {
    fn score_with(&self, input: &RewardInput<'_>, _: &[RewardTerm]) -> Result<RewardBreakdown> {
        let inner = self.inner.score(input).map_err(|source| Error::Custom {
            name: self.name.clone(),
            source,
        })?;
        if !inner.total.is_finite()
            || inner
                .terms
                .iter()
                .any(|t| !(t.value * t.weight).is_finite())
        {
            return Err(Error::Custom {
                name: self.name.clone(),
                source: deepeyes_core::Error::Reward(format!(
                    "returned a non-finite reward ({})",
                    inner.total
                )),
            });
        }
        let terms = if inner.terms.is_empty() {
            vec![RewardTerm {
                name: self.name.clone(),
                value: inner.total,
                weight: self.weight,
            }]
        } else {
            inner
                .terms
                .into_iter()
                .map(|t| RewardTerm {
                    weight: t.weight * self.weight,
                    ..t
                })
                .collect()
        };
        let mut out = RewardBreakdown::from_terms(terms);
        out.flags = inner.flags;
        Ok(out)
    }

    fn bounds(&self) -> Bounds {
        self.bounds.scaled(self.weight)
    }

    fn term_names(&self) -> Option<Vec<String>> {
        None
    }
}

fn breakdown(name: &str, value: f64, weight: f64, flags: Vec<&'static str>) -> RewardBreakdown {
    let mut out = RewardBreakdown::from_terms(vec![RewardTerm {
        name: name.to_string(),
        value,
        weight,
    }]);
    out.flags = flags.into_iter().map(str::to_string).collect();
    out
}

reward_fn_for_component!(Accuracy => name, Format => name, Sum => label);
