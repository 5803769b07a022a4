"""Rewards over whole multi-turn episodes: they read the ``trajectory`` column the multi-turn sampler
gives every completion (``rewards.episode_columns``), and return None for one-turn rollouts.

- ``environment_reward``: the environment's own reward, summed over the episode's steps (a TRL
  environment's ``get_reward()`` arrives as the last step's reward).
- ``tool_misuse``: ``penalty`` (negative) per tool call that could not run: an unknown tool, arguments
  that do not fit its signature, JSON that does not parse, or a tool that raised.
- ``action_coherence``: the sum of ``pairs`` bonuses over consecutive action types
  (``{"SEGMENT->GET_PROPERTIES": 0.2}``) plus ``repeat_penalty`` for every immediate repeat. An
  action's type is its first tool call's name, else the first match of ``action_pattern`` in the
  turn (an upper-case word such as ``CLICK`` of ``CLICK([1])``).
"""

from __future__ import annotations

from grpokit.envs.trajectory import DEFAULT_ACTION, action_types
from grpokit.rewards.registry import register


@register("environment_reward")
def environment_reward(prompts, completions, episode_reward=None, **_) -> list[float | None]:
    """The environment's reward of each episode; None for a one-turn rollout."""
    if episode_reward is None:
        return [None] * len(completions)
    return [None if value is None else float(value) for value in episode_reward]


@register("tool_misuse")
def tool_misuse(prompts, completions, trajectory=None, penalty: float = -0.5, **_) -> list[float | None]:
    """``penalty`` times the number of tool calls in the episode that failed."""
    if trajectory is None:
        return [None] * len(completions)
    return [None if episode is None else penalty * sum(
        1 for step in episode["steps"] for call in (step.get("info") or {}).get("tool_calls", []) if call.get("error"))
        for episode in trajectory]


@register("action_coherence")
def action_coherence(prompts, completions, trajectory=None, pairs: dict | None = None, repeat_penalty: float = -0.5,
                     action_pattern: str = DEFAULT_ACTION, **_) -> list[float | None]:
    """Bonuses for good progressions between consecutive actions, a penalty for each immediate repeat."""
    if trajectory is None:
        return [None] * len(completions)
    bonuses = {tuple(part.strip() for part in key.split("->")): float(value) for key, value in (pairs or {}).items()}
    scores = []
    for episode in trajectory:
        if episode is None:
            scores.append(None)
            continue
        types = action_types(episode, action_pattern)
        total = 0.0
        for before, after in zip(types, types[1:]):
            total += repeat_penalty if before == after and before else bonuses.get((before, after), 0.0)
        scores.append(total)
    return scores
