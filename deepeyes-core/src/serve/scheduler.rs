//! The batching loop of the server: one thread owns the agent, and the episodes of every request
//! in flight are stepped together, one [`Agent::advance`] round (one batched generate call) at a
//! time. A request that arrives while others run joins at the next round boundary (continuous
//! batching at turn granularity), so a long episode never holds a short one back by more than a
//! turn.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};

use tokio::sync::mpsc::UnboundedSender;

use tokio::sync::oneshot;

use crate::agent::{Agent, AgentConfig, Episode, Task};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::model::{GenerateRequest, Generation, SamplingParams, VisionLanguageModel};
use crate::protocol::PromptTemplates;
use crate::rng::Rng;
use crate::tool::Tool;
use crate::trajectory::Trajectory;
use crate::weights::{WeightReceiver, WeightUpdate, Weights};

use super::metrics::Metrics;

/// The episodes one request asks for.
#[derive(Debug)]
pub(crate) struct EpisodeRequest {
    /// The question and its images.
    pub(crate) task: Task,
    /// How many independent answers (OpenAI's `n`).
    pub(crate) choices: usize,
    /// Choice `c` is seeded with `Rng::derive_seed(seed, &[0, c])`, as `deepeyes run --seed`
    /// seeds its one episode, so a request reproduces a command-line run.
    pub(crate) seed: u64,
    /// How every turn samples.
    pub(crate) sampling: SamplingParams,
    /// Most tokens generated over all turns of one choice.
    pub(crate) completion_limit: Option<usize>,
    /// Whether to report each turn as it ends (streaming), not only finished choices.
    pub(crate) report_turns: bool,
    /// Where the request's handler listens.
    pub(crate) events: UnboundedSender<Event>,
}

/// What the loop tells a request's handler.
#[derive(Debug)]
pub(crate) enum Event {
    /// Choice `choice` ended a turn; `trajectory` is the episode so far.
    Turn {
        /// Which choice.
        choice: usize,
        /// The episode after the turn (and its observation).
        trajectory: Box<Trajectory>,
    },
    /// Choice `choice` finished.
    Done {
        /// Which choice.
        choice: usize,
        /// The whole episode.
        trajectory: Box<Trajectory>,
    },
    /// The request failed; no further events follow.
    Failed(Error),
}

/// One token-level generation (SGLang's `/generate`), owning what it continues.
#[derive(Debug)]
pub(crate) struct OwnedGenerate {
    pub(crate) tokens: Vec<u32>,
    pub(crate) images: Vec<Image>,
    pub(crate) sampling: SamplingParams,
    pub(crate) seed: u64,
    pub(crate) max_new_tokens: usize,
    pub(crate) stop_sequences: Vec<Vec<u32>>,
    pub(crate) banned_tokens: Vec<u32>,
}

/// What the loop is asked to do.
#[derive(Debug)]
pub(crate) enum Job {
    /// Agent episodes, stepped with everyone else's.
    Episodes(EpisodeRequest),
    /// One batch of token-level generations, run as one batched call between rounds (its batch
    /// is exactly the one the client sent, so a deterministic client sees the results an
    /// in-process call on the same batch gives).
    Generate {
        requests: Vec<OwnedGenerate>,
        reply: oneshot::Sender<Vec<Result<Generation>>>,
    },
    /// New weights, taken between rounds.
    Weights {
        weights: Box<Weights>,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// The handle requests are submitted through; the loop ends when every handle is dropped.
#[derive(Debug, Clone)]
pub(crate) struct SchedulerHandle {
    jobs: Sender<Job>,
}

impl SchedulerHandle {
    /// Queues `job`.
    pub(crate) fn submit(&self, job: Job) -> Result<()> {
        self.jobs
            .send(job)
            .map_err(|_| Error::Model("the batching loop has stopped".into()))
    }
}

/// What the loop runs with.
pub(crate) struct SchedulerParts {
    pub(crate) model: Arc<dyn VisionLanguageModel>,
    pub(crate) tools: Vec<Arc<dyn Tool>>,
    pub(crate) templates: PromptTemplates,
    pub(crate) agent: AgentConfig,
    /// Most episodes stepped in one round (a request larger than this runs alone).
    pub(crate) max_batch: usize,
    pub(crate) metrics: Arc<Metrics>,
    /// The same model as a weight receiver, when it takes new weights.
    pub(crate) receiver: Option<Arc<dyn WeightReceiver + Send + Sync>>,
}

/// Starts the loop on its own thread. Fails, before any request is taken, when the agent cannot
/// be built (a tokenizer without the protocol's tokens, duplicate tools, a bad config).
pub(crate) fn spawn(parts: SchedulerParts) -> Result<SchedulerHandle> {
    let (jobs, rx) = std::sync::mpsc::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("deepeyes-batcher".into())
        .spawn(move || {
            let SchedulerParts {
                model,
                tools,
                templates,
                agent,
                max_batch,
                metrics,
                receiver,
            } = parts;
            let agent = match Agent::new(&*model, tools, templates, agent) {
                Ok(agent) => {
                    let _ = ready_tx.send(Ok(()));
                    agent
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            Batcher {
                agent: &agent,
                model: &*model,
                receiver,
                weight_updates: 0,
                max_batch: max_batch.max(1),
                metrics,
                running: Vec::new(),
                waiting: VecDeque::new(),
            }
            .run(&rx);
        })
        .map_err(|e| Error::Model(format!("cannot start the batching thread: {e}")))?;
    ready_rx
        .recv()
        .map_err(|_| Error::Model("the batching thread died while starting".into()))??;
    Ok(SchedulerHandle { jobs })
}

/// One episode being stepped, and whom it belongs to.
struct Running {
    job: u64,
    choice: usize,
    episode: Episode,
    turns_reported: usize,
    report_turns: bool,
    events: UnboundedSender<Event>,
}

struct Batcher<'a> {
    agent: &'a Agent<'a>,
    model: &'a dyn VisionLanguageModel,
    receiver: Option<Arc<dyn WeightReceiver + Send + Sync>>,
    weight_updates: u64,
    max_batch: usize,
    metrics: Arc<Metrics>,
    running: Vec<Running>,
    waiting: VecDeque<(u64, EpisodeRequest)>,
}

impl Batcher<'_> {
    fn run(mut self, rx: &Receiver<Job>) {
        let mut next_job = 0u64;
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.take(job, &mut next_job),
                    Err(_) => return,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(job) => self.take(job, &mut next_job),
                    Err(TryRecvError::Empty) => break,
                    // Handles are gone; finish what runs, then the outer recv ends the loop.
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.admit();
            self.metrics.set_waiting(self.waiting.len());
            if !self.running.is_empty() {
                self.round();
            }
        }
    }

    /// Queues episodes; runs a generation batch or a weight update at once (between rounds).
    fn take(&mut self, job: Job, next_job: &mut u64) {
        match job {
            Job::Episodes(request) => {
                self.waiting.push_back((*next_job, request));
                *next_job += 1;
            }
            Job::Generate { requests, reply } => {
                let borrowed: Vec<GenerateRequest<'_>> = requests
                    .iter()
                    .map(|r| GenerateRequest {
                        tokens: &r.tokens,
                        images: &r.images,
                        sampling: r.sampling,
                        seed: r.seed,
                        max_new_tokens: r.max_new_tokens,
                        stop_sequences: &r.stop_sequences,
                        banned_tokens: &r.banned_tokens,
                    })
                    .collect();
                self.metrics.observe_batch(borrowed.len());
                let _ = reply.send(self.model.generate_batch(&borrowed));
            }
            Job::Weights { weights, reply } => {
                let result = match &self.receiver {
                    None => Err(Error::Model("this model does not take new weights".into())),
                    Some(receiver) => {
                        self.weight_updates += 1;
                        receiver.receive_weights(&WeightUpdate {
                            version: self.weight_updates,
                            tensors: weights.as_ref(),
                        })
                    }
                };
                let _ = reply.send(result);
            }
        }
    }

    /// Starts waiting requests' episodes while the batch has room; a request larger than the
    /// whole batch runs when nothing else does.
    fn admit(&mut self) {
        while let Some((_, front)) = self.waiting.front() {
            if !self.running.is_empty() && self.running.len() + front.choices > self.max_batch {
                break;
            }
            let (job, request) = self.waiting.pop_front().expect("a front exists");
            if request.events.is_closed() {
                continue;
            }
            match self.begin(&request) {
                Ok(episodes) => {
                    for (choice, episode) in episodes.into_iter().enumerate() {
                        self.running.push(Running {
                            job,
                            choice,
                            episode,
                            turns_reported: 0,
                            report_turns: request.report_turns,
                            events: request.events.clone(),
                        });
                    }
                }
                Err(e) => {
                    let _ = request.events.send(Event::Failed(e));
                }
            }
        }
    }

    fn begin(&self, request: &EpisodeRequest) -> Result<Vec<Episode>> {
        let prompt = self
            .agent
            .begin(&request.task, request.seed)?
            .with_sampling(request.sampling);
        let prompt = match request.completion_limit {
            Some(limit) => prompt.with_completion_limit(limit),
            None => prompt,
        };
        Ok((0..request.choices)
            .map(|c| {
                prompt
                    .clone()
                    .with_seed(Rng::derive_seed(request.seed, &[0, c as u64]))
            })
            .collect())
    }

    /// One generate round over every running episode; reports turns, finished choices and
    /// failures, and drops what is finished, failed, or no longer listened to.
    fn round(&mut self) {
        self.running.retain(|r| !r.events.is_closed());
        if self.running.is_empty() {
            return;
        }
        self.metrics.observe_batch(self.running.len());
        let outcomes = {
            let mut episodes: Vec<&mut Episode> =
                self.running.iter_mut().map(|r| &mut r.episode).collect();
            self.agent.advance(&mut episodes)
        };
        let mut failed: HashSet<u64> = HashSet::new();
        for (r, outcome) in self.running.iter().zip(outcomes) {
            if let Err(e) = outcome
                && failed.insert(r.job)
            {
                tracing::warn!(error = %e, "a request's episode failed");
                let _ = r.events.send(Event::Failed(e));
            }
        }
        let running = std::mem::take(&mut self.running);
        for mut r in running {
            if failed.contains(&r.job) {
                continue;
            }
            if r.episode.is_done() {
                let trajectory = Box::new(r.episode.into_trajectory());
                let _ = r.events.send(Event::Done {
                    choice: r.choice,
                    trajectory,
                });
                continue;
            }
            let turns = r.episode.trajectory().turns.len();
            if r.report_turns && turns > r.turns_reported {
                r.turns_reported = turns;
                let _ = r.events.send(Event::Turn {
                    choice: r.choice,
                    trajectory: Box::new(r.episode.trajectory().clone()),
                });
            }
            self.running.push(r);
        }
    }
}
