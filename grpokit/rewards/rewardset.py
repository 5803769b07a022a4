"""Scoring completions with every reward component, isolated from each other's failures.

Components run concurrently in a thread pool (rewards are mostly I/O, regexes, or
subprocesses, which release the GIL); each one's latency is measured. A component that
raises or returns a list of the wrong length does not stop the step: its values for
that batch become missing (``None``), the error is reported once, and the other
components still count. The orchestrator decides when repeated failure is fatal.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from grpokit.errors import RewardError
from grpokit.rewards.orchestrator import RewardOrchestrator
from grpokit.rewards.registry import kind_of, resolve_reward

log = logging.getLogger(__name__)
TRL_EXTRAS = ("completion_ids", "trainer_state")


def completion_text(completion: Any) -> str:
    """Text of a completion in TRL's standard (string) or conversational (message list) form."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, list) and not completion:
        return ""
    raise RewardError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


def _clean(values: Any, expected: int) -> list[float | None]:
    if not isinstance(values, (list, tuple)) or len(values) != expected:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"returned {got} values for {expected} completions")
    return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]


class RewardComponent:
    """One recipe reward: the resolved function, its kind, its bound args and its weight."""

    def __init__(self, name: str, weight: float, args: dict[str, Any], kind: str | None = None):
        self.name, self.weight = name, weight
        fn = resolve_reward(name)
        self.kind = kind or kind_of(fn)
        self.fn = functools.partial(fn, **args) if args else fn
        prepare = getattr(fn, "grpokit_prepare", None)
        if prepare is not None:  # e.g. the code sandbox probes and logs its protections at start
            prepare()
        params = inspect.signature(fn).parameters.values()
        # TRL passes every column; a function without **kwargs gets only what it names
        self.accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        self.accepted = {p.name for p in params}

    def _kwargs(self, columns: dict[str, Any]) -> dict[str, Any]:
        return columns if self.accepts_all else {k: v for k, v in columns.items() if k in self.accepted}

    def __call__(self, prompts: list, completions: list, columns: dict[str, list], group_size: int) -> list[float | None]:
        if self.kind == "completion":
            return _clean(self.fn(prompts=prompts, completions=completions, **self._kwargs(columns)), len(completions))
        if self.kind == "group":
            values = []
            for start in range(0, len(completions), group_size):
                row = {k: v[start] for k, v in columns.items() if k not in TRL_EXTRAS}
                group = completions[start:start + group_size]
                values += _clean(self.fn(prompts[start], group, **self._kwargs(row)), len(group))
            return values
        return [self._verl_one(c, {k: v[i] for k, v in columns.items()}) for i, c in enumerate(completions)]

    def _verl_one(self, completion: Any, row: dict[str, Any]) -> float | None:
        """verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)``."""
        extra = {k: v for k, v in row.items() if k not in ("data_source", "answer", *TRL_EXTRAS)}
        score = self.fn(data_source=row.get("data_source", "grpokit"), solution_str=completion_text(completion),
                        ground_truth=row.get("answer"), extra_info=extra)
        score = score.get("score") if isinstance(score, dict) else score
        return None if score is None else float(score)


@dataclass
class Scores:
    """Raw values per component (``None`` = missing), latency in seconds, and failures."""

    parts: dict[str, list[float | None]]
    latency_s: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


class RewardSet:
    """Every component of a recipe, scored concurrently."""

    def __init__(self, specs: list, max_workers: int = 8):
        self.components = [RewardComponent(s.name, s.weight, dict(s.args), getattr(s, "kind", None)) for s in specs]
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(self.components))),
                                        thread_name_prefix="reward")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    @property
    def weights(self) -> dict[str, float]:
        return {c.name: c.weight for c in self.components}

    def score(self, prompts: list, completions: list, columns: dict[str, list], group_size: int = 1,
              extras: dict[str, Any] | None = None) -> Scores:
        """Score N completions; ``extras`` (TRL's completion_ids, trainer_state) reach functions that accept them."""
        columns = {**columns, **(extras or {})}

        def run(component: RewardComponent):
            t0 = time.perf_counter()
            try:
                return component(prompts, completions, columns, group_size), None, time.perf_counter() - t0
            except Exception as exc:  # isolate: one broken reward must not stop the step
                return [None] * len(completions), f"{type(exc).__name__}: {exc}", time.perf_counter() - t0

        scores = Scores(parts={})
        for component, (values, error, seconds) in zip(self.components, self._pool.map(run, self.components)):
            scores.parts[component.name] = values
            scores.latency_s[component.name] = seconds
            if error:
                prompt_id = columns.get("id", [None])[0] if "id" in columns else 0
                scores.errors[component.name] = error
                log.warning("reward %r failed on this batch (first prompt id %s): %s", component.name, prompt_id, error)
        return scores

    def __call__(self, prompts: list, completions: list, columns: dict[str, list], group_size: int = 1):
        """Weighted sum of raw values and the parts, for evaluation (no normalisation, no state)."""
        scores = self.score(prompts, completions, columns, group_size)
        total_N, _ = RewardOrchestrator(self.weights).combine(scores.parts, step=0, update=False)
        return total_N, scores.parts
