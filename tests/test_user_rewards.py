"""Reward code as users bring it from TRL and open-r1, through ``grpokit train`` end to end.

The shipped folder ``recipes/trl-rewards`` holds a TRL-docs conversational dataset
(``prompt`` + ``solution``), a module of reward functions written as open-r1 and TRL's docs
write them (math-verify with its defaults, the ``solution`` column, a factory) and a recipe
naming them beside TRL's own ``trl.rewards`` functions. It must train from that folder and
from anywhere else, with no PYTHONPATH, and every component must score every batch.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

FOLDER = Path(__file__).resolve().parents[1] / "recipes" / "trl-rewards"
TINY = ["--set", "model.dtype=float32", "--set", "model.lora=null", "--set", "model.device=cpu",
        "--set", "rollout.max_completion_length=8", "--set", "training.max_steps=2", "--set", "logging.progress=false"]


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A copy of the shipped folder, somewhere no import path points to."""
    folder = tmp_path / "my-project"
    shutil.copytree(FOLDER, folder, ignore=shutil.ignore_patterns("runs", "__pycache__"))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    return folder


def components() -> list[str]:
    return [spec["name"] for spec in yaml.safe_load((FOLDER / "recipe.yaml").read_text())["rewards"]]


def assert_every_component_scored(run_dir: Path, caplog) -> None:
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    failures = [r.getMessage() for r in caplog.records if "failed on this batch" in r.getMessage()]
    assert failures == []
    train_lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in train_lines if line.get("kind") == "train"]
    assert len(train_lines) == 2
    for line in train_lines:
        assert {f"rewards/{name}" for name in components()} <= set(line)
    # evaluation calls them the way training does: TRL's cosine reward needs completion_ids there too
    evaluated = json.loads((run_dir / "eval" / "step-0.json").read_text())
    assert all(evaluated["rewards"][name] is not None for name in components())


def test_the_trl_style_folder_trains_from_its_own_folder(user_folder, tiny_model_dir, monkeypatch, caplog):
    monkeypatch.chdir(user_folder)
    with caplog.at_level(logging.WARNING):
        run_cli(["train", "recipe.yaml", "--set", f"model.path={tiny_model_dir}", *TINY])
    assert_every_component_scored(user_folder / "runs" / "trl-rewards", caplog)


def test_the_same_recipe_trains_from_another_directory_with_a_reward_in_a_process(user_folder, tiny_model_dir,
                                                                                   tmp_path, monkeypatch, caplog):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with caplog.at_level(logging.WARNING):
        run_cli(["train", str(user_folder / "recipe.yaml"), "--set", f"model.path={tiny_model_dir}", *TINY,
                 "--set", "rewards.0.run_in=process", "--set", "training.output_dir=out"])
    assert_every_component_scored(elsewhere / "out", caplog)
    saved = yaml.safe_load((elsewhere / "out" / "recipe.yaml").read_text())
    # the resolved recipe finds the module and the data again from any directory
    assert saved["python_path"][0] == str(user_folder.resolve())
    assert saved["data"]["source"] == str(user_folder.resolve() / "math.jsonl")


TRL_REWARDS = [
    {"name": "trl.rewards:accuracy_reward"},
    {"name": "trl.rewards:reasoning_accuracy_reward"},
    {"name": "trl.rewards:think_format_reward"},
    {"name": "trl.rewards:get_cosine_scaled_reward", "factory": True, "args": {"max_len": 8}},
    {"name": "trl.rewards:get_repetition_penalty_reward", "factory": True, "args": {"ngram_size": 2}},
    {"name": "trl.rewards:get_soft_overlong_punishment", "factory": True,
     "args": {"max_completion_len": 8, "soft_punish_cache": 4}},
]


def test_every_trl_rewards_function_trains_as_trl_documents_it(user_folder, tiny_model_dir, monkeypatch, caplog):
    recipe = yaml.safe_load((user_folder / "recipe.yaml").read_text())
    recipe["rewards"] = TRL_REWARDS
    recipe["eval"]["accuracy_reward"] = "trl.rewards:accuracy_reward"
    (user_folder / "all-trl.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(user_folder)
    with caplog.at_level(logging.WARNING):
        run_cli(["train", "all-trl.yaml", "--set", f"model.path={tiny_model_dir}", *TINY])
    run_dir = user_folder / "runs" / "trl-rewards"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert [r.getMessage() for r in caplog.records if "failed on this batch" in r.getMessage()] == []
    line = next(json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x)
    assert {f"rewards/{spec['name']}" for spec in TRL_REWARDS} <= set(line)
