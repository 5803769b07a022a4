"""Faults injected into real training runs on the tiny model, and what must survive them.

- SIGKILL in the middle of a step: ``--resume`` continues from the last checkpoint and the
  run ends with exactly the weights and metrics of a run that was never interrupted;
- SIGKILL in the middle of a checkpoint write: the previous checkpoint stays complete,
  ``latest`` names it, and resume uses it;
- SIGTERM / SIGINT: the step in flight finishes, a checkpoint is written, exit code 0;
- a non-finite loss: the update is skipped and counted; K in a row stop the run;
- only the newest K checkpoints are kept, and ``latest`` always names a complete one.

Bad input, fuzzing and the security checks are in test_faults_input.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grpokit.cli import main
from grpokit.config import recipe_from_dict
from grpokit.errors import RunDirError, TrainingError
from grpokit.models.checkpoint import latest_checkpoint, load_torch_state, step_checkpoints
from grpokit.train import train

from conftest import tiny_recipe

pytestmark = pytest.mark.slow
STEPS = 6


def faulty_recipe(model_dir, out_dir, **sections):
    """Every piece of state a resume must restore is in play: LoRA + AdamW moments, a reference
    (beta > 0), reward normalisation statistics, a replay buffer, a data pass that wraps around."""
    raw = tiny_recipe(model_dir, out_dir, model={"lora": {"r": 4, "alpha": 8}}, algorithm={"beta": 0.1},
                      training={"max_steps": STEPS, "save_every": 2, "learning_rate": 2e-2, "eval_every": 0,
                                "num_threads": 1},  # the same reduction order in this process and the child
                      data={"train_size": 10}, logging={"samples_every": 0, "progress": False})
    raw["algorithm"]["replay"] = {"capacity": 4, "ratio": 0.25}
    raw["reward_shaping"] = {"normalize": True}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


# Runs training in a child process and freezes it at a chosen point, so the parent can
# kill it there: after `policy_update` of step N (mid-step: the update is done, its metrics
# and checkpoint are not), or inside the checkpoint write of step N (weights staged, not renamed).
CHILD = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {tests!r})
    import conftest  # registers the toy rewards
    import grpokit.train.grpo as grpo
    import torch
    from grpokit.config import recipe_from_dict

    recipe = recipe_from_dict(json.loads(open(sys.argv[1]).read()))
    where, freeze_step, flag = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    calls = {{"n": 0}}

    def freeze():
        open(flag, "w").close()
        time.sleep(120)

    original_update = grpo.policy_update
    def update(run, *args, **kwargs):
        calls["n"] += 1
        out = original_update(run, *args, **kwargs)
        if where == "step" and calls["n"] == freeze_step:
            freeze()
        return out
    grpo.policy_update = update

    original_save = torch.save
    def save(value, path, *args, **kwargs):
        original_save(value, path, *args, **kwargs)
        if where == "checkpoint" and f".step-{{freeze_step}}." in str(path):
            freeze()
    torch.save = save
    grpo.train(recipe, overwrite=True, resume=len(sys.argv) > 5)
""")


def start_child(tmp_path: Path, raw: dict, where: str, freeze_step: int, resume: bool = False):
    script, recipe_file, flag = tmp_path / "child.py", tmp_path / "recipe.json", tmp_path / f"frozen-{where}"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    recipe_file.write_text(json.dumps(raw))
    flag.unlink(missing_ok=True)
    args = [sys.executable, str(script), str(recipe_file), where, str(freeze_step), str(flag)] + (["resume"] if resume else [])
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return child, flag


def wait_for(flag: Path, child: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not flag.exists():
        if child.poll() is not None:
            raise AssertionError(f"child exited early ({child.returncode}):\n{child.stdout.read().decode()[-3000:]}")
        if time.time() > deadline:
            child.kill()
            raise AssertionError("child never reached the freeze point")
        time.sleep(0.05)


def sigkill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)


def train_lines(run_dir: Path) -> dict[int, dict]:
    """The last train line per step (a resumed run logs the steps after its checkpoint again)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in lines if row["kind"] == "train"}


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{STEPS}" / "adapter_model.safetensors")


DETERMINISTIC = ("reward", "reward_std", "loss", "kl", "entropy", "grad_norm", "lr", "completion_length",
                 "replay/size", "replay/reuse_rate", "rewards/toy_digits_norm")


def test_sigkill_mid_step_then_resume_matches_the_straight_run(tiny_model_dir, tmp_path):
    straight = train(recipe_from_dict(faulty_recipe(tiny_model_dir, tmp_path / "straight")))

    raw = faulty_recipe(tiny_model_dir, tmp_path / "killed")
    child, flag = start_child(tmp_path, raw, "step", freeze_step=3)  # killed in step 3, after the step-2 checkpoint
    wait_for(flag, child)
    sigkill(child)
    run_dir = tmp_path / "killed"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # what a crash leaves
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-2"

    resumed = train(recipe_from_dict(raw), resume=True)
    info = json.loads((resumed / "run.json").read_text())
    assert info["status"] == "finished" and info["resumed"][0]["from_step"] == 2

    expected, got = final_adapter(straight), final_adapter(resumed)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), f"{name} differs after resume"
    a, b = train_lines(straight), train_lines(resumed)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        for key in DETERMINISTIC:
            assert a[step].get(key) == b[step].get(key), f"step {step} {key}: {a[step].get(key)} != {b[step].get(key)}"
    final_eval = [json.loads((d / "eval" / f"step-{STEPS}.json").read_text())["correct"] for d in (straight, resumed)]
    assert final_eval[0] == final_eval[1]


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tiny_model_dir, tmp_path):
    raw = faulty_recipe(tiny_model_dir, tmp_path / "run")
    child, flag = start_child(tmp_path, raw, "checkpoint", freeze_step=4)  # frozen inside the step-4 write
    wait_for(flag, child)
    checkpoints = tmp_path / "run" / "checkpoints"
    staged = list(checkpoints.glob(".step-4.*"))
    assert staged, "the kill must land while step-4 is staged"
    sigkill(child)

    assert not (checkpoints / "step-4").exists()
    assert (checkpoints / "latest").read_text().strip() == "step-2"
    previous = latest_checkpoint(checkpoints)
    assert previous.name == "step-2"
    assert load_torch_state(previous, "optimizer")["state"], "the previous checkpoint must load"
    assert load_file(previous / "adapter_model.safetensors")

    resumed = train(recipe_from_dict(raw), resume=True)
    assert json.loads((resumed / "run.json").read_text())["resumed"][0]["from_step"] == 2
    assert not list(checkpoints.glob(".step-*")), "staging leftovers are cleaned up"
    assert [step for step, _ in step_checkpoints(checkpoints)] == [4, STEPS]  # keep_checkpoints = 2


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_exits_zero(tiny_model_dir, tmp_path, sig):
    raw = faulty_recipe(tiny_model_dir, tmp_path / "run", training={"save_every": 0})
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    # the child signals itself from inside step 3's update, as a scheduler would mid-step
    script = tmp_path / "signal_child.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import conftest
        import grpokit.train.grpo as grpo
        from grpokit.cli import main
        original, calls = grpo.policy_update, []
        def update(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), {int(sig)})
            return original(*args, **kwargs)
        grpo.policy_update = update
        sys.exit(main(["train", {str(recipe_path)!r}]))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--resume" in done.stdout + done.stderr
    run_dir = tmp_path / "run"
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "stopped" and info["steps"] == 3 and info["stop_signal"] == sig.name
    assert sorted(train_lines(run_dir)) == [1, 2, 3]  # step 3 finished, step 4 never began
    assert latest_checkpoint(run_dir / "checkpoints").name == "step-3"

    assert main(["train", str(recipe_path), "--resume"]) == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["steps"] == STEPS and info["resumed"][0]["from_step"] == 3


def test_non_finite_loss_skips_the_update_and_repeated_ones_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    import grpokit.train.update as update

    real_loss, calls = update.policy_loss, []

    def loss_nan_on(steps):
        def policy_loss(*args, **kwargs):
            calls.append(1)
            loss, metrics = real_loss(*args, **kwargs)
            return (loss * float("nan"), metrics) if len(calls) in steps else (loss, metrics)
        return policy_loss

    monkeypatch.setattr(update, "policy_loss", loss_nan_on({2}))
    raw = faulty_recipe(tiny_model_dir, tmp_path / "one", training={"max_steps": 3, "save_every": 1})
    run_dir = train(recipe_from_dict(raw))
    lines = train_lines(run_dir)
    assert [lines[s]["skipped_update"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert json.loads((run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())["skipped_updates"] == 1

    calls.clear()
    monkeypatch.setattr(update, "policy_loss", loss_nan_on({2, 3, 4}))
    raw = faulty_recipe(tiny_model_dir, tmp_path / "many", training={"max_steps": 6, "save_every": 1,
                                                                      "max_consecutive_skips": 3, "keep_checkpoints": 5})
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        train(recipe_from_dict(raw))
    info = json.loads((tmp_path / "many" / "run.json").read_text())
    assert info["status"] == "failed" and "TrainingError" in info["error"]
    # the checkpoint after the last good update (step 1) is intact; skipped steps never changed the weights
    good = load_file(tmp_path / "many" / "checkpoints" / "step-1" / "adapter_model.safetensors")
    later = load_file(tmp_path / "many" / "checkpoints" / "step-3" / "adapter_model.safetensors")
    assert all(torch.equal(good[k], later[k]) for k in good)


def test_skipped_update_leaves_weights_and_optimizer_untouched(tiny_model_dir, tmp_path, monkeypatch):
    import grpokit.train.update as update

    real_loss = update.policy_loss
    monkeypatch.setattr(update, "policy_loss", lambda *a, **k: (lambda out: (out[0] * float("inf"), out[1]))(real_loss(*a, **k)))
    raw = faulty_recipe(tiny_model_dir, tmp_path / "run", training={"max_steps": 2, "save_every": 1,
                                                                     "max_consecutive_skips": 5})
    run_dir = train(recipe_from_dict(raw))
    step1, step2 = (run_dir / "checkpoints" / f"step-{s}" for s in (1, 2))
    a, b = load_file(step1 / "adapter_model.safetensors"), load_file(step2 / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert load_torch_state(step2, "optimizer")["state"] == {}  # AdamW never stepped: no moments
    assert load_torch_state(step2, "scheduler")["last_epoch"] == 0


def test_only_the_newest_checkpoints_are_kept_and_latest_names_one(tiny_model_dir, tmp_path):
    raw = faulty_recipe(tiny_model_dir, tmp_path / "run", training={"save_every": 1, "keep_checkpoints": 3})
    run_dir = train(recipe_from_dict(raw))
    checkpoints = run_dir / "checkpoints"
    assert [step for step, _ in step_checkpoints(checkpoints)] == [STEPS - 2, STEPS - 1, STEPS]
    assert (checkpoints / "latest").read_text().strip() == f"step-{STEPS}"
    state = json.loads((checkpoints / f"step-{STEPS}" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["data"]["num_rows"] == 10
    assert set(p.name for p in (checkpoints / f"step-{STEPS}").glob("*.pt")) == {
        "optimizer.pt", "scheduler.pt", "rng.pt", "replay.pt"}


def test_resume_refuses_a_changed_recipe_and_a_finished_run(tiny_model_dir, tmp_path):
    raw = faulty_recipe(tiny_model_dir, tmp_path / "run", training={"max_steps": 2})
    train(recipe_from_dict(raw))
    with pytest.raises(RunDirError, match="already reached step 2"):
        train(recipe_from_dict(raw), resume=True)
    changed = faulty_recipe(tiny_model_dir, tmp_path / "run", training={"max_steps": 4, "learning_rate": 1e-3})
    with pytest.raises(RunDirError, match="training.learning_rate"):
        train(recipe_from_dict(changed), resume=True)
    # more steps is a legal change: the run goes on from step 2
    longer = faulty_recipe(tiny_model_dir, tmp_path / "run", training={"max_steps": 3})
    run_dir = train(recipe_from_dict(longer), resume=True)
    assert sorted(train_lines(run_dir)) == [1, 2, 3]
    # --resume on an empty output dir starts a fresh run
    fresh = train(recipe_from_dict(faulty_recipe(tiny_model_dir, tmp_path / "new", training={"max_steps": 1})),
                  resume=True)
    assert json.loads((fresh / "run.json").read_text())["status"] == "finished"
