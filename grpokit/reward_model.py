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

As a GRPO reward: ``{name: reward_model, args: {path: <dir>}}`` (or ``grpokit.reward_model:score``; ``score`` is
``reward_model`` below). It loads each directory once per process and scores batches
under ``no_grad``. This module imports neither torch nor transformers at import time, so
the ``grpokit`` command stays quick to start.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpokit.errors import DataError, ModelError
from grpokit.sft import _render, add_stage_arguments, as_chat, check_chat, pad_right, run_stage_command, with_system

log = logging.getLogger(__name__)

FORMAT = "grpokit-reward-model"
META_FILE = "reward_model.json"
HEAD_FILE = "head.safetensors"


# ---------------------------------------------------------------------------- data


def pair_of(row: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """``(prompt, chosen, rejected)`` message lists of one preference row."""
    if "chosen" not in row or "rejected" not in row:
        keys = sorted(k for k in row if k != "_line")
        raise DataError(f"{where}: a preference pair needs 'chosen' and 'rejected' (and usually 'prompt'); "
                        f"this row has {keys}")
    if "prompt" in row:
        return (as_chat(row["prompt"], "user", where, "prompt"), as_chat(row["chosen"], "assistant", where, "chosen"),
                as_chat(row["rejected"], "assistant", where, "rejected"))
    implicit = ("without 'prompt', chosen and rejected must be conversations that start with the same messages "
                "(the prompt) and then differ; add a 'prompt' field")
    if not (isinstance(row["chosen"], list) and isinstance(row["rejected"], list)):
        raise DataError(f"{where}: {implicit}")
    chosen, rejected = check_chat(row["chosen"], where, "chosen"), check_chat(row["rejected"], where, "rejected")
    shared = 0  # implicit prompt: the leading messages both conversations share
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 or shared == len(chosen) or shared == len(rejected):
        raise DataError(f"{where}: {implicit}")
    return chosen[:shared], chosen[shared:], rejected[shared:]


@dataclass
class PairExample:
    chosen: list[int]
    rejected: list[int]
    where: str


def encode_scored(tokenizer, messages: list[dict], max_length: int, where: str = "<text>") -> tuple[list[int], bool]:
    """Token ids of a whole rendered conversation, cut from the left to ``max_length``."""
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: the tokenizer has no chat template; the reward model renders prompt + response "
                        "with it")
    ids = tokenizer(_render(tokenizer, messages, where), add_special_tokens=False)["input_ids"]
    return ids[-max_length:], len(ids) > max_length


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


def read_rows(data) -> list[tuple[str, tuple]]:
    """``(file:line, (prompt, chosen, rejected))`` per row, every row checked."""
    from grpokit.data.loaders import read_jsonl

    rows = read_jsonl(data.source)
    if not rows:
        raise DataError(f"{data.source}: the file holds no preference pairs")
    return [(f"{data.source}:{row['_line']}", pair_of(row, f"{data.source}:{row['_line']}")) for row in rows]


# ---------------------------------------------------------------------------- the model


def build_head(kind: str, hidden_size: int, hidden: int):
    """``[N, H] -> [N, 1]``: a linear layer, or Linear -> ReLU -> Linear; fp32."""
    from torch import nn

    if kind == "linear":
        return nn.Linear(hidden_size, 1)
    return nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class RewardScorer:
    """A transformer body plus a scalar head: token ids -> one reward per sequence."""

    def __init__(self, model, head, tokenizer, device, compute_dtype, max_length: int,
                 system_prompt: str | None = None, meta: dict | None = None):
        from grpokit.rollout.logprobs import backbone_and_head

        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.backbone = backbone_and_head(model)[0]
        self.device, self.compute_dtype = device, compute_dtype
        self.max_length, self.system_prompt = max_length, system_prompt
        self.meta = meta or {}

    def autocast(self):
        import contextlib

        import torch

        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def rewards(self, sequences: list[list[int]]):
        """Rewards ``[N]`` (fp32, differentiable) of token-id sequences of any lengths."""
        import torch

        ids_NL, mask_NL = pad_right(sequences, self.tokenizer.pad_token_id or 0)
        ids_NL, mask_NL = ids_NL.to(self.device), mask_NL.to(self.device)
        with self.autocast():
            hidden_NLH = self.backbone(input_ids=ids_NL, attention_mask=mask_NL, use_cache=False).last_hidden_state
        last_N = mask_NL.sum(dim=1) - 1  # right padding: the last real token of each row
        hidden_NH = hidden_NLH[torch.arange(ids_NL.size(0), device=self.device), last_N].float()
        return self.head(hidden_NH).squeeze(-1)

    def encode(self, prompt: Any, completion: str) -> list[int]:
        messages = with_system(as_chat(prompt, "user", "<prompt>", "prompt"), self.system_prompt)
        return encode_scored(self.tokenizer, messages + [{"role": "assistant", "content": completion}],
                             self.max_length)[0]

    def score(self, prompts: list, completions: list[str], batch_size: int = 16) -> list[float]:
        """The reward of each (prompt, completion); prompts are strings or message lists."""
        import torch

        sequences = [self.encode(p, c) for p, c in zip(prompts, completions)]
        self.model.eval()
        values: list[float] = []
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                values += self.rewards(sequences[start:start + batch_size]).tolist()
        return values


def bradley_terry(scorer: RewardScorer, pairs: list[PairExample], margin: float):
    """Mean ``-log sigmoid(r_c - r_r - margin)`` of a micro-batch (chosen and rejected in one
    forward pass), and its accuracy and mean margin."""
    import torch.nn.functional as F

    n = len(pairs)
    rewards_2n = scorer.rewards([p.chosen for p in pairs] + [p.rejected for p in pairs])  # [2n]
    diff_n = rewards_2n[:n] - rewards_2n[n:]
    loss = -F.logsigmoid(diff_n - margin).mean()
    return loss, {"accuracy": (diff_n > 0).float().mean().item(), "margin": diff_n.mean().item()}


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


def save_reward_model(scorer: RewardScorer, directory: Path) -> Path:
    """Weights (adapter or model), tokenizer, head and reward_model.json, written atomically."""
    from safetensors.torch import save_file

    from grpokit.models.checkpoint import save_directory

    def write(staging: Path) -> None:
        scorer.model.save_pretrained(staging, safe_serialization=True)
        scorer.tokenizer.save_pretrained(staging)
        save_file({k: v.detach().contiguous().cpu() for k, v in scorer.head.state_dict().items()}, staging / HEAD_FILE)
        (staging / META_FILE).write_text(json.dumps(scorer.meta, indent=2))

    return save_directory(directory, write)


def setup_reward_model(recipe):
    """Pairs checked, model and head built, pairs tokenized: the ``SupervisedJob`` the shared loop runs."""
    from grpokit.models import load_policy
    from grpokit.train.supervised import SupervisedJob, hold_out

    data, training, head_cfg = recipe.data, recipe.training, recipe.head
    rows = read_rows(data)  # before the model: bad data fails in a second
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


# ---------------------------------------------------------------------------- loading and scoring


def load_reward_model(path: str | Path, device: str = "auto") -> RewardScorer:
    """Rebuild a saved reward model exactly as it was trained (same dtypes, adapter unmerged)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpokit.models.loading import DTYPES, merge_adapter, pick_device, resolve_model_dir

    directory = Path(path).expanduser()
    if not (directory / META_FILE).is_file() and (directory / "reward_model" / META_FILE).is_file():
        directory = directory / "reward_model"  # the run directory was given
    if not (directory / META_FILE).is_file():
        raise ModelError(f"reward model {str(path)!r}: no {META_FILE} there; pass the directory `grpokit reward-model` "
                         "wrote (<output_dir>/reward_model)")
    meta = json.loads((directory / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ModelError(f"{directory / META_FILE}: not a grpokit reward model (format {meta.get('format')!r})")
    torch_device, dtype = pick_device(device), DTYPES[meta["dtype"]]
    kwargs = {"dtype": torch.float32, "attn_implementation": meta["attn_implementation"]}
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if meta["weights"] == "adapter":
            from peft import PeftModel

            base_dir = meta["base_model_resolved"]
            if not Path(base_dir).is_dir():
                base_dir = resolve_model_dir(meta["base_model"])
            model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
            if meta.get("base_adapter"):
                model = merge_adapter(model, meta["base_adapter"])
            # as in training: the frozen base in the compute dtype, the adapter kept in fp32 by PEFT
            model = PeftModel.from_pretrained(model.to(device=torch_device, dtype=dtype), directory)
        else:
            model = AutoModelForCausalLM.from_pretrained(directory, **kwargs).to(torch_device)
    except OSError as exc:
        raise ModelError(f"reward model {str(path)!r}: cannot load ({exc})") from None
    head = build_head(meta["head"]["kind"], meta["head"]["hidden_size"], meta["head"]["hidden"] or 1)
    head.load_state_dict(load_file(directory / HEAD_FILE))
    scorer = RewardScorer(model.eval().requires_grad_(False), head.to(torch_device).eval().requires_grad_(False),
                          tokenizer, torch_device, dtype, meta["max_length"], meta.get("system_prompt"), meta)
    return scorer


_SCORERS: dict[tuple[str, str], RewardScorer] = {}
_LOCK = threading.Lock()


def cached_reward_model(path: str | Path, device: str = "auto") -> RewardScorer:
    """``load_reward_model`` once per (directory, device) in this process."""
    key = (str(Path(path).expanduser().resolve()), device)
    with _LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = load_reward_model(path, device)
        return _SCORERS[key]


def reward_model(prompts, completions, path: str, batch_size: int = 16, device: str = "auto", **_) -> list[float]:
    """A trained reward model's score of each completion (TRL's reward signature).

    Recipe: ``{name: reward_model, args: {path: runs/reward-model/reward_model}}``.
    ``path`` is the ``reward_model/`` directory (or the run directory holding it); the
    prompt and completion are rendered with the chat template, as in training.
    """
    from grpokit.rewards.rewardset import completion_text

    scorer = cached_reward_model(path, device)
    return scorer.score(list(prompts), [completion_text(c) for c in completions], batch_size)


score = reward_model  # the name recipes use: "grpokit.reward_model:score"


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
    """``grpokit reward-model RECIPE [--set KEY=VALUE ...] [--overwrite]``."""
    parser = subparsers.add_parser("reward-model", help="train a reward model (scalar head, Bradley-Terry loss) on "
                                                        "preference pairs; usable as a GRPO reward")
    add_stage_arguments(parser)
    parser.set_defaults(func=cmd_reward_model)
