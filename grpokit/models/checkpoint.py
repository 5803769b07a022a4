"""Checkpoints: safetensors weights (PEFT adapter format for LoRA) plus JSON state.

A checkpoint is written into a temporary sibling directory and renamed into place, so a
crash mid-write never replaces a finished checkpoint with a broken one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def save_checkpoint(policy, directory: str | Path, state: dict) -> Path:
    """Write model/adapter, tokenizer and ``trainer_state.json`` to ``directory`` atomically."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        policy.model.save_pretrained(staging, safe_serialization=True)
        policy.tokenizer.save_pretrained(staging)
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_checkpoint(directory: str | Path, dtype=None, device: str = "cpu", attn_implementation: str = "auto"):
    """Load a checkpoint written by ``save_checkpoint``: ``(model, tokenizer)``.

    A LoRA checkpoint holds a PEFT adapter; its base model is the path PEFT recorded in
    ``adapter_config.json`` (for the embedded model, grpokit's converted cache dir).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpokit.errors import ModelError
    from grpokit.models.loading import choose_attention

    directory = Path(directory)
    dtype = dtype or torch.float32
    attention = choose_attention(attn_implementation, torch.device(device))
    if not directory.is_dir():
        raise ModelError(f"{directory}: checkpoint directory not found")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    adapter_config = directory / "adapter_config.json"
    if adapter_config.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise ModelError(f"{adapter_config}: no base_model_name_or_path; cannot find the base model")
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, attn_implementation=attention)
        model = PeftModel.from_pretrained(base, directory)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attention)
    return model.to(device).eval(), tokenizer


def load_checkpoint_policy(directory: str | Path, model_cfg):
    """A checkpoint as a ``Policy`` built exactly as training built it, so an evaluation of the
    final checkpoint reproduces the run's last eval: same dtype, same merged sampling copy.

    ``model_cfg`` supplies dtype, device and attention; for a LoRA checkpoint the base model
    and the adapter shape come from ``adapter_config.json``, not the recipe.
    """
    from grpokit.config import LoraConfig
    from grpokit.errors import ModelError
    from grpokit.models.loading import load_policy

    directory = Path(directory)
    adapter_config = directory / "adapter_config.json"
    if not adapter_config.is_file():
        if not (directory / "config.json").is_file():
            raise ModelError(f"{directory}: not a checkpoint (no adapter_config.json or config.json)")
        return load_policy(model_cfg.model_copy(update={"path": str(directory), "lora": None}), beta=0.0)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = json.loads(adapter_config.read_text())
    base_path = adapter.get("base_model_name_or_path")
    if not base_path:
        raise ModelError(f"{adapter_config}: no base_model_name_or_path; cannot find the base model")
    targets = adapter["target_modules"]
    lora = LoraConfig(r=adapter["r"], alpha=adapter["lora_alpha"], dropout=adapter.get("lora_dropout", 0.0),
                      target_modules=sorted(targets) if isinstance(targets, list) else targets)
    policy = load_policy(model_cfg.model_copy(update={"path": base_path, "lora": lora}), beta=0.0, merge_lora=True)
    result = set_peft_model_state_dict(policy.model, load_file(directory / "adapter_model.safetensors"))
    if getattr(result, "unexpected_keys", None):
        raise ModelError(f"{directory}: adapter weights do not fit the base model ({result.unexpected_keys[:3]} ...)")
    policy.sync_merged()
    policy.model.eval()
    return policy
