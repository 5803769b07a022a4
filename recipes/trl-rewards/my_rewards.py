"""Reward functions written the way open-r1's and TRL's docs write them, used by grpokit unchanged.

Nothing here knows about grpokit: math-verify runs with its defaults (its timeout is a
``signal.alarm``, so these need the main thread, where grpokit calls them as TRL does),
the reference comes from the dataset's ``solution`` column, completions arrive as chat
messages (the prompts are conversational), and one reward is built by a factory.
recipe.yaml names them as ``my_rewards:<function>``; grpokit finds this file beside the
recipe without PYTHONPATH.
"""

import re

from math_verify import parse, verify


def accuracy_reward(completions, solution, **kwargs):
    """1.0 if the reply is mathematically equal to the solution; None (skip) if the solution does not parse."""
    contents = [completion[0]["content"] for completion in completions]
    rewards = []
    for content, sol in zip(contents, solution):
        gold = parse(sol)
        if len(gold) == 0:
            rewards.append(None)
            continue
        rewards.append(float(verify(gold, parse(content))))
    return rewards


def boxed_format_reward(completions, **kwargs):
    """1.0 when the reply ends with a boxed answer."""
    pattern = r".*\\boxed\{[^{}]+\}\s*\.?\s*$"
    return [1.0 if re.match(pattern, c[0]["content"], re.DOTALL) else 0.0 for c in completions]


def get_length_penalty(max_chars: int = 300, penalty: float = -0.5):
    """A factory, as open-r1's get_cosine_scaled_reward: the recipe's args go here, once."""

    def length_penalty(completions, **kwargs):
        return [penalty * min(1.0, len(c[0]["content"]) / max_chars) for c in completions]

    return length_penalty
