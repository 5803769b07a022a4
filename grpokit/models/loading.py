"""The policy: model + processor + how to get reference log-probabilities.

Precision: with LoRA, the frozen base is stored in the compute dtype (bf16 halves its
memory and runs the fast matmuls) while PEFT keeps the small adapters in fp32. With full
fine-tuning, weights stay fp32 (bf16 weights would swallow small AdamW updates) and
matmuls run under autocast in the compute dtype. The reference policy is the base with
adapters disabled for LoRA (no second copy), a frozen copy for full fine-tuning, and
nothing at all when beta == 0. A quantized base (model.load_in_4bit / load_in_8bit,
grpokit/models/quantization.py) is LoRA only, so it never gets a frozen copy.

Gradient checkpointing (training.gradient_checkpointing) acts only in training mode with
gradients on: sampling and the no-grad reference pass keep their KV cache.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from grpokit.config import DEFAULT_MODEL
from grpokit.errors import ModelError
from grpokit.models.attention import eager_for
from grpokit.models.gguf import convert_gguf, embedded_gguf
from grpokit.models.multimodal import tokenizer_of
from grpokit.models.processors import load_processor
from grpokit.models.quantization import is_quantized, quantization_config
from grpokit.models.vision import (DEFAULT_FROZEN, ROLE_NAMES, is_multimodal, language_model_layers,
                                   role_patterns, role_prefix)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

log = logging.getLogger(__name__)


def resolve_model_dir(path: str) -> str:
    """Turn ``model.path`` into something ``from_pretrained`` loads: a dir or a hub id."""
    if path == DEFAULT_MODEL:
        return str(convert_gguf(embedded_gguf()))
    local = Path(path).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelError(f"model.path {path!r}: GGUF file not found")
        return str(convert_gguf(local))
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"model.path {path!r}: the directory has no config.json (not a transformers model)")
        return str(local)
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ModelError(f"model.path {path!r}: no such model directory or .gguf file")
    return path  # a hub id: transformers downloads it when the machine is online


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def choose_attention(name: str, device: torch.device, config=None) -> str:
    """Resolve "auto": eager attention on CPU (faster backward on short sequences), SDPA elsewhere. Given the
    model's config, CPU eager is grpokit's grouped-query kernel for the families where it is exact
    (``models/attention.py``)."""
    if name != "auto":
        return name
    if device.type != "cpu":
        return "sdpa"
    return eager_for(config) if config is not None else "eager"


@dataclass
class Policy:
    """What the later stages need of the model, and nothing about how it was built."""

    model: Any
    processor: Any  # the tokenizer, or a multimodal processor that holds one (and prepares images)
    device: torch.device
    compute_dtype: torch.dtype
    reference: Any = None  # frozen copy (full fine-tuning with beta > 0); None otherwise
    is_lora: bool = False
    merged: Any = None  # plain copy with the LoRA update merged in, for sampling (or None)
    eos_ids: list[int] = field(default_factory=list)
    gradient_checkpointing: bool = False  # blocks recomputed in the backward; no KV cache while training

    @property
    def tokenizer(self):
        """The text tokenizer: the processor itself, or the one a multimodal processor holds."""
        return tokenizer_of(self.processor)

    def autocast(self):
        """Matmuls in the compute dtype; a no-op for fp32.

        With LoRA, PEFT casts each adapted layer's input to the adapters' fp32 before ``lora_A``,
        and autocast casts it straight back to the compute dtype for the matmul: two full copies
        of every adapted layer's input per forward, for the same bf16 matmul. Under autocast that
        cast is switched off (PEFT's own switch), which changes no value.
        """
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self.compute_dtype))
        if self.is_lora:
            from peft.helpers import disable_input_dtype_casting

            stack.enter_context(disable_input_dtype_casting(self.model))
        return stack

    def reference_model(self):
        """Context manager yielding the reference: adapters off (LoRA) or the frozen copy."""
        if self.is_lora:
            return _adapters_off(self.model)
        if self.reference is None:
            raise ModelError("no reference model: full fine-tuning with beta == 0 keeps none")
        return contextlib.nullcontext(self.reference)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def sampling_model(self):
        """The model to decode with: the merged copy when there is one, else the policy itself."""
        return self.merged if self.merged is not None else self.model

    @torch.no_grad()
    def sync_merged(self) -> None:
        """Write W + (alpha/r) * B @ A into the merged copy after the adapters changed.

        Decoding then runs one matmul per linear layer instead of three (base, A, B); the
        base weights themselves are never modified, so no rounding drift accumulates.
        """
        if self.merged is None:
            return
        from peft.tuners.lora import LoraLayer
        from peft.utils import ModulesToSaveWrapper

        targets = dict(self.merged.named_modules())
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                target = targets[name.removeprefix("base_model.model.")]
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters)
                target.weight.copy_(module.base_layer.weight.float() + delta.float())
            elif isinstance(module, ModulesToSaveWrapper):  # lora.modules_to_save: a trained copy, not a delta
                trained = module.modules_to_save[module.active_adapters[0]]
                targets[name.removeprefix("base_model.model.")].load_state_dict(trained.state_dict())


@contextlib.contextmanager
def _adapters_off(model):
    with model.disable_adapter():
        yield model


def eos_token_ids(tokenizer, model) -> list[int]:
    """Stop tokens: the tokenizer's EOS plus the generation config's (chat models end turns there)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def last_layers(model, k: int | None) -> list[int] | None:
    """Indices of the last ``k`` transformer blocks, for PEFT's ``layers_to_transform``."""
    if k is None:
        return None
    total = model.config.num_hidden_layers
    if k > total:
        raise ModelError(f"model.lora.last_k_layers = {k}, but the model has only {total} transformer blocks")
    return list(range(total - k, total))


def lora_targets(model, lora) -> list[str] | str:
    """The recipe's target modules; "all-linear" spelled out when PEFT needs names (with last_k_layers)."""
    if lora.target_modules != "all-linear" or lora.last_k_layers is None:
        return lora.target_modules
    output = model.get_output_embeddings()
    return linear_names(model, lambda name, module: module is not output)


def linear_names(model, keep) -> list[str]:
    """The last name segments of the model's linear layers that ``keep(name, module)`` accepts."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and keep(name, module)})


def language_model_lora_targets(model, lora) -> str:
    """A VLM's LoRA targets as one full-match regex over module names: linear layers inside the language
    model's blocks only (never the vision tower or the projector), in its last ``last_k_layers`` blocks
    when set. PEFT's ``layers_to_transform`` would count the first block list it meets, the vision one."""
    layers, total = language_model_layers(model)
    k = lora.last_k_layers
    if k is not None and k > total:
        raise ModelError(f"model.lora.last_k_layers = {k}, but the language model has only {total} blocks")
    blocks = "|".join(str(i) for i in range(total - (k or total), total))
    names = (linear_names(model, lambda name, _: name.startswith(layers + "."))
             if lora.target_modules == "all-linear" else list(lora.target_modules))
    return re.escape(layers) + rf"\.(?:{blocks})\.(?:.*\.)?(?:{'|'.join(map(re.escape, names))})"


def frozen_entries(model, freeze: list[str] | None, saved: list[str]) -> list[str] | None:
    """``model.freeze`` as given; its default (None) without the roles ``lora.modules_to_save`` trains.
    A part both frozen and saved on purpose is a contradiction the recipe has to settle."""
    if freeze is None:
        if not saved or not is_multimodal(model):
            return None
        return [role for role in DEFAULT_FROZEN if role not in saved]
    both = sorted(set(freeze) & set(saved))
    if both:
        raise ModelError(f"model.freeze and model.lora.modules_to_save both name {both}: a part is either kept "
                         "frozen or trained in full; remove it from one of them")
    return freeze


def module_path(model, entry: str) -> str:
    """A ``modules_to_save`` entry as PEFT matches it: a role as its module path, a name as it is."""
    if entry in ROLE_NAMES:
        return role_prefix(model, entry, "model.lora.modules_to_save")
    if not any(name == entry or name.endswith("." + entry) for name, _ in model.named_modules()):
        raise ModelError(f"model.lora.modules_to_save: no module is named {entry!r}")
    return entry


def _matching(names: list[str], patterns: list[str]) -> list[str]:
    for pattern in patterns:
        if not any(re.search(pattern, name) for name in names):
            raise ModelError(f"model.freeze: {pattern!r} matches no module of the model "
                             f"(names look like {names[len(names) // 2]!r})")
    return [name for name in names if any(re.search(p, name) for p in patterns)]


def frozen_modules_regex(model, patterns: list[str]) -> str | None:
    """PEFT's ``exclude_modules`` (a full-match regex): no adapter on modules matching a pattern."""
    if not patterns:
        return None
    _matching([name for name, _ in model.named_modules() if name], patterns)
    return "|".join(f".*(?:{p}).*" for p in patterns)


def freeze_parameters(model, patterns: list[str]) -> None:
    """Full fine-tuning: parameters whose names match a pattern get no gradient."""
    if patterns:
        frozen = set(_matching([name for name, _ in model.named_parameters()], patterns))
        for name, param in model.named_parameters():
            if name in frozen:
                param.requires_grad_(False)


def merge_adapter(model, adapter: str):
    """Fold a LoRA adapter (an SFT warm start) into the base weights: the new starting model."""
    from peft import PeftModel

    directory = Path(adapter).expanduser()
    if not (directory / "adapter_config.json").is_file():
        raise ModelError(f"model.adapter {adapter!r}: no adapter_config.json there; pass the directory "
                         "`grpokit sft` wrote (e.g. runs/sft/adapter) or a PEFT adapter")
    from grpokit.models.checkpoint import checkpoint_weights

    checkpoint_weights(directory, lora=True)  # safetensors only: PEFT would unpickle adapter_model.bin
    return PeftModel.from_pretrained(model, directory, use_safetensors=True).merge_and_unload()


def enable_checkpointing(model) -> None:
    """HF gradient checkpointing, non-reentrant: it needs no gradient on the (frozen) embedding output, and
    HF applies it only in training mode with gradients on, so no-grad passes keep their KV cache."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(f"training.gradient_checkpointing: {type(model).__name__} does not support gradient "
                         "checkpointing; set it to false")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name; the old one warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def wrap_policy(model, processor, model_cfg, beta: float, device: torch.device, merge_lora: bool = False,
                gradient_checkpointing: bool = False) -> Policy:
    """Add LoRA (or keep full fine-tuning), pick the reference, and bundle it all as a Policy."""
    dtype = DTYPES[model_cfg.dtype]
    multimodal = is_multimodal(model)
    quantized = is_quantized(model)
    if gradient_checkpointing and multimodal:
        # a VLM's prompts (with their images) always run once and hand their KV cache to the completions
        raise ModelError("training.gradient_checkpointing is not supported for vision-language models yet: their "
                         "log-prob passes reuse each prompt's KV cache, which checkpointing turns off; set it to false")
    if quantized and model_cfg.lora is None:
        raise ModelError("a quantized base (model.load_in_4bit / load_in_8bit) is trained with LoRA only; give model.lora")
    if quantized and merge_lora:
        # merging into 4-/8-bit weights would round the update away; a full-precision copy undoes the saving
        log.warning("rollout.merge_lora is ignored with a quantized base: sampling runs the quantized base with "
                    "the adapters on (set rollout.merge_lora: false to silence this)")
        merge_lora = False
    saved = model_cfg.lora.modules_to_save if model_cfg.lora is not None else []
    freeze = role_patterns(model, frozen_entries(model, model_cfg.freeze, saved))
    tokenizer = tokenizer_of(processor)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos = eos_token_ids(tokenizer, model)
    reference = merged = None
    if model_cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = model_cfg.lora
        if not quantized:  # bitsandbytes' layers were placed by from_pretrained and refuse a dtype change
            model = model.to(device=device, dtype=dtype)
        if merge_lora:
            merged = copy.deepcopy(model).eval().requires_grad_(False)
        if gradient_checkpointing:
            enable_checkpointing(model)
        if multimodal:  # the language model's blocks only, counted as its own blocks
            targets, layers = language_model_lora_targets(model, lora), None
        else:
            targets, layers = lora_targets(model, lora), last_layers(model, lora.last_k_layers)
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=targets, task_type="CAUSAL_LM", layers_to_transform=layers,
            exclude_modules=frozen_modules_regex(model, freeze),
            modules_to_save=[module_path(model, entry) for entry in saved] or None,
        )
        model = get_peft_model(model, config)  # adapters stay fp32 (autocast_adapter_dtype)
    else:
        model = model.to(device=device, dtype=torch.float32)
        freeze_parameters(model, freeze)
        if beta > 0:
            reference = copy.deepcopy(model).to(dtype=dtype).eval().requires_grad_(False)
        if gradient_checkpointing:
            enable_checkpointing(model)
    model.config.use_cache = True
    return Policy(model, processor, device, dtype, reference, model_cfg.lora is not None, merged, eos,
                  gradient_checkpointing)


def load_policy(model_cfg, beta: float, merge_lora: bool = False, gradient_checkpointing: bool = False) -> Policy:
    """Load the recipe's model and tokenizer and wrap them for training; a quantized base is quantized
    here, by transformers, on its device (model.load_in_4bit / load_in_8bit)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    source = resolve_model_dir(model_cfg.path)
    device = pick_device(model_cfg.device)
    kwargs = {"trust_remote_code": model_cfg.trust_remote_code}
    quantization = quantization_config(model_cfg, DTYPES[model_cfg.bnb_4bit_compute_dtype or model_cfg.dtype])
    weights = {"dtype": torch.float32}  # full fine-tuning keeps fp32 weights; LoRA casts its frozen base later
    if quantization is not None:  # the unquantized rest (embeddings, norms) straight in the compute dtype
        weights = {"dtype": DTYPES[model_cfg.dtype], "quantization_config": quantization, "device_map": {"": device}}
    try:
        # a vision part in the config (a local directory or a hub id alike) makes it a vision-language model
        config = AutoConfig.from_pretrained(source, **kwargs)
        multimodal = hasattr(config, "vision_config")
        attention = choose_attention(model_cfg.attn_implementation, device, config)
        model_class = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
        processor = load_processor(source, multimodal, model_cfg.trust_remote_code,
                                   min_pixels=model_cfg.min_pixels, max_pixels=model_cfg.max_pixels)
        model = model_class.from_pretrained(source, attn_implementation=attention, **weights, **kwargs)
    except OSError as exc:
        raise ModelError(f"model.path {model_cfg.path!r}: cannot load ({exc})") from None
    tokenizer_of(processor).padding_side = "left"
    if model_cfg.adapter:
        model = merge_adapter(model, model_cfg.adapter)
    return wrap_policy(model, processor, model_cfg, beta, device, merge_lora, gradient_checkpointing)
