"""Reward functions with TRL's signature, a registry by name, and their weighted sum.

A reward is ``fn(prompts, completions, **columns) -> list[float | None]``; ``None``
means "does not apply to this completion", not zero. Functions written for TRL or
open-r1 plug in unchanged.
"""

# importing a module registers its rewards; heavy dependencies load on first use
from grpokit.rewards import builtin as _builtin  # noqa: F401
from grpokit.rewards import code as _code  # noqa: F401
from grpokit.rewards import dialogue as _dialogue  # noqa: F401
from grpokit.rewards import embedding as _embedding  # noqa: F401
from grpokit.rewards import maths as _maths  # noqa: F401
from grpokit.rewards import openr1 as _openr1  # noqa: F401
from grpokit.rewards import reward_model as _reward_model  # noqa: F401 - light; loads the model on first call
from grpokit.rewards import text as _text  # noqa: F401
from grpokit.rewards import trajectory as _trajectory  # noqa: F401
from grpokit.rewards.orchestrator import RewardOrchestrator, Stage
from grpokit.rewards.registry import REWARDS, group_reward, register, resolve_reward, thread_safe, verl_reward
from grpokit.rewards.rewardset import (RewardSet, Scores, as_completions, columns_of, completion_text,
                                      completions_of, episode_columns, trainer_state)

__all__ = ["REWARDS", "RewardOrchestrator", "RewardSet", "Scores", "Stage", "as_completions", "columns_of",
           "completions_of", "episode_columns",
           "completion_text", "group_reward",
           "register", "resolve_reward", "thread_safe", "trainer_state", "verl_reward"]


def build_orchestrator(rewards: RewardSet, shaping) -> RewardOrchestrator:
    """The recipe's ``reward_shaping`` section as an orchestrator over the recipe's components."""
    return RewardOrchestrator(
        rewards.weights, normalize=shaping.normalize, window=shaping.window, clip=tuple(shaping.clip),
        curriculum=[Stage(s.step, dict(s.weights)) for s in shaping.curriculum],
        max_consecutive_failures=shaping.max_consecutive_failures,
    )
