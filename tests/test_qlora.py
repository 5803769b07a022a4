"""A quantized base for LoRA (model.load_in_4bit / load_in_8bit): the recipe keys, their errors, and
GRPO steps on a tiny 4-bit model when bitsandbytes is installed (pip install grpokit[qlora])."""

import json
import logging

import pytest
import torch

from grpokit.config import LoraConfig, ModelConfig, recipe_from_dict
from grpokit.errors import ModelError, RecipeError
from grpokit.models import load_policy

from conftest import tiny_recipe


def quantized_recipe(model_dir, out_dir, **model):
    return tiny_recipe(model_dir, out_dir, model={"lora": {"r": 4, "alpha": 8}, "load_in_4bit": True, **model})


def test_the_keys_users_configs_write_validate_with_their_defaults(tiny_model_dir, tmp_path):
    model = recipe_from_dict(quantized_recipe(tiny_model_dir, tmp_path)).model
    assert model.quantized == "load_in_4bit"
    assert (model.bnb_4bit_quant_type, model.bnb_4bit_use_double_quant, model.bnb_4bit_compute_dtype) == ("nf4", True, None)
    written = recipe_from_dict(quantized_recipe(tiny_model_dir, tmp_path, bnb_4bit_quant_type="fp4",
                                                bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype="float32")).model
    assert (written.bnb_4bit_quant_type, written.bnb_4bit_use_double_quant) == ("fp4", False)
    eight = recipe_from_dict(quantized_recipe(tiny_model_dir, tmp_path, load_in_4bit=False, load_in_8bit=True)).model
    assert eight.quantized == "load_in_8bit"
    assert ModelConfig().quantized is None


def test_quantizing_without_lora_is_refused_naming_the_keys(tiny_model_dir, tmp_path):
    for key in ("load_in_4bit", "load_in_8bit"):
        recipe = tiny_recipe(tiny_model_dir, tmp_path, model={"lora": None, key: True})
        with pytest.raises(RecipeError, match=rf"model\.{key}: a quantized base cannot be fine-tuned in full.*"
                                              r"give model\.lora"):
            recipe_from_dict(recipe)


def test_4bit_and_8bit_together_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(RecipeError, match="model.load_in_4bit and model.load_in_8bit are both true; keep one"):
        recipe_from_dict(quantized_recipe(tiny_model_dir, tmp_path, load_in_8bit=True))


def test_an_unknown_4bit_type_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(RecipeError, match="model.bnb_4bit_quant_type"):
        recipe_from_dict(quantized_recipe(tiny_model_dir, tmp_path, bnb_4bit_quant_type="int4"))


def test_without_bitsandbytes_loading_says_what_to_install(tiny_model_dir, monkeypatch):
    from grpokit.models import quantization

    real = quantization.importlib.util.find_spec
    monkeypatch.setattr(quantization.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cfg = ModelConfig(path=str(tiny_model_dir), device="cpu", load_in_8bit=True, lora=LoraConfig(r=4))
    with pytest.raises(ModelError, match=r"model.load_in_8bit needs bitsandbytes.*pip install grpokit\[qlora\]"):
        load_policy(cfg, beta=0.1)


# ------------------------------------------------------------------ with bitsandbytes (CPU)


def quantized_policy(model_dir, merge_lora=False, **model):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install grpokit[qlora])")
    cfg = ModelConfig(path=str(model_dir), dtype="float32", device="cpu", lora=LoraConfig(r=4, alpha=8),
                      **({"load_in_4bit": True} | model))
    return load_policy(cfg, beta=0.1, merge_lora=merge_lora)


def logprobs_of(model, prompt_NP, completion_NC):
    from grpokit.rollout import completion_logprobs

    with torch.no_grad():
        return completion_logprobs(model, prompt_NP, torch.ones_like(prompt_NP), completion_NC,
                                   torch.ones_like(completion_NC))[0]


@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_the_linear_layers_are_quantized_and_only_adapters_train(tiny_model_dir, bits):
    import bitsandbytes as bnb

    policy = quantized_policy(tiny_model_dir, **{"load_in_4bit": False, bits: True})
    layer = bnb.nn.Linear4bit if bits == "load_in_4bit" else bnb.nn.Linear8bitLt
    quantized = [name for name, m in policy.model.named_modules() if isinstance(m, layer)]
    assert len(quantized) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks
    assert policy.is_lora and policy.reference is None and policy.merged is None  # no copy of any kind
    trainable = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)


def test_merge_lora_falls_back_to_sampling_with_the_adapters_on(tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="grpokit.models.loading"):
        policy = quantized_policy(tiny_model_dir, merge_lora=True)
    assert policy.merged is None and policy.sampling_model is policy.model
    assert "rollout.merge_lora is ignored with a quantized base" in caplog.text


def test_the_reference_is_the_quantized_base_with_adapters_off(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from grpokit.models.quantization import quantization_config

    policy = quantized_policy(tiny_model_dir)
    with torch.no_grad():
        for p in policy.trainable_parameters():  # adapters away from their zero start
            p.add_(0.05 * torch.randn_like(p))
    policy.model.eval()
    prompt_NP, completion_NC = torch.randint(3, 90, (2, 5)), torch.randint(3, 90, (2, 4))
    with policy.reference_model() as reference:
        ref_NC = logprobs_of(reference, prompt_NP, completion_NC)
    cfg = ModelConfig(path=str(tiny_model_dir), dtype="float32", device="cpu", load_in_4bit=True)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, device_map={"": "cpu"},
                                                quantization_config=quantization_config(cfg, torch.float32))
    assert torch.equal(ref_NC, logprobs_of(base.eval(), prompt_NP, completion_NC))
    assert not torch.allclose(ref_NC, logprobs_of(policy.model, prompt_NP, completion_NC))


@pytest.mark.slow
def test_grpo_steps_on_a_4bit_model_train_the_adapters(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install grpokit[qlora])")
    from safetensors.torch import load_file

    from grpokit.train import train

    recipe = quantized_recipe(tiny_model_dir, tmp_path / "run", dtype="float32")
    recipe["algorithm"] = {"beta": 0.05}
    recipe["training"].update(max_steps=2, learning_rate=1e-2, save_every=1, keep_checkpoints=2)
    run_dir = train(recipe_from_dict(recipe))
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert [r["step"] for r in steps] == [1, 2] and all(r["grad_norm"] > 0 for r in steps)
    assert steps[-1]["kl"] > 0  # the policy left the adapters-off reference
    first, last = (load_file(run_dir / "checkpoints" / f"step-{n}" / "adapter_model.safetensors") for n in (1, 2))
    assert first.keys() == last.keys() and any("lora_B" in key for key in first)
    assert any(not torch.equal(first[key], last[key]) for key in first)  # the adapters trained
