"""Checkpoints: safetensors weights (PEFT adapter format for LoRA), JSON state, torch state files.

Writing is crash-safe at every instant:
1. everything goes into a hidden staging directory beside the target, ``trainer_state.json``
   last (its presence is what "complete" means), and every file is fsynced;
2. the staging directory is renamed into place (atomic on POSIX) and the parent fsynced;
3. only then does ``checkpoints/latest`` (a one-line file, itself replaced atomically)
   point at it, and only then are checkpoints beyond the newest K deleted.
A kill at any point leaves the previous checkpoint complete and ``latest`` naming a
complete checkpoint. A full disk fails the write with a message, the partial copy removed.
Optimiser and RNG state are ``torch.save`` files read back with ``weights_only=True``, and
weights are read only from safetensors: loading a checkpoint never unpickles arbitrary objects.

A run directory may come from elsewhere, so it is read as untrusted: ``latest`` must name a
plain ``step-N`` inside ``checkpoints/`` (no path, no link), and step directories that are
symbolic links are never used (nor deleted through).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from grpokit.io import replace_file
from grpokit.models.parts import unwrap_model
from grpokit.models.sharding import load_model_state

STATE_FILE = "trainer_state.json"
LATEST = "latest"
_STEP_DIR = re.compile(r"step-(\d+)")
# torch.save's C++ writer reports a short write (a full disk) as a RuntimeError, not an OSError
_TORCH_WRITE_FAILED = re.compile(r"inline_container|PytorchStreamWriter|unexpected pos|file write failed")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


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
        try:
            write(staging)
            staging.chmod(0o755)  # mkdtemp made it private; weights are for other tools and users too
            _fsync_tree(staging)
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise _disk_full(directory, f"{exc.strerror or exc}") from None
            raise
        except RuntimeError as exc:
            if _TORCH_WRITE_FAILED.search(str(exc)):
                raise _disk_full(directory, f"torch could not write a file: {exc}") from None
            raise
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


def _disk_full(directory: Path, detail: str):
    """The message for a write that ran out of space: what, where, what is still intact, what to do."""
    from grpokit.errors import TrainingError

    earlier = [path for _, path in step_checkpoints(directory.parent) if path.name != directory.name]
    if earlier:
        intact = (f"the previous checkpoint {earlier[-1].name} is intact: free some space (or move "
                  "training.output_dir to a larger disk), then continue from it with --resume")
    else:
        intact = "nothing already on disk was changed: free some space, then run again"
    detail = " ".join(detail.split())[:200]
    return TrainingError(f"cannot write {directory}: no space left on device, or the disk failed ({detail}); "
                         f"the partial copy was removed and {intact}")


def save_checkpoint(policy, directory: str | Path, state: dict, torch_state: dict[str, Any] | None = None,
                    weights: dict[str, Any] | None = None) -> Path:
    """Write model/adapter, tokenizer, ``<name>.pt`` per ``torch_state`` entry and ``trainer_state.json``
    (last: its presence marks a complete checkpoint) to ``directory`` atomically. ``weights``: a sharded
    model's full weights, gathered by every rank beforehand (``sharding.full_model_state``)."""
    import torch

    def write(staging: Path) -> None:
        if weights is None:
            policy.model.save_pretrained(staging, safe_serialization=True)
        else:  # saved as the unsharded model saves its own
            unwrap_model(policy.model).save_pretrained(staging, state_dict=weights, safe_serialization=True)
        policy.processor.save_pretrained(staging)  # a VLM: its processor, tokenizer included
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
            if (match := _STEP_DIR.fullmatch(path.name)) and not path.is_symlink() and path.is_dir() \
                    and is_complete(path):
                found.append((int(match.group(1)), path))
    return sorted(found)


def publish_checkpoint(directory: Path, keep: int) -> None:
    """Point ``latest`` at a complete checkpoint, then delete all but the newest ``keep`` and any
    staging leftovers of an earlier crash."""
    checkpoints_dir = directory.parent
    replace_file(checkpoints_dir / LATEST, (directory.name + "\n").encode())
    _fsync(checkpoints_dir)
    complete = step_checkpoints(checkpoints_dir)
    for _, old in complete[:-keep]:
        if old != directory:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in checkpoints_dir.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    for leftover in checkpoints_dir.glob(f".{LATEST}.*.tmp"):
        leftover.unlink(missing_ok=True)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The run's latest checkpoint, by the one rule every reader uses (``--resume``, ``grpokit eval``
    and ``grpokit generate`` given a run directory): the checkpoint ``latest`` names if it is
    complete, else the newest complete ``step-N``, else None.

    ``latest`` wins over a higher step number: it is written only once its checkpoint is
    complete, so a complete ``step-N`` it does not name yet is one a crash interrupted before it
    was published, or one a user stepped back from by writing an earlier name into ``latest``.
    Only complete ``step-N`` directories count, never a symbolic link; a ``latest`` that names
    anything but a plain ``step-N`` inside ``checkpoints_dir`` (an absolute path, ``..``, a link)
    is refused with ``RunDirError``, since it would make a reader load from, and a resume write
    to, somewhere outside the run directory.
    """
    from grpokit.errors import RunDirError

    pointer = checkpoints_dir / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        named = checkpoints_dir / name
        if not _STEP_DIR.fullmatch(name) or named.is_symlink():
            raise RunDirError(f"{pointer} names {name[:100]!r}, which is not a step-N directory inside "
                              f"{checkpoints_dir}{' (it is a symbolic link)' if named.is_symlink() else ''}; "
                              "grpokit reads only a run's own checkpoints. Write the name of one of them "
                              "(e.g. step-20) into checkpoints/latest, or delete the file to use the newest "
                              "complete checkpoint")
        if is_complete(named):
            return named
    complete = step_checkpoints(checkpoints_dir)
    return complete[-1][1] if complete else None


def checkpoint_weights(directory: Path, lora: bool) -> list[Path]:
    """The safetensors weight files of a checkpoint (adapter or full model); a ``ModelError`` saying
    how to convert when there are only pickled ones (``*.bin``), which grpokit never loads."""
    from grpokit.errors import ModelError

    directory = Path(directory)
    stem = "adapter_model" if lora else "model"
    found = [directory / "adapter_model.safetensors"] if lora else sorted(directory.glob("model*.safetensors"))
    found = [path for path in found if path.is_file()]
    if found:
        return found
    pickles = sorted(directory.glob("adapter_model*.bin" if lora else "pytorch_model*.bin"))
    if not pickles:
        raise ModelError(f"{directory}: no {stem}.safetensors; not a complete checkpoint (pass another one, "
                         "or resume from an earlier checkpoint)")
    if lora:
        convert = (f"python -c \"import torch; from safetensors.torch import save_file; save_file(torch.load("
                   f"'{pickles[0]}', weights_only=True), '{directory / 'adapter_model.safetensors'}')\"")
    else:
        convert = (f"python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained("
                   f"'{directory}').save_pretrained('{directory}', safe_serialization=True)\"")
    raise ModelError(f"{pickles[0]} is a pickle file, and grpokit never loads pickles (unpickling can run code); "
                     f"the checkpoint needs {stem}.safetensors. If you trust the file, convert it once: {convert}")


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

    files = checkpoint_weights(directory, policy.is_lora)
    if policy.is_lora:
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(policy.model, load_file(files[0]))
        unexpected = getattr(result, "unexpected_keys", [])
    else:
        weights = {}
        for shard in files:
            weights.update(load_file(shard))
        result = load_model_state(policy.model, weights)  # FSDP: each rank keeps its shard of them
        model = unwrap_model(policy.model)
        tied = set(getattr(model, "all_tied_weights_keys", None) or getattr(model, "_tied_weights_keys", None) or [])
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
    adapter_config = directory / "adapter_config.json"
    checkpoint_weights(directory, adapter_config.is_file())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if adapter_config.is_file():
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise ModelError(f"{adapter_config}: no base_model_name_or_path; cannot find the base model")
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype, attn_implementation=attention)
        model = PeftModel.from_pretrained(base, directory)
    else:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation=attention,
                                                     use_safetensors=True)
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
        checkpoint_weights(directory, lora=False)
        return load_policy(model_cfg.model_copy(update={"path": str(directory), "lora": None}), beta=0.0)
    checkpoint_weights(directory, lora=True)
    adapter = json.loads(adapter_config.read_text())
    base_path = adapter.get("base_model_name_or_path")
    if not base_path:
        raise ModelError(f"{adapter_config}: no base_model_name_or_path; cannot find the base model")
    targets = adapter["target_modules"]
    layers = adapter.get("layers_to_transform")
    shape = {"r": adapter["r"], "alpha": adapter["lora_alpha"], "dropout": adapter.get("lora_dropout", 0.0),
             "modules_to_save": list(adapter.get("modules_to_save") or [])}
    if isinstance(targets, str):
        # a VLM's targets are one regex over the language model's blocks, written from the recipe's
        # target_modules and last_k_layers: rebuilt from the same recipe, then checked to be the same
        recipe_lora = model_cfg.lora or LoraConfig()
        lora = LoraConfig(**shape, target_modules=recipe_lora.target_modules, last_k_layers=recipe_lora.last_k_layers)
    else:
        lora = LoraConfig(**shape, target_modules=sorted(targets),
                          last_k_layers=len(layers) if isinstance(layers, list) else None)
    policy = load_policy(model_cfg.model_copy(update={"path": base_path, "lora": lora}), beta=0.0, merge_lora=merge_lora)
    rebuilt = policy.model.peft_config["default"].target_modules
    if isinstance(targets, str) and rebuilt != targets:
        raise ModelError(f"{adapter_config}: the adapter targets {targets!r}, but the recipe's model.lora gives "
                         f"{rebuilt!r}; evaluate it with the recipe it was trained with (--recipe)")
    load_trained_weights(policy, directory)
    policy.model.eval()
    return policy
