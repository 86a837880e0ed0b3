//! The rollout and score phases of a step: the rollout engine takes the current weights, the
//! agent samples a group per prompt, and the reward scores every trajectory (with DAPO's dynamic
//! sampling, rounds repeat until the step has enough informative groups).

use std::sync::Arc;
use std::time::Instant;

use deepeyes_core::onnx::OnnxModel;
use deepeyes_core::remote::{RemoteModel, RemoteOptions};
use deepeyes_core::{
    Agent, Image, RewardInput, Rng, RolloutEngine, Task, TokenCodec, Trajectory,
    VisionLanguageModel, WeightReceiver, WeightUpdate,
};

use super::{RolledGroup, TrainResult, Trainer};
use crate::grpo::{DynamicSampler, SamplerState};
use crate::metrics::TimeSplit;
use crate::network::PolicyNetwork;
use deepeyes_core::dataset::PreparedItem;

impl<N: PolicyNetwork> Trainer<N> {
    /// The weight sync, rollout and score phases: the rollout engine takes the current weights,
    /// then groups are sampled with them and scored. The returned time split has the weight
    /// sync, rollout and reward times filled in.
    pub(super) fn rollout(&mut self) -> TrainResult<(Vec<RolledGroup>, TimeSplit)> {
        let t = Instant::now();
        let engine: Arc<dyn RolloutEngine> = match self.config.model.rollout_engine {
            crate::config::RolloutEngine::Remote => self.remote_engine()?,
            _ => self.rollout_engine()?,
        };
        let time = TimeSplit {
            time_weight_sync_s: t.elapsed().as_secs_f64(),
            ..TimeSplit::default()
        };
        self.sample_and_score(engine.as_ref(), time)
    }

    /// The client of the remote rollout servers (`rollout-engine = "remote"`), built at the
    /// first call; each call has every server load the current step's weights unless they all
    /// report that version already. Weight versions are written under
    /// `output-dir/rollout-weights`.
    pub fn remote_engine(&mut self) -> TrainResult<Arc<RemoteModel>> {
        let engine = match &self.remote {
            Some(engine) => Arc::clone(engine),
            None => {
                let api_key = match &self.config.model.rollout_api_key_env {
                    Some(var) => Some(std::env::var(var).map_err(|_| {
                        crate::Error::invalid(
                            "model.rollout-api-key-env",
                            format!("the environment variable {var} is not set"),
                        )
                    })?),
                    None => None,
                };
                let built = RemoteModel::new(
                    &self.config.model.bundle,
                    RemoteOptions {
                        servers: self.config.model.rollout_servers.clone(),
                        deterministic: self.config.model.rollout_deterministic,
                        api_key,
                        timeout: std::time::Duration::from_secs(600),
                        weights_dir: self.config.output_dir.join("rollout-weights"),
                    },
                )?;
                Arc::clone(self.remote.insert(Arc::new(built)))
            }
        };
        self.publish_weights(engine.as_ref())?;
        Ok(engine)
    }

    /// The rollout engine, running the policy's current weights: built at the first call, then
    /// kept, each later call handing it the weights of the current step in place (its sessions
    /// stay as they are).
    pub fn rollout_engine(&mut self) -> TrainResult<Arc<OnnxModel>> {
        let engine = match &self.engine {
            Some(engine) => Arc::clone(engine),
            None => {
                let built = OnnxModel::load_with_weights(
                    &self.config.model.bundle,
                    &self.onnx,
                    self.model().weight_source().as_ref(),
                )?;
                Arc::clone(self.engine.insert(Arc::new(built)))
            }
        };
        self.publish_weights(engine.as_ref())?;
        Ok(engine)
    }

    /// The seam between the trainer and any rollout engine: publishes the policy's weights as
    /// version [`Trainer::step_count`], unless the engine already runs that version.
    fn publish_weights(&self, engine: &dyn WeightReceiver) -> TrainResult<()> {
        if engine.weights_version() == Some(self.step) {
            return Ok(());
        }
        let tensors = self.model().weight_source();
        engine.receive_weights(&WeightUpdate {
            version: self.step,
            tensors: tensors.as_ref(),
        })?;
        Ok(())
    }

    /// The rollout and score phases, on an engine that runs the current weights.
    fn sample_and_score(
        &mut self,
        rollout_model: &dyn VisionLanguageModel,
        mut time: TimeSplit,
    ) -> TrainResult<(Vec<RolledGroup>, TimeSplit)> {
        let agent = Agent::new(
            rollout_model,
            self.tools.clone(),
            self.templates.clone(),
            self.config.rollout.clone(),
        )?;
        let dynamic = self.config.grpo.dynamic_sampling.clone();
        if !dynamic.enabled {
            let groups = self.roll_round(&agent, rollout_model, 0, &mut time)?;
            return Ok((groups, time));
        }
        // DAPO: drop groups whose rewards are all equal (no advantage, no gradient) and sample
        // more prompts until the step has its full count, within max-rounds.
        let mut sampler =
            DynamicSampler::new(self.config.batch.prompts_per_step, dynamic.max_rounds)?;
        let mut round = 0;
        loop {
            for g in self.roll_round(&agent, rollout_model, round, &mut time)? {
                let totals: Vec<f64> = g.rewards.iter().map(|b| b.total).collect();
                sampler.offer(g, &totals)?;
            }
            round += 1;
            if !matches!(sampler.end_round(), SamplerState::NeedMore { .. }) {
                break;
            }
        }
        tracing::debug!(
            rounds = sampler.rounds(),
            dropped = sampler.dropped(),
            "dynamic sampling"
        );
        Ok((sampler.into_groups(), time))
    }

    /// Samples one group per next item and scores it; round `r > 0` (dynamic sampling) draws
    /// from its own seed stream.
    fn roll_round(
        &mut self,
        agent: &Agent<'_>,
        rollout_model: &dyn VisionLanguageModel,
        round: u64,
        time: &mut TimeSplit,
    ) -> TrainResult<Vec<RolledGroup>> {
        let t = Instant::now();
        let (prepared, images): (Vec<PreparedItem>, Vec<Vec<Image>>) =
            self.next_items()?.into_iter().unzip();
        let groups = self.sample(agent, &prepared, images, round)?;
        time.time_rollout_s += t.elapsed().as_secs_f64();

        let t = Instant::now();
        let scored = self.score(rollout_model.codec(), prepared, groups)?;
        time.time_reward_s += t.elapsed().as_secs_f64();
        Ok(scored)
    }

    /// The rollout phase of one round: a group of trajectories per prompt.
    fn sample(
        &self,
        agent: &Agent<'_>,
        prepared: &[PreparedItem],
        images: Vec<Vec<Image>>,
        round: u64,
    ) -> TrainResult<Vec<Vec<Trajectory>>> {
        let tasks: Vec<Task> = prepared
            .iter()
            .zip(images)
            .map(|(p, images)| p.task(images))
            .collect();
        let path: &[u64] = if round == 0 {
            &[self.step]
        } else {
            &[self.step, round]
        };
        let seed = Rng::derive_seed(self.config.seeds.rollout, path);
        Ok(agent.run_batch(&tasks, self.config.grpo.group_size, seed)?)
    }

    /// The score phase of one round: the reward of every trajectory, over its decoded
    /// response region. The whole round is one [`RewardFn::score_batch`], so a reward that
    /// waits on a judge has up to its `max-concurrency` answers in flight; the rewards come
    /// back in trajectory order, so a step is the same however the requests interleave.
    fn score(
        &self,
        codec: &dyn TokenCodec,
        prepared: Vec<PreparedItem>,
        groups: Vec<Vec<Trajectory>>,
    ) -> TrainResult<Vec<RolledGroup>> {
        let truths: Vec<String> = prepared.iter().map(PreparedItem::ground_truth).collect();
        let responses: Vec<Vec<String>> = groups
            .iter()
            .map(|trajectories| {
                trajectories
                    .iter()
                    .map(|traj| codec.decode(traj.response_tokens()))
                    .collect()
            })
            .collect::<Result<_, _>>()?;
        let mut inputs = Vec::new();
        for (((p, truth), trajectories), responses) in
            prepared.iter().zip(&truths).zip(&groups).zip(&responses)
        {
            for (traj, response) in trajectories.iter().zip(responses) {
                inputs.push(RewardInput {
                    data_source: &p.item.data_source,
                    question: &p.question,
                    ground_truth: truth,
                    response,
                    trajectory: Some(traj),
                });
            }
        }
        let mut scored = self.reward.score_batch(&inputs).into_iter();
        drop(inputs);
        let mut out = Vec::with_capacity(prepared.len());
        for (p, trajectories) in prepared.into_iter().zip(groups) {
            let rewards = scored
                .by_ref()
                .take(trajectories.len())
                .collect::<Result<Vec<_>, _>>()?;
            out.push(RolledGroup {
                item: p,
                trajectories,
                rewards,
            });
        }
        Ok(out)
    }
}
