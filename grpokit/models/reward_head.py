"""A language model with a scalar reward head: how it is built, saved, loaded and run.

The head (a linear layer, or Linear -> ReLU -> Linear; fp32) reads the final hidden state
of a sequence's last real token. Sequences are padded on the right, so with causal
attention a reward is unaffected by padding and by the other rows of the batch. Prompt +
response are rendered with the tokenizer's chat template (a string prompt as the user's
turn, the response as the assistant's), cut from the left to the trained length.

Saved as ``reward_model/``: the adapter (PEFT, safetensors) or the whole model, the
tokenizer, ``head.safetensors`` and ``reward_model.json`` (the base model as given and as
resolved, head, max length, dtype, system prompt). ``grpokit reward-model``
(``train/reward_model.py``) trains it; the ``reward_model`` reward (``rewards/reward_model.py``)
scores GRPO completions with it. Neither torch nor transformers is imported at import time.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from grpokit.data.chat import as_chat, render_chat, with_system
from grpokit.errors import DataError, ModelError

FORMAT = "grpokit-reward-model"
META_FILE = "reward_model.json"
HEAD_FILE = "head.safetensors"


def encode_scored(tokenizer, messages: list[dict], max_length: int, where: str = "<text>") -> tuple[list[int], bool]:
    """Token ids of a whole rendered conversation, cut from the left to ``max_length``."""
    if tokenizer.chat_template is None:
        raise DataError(f"{where}: the tokenizer has no chat template; the reward model renders prompt + response "
                        "with it")
    ids = tokenizer(render_chat(tokenizer, messages, where), add_special_tokens=False)["input_ids"]
    return ids[-max_length:], len(ids) > max_length


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
        from grpokit.models.parts import backbone_and_head

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

        from grpokit.models.padding import pad_right

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
