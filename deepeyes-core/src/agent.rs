//! The multi-turn agent loop: generate → parse → execute → observe → repeat.
//!
//! Groups and batches are stepped turn by turn together, so a batching backend sees every active
//! sample of a round in one [`VisionLanguageModel::generate_batch`] call. Each sample's sampling
//! seeds derive from `(seed, prompt, sample, turn)`, so a run is reproducible whatever the batch
//! composition.

use std::collections::HashSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::image::Image;
use crate::model::{
    FinishReason, GenerateRequest, Generation, SamplingParams, VisionLanguageModel,
};
use crate::preprocess::PreprocessConfig;
use crate::protocol::{
    self, CallSelection, IM_END, IMAGE_PAD, PromptTemplates, TOOL_CALL_END, TurnAction,
};
use crate::rng::Rng;
use crate::tool::{Tool, ToolContext, ToolSpec};
use crate::trajectory::{
    ImageSource, StopReason, ToolCallRecord, ToolOutcome, Trajectory, TrajectoryImage, TurnRecord,
};

/// Limits and choices of the agent loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case", default)]
pub struct AgentConfig {
    /// Most model turns per episode; with 5 there are at most 4 observations.
    pub max_turns: usize,
    /// Most images in one trajectory, inputs included.
    pub max_images: usize,
    /// Most tokens the model may generate in one turn.
    pub max_new_tokens: usize,
    /// Most tokens in the whole trajectory, prompt included, image pads counted expanded.
    pub max_total_tokens: usize,
    /// Also stop each turn at `</tool_call>`, so a model cannot run on past its call.
    pub stop_at_tool_call_end: bool,
    /// Which tool call of a turn is executed.
    pub call_selection: CallSelection,
    /// Sampling parameters of every turn.
    pub sampling: SamplingParams,
}

impl Default for AgentConfig {
    /// DeepEyes' 7B rollout limits.
    fn default() -> Self {
        Self {
            max_turns: 5,
            max_images: 32,
            max_new_tokens: 10240,
            max_total_tokens: 8192 + 20480,
            stop_at_tool_call_end: false,
            call_selection: CallSelection::Last,
            sampling: SamplingParams::default(),
        }
    }
}

/// The file in a model bundle that holds the agent-loop limits it was trained under (see
/// [`BundleAgentDefaults`]).
pub const BUNDLE_AGENT_FILE: &str = "agent.toml";

/// Agent-loop limits a model bundle carries in its [`BUNDLE_AGENT_FILE`]: those it was trained
/// under, which commands use unless told otherwise. A small model trained to stop a turn at
/// `</tool_call>` within a few dozen tokens behaves out of distribution under a 7B's limits; the
/// bundle says so itself instead of every command line repeating it. Absent keys keep the
/// command's own defaults.
///
/// ```
/// use deepeyes_core::AgentConfig;
/// use deepeyes_core::agent::BundleAgentDefaults;
///
/// let tiny = BundleAgentDefaults::from_toml_str("max-turns = 2\nstop-at-tool-call-end = true", "agent.toml")?;
/// let config = tiny.apply(AgentConfig::default());
/// assert_eq!((config.max_turns, config.stop_at_tool_call_end), (2, true));
/// assert_eq!(config.max_new_tokens, AgentConfig::default().max_new_tokens);
/// # Ok::<(), deepeyes_core::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct BundleAgentDefaults {
    /// Most model turns per episode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_turns: Option<usize>,
    /// Most images in one trajectory, inputs included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_images: Option<usize>,
    /// Most tokens generated in one turn.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// Whether each turn also stops at `</tool_call>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_at_tool_call_end: Option<bool>,
}

impl BundleAgentDefaults {
    /// The defaults of the bundle in `dir`: its [`BUNDLE_AGENT_FILE`] when present, else none.
    pub fn for_bundle(dir: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = dir.as_ref().join(BUNDLE_AGENT_FILE);
        if !path.is_file() {
            return Ok(Self::default());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::config(path.display().to_string(), format!("cannot read it: {e}"))
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses the defaults from TOML text, checking them; `origin` names the source in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self> {
        let defaults: Self = toml::from_str(text).map_err(|e| Error::config(origin, e))?;
        defaults
            .apply(AgentConfig::default())
            .validate()
            .map_err(|e| Error::config(origin, e))?;
        Ok(defaults)
    }

    /// The defaults as TOML text (what [`from_toml_str`](Self::from_toml_str) reads back).
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("numbers and booleans always serialise")
    }

    /// `config` with every limit these defaults set replaced.
    #[must_use]
    pub fn apply(&self, config: AgentConfig) -> AgentConfig {
        AgentConfig {
            max_turns: self.max_turns.unwrap_or(config.max_turns),
            max_images: self.max_images.unwrap_or(config.max_images),
            max_new_tokens: self.max_new_tokens.unwrap_or(config.max_new_tokens),
            stop_at_tool_call_end: self
                .stop_at_tool_call_end
                .unwrap_or(config.stop_at_tool_call_end),
            ..config
        }
    }
}

impl AgentConfig {
    /// Checks the values make sense.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: &str| Err(Error::config(format!("agent.{field}"), why));
        if self.max_turns == 0 {
            return bad("max-turns", "must be at least 1");
        }
        if self.max_new_tokens == 0 {
            return bad("max-new-tokens", "must be at least 1");
        }
        if self.max_images == 0 {
            return bad("max-images", "must be at least 1");
        }
        if !(self.sampling.temperature >= 0.0 && self.sampling.temperature.is_finite()) {
            return bad("sampling.temperature", "must be a finite number ≥ 0");
        }
        if !(self.sampling.top_p > 0.0 && self.sampling.top_p <= 1.0) {
            return bad("sampling.top-p", "must be in (0, 1]");
        }
        Ok(())
    }
}

/// One question about one or more images.
#[derive(Debug, Clone)]
pub struct Task {
    /// The question.
    pub question: String,
    /// The input images (the first is the one tools crop by default).
    pub images: Vec<Image>,
}

/// Runs episodes of a model with a set of tools.
pub struct Agent<'m> {
    model: &'m dyn VisionLanguageModel,
    tools: Vec<Arc<dyn Tool>>,
    specs: Vec<ToolSpec>,
    templates: PromptTemplates,
    config: AgentConfig,
    preprocess: PreprocessConfig,
    image_pad: u32,
    im_end: Vec<u32>,
    stop_sequences: Vec<Vec<u32>>,
}

impl std::fmt::Debug for Agent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field(
                "tools",
                &self.specs.iter().map(|s| &s.name).collect::<Vec<_>>(),
            )
            .field("config", &self.config)
            .finish()
    }
}

/// One running episode: a task being answered, stepped a round at a time by [`Agent::advance`]
/// (started by [`Agent::begin`]).
#[derive(Debug, Clone)]
pub struct Episode {
    traj: Trajectory,
    originals: Vec<Image>,
    expanded_len: usize,
    seed: u64,
    done: bool,
    sampling: SamplingParams,
    /// Tokens the model may still generate over all its turns (`usize::MAX`: no limit beyond
    /// the agent's).
    completion_left: usize,
}

impl<'m> Agent<'m> {
    /// An agent over `model` with `tools`. Fails on duplicate tool names, an invalid config, or a
    /// tokenizer that does not know the protocol's special tokens.
    pub fn new(
        model: &'m dyn VisionLanguageModel,
        tools: Vec<Arc<dyn Tool>>,
        templates: PromptTemplates,
        config: AgentConfig,
    ) -> Result<Self> {
        config.validate()?;
        let specs: Vec<ToolSpec> = tools.iter().map(|t| t.spec()).collect();
        let mut seen = HashSet::new();
        for spec in &specs {
            if !seen.insert(spec.name.as_str()) {
                return Err(Error::config(
                    "tools",
                    format!("two tools are named '{}'", spec.name),
                ));
            }
        }
        let codec = model.codec();
        let single = |text: &str| -> Result<u32> {
            match codec.encode(text)?.as_slice() {
                [id] => Ok(*id),
                other => Err(Error::Tokenizer(format!(
                    "{text} must be one special token, but encodes to {other:?}"
                ))),
            }
        };
        let image_pad = single(IMAGE_PAD)?;
        let im_end = vec![single(IM_END)?];
        let mut stop_sequences = vec![im_end.clone()];
        if config.stop_at_tool_call_end {
            stop_sequences.push(codec.encode(TOOL_CALL_END)?);
        }
        Ok(Self {
            preprocess: model.preprocess_config(),
            model,
            tools,
            specs,
            templates,
            config,
            image_pad,
            im_end,
            stop_sequences,
        })
    }

    /// The tools' specs, in registry order.
    pub fn tool_specs(&self) -> &[ToolSpec] {
        &self.specs
    }

    /// The loop's configuration.
    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The id of `<|image_pad|>`.
    pub fn image_pad_id(&self) -> u32 {
        self.image_pad
    }

    /// The rendered prompt text of `task` (up to the first assistant header).
    pub fn prompt_text(&self, task: &Task) -> String {
        self.prompt(task).into_text()
    }

    /// The prompt of `task` (up to the first assistant header), its question outside text.
    fn prompt(&self, task: &Task) -> protocol::Rendered {
        protocol::render_prompt(
            &self.templates.render_system(&self.specs),
            &self
                .templates
                .render_user(&task.question, task.images.len()),
        )
    }

    /// Runs one episode.
    pub fn run(&self, task: &Task, seed: u64) -> Result<Trajectory> {
        let mut out = self.run_batch(std::slice::from_ref(task), 1, seed)?;
        Ok(out.remove(0).remove(0))
    }

    /// Runs `n` samples of one task.
    pub fn run_group(&self, task: &Task, n: usize, seed: u64) -> Result<Vec<Trajectory>> {
        let mut out = self.run_batch(std::slice::from_ref(task), n, seed)?;
        Ok(out.remove(0))
    }

    /// Runs `n` samples of each task, all stepped together. The result holds one group per task.
    /// Sample `s` of task `p` is seeded with `Rng::derive_seed(seed, &[p, s])`.
    pub fn run_batch(&self, tasks: &[Task], n: usize, seed: u64) -> Result<Vec<Vec<Trajectory>>> {
        self.run_episodes(tasks, n, |p, s| {
            Rng::derive_seed(seed, &[p as u64, s as u64])
        })
    }

    /// Like [`Agent::run_batch`], but each task brings its own seed: sample `s` of task `p` is
    /// seeded with `Rng::derive_seed(seeds[p], &[s])`. A task's samples then do not depend on
    /// which other tasks share the batch, so an evaluation can be resumed or re-batched and still
    /// draw the same samples.
    pub fn run_batch_seeded(
        &self,
        tasks: &[Task],
        n: usize,
        seeds: &[u64],
    ) -> Result<Vec<Vec<Trajectory>>> {
        if seeds.len() != tasks.len() {
            return Err(Error::Invariant(format!(
                "{} seeds for {} tasks",
                seeds.len(),
                tasks.len()
            )));
        }
        self.run_episodes(tasks, n, |p, s| Rng::derive_seed(seeds[p], &[s as u64]))
    }

    fn run_episodes(
        &self,
        tasks: &[Task],
        n: usize,
        episode_seed: impl Fn(usize, usize) -> u64,
    ) -> Result<Vec<Vec<Trajectory>>> {
        let mut episodes = Vec::with_capacity(tasks.len() * n);
        for (p, task) in tasks.iter().enumerate() {
            let prompt = self.start(task)?;
            for s in 0..n {
                episodes.push(prompt.clone_for(episode_seed(p, s)));
            }
        }
        loop {
            let mut active: Vec<&mut Episode> = episodes.iter_mut().filter(|e| !e.done).collect();
            if active.is_empty() {
                break;
            }
            self.advance(&mut active)
                .into_iter()
                .collect::<Result<()>>()?;
        }
        let mut groups: Vec<Vec<Trajectory>> =
            (0..tasks.len()).map(|_| Vec::with_capacity(n)).collect();
        for (k, ep) in episodes.into_iter().enumerate() {
            let traj = ep.into_trajectory();
            traj.check_invariants(self.image_pad)?;
            groups[k / n.max(1)].push(traj);
        }
        Ok(groups)
    }

    /// Starts an episode of `task` whose turns are seeded from `seed` as [`Agent::run`] seeds
    /// them; it samples with the agent's parameters unless [`Episode::with_sampling`] says
    /// otherwise. Step it with [`Agent::advance`].
    pub fn begin(&self, task: &Task, seed: u64) -> Result<Episode> {
        Ok(self.start(task)?.clone_for(seed))
    }

    /// Runs one round: every episode in `episodes` that is not done generates its next turn, all
    /// in one [`VisionLanguageModel::generate_batch`] call, and acts on it (a tool call's
    /// observation is appended). Episodes may be at different turns and come from different
    /// tasks, so a server can let new episodes join between rounds. Returns one result per
    /// episode, in order; an episode whose round failed is done and must be dropped.
    pub fn advance(&self, episodes: &mut [&mut Episode]) -> Vec<Result<()>> {
        let mut outcomes: Vec<Result<()>> = (0..episodes.len()).map(|_| Ok(())).collect();
        let mut requesting = Vec::with_capacity(episodes.len());
        let mut budgets = Vec::with_capacity(episodes.len());
        for (i, ep) in episodes.iter_mut().enumerate() {
            if ep.done {
                continue;
            }
            if ep.traj.turns.len() >= self.config.max_turns {
                ep.stop(StopReason::MaxTurns);
                continue;
            }
            let left = self
                .config
                .max_total_tokens
                .saturating_sub(ep.expanded_len)
                .min(ep.completion_left);
            if left == 0 {
                ep.stop(StopReason::TokenBudget);
                continue;
            }
            requesting.push(i);
            budgets.push(left.min(self.config.max_new_tokens));
        }
        if requesting.is_empty() {
            return outcomes;
        }
        let banned = [self.image_pad];
        let seeds: Vec<u64> = requesting
            .iter()
            .map(|&i| Rng::derive_seed(episodes[i].seed, &[episodes[i].traj.turns.len() as u64]))
            .collect();
        // Images are collected up front so the requests can borrow them.
        let image_lists: Vec<Vec<Image>> = requesting
            .iter()
            .map(|&i| {
                episodes[i]
                    .traj
                    .images
                    .iter()
                    .map(|im| im.image.clone())
                    .collect()
            })
            .collect();
        let results = {
            let requests: Vec<GenerateRequest<'_>> = requesting
                .iter()
                .enumerate()
                .map(|(k, &i)| GenerateRequest {
                    tokens: &episodes[i].traj.tokens,
                    images: &image_lists[k],
                    sampling: episodes[i].sampling,
                    seed: seeds[k],
                    max_new_tokens: budgets[k],
                    stop_sequences: &self.stop_sequences,
                    banned_tokens: &banned,
                })
                .collect();
            self.model.generate_batch(&requests)
        };
        let answered = results.len();
        let mut results = results.into_iter();
        for (k, &i) in requesting.iter().enumerate() {
            let ep = &mut *episodes[i];
            let turn = ep.traj.turns.len();
            let outcome = match results.next() {
                Some(result) => result
                    .and_then(|generation| self.step(ep, turn, generation, budgets[k], seeds[k])),
                None => Err(Error::Invariant(format!(
                    "the backend answered {answered} of {} requests",
                    requesting.len()
                ))),
            };
            if outcome.is_err() {
                ep.done = true;
            }
            outcomes[i] = outcome;
        }
        outcomes
    }

    /// Builds the prompt episode of `task`.
    fn start(&self, task: &Task) -> Result<Episode> {
        if task.images.len() > self.config.max_images {
            return Err(Error::config(
                "task",
                format!(
                    "{} input images exceed max-images = {}",
                    task.images.len(),
                    self.config.max_images
                ),
            ));
        }
        let tokens = self.prompt(task).encode(self.model.codec())?;
        let pads = tokens.iter().filter(|&&t| t == self.image_pad).count();
        if pads != task.images.len() {
            return Err(Error::Invariant(format!(
                "the prompt holds {pads} image pads for {} images (does the user template contain {{images}}?)",
                task.images.len()
            )));
        }
        let mut visual = 0;
        for im in &task.images {
            visual += self.preprocess.image_token_count(im.height(), im.width())?;
        }
        let expanded_len = tokens.len() - pads + visual;
        let n = tokens.len();
        Ok(Episode {
            traj: Trajectory {
                tokens,
                mask: vec![0; n],
                logprobs: vec![0.0; n],
                prompt_len: n,
                images: task
                    .images
                    .iter()
                    .enumerate()
                    .map(|(index, image)| TrajectoryImage {
                        image: image.clone(),
                        source: ImageSource::Input { index },
                    })
                    .collect(),
                image_sources: (0..task.images.len())
                    .map(|index| ImageSource::Input { index })
                    .collect(),
                image_sizes: task
                    .images
                    .iter()
                    .map(|i| (i.width(), i.height()))
                    .collect(),
                tool_calls: Vec::new(),
                turns: Vec::new(),
                answer: None,
                stop: StopReason::NoAction,
            },
            originals: task.images.clone(),
            expanded_len,
            seed: 0,
            done: false,
            sampling: self.config.sampling,
            completion_left: usize::MAX,
        })
    }

    /// Appends one generation to an episode and acts on it.
    fn step(
        &self,
        ep: &mut Episode,
        turn: usize,
        generation: Generation,
        budget: usize,
        seed: u64,
    ) -> Result<()> {
        let Generation {
            tokens,
            logprobs,
            finish,
        } = generation;
        if tokens.len() != logprobs.len() {
            return Err(Error::Invariant(format!(
                "the backend returned {} tokens with {} log-probs",
                tokens.len(),
                logprobs.len()
            )));
        }
        if tokens.len() > budget {
            return Err(Error::Invariant(format!(
                "the backend generated {} tokens for a budget of {budget}",
                tokens.len()
            )));
        }
        if tokens.contains(&self.image_pad) {
            return Err(Error::Invariant(
                "the backend generated <|image_pad|>, which was banned".into(),
            ));
        }
        let text = self.model.codec().decode(&tokens)?;
        let context_len = ep.traj.tokens.len();
        let ended_turn = tokens.ends_with(&self.im_end);
        ep.traj.turns.push(TurnRecord {
            context_len,
            context_images: ep.traj.images.len(),
            generated: tokens.len(),
            text: text.clone(),
            finish,
            seed,
        });
        ep.expanded_len += tokens.len();
        ep.completion_left = ep.completion_left.saturating_sub(tokens.len());
        ep.traj.mask.extend(std::iter::repeat_n(1, tokens.len()));
        ep.traj.tokens.extend(tokens);
        ep.traj.logprobs.extend(logprobs);

        match protocol::parse_turn(&text, self.config.call_selection) {
            TurnAction::Answer(answer) => {
                ep.traj.answer = Some(answer);
                ep.stop(StopReason::Answered);
            }
            TurnAction::Finish => ep.stop(if finish == FinishReason::Length {
                StopReason::TurnLength
            } else {
                StopReason::NoAction
            }),
            TurnAction::ToolCalls(_) if finish == FinishReason::Length => {
                ep.stop(StopReason::TurnLength);
            }
            TurnAction::ToolCalls(calls) => {
                if turn + 1 >= self.config.max_turns {
                    for parsed in calls {
                        ep.traj.tool_calls.push(ToolCallRecord {
                            turn,
                            raw: parsed.raw,
                            call: parsed.call.ok(),
                            outcome: ToolOutcome::Dropped {
                                reason: "the turn limit was reached".into(),
                            },
                        });
                    }
                    ep.stop(StopReason::MaxTurns);
                } else {
                    self.observe(ep, turn, calls, !ended_turn)?;
                }
            }
        }
        Ok(())
    }

    /// Executes the calls of a turn and appends their observation.
    fn observe(
        &self,
        ep: &mut Episode,
        turn: usize,
        calls: Vec<protocol::ParsedCall>,
        close_turn: bool,
    ) -> Result<()> {
        let first_call = ep.traj.tool_calls.len();
        let mut contents = Vec::with_capacity(calls.len());
        let mut new_images: Vec<(Image, usize)> = Vec::new();
        let ctx = ToolContext {
            original_images: &ep.originals,
            preprocess: &self.preprocess,
        };
        for parsed in calls {
            let call_index = ep.traj.tool_calls.len();
            let result = match &parsed.call {
                Err(e) => Err(e.clone()),
                Ok(call) => match self.tools.iter().find(|t| t.name() == call.name) {
                    None => Err(format!(
                        "unknown tool '{}'; available tools: {}",
                        call.name,
                        self.specs
                            .iter()
                            .map(|s| s.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                    Some(tool) => tool
                        .call(&call.arguments, &ctx)
                        .map_err(|e| e.message)
                        .and_then(|out| {
                            for im in &out.images {
                                self.preprocess
                                    .image_token_count(im.height(), im.width())
                                    .map_err(|e| {
                                        format!(
                                            "the tool returned an image the model cannot take: {e}"
                                        )
                                    })?;
                            }
                            Ok(out)
                        }),
                },
            };
            let outcome = match result {
                Ok(out) => {
                    contents.push(
                        self.templates
                            .render_tool_response(out.images.len(), out.text.as_deref()),
                    );
                    let outcome = ToolOutcome::Ok {
                        images: out.images.len(),
                        text: out.text.clone(),
                        region: out.region,
                    };
                    new_images.extend(out.images.into_iter().map(|im| (im, call_index)));
                    outcome
                }
                Err(message) => {
                    contents.push(self.templates.render_tool_error(&message));
                    ToolOutcome::Error { message }
                }
            };
            ep.traj.tool_calls.push(ToolCallRecord {
                turn,
                raw: parsed.raw,
                call: parsed.call.ok(),
                outcome,
            });
        }

        let drop_all = |ep: &mut Episode, reason: &str, stop: StopReason| {
            for rec in &mut ep.traj.tool_calls[first_call..] {
                if matches!(rec.outcome, ToolOutcome::Ok { .. }) {
                    rec.outcome = ToolOutcome::Dropped {
                        reason: reason.to_string(),
                    };
                }
            }
            ep.stop(stop);
        };
        if ep.traj.images.len() + new_images.len() > self.config.max_images {
            drop_all(ep, "the image limit was reached", StopReason::ImageLimit);
            return Ok(());
        }
        let mut content = protocol::Rendered::default();
        for (i, part) in contents.iter().enumerate() {
            if i > 0 {
                content.push_trusted("\n");
            }
            content.push(part);
        }
        let obs_tokens =
            protocol::render_observation(&content, close_turn).encode(self.model.codec())?;
        let pads = obs_tokens.iter().filter(|&&t| t == self.image_pad).count();
        if pads != new_images.len() {
            return Err(Error::Invariant(format!(
                "an observation holds {pads} image pads for {} images (does the tool-response template contain {{images}}?)",
                new_images.len()
            )));
        }
        let mut visual = 0;
        for (im, _) in &new_images {
            visual += self.preprocess.image_token_count(im.height(), im.width())?;
        }
        let obs_len = obs_tokens.len() - pads + visual;
        if ep.expanded_len + obs_len > self.config.max_total_tokens {
            drop_all(
                ep,
                "the observation did not fit the token budget",
                StopReason::TokenBudget,
            );
            return Ok(());
        }
        ep.expanded_len += obs_len;
        let n = obs_tokens.len();
        ep.traj.tokens.extend(obs_tokens);
        ep.traj.mask.extend(std::iter::repeat_n(0, n));
        ep.traj.logprobs.extend(std::iter::repeat_n(0.0, n));
        for (image, call) in new_images {
            let source = ImageSource::ToolCall { call };
            ep.traj.image_sources.push(source);
            ep.traj.image_sizes.push((image.width(), image.height()));
            ep.traj.images.push(TrajectoryImage { image, source });
        }
        Ok(())
    }
}

impl Episode {
    fn clone_for(&self, seed: u64) -> Self {
        self.clone().with_seed(seed)
    }

    /// This episode with its turns seeded from `seed` (turn `t` samples with
    /// `Rng::derive_seed(seed, &[t])`).
    #[must_use]
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// This episode sampling with `sampling` instead of the agent's parameters.
    #[must_use]
    pub fn with_sampling(mut self, sampling: SamplingParams) -> Self {
        self.sampling = sampling;
        self
    }

    /// This episode generating at most `tokens` over all its turns (as well as within the
    /// agent's limits); when they are spent it stops with [`StopReason::TokenBudget`].
    #[must_use]
    pub fn with_completion_limit(mut self, tokens: usize) -> Self {
        self.completion_left = tokens;
        self
    }

    /// Whether the episode has ended (answered, stopped by a limit, or failed).
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// The trajectory so far.
    pub fn trajectory(&self) -> &Trajectory {
        &self.traj
    }

    fn stop(&mut self, reason: StopReason) {
        self.traj.stop = reason;
        self.done = true;
    }

    /// The trajectory, its stop reason final.
    pub fn into_trajectory(mut self) -> Trajectory {
        if !self.done {
            // Every round either stops an episode or appends an observation; one still running
            // after the last round has used all its turns.
            self.traj.stop = StopReason::MaxTurns;
        }
        self.traj
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_defaults_round_trip_and_apply_only_what_they_set() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            BundleAgentDefaults::for_bundle(dir.path()).unwrap(),
            BundleAgentDefaults::default(),
            "no file: no defaults"
        );
        let tiny = BundleAgentDefaults {
            max_turns: Some(2),
            max_new_tokens: Some(24),
            stop_at_tool_call_end: Some(true),
            ..BundleAgentDefaults::default()
        };
        std::fs::write(dir.path().join(BUNDLE_AGENT_FILE), tiny.to_toml_string()).unwrap();
        assert_eq!(BundleAgentDefaults::for_bundle(dir.path()).unwrap(), tiny);
        let base = AgentConfig {
            max_images: 3,
            ..AgentConfig::default()
        };
        let applied = tiny.apply(base.clone());
        assert_eq!(
            applied,
            AgentConfig {
                max_turns: 2,
                max_new_tokens: 24,
                stop_at_tool_call_end: true,
                ..base
            }
        );
        assert_eq!(
            BundleAgentDefaults::default().apply(applied.clone()),
            applied
        );
    }

    #[test]
    fn bad_bundle_defaults_name_the_file_and_the_key() {
        let err = BundleAgentDefaults::from_toml_str("max-turn = 2", "b/agent.toml").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("b/agent.toml") && text.contains("max-turn"),
            "{text}"
        );
        let err = BundleAgentDefaults::from_toml_str("max-new-tokens = 0", "b/agent.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("max-new-tokens") && err.contains("at least 1"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(BUNDLE_AGENT_FILE),
            "stop-at-tool-call-end = 1",
        )
        .unwrap();
        let err = BundleAgentDefaults::for_bundle(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains(BUNDLE_AGENT_FILE), "{err}");
    }
}
