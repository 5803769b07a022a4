"""GRPO with images, end to end, for every vision-language family on a tiny random model.

Two steps from a recipe: the built-in visual task (PNG bytes in rows) and a dataset written as
TRL's docs write one for VLM GRPO (a conversational ``prompt`` and an ``image`` column, image
files beside the data). LoRA sits on the language model only and the vision tower and
projector stay frozen, so the saved adapter names no vision module.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_recipe
from grpokit.config import recipe_from_dict
from grpokit.models.assemble import FAMILIES, save_model
from grpokit.eval.standalone import run_evaluation
from grpokit.report import write_report
from grpokit.report.markdown import _paired_samples
from grpokit.train import train
from test_vlm_models import tiny_vlm


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm_dir(request, tmp_path_factory):
    model, processor = tiny_vlm(request.param)
    return request.param, save_model(model, processor, tmp_path_factory.mktemp(request.param))


def vlm_recipe(model_dir, out_dir, **sections):
    recipe = tiny_recipe(model_dir, out_dir, model={"lora": {"r": 4, "alpha": 8}},
                         data={"source": "builtin:shape_colour", "train_size": 16, "eval_size": 4},
                         rollout={"num_generations": 4, "max_completion_length": 6, "max_prompt_length": 512},
                         algorithm={"beta": 0.05},
                         training={"max_steps": 2, "prompts_per_step": 2, "grad_accum": 2, "eval_every": 2})
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def train_rows(run_dir):
    return [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if row["kind"] == "train"]


def test_two_grpo_steps_with_images_for_each_family(vlm_dir, tmp_path):
    family, model_dir = vlm_dir
    run_dir = train(recipe_from_dict(vlm_recipe(model_dir, tmp_path / "run")))
    rows = train_rows(run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    assert all(torch.isfinite(torch.tensor([row["loss"], row["kl"], row["grad_norm"]])).all() for row in rows)
    assert rows[-1]["grad_norm"] > 0  # the language model's adapters learned from image prompts
    adapter = load_file(run_dir / "checkpoints" / "step-2" / "adapter_model.safetensors")
    assert adapter and all("language_model" in name or "text_model" in name for name in adapter), family
    # the report shows each held-out image beside its before and after replies
    samples = json.loads((run_dir / "eval" / "step-2.json").read_text())["samples"]
    keys = [key for sample in samples for key in sample["images"]]
    assert len(set(keys)) == len(samples) == 4 and all((run_dir / "eval" / "images" / f"{k}.png").is_file() for k in keys)
    # `grpokit eval` of the run rebuilds the VLM's adapter (its language-model-only targets) and reproduces it
    _, again = run_evaluation(str(run_dir), name="again")
    assert [x["completion"] for x in again["samples"]] == [x["completion"] for x in samples]
    report = write_report(run_dir).read_text()
    evals = [json.loads((run_dir / "eval" / f"step-{step}.json").read_text()) for step in (0, 2)]
    pairs = _paired_samples(evals)  # the same question about four images: paired by image, not by text
    assert len(pairs) == 4 and all(before["images"] == after["images"] for before, after in pairs)
    assert all(f"![image](eval/images/{k}.png)" in report for k in keys)


def test_a_dataset_in_trls_vlm_format_trains_unchanged(tmp_path):
    """TRL's VLM GRPO docs: conversational prompts without placeholders, one image per row in ``image``.
    The data path is the same for every family; one is enough."""
    model_dir = save_model(*tiny_vlm("qwen2_vl"), tmp_path / "model")
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    lines = []
    for i, colour in enumerate(["red", "blue", "green", "yellow"] * 3):
        Image.new("RGB", (48 + 8 * (i % 3), 48), colour).save(folder / "images" / f"{i}.png")
        lines.append({"prompt": [{"role": "user", "content": "What colour is this image? Answer in one word."}],
                      "image": f"images/{i}.png", "solution": colour})
    (folder / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    recipe = vlm_recipe(model_dir, tmp_path / "run", data={"source": str(folder / "train.jsonl"), "eval_size": 2,
                                                           "train_size": None, "answer_field": "solution"},
                        # replayed groups carry their images too; a checkpoint resumes with the processor
                        algorithm={"beta": 0.05, "replay": {"capacity": 4, "ratio": 0.5}},
                        training={"save_every": 1})
    run_dir = train(recipe_from_dict(recipe))
    assert [row["step"] for row in train_rows(run_dir)] == [1, 2]
    assert (run_dir / "checkpoints" / "step-2" / "processor_config.json").is_file()
    recipe["training"]["max_steps"] = 3
    train(recipe_from_dict(recipe), resume=True)
    rows = train_rows(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3] and rows[-1]["replay/reuse_rate"] == 0.5


def test_modules_to_save_trains_the_projector_in_full_and_the_sampling_copy_follows(tmp_path):
    """A new connector (the worked example's) is trained in full beside the language model's adapters."""
    from grpokit.config import ModelConfig
    from grpokit.errors import ModelError
    from grpokit.models.loading import wrap_policy

    def policy_with(**lora):
        model, processor = tiny_vlm("idefics3")
        cfg = ModelConfig(path="unused", dtype="float32", device="cpu", lora={"r": 4, "alpha": 8, **lora})
        return wrap_policy(model, processor, cfg, beta=0.0, device=torch.device("cpu"), merge_lora=True)

    policy = policy_with(modules_to_save=["projector"])
    trainable = [name for name, p in policy.model.named_parameters() if p.requires_grad]
    assert any("connector" in name for name in trainable)
    assert not any("vision_model" in name for name in trainable)  # the default freeze keeps the tower
    copy = next(m for name, m in policy.model.named_modules() if name.endswith("connector.modules_to_save.default"))
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(1.0)
    policy.sync_merged()
    merged = policy.merged.get_submodule("model.connector")
    assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), merged.state_dict().values()))
    with pytest.raises(ModelError, match="both name \\['projector'\\]"):
        model, processor = tiny_vlm("idefics3")
        wrap_policy(model, processor, ModelConfig(path="unused", device="cpu", freeze=["projector"],
                                                  lora={"modules_to_save": ["projector"]}),
                    beta=0.0, device=torch.device("cpu"))

    recipe = vlm_recipe(save_model(*tiny_vlm("idefics3"), tmp_path / "model"), tmp_path / "run",
                        model={"lora": {"r": 4, "alpha": 8, "modules_to_save": ["projector"]}})
    run_dir = train(recipe_from_dict(recipe))
    adapter = load_file(run_dir / "checkpoints" / "step-2" / "adapter_model.safetensors")
    assert any("connector" in name for name in adapter) and not any("vision_model" in name for name in adapter)
