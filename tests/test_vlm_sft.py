"""SFT with images: assistant-only loss on a VLM, image tokens never labelled, equal to a plain forward."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from grpokit.config import ModelConfig, SftRecipe, recipe_from_dict
from grpokit.errors import DataError
from grpokit.models.assemble import FAMILIES, save_model
from grpokit.models.loading import wrap_policy
from grpokit.train.sft import encode_examples, load_conversations, run_sft, sft_loss
from test_vlm_models import tiny_vlm


def write_samples(folder, n=6):
    """Conversations in TRL's VLM SFT format: image blocks in the user turn, files beside the data."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = ["red", "blue", "green"][i % 3]
        Image.new("RGB", (48 + 8 * (i % 2), 48), colour).save(folder / "images" / f"{i}.png")
        user = [{"type": "image"}, {"type": "text", "text": "Colour?"}]
        if i % 2:  # a second image, and a string-content reply
            Image.new("RGB", (32, 64), "white").save(folder / "images" / f"{i}b.png")
            user = [{"type": "image"}, *user]
        rows.append({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": f"It is {colour}."}],
                     "images": [f"images/{i}.png"] + ([f"images/{i}b.png"] if i % 2 else [])})
    path = folder / "sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recipe(model_dir, data, out, **training):
    return recipe_from_dict({
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu", "lora": {"r": 4, "alpha": 8}},
        "data": {"source": str(data), "eval_size": 2},
        "training": {"learning_rate": 1e-3, "epochs": 1, "batch_size": 2, "max_steps": 2, "lr_schedule": "constant",
                     "output_dir": str(out), "max_length": 1024, **training},
    }, schema=SftRecipe)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm_policy(request):
    torch.manual_seed(0)
    model, processor = tiny_vlm(request.param)
    cfg = ModelConfig(path="unused", dtype="float32", lora=None, device="cpu")
    return request.param, wrap_policy(model, processor, cfg, beta=0.0, device=torch.device("cpu"))


def test_loss_equals_a_plain_forward_and_no_image_token_is_learned(vlm_policy, tmp_path):
    family, policy = vlm_policy
    data = write_samples(tmp_path)
    conversations = load_conversations(recipe("unused", data, tmp_path / "o").data)
    examples, cut = encode_examples(policy.processor, conversations[:3], 1024, policy.eos_ids)
    assert cut == 0
    image_token = policy.model.config.image_token_id
    for example in examples:
        learned = [t for t, label in zip(example.ids, example.labels) if label]
        assert image_token in example.ids and image_token not in learned
        assert policy.tokenizer.decode(learned[:-1]).startswith("It is")  # the reply, then its end-of-turn
    fast, _ = sft_loss(policy, examples)

    # the reference: the processor's own right-padded batch of the whole conversations, HF's -100 loss
    from grpokit.data.images import open_images

    processor = policy.processor
    texts = [processor.tokenizer.apply_chat_template(c.messages, chat_template=processor.chat_template, tokenize=False)
             for c in conversations[:3]]
    options = {"return_mm_token_type_ids": True} if family.startswith("qwen") else {}
    batch = processor(text=texts, images=[open_images(c.images) for c in conversations[:3]], return_tensors="pt",
                      padding=True, padding_side="right", add_special_tokens=False, **options)
    labels = torch.full_like(batch["input_ids"], -100)
    for row, example in enumerate(examples):
        assert batch["input_ids"][row, :len(example.ids)].tolist() == example.ids
        labels[row, :len(example.ids)] = torch.tensor([t if lab else -100 for t, lab in zip(example.ids, example.labels)])
    with torch.no_grad():
        reference = policy.model(**batch, labels=labels).loss
    torch.testing.assert_close(fast.detach(), reference, atol=1e-5, rtol=1e-5)


def test_sft_trains_a_vlm_and_saves_its_adapter(tmp_path):
    model_dir = save_model(*tiny_vlm("idefics3"), tmp_path / "model")
    run_dir = run_sft(recipe(model_dir, write_samples(tmp_path / "data"), tmp_path / "run"))
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "finished" and math.isfinite(run["eval_after"]["loss"])
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_an_image_count_that_does_not_match_is_refused_with_file_and_line(tmp_path):
    data = write_samples(tmp_path)
    lines = data.read_text().splitlines()
    row = json.loads(lines[1])
    row["images"] = row["images"][:1]  # two placeholders, one image
    lines[1] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl:2: .*2 image placeholders but the row has 1 image"):
        load_conversations(recipe("unused", data, tmp_path / "o").data)
