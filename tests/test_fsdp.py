"""Full fine-tuning under FSDP2 on CPU with gloo: two processes, each holding half of every weight, train as
one process holding all of them does.

The pattern of tests/test_distributed.py: the reference is a one-process run of the same recipe and global
batch with ``rollout.seed_per_prompt`` on, so both runs draw the same samples. The recipe makes the ranks
unequal on purpose: P = 3 prompts over 2 ranks and 3 micro-batches give rank 0 eight completions in 3
micro-batches and rank 1 four in 2, so rank 1 runs an idle pass and both score prompts row by row
(``align_passes``); beta > 0 shards the frozen reference too. The checkpoints are ordinary full models with
the optimiser state as a one-process run writes it, and a run resumes from them sharded or in one process.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpokit.config import recipe_from_dict
from grpokit.errors import RecipeError
from grpokit.train import train
from test_distributed import (final_weights, latest_checkpoint, launch, recipe_for, torchrun, train_lines,
                              write_toy_rewards)


def fsdp_recipe(model_dir, out_dir, fsdp: bool = True, **training) -> dict:
    recipe = recipe_for(model_dir, out_dir, **{"prompts_per_step": 3, "grad_accum": 3, "fsdp": fsdp, **training})
    return {**recipe, "algorithm": {"beta": 0.04}}


def train_here(recipe: dict, directory: Path, resume: bool = False) -> Path:
    sys.path.insert(0, str(directory))  # the toy reward module
    try:
        return train(recipe_from_dict(recipe), resume=resume)
    finally:
        sys.path.remove(str(directory))


@pytest.fixture(scope="module")
def one_and_fsdp(tiny_model_dir, tmp_path_factory):
    """The same recipe trained by one unsharded process (in this one) and by two sharded ones (torchrun)."""
    directory = tmp_path_factory.mktemp("fsdp")
    write_toy_rewards(directory)
    one = train_here(fsdp_recipe(tiny_model_dir, directory / "one", fsdp=False), directory)
    result = torchrun(fsdp_recipe(tiny_model_dir, directory / "two"), directory)
    assert result.returncode == 0, result.stderr[-3000:]
    return one, directory / "two", result


def test_two_sharded_processes_train_as_one_unsharded(one_and_fsdp):
    one, two, result = one_and_fsdp
    assert "FSDP: 2 transformer blocks and the root sharded over 2 processes, the frozen reference too" in result.stderr
    lines_one, lines_two = train_lines(one), train_lines(two)
    assert len(lines_one) == len(lines_two) == 3
    for a, b in zip(lines_one, lines_two):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-9), a["step"]  # the same samples, scored alike
        assert a["completion_length"] == pytest.approx(b["completion_length"], abs=1e-6)  # fp32 mean vs weighted
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-6), a["step"]  # the sharded reference scores alike
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-6), a["step"]  # summed, not averaged
    weights_one, weights_two = final_weights(one), final_weights(two)
    assert weights_one.keys() == weights_two.keys()  # the tied head left out, as an unsharded run leaves it
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], atol=1e-5, rtol=1e-4, msg=name)
    evals_one = json.loads((one / "eval" / "step-3.json").read_text())
    evals_two = json.loads((two / "eval" / "step-3.json").read_text())
    assert evals_two["num_examples"] == 8 and evals_two["correct"] == evals_one["correct"]


def test_the_checkpoint_is_an_ordinary_full_model_with_the_unsharded_optimiser_state(one_and_fsdp):
    from grpokit.models import load_checkpoint

    one, two, _ = one_and_fsdp
    model, _ = load_checkpoint(latest_checkpoint(two))  # transformers alone: no grpokit, no FSDP
    for name, tensor in final_weights(one).items():
        torch.testing.assert_close(model.state_dict()[name], tensor, atol=1e-5, rtol=1e-4, msg=name)
    sharded = torch.load(latest_checkpoint(two) / "optimizer.pt", weights_only=True)
    plain = torch.load(latest_checkpoint(one) / "optimizer.pt", weights_only=True)
    assert sharded["state"].keys() == plain["state"].keys()
    assert [g["params"] for g in sharded["param_groups"]] == [g["params"] for g in plain["param_groups"]]
    for index, moments in plain["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(sharded["state"][index][key], value, atol=1e-6, rtol=1e-3, msg=f"{index}.{key}")


def test_a_sharded_run_resumes_sharded_and_in_one_process(one_and_fsdp, tiny_model_dir, tmp_path):
    """Two sharded steps, the third resumed sharded: the uninterrupted sharded run's numbers. The same
    step-2 checkpoint continued by one unsharded process: the same step again."""
    _, two, _ = one_and_fsdp
    write_toy_rewards(tmp_path)
    run_dir = tmp_path / "resumed"
    first = torchrun(fsdp_recipe(tiny_model_dir, run_dir, max_steps=2), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    alone_dir = tmp_path / "alone"
    shutil.copytree(run_dir, alone_dir)
    second = launch("nproc", fsdp_recipe(tiny_model_dir, run_dir, max_steps=3), tmp_path, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    straight = train_lines(two)[-1]
    for resumed_dir in (run_dir, train_here(fsdp_recipe(tiny_model_dir, alone_dir, fsdp=False, max_steps=3),
                                            tmp_path, resume=True)):
        resumed = train_lines(resumed_dir)[-1]
        assert resumed["step"] == 3
        assert resumed["reward"] == pytest.approx(straight["reward"], abs=1e-9), resumed_dir.name
        assert resumed["grad_norm"] == pytest.approx(straight["grad_norm"], rel=1e-4), resumed_dir.name
        for name, value in final_weights(two).items():
            torch.testing.assert_close(final_weights(resumed_dir)[name], value, atol=1e-5, rtol=1e-4, msg=name)
    initial = load_file(next(Path(tiny_model_dir).glob("*.safetensors")))
    assert max(float((final_weights(run_dir)[n] - initial[n]).abs().max()) for n in initial) > 1e-4  # it trained


def test_fsdp_is_for_full_fine_tuning(tiny_model_dir, tmp_path):
    recipe = fsdp_recipe(tiny_model_dir, tmp_path)
    recipe["model"] = {**recipe["model"], "lora": {"r": 4}}
    with pytest.raises(RecipeError, match="training.fsdp shards full fine-tuning"):
        recipe_from_dict(recipe)


def test_accelerate_launch_with_fsdp_turns_it_on(tiny_model_dir, tmp_path, monkeypatch):
    from grpokit.distributed import World
    from grpokit.train.run import for_processes

    recipe = recipe_from_dict(fsdp_recipe(tiny_model_dir, tmp_path, fsdp=False))
    assert not for_processes(recipe, World(rank=0, size=2)).training.fsdp
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert for_processes(recipe, World(rank=0, size=2)).training.fsdp
