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
