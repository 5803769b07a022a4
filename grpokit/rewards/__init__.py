"""Reward functions with TRL's signature, a registry by name, and their weighted sum.

A reward is ``fn(prompts, completions, **columns) -> list[float | None]``; ``None``
means "does not apply to this completion", not zero. Functions written for TRL or
open-r1 plug in unchanged.
"""

from grpokit.rewards import builtin as _builtin  # noqa: F401  (registers the built-ins)
from grpokit.rewards.registry import REWARDS, register, resolve_reward
from grpokit.rewards.rewardset import RewardSet, completion_text

__all__ = ["REWARDS", "RewardSet", "completion_text", "register", "resolve_reward"]
