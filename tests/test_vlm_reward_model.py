"""Reward models on a vision-language model: pairs with screenshots, the reward equal to a plain forward,
training, saving and reloading with the processor, and scoring GRPO completions of image prompts."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_cli
from grpokit.config import ModelConfig, RewardModelRecipe, RewardSpec, recipe_from_dict
from grpokit.data.images import open_images
from grpokit.data.pairs import read_preference_rows
from grpokit.errors import DataError, RewardError
from grpokit.models.assemble import FAMILIES, save_model
from grpokit.models.loading import wrap_policy
from grpokit.models.parts import backbone_and_head, unwrap_model
from grpokit.models.reward_head import RewardScorer, build_head, load_reward_model
from grpokit.rewards import RewardSet, as_completions, columns_of
from grpokit.rewards.reward_model import encode_with_images, reward_model
from grpokit.train.reward_model import encode_pairs, held_out_preferences, pair_rewards, train_reward_model
from grpokit.train.supervised import hold_out
from test_vlm_models import tiny_vlm

COLOURS = ["red", "blue", "green"]
QUESTION = "Tap the button of the screen's colour."


def write_pairs(folder, n=8):
    """GUI-action pairs in TRL's VLM preference format, screenshots beside the data (relative paths).

    Even rows leave the image's place to TRL (string content, what ``grpokit data pairs`` writes),
    odd rows give it as a block; every third row has a second image, the last row none (``[]``)."""
    (folder / "shots").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = COLOURS[i % 3]
        Image.new("RGB", (48 + 8 * (i % 2), 48), colour).save(folder / "shots" / f"{i}.png")
        images = [f"shots/{i}.png"]
        if i % 3 == 2:
            Image.new("RGB", (32, 56), "white").save(folder / "shots" / f"{i}b.png")
            images.append(f"shots/{i}b.png")
        if i == n - 1:
            images = []
        content = QUESTION if i % 2 == 0 or not images else [{"type": "image"}] * len(images) + [
            {"type": "text", "text": QUESTION}]
        rows.append({"prompt": [{"role": "user", "content": content}],
                     "chosen": [{"role": "assistant", "content": f"tap({colour})"}],
                     "rejected": [{"role": "assistant", "content": "tap(grey)"}], "images": images})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def expected_messages(n_images: int, reply: str) -> list[dict]:
    """The conversation a pair (or a GRPO completion) of ``write_pairs`` is scored as: its images before the
    question, where TRL puts them and where the odd rows put them themselves."""
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": reply}]


def plain_rewards(scorer, family, conversations, images):
    """The reference: the processor's own right-padded batch through the model body, the head on the
    hidden state of each row's last real token."""
    processor = scorer.processor
    texts = [processor.tokenizer.apply_chat_template(m, chat_template=processor.chat_template, tokenize=False)
             for m in conversations]
    options = {"return_mm_token_type_ids": True} if family.startswith("qwen") else {}
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="right",
                      add_special_tokens=False, **options)
    with torch.no_grad():
        hidden_NLH = backbone_and_head(scorer.model)[0](**batch, use_cache=False).last_hidden_state
        last_N = batch["attention_mask"].sum(dim=1) - 1
        return scorer.head(hidden_NLH[torch.arange(len(texts)), last_N]).squeeze(-1), batch["input_ids"]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm_scorer(request):
    model, processor = tiny_vlm(request.param)
    cfg = ModelConfig(path="unused", dtype="float32", lora=None, device="cpu")
    policy = wrap_policy(model, processor, cfg, beta=0.0, device=torch.device("cpu"))
    torch.manual_seed(1)
    head = build_head("mlp", model.config.get_text_config().hidden_size, 16)
    return request.param, RewardScorer(policy.model.eval(), head, processor, torch.device("cpu"), torch.float32, 1024)


def test_pair_rewards_equal_a_plain_forward_of_the_processors_batch(vlm_scorer, tmp_path):
    family, scorer = vlm_scorer
    rows = read_preference_rows(str(write_pairs(tmp_path)))
    pairs, cut = encode_pairs(rows[:4], scorer.processor, 1024, None)
    assert cut == 0 and [len(p.images) for p in pairs] == [1, 1, 2, 1]
    with torch.no_grad():
        fast_2n = pair_rewards(scorer, pairs)
    conversations = ([expected_messages(len(p.images), f"tap({COLOURS[i % 3]})") for i, p in enumerate(pairs)]
                     + [expected_messages(len(p.images), "tap(grey)") for p in pairs])
    images = [open_images(p.images) for p in pairs] * 2
    reference_2n, ids = plain_rewards(scorer, family, conversations, images)
    image_token = unwrap_model(scorer.model).config.image_token_id
    for row, sequence in enumerate([p.chosen for p in pairs] + [p.rejected for p in pairs]):
        assert ids[row, :len(sequence)].tolist() == sequence and image_token in sequence
    torch.testing.assert_close(fast_2n, reference_2n, atol=1e-5, rtol=1e-5)

    # a batch mixing a text-only pair with pairs with images scores each as it scores alone
    mixed, _ = encode_pairs([rows[-1]] + rows[:2], scorer.processor, 1024, None)
    assert not mixed[0].images
    with torch.no_grad():
        together = pair_rewards(scorer, mixed)
        alone = [pair_rewards(scorer, [pair]) for pair in mixed]
    torch.testing.assert_close(together, torch.cat([a[:1] for a in alone] + [a[1:] for a in alone]),
                               atol=1e-5, rtol=1e-5)


def test_grpo_completions_of_image_prompts_equal_a_plain_forward(vlm_scorer, tmp_path):
    family, scorer = vlm_scorer
    write_pairs(tmp_path)
    shots = [[str(tmp_path / "shots" / "0.png")], [str(tmp_path / "shots" / "1.png")],
             [str(tmp_path / "shots" / "2.png"), str(tmp_path / "shots" / "2b.png")]]
    replies = ["tap(red)", "tap(blue)", "tap(green)"]
    values = scorer.score_sequences(lambda i: encode_with_images(scorer, QUESTION, replies[i], shots[i], f"c{i}"),
                                    3, batch_size=2)
    reference, _ = plain_rewards(scorer, family, [expected_messages(len(s), r) for s, r in zip(shots, replies)],
                                 [open_images(s) for s in shots])
    assert values == pytest.approx(reference.tolist(), abs=1e-5)


# ---------------------------------------------------------------------------- training, saving, reloading


def rm_recipe(model_dir, data, out, **training):
    return recipe_from_dict({
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu", "lora": {"r": 4, "alpha": 8}},
        "data": {"source": str(data), "eval_size": 3},
        "training": {"learning_rate": 1e-3, "epochs": 1, "batch_size": 2, "eval_every": 0, "lr_schedule": "constant",
                     "num_threads": 1, "output_dir": str(out), **training},
    }, schema=RewardModelRecipe)


@pytest.fixture(scope="module", params=["idefics3", "qwen2_vl"])
def trained_vlm(request, tmp_path_factory):
    """A 2-step ``grpokit reward-model`` run on a tiny VLM with image pairs."""
    tmp = tmp_path_factory.mktemp(f"rm-{request.param}")
    model_dir = save_model(*tiny_vlm(request.param), tmp / "model")
    recipe = rm_recipe(model_dir, write_pairs(tmp / "data"), tmp / "run").model_dump(mode="json")
    path = tmp / "rm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run_cli(["reward-model", path, "--set", "training.max_steps=2"]) == 0
    return request.param, tmp


def test_a_trained_vlm_reward_model_saves_its_processor_and_reloads_with_the_same_scores(trained_vlm):
    family, tmp = trained_vlm
    run_dir, saved = tmp / "run", tmp / "run" / "reward_model"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == 2 and info["eval_rows"] == 3
    for name in ("adapter_model.safetensors", "head.safetensors", "processor_config.json", "tokenizer_config.json"):
        assert (saved / name).is_file(), name
    assert json.loads((saved / "reward_model.json").read_text())["multimodal"] is True

    reloaded = load_reward_model(saved, device="cpu")
    assert reloaded.multimodal and type(unwrap_model(reloaded.model)).__name__ == FAMILIES[family][1]
    recipe = rm_recipe(tmp / "model", tmp / "data" / "pairs.jsonl", run_dir)
    _, rows = hold_out(read_preference_rows(recipe.data.source), 3, recipe.data.seed, recipe.data.source)
    held_out, _ = encode_pairs(rows, reloaded.processor, recipe.training.max_length, None)
    assert any(p.images for p in held_out)
    with torch.no_grad():
        again = held_out_preferences(reloaded, held_out, recipe.head.margin, recipe.training.batch_size)
    assert again == pytest.approx(info["eval_after"], abs=1e-6)


def test_the_reward_scores_image_prompts_with_the_rows_images(trained_vlm):
    family, tmp = trained_vlm
    saved = tmp / "run" / "reward_model"
    shots = tmp / "data" / "shots"
    # GRPO rows as the data loader leaves them: a string prompt, `images` as absolute paths (one row without)
    rows = [{"prompt": QUESTION, "images": [str(shots / "0.png")]},
            {"prompt": QUESTION, "images": [str(shots / "1.png")]},
            {"prompt": QUESTION, "images": [str(shots / "2.png"), str(shots / "2b.png")]},
            {"prompt": [{"role": "user", "content": QUESTION}]}]
    texts = ["tap(red)", "tap(red)", "tap(green)", "tap(red)"]
    prompts = [row["prompt"] for row in rows]
    spec = RewardSpec(name="reward_model", args={"path": str(saved), "device": "cpu", "batch_size": 3})
    with RewardSet([spec]) as rewards:
        scores = rewards.score(prompts, as_completions(prompts, texts), columns_of(rows))
    assert not scores.errors, scores.errors
    values = scores.parts["reward_model"]

    # the same conversations scored as training scores a pair's chosen side
    reloaded = load_reward_model(saved, device="cpu")
    def as_pair(row, text):
        prompt = [{"role": "user", "content": QUESTION}]
        if row.get("images"):
            prompt = expected_messages(len(row["images"]), text)[:1]  # as read_preference_rows places them
        reply = [{"role": "assistant", "content": text}]
        return "<test>", (prompt, reply, reply), row.get("images", [])

    pairs, _ = encode_pairs([as_pair(r, t) for r, t in zip(rows, texts)], reloaded.processor, reloaded.max_length,
                            None)
    with torch.no_grad():
        expected = pair_rewards(reloaded, pairs)[:4].tolist()  # the chosen sides
    assert values == pytest.approx(expected, abs=1e-5)
    assert values[0] != pytest.approx(values[1], abs=1e-6)  # same reply, another screenshot: another score
    direct = reward_model(prompts[:2], texts[:2], path=str(saved), device="cpu", images=[r["images"] for r in rows[:2]])
    assert direct == pytest.approx(values[:2], abs=1e-5)


def test_a_text_reward_model_refuses_image_rows(tiny_model_dir, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"prompt": "q", "chosen": f"a {i}", "rejected": "b"}) + "\n" for i in range(6)))
    saved = train_reward_model(rm_recipe(tiny_model_dir, data, tmp_path / "run", max_steps=1)) / "reward_model"
    assert json.loads((saved / "reward_model.json").read_text())["multimodal"] is False
    assert len(reward_model(["q"], ["a 1"], path=str(saved), device="cpu", images=[None])) == 1
    Image.new("RGB", (8, 8), "red").save(tmp_path / "x.png")
    with pytest.raises(RewardError, match="reads text only"):
        reward_model(["q"], ["a 1"], path=str(saved), device="cpu", images=[[str(tmp_path / "x.png")]])


# ---------------------------------------------------------------------------- refusals


def test_a_pair_with_a_missing_image_is_refused_with_file_and_line(tmp_path):
    data = write_pairs(tmp_path)
    (tmp_path / "shots" / "1.png").unlink()
    missing = tmp_path / "shots" / "1.png"
    with pytest.raises(DataError, match=rf"pairs\.jsonl:2: image 0 \({missing}\) does not exist") as err:
        train_reward_model(rm_recipe("unused-model-never-loaded", data, tmp_path / "run"))
    assert str(err.value).startswith(f"{data}:2:") and not (tmp_path / "run").exists()


def test_image_pairs_on_a_text_model_and_images_in_a_reply_are_refused(tiny_model_dir, tmp_path):
    data = write_pairs(tmp_path)
    with pytest.raises(DataError, match=r"pairs\.jsonl:1: the pair has images, but model.path .* is a text model"):
        train_reward_model(rm_recipe(tiny_model_dir, data, tmp_path / "run"))
    lines = data.read_text().splitlines()
    row = json.loads(lines[2])
    row["chosen"][0]["content"] = [{"type": "image"}, {"type": "text", "text": "tap"}]
    lines[2] = json.dumps(row)
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:3: 'chosen' has an image block"):
        read_preference_rows(str(data))
