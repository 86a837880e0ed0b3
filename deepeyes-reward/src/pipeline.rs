//! A pipeline routes each sample to a reward by its `data_source`; a registry lets embedding code
//! add Rust reward functions that configs name.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use deepeyes_core::reward::{RewardBreakdown, RewardFn, RewardInput};

use crate::components::{Bounds, Component, Custom};
use crate::error::{Error, Result};
use crate::judge::HttpJudge;

/// What a registered factory receives (the `params` table of a `type = "custom"` entry) and
/// returns.
pub type Factory = dyn Fn(&toml::Table) -> deepeyes_core::Result<Arc<dyn RewardFn>> + Send + Sync;

#[derive(Clone)]
struct Registered {
    factory: Arc<Factory>,
    bounds: Bounds,
}

/// Reward functions that configs can name with `type = "custom"`.
///
/// ```
/// use std::sync::Arc;
/// use deepeyes_core::reward::{RewardBreakdown, RewardInput, RewardTerm};
/// use deepeyes_reward::{Bounds, PipelineConfig, Registry};
///
/// let mut registry = Registry::new();
/// registry.register("brevity", Bounds::new(-1.0, 0.0), |params| {
///     let limit = params.get("max-chars").and_then(|v| v.as_integer()).unwrap_or(200) as usize;
///     Ok(Arc::new(move |input: &RewardInput<'_>| {
///         let over = input.response.chars().count() > limit;
///         Ok(RewardBreakdown::from_terms(vec![RewardTerm { name: "brevity".into(), value: -f64::from(u8::from(over)), weight: 1.0 }]))
///     }))
/// }).unwrap();
/// let config = PipelineConfig::from_toml_str(r#"
///     version = 1
///     default = "short"
///     [rewards.short]
///     type = "custom"
///     name = "brevity"
///     weight = 0.5
///     params = { max-chars = 5 }
/// "#, "inline").unwrap();
/// let pipeline = config.build(&registry).unwrap();
/// let input = RewardInput { data_source: "any", question: "", ground_truth: "", response: "far too long", trajectory: None };
/// assert_eq!(deepeyes_core::RewardFn::score(&pipeline, &input).unwrap().total, -0.5);
/// ```
#[derive(Clone, Default)]
pub struct Registry {
    entries: BTreeMap<String, Registered>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("names", &self.entries.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a factory under `name`; `bounds` is the range of the totals its functions
    /// return. A name can be registered once.
    pub fn register<F>(&mut self, name: impl Into<String>, bounds: Bounds, factory: F) -> Result<()>
    where
        F: Fn(&toml::Table) -> deepeyes_core::Result<Arc<dyn RewardFn>> + Send + Sync + 'static,
    {
        let name = name.into();
        if self.entries.contains_key(&name) {
            return Err(Error::config(
                format!("registry {name:?}"),
                "this name is already registered",
            ));
        }
        self.entries.insert(
            name,
            Registered {
                factory: Arc::new(factory),
                bounds,
            },
        );
        Ok(())
    }

    /// Registers one reward function that takes no parameters.
    pub fn register_fn(
        &mut self,
        name: impl Into<String>,
        bounds: Bounds,
        reward: impl RewardFn + 'static,
    ) -> Result<()> {
        let name = name.into();
        let reward: Arc<dyn RewardFn> = Arc::new(reward);
        let label = name.clone();
        self.register(name, bounds, move |params| {
            if let Some(key) = params.keys().next() {
                return Err(deepeyes_core::Error::config(
                    format!("custom reward {label:?}"),
                    format!("takes no params, got {key:?}"),
                ));
            }
            Ok(reward.clone())
        })
    }

    /// The registered names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Builds the function registered as `name` with `params`.
    pub(crate) fn instantiate(
        &self,
        name: &str,
        params: &toml::Table,
    ) -> std::result::Result<(Arc<dyn RewardFn>, Bounds), String> {
        let entry = self.entries.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.names().collect();
            format!(
                "no reward function is registered as {name:?} (registered: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            )
        })?;
        let reward = (entry.factory)(params).map_err(|e| e.to_string())?;
        Ok((reward, entry.bounds))
    }
}

/// Rewards by name, and the reward of each `data_source`.
#[derive(Clone, Default)]
pub struct Pipeline {
    rewards: BTreeMap<String, Arc<dyn Component>>,
    sources: BTreeMap<String, String>,
    default: Option<String>,
    judge: Option<Arc<HttpJudge>>,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("rewards", &self.rewards.keys().collect::<Vec<_>>())
            .field("sources", &self.sources)
            .field("default", &self.default)
            .field("judge", &self.judge)
            .finish()
    }
}

impl Pipeline {
    /// An empty pipeline.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the reward called `name`.
    pub fn add_reward(&mut self, name: impl Into<String>, reward: Arc<dyn Component>) {
        self.rewards.insert(name.into(), reward);
    }

    /// Adds a plain [`RewardFn`] as the reward called `name`.
    pub fn add_reward_fn(
        &mut self,
        name: impl Into<String>,
        reward: impl RewardFn + 'static,
        bounds: Bounds,
    ) {
        let name = name.into();
        let custom = Custom::new(name.clone(), 1.0, Arc::new(reward), bounds);
        self.rewards.insert(name, Arc::new(custom));
    }

    /// Scores `data_source` with the reward called `reward`.
    pub fn route(&mut self, data_source: impl Into<String>, reward: &str) -> Result<()> {
        self.check_reward(reward)?;
        self.sources.insert(data_source.into(), reward.to_string());
        Ok(())
    }

    /// Scores every unrouted data source with the reward called `reward`.
    pub fn set_default(&mut self, reward: &str) -> Result<()> {
        self.check_reward(reward)?;
        self.default = Some(reward.to_string());
        Ok(())
    }

    fn check_reward(&self, reward: &str) -> Result<()> {
        if self.rewards.contains_key(reward) {
            Ok(())
        } else {
            Err(Error::UnknownReward {
                name: reward.to_string(),
                known: self.rewards.keys().cloned().collect::<Vec<_>>().join(", "),
            })
        }
    }

    pub(crate) fn set_http_judge(&mut self, judge: Option<Arc<HttpJudge>>) {
        self.judge = judge;
    }

    /// The HTTP judge built from `[judge]`, if any.
    pub fn judge(&self) -> Option<&Arc<HttpJudge>> {
        self.judge.as_ref()
    }

    /// The routed data sources and their rewards.
    pub fn sources(&self) -> impl Iterator<Item = (&str, &str)> {
        self.sources.iter().map(|(s, r)| (s.as_str(), r.as_str()))
    }

    /// The reward called `name`.
    pub fn reward(&self, name: &str) -> Option<&Arc<dyn Component>> {
        self.rewards.get(name)
    }

    /// The name of the reward that scores `data_source`.
    pub fn reward_name_for(&self, data_source: &str) -> Result<&str> {
        self.sources
            .get(data_source)
            .or(self.default.as_ref())
            .map(String::as_str)
            .ok_or_else(|| Error::UnknownSource {
                data_source: data_source.to_string(),
                known: self.sources.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }

    /// The reward that scores `data_source`.
    pub fn reward_for(&self, data_source: &str) -> Result<&Arc<dyn Component>> {
        let name = self.reward_name_for(data_source)?;
        self.reward(name).ok_or_else(|| Error::UnknownReward {
            name: name.to_string(),
            known: self.rewards.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    /// The range of totals for `data_source`.
    pub fn bounds_for(&self, data_source: &str) -> Result<Bounds> {
        Ok(self.reward_for(data_source)?.bounds())
    }

    /// Scores one sample, with this crate's error type.
    pub fn evaluate(&self, input: &RewardInput<'_>) -> Result<RewardBreakdown> {
        self.reward_for(input.data_source)?.score_with(input, &[])
    }
}

impl RewardFn for Pipeline {
    fn score(&self, input: &RewardInput<'_>) -> deepeyes_core::Result<RewardBreakdown> {
        Ok(self.evaluate(input)?)
    }

    fn name(&self) -> &str {
        "pipeline"
    }

    /// The judge's `max-concurrency` (the judge itself holds requests to it), or 1 without a
    /// judge: the rules alone are too quick to be worth threads.
    fn concurrency(&self) -> usize {
        self.judge
            .as_ref()
            .map_or(1, |judge| judge.config().max_concurrency)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deepeyes_core::reward::RewardTerm;

    fn constant(value: f64) -> impl RewardFn {
        move |_: &RewardInput<'_>| {
            Ok(RewardBreakdown::from_terms(vec![RewardTerm {
                name: "c".into(),
                value,
                weight: 1.0,
            }]))
        }
    }

    fn input(data_source: &str) -> RewardInput<'_> {
        RewardInput {
            data_source,
            question: "",
            ground_truth: "",
            response: "",
            trajectory: None,
        }
    }

    #[test]
    fn routing_and_defaults() {
        let mut pipeline = Pipeline::new();
        pipeline.add_reward_fn("one", constant(1.0), Bounds::new(1.0, 1.0));
        pipeline.add_reward_fn("two", constant(2.0), Bounds::new(2.0, 2.0));
        pipeline.route("a", "one").unwrap();
        assert_eq!(pipeline.score(&input("a")).unwrap().total, 1.0);
        let err = pipeline.score(&input("b")).unwrap_err().to_string();
        assert!(err.contains("\"b\"") && err.contains("a"), "{err}");
        pipeline.set_default("two").unwrap();
        assert_eq!(pipeline.score(&input("b")).unwrap().total, 2.0);
        assert!(pipeline.route("c", "three").is_err());
        assert_eq!(pipeline.bounds_for("a").unwrap(), Bounds::new(1.0, 1.0));
    }

    #[test]
    fn registry_names_are_unique_and_params_checked() {
        let mut registry = Registry::new();
        registry
            .register_fn("c", Bounds::UNBOUNDED, constant(1.0))
            .unwrap();
        assert!(
            registry
                .register_fn("c", Bounds::UNBOUNDED, constant(1.0))
                .is_err()
        );
        let mut params = toml::Table::new();
        params.insert("x".into(), toml::Value::Integer(1));
        let err = registry.instantiate("c", &params).err().unwrap();
        assert!(err.contains("\"x\""), "{err}");
        let err = registry
            .instantiate("d", &toml::Table::new())
            .err()
            .unwrap();
        assert!(err.contains("\"d\"") && err.contains("c"), "{err}");
    }

    #[test]
    fn a_custom_reward_error_passes_through() {
        let failing = |_: &RewardInput<'_>| -> deepeyes_core::Result<RewardBreakdown> {
            Err(deepeyes_core::Error::Reward("boom".into()))
        };
        let mut pipeline = Pipeline::new();
        pipeline.add_reward_fn("f", failing, Bounds::UNBOUNDED);
        pipeline.route("a", "f").unwrap();
        let err = pipeline.score(&input("a")).unwrap_err().to_string();
        assert!(err.contains("boom"), "{err}");
        let nan = constant(f64::NAN);
        pipeline.add_reward_fn("n", nan, Bounds::UNBOUNDED);
        pipeline.route("n", "n").unwrap();
        assert!(pipeline.score(&input("n")).is_err());
    }
}
