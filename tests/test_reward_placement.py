"""Where reward calls run and how they are stopped: reward code in the shapes users bring.

The functions live in a module written to a folder of its own (as a user's rewards.py
beside a recipe) and are named ``placed_rewards:fn`` with that folder as the search path.
"""

from __future__ import annotations

import logging
import textwrap
import threading
import time

import pytest

from grpokit.config import RewardSpec
from grpokit.errors import RewardError
from grpokit.rewards import RewardSet, trainer_state

MODULE = "placed_rewards"
SOURCE = '''
import os, threading, time
from math_verify import parse, verify
from grpokit.rewards import thread_safe


def mv_accuracy(completions, solution, **kwargs):
    """open-r1's way: math-verify with its defaults (signal.alarm timeouts: main thread only)."""
    return [float(verify(parse(sol), parse(c))) for c, sol in zip(completions, solution)]


def sleeps_forever(completions, **kwargs):
    time.sleep(10**6)


def sleeps_and_swallows(completions, **kwargs):
    """Reward code that eats every Exception (as math-verify does) must still be stopped."""
    while True:
        try:
            time.sleep(10**6)
        except Exception:
            pass


def bomb(completions, **kwargs):
    """A completion math-verify would take minutes on without its timeout."""
    return [float(verify(parse("$10$"), parse(r"$\\boxed{9^{9^{9^{9}}}}$"))) for _ in completions]


def c_hang(completions, **kwargs):
    """One C call that never looks at signals: only a process can be stopped here."""
    return [float(pow(9, 9 ** 10) % 7) for _ in completions]


def crashes(completions, **kwargs):
    os._exit(3)


def where(completions, **kwargs):
    on_main = threading.current_thread() is threading.main_thread()
    return [float(on_main) + 10 * float(os.getpid() == int(os.environ["TEST_PARENT_PID"]))] * len(completions)


@thread_safe
def declared_safe(completions, **kwargs):
    return [float(threading.current_thread() is threading.main_thread())] * len(completions)


def get_length_reward(scale, unit="chars"):
    """A factory, as open-r1's get_cosine_scaled_reward: called once with the recipe's args."""
    def length_reward(completions, **kwargs):
        return [scale * len(c) for c in completions]
    return length_reward


def needs_extras(completions, completion_ids, trainer_state, **kwargs):
    return [float(len(ids) + trainer_state.global_step) for ids in completion_ids]


def logs(completions, log_metric=None, log_extra=None, **kwargs):
    log_metric("judge_calls", len(completions))
    log_extra("verdict", ["ok"] * len(completions))
    return [1.0] * len(completions)


def strict(completions, pattern):
    """No **kwargs: gets only what it names."""
    return [float(c == pattern) for c in completions]


def answers_none(completions, solution=None, **kwargs):
    return [None] * len(completions)
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory, monkeypatch_module):
    path = tmp_path_factory.mktemp("user-folder")
    (path / f"{MODULE}.py").write_text(textwrap.dedent(SOURCE))
    import os

    monkeypatch_module.setenv("TEST_PARENT_PID", str(os.getpid()))
    return str(path)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def score(folder, specs, completions, columns=None, extras=None):
    with RewardSet([RewardSpec(**s) for s in specs], [folder]) as rewards:
        return rewards.score(["p"] * len(completions), completions, columns or {}, extras=extras)


def test_math_verify_with_its_defaults_runs_on_the_main_thread_and_fails_in_a_thread(folder):
    spec = {"name": f"{MODULE}:mv_accuracy"}
    scores = score(folder, [spec], ["so $\\frac{1}{2}$", "it is $3$"], {"solution": ["$0.5$", "$4$"]})
    assert scores.parts[f"{MODULE}:mv_accuracy"] == [1.0, 0.0] and not scores.errors
    threaded = score(folder, [{**spec, "run_in": "thread"}], ["$1$"], {"solution": ["$1$"]})
    assert "doesn't support threaded environment" in threaded.errors[f"{MODULE}:mv_accuracy"]
    in_process = score(folder, [{**spec, "run_in": "process"}], ["$\\frac{1}{2}$"], {"solution": ["$0.5$"]})
    assert in_process.parts[f"{MODULE}:mv_accuracy"] == [1.0]


def test_placement_defaults_and_declarations(folder, monkeypatch):
    monkeypatch.setenv("TEST_PARENT_PID", str(__import__("os").getpid()))
    scores = score(folder, [{"name": f"{MODULE}:where"}, {"name": f"{MODULE}:declared_safe"}, {"name": "length"}], ["a"])
    assert scores.parts[f"{MODULE}:where"] == [11.0]  # main thread of the trainer, as TRL calls it
    assert scores.parts[f"{MODULE}:declared_safe"] == [0.0]  # @thread_safe: a worker thread
    in_process = score(folder, [{"name": f"{MODULE}:where", "run_in": "process"}], ["a"])
    assert in_process.parts[f"{MODULE}:where"] == [1.0]  # the main thread of another process


def test_a_main_thread_component_scored_off_the_main_thread_runs_in_a_process(folder):
    box = {}
    thread = threading.Thread(target=lambda: box.update(s=score(folder, [{"name": f"{MODULE}:where"}], ["a"])))
    thread.start()
    thread.join()
    assert box["s"].parts[f"{MODULE}:where"] == [1.0]


@pytest.mark.parametrize("name, run_in", [("sleeps_forever", "main"), ("sleeps_and_swallows", "main"),
                                          ("sleeps_forever", "process"), ("sleeps_forever", "thread"),
                                          ("c_hang", "process")])
def test_no_reward_call_outlives_its_timeout(folder, name, run_in):
    t0 = time.perf_counter()
    scores = score(folder, [{"name": f"{MODULE}:{name}", "run_in": run_in, "timeout_s": 1.0}, {"name": "length"}],
                   ["a", "b"])
    elapsed = time.perf_counter() - t0
    assert scores.parts[f"{MODULE}:{name}"] == [None, None]
    assert "RewardTimeout: timed out after 1 s" in scores.errors[f"{MODULE}:{name}"]
    assert scores.parts["length"] == [0.1, 0.1]  # the other component still counts
    assert elapsed < 1.0 + 2.5 + (3.0 if run_in == "process" else 0.0)  # one re-send, or a worker start


@pytest.mark.parametrize("run_in", ["main", "process"])
def test_a_math_verify_bomb_is_stopped(folder, run_in):
    t0 = time.perf_counter()
    scores = score(folder, [{"name": f"{MODULE}:bomb", "run_in": run_in, "timeout_s": 2.0}], ["x"] * 3)
    assert scores.parts[f"{MODULE}:bomb"] == [None] * 3
    assert "timed out after 2 s" in scores.errors[f"{MODULE}:bomb"]
    assert time.perf_counter() - t0 < 2.0 + 2.5 + (3.0 if run_in == "process" else 0.0)


def test_a_killed_or_crashed_worker_is_one_failed_batch_and_restarts(folder):
    specs = [RewardSpec(name=f"{MODULE}:crashes", run_in="process"),
             RewardSpec(name=f"{MODULE}:c_hang", run_in="process", timeout_s=1.0)]
    with RewardSet(specs, [folder]) as rewards:
        for _ in range(2):  # the second batch meets restarted workers, which fail the same way again
            scores = rewards.score(["p"], ["a"], {})
            assert "died (exit code 3)" in scores.errors[f"{MODULE}:crashes"]
            assert "worker process was killed" in scores.errors[f"{MODULE}:c_hang"]


def test_factories_are_called_once_with_their_args(folder):
    spec = {"name": f"{MODULE}:get_length_reward", "factory": True, "args": {"scale": 0.5}}
    assert score(folder, [spec], ["ab", "abcd"]).parts[f"{MODULE}:get_length_reward"] == [1.0, 2.0]
    with pytest.raises(RewardError, match="cannot be called with args"):
        RewardSet([RewardSpec(**{**spec, "args": {"scale": 1, "nope": 2}})], [folder])
    with pytest.raises(RewardError, match="has factory: true but returned float"):
        RewardSet([RewardSpec(name="random:random", factory=True)])
    # a factory's real arguments are checked, not absorbed (the second call above); so are a built-in's
    with pytest.raises(RewardError, match=r"reward 'repetition' has no argument 'lang'; its arguments are \["):
        RewardSet([RewardSpec(name="repetition", args={"lang": "zh"})])


def test_bound_args_win_over_columns_and_strict_functions_get_only_what_they_name(folder):
    scores = score(folder, [{"name": f"{MODULE}:strict", "args": {"pattern": "x"}}], ["x", "y"],
                   {"pattern": ["y", "y"], "other": [1, 2]})
    assert scores.parts[f"{MODULE}:strict"] == [1.0, 0.0]


def test_trl_extras_log_metric_and_log_extra_reach_the_scores(folder):
    extras = {"completion_ids": [[1, 2], [3]], "trainer_state": trainer_state(10, 20)}
    scores = score(folder, [{"name": f"{MODULE}:needs_extras", "run_in": "process"}, {"name": f"{MODULE}:logs"}],
                   ["ab", "c"], extras=extras)
    assert scores.parts[f"{MODULE}:needs_extras"] == [12.0, 11.0]
    assert scores.logged_metrics == {f"{MODULE}:logs/judge_calls": 2.0}
    assert scores.logged_extra == {f"{MODULE}:logs/verdict": ["ok", "ok"]}


def test_a_reward_that_applies_to_no_row_warns_once_naming_the_columns(folder, caplog):
    specs = [RewardSpec(name="accuracy"), RewardSpec(name=f"{MODULE}:answers_none")]
    with caplog.at_level(logging.WARNING, logger="grpokit.rewards.rewardset"), RewardSet(specs, [folder]) as rewards:
        for _ in range(2):
            rewards.score(["p", "p"], ["1", "2"], {"solution": ["1", "2"], "id": [0, 1]})
    warned = [r.getMessage() for r in caplog.records if "returned None" in r.getMessage()]
    assert len(warned) == 2  # once per component, not once per batch
    assert "'accuracy'" in warned[0] and "the columns were ['id', 'solution']" in warned[0]
    assert "it reads ['answer'], which the data does not have" in warned[0] and "data.answer_field" in warned[0]
    assert "check that its columns hold what it expects" in warned[1]  # `solution` was there, but gave None


def test_values_are_numbers_or_missing(folder):
    import numpy as np

    from grpokit.rewards.component import clean_values

    assert clean_values([1, True, np.float32(0.5), np.nan, None, float("nan")], 6) == [1.0, 1.0, 0.5, None, None, None]
    with pytest.raises(RewardError, match=r"returned '1' \(str\); a reward value must be a number or None"):
        clean_values(["1"], 1)
