"""The "group verdict" use, as two stages: per-image summaries with ``grpokit generate``, then GRPO on
groups of photos (several images per row) answered with a verdict line and a reason line.

Stage 1 writes JSONL whose rows keep their image paths, so stage 2 builds its rows from them
without looking anything up again; the GRPO rows carry several images, each with its own
placeholder, and are rewarded by ``label`` + ``two_line_verdict``.
"""

from __future__ import annotations

import json

import yaml
from PIL import Image

from conftest import run_cli, tiny_recipe
from grpokit.config import recipe_from_dict
from grpokit.models.assemble import save_model
from grpokit.train import train
from test_vlm_models import tiny_vlm

SITES = {"site-a": ["red", "red", "blue"], "site-b": ["green", "white", "green"], "site-c": ["red", "white", "white"],
         "site-d": ["blue", "blue", "blue"], "site-e": ["green", "red", "blue"], "site-f": ["white", "white", "red"]}


def test_summaries_then_a_grpo_dataset_of_photo_groups(tmp_path):
    model_dir = save_model(*tiny_vlm("qwen2_vl"), tmp_path / "model")
    photos = tmp_path / "photos"
    photos.mkdir()
    rows = []
    for site, colours in SITES.items():
        for i, colour in enumerate(colours):
            Image.new("RGB", (56, 56), colour).save(photos / f"{site}-{i}.png")
            rows.append({"prompt": [{"role": "user", "content": "Describe this site photo in one line."}],
                         "image": f"{site}-{i}.png", "site": site})
    (photos / "photos.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    # stage 1: one summary per photo
    recipe = tiny_recipe(model_dir, tmp_path / "unused", data={"source": str(photos / "photos.jsonl"), "eval_size": 2},
                         rollout={"max_completion_length": 6, "max_prompt_length": 512})
    recipe_path = tmp_path / "summaries.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe))
    summaries = tmp_path / "summaries.jsonl"
    assert run_cli(["generate", "--model", model_dir, "--recipe", recipe_path, "--data", photos / "photos.jsonl",
                    "--split", "all", "--num-generations", 1, "--out", summaries]) == 0
    lines = [json.loads(line) for line in summaries.read_text().splitlines()]
    assert len(lines) == len(rows) and all(line["images"] == [str(photos / row["image"])]
                                           for line, row in zip(lines, rows))

    # stage 2: a GRPO row per site, its photos and their summaries, a verdict and a reason to give
    groups = []
    for site, colours in SITES.items():
        mine = [line for line in lines if line["site"] == site]
        notes = "\n".join(f"Photo {i + 1}: <image> {line['completions'][0]!r}" for i, line in enumerate(mine))
        groups.append({"prompt": f"{notes}\nIs the site safe? Answer 'pass' or 'fail' on the first line, then "
                                 "'Reason: ...' on the second.",
                       "images": [path for line in mine for path in line["images"]],
                       "answer": "fail" if "red" in colours else "pass", "verdicts": ["pass", "fail"]})
    dataset = tmp_path / "groups.jsonl"
    dataset.write_text("".join(json.dumps(group) + "\n" for group in groups))
    recipe = tiny_recipe(model_dir, tmp_path / "run", model={"lora": {"r": 4, "alpha": 8}},
                         data={"source": str(dataset), "eval_size": 2, "train_size": None},
                         rollout={"num_generations": 4, "max_completion_length": 8, "max_prompt_length": 1024},
                         training={"max_steps": 2, "prompts_per_step": 2, "eval_every": 2})
    recipe["rewards"] = [{"name": "label", "weight": 1.0}, {"name": "two_line_verdict", "weight": 0.5}]
    run_dir = train(recipe_from_dict(recipe))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train_lines] == [1, 2]
    assert all("rewards/label" in m and "rewards/two_line_verdict" in m for m in train_lines)
    evaluated = json.loads((run_dir / "eval" / "step-2.json").read_text())["samples"]
    assert all(len(sample["images"]) == 3 for sample in evaluated)  # every photo of the site reached the model
