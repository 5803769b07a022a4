"""A trained reward model as a GRPO reward: ``{name: reward_model, args: {path: <dir>}}``.

Also reachable as ``grpokit.rewards.reward_model:score``. The directory is loaded once per
process (``models/reward_head.py``) and scores each batch under ``no_grad``.
"""

from __future__ import annotations

from grpokit.models.reward_head import cached_reward_model
from grpokit.rewards.registry import register
from grpokit.rewards.rewardset import completion_text


@register("reward_model")
def reward_model(prompts, completions, path: str, batch_size: int = 16, device: str = "auto", **_) -> list[float]:
    """A trained reward model's score of each completion (TRL's reward signature).

    Recipe: ``{name: reward_model, args: {path: runs/reward-model/reward_model}}``.
    ``path`` is the ``reward_model/`` directory (or the run directory holding it); the
    prompt and completion are rendered with the chat template, as in training.
    """
    scorer = cached_reward_model(path, device)
    return scorer.score(list(prompts), [completion_text(c) for c in completions], batch_size)


score = reward_model  # the name recipes may use: "grpokit.rewards.reward_model:score"
