"""Rollouts and log-probs of vision-language models, against the model's own ``generate`` and forward.

For every family, on tiny random models built from configs: grpokit's sampler (prefill once
per prompt, cache shared by the group, positions computed by grpokit) decodes greedily
exactly what ``model.generate`` decodes from the processor's own batch; completion
log-probs (shared prefix, and one prompt per row) equal a plain forward over prompt and
completion with the images; and the vision tower sees each prompt's images once, not G times.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from grpokit.config import ModelConfig
from grpokit.models.assemble import FAMILIES
from grpokit.models.loading import wrap_policy
from grpokit.models.vision import role_prefix
from grpokit.rollout import PromptEncoder, build_sampler, completion_logprobs
from test_vlm_models import tiny_vlm

G = 3
COLOURS = [(200, 30, 30), (30, 30, 200), (30, 160, 40)]


def png(size, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


# two prompts of different lengths: one image, and two images of other sizes (left padding, image stacking)
ROWS = [
    {"prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
     "images": [png((64, 48), COLOURS[0])]},
    {"prompt": "Compare <image> with <image>, which is bluer?",
     "images": [png((40, 64), COLOURS[1]), png((64, 64), COLOURS[2])]},
]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm(request):
    torch.manual_seed(0)
    model, processor = tiny_vlm(request.param)
    cfg = ModelConfig(path="unused", dtype="float32", lora=None, device="cpu")
    policy = wrap_policy(model, processor, cfg, beta=0.0, device=torch.device("cpu"))
    policy.model.eval()
    return request.param, policy


def encoder_of(policy):
    return PromptEncoder(policy.processor, chat_template=True, system_prompt=None, max_length=4096)


def reference_batch(policy, rows):
    """The processor's own left-padded batch of the same prompts (what ``generate`` users pass)."""
    from grpokit.data.images import open_images, with_image_blocks

    processor = policy.processor
    texts = [processor.tokenizer.apply_chat_template(with_image_blocks(row["prompt"], len(row["images"]), "t"),
                                                      chat_template=processor.chat_template,
                                                      add_generation_prompt=True, tokenize=False) for row in rows]
    options = {"return_mm_token_type_ids": True} if "mm_token_type_ids" in processor.model_input_names else {}
    return processor(text=texts, images=[open_images(row["images"]) for row in rows], return_tensors="pt",
                     padding=True, padding_side="left", add_special_tokens=False, **options)


def test_prompt_encoder_matches_the_processors_own_batch(vlm):
    _, policy = vlm
    batch = encoder_of(policy)(ROWS)
    expected = reference_batch(policy, ROWS)
    assert torch.equal(batch.input_ids_BP, expected["input_ids"])
    assert torch.equal(batch.attention_mask_BP, expected["attention_mask"])
    assert len(batch.multimodal) == len(ROWS) and all("pixel_values" in inputs for inputs in batch.multimodal)


def test_greedy_decoding_equals_model_generate(vlm):
    family, policy = vlm
    new_tokens = 8
    sampler = build_sampler(policy, max_new_tokens=new_tokens)
    out = sampler.generate(encoder_of(policy)(ROWS), num_generations=G, greedy=True)
    with torch.no_grad():
        expected = policy.model.generate(**reference_batch(policy, ROWS), do_sample=False, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, pad_token_id=policy.tokenizer.pad_token_id)
    expected_BC = expected[:, -new_tokens:]
    got_NC = out.completion_ids_NC
    assert got_NC.shape == (len(ROWS) * G, new_tokens)
    for i in range(len(ROWS)):
        for j in range(G):
            # greedy: every sample of a group is the same, and equals HF's
            assert got_NC[i * G + j].tolist() == expected_BC[i].tolist(), (family, i, j)


def test_completion_logprobs_equal_a_plain_forward_with_the_images(vlm):
    family, policy = vlm
    torch.manual_seed(1)
    out = build_sampler(policy, max_new_tokens=6, seed=3).generate(encoder_of(policy)(ROWS), num_generations=G)
    reference = reference_batch(policy, ROWS)
    comp_NC, comp_mask_NC = out.completion_ids_NC, out.completion_mask_NC
    # the plain forward: the processor's batch repeated G times, the completion appended
    ids_NL = torch.cat([reference["input_ids"].repeat_interleave(G, 0), comp_NC], dim=1)
    mask_NL = torch.cat([reference["attention_mask"].repeat_interleave(G, 0), comp_mask_NC], dim=1)
    extra = {}
    for key, value in reference.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if key.endswith("token_type_ids"):
            extra[key] = torch.cat([value.repeat_interleave(G, 0), torch.zeros_like(comp_NC)], dim=1)
        elif value.ndim >= 4:  # Idefics3: [B, images, ...]
            extra[key] = value.repeat_interleave(G, 0)
        else:  # Qwen: patches of every image, in prompt order
            extra[key] = torch.cat([value[_qwen_rows(reference, key, i)] for i in range(len(ROWS)) for _ in range(G)])
    with torch.no_grad():
        logits_NLV = policy.model(input_ids=ids_NL, attention_mask=mask_NL, **extra).logits.float()
    C = comp_NC.size(1)
    expected_NC = logits_NLV[:, -C - 1:-1].log_softmax(-1).gather(-1, comp_NC[..., None]).squeeze(-1)
    real = comp_mask_NC.bool()
    for group_size in (G, 1):
        with torch.no_grad():
            got_NC, _ = completion_logprobs(policy.model, out.prompt_ids_NP, out.prompt_mask_NP, comp_NC, comp_mask_NC,
                                            out.prompt_inputs_N, group_size=group_size)
        torch.testing.assert_close(got_NC[real], expected_NC[real], atol=2e-5, rtol=1e-4, msg=f"{family} G={group_size}")


def _qwen_rows(reference, key: str, prompt: int) -> slice:
    """The rows of a Qwen flattened tensor (patches, or one row per image) that belong to ``prompt``."""
    grid = reference["image_grid_thw"]
    images_per_prompt = [1, 2]
    first = sum(images_per_prompt[:prompt])
    images = range(first, first + images_per_prompt[prompt])
    if key == "image_grid_thw":
        return slice(images.start, images.stop)
    patches = grid.prod(dim=1).tolist()
    return slice(sum(patches[:images.start]), sum(patches[:images.stop]))


def test_the_vision_tower_runs_once_per_prompt_not_per_sample(vlm):
    family, policy = vlm
    vision = policy.model.get_submodule(role_prefix(policy.model, "vision"))
    seen = []

    def record(module, args, kwargs):  # pixels arrive positionally (Qwen) or by keyword (Idefics3)
        pixels = args[0] if args else kwargs.get("pixel_values", kwargs.get("hidden_states"))
        seen.append(pixels.shape[0])

    handle = vision.register_forward_pre_hook(record, with_kwargs=True)
    try:
        batch = encoder_of(policy)(ROWS)
        build_sampler(policy, max_new_tokens=4).generate(batch, num_generations=G)
    finally:
        handle.remove()
    per_prompt = sum(inputs["pixel_values"].shape[0] if inputs["pixel_values"].ndim == 2
                     else inputs["pixel_values"].shape[1] for inputs in batch.multimodal)
    assert len(seen) == 1, family  # one prefill for the whole batch, none while decoding
    if family.startswith("qwen"):
        assert seen[0] == per_prompt  # every prompt's patches once
    else:
        assert seen[0] <= per_prompt  # real images only (padding images are dropped), never G copies


def test_a_text_only_prompt_beside_image_prompts_decodes_as_it_does_alone(vlm):
    """Mixed batches: a row without images gets no image inputs (blank images for Idefics3's stack,
    zero token types for Qwen), and every row decodes as it would in a batch of its own."""
    family, policy = vlm
    text_row = {"prompt": [{"role": "user", "content": "Say a colour."}]}
    rows = [ROWS[1], text_row, ROWS[0]]
    sampler = build_sampler(policy, max_new_tokens=6)
    together = sampler.generate(encoder_of(policy)(rows), num_generations=1, greedy=True).completion_ids_NC
    for i, row in enumerate(rows):
        alone = sampler.generate(encoder_of(policy)([row]), num_generations=1, greedy=True).completion_ids_NC
        assert together[i].tolist() == alone[0].tolist(), (family, i)
