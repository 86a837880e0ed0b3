//! Reward pipelines from TOML.
//!
//! ```toml
//! version = 1
//!
//! [sources]              # data_source → reward name
//! vstar = "visual"
//! thinklite_eureka = "math"
//!
//! [rewards.visual]       # a weighted sum of components
//! type = "sum"
//! [[rewards.visual.components]]
//! type = "accuracy"
//! style = "visual"
//! weight = 0.8
//! [[rewards.visual.components]]
//! type = "format"
//! style = "visual"
//! weight = 0.2
//! [[rewards.visual.components]]
//! type = "tool-bonus"
//! weight = 1.2
//!
//! [rewards.math]         # or a ready-made preset
//! type = "deepeyes-math"
//!
//! [judge]                # optional: decides what the rules cannot
//! base-url = "http://127.0.0.1:18901"
//! ```
//!
//! Every table rejects unknown keys, naming them. `type = "custom"` builds a reward function
//! that embedding code registered under a name ([`Registry`](crate::Registry)).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::components::{
    Accuracy, AnswerStyle, Component, Custom, Format, JudgeHandle, Sum, ToolBonus,
};
use crate::deepeyes::{DeepEyesMath, DeepEyesVisual, MathConfig, VisualConfig, limit};
use crate::error::{Error, Result};
use crate::format::BoxedMode;
use crate::judge::{HttpJudge, JudgeConfig};
use crate::pipeline::{Pipeline, Registry};
use crate::rules::Tolerance;

/// The shipped DeepEyes pipeline (`configs/rewards/deepeyes.toml`), embedded so it works from
/// any directory.
pub const DEEPEYES_TOML: &str = include_str!("../../configs/rewards/deepeyes.toml");

/// The config format version this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// A reward pipeline as written in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PipelineConfig {
    /// The format version; must be [`CONFIG_VERSION`].
    pub version: u32,
    /// Which reward scores each `data_source`.
    #[serde(default)]
    pub sources: BTreeMap<String, String>,
    /// The reward for data sources not listed in `sources`; absent makes them an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// The rewards, by name.
    pub rewards: BTreeMap<String, RewardSpec>,
    /// The judge; absent scores by the rules alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeConfig>,
}

/// A reward or a part of one: a built-in, identified by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum RewardSpec {
    /// DeepEyes' visual reward as one preset.
    DeepeyesVisual(VisualConfig),
    /// DeepEyes' math reward as one preset.
    DeepeyesMath(MathConfig),
    /// An accuracy term.
    Accuracy(AccuracySpec),
    /// A format term.
    Format(FormatSpec),
    /// The conditional tool bonus.
    ToolBonus(ToolBonusSpec),
    /// A weighted sum of components.
    Sum(SumSpec),
    /// A reward function registered by embedding code.
    Custom(CustomSpec),
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

/// `type = "accuracy"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct AccuracySpec {
    /// The term's name.
    #[serde(default = "AccuracySpec::default_name")]
    pub name: String,
    /// Its weight.
    #[serde(default = "one")]
    pub weight: f64,
    /// Which answers it reads.
    #[serde(default)]
    pub style: AnswerStyle,
    /// The answer length limit; absent: 1000 for visual answers, none for math; 0: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_answer_chars: Option<usize>,
    /// How `\boxed{…}` is found (math).
    #[serde(default)]
    pub boxed: BoxedMode,
    /// Numeric tolerance of the rules.
    #[serde(default)]
    pub tolerance: Tolerance,
    /// Whether rule matchers run before the judge.
    #[serde(default = "yes")]
    pub use_rules: bool,
    /// Whether undecided answers go to the judge.
    #[serde(default = "yes")]
    pub use_judge: bool,
    /// The judge prompt; absent: the style's built-in (`visual` or `math`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
}

impl AccuracySpec {
    fn default_name() -> String {
        "accuracy".into()
    }
}

/// `type = "format"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FormatSpec {
    /// The term's name.
    #[serde(default = "FormatSpec::default_name")]
    pub name: String,
    /// Its weight.
    #[serde(default = "one")]
    pub weight: f64,
    /// Which rules it checks.
    #[serde(default)]
    pub style: AnswerStyle,
    /// The answer length limit of the visual rules; absent: 1000; 0: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_answer_chars: Option<usize>,
    /// How `\boxed{…}` is found (math).
    #[serde(default)]
    pub boxed: BoxedMode,
}

impl FormatSpec {
    fn default_name() -> String {
        "format".into()
    }
}

/// `type = "tool-bonus"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ToolBonusSpec {
    /// The term's name.
    #[serde(default = "ToolBonusSpec::default_name")]
    pub name: String,
    /// Its weight.
    #[serde(default = "one")]
    pub weight: f64,
    /// The accuracy the answer must exceed.
    #[serde(default = "ToolBonusSpec::default_min_accuracy")]
    pub min_accuracy: f64,
    /// Pays for every returned crop, right answer or not (`min-accuracy` is then ignored): the
    /// ablation of DeepEyes' condition, which a policy can game by zooming anywhere.
    #[serde(default)]
    pub unconditional: bool,
    /// The accuracy term it reads (produced by an earlier component).
    #[serde(default = "AccuracySpec::default_name")]
    pub accuracy_term: String,
}

impl ToolBonusSpec {
    fn default_name() -> String {
        "tool".into()
    }
    fn default_min_accuracy() -> f64 {
        0.5
    }
}

/// `type = "sum"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SumSpec {
    /// A weight applied to every term of the sum.
    #[serde(default = "one")]
    pub weight: f64,
    /// The components, scored in order.
    pub components: Vec<RewardSpec>,
}

/// `type = "custom"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CustomSpec {
    /// The registered name.
    pub name: String,
    /// A weight applied to its terms.
    #[serde(default = "one")]
    pub weight: f64,
    /// Parameters handed to the registered factory.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub params: toml::Table,
}

impl PipelineConfig {
    /// Parses a config from TOML; `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let config: Self = toml::from_str(text).map_err(|e| Error::config(origin, e))?;
        config.check_version(origin)?;
        Ok(config)
    }

    /// Reads a config from a TOML table embedded in another file (the training config's
    /// `[reward]`); `origin` names it in errors.
    pub fn from_table(table: &toml::Table, origin: &str) -> Result<Self> {
        let config: Self = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e| Error::config(origin, e))?;
        config.check_version(origin)?;
        Ok(config)
    }

    /// Reads a config file.
    pub fn from_toml_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// The shipped DeepEyes pipeline.
    pub fn deepeyes() -> Result<Self> {
        Self::from_toml_str(DEEPEYES_TOML, "configs/rewards/deepeyes.toml (built in)")
    }

    /// The config as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::config("pipeline", e))
    }

    fn check_version(&self, origin: &str) -> Result<()> {
        if self.version != CONFIG_VERSION {
            return Err(Error::config(
                format!("{origin}: version"),
                format!(
                    "version {} is not supported (this build reads version {CONFIG_VERSION})",
                    self.version
                ),
            ));
        }
        Ok(())
    }

    /// Builds the pipeline, with an [`HttpJudge`] when `[judge]` is present.
    pub fn build(&self, registry: &Registry) -> Result<Pipeline> {
        let judge = match &self.judge {
            Some(config) => Some(Arc::new(HttpJudge::new(config.clone())?)),
            None => None,
        };
        let handle = judge.as_ref().map(|j| {
            JudgeHandle::new(j.clone() as Arc<dyn crate::judge::Verifier>, j.on_failure())
        });
        let prompts: Option<Vec<String>> = judge
            .as_ref()
            .map(|j| j.prompts().keys().cloned().collect());
        let mut pipeline = self.build_with_judge(registry, handle, prompts.as_deref())?;
        pipeline.set_http_judge(judge);
        Ok(pipeline)
    }

    /// Builds the pipeline around any judge (`None`: rules only), ignoring `[judge]`.
    /// `prompts` lists the prompt names the judge knows, when that can be checked.
    pub fn build_with_judge(
        &self,
        registry: &Registry,
        judge: Option<JudgeHandle>,
        prompts: Option<&[String]>,
    ) -> Result<Pipeline> {
        self.check_version("pipeline")?;
        let builder = Builder {
            registry,
            judge,
            prompts,
        };
        let mut pipeline = Pipeline::new();
        for (name, spec) in &self.rewards {
            let component = builder.build(spec, &format!("rewards.{name}"))?;
            pipeline.add_reward(name.clone(), component);
        }
        for (source, reward) in &self.sources {
            pipeline
                .route(source.clone(), reward)
                .map_err(|e| Error::config(format!("sources.{source}"), e))?;
        }
        if let Some(default) = &self.default {
            pipeline
                .set_default(default)
                .map_err(|e| Error::config("default", e))?;
        }
        Ok(pipeline)
    }
}

struct Builder<'a> {
    registry: &'a Registry,
    judge: Option<JudgeHandle>,
    prompts: Option<&'a [String]>,
}

impl Builder<'_> {
    fn build(&self, spec: &RewardSpec, at: &str) -> Result<Arc<dyn Component>> {
        let weight_of = |w: f64, key: &str| check_weight(w, &format!("{at}.{key}"));
        Ok(match spec {
            RewardSpec::DeepeyesVisual(config) => {
                weight_of(config.accuracy_weight, "accuracy-weight")?;
                weight_of(config.format_weight, "format-weight")?;
                weight_of(config.tool_weight, "tool-weight")?;
                check_unit(config.tool_min_accuracy, &format!("{at}.tool-min-accuracy"))?;
                let judge = self.judge_for(config.use_judge, &config.prompt, at)?;
                Arc::new(DeepEyesVisual::new(config.clone(), judge))
            }
            RewardSpec::DeepeyesMath(config) => {
                weight_of(config.accuracy_weight, "accuracy-weight")?;
                weight_of(config.format_weight, "format-weight")?;
                let judge = self.judge_for(config.use_judge, &config.prompt, at)?;
                Arc::new(DeepEyesMath::new(config.clone(), judge))
            }
            RewardSpec::Accuracy(spec) => {
                weight_of(spec.weight, "weight")?;
                let prompt = spec
                    .prompt
                    .clone()
                    .unwrap_or_else(|| spec.style.prompt().to_string());
                let judge = self.judge_for(spec.use_judge, &prompt, at)?;
                let mut accuracy = Accuracy::new(spec.style, spec.weight)
                    .with_name(&spec.name)
                    .with_boxed(spec.boxed)
                    .with_tolerance(spec.tolerance)
                    .with_rules(spec.use_rules)
                    .with_prompt(prompt)
                    .with_judge(judge);
                if let Some(max) = spec.max_answer_chars {
                    accuracy = accuracy.with_max_answer_chars(limit(max));
                }
                Arc::new(accuracy)
            }
            RewardSpec::Format(spec) => {
                weight_of(spec.weight, "weight")?;
                let mut format = Format::new(spec.style, spec.weight)
                    .with_name(&spec.name)
                    .with_boxed(spec.boxed);
                if let Some(max) = spec.max_answer_chars {
                    format = format.with_max_answer_chars(limit(max));
                }
                Arc::new(format)
            }
            RewardSpec::ToolBonus(spec) => {
                weight_of(spec.weight, "weight")?;
                check_unit(spec.min_accuracy, &format!("{at}.min-accuracy"))?;
                let bonus = ToolBonus::new(spec.weight)
                    .with_name(&spec.name)
                    .with_min_accuracy(spec.min_accuracy)
                    .with_accuracy_term(&spec.accuracy_term);
                Arc::new(if spec.unconditional {
                    bonus.unconditional()
                } else {
                    bonus
                })
            }
            RewardSpec::Sum(spec) => {
                weight_of(spec.weight, "weight")?;
                if spec.components.is_empty() {
                    return Err(Error::config(at, "a sum needs at least one component"));
                }
                let parts = spec
                    .components
                    .iter()
                    .enumerate()
                    .map(|(i, part)| self.build(part, &format!("{at}.components[{i}]")))
                    .collect::<Result<Vec<_>>>()?;
                Arc::new(Sum::new(at, parts)?.with_weight(spec.weight))
            }
            RewardSpec::Custom(spec) => {
                weight_of(spec.weight, "weight")?;
                let (inner, bounds) = self
                    .registry
                    .instantiate(&spec.name, &spec.params)
                    .map_err(|e| Error::config(format!("{at}.name"), e))?;
                Arc::new(Custom::new(&spec.name, spec.weight, inner, bounds))
            }
        })
    }

    fn judge_for(&self, use_judge: bool, prompt: &str, at: &str) -> Result<Option<JudgeHandle>> {
        if !use_judge {
            return Ok(None);
        }
        if let Some(known) = self.prompts
            && !known.iter().any(|p| p == prompt)
        {
            return Err(Error::config(
                format!("{at}.prompt"),
                format!(
                    "the judge has no prompt {prompt:?} (known: {}); add [judge.prompts.{prompt}]",
                    known.join(", ")
                ),
            ));
        }
        Ok(self.judge.clone())
    }
}

fn check_weight(weight: f64, at: &str) -> Result<()> {
    if weight.is_finite() {
        Ok(())
    } else {
        Err(Error::config(
            at,
            format!("{weight} is not a finite weight"),
        ))
    }
}

fn check_unit(value: f64, at: &str) -> Result<()> {
    if (0.0..=1.0).contains(&value) {
        Ok(())
    } else {
        Err(Error::config(at, format!("{value} is outside 0 … 1")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PipelineConfig> {
        PipelineConfig::from_toml_str(text, "test.toml")
    }

    #[test]
    fn the_shipped_config_parses_and_round_trips() {
        let config = PipelineConfig::deepeyes().unwrap();
        assert_eq!(
            config.sources.get("vstar").map(String::as_str),
            Some("visual")
        );
        assert_eq!(
            config.sources.get("thinklite_eureka").map(String::as_str),
            Some("math")
        );
        let again = PipelineConfig::from_toml_str(&config.to_toml().unwrap(), "again").unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn unknown_keys_are_rejected_by_name_at_every_level() {
        let cases = [
            ("version = 1\nrewardz = {}", "rewardz"),
            (
                "version = 1\n[rewards.a]\ntype = 'accuracy'\nwieght = 1.0",
                "wieght",
            ),
            (
                "version = 1\n[rewards.a]\ntype = 'sum'\n[[rewards.a.components]]\ntype = 'tool-bonus'\nmin-acc = 0.5",
                "min-acc",
            ),
            (
                "version = 1\n[rewards.a]\ntype = 'deepeyes-visual'\ntool_weight = 1.0",
                "tool_weight",
            ),
            (
                "version = 1\n[rewards.a]\ntype = 'format'\nstyle = 'visual'\nlimit = 3",
                "limit",
            ),
            (
                "version = 1\n[rewards.a]\ntype = 'custom'\nname = 'x'\nparam = {}",
                "param",
            ),
            (
                "version = 1\nrewards = {}\n[judge]\nbase-url = 'http://x'\nretries = 2",
                "retries",
            ),
            (
                "version = 1\nrewards = {}\n[judge]\nbase-url = 'http://x'\n[judge.prompts.visual]\ntemp = 0.1",
                "temp",
            ),
        ];
        for (text, key) in cases {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn integer_weights_and_custom_params_survive_the_tagged_enum() {
        let config = parse(
            "version = 1\n[rewards.a]\ntype = 'sum'\nweight = 2\n[[rewards.a.components]]\ntype = 'accuracy'\nweight = 1\n[[rewards.a.components]]\ntype = 'custom'\nname = 'x'\nparams = { n = 3, s = 'v' }",
        )
        .unwrap();
        let RewardSpec::Sum(sum) = &config.rewards["a"] else {
            panic!("not a sum: {:?}", config.rewards["a"]);
        };
        assert_eq!(sum.weight, 2.0);
        assert!(matches!(&sum.components[0], RewardSpec::Accuracy(a) if a.weight == 1.0));
        let RewardSpec::Custom(custom) = &sum.components[1] else {
            panic!("not custom");
        };
        assert_eq!(
            custom.params.get("n").and_then(toml::Value::as_integer),
            Some(3)
        );
    }

    #[test]
    fn unknown_types_and_versions_are_rejected() {
        let err = parse("version = 1\n[rewards.a]\ntype = 'magic'").unwrap_err();
        assert!(err.to_string().contains("magic"), "{err}");
        let err = parse("version = 2\nrewards = {}").unwrap_err();
        assert!(err.to_string().contains("version 2"), "{err}");
    }

    #[test]
    fn build_errors_name_the_place() {
        let registry = Registry::new();
        let build = |text: &str| {
            parse(text)
                .unwrap()
                .build(&registry)
                .unwrap_err()
                .to_string()
        };
        let err =
            build("version = 1\n[sources]\nvstar = 'nope'\n[rewards.a]\ntype = 'deepeyes-math'");
        assert!(
            err.contains("sources.vstar") && err.contains("nope"),
            "{err}"
        );
        let err = build(
            "version = 1\n[rewards.a]\ntype = 'sum'\n[[rewards.a.components]]\ntype = 'tool-bonus'\n[[rewards.a.components]]\ntype = 'accuracy'",
        );
        assert!(
            err.contains("rewards.a") && err.contains("\"accuracy\""),
            "{err}"
        );
        let err = build(
            "version = 1\n[rewards.a]\ntype = 'sum'\n[[rewards.a.components]]\ntype = 'accuracy'\n[[rewards.a.components]]\ntype = 'accuracy'",
        );
        assert!(err.contains("two components"), "{err}");
        let err = build("version = 1\n[rewards.a]\ntype = 'custom'\nname = 'mine'");
        assert!(
            err.contains("rewards.a.name") && err.contains("mine"),
            "{err}"
        );
        let err = build("version = 1\n[rewards.a]\ntype = 'tool-bonus'\nmin-accuracy = 2.0");
        assert!(err.contains("rewards.a.min-accuracy"), "{err}");
        let err = build("version = 1\n[rewards.a]\ntype = 'sum'\ncomponents = []");
        assert!(err.contains("at least one"), "{err}");
        let err = build(
            "version = 1\n[rewards.a]\ntype = 'accuracy'\nprompt = 'geo'\n[judge]\nbase-url = 'http://127.0.0.1:9'",
        );
        assert!(
            err.contains("rewards.a.prompt") && err.contains("geo"),
            "{err}"
        );
        let err = build("version = 1\ndefault = 'x'\nrewards = {}");
        assert!(err.contains("default"), "{err}");
    }
}
