"""``grpokit reward-model``: a scalar reward head on a language model, trained on preference pairs.

What it is (InstructGPT's reward model, arXiv:2203.02155; TRL's RewardTrainer loss):

- Input: prompt + response rendered with the tokenizer's chat template (the prompt as a
  user message when it is a string, the response as the assistant's turn); longer than
  ``training.max_length`` tokens: cut from the left, keeping the end of the response.
- Model: the base LM's transformer body (LoRA by default, every weight with
  ``model.lora: null``; ``model.freeze``/``lora.last_k_layers`` apply), no LM head; a
  linear or MLP head on the final hidden state of the sequence's last real token gives
  r. Sequences are padded on the right, so with causal attention r is unaffected by
  padding and by the other rows of the batch.
- Loss: Bradley-Terry, ``-log sigmoid(r_chosen - r_rejected - margin)`` averaged over
  pairs. Metrics: loss, accuracy (share of pairs with r_chosen > r_rejected; a tie counts
  as wrong), margin (mean r_chosen - r_rejected). The held-out rows give the same three.
- Data: TRL's preference rows ``{"prompt", "chosen", "rejected"}`` (what ``grpokit data
  pairs`` writes), strings or message lists; without ``prompt``, chosen and rejected
  may be whole conversations, their shared leading messages being the prompt.
- Images (a vision-language ``model.path``, e.g. scoring GUI actions from a screenshot):
  TRL's ``image``/``images`` columns beside a pair, paths relative to the data file,
  checked when the file is read; the prompt holds one image block per image (TRL's
  placement when it has none). Each side goes through the processor with the pair's
  images (decoded then to count its image tokens, and again for each batch that scores
  it); such a sequence is never cut, so one over ``training.max_length`` is refused.
- Output: ``<output_dir>/reward_model/``: the adapter (PEFT, safetensors) or the whole
  model, the tokenizer (a VLM's processor), ``head.safetensors`` and ``reward_model.json``
  (the base model as given and as resolved, head, max length, dtype, system prompt),
  written atomically.

The model and head (building, saving, loading, scoring) are ``models/reward_head.py``;
the loss is ``algo/preference.py``; as a GRPO reward it is ``{name: reward_model, args:
{path: <dir>}}`` (``rewards/reward_model.py``). This module imports neither torch nor
transformers at import time, so the ``grpokit`` command stays quick to start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpokit.data.chat import with_system
from grpokit.data.images import open_images
from grpokit.data.pairs import PreferenceRow, read_preference_rows
from grpokit.errors import DataError
from grpokit.models.reward_head import (FORMAT, RewardScorer, build_head, check_image_length, encode_scored,
                                        render_scored, save_reward_model)
from grpokit.train.sft import add_stage_command, run_stage_command

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- data


@dataclass
class PairExample:
    chosen: list[int]
    rejected: list[int]
    where: str
    # a pair with images keeps both sides' rendered texts and its image references, so each batch that
    # scores it makes its image inputs again (decoded pixels are never kept)
    texts: tuple[str, str] | None = None
    images: list = field(default_factory=list)


def encode_image_pair(processor, prompt: list[dict], chosen: list[dict], rejected: list[dict], images: list,
                      max_length: int, where: str) -> PairExample:
    """Both sides of a pair with images through the processor, its images decoded once for both."""
    from grpokit.models.multimodal import process_text

    texts = (render_scored(processor, prompt + chosen, where), render_scored(processor, prompt + rejected, where))
    decoded = open_images(images)
    sides = [process_text(processor, text, decoded)[0] for text in texts]
    for ids in sides:
        check_image_length(len(ids), max_length, where)
    return PairExample(sides[0], sides[1], where, texts, images)


def encode_pairs(rows: list[PreferenceRow], processor, max_length: int, system_prompt: str | None
                 ) -> tuple[list[PairExample], int]:
    """Each pair's chosen and rejected conversations as token ids, and how many sequences were cut.
    ``processor``: the tokenizer, or a VLM's processor (which every pair with images needs)."""
    examples, cut = [], 0
    for where, (prompt, chosen, rejected), images in rows:
        prompt = with_system(prompt, system_prompt)
        if images:
            examples.append(encode_image_pair(processor, prompt, chosen, rejected, images, max_length, where))
            continue
        chosen_ids, cut_chosen = encode_scored(processor, prompt + chosen, max_length, where)
        rejected_ids, cut_rejected = encode_scored(processor, prompt + rejected, max_length, where)
        examples.append(PairExample(chosen_ids, rejected_ids, where))
        cut += cut_chosen + cut_rejected
    return examples, cut


def pair_image_inputs(processor, pairs: list[PairExample]) -> list[dict]:
    """The image inputs of the chosen sides, then of the rejected sides (``{}`` for a pair without
    images), made again from each pair's texts and images."""
    from grpokit.models.multimodal import process_text

    chosen, rejected = [], []
    for pair in pairs:
        if not pair.images:
            chosen.append({})
            rejected.append({})
            continue
        decoded = open_images(pair.images)  # once for both sides
        chosen.append(process_text(processor, pair.texts[0], decoded)[1])
        rejected.append(process_text(processor, pair.texts[1], decoded)[1])
    return chosen + rejected


def pair_rewards(scorer: RewardScorer, pairs: list[PairExample]):
    """``[2n]``: the rewards of the chosen sides, then of the rejected sides, in one forward pass."""
    sequences = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    if any(p.images for p in pairs):
        return scorer.rewards(sequences, pair_image_inputs(scorer.processor, pairs))
    return scorer.rewards(sequences)


def bradley_terry(scorer: RewardScorer, pairs: list[PairExample], margin: float):
    """The Bradley-Terry loss of a micro-batch, chosen and rejected scored in one forward pass."""
    from grpokit.algo.preference import bradley_terry_loss

    n = len(pairs)
    rewards_2n = pair_rewards(scorer, pairs)  # [2n]
    return bradley_terry_loss(rewards_2n[:n], rewards_2n[n:], margin)


def held_out_preferences(scorer: RewardScorer, pairs: list[PairExample], margin: float,
                         batch_size: int) -> dict[str, float]:
    """Loss, preference accuracy and mean margin over the held-out pairs (empty without any)."""
    if not pairs:
        return {}
    totals = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        loss, metrics = bradley_terry(scorer, chunk, margin)
        for key, value in {"loss": loss.item(), **metrics}.items():
            totals[key] += value * len(chunk) / len(pairs)
    return totals


# ---------------------------------------------------------------------------- training


def describe(recipe, policy, hidden_size: int) -> dict[str, Any]:
    """reward_model.json: everything needed to rebuild the scorer without the recipe."""
    from grpokit.models.loading import choose_attention, resolve_model_dir
    from grpokit.models.vision import is_multimodal

    adapter, resolved = recipe.model.adapter, resolve_model_dir(recipe.model.path)
    return {
        "format": FORMAT, "format_version": 1,
        "base_model": recipe.model.path,  # as the recipe gave it; a hub id stays a hub id when resolved
        "base_model_resolved": str(Path(resolved).resolve()) if Path(resolved).exists() else resolved,
        "base_adapter": str(Path(adapter).expanduser().resolve()) if adapter else None,
        "weights": "adapter" if policy.is_lora else "model",
        "multimodal": is_multimodal(policy.model),  # a VLM: loaded as one, with the processor saved beside it
        "head": {"kind": recipe.head.kind, "hidden": recipe.head.hidden if recipe.head.kind == "mlp" else None,
                 "hidden_size": hidden_size},
        "margin": recipe.head.margin, "max_length": recipe.training.max_length, "chat_template": True,
        "system_prompt": recipe.data.system_prompt, "dtype": recipe.model.dtype,
        "attn_implementation": choose_attention(recipe.model.attn_implementation, policy.device),
    }


def setup_reward_model(recipe):
    """Pairs checked, model and head built, pairs tokenized: the ``SupervisedJob`` the shared loop runs."""
    from grpokit.models import load_policy
    from grpokit.models.multimodal import reads_images
    from grpokit.train.supervised import SupervisedJob, hold_out

    data, training, head_cfg = recipe.data, recipe.training, recipe.head
    rows = read_preference_rows(data.source)  # before the model: bad data fails in a second
    train_rows, eval_rows = hold_out(rows, data.eval_size, data.seed, data.source)
    policy = load_policy(recipe.model, beta=0.0)
    with_images = next((where for where, _, images in rows if images), None)
    if with_images and not reads_images(policy.processor):
        raise DataError(f"{with_images}: the pair has images, but model.path {recipe.model.path!r} is a text "
                        "model; use a vision-language model, or drop the image/images columns")
    hidden_size = policy.model.config.get_text_config().hidden_size
    head = build_head(head_cfg.kind, hidden_size, head_cfg.hidden).to(policy.device)
    scorer = RewardScorer(policy.model, head, policy.processor, policy.device, policy.compute_dtype,
                          training.max_length, data.system_prompt, describe(recipe, policy, hidden_size))
    train_pairs, cut = encode_pairs(train_rows, policy.processor, training.max_length, data.system_prompt)
    eval_pairs, eval_cut = encode_pairs(eval_rows, policy.processor, training.max_length, data.system_prompt)
    if cut + eval_cut:
        log.warning("%d of %d sequences are longer than training.max_length = %d tokens; their start was cut",
                    cut + eval_cut, 2 * len(rows), training.max_length)
    return SupervisedJob(
        model=policy.model, params=policy.trainable_parameters() + list(head.parameters()),
        train_examples=train_pairs,
        loss_fn=lambda batch: bradley_terry(scorer, batch, head_cfg.margin),
        eval_fn=lambda: held_out_preferences(scorer, eval_pairs, head_cfg.margin, training.batch_size),
        save=lambda run_dir: save_reward_model(scorer, run_dir / "reward_model"),
        rate=("pairs_per_s", lambda pair: 1.0),
        info={"eval_rows": len(eval_pairs), "truncated_sequences": cut + eval_cut},
    )


def train_reward_model(recipe, overwrite: bool = False, progress=None) -> Path:
    """Train a reward model from ``recipe`` (a RewardModelRecipe); return the run directory.

    It holds ``reward_model/``, ``metrics.jsonl``, ``recipe.yaml`` and ``run.json`` (held-out
    preference accuracy before and after: ``eval_before``/``eval_after``).
    """
    from grpokit.train.supervised import run_stage

    return run_stage(recipe, "reward_model", lambda: setup_reward_model(recipe), overwrite=overwrite,
                     progress=progress)


# ---------------------------------------------------------------------------- CLI


def cmd_reward_model(args) -> int:
    from grpokit.config import RewardModelRecipe

    info, before, after = run_stage_command(args, RewardModelRecipe, train_reward_model)
    if before and after:
        print(f"held-out preference accuracy {100 * before['accuracy']:.1f}% -> {100 * after['accuracy']:.1f}% "
              f"({info['eval_rows']} pairs; mean margin {before['margin']:.3f} -> {after['margin']:.3f}) after "
              f"{info['steps']} steps" + (" (stopped early)" if info["stopped_early"] else ""))
    print(f"saved {info['saved']}; use it in a GRPO recipe as a reward: "
          f"{{name: reward_model, args: {{path: {info['saved']}}}}}")
    return 0


def add_reward_model_command(subparsers) -> None:
    add_stage_command(subparsers, "reward-model", "train a reward model (scalar head, Bradley-Terry loss) on "
                                                  "preference pairs; usable as a GRPO reward", cmd_reward_model)
