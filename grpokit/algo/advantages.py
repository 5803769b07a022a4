"""Advantage estimators: how a completion's reward compares with its group's.

Rewards arrive as ``[N]`` with ``N = B * G``, rows ``[i*G, (i+1)*G)`` being prompt i's
G completions. Every estimator has the signature ``fn(rewards_BG) -> advantages_BG``.

- ``group_std`` (GRPO, DeepSeekMath arXiv:2402.03300 sec. 4.1.2): (r - group mean) /
  (group std + eps), the std unbiased as in TRL (``scale_rewards="group"``).
- ``group_mean`` (Dr. GRPO, arXiv:2503.20783): r - group mean. Dividing by the std
  up-weights prompts that are nearly always right or wrong; this form does not
  (TRL's ``scale_rewards="none"``).
- ``batch_std``: (r - group mean) / (std over the whole batch + eps) (TRL's
  ``scale_rewards="batch"``, as recommended by arXiv:2508.08221).
- ``rloo`` (REINFORCE leave-one-out, arXiv:2402.14740): r_i - mean of the other G-1
  rewards of the group = G/(G-1) * (r_i - group mean).

Groups whose rewards are all equal get an advantage of exactly zero under every
estimator and are counted in ``frac_zero_std_groups``.
"""

from __future__ import annotations

from typing import Callable

import torch

from grpokit.algo.registry import Registry

EPS = 1e-4  # as TRL: keeps the division finite for groups with no spread
AdvantageFn = Callable[[torch.Tensor], torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")


@ADVANTAGES.register("group_std")
def group_std(rewards_BG: torch.Tensor) -> torch.Tensor:
    centred_BG = rewards_BG - rewards_BG.mean(dim=1, keepdim=True)
    return centred_BG / (rewards_BG.std(dim=1, keepdim=True) + EPS)


@ADVANTAGES.register("group_mean")
def group_mean(rewards_BG: torch.Tensor) -> torch.Tensor:
    return rewards_BG - rewards_BG.mean(dim=1, keepdim=True)


@ADVANTAGES.register("batch_std")
def batch_std(rewards_BG: torch.Tensor) -> torch.Tensor:
    std = rewards_BG.std() if rewards_BG.numel() > 1 else torch.zeros(())
    return (rewards_BG - rewards_BG.mean(dim=1, keepdim=True)) / (std + EPS)


@ADVANTAGES.register("rloo")
def rloo(rewards_BG: torch.Tensor) -> torch.Tensor:
    G = rewards_BG.size(1)
    # baseline_i = (sum - r_i) / (G - 1)  ->  r_i - baseline_i = G/(G-1) * (r_i - mean)
    return (rewards_BG - rewards_BG.mean(dim=1, keepdim=True)) * (G / (G - 1))


def group_advantages(rewards_N: torch.Tensor, group_size: int, estimator: str = "group_std") -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages ``[N]`` for rewards ``[N]`` laid out group by group, and spread metrics."""
    if group_size < 2:
        raise ValueError("group-relative advantages need at least 2 completions per prompt")
    if rewards_N.dim() != 1 or rewards_N.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards_N.shape)} do not split into groups of {group_size}")
    rewards_BG = rewards_N.view(-1, group_size).float()  # [B, G]
    zero_std_B = zero_spread_groups(rewards_BG)  # [B]
    advantages_BG = ADVANTAGES[estimator](rewards_BG)  # [B, G]
    advantages_BG = advantages_BG.masked_fill(zero_std_B[:, None], 0.0)  # exactly no signal, whatever the estimator
    return advantages_BG.reshape(-1), {"frac_zero_std_groups": zero_std_B.float().mean().item()}


def zero_spread_groups(rewards_BG: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: groups whose G rewards are all equal (they teach nothing)."""
    return (rewards_BG.max(dim=1).values - rewards_BG.min(dim=1).values).abs() < 1e-8
