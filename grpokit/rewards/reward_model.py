"""A trained reward model as a GRPO reward: ``{name: reward_model, args: {path: <dir>}}``.

Also reachable as ``grpokit.rewards.reward_model:score``. The directory is loaded once per
process (``models/reward_head.py``) and scores each batch under ``no_grad``. A completion of
an image prompt is scored with the row's images (its ``images`` column, which reaches a reward
as one list of references per completion), so a vision-language reward model sees the
screenshot the policy acted on; they are decoded per scoring batch and go through the reward
model's processor, placed in the prompt as the policy's encoder placed them.
"""

from __future__ import annotations

from typing import Any

from grpokit.data.images import open_images
from grpokit.errors import RewardError
from grpokit.models.reward_head import RewardScorer, cached_reward_model, check_image_length, render_scored
from grpokit.rewards.registry import register
from grpokit.rewards.rewardset import completion_text


def encode_with_images(scorer: RewardScorer, prompt: Any, completion: str, images: list,
                       where: str) -> tuple[list[int], dict]:
    """One completion's token ids and image inputs, its prompt's images decoded now; a completion of a
    text prompt is encoded (and cut) as in ``RewardScorer.score``."""
    from grpokit.models.multimodal import process_text

    if not images:
        return scorer.encode(prompt, completion), {}
    text = render_scored(scorer.processor, scorer.conversation(prompt, completion, len(images), where), where)
    ids, inputs = process_text(scorer.processor, text, open_images(images))
    check_image_length(len(ids), scorer.max_length, where)
    return ids, inputs


@register("reward_model")
def reward_model(prompts, completions, path: str, batch_size: int = 16, device: str = "auto",
                 images: list | None = None, **_) -> list[float]:
    """A trained reward model's score of each completion (TRL's reward signature).

    Recipe: ``{name: reward_model, args: {path: runs/reward-model/reward_model}}``.
    ``path`` is the ``reward_model/`` directory (or the run directory holding it); the
    prompt and completion are rendered with the chat template, as in training. ``images``
    (the row's column, one list per completion; ``None`` or ``[]`` for a text row) are
    scored with the prompt; a reward model trained on a text model refuses them.
    """
    scorer = cached_reward_model(path, device)
    prompts, texts = list(prompts), [completion_text(c) for c in completions]
    refs = [list(row_images or []) for row_images in images] if images is not None else [[] for _ in texts]
    if not any(refs):
        return scorer.score(prompts, texts, batch_size)
    if not scorer.multimodal:
        raise RewardError(f"reward model {path!r} reads text only (it was trained on a text model), but the rows "
                          f"have images; train it on a vision-language model (with image pairs), or give the "
                          f"reward text-only rows")
    return scorer.score_sequences(
        lambda i: encode_with_images(scorer, prompts[i], texts[i], refs[i], f"<completion {i}>"), len(texts),
        batch_size)


score = reward_model  # the name recipes may use: "grpokit.rewards.reward_model:score"
