"""Combining reward components so that none drowns the rest.

For each step the orchestrator:

1. picks the weights of the active curriculum stage (the last stage whose ``step`` is
   <= the current step; components a stage does not name get weight 0);
2. optionally z-scores each component with its running mean and variance (Welford's
   algorithm over every value seen, or over the last ``window`` values), so a reward in
   [0, 100] and one in [0, 1] contribute on the same scale;
3. sums ``weight * value`` over the components that apply (missing values count as 0,
   as TRL's nansum) and clips the total to ``clip`` (default [-10, 10]);
4. counts consecutive sampling rounds (a step has one, or up to 1 + max_sampling_rounds
   with dynamic sampling) on which a component failed, and stops the run with a clear
   error after ``max_consecutive_failures``.

Its state (running statistics, failure counts) is part of a checkpoint.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from grpokit.errors import RewardError


class RunningStats:
    """Mean and variance of a stream: Welford's update, or exact over a sliding window."""

    def __init__(self, window: int | None = None):
        self.window = window
        self.values: deque[float] = deque(maxlen=window) if window else deque()
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: list[float]) -> None:
        # a non-finite value would make the mean NaN for good (and be saved in every later checkpoint)
        for v in (v for v in values if math.isfinite(v)):
            if self.window:
                self.values.append(v)
                continue
            self.count += 1
            delta = v - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (v - self.mean)

    def mean_std(self) -> tuple[float, float]:
        if self.window:
            n = len(self.values)
            if n == 0:
                return 0.0, 1.0
            mean = sum(self.values) / n
            var = sum((v - mean) ** 2 for v in self.values) / (n - 1) if n > 1 else 0.0
            return mean, math.sqrt(var)
        var = self.m2 / (self.count - 1) if self.count > 1 else 0.0
        return self.mean, math.sqrt(var)

    def state_dict(self) -> dict:
        return {"values": list(self.values), "count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        numbers = [state["mean"], state["m2"], *state["values"]]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            raise RewardError("the checkpoint's running reward statistics are not finite (a reward returned inf "
                              "before grpokit refused such values); resume from an earlier checkpoint or start again")
        self.values = deque(state["values"], maxlen=self.window) if self.window else deque()
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


@dataclass(frozen=True)
class Stage:
    step: int
    weights: dict[str, float]


class RewardOrchestrator:
    def __init__(self, weights: dict[str, float], *, normalize: bool = False, window: int | None = None,
                 clip: tuple[float, float] = (-10.0, 10.0), curriculum: list[Stage] = (),
                 max_consecutive_failures: int = 3, eps: float = 1e-6):
        self.names = list(weights)
        self.stages = sorted([Stage(0, dict(weights)), *curriculum], key=lambda s: s.step)
        for stage in self.stages:
            unknown = set(stage.weights) - set(self.names)
            if unknown:
                raise RewardError(f"curriculum stage at step {stage.step} names unknown rewards {sorted(unknown)}; "
                                  f"the recipe's rewards are {self.names}")
        self.normalize, self.clip, self.eps = normalize, clip, eps
        self.stats = {name: RunningStats(window) for name in self.names}
        self.max_failures = max_consecutive_failures
        self.failures = dict.fromkeys(self.names, 0)

    def stage_at(self, step: int) -> tuple[int, Stage]:
        index = max(i for i, s in enumerate(self.stages) if s.step <= step)
        return index, self.stages[index]

    def combine(self, parts: dict[str, list[float | None]], step: int, update: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        """Total reward ``[N]`` and metrics: raw and normalised mean per component, the stage."""
        index, stage = self.stage_at(step)
        n = len(next(iter(parts.values())))
        total_N = torch.zeros(n)
        metrics: dict[str, float] = {"curriculum/stage": float(index)}
        for name in self.names:
            values_N = torch.tensor([math.nan if v is None else v for v in parts[name]], dtype=torch.float32)
            present_N = ~torch.isnan(values_N)
            if update and self.normalize and present_N.any():
                self.stats[name].update(values_N[present_N].tolist())
            if self.normalize:
                mean, std = self.stats[name].mean_std()
                values_N = (values_N - mean) / (std + self.eps) if std > 0 else values_N - mean
                if present_N.any():
                    metrics[f"rewards/{name}_norm"] = values_N[present_N].mean().item()
            total_N += stage.weights.get(name, 0.0) * torch.nan_to_num(values_N, nan=0.0)
        return total_N.clamp(*self.clip), metrics

    def record_failures(self, errors: dict[str, str]) -> None:
        """Count sampling rounds on which a component failed; too many in a row stop the run."""
        for name in self.names:
            self.failures[name] = self.failures[name] + 1 if name in errors else 0
            if self.failures[name] >= self.max_failures:
                raise RewardError(f"reward {name!r} failed on {self.failures[name]} consecutive sampling rounds; "
                                  f"last error: {errors[name]}. Fix the reward function or remove it from the recipe.")

    def state_dict(self) -> dict:
        return {"stats": {k: s.state_dict() for k, s in self.stats.items()}, "failures": dict(self.failures)}

    def load_state_dict(self, state: dict) -> None:
        for name, stats in state["stats"].items():
            self.stats[name].load_state_dict(stats)
        self.failures.update(state["failures"])
