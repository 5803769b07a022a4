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
- Output: ``<output_dir>/reward_model/``: the adapter (PEFT, safetensors) or the whole
  model, the tokenizer, ``head.safetensors`` and ``reward_model.json`` (the base model as
  given and as resolved, head, max length, dtype, system prompt), written atomically.

The model and head (building, saving, loading, scoring) are ``models/reward_head.py``;
the loss is ``algo/preference.py``; as a GRPO reward it is ``{name: reward_model, args:
{path: <dir>}}`` (``rewards/reward_model.py``). This module imports neither torch nor
transformers at import time, so the ``grpokit`` command stays quick to start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpokit.data.chat import with_system
from grpokit.data.pairs import read_preference_rows
from grpokit.models.reward_head import FORMAT, RewardScorer, build_head, encode_scored, save_reward_model
from grpokit.train.sft import add_stage_command, run_stage_command

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- data


@dataclass
class PairExample:
    chosen: list[int]
    rejected: list[int]
    where: str


def encode_pairs(rows: list[tuple[str, tuple]], tokenizer, max_length: int, system_prompt: str | None
                 ) -> tuple[list[PairExample], int]:
    """Each pair's chosen and rejected conversations as token ids, and how many sequences were cut."""
    examples, cut = [], 0
    for where, (prompt, chosen, rejected) in rows:
        prompt = with_system(prompt, system_prompt)
        chosen_ids, cut_chosen = encode_scored(tokenizer, prompt + chosen, max_length, where)
        rejected_ids, cut_rejected = encode_scored(tokenizer, prompt + rejected, max_length, where)
        examples.append(PairExample(chosen_ids, rejected_ids, where))
        cut += cut_chosen + cut_rejected
    return examples, cut


def bradley_terry(scorer: RewardScorer, pairs: list[PairExample], margin: float):
    """The Bradley-Terry loss of a micro-batch, chosen and rejected scored in one forward pass."""
    from grpokit.algo.preference import bradley_terry_loss

    n = len(pairs)
    rewards_2n = scorer.rewards([p.chosen for p in pairs] + [p.rejected for p in pairs])  # [2n]
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

    adapter, resolved = recipe.model.adapter, resolve_model_dir(recipe.model.path)
    return {
        "format": FORMAT, "format_version": 1,
        "base_model": recipe.model.path,  # as the recipe gave it; a hub id stays a hub id when resolved
        "base_model_resolved": str(Path(resolved).resolve()) if Path(resolved).exists() else resolved,
        "base_adapter": str(Path(adapter).expanduser().resolve()) if adapter else None,
        "weights": "adapter" if policy.is_lora else "model",
        "head": {"kind": recipe.head.kind, "hidden": recipe.head.hidden if recipe.head.kind == "mlp" else None,
                 "hidden_size": hidden_size},
        "margin": recipe.head.margin, "max_length": recipe.training.max_length, "chat_template": True,
        "system_prompt": recipe.data.system_prompt, "dtype": recipe.model.dtype,
        "attn_implementation": choose_attention(recipe.model.attn_implementation, policy.device),
    }


def setup_reward_model(recipe):
    """Pairs checked, model and head built, pairs tokenized: the ``SupervisedJob`` the shared loop runs."""
    from grpokit.models import load_policy
    from grpokit.train.supervised import SupervisedJob, hold_out

    data, training, head_cfg = recipe.data, recipe.training, recipe.head
    rows = read_preference_rows(data.source)  # before the model: bad data fails in a second
    train_rows, eval_rows = hold_out(rows, data.eval_size, data.seed, data.source)
    policy = load_policy(recipe.model, beta=0.0)
    hidden_size = policy.model.config.get_text_config().hidden_size
    head = build_head(head_cfg.kind, hidden_size, head_cfg.hidden).to(policy.device)
    scorer = RewardScorer(policy.model, head, policy.tokenizer, policy.device, policy.compute_dtype,
                          training.max_length, data.system_prompt, describe(recipe, policy, hidden_size))
    train_pairs, cut = encode_pairs(train_rows, policy.tokenizer, training.max_length, data.system_prompt)
    eval_pairs, eval_cut = encode_pairs(eval_rows, policy.tokenizer, training.max_length, data.system_prompt)
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
