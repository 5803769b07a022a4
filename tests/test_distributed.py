"""Data-parallel GRPO on CPU with gloo: two processes under torchrun train as one process does.

The reference is a one-process run of the same recipe and global batch with
``rollout.seed_per_prompt`` on (what every multi-process run uses): the same samples, so the
same rewards, the same losses up to float noise, and the same final weights within tolerance.
A rank that stalls or dies stops the other within the timeout, with a message naming the rank
and its stage, and the last checkpoint intact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_recipe
from grpokit.config import recipe_from_dict
from grpokit.distributed import World
from grpokit.train import train

REPO = Path(__file__).resolve().parents[1]
TOY_REWARDS = '''
import os
import time


def digits(prompts, completions, trainer_state=None, **_):
    """Share of the reply's characters that are digits: learnable by a random char model."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(len(t), 1) for t in texts]


def stall_on_rank_1(prompts, completions, trainer_state=None, **_):
    """Rank 1 hangs (or dies) in this reward at step 2; every other call scores digits."""
    if os.environ.get("RANK") == "1" and getattr(trainer_state, "global_step", None) == 2:
        if os.environ.get("TOY_DIE"):
            os._exit(1)
        time.sleep(120)
    return digits(prompts, completions)
'''


def write_toy_rewards(directory: Path) -> None:
    (directory / "toy_dp_rewards.py").write_text(TOY_REWARDS)


def recipe_for(model_dir, out_dir, reward="toy_dp_rewards:digits", **training):
    recipe = tiny_recipe(model_dir, out_dir, rollout={"num_generations": 4, "max_completion_length": 8,
                                                       "seed_per_prompt": True, "temperature": 1.0},
                         training={"max_steps": 3, "prompts_per_step": 4, "eval_every": 0, "save_every": 0,
                                   **training},
                         logging={"progress": False, "samples_every": 1})
    return {**recipe, "rewards": [{"name": reward}]}


def torchrun(recipe: dict, directory: Path, extra_env: dict | None = None, timeout: float = 600):
    path = directory / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), str(REPO)]), "OMP_NUM_THREADS": "1",
           **(extra_env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "grpokit", "train", str(path)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=directory)


def train_lines(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if line.get("kind") == "train"]


def latest_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    (weights,) = latest_checkpoint(run_dir).glob("*.safetensors")
    return load_file(weights)


def test_a_rank_takes_a_contiguous_share_in_rank_order():
    shares = [World(rank=r, size=3).share(8) for r in range(3)]
    assert [list(range(8))[s] for s in shares] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert World().share(5) == slice(0, 5)


@pytest.fixture(scope="module")
def one_and_two_processes(tiny_model_dir, tmp_path_factory):
    """The same recipe trained by one process (in this one) and by two (under torchrun)."""
    directory = tmp_path_factory.mktemp("dp")
    write_toy_rewards(directory)
    sys.path.insert(0, str(directory))
    try:
        one = train(recipe_from_dict(recipe_for(tiny_model_dir, directory / "one")))
    finally:
        sys.path.remove(str(directory))
    result = torchrun(recipe_for(tiny_model_dir, directory / "two"), directory)
    assert result.returncode == 0, result.stderr[-3000:]
    return one, directory / "two", result


def test_two_processes_train_as_one_on_the_same_global_batch(one_and_two_processes):
    one, two, _ = one_and_two_processes
    lines_one, lines_two = train_lines(one), train_lines(two)
    assert len(lines_one) == len(lines_two) == 3
    for a, b in zip(lines_one, lines_two):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-9), a["step"]  # the same samples, scored alike
        assert a["reward_std"] == pytest.approx(b["reward_std"], abs=1e-9)
        assert a["completion_length"] == pytest.approx(b["completion_length"], abs=1e-9)
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4, abs=1e-6), a["step"]
    weights_one, weights_two = final_weights(one), final_weights(two)
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], atol=1e-5, rtol=1e-4, msg=name)
    initial = load_file(next(Path(one_and_two_processes_model(one)).glob("*.safetensors")))
    assert max(float((weights_one[n] - initial[n]).abs().max()) for n in initial if n in weights_one) > 1e-4


def one_and_two_processes_model(run_dir: Path) -> str:
    """The model directory a run started from."""
    return yaml.safe_load((run_dir / "recipe.yaml").read_text())["model"]["path"]


def test_one_run_directory_written_by_rank_0_reads_like_a_single_process_run(one_and_two_processes):
    one, two, result = one_and_two_processes
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    assert json.loads((two / "run.json").read_text())["processes"] == 2
    assert json.loads((two / "run.json").read_text())["status"] == "finished"
    evals_one = json.loads((one / "eval" / "step-3.json").read_text())
    evals_two = json.loads((two / "eval" / "step-3.json").read_text())
    assert evals_two["num_examples"] == evals_one["num_examples"] == 8  # every held-out row, once
    assert evals_two["correct"] == evals_one["correct"]
    state = torch.load(latest_checkpoint(two) / "ranks.pt", weights_only=True)
    assert len(state) == 2  # every rank's random streams are in the checkpoint
    assert result.stdout.count("step 3/3") == 1  # one rank reports progress


def test_a_stalled_rank_stops_the_other_within_the_timeout_naming_it(tiny_model_dir, tmp_path):
    write_toy_rewards(tmp_path)
    recipe = recipe_for(tiny_model_dir, tmp_path / "run", reward="toy_dp_rewards:stall_on_rank_1",
                        save_every=1, distributed_timeout_s=10, max_steps=4)
    start = time.monotonic()
    result = torchrun(recipe, tmp_path, timeout=300)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 1 was last at computing the rewards (step 2)" in result.stderr, result.stderr[-3000:]
    assert elapsed < 120  # not the reward's two minutes: the timeout ended it
    latest = latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-1" and (latest / "trainer_state.json").is_file()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def test_a_dead_rank_stops_the_other_with_a_message(tiny_model_dir, tmp_path):
    write_toy_rewards(tmp_path)
    recipe = recipe_for(tiny_model_dir, tmp_path / "run", reward="toy_dp_rewards:stall_on_rank_1",
                        save_every=1, distributed_timeout_s=60, max_steps=4)
    start = time.monotonic()
    result = torchrun(recipe, tmp_path, extra_env={"TOY_DIE": "1"}, timeout=300)
    assert result.returncode != 0
    assert time.monotonic() - start < 120
    latest = latest_checkpoint(tmp_path / "run")
    assert latest.name == "step-1" and (latest / "trainer_state.json").is_file()


def launch(launcher: str, recipe: dict, directory: Path, *flags: str, timeout: float = 600):
    """``grpokit train`` under ``accelerate launch --cpu`` or ``grpokit train --nproc 2`` (torchrun)."""
    path = directory / f"recipe-{launcher}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(directory), str(REPO)]), "OMP_NUM_THREADS": "1"}
    if launcher == "accelerate":
        command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                   "-m", "grpokit", "train", str(path), *flags]
    else:
        command = [sys.executable, "-m", "grpokit", "train", str(path), "--nproc", "2", *flags]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=directory)


def test_a_run_resumes_exactly_under_another_launcher_and_in_one_process(one_and_two_processes, tiny_model_dir,
                                                                          tmp_path):
    """Two steps under accelerate, the third resumed by ``--nproc 2`` (torchrun): the uninterrupted run's
    numbers. Resumed again by one process (another world size): the same step, said in a warning."""
    _, two, _ = one_and_two_processes
    write_toy_rewards(tmp_path)
    run_dir = tmp_path / "resumed"
    first = launch("accelerate", recipe_for(tiny_model_dir, run_dir, max_steps=2), tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    second = launch("nproc", recipe_for(tiny_model_dir, run_dir, max_steps=3), tmp_path, "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    resumed, straight = train_lines(run_dir)[-1], train_lines(two)[-1]
    assert resumed["step"] == straight["step"] == 3
    assert resumed["reward"] == pytest.approx(straight["reward"], abs=1e-9)
    assert resumed["grad_norm"] == pytest.approx(straight["grad_norm"], rel=1e-4)
    for name, value in final_weights(two).items():
        torch.testing.assert_close(final_weights(run_dir)[name], value, atol=1e-5, rtol=1e-4, msg=name)
    # the 2-process checkpoint at step 2 continued by one process
    sys.path.insert(0, str(tmp_path))
    try:
        alone_dir = tmp_path / "alone"
        import shutil

        shutil.copytree(run_dir, alone_dir)
        (alone_dir / "checkpoints" / "latest").write_text("step-2\n")
        shutil.rmtree(alone_dir / "checkpoints" / "step-3")
        recipe = recipe_for(tiny_model_dir, alone_dir, max_steps=3)
        train(recipe_from_dict(recipe), resume=True)
    finally:
        sys.path.remove(str(tmp_path))
    alone = train_lines(alone_dir)[-1]
    assert alone["step"] == 3 and alone["reward"] == pytest.approx(straight["reward"], abs=1e-9)


def test_sigterm_to_the_launcher_checkpoints_every_rank_and_stops(tiny_model_dir, tmp_path):
    import signal

    write_toy_rewards(tmp_path)
    run_dir = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_for(tiny_model_dir, run_dir, max_steps=200)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 "-m", "grpokit", "train", str(path)], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not ((run_dir / "metrics.jsonl").is_file() and train_lines(run_dir)):  # the first step is done
        assert time.monotonic() < deadline, "no step within 4 minutes"
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        time.sleep(0.5)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "stopped", stderr[-3000:]
    latest = latest_checkpoint(run_dir)
    assert latest.name == f"step-{info['steps']}" and (latest / "ranks.pt").is_file()
    assert 1 <= info["steps"] < 200
