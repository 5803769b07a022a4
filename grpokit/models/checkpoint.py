"""Checkpoints: safetensors weights (PEFT adapter format for LoRA), JSON state, torch state files.

Writing is crash-safe at every instant:
1. everything goes into a hidden staging directory beside the target, ``trainer_state.json``
   last (its presence is what "complete" means), and every file is fsynced;
2. the staging directory is renamed into place (atomic on POSIX) and the parent fsynced;
3. only then does ``checkpoints/latest`` (a one-line file, itself replaced atomically)
   point at it, and only then are checkpoints beyond the newest K deleted.
A kill at any point leaves the previous checkpoint complete and ``latest`` naming a
complete checkpoint. Optimiser and RNG state are ``torch.save`` files read back with
``weights_only=True``: loading a checkpoint never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

STATE_FILE = "trainer_state.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d+)")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(root)


def save_directory(directory: str | Path, write) -> Path:
    """Fill ``directory`` atomically: ``write(staging)`` fills a hidden staging dir beside it, which
    is fsynced and renamed into place; an old ``directory`` is replaced only once the new one is complete."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    trash = None
    try:
        write(staging)
        staging.chmod(0o755)  # mkdtemp made it private; weights are for other tools and users too
        _fsync_tree(staging)
        if directory.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
            os.replace(directory, trash / directory.name)
        os.replace(staging, directory)
        _fsync(directory.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return directory


def save_checkpoint(policy, directory: str | Path, state: dict, torch_state: dict[str, Any] | None = None) -> Path:
    """Write model/adapter, tokenizer, ``<name>.pt`` per ``torch_state`` entry and ``trainer_state.json``
    (last: its presence marks a complete checkpoint) to ``directory`` atomically."""
    import torch

    def write(staging: Path) -> None:
        policy.model.save_pretrained(staging, safe_serialization=True)
        policy.tokenizer.save_pretrained(staging)
        for name, value in (torch_state or {}).items():
            torch.save(value, staging / f"{name}.pt")
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))

    return save_directory(directory, write)


def is_complete(directory: Path) -> bool:
    return (directory / STATE_FILE).is_file()


def step_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Complete ``step-N`` checkpoints, oldest first (staging and half-deleted dirs are ignored)."""
    found = []
    if checkpoints_dir.is_dir():
        for path in checkpoints_dir.iterdir():
            if (match := _STEP_DIR.fullmatch(path.name)) and path.is_dir() and is_complete(path):
                found.append((int(match.group(1)), path))
    return sorted(found)


def publish_checkpoint(directory: Path, keep: int) -> None:
    """Point ``latest`` at a complete checkpoint, then delete all but the newest ``keep`` and any
    staging leftovers of an earlier crash."""
    checkpoints_dir = directory.parent
    tmp = checkpoints_dir / f".{LATEST}.tmp"
    tmp.write_text(directory.name + "\n")
    _fsync(tmp)
    os.replace(tmp, checkpoints_dir / LATEST)
    _fsync(checkpoints_dir)
    complete = step_checkpoints(checkpoints_dir)
    for _, old in complete[:-keep]:
        if old != directory:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in checkpoints_dir.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The checkpoint ``latest`` names if it is complete, else the newest complete one, else None."""
    pointer = checkpoints_dir / LATEST
    if pointer.is_file():
        named = checkpoints_dir / pointer.read_text().strip()
        if _STEP_DIR.fullmatch(named.name) and is_complete(named):
            return named
    complete = step_checkpoints(checkpoints_dir)
    return complete[-1][1] if complete else None


def load_torch_state(directory: Path, name: str) -> Any:
    """A ``<name>.pt`` state file, unpickled with ``weights_only=True`` (tensors and plain types only)."""
    import pickle

    import torch

    from grpokit.errors import RunDirError

    path = directory / f"{name}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise RunDirError(f"{path}: refused ({type(exc).__name__}): not a plain tensor state file, or damaged; "
                          "grpokit never runs code from a checkpoint. Remove this checkpoint directory to resume "
                          "from an earlier one, or start the run again with --overwrite") from None


def load_trained_weights(policy, directory: Path) -> None:
    """Put a checkpoint's trained weights into an already built policy (adapter or full model)."""
    from safetensors.torch import load_file

    from grpokit.errors import ModelError

    if policy.is_lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy.model, load_file(directory / "adapter_model.safetensors"))
        unexpected = getattr(result, "unexpected_keys", [])
    else:
        weights = {}
        for shard in sorted(directory.glob("model*.safetensors")):
            weights.update(load_file(shard))
        result = policy.model.load_state_dict(weights, strict=False)
        tied = set(getattr(policy.model, "all_tied_weights_keys", None) or getattr(policy.model, "_tied_weights_keys", None) or [])
        unexpected = list(result.unexpected_keys) + [k for k in result.missing_keys if k not in tied]
    if unexpected:
        raise ModelError(f"{directory}: checkpoint weights do not fit the model ({unexpected[:3]} ...)")
    policy.sync_merged()


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


def load_checkpoint_policy(directory: str | Path, model_cfg, merge_lora: bool = True):
    """A checkpoint as a ``Policy`` built exactly as training built it, so an evaluation of the
    final checkpoint reproduces the run's last eval: same dtype, and a merged sampling copy exactly
    when training had one (``merge_lora``, the recipe's rollout.merge_lora).

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
    adapter = json.loads(adapter_config.read_text())
    base_path = adapter.get("base_model_name_or_path")
    if not base_path:
        raise ModelError(f"{adapter_config}: no base_model_name_or_path; cannot find the base model")
    targets = adapter["target_modules"]
    layers = adapter.get("layers_to_transform")
    lora = LoraConfig(r=adapter["r"], alpha=adapter["lora_alpha"], dropout=adapter.get("lora_dropout", 0.0),
                      target_modules=sorted(targets) if isinstance(targets, list) else targets,
                      last_k_layers=len(layers) if isinstance(layers, list) else None)
    policy = load_policy(model_cfg.model_copy(update={"path": base_path, "lora": lora}), beta=0.0, merge_lora=merge_lora)
    load_trained_weights(policy, directory)
    policy.model.eval()
    return policy
