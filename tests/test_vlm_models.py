"""Vision-language models built from configs alone: every supported family, its processor, reloading.

The later stages (rollout, log-probs, SFT, reward models) are tested on these same tiny
models; here: that each family builds, survives save + reload (processor included, composed
without torchvision where it is absent), puts as many image tokens in the prompt as the
vision encoder gives features, and decodes with ``model.generate``.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import make_char_tokenizer, make_tiny_model
from grpokit.models.assemble import FAMILIES, assemble, idefics_image_tokens, save_model
from grpokit.models.processors import load_processor
from grpokit.models.vision import is_multimodal

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096, "tie_word_embeddings": False}
TEXT_TYPE = {"qwen2_vl": "qwen2", "qwen2_5_vl": "qwen2", "qwen3_vl": "qwen3", "idefics3": "llama", "smolvlm": "llama"}
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]


def tiny_vlm(family: str, seed: int = 0):
    return assemble(family, make_char_tokenizer(), {**TEXT, "model_type": TEXT_TYPE[family]}, seed=seed)


def encode(processor, images, family):
    text = processor.tokenizer.apply_chat_template(MESSAGES, chat_template=processor.chat_template,
                                                   add_generation_prompt=True, tokenize=False)
    return processor(text=[text] * len(images), images=[[image] for image in images], return_tensors="pt",
                     padding=True, padding_side="left", return_mm_token_type_ids=family.startswith("qwen"))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def saved_vlm(request, tmp_path_factory):
    model, processor = tiny_vlm(request.param)
    return request.param, model, save_model(model, processor, tmp_path_factory.mktemp(request.param))


def test_each_family_reloads_and_decodes_with_image_tokens_matching_features(saved_vlm):
    family, model, directory = saved_vlm
    assert is_multimodal(model)
    processor = load_processor(str(directory), multimodal=True)
    images = [Image.new("RGB", (64, 48), (200, 20, 20)), Image.new("RGB", (40, 64), (20, 20, 200))]
    inputs = encode(processor, images, family)
    image_token = model.config.image_token_id
    per_prompt = (inputs["input_ids"] == image_token).sum(dim=1).tolist()
    if family.startswith("qwen"):
        expected = (inputs["image_grid_thw"].prod(dim=1) // 4).tolist()  # 2x2 patches merged into one token
    else:
        expected = [idefics_image_tokens(64)] * 2
    assert per_prompt == expected and min(expected) > 0
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].size(1) + 3)


def test_the_processor_reloaded_encodes_as_the_one_saved(saved_vlm, tmp_path):
    family, model, directory = saved_vlm
    _, original = tiny_vlm(family)
    image = [Image.new("RGB", (64, 64), (0, 128, 0))]
    before, after = encode(original, image, family), encode(load_processor(str(directory), True), image, family)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key


def test_max_pixels_reaches_qwen_image_processor(tmp_path):
    model, processor = tiny_vlm("qwen2_vl")
    directory = save_model(model, processor, tmp_path / "qwen")
    image = [Image.new("RGB", (112, 112), (0, 0, 0))]
    full = encode(load_processor(str(directory), True, max_pixels=112 * 112), image, "qwen2_vl")["image_grid_thw"]
    capped = encode(load_processor(str(directory), True, max_pixels=56 * 56), image, "qwen2_vl")["image_grid_thw"]
    assert full.tolist() == [[1, 8, 8]] and capped.tolist() == [[1, 4, 4]]


def test_a_language_model_is_copied_into_the_vlm():
    tokenizer = make_char_tokenizer()
    language_model = make_tiny_model(len(tokenizer), seed=3)
    text = {**language_model.config.to_dict(), "tie_word_embeddings": False}
    model, _ = assemble("idefics3", tokenizer, text, language_model_state=language_model.state_dict())
    own = model.get_decoder().state_dict()
    for name, value in language_model.model.state_dict().items():
        assert torch.equal(own[name][: value.size(0)], value), name
    head = language_model.get_output_embeddings().weight
    assert torch.equal(model.get_output_embeddings().weight[: head.size(0)], head)
    assert model.get_decoder().embed_tokens.weight.size(0) == len(tokenizer) > head.size(0)  # the image tokens


def test_a_text_model_loads_as_a_causal_lm_with_its_tokenizer(tiny_model_dir):
    from grpokit.config import ModelConfig
    from grpokit.models import load_policy

    policy = load_policy(ModelConfig(path=str(tiny_model_dir), dtype="float32", device="cpu"), beta=0.0)
    assert not is_multimodal(policy.model) and policy.processor is policy.tokenizer
    assert policy.tokenizer.eos_token == "<|im_end|>"


def lora_module_names(policy) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name.removeprefix("base_model.model.") for name, module in policy.model.named_modules()
            if isinstance(module, LoraLayer)]


def test_lora_lands_on_the_language_models_last_blocks_only(saved_vlm):
    from grpokit.config import LoraConfig, ModelConfig
    from grpokit.models import load_policy
    from grpokit.models.vision import ROLES

    family, _, directory = saved_vlm
    roles = ROLES[family]
    policy = load_policy(ModelConfig(path=str(directory), dtype="float32", device="cpu",
                                     lora=LoraConfig(r=4, last_k_layers=1)), beta=0.1)
    names = lora_module_names(policy)
    last_block = f"{roles['language_model']}.layers.{TEXT['num_hidden_layers'] - 1}."
    assert names and all(name.startswith(last_block) for name in names), names
    kinds = {name.rsplit(".", 1)[-1] for name in names}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= kinds
    assert all("lora_" in name for name, p in policy.model.named_parameters() if p.requires_grad)
    assert policy.processor is not policy.tokenizer and policy.tokenizer.padding_side == "left"


def test_full_fine_tuning_freezes_vision_and_projector_by_default(saved_vlm):
    from grpokit.config import ModelConfig
    from grpokit.models import load_policy
    from grpokit.models.vision import ROLES

    family, _, directory = saved_vlm
    roles = ROLES[family]
    trainable = {name: p.requires_grad for name, p in load_policy(
        ModelConfig(path=str(directory), dtype="float32", device="cpu", lora=None), beta=0.0).model.named_parameters()}
    vision = [n for n in trainable if n.startswith(roles["vision"] + ".") or n.startswith(roles["projector"] + ".")]
    language = [n for n in trainable if n.startswith(roles["language_model"] + ".")]
    assert vision and language
    assert not any(trainable[n] for n in vision) and all(trainable[n] for n in language)
    everything = load_policy(ModelConfig(path=str(directory), dtype="float32", device="cpu", lora=None, freeze=[]),
                             beta=0.0).model.named_parameters()
    assert all(p.requires_grad for _, p in everything)


def test_a_role_name_on_a_text_model_is_a_clear_error(tiny_model_dir):
    from grpokit.config import ModelConfig
    from grpokit.errors import ModelError
    from grpokit.models import load_policy

    with pytest.raises(ModelError, match="names a part of a vision-language model"):
        load_policy(ModelConfig(path=str(tiny_model_dir), dtype="float32", device="cpu", freeze=["vision"]), beta=0.0)
