"""train(on_step=...): the live run before the first step and after each one; SIGTERM from it ends the run cleanly."""

import json
import os
import signal

import pytest

from grpokit.config import recipe_from_dict
from grpokit.train import train

from conftest import tiny_recipe


@pytest.mark.slow
def test_on_step_sees_the_live_policy_at_every_step_boundary(tiny_model_dir, tmp_path):
    seen = []

    def on_step(run, step):
        seen.append(step)
        assert run.policy.model is not None  # the model being trained, to evaluate or inspect

    train(recipe_from_dict(tiny_recipe(tiny_model_dir, tmp_path / "run", training={"max_steps": 2})), on_step=on_step)
    assert seen == [0, 1, 2]


@pytest.mark.slow
def test_a_hook_that_sends_sigterm_stops_the_run_after_that_step(tiny_model_dir, tmp_path):
    def on_step(run, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # as bench/time_to_accuracy.py ends a run that met its target

    run_dir = train(recipe_from_dict(tiny_recipe(tiny_model_dir, tmp_path / "run", training={"max_steps": 5})),
                    on_step=on_step)
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "stopped" and info["steps"] == 1
