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
