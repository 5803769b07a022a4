"""A quantized base for LoRA: QLoRA's 4-bit NormalFloat (arXiv:2305.14314) or LLM.int8()'s 8 bits.

transformers quantizes the linear layers while loading (``BitsAndBytesConfig``, bitsandbytes'
kernels); PEFT's LoRA layers wrap the quantized layers and keep their adapters in fp32. Only the
linear layers are quantized: embeddings, norms and the output head stay in the compute dtype, as the
frozen base of an unquantized LoRA run does (grpokit/models/loading.py). The reference policy is the
same quantized base with the adapters off, so quantizing shrinks the reference too and no copy exists.

Where this departs from TRL/axolotl's usual recipe: peft's ``prepare_model_for_kbit_training`` is not
called. Its three jobs are freezing the base (``get_peft_model`` does it), casting every unquantized
parameter to fp32 (that would double the embedding's memory against grpokit's rule of a compute-dtype
frozen base under autocast) and turning on reentrant gradient checkpointing by default (grpokit's is
``training.gradient_checkpointing``, non-reentrant, off unless asked).
"""

from __future__ import annotations

import importlib.util

import torch

from grpokit.errors import ModelError

INSTALL_HINT = "pip install grpokit[qlora] (bitsandbytes)"


def quantization_config(model_cfg, compute_dtype: torch.dtype):
    """``BitsAndBytesConfig`` for the recipe's ``model.load_in_4bit`` / ``load_in_8bit``; None for neither.
    ``compute_dtype``: what 4-bit weights are unpacked to for each matmul (bnb_4bit_compute_dtype, else model.dtype)."""
    if not model_cfg.quantized:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.{model_cfg.quantized} needs bitsandbytes, which is not installed: {INSTALL_HINT}")
    from transformers import BitsAndBytesConfig

    if model_cfg.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=model_cfg.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def is_quantized(model) -> bool:
    """Whether transformers loaded ``model`` (or the model a PEFT wrapper holds) with bitsandbytes."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))

