"""Model loading and the checkpoint round trip."""

import json

import pytest
import torch

from grpokit.config import LoraConfig, ModelConfig
from grpokit.errors import ModelError
from grpokit.models import load_checkpoint, load_policy, resolve_model_dir, save_checkpoint


def logits_of(model, tokenizer):
    ids = torch.tensor([tokenizer("hello world")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("lora", [LoraConfig(r=4, alpha=8), None], ids=["lora", "full"])
def test_checkpoint_round_trip_gives_identical_logits(tiny_model_dir, tmp_path, lora):
    policy = load_policy(ModelConfig(path=str(tiny_model_dir), dtype="float32", lora=lora, device="cpu"), beta=0.1)
    # move away from the initialisation so the round trip is not trivially the base model
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    policy.model.eval()
    before = logits_of(policy.model, policy.tokenizer)
    out = save_checkpoint(policy, tmp_path / "checkpoints" / "step-3", {"step": 3})
    assert json.loads((out / "trainer_state.json").read_text()) == {"step": 3}
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert (out / weights).is_file()
    model, tokenizer = load_checkpoint(out)
    assert torch.equal(logits_of(model, tokenizer), before)
    assert not list(out.parent.glob(".step-3.*")), "no staging directory may be left behind"


def test_lora_reference_is_the_base_and_full_keeps_a_frozen_copy(tiny_model_dir):
    lora = load_policy(ModelConfig(path=str(tiny_model_dir), dtype="float32", device="cpu"), beta=0.1)
    assert lora.is_lora and lora.reference is None
    full = load_policy(ModelConfig(path=str(tiny_model_dir), dtype="float32", lora=None, device="cpu"), beta=0.1)
    assert full.reference is not None and not any(p.requires_grad for p in full.reference.parameters())
    no_ref = load_policy(ModelConfig(path=str(tiny_model_dir), dtype="float32", lora=None, device="cpu"), beta=0.0)
    assert no_ref.reference is None


def test_model_path_errors(tmp_path):
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model_dir(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(ModelError, match="no such model directory"):
        resolve_model_dir("./nowhere/model")
    assert resolve_model_dir("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
