//! Group-relative advantages: each trajectory's reward compared with the other samples of its
//! prompt.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Mean, spread and size of one prompt group's rewards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupStats {
    /// The group's id, as given.
    pub group: usize,
    /// Number of trajectories in it.
    pub size: usize,
    /// Mean reward.
    pub mean: f64,
    /// Unbiased standard deviation (`n − 1` in the denominator, like `torch.std`); 0 for a group
    /// of one.
    pub std: f64,
    /// Whether the group has at least two trajectories and all their rewards are equal (GRPO
    /// then has no signal for it; DAPO's dynamic sampling drops it).
    pub zero_variance: bool,
}

fn check_rewards(rewards: &[f64], groups: &[usize]) -> Result<()> {
    if rewards.len() != groups.len() {
        return Err(Error::shape(format!(
            "{} rewards but {} group ids",
            rewards.len(),
            groups.len()
        )));
    }
    if let Some((i, &r)) = rewards.iter().enumerate().find(|(_, r)| !r.is_finite()) {
        return Err(Error::NonFiniteReward {
            trajectory: i,
            value: r,
        });
    }
    Ok(())
}

/// Statistics of every group, ordered by group id. `groups[i]` is the prompt group of
/// trajectory `i`; ids need not be contiguous or sorted.
///
/// Errors when the lengths differ or a reward is not finite (naming the trajectory).
pub fn group_stats(rewards: &[f64], groups: &[usize]) -> Result<Vec<GroupStats>> {
    check_rewards(rewards, groups)?;
    let mut members: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for (&r, &g) in rewards.iter().zip(groups) {
        members.entry(g).or_default().push(r);
    }
    Ok(members
        .into_iter()
        .map(|(group, rs)| {
            let n = rs.len();
            let mean = rs.iter().sum::<f64>() / n as f64;
            let std = if n > 1 {
                (rs.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
            } else {
                0.0
            };
            let zero_variance = n > 1 && rs.iter().all(|&r| r == rs[0]);
            GroupStats {
                group,
                size: n,
                mean,
                std,
                zero_variance,
            }
        })
        .collect())
}

/// GRPO advantages, one per trajectory.
///
/// With `norm_by_std` (DeepEyes), `A = (R − mean) / (std + epsilon)` over the trajectory's group,
/// with the unbiased standard deviation; without it (Dr. GRPO), `A = R − mean`. A group of one
/// trajectory uses mean 0 and std 1, so its advantage is `R / (1 + epsilon)` (or `R`), as verl
/// does. A group whose rewards are all equal gets exactly 0 (not a rounding residue divided by
/// `epsilon`).
///
/// Never returns NaN: non-finite rewards are an error naming the trajectory, and `epsilon` must
/// be positive when dividing by the standard deviation.
///
/// ```
/// use deepeyes_rl::grpo::group_advantages;
///
/// let adv = group_advantages(&[1.0, 0.0, 2.0, 2.0], &[0, 0, 1, 1], true, 1e-6).unwrap();
/// assert!((adv[0] - 0.7071).abs() < 1e-3 && (adv[0] + adv[1]).abs() < 1e-12);
/// assert_eq!(&adv[2..], &[0.0, 0.0]);
/// ```
pub fn group_advantages(
    rewards: &[f64],
    groups: &[usize],
    norm_by_std: bool,
    epsilon: f64,
) -> Result<Vec<f64>> {
    if norm_by_std && !(epsilon > 0.0 && epsilon.is_finite()) {
        return Err(Error::invalid(
            "epsilon",
            format!("must be a positive finite number, got {epsilon}"),
        ));
    }
    let stats: BTreeMap<usize, GroupStats> = group_stats(rewards, groups)?
        .into_iter()
        .map(|s| (s.group, s))
        .collect();
    Ok(rewards
        .iter()
        .zip(groups)
        .map(|(&r, g)| {
            let s = &stats[g];
            let (mean, std) = if s.size == 1 {
                (0.0, 1.0)
            } else {
                (s.mean, s.std)
            };
            if s.zero_variance {
                0.0
            } else if norm_by_std {
                (r - mean) / (std + epsilon)
            } else {
                r - mean
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn matches_torch_std() {
        // torch.std([1, 2, 3, 4]) = 1.2909944
        let adv = group_advantages(&[1.0, 2.0, 3.0, 4.0], &[7; 4], true, 1e-6).unwrap();
        let std = 1.290_994_448_735_805_6;
        assert!((adv[0] - (-1.5 / (std + 1e-6))).abs() < 1e-12);
        assert!((adv[3] - (1.5 / (std + 1e-6))).abs() < 1e-12);
    }

    #[test]
    fn singleton_group_keeps_its_reward() {
        let adv = group_advantages(&[0.8, 1.0, 0.0], &[0, 1, 1], true, 1e-6).unwrap();
        assert!((adv[0] - 0.8 / (1.0 + 1e-6)).abs() < 1e-15);
        let adv = group_advantages(&[0.8], &[3], false, 1e-6).unwrap();
        assert_eq!(adv, vec![0.8]);
    }

    #[test]
    fn zero_variance_is_exactly_zero() {
        let adv = group_advantages(&[0.1, 0.1, 0.1], &[0, 0, 0], true, 1e-6).unwrap();
        assert_eq!(adv, vec![0.0; 3]);
        let stats = group_stats(&[0.1, 0.1, 0.3, 0.0], &[0, 0, 1, 1]).unwrap();
        assert!(stats[0].zero_variance && !stats[1].zero_variance);
    }

    #[test]
    fn non_finite_reward_names_the_trajectory() {
        let err = group_advantages(&[0.0, 1.0, f64::NAN], &[0, 0, 0], true, 1e-6).unwrap_err();
        assert!(err.to_string().contains("trajectory 2"), "{err}");
        let err = group_advantages(&[0.0], &[0, 1], true, 1e-6).unwrap_err();
        assert!(matches!(err, Error::Shape { .. }));
        let err = group_advantages(&[0.0], &[0], true, 0.0).unwrap_err();
        assert!(err.to_string().contains("epsilon"), "{err}");
    }

    fn batch() -> impl Strategy<Value = (Vec<f64>, Vec<usize>)> {
        prop::collection::vec((-5.0f64..5.0, 0usize..6), 1..64).prop_map(|v| v.into_iter().unzip())
    }

    proptest! {
        #[test]
        fn advantages_sum_to_zero_per_group((rewards, groups) in batch(), by_std in any::<bool>()) {
            let adv = group_advantages(&rewards, &groups, by_std, 1e-6).unwrap();
            prop_assert!(adv.iter().all(|a| a.is_finite()));
            for s in group_stats(&rewards, &groups).unwrap() {
                let members: Vec<usize> = (0..groups.len()).filter(|&i| groups[i] == s.group).collect();
                let sum: f64 = members.iter().map(|&i| adv[i]).sum();
                if s.size > 1 {
                    prop_assert!(sum.abs() < 1e-6 * s.size as f64, "group {} sums to {}", s.group, sum);
                    if by_std && !s.zero_variance {
                        // Normalised advantages have unbiased std ≈ 1 (up to epsilon).
                        let var = members.iter().map(|&i| adv[i] * adv[i]).sum::<f64>() / (s.size - 1) as f64;
                        prop_assert!((var.sqrt() - 1.0).abs() < 1e-3 || s.std < 1e-3, "std {}", var.sqrt());
                    }
                } else {
                    let expect = if by_std { rewards[members[0]] / (1.0 + 1e-6) } else { rewards[members[0]] };
                    prop_assert!((sum - expect).abs() < 1e-12);
                }
                // Order is preserved: a higher reward never gets a lower advantage.
                for &i in &members {
                    for &j in &members {
                        if rewards[i] > rewards[j] {
                            prop_assert!(adv[i] > adv[j]);
                        }
                    }
                }
            }
        }
    }
}
