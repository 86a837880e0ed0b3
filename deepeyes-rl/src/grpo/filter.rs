//! Which trajectories and groups enter the loss: over-turn / truncation masking and DAPO dynamic
//! sampling.

use deepeyes_core::{StopReason, Trajectory};

use crate::error::{Error, Result};
use crate::grpo::GrpoConfig;
use crate::grpo::advantage::group_stats;

/// Whether `trajectory` enters the loss under `cfg`'s masking options.
///
/// With `mask-max-turns`, trajectories that hit the turn cap are excluded (over-turn masking);
/// with `mask-truncated`, those cut by the per-turn token limit (`TurnLength`) or the total
/// budget (`TokenBudget`). Excluded trajectories still count in their group's mean and standard
/// deviation (their reward is real); only their tokens leave the loss.
pub fn loss_keep(trajectory: &Trajectory, cfg: &GrpoConfig) -> bool {
    match trajectory.stop {
        StopReason::MaxTurns => !cfg.mask_max_turns,
        StopReason::TurnLength | StopReason::TokenBudget => !cfg.mask_truncated,
        StopReason::Answered | StopReason::NoAction | StopReason::ImageLimit => true,
    }
}

/// Ids of the groups (two or more trajectories) whose rewards are all equal, in id order.
pub fn zero_variance_groups(rewards: &[f64], groups: &[usize]) -> Result<Vec<usize>> {
    Ok(group_stats(rewards, groups)?
        .into_iter()
        .filter(|s| s.zero_variance)
        .map(|s| s.group)
        .collect())
}

/// Where a [`DynamicSampler`] stands after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerState {
    /// Enough informative groups: train on [`DynamicSampler::into_groups`].
    Ready,
    /// Sample another round; `missing` groups are still needed.
    NeedMore {
        /// Groups still missing.
        missing: usize,
    },
    /// The round budget is spent with `have` of the target groups; train on what there is.
    Exhausted {
        /// Informative groups collected.
        have: usize,
    },
}

/// DAPO's dynamic sampling: collects groups with reward variance over several generation rounds
/// until a step has `target` of them.
///
/// ```
/// use deepeyes_rl::grpo::{DynamicSampler, SamplerState};
///
/// let mut s = DynamicSampler::new(2, 3).unwrap();
/// assert!(!s.offer("p0", &[1.0, 1.0]).unwrap()); // no variance: dropped
/// assert!(s.offer("p1", &[0.0, 1.0]).unwrap());
/// assert_eq!(s.end_round(), SamplerState::NeedMore { missing: 1 });
/// s.offer("p2", &[0.0, 2.0]).unwrap();
/// assert_eq!(s.end_round(), SamplerState::Ready);
/// assert_eq!(s.into_groups(), vec!["p1", "p2"]);
/// ```
#[derive(Debug, Clone)]
pub struct DynamicSampler<G> {
    target: usize,
    max_rounds: usize,
    rounds: usize,
    kept: Vec<G>,
    offered: usize,
    dropped: usize,
}

impl<G> DynamicSampler<G> {
    /// A sampler that wants `target` informative groups within `max_rounds` rounds.
    pub fn new(target: usize, max_rounds: usize) -> Result<Self> {
        if target == 0 {
            return Err(Error::invalid("target", "must be at least 1"));
        }
        if max_rounds == 0 {
            return Err(Error::invalid("max_rounds", "must be at least 1"));
        }
        Ok(Self {
            target,
            max_rounds,
            rounds: 0,
            kept: Vec::new(),
            offered: 0,
            dropped: 0,
        })
    }

    /// Offers one group with its rewards; keeps it (returns true) unless all its rewards are
    /// equal. A group of one is kept (it has a non-zero advantage). Errors on a non-finite
    /// reward, naming its index within the group.
    pub fn offer(&mut self, group: G, rewards: &[f64]) -> Result<bool> {
        if let Some((i, &r)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
            return Err(Error::NonFiniteReward {
                trajectory: i,
                value: r,
            });
        }
        if rewards.is_empty() {
            return Err(Error::invalid("rewards", "a group has no trajectories"));
        }
        self.offered += 1;
        let informative = rewards.len() == 1 || rewards.iter().any(|&r| r != rewards[0]);
        if informative {
            self.kept.push(group);
        } else {
            self.dropped += 1;
        }
        Ok(informative)
    }

    /// Closes a generation round and says what to do next.
    pub fn end_round(&mut self) -> SamplerState {
        self.rounds += 1;
        if self.kept.len() >= self.target {
            SamplerState::Ready
        } else if self.rounds >= self.max_rounds {
            tracing::warn!(
                have = self.kept.len(),
                target = self.target,
                rounds = self.rounds,
                "dynamic sampling ran out of rounds; training on a partial batch"
            );
            SamplerState::Exhausted {
                have: self.kept.len(),
            }
        } else {
            SamplerState::NeedMore {
                missing: self.target - self.kept.len(),
            }
        }
    }

    /// Rounds closed so far.
    pub fn rounds(&self) -> usize {
        self.rounds
    }

    /// Groups offered so far.
    pub fn offered(&self) -> usize {
        self.offered
    }

    /// Groups dropped for zero variance so far.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// The kept groups, the first `target` of them in the order offered.
    pub fn into_groups(mut self) -> Vec<G> {
        self.kept.truncate(self.target);
        self.kept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_exhausts_and_truncates() {
        let mut s = DynamicSampler::new(2, 2).unwrap();
        s.offer(0, &[1.0, 1.0]).unwrap();
        assert_eq!(s.end_round(), SamplerState::NeedMore { missing: 2 });
        s.offer(1, &[0.0, 1.0]).unwrap();
        assert_eq!(s.end_round(), SamplerState::Exhausted { have: 1 });
        assert_eq!((s.offered(), s.dropped(), s.rounds()), (2, 1, 2));

        let mut s = DynamicSampler::new(1, 2).unwrap();
        for g in 0..3 {
            s.offer(g, &[0.0, f64::from(g)]).unwrap();
        }
        assert_eq!(s.end_round(), SamplerState::Ready);
        assert_eq!(s.into_groups(), vec![1]);
        assert!(DynamicSampler::<u8>::new(0, 1).is_err());
        let mut s = DynamicSampler::new(1, 1).unwrap();
        let err = s.offer((), &[0.0, f64::INFINITY]).unwrap_err();
        assert!(err.to_string().contains("trajectory 1"), "{err}");
    }

    #[test]
    fn zero_variance_ids() {
        let ids = zero_variance_groups(&[1.0, 1.0, 0.0, 1.0, 5.0], &[4, 4, 2, 2, 9]).unwrap();
        assert_eq!(ids, vec![4]);
    }
}
