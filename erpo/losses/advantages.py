"""Sequence-level advantages from rewards [B] and group ids [B] (spec section 1), on the device, no sync.

Each estimator returns `GroupAdvantages(advantages [B], degenerate [B] bool, n_degenerate_groups 0-d)`.
A group whose rewards are all equal (a group of one response included) has no learning signal: its
advantages are exactly 0 and it is reported (DAPO-style dynamic sampling drops such groups).
"""
from typing import NamedTuple

import torch
from torch import Tensor

from erpo.losses.segments import dense_ids, segment_sum

STD_EPS = 1e-6


class GroupAdvantages(NamedTuple):
    advantages: Tensor  # [B]
    degenerate: Tensor  # [B] bool: the response's group has all-equal rewards (or one response)
    n_degenerate_groups: Tensor  # 0-d long


def _check(rewards: Tensor, group_ids: Tensor) -> None:
    if not isinstance(rewards, Tensor) or not isinstance(group_ids, Tensor):
        raise TypeError("rewards and group_ids must be tensors")
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both have shape [B], got {tuple(rewards.shape)} and {tuple(group_ids.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise TypeError(f"group_ids must be integers, got {group_ids.dtype}")
    if rewards.device != group_ids.device:
        raise ValueError(f"rewards on {rewards.device} but group_ids on {group_ids.device}")


def _group_stats(rewards: Tensor, group_ids: Tensor):
    rewards = rewards.to(torch.float64 if rewards.dtype == torch.float64 else torch.float32)
    group = dense_ids(group_ids)
    n = rewards.numel()
    count = segment_sum(torch.ones_like(rewards), group, n)
    mean = segment_sum(rewards, group, n) / count.clamp_min(1)
    high = rewards.new_full((n,), -float("inf")).scatter_reduce(0, group, rewards, reduce="amax")
    low = rewards.new_full((n,), float("inf")).scatter_reduce(0, group, rewards, reduce="amin")
    degenerate_group = (count > 0) & (high == low)
    return rewards, group, count, mean, degenerate_group


def _result(advantages, group, degenerate_group) -> GroupAdvantages:
    degenerate = degenerate_group[group]
    advantages = torch.where(degenerate, torch.zeros_like(advantages), advantages)
    return GroupAdvantages(advantages, degenerate, degenerate_group.sum())


def grpo(rewards: Tensor, group_ids: Tensor) -> GroupAdvantages:
    """A_i = (R_i - mean_g R) / (std_g R + 1e-6), sample std (unbiased, as TRL and verl)."""
    _check(rewards, group_ids)
    rewards, group, count, mean, degenerate_group = _group_stats(rewards, group_ids)
    centered = rewards - mean[group]
    var = segment_sum(centered * centered, group, rewards.numel()) / (count - 1).clamp_min(1)
    return _result(centered / (var.sqrt()[group] + STD_EPS), group, degenerate_group)


def dr_grpo(rewards: Tensor, group_ids: Tensor) -> GroupAdvantages:
    """A_i = R_i - mean_g R (no std division)."""
    _check(rewards, group_ids)
    rewards, group, _, mean, degenerate_group = _group_stats(rewards, group_ids)
    return _result(rewards - mean[group], group, degenerate_group)


def rloo(rewards: Tensor, group_ids: Tensor) -> GroupAdvantages:
    """A_i = R_i - mean_{j != i in g} R_j (leave-one-out baseline)."""
    _check(rewards, group_ids)
    rewards, group, count, _, degenerate_group = _group_stats(rewards, group_ids)
    total = segment_sum(rewards, group, rewards.numel())[group]
    others = (count[group] - 1).clamp_min(1)
    return _result(rewards - (total - rewards) / others, group, degenerate_group)


ESTIMATORS = {"grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo}


def compute(estimator: str, rewards: Tensor, group_ids: Tensor) -> GroupAdvantages:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; one of {tuple(ESTIMATORS)}")
    return ESTIMATORS[estimator](rewards, group_ids)
