//! The reward side: what a reward function sees and what it returns.
//!
//! DeepEyes' reward functions, rule matchers, the LLM judge and config-driven pipelines live in
//! `deepeyes-reward`; this module holds the trait they implement.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::trajectory::Trajectory;

/// Everything a reward function may look at for one finished sample.
#[derive(Debug, Clone, Copy)]
pub struct RewardInput<'a> {
    /// Which dataset the item comes from (`vstar`, `chart`, `thinklite_eureka`, …).
    pub data_source: &'a str,
    /// The question asked.
    pub question: &'a str,
    /// The reference answer.
    pub ground_truth: &'a str,
    /// The decoded response region: model text and observation tokens, special tokens kept
    /// (what DeepEyes' reward scores).
    pub response: &'a str,
    /// The full trajectory, when the reward is computed inside the trainer.
    pub trajectory: Option<&'a Trajectory>,
}

/// One weighted term of a reward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardTerm {
    /// The term's name (`accuracy`, `format`, `tool`, …).
    pub name: String,
    /// Its raw value before weighting.
    pub value: f64,
    /// Its weight in the total.
    pub weight: f64,
}

/// A reward with the terms that make it up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RewardBreakdown {
    /// `Σ weight · value` over the terms.
    pub total: f64,
    /// The terms.
    pub terms: Vec<RewardTerm>,
    /// Notes such as `judge_unavailable_rule_fallback`, so degraded scoring is never silent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

impl RewardBreakdown {
    /// A breakdown of `terms`, with the total computed from them.
    pub fn from_terms(terms: Vec<RewardTerm>) -> Self {
        let total = terms.iter().map(|t| t.value * t.weight).sum();
        Self {
            total,
            terms,
            flags: Vec::new(),
        }
    }

    /// The raw value of the term called `name`.
    pub fn term(&self, name: &str) -> Option<f64> {
        self.terms.iter().find(|t| t.name == name).map(|t| t.value)
    }
}

/// A reward function.
///
/// Closures `Fn(&RewardInput) -> Result<RewardBreakdown>` are reward functions too:
///
/// ```
/// use deepeyes_core::reward::{RewardBreakdown, RewardFn, RewardInput, RewardTerm};
///
/// let exact = |input: &RewardInput<'_>| {
///     let hit = input.response.contains(input.ground_truth);
///     Ok(RewardBreakdown::from_terms(vec![RewardTerm { name: "accuracy".into(), value: f64::from(u8::from(hit)), weight: 1.0 }]))
/// };
/// let input = RewardInput { data_source: "demo", question: "q", ground_truth: "red", response: "<answer>red</answer>", trajectory: None };
/// assert_eq!(exact.score(&input).unwrap().total, 1.0);
/// ```
pub trait RewardFn: Send + Sync {
    /// Scores one sample.
    fn score(&self, input: &RewardInput<'_>) -> Result<RewardBreakdown>;

    /// A short name for logs and metrics.
    fn name(&self) -> &str {
        "reward"
    }

    /// How many samples [`RewardFn::score_batch`] scores at once: 1 for a pure function,
    /// more for one that waits on a service (an LLM judge's `max-concurrency`).
    fn concurrency(&self) -> usize {
        1
    }

    /// Scores every input, on up to [`RewardFn::concurrency`] threads; the results are in
    /// input order whatever order they finish in, so a batch scores as its items would one by
    /// one.
    fn score_batch(&self, inputs: &[RewardInput<'_>]) -> Vec<Result<RewardBreakdown>> {
        let threads = self.concurrency().clamp(1, inputs.len().max(1));
        if threads == 1 {
            return inputs.iter().map(|input| self.score(input)).collect();
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let mut done: Vec<(usize, Result<RewardBreakdown>)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(input) = inputs.get(index) else {
                                break mine;
                            };
                            mine.push((index, self.score(input)));
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| match worker.join() {
                    Ok(mine) => mine,
                    Err(panic) => std::panic::resume_unwind(panic),
                })
                .collect()
        });
        done.sort_by_key(|(index, _)| *index);
        done.into_iter().map(|(_, result)| result).collect()
    }
}

impl<F> RewardFn for F
where
    F: Fn(&RewardInput<'_>) -> Result<RewardBreakdown> + Send + Sync,
{
    fn score(&self, input: &RewardInput<'_>) -> Result<RewardBreakdown> {
        self(input)
    }
}

/// One answer to grade: what [`AnswerGrader::grade`] is asked.
#[derive(Debug, Clone, Copy)]
pub struct GradeInput<'a> {
    /// Which dataset the item comes from.
    pub data_source: &'a str,
    /// The question as the model was asked it (options included).
    pub question: &'a str,
    /// The reference answer as a reward function sees it: the correct option's letter as shown,
    /// or the answer text of an open question.
    pub ground_truth: &'a str,
    /// The model's answer: the text inside `<answer>…</answer>`, or its last turn when it gave
    /// none.
    pub prediction: &'a str,
}

/// Who decided a [`Grade`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradedBy {
    /// A rule decided.
    Rule,
    /// The judge decided.
    Judge,
    /// The rules could not decide and no judge was configured: counted wrong, and reported.
    Undecided,
    /// The judge failed: counted wrong, and reported with its error.
    JudgeFailed,
    /// The model gave no answer at all.
    NoAnswer,
}

/// The verdict on one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grade {
    /// Whether it counts as correct.
    pub correct: bool,
    /// Who decided.
    pub by: GradedBy,
    /// The judge's raw reply or error, when the judge was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge_reply: Option<String>,
}

impl Grade {
    /// The grade of an empty answer.
    pub fn no_answer() -> Self {
        Self {
            correct: false,
            by: GradedBy::NoAnswer,
            judge_reply: None,
        }
    }
}

/// Decides whether an answer is correct: evaluation's notion of "correct", which must be the
/// training reward's (`deepeyes-reward`'s accuracy term implements both).
///
/// Closures `Fn(&GradeInput) -> Grade` are graders too:
///
/// ```
/// use deepeyes_core::reward::{AnswerGrader, Grade, GradeInput, GradedBy};
///
/// let exact = |input: &GradeInput<'_>| Grade {
///     correct: input.prediction.trim() == input.ground_truth,
///     by: GradedBy::Rule,
///     judge_reply: None,
/// };
/// let input = GradeInput { data_source: "demo", question: "q", ground_truth: "B", prediction: " B" };
/// assert!(exact.grade(&input).correct);
/// ```
pub trait AnswerGrader: Send + Sync {
    /// Grades one answer. Never fails: a failing judge is a [`GradedBy::JudgeFailed`] grade.
    fn grade(&self, input: &GradeInput<'_>) -> Grade;
}

impl<F> AnswerGrader for F
where
    F: Fn(&GradeInput<'_>) -> Grade + Send + Sync,
{
    fn grade(&self, input: &GradeInput<'_>) -> Grade {
        self(input)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// Scores a response by its length, slowly, on up to `threads` threads, counting how many
    /// calls overlap.
    struct Slow {
        threads: usize,
        in_flight: AtomicUsize,
        most: AtomicUsize,
    }

    impl RewardFn for Slow {
        fn score(&self, input: &RewardInput<'_>) -> Result<RewardBreakdown> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            // Later inputs finish first, so the order must be restored.
            std::thread::sleep(Duration::from_millis(40 - 4 * input.response.len() as u64));
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            if input.response.is_empty() {
                return Err(crate::Error::Reward("empty".into()));
            }
            Ok(RewardBreakdown::from_terms(vec![RewardTerm {
                name: "len".into(),
                value: input.response.len() as f64,
                weight: 1.0,
            }]))
        }

        fn concurrency(&self) -> usize {
            self.threads
        }
    }

    #[test]
    fn batches_keep_input_order_and_overlap_up_to_the_concurrency() {
        let responses = ["a", "bb", "", "cccc", "ddd", "eeeeee", "fffff", "gg"];
        let inputs: Vec<RewardInput<'_>> = responses
            .iter()
            .map(|response| RewardInput {
                data_source: "d",
                question: "q",
                ground_truth: "t",
                response,
                trajectory: None,
            })
            .collect();
        for threads in [1, 3] {
            let reward = Slow {
                threads,
                in_flight: AtomicUsize::new(0),
                most: AtomicUsize::new(0),
            };
            let scored = reward.score_batch(&inputs);
            let totals: Vec<Option<f64>> = scored
                .iter()
                .map(|r| r.as_ref().ok().map(|b| b.total))
                .collect();
            let expected: Vec<Option<f64>> = responses
                .iter()
                .map(|r| (!r.is_empty()).then_some(r.len() as f64))
                .collect();
            assert_eq!(totals, expected, "threads {threads}");
            let most = reward.most.load(Ordering::SeqCst);
            assert!(most <= threads, "{most} > {threads}");
            assert_eq!(
                most > 1,
                threads > 1,
                "overlap {most} with {threads} threads"
            );
        }
    }
}
