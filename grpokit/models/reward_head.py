"""A language model with a scalar reward head: how it is built, saved, loaded and run.

The head (a linear layer, or Linear -> ReLU -> Linear; fp32) reads the final hidden state
of a sequence's last real token. Sequences are padded on the right, so with causal
attention a reward is unaffected by padding and by the other rows of the batch. Prompt +
response are rendered with the chat template (a string prompt as the user's turn, the
response as the assistant's), cut from the left to the trained length.

A vision-language model (a config with ``vision_config``) is scored the same way through
its multimodal body: the conversation is rendered with the processor's chat template, the
images sit in the prompt (one image block each; TRL's placement when the prompt has none),
and a sequence with images brings its processor outputs (pixel values, grid sizes, token
types), collated per batch beside the right-padded ids, with its positions passed
explicitly (Qwen's 3-D rotary positions). Image tokens cannot be cut, so a sequence with
images longer than the trained length is refused. This module takes those processor
outputs from its callers (``train/reward_model.py``, ``rewards/reward_model.py``), which
make them per batch, so no batch holds more decoded pixels than its own.

Saved as ``reward_model/``: the adapter (PEFT, safetensors) or the whole model, the
tokenizer (a VLM's whole processor), ``head.safetensors`` and ``reward_model.json`` (the base
model as given and as resolved, whether it is multimodal, head, max length, dtype, system
prompt). ``grpokit reward-model`` (``train/reward_model.py``) trains it; the
``reward_model`` reward (``rewards/reward_model.py``) scores GRPO completions with it.
Neither torch nor transformers is imported at import time.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

from grpokit.data.chat import as_chat, render_chat, with_system
from grpokit.data.images import with_image_blocks
from grpokit.errors import DataError, ModelError

FORMAT = "grpokit-reward-model"
META_FILE = "reward_model.json"
HEAD_FILE = "head.safetensors"


def render_scored(processor, messages: list[dict], where: str = "<text>") -> str:
    """A whole conversation as the scorer reads it: through the processor's chat template (a VLM's
    own, which renders image blocks), else the tokenizer's."""
    from grpokit.models.multimodal import chat_template_of, tokenizer_of

    tokenizer = tokenizer_of(processor)
    template = chat_template_of(processor)
    if template is None:
        raise DataError(f"{where}: the tokenizer has no chat template; the reward model renders prompt + response "
                        "with it")
    return render_chat(tokenizer, messages, where, template=template)


def encode_scored(processor, messages: list[dict], max_length: int, where: str = "<text>") -> tuple[list[int], bool]:
    """Token ids of a whole rendered text-only conversation, cut from the left to ``max_length``; and
    whether it was cut. ``processor``: a tokenizer, or a VLM's processor (its template, its tokenizer)."""
    from grpokit.models.multimodal import tokenizer_of

    tokenizer = tokenizer_of(processor)
    ids = tokenizer(render_scored(processor, messages, where), add_special_tokens=False)["input_ids"]
    return ids[-max_length:], len(ids) > max_length


def check_image_length(length: int, max_length: int, where: str) -> None:
    """A sequence with images is never cut (a cut image would leave the model fewer image tokens than
    features), so one over the limit is refused."""
    if length > max_length:
        raise DataError(f"{where}: prompt + response has {length} tokens with its images, over the reward "
                        f"model's max_length = {max_length} (training.max_length), and image tokens cannot be cut; "
                        "raise training.max_length or lower model.max_pixels")


def build_head(kind: str, hidden_size: int, hidden: int):
    """``[N, H] -> [N, 1]``: a linear layer, or Linear -> ReLU -> Linear; fp32."""
    from torch import nn

    if kind == "linear":
        return nn.Linear(hidden_size, 1)
    return nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class RewardScorer:
    """A transformer body plus a scalar head: token ids (and a VLM's image inputs) -> one reward per sequence."""

    def __init__(self, model, head, processor, device, compute_dtype, max_length: int,
                 system_prompt: str | None = None, meta: dict | None = None):
        from grpokit.models.parts import backbone_and_head

        self.model, self.head, self.processor = model, head, processor
        self.backbone = backbone_and_head(model)[0]
        self.device, self.compute_dtype = device, compute_dtype
        self.max_length, self.system_prompt = max_length, system_prompt
        self.meta = meta or {}

    @property
    def tokenizer(self):
        from grpokit.models.multimodal import tokenizer_of

        return tokenizer_of(self.processor)

    @property
    def multimodal(self) -> bool:
        from grpokit.models.multimodal import reads_images

        return reads_images(self.processor)

    def autocast(self):
        import contextlib

        import torch

        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def rewards(self, sequences: list[list[int]], image_inputs: list[dict] | None = None):
        """Rewards ``[N]`` (fp32, differentiable) of token-id sequences of any lengths. ``image_inputs``: a
        VLM's processor outputs per sequence, unpadded (``{}`` for a sequence without images)."""
        import torch

        from grpokit.models.multimodal import collate, prompt_positions
        from grpokit.models.padding import pad_right

        ids_NL, mask_NL = pad_right(sequences, self.tokenizer.pad_token_id or 0)
        ids_NL, mask_NL = ids_NL.to(self.device), mask_NL.to(self.device)
        inputs = {}
        if image_inputs and any(image_inputs):
            inputs = {key: value.to(self.device) for key, value in
                      collate(image_inputs, ids_NL.size(1), left=False).items()}
            # explicit positions: Qwen's come from its image grids, never from state a previous call left
            inputs["position_ids"] = prompt_positions(self.backbone, ids_NL, mask_NL, inputs)  # [N, L] or [3, N, L]
        with self.autocast():
            hidden_NLH = self.backbone(input_ids=ids_NL, attention_mask=mask_NL, use_cache=False,
                                       **inputs).last_hidden_state
        last_N = mask_NL.sum(dim=1) - 1  # right padding: the last real token of each row
        hidden_NH = hidden_NLH[torch.arange(ids_NL.size(0), device=self.device), last_N].float()
        return self.head(hidden_NH).squeeze(-1)

    def conversation(self, prompt: Any, completion: str, n_images: int = 0, where: str = "<prompt>") -> list[dict]:
        """Prompt + completion as scored: the system prompt unless the prompt has one; with images, one
        image block per image in the prompt (TRL's placement when it has none), as the policy saw it."""
        if n_images:
            messages = with_image_blocks(prompt, n_images, where)
        else:
            messages = as_chat(prompt, "user", where, "prompt")
        return with_system(messages, self.system_prompt) + [{"role": "assistant", "content": completion}]

    def encode(self, prompt: Any, completion: str) -> list[int]:
        """Token ids of a text-only prompt + completion, cut from the left to the trained length."""
        return encode_scored(self.processor, self.conversation(prompt, completion), self.max_length)[0]

    def score_sequences(self, encode: Callable[[int], tuple[list[int], dict]], n: int,
                        batch_size: int = 16) -> list[float]:
        """The rewards of ``n`` sequences, ``batch_size`` at a time under ``no_grad``. ``encode(i)`` gives
        sequence i's ids and image inputs; it is called when i's batch is scored, so images are decoded
        only for the batch at hand."""
        import torch

        self.model.eval()
        values: list[float] = []
        with torch.no_grad():
            for start in range(0, n, batch_size):
                encoded = [encode(i) for i in range(start, min(start + batch_size, n))]
                values += self.rewards([ids for ids, _ in encoded], [inputs for _, inputs in encoded]).tolist()
        return values

    def score(self, prompts: list, completions: list[str], batch_size: int = 16) -> list[float]:
        """The reward of each text-only (prompt, completion); prompts are strings or message lists."""
        return self.score_sequences(lambda i: (self.encode(prompts[i], completions[i]), {}), len(prompts),
                                    batch_size)


def save_reward_model(scorer: RewardScorer, directory: Path) -> Path:
    """Weights (adapter or model), tokenizer or processor, head and reward_model.json, written atomically."""
    from safetensors.torch import save_file

    from grpokit.models.checkpoint import save_directory

    def write(staging: Path) -> None:
        scorer.model.save_pretrained(staging, safe_serialization=True)
        scorer.processor.save_pretrained(staging)  # a VLM: its processor, tokenizer included
        save_file({k: v.detach().contiguous().cpu() for k, v in scorer.head.state_dict().items()}, staging / HEAD_FILE)
        (staging / META_FILE).write_text(json.dumps(scorer.meta, indent=2))

    return save_directory(directory, write)


def _meta_of(path: str | Path) -> tuple[Path, dict]:
    """The reward model's directory and its reward_model.json, checked."""
    directory = Path(path).expanduser()
    if not (directory / META_FILE).is_file() and (directory / "reward_model" / META_FILE).is_file():
        directory = directory / "reward_model"  # the run directory was given
    if not (directory / META_FILE).is_file():
        raise ModelError(f"reward model {str(path)!r}: no {META_FILE} there; pass the directory `grpokit reward-model` "
                         "wrote (<output_dir>/reward_model)")
    meta = json.loads((directory / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ModelError(f"{directory / META_FILE}: not a grpokit reward model (format {meta.get('format')!r})")
    return directory, meta


def load_reward_model(path: str | Path, device: str = "auto") -> RewardScorer:
    """Rebuild a saved reward model exactly as it was trained (same dtypes, adapter unmerged). A config with
    ``vision_config`` loads as a vision-language model, with the processor saved beside it."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from grpokit.models.loading import DTYPES, merge_adapter, pick_device, resolve_model_dir
    from grpokit.models.processors import load_processor

    directory, meta = _meta_of(path)
    torch_device, dtype = pick_device(device), DTYPES[meta["dtype"]]
    kwargs = {"dtype": torch.float32, "attn_implementation": meta["attn_implementation"]}
    try:
        source = str(directory)  # whole weights; an adapter's base is found below
        if meta["weights"] == "adapter":
            source = meta["base_model_resolved"]
            if not Path(source).is_dir():
                source = resolve_model_dir(meta["base_model"])
        multimodal = hasattr(AutoConfig.from_pretrained(source), "vision_config")
        processor = load_processor(str(directory), multimodal)
        model_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        model = model_class.from_pretrained(source, **kwargs)
        if meta["weights"] == "adapter":
            from peft import PeftModel

            if meta.get("base_adapter"):
                model = merge_adapter(model, meta["base_adapter"])
            # as in training: the frozen base in the compute dtype, the adapter kept in fp32 by PEFT
            model = PeftModel.from_pretrained(model.to(device=torch_device, dtype=dtype), directory)
        else:
            model = model.to(torch_device)
    except OSError as exc:
        raise ModelError(f"reward model {str(path)!r}: cannot load ({exc})") from None
    head = build_head(meta["head"]["kind"], meta["head"]["hidden_size"], meta["head"]["hidden"] or 1)
    head.load_state_dict(load_file(directory / HEAD_FILE))
    return RewardScorer(model.eval().requires_grad_(False), head.to(torch_device).eval().requires_grad_(False),
                        processor, torch_device, dtype, meta["max_length"], meta.get("system_prompt"), meta)


_SCORERS: dict[tuple[str, str], RewardScorer] = {}
_LOCK = threading.Lock()


def cached_reward_model(path: str | Path, device: str = "auto") -> RewardScorer:
    """``load_reward_model`` once per (directory, device) in this process."""
    key = (str(Path(path).expanduser().resolve()), device)
    with _LOCK:
        if key not in _SCORERS:
            _SCORERS[key] = load_reward_model(path, device)
        return _SCORERS[key]
