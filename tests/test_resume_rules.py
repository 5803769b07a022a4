"""Three rules every stage shares (issue 15, item 4), each checked where it can fail.

- The schedule on ``--resume``: its position comes from the checkpoint, its shape from the current
  recipe. The same ``max_steps`` continues bit for bit (with cosine, which the constant-rate resume
  tests cannot see); a larger one makes every step from the checkpoint on take the rate of an
  uninterrupted run with the new total, given here in closed form.
- "Latest": ``--resume``, ``grpokit eval`` and ``grpokit generate`` given a run directory take the
  checkpoint ``checkpoints/latest`` names (``models.checkpoint.latest_checkpoint``), not the highest
  step number, and refuse the same things.
- Skipped updates: ``training.max_consecutive_skips`` in a row stop the GRPO loop and the supervised
  loop alike (``train/skips.py``), with one message shape.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from grpokit.config import recipe_from_dict
from grpokit.errors import GrpokitError, RunDirError, TrainingError
from grpokit.eval.standalone import resolve_target, run_evaluation
from grpokit.log import JsonlSink
from grpokit.train import train
from grpokit.train.rundir import find_resume_checkpoint
from grpokit.train.schedule import build_optimizer, restore_scheduler
from grpokit.train.supervised import SupervisedJob, fit

from conftest import tiny_recipe

PEAK = 3e-3
# what a skip-limit stop says in either loop: the step, the count, the key and its value
SKIP_MESSAGE = r"step {step}: the loss or gradient was not finite in {n} consecutive steps " \
               r"\(training.max_consecutive_skips = {n}\), so each update was skipped; "


def cosine_lr(update: int, total: int, warmup: int = 0, peak: float = PEAK) -> float:
    """The documented closed form (docs/run-directory.md): linear warmup, then cosine to 10 % of the peak."""
    if update < warmup:
        return peak * (update + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (update - warmup) / (total - warmup))))


def cosine_recipe(model_dir, out_dir, **training) -> dict:
    return tiny_recipe(model_dir, out_dir, training={"lr_schedule": "cosine", "learning_rate": PEAK, "max_steps": 4,
                                                     "save_every": 2, "eval_every": 2, "num_threads": 1, **training},
                       logging={"samples_every": 0, "progress": False})


def train_lines(run_dir) -> dict[int, dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in lines if row["kind"] == "train"}  # the last line per step


def weights(run_dir, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step}" / "model.safetensors")


@pytest.fixture(scope="module")
def cosine_run(tiny_model_dir, tmp_path_factory):
    """A finished 4-step cosine run, checkpoints step-2 and step-4, evaluated at 0, 2 and 4; copy before changing."""
    return train(recipe_from_dict(cosine_recipe(tiny_model_dir, tmp_path_factory.mktemp("cosine") / "run")))


def copy_run(run_dir, destination):
    shutil.copytree(run_dir, destination)
    return destination


# ============================================================================ 1. the schedule on resume


def _updates(optimizer, scheduler, n: int) -> list[float]:
    """The learning rate each of ``n`` updates is taken with (what the optimiser holds when it steps)."""
    rates = []
    for _ in range(n):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def _schedule(max_steps: int, params, schedule: str = "cosine"):
    from types import SimpleNamespace

    return build_optimizer(params, SimpleNamespace(learning_rate=PEAK, weight_decay=0.0, warmup_steps=2,
                                                   max_steps=max_steps, lr_schedule=schedule))


def test_a_restored_schedule_of_the_same_length_continues_bit_for_bit():
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer, scheduler = _schedule(10, params)
    _updates(optimizer, scheduler, 4)
    saved = optimizer.state_dict(), scheduler.state_dict()
    straight = _updates(optimizer, scheduler, 6)
    optimizer, scheduler = _schedule(10, params)
    optimizer.load_state_dict(saved[0])
    restore_scheduler(scheduler, saved[1])
    assert _updates(optimizer, scheduler, 6) == straight  # ==, not approx


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_restored_schedule_follows_the_new_total_from_the_first_resumed_update(schedule):
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer, scheduler = _schedule(6, params, schedule)
    _updates(optimizer, scheduler, 4)
    saved = optimizer.state_dict(), scheduler.state_dict()
    longer_optimizer, longer = _schedule(12, params, schedule)  # an uninterrupted 12-step run, for reference
    reference = _updates(longer_optimizer, longer, 12)
    optimizer, scheduler = _schedule(12, params, schedule)
    optimizer.load_state_dict(saved[0])
    restore_scheduler(scheduler, saved[1])
    assert scheduler.get_last_lr() == [reference[4]]
    assert _updates(optimizer, scheduler, 8) == reference[4:]
    if schedule == "cosine":
        assert reference == pytest.approx([cosine_lr(u, 12, warmup=2) for u in range(12)], rel=1e-12)


@pytest.mark.slow
def test_a_cosine_run_resumed_with_more_steps_takes_the_new_totals_rates(cosine_run, tiny_model_dir, tmp_path,
                                                                        caplog):
    run_dir = copy_run(cosine_run, tmp_path / "run")
    longer = cosine_recipe(tiny_model_dir, run_dir, max_steps=6)
    with caplog.at_level(logging.WARNING, logger="grpokit.train.grpo"):
        train(recipe_from_dict(longer), resume=True)
    lr = {step: line["lr"] for step, line in train_lines(run_dir).items()}
    # steps 1-4 decayed over 4 steps; from the checkpoint on, step s (update s - 1) has a 6-step run's rate
    assert [lr[s] for s in (1, 2, 3, 4)] == pytest.approx([cosine_lr(u, 4) for u in range(4)], rel=1e-12)
    assert [lr[s] for s in (5, 6)] == pytest.approx([cosine_lr(4, 6), cosine_lr(5, 6)], rel=1e-12)
    assert lr[5] > lr[4]  # the rate jumps back up: progress 4/6 of the way is less than 3/4
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "finished" and info["resumed"] == [{**info["resumed"][0], "from_step": 4,
                                                                 "max_steps": [4, 6]}]
    assert "training.max_steps changed from 4 to 6: the cosine learning-rate schedule now decays over 6 steps, " \
           "so from step 5 on each step gets the rate an uninterrupted 6-step run gives it" in caplog.text


@pytest.mark.slow
def test_a_cosine_run_stopped_and_resumed_equals_the_uninterrupted_one(cosine_run, tiny_model_dir, tmp_path):
    raw = cosine_recipe(tiny_model_dir, tmp_path / "run", save_every=0)

    def stop_after_step_1(step, metrics):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # GracefulStop: finish the step, checkpoint, return

    run_dir = train(recipe_from_dict(raw), progress=stop_after_step_1)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "stopped"
    train(recipe_from_dict(raw), resume=True)
    straight, resumed = train_lines(cosine_run), train_lines(run_dir)
    for step in (1, 2, 3, 4):
        for key in ("lr", "loss", "reward", "grad_norm", "kl"):
            assert resumed[step][key] == straight[step][key], (step, key)
    expected, got = weights(cosine_run, 4), weights(run_dir, 4)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


# ============================================================================ 2. one "latest" for everyone


def _fake_run(root, steps=(2, 4), latest: str | None = None):
    """A run directory's skeleton: recipe.yaml and complete step-N checkpoints (trainer_state.json)."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "recipe.yaml").write_text("{}\n")
    for step in steps:
        (root / "checkpoints" / f"step-{step}").mkdir()
        (root / "checkpoints" / f"step-{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))
    if latest is not None:
        (root / "checkpoints" / "latest").write_text(latest + "\n")
    return root


@pytest.mark.parametrize("latest, expected", [
    ("step-2", "step-2"),   # named and complete: it wins over the higher step-4
    ("step-4", "step-4"),
    (None, "step-4"),       # no latest: the newest complete checkpoint
    ("step-3", "step-4"),   # names one that is gone (or half-written): the newest complete one
])
def test_eval_takes_the_checkpoint_latest_names(tmp_path, latest, expected):
    run_dir = _fake_run(tmp_path / "run", latest=latest)
    (run_dir / "checkpoints" / "step-6").mkdir()  # incomplete (no trainer_state.json): never counts
    (run_dir / "checkpoints" / "step-8").symlink_to(run_dir / "checkpoints" / "step-4")  # a link: never counts
    target = resolve_target(str(run_dir))
    assert target.checkpoint == run_dir / "checkpoints" / expected and target.run_dir == run_dir


def test_eval_of_a_run_without_a_complete_checkpoint_says_so(tmp_path):
    run_dir = _fake_run(tmp_path / "run", steps=())
    (run_dir / "checkpoints" / "step-2").mkdir()  # staged, never completed
    with pytest.raises(GrpokitError, match=r"the run has no complete checkpoints/step-N directory yet; train it "
                                           r"first, or pass a checkpoint or model directory to --model"):
        resolve_target(str(run_dir))


@pytest.mark.parametrize("pointer", ["../../outside/step-1", "/tmp/step-1", "step-8"])
def test_eval_refuses_a_latest_that_leads_outside_the_run(tmp_path, pointer):
    run_dir = _fake_run(tmp_path / "run", latest=pointer)
    (run_dir / "checkpoints" / "step-8").symlink_to(run_dir / "checkpoints" / "step-4")
    with pytest.raises(RunDirError, match=r"checkpoints/latest names .* which is not a step-N directory inside"):
        resolve_target(str(run_dir))


@pytest.mark.slow
def test_eval_resume_and_generate_pick_the_same_checkpoint(cosine_run, tiny_model_dir, tmp_path):
    from grpokit.eval.generate import generate_file

    run_dir = copy_run(cosine_run, tmp_path / "run")
    (run_dir / "checkpoints" / "latest").write_text("step-2\n")  # step-4 exists too
    step_2 = run_dir / "checkpoints" / "step-2"
    longer = recipe_from_dict(cosine_recipe(tiny_model_dir, run_dir, max_steps=6))
    assert find_resume_checkpoint(str(run_dir), longer) == step_2
    _, result = run_evaluation(str(run_dir), name="at-latest")
    assert result["model"] == str(step_2)
    # the weights evaluated are step 2's: they decode as the run's own evaluation at step 2 did
    assert result["samples"] == json.loads((run_dir / "eval" / "step-2.json").read_text())["samples"]
    out = tmp_path / "generated.jsonl"
    generate_file(str(run_dir), out, 1, limit=1)
    assert json.loads(out.read_text().splitlines()[0])["model"] == str(step_2)


# ============================================================================ 3. one skip rule, both loops


@pytest.mark.slow
def test_the_grpo_loop_stops_after_max_consecutive_skips(tiny_model_dir, tmp_path, monkeypatch):
    import grpokit.train.update as update

    real_loss = update.policy_loss
    calls = []

    def nan_from_step_2(*args, **kwargs):
        calls.append(1)
        loss, metrics = real_loss(*args, **kwargs)
        return (loss * float("nan") if len(calls) >= 2 else loss), metrics

    monkeypatch.setattr(update, "policy_loss", nan_from_step_2)
    raw = cosine_recipe(tiny_model_dir, tmp_path / "run", max_steps=6, save_every=1, eval_every=0,
                        max_consecutive_skips=2)
    with pytest.raises(TrainingError, match=SKIP_MESSAGE.format(step=3, n=2) + "the skipped updates never changed "
                                            "the weights, and the last checkpoint is intact"):
        train(recipe_from_dict(raw))
    assert [line["skipped_update"] for line in train_lines(tmp_path / "run").values()] == [0.0, 1.0]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "failed"


def _toy_job(nan_calls):
    layer = torch.nn.Linear(2, 1)
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        loss = layer(torch.ones(len(batch), 2)).pow(2).mean()
        return (loss * float("nan") if calls["n"] in nan_calls else loss), {}

    return SupervisedJob(model=layer, params=list(layer.parameters()), train_examples=list(range(10)),
                         loss_fn=loss_fn, eval_fn=dict, save=lambda d: d)


@pytest.mark.parametrize("limit", [2, 4])
def test_the_supervised_loop_stops_after_max_consecutive_skips(tmp_path, limit):
    from grpokit.config import SupervisedTrainingConfig

    training = SupervisedTrainingConfig(batch_size=1, epochs=1, eval_every=0, max_consecutive_skips=limit)
    sink = JsonlSink(tmp_path / "metrics.jsonl")
    nan = {2, *range(4, 100)}  # one skip, a good step (resets the count), then skips to the end
    with pytest.raises(TrainingError, match=SKIP_MESSAGE.format(step=3 + limit, n=limit) + "the skipped updates "
                                            "never changed the weights, but the run saves only at its end"):
        fit(_toy_job(nan), training, sink)
    sink.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_update"] for r in rows] == [0, 1, 0] + [1] * limit


def test_both_recipe_kinds_have_the_same_skip_key():
    from grpokit.config import SupervisedTrainingConfig, TrainingConfig

    grpo, supervised = TrainingConfig.model_fields["max_consecutive_skips"], \
        SupervisedTrainingConfig.model_fields["max_consecutive_skips"]
    assert (grpo.default, grpo.description, grpo.metadata) == (supervised.default, supervised.description,
                                                               supervised.metadata)
    with pytest.raises(Exception, match="max_consecutive_skips"):
        SupervisedTrainingConfig(max_consecutive_skips=0)


@pytest.mark.slow
def test_sft_takes_max_consecutive_skips_from_its_recipe(tiny_model_dir, tmp_path, monkeypatch):
    import grpokit.train.sft as sft
    from test_sft import sft_recipe, toy_samples, write_jsonl

    real_loss = sft.sft_loss
    monkeypatch.setattr(sft, "sft_loss", lambda policy, batch: (lambda out: (out[0] * float("nan"), out[1]))(
        real_loss(policy, batch)))
    data = write_jsonl(tmp_path / "d.jsonl", toy_samples(40))
    recipe = sft_recipe(tiny_model_dir, data, tmp_path / "sft", max_consecutive_skips=2, eval_every=0)
    with pytest.raises(TrainingError, match=SKIP_MESSAGE.format(step=2, n=2)):
        sft.run_sft(recipe)
    info = json.loads((tmp_path / "sft" / "run.json").read_text())
    assert info["status"] == "failed" and "max_consecutive_skips = 2" in info["error"]


def test_a_run_from_before_a_new_recipe_key_resumes(cosine_run, tiny_model_dir, tmp_path):
    """A key a newer grpokit added, at its default, is no change to a stored run (its recipe.yaml lacks it);
    any other difference still is."""
    import yaml

    run_dir = copy_run(cosine_run, tmp_path / "old")
    stored = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    del stored["rollout"]["backend"]
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(stored))
    raw = cosine_recipe(tiny_model_dir, run_dir, max_steps=6)
    assert find_resume_checkpoint(str(run_dir), recipe_from_dict(raw)).name == "step-4"
    raw["rollout"]["temperature"] = 0.5
    with pytest.raises(RunDirError, match="rollout.temperature"):
        find_resume_checkpoint(str(run_dir), recipe_from_dict(raw))
