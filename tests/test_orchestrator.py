"""The reward set's kinds and failure isolation, and the orchestrator's math."""

import math
import threading

import pytest
import torch

from grpokit.config import RewardSpec
from grpokit.errors import RewardError
from grpokit.rewards import REWARDS, RewardOrchestrator, RewardSet, Stage, register
from grpokit.rewards.orchestrator import RunningStats


def _register_once(name, kind="completion"):
    def add(fn):
        if name not in REWARDS:
            register(name, kind)(fn)
        return REWARDS[name]
    return add


@_register_once("t_len")
def t_len(prompts, completions, **_):
    return [float(len(c)) for c in completions]


@_register_once("t_boom")
def t_boom(prompts, completions, **_):
    raise ZeroDivisionError("boom")


@_register_once("t_short")
def t_short(prompts, completions, **_):
    return [1.0]


@_register_once("t_group_rank", kind="group")
def t_group_rank(prompt, completions, answer=None, **_):
    """Group-level: 1 for the longest completion of the group, 0 for the others."""
    longest = max(len(c) for c in completions)
    return [float(len(c) == longest) for c in completions]


@_register_once("t_extras")
def t_extras(prompts, completions, completion_ids, trainer_state, **_):
    return [float(len(ids) + trainer_state.global_step) for ids in completion_ids]


@_register_once("t_thread")
def t_thread(prompts, completions, **_):
    return [float(threading.current_thread() is not threading.main_thread())] * len(completions)


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """A verl reward function, unchanged."""
    return {"score": float(solution_str.strip() == ground_truth), "acc": True}


def test_failures_are_isolated_and_reported():
    specs = [RewardSpec(name="t_len"), RewardSpec(name="t_boom"), RewardSpec(name="t_short")]
    scores = RewardSet(specs).score(["p", "p"], ["ab", "abc"], {})
    assert scores.parts["t_len"] == [2.0, 3.0]
    assert scores.parts["t_boom"] == [None, None] and "ZeroDivisionError: boom" in scores.errors["t_boom"]
    assert scores.parts["t_short"] == [None, None] and "returned 1 values for 2" in scores.errors["t_short"]
    assert set(scores.latency_s) == {"t_len", "t_boom", "t_short"}


def test_group_kind_sees_whole_groups_and_verl_kind_runs_unchanged():
    specs = [RewardSpec(name="t_group_rank"), RewardSpec(name="tests.test_orchestrator:compute_score", kind="verl")]
    completions = ["a", "abc", "ab", "x", "xy", "xy"]
    answers = ["abc"] * 3 + ["xy"] * 3
    scores = RewardSet(specs).score(["p"] * 6, completions, {"answer": answers}, group_size=3)
    assert scores.parts["t_group_rank"] == [0.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert scores.parts["tests.test_orchestrator:compute_score"] == [0.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_trl_extras_reach_functions_that_accept_them_and_rewards_run_in_workers():
    specs = [RewardSpec(name="t_extras"), RewardSpec(name="t_thread"), RewardSpec(name="t_len")]
    extras = {"completion_ids": [[1, 2], [3]], "trainer_state": type("S", (), {"global_step": 10})()}
    scores = RewardSet(specs).score(["p", "p"], ["ab", "c"], {}, extras=extras)
    assert scores.parts["t_extras"] == [12.0, 11.0]
    assert scores.parts["t_thread"] == [1.0, 1.0]


def test_running_stats_match_numpy_with_and_without_window():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    stats = RunningStats()
    stats.update(values[:3])
    stats.update(values[3:])
    mean, std = stats.mean_std()
    assert mean == pytest.approx(torch.tensor(values).mean().item())
    assert std == pytest.approx(torch.tensor(values).std().item())
    windowed = RunningStats(window=3)
    windowed.update(values)
    assert windowed.mean_std()[0] == pytest.approx((5 + 9 + 2) / 3)
    restored = RunningStats()
    restored.load_state_dict(stats.state_dict())
    assert restored.mean_std() == stats.mean_std()


def test_orchestrator_weights_missing_values_normalisation_and_clipping():
    orch = RewardOrchestrator({"a": 1.0, "b": 2.0}, clip=(-1.0, 3.0))
    total, metrics = orch.combine({"a": [1.0, None, 0.0], "b": [1.0, 0.5, None]}, step=0)
    # row 0: 1 + 2 = 3 (at the clip) ; row 1: missing a counts 0 -> 1.0 ; row 2: 0
    assert total.tolist() == [3.0, 1.0, 0.0] and metrics["curriculum/stage"] == 0.0
    big = RewardOrchestrator({"a": 1.0}, clip=(-10.0, 10.0))
    assert big.combine({"a": [50.0]}, 0)[0].tolist() == [10.0]

    norm = RewardOrchestrator({"a": 1.0, "b": 1.0}, normalize=True)
    total, metrics = norm.combine({"a": [0.0, 100.0], "b": [0.0, 1.0]}, step=0)
    # both z-scored with their own mean/std: each becomes -1/sqrt(2), +1/sqrt(2)
    z = 1 / math.sqrt(2)
    assert torch.allclose(total, torch.tensor([-2 * z, 2 * z]), atol=1e-4)
    assert metrics["rewards/a_norm"] == pytest.approx(0.0, abs=1e-6)


def test_curriculum_switches_weights_at_its_steps():
    orch = RewardOrchestrator({"task": 1.0, "fmt": 0.0, "len": 0.0}, curriculum=[
        Stage(1000, {"task": 0.7, "fmt": 0.2, "len": 0.1}), Stage(5000, {"task": 0.5, "fmt": 0.3, "len": 0.2})])
    parts = {"task": [1.0], "fmt": [1.0], "len": [1.0]}
    assert orch.combine(parts, 0)[0].item() == pytest.approx(1.0)
    assert orch.combine(parts, 999)[1]["curriculum/stage"] == 0.0
    total, metrics = orch.combine({"task": [1.0], "fmt": [0.0], "len": [0.0]}, 1000)
    assert total.item() == pytest.approx(0.7) and metrics["curriculum/stage"] == 1.0
    assert orch.combine({"task": [0.0], "fmt": [1.0], "len": [0.0]}, 7000)[0].item() == pytest.approx(0.3)
    with pytest.raises(RewardError, match="unknown rewards \\['nope'\\]"):
        RewardOrchestrator({"task": 1.0}, curriculum=[Stage(5, {"nope": 1.0})])


def test_consecutive_failures_stop_the_run_naming_the_reward():
    orch = RewardOrchestrator({"a": 1.0, "b": 1.0}, max_consecutive_failures=3)
    orch.record_failures({"a": "ValueError: x"})
    orch.record_failures({})  # a success resets the count
    orch.record_failures({"a": "ValueError: x"})
    orch.record_failures({"a": "ValueError: x"})
    with pytest.raises(RewardError, match="reward 'a' failed on 3 consecutive sampling rounds; last error: ValueError: x"):
        orch.record_failures({"a": "ValueError: x"})
    assert orch.state_dict()["failures"] == {"a": 3, "b": 0}
