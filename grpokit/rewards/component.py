"""One recipe reward, bound and callable: the function, its kind, where it runs, its arguments.

A component is built the same way wherever it runs (the trainer's threads, its main thread,
or a worker process that rebuilds it from the recipe's spec), so a factory is called, and
``args`` are checked, in exactly one place.

Arguments and columns share the keyword namespace of TRL's contract. Here:

- ``args`` are checked against the function: a built-in (or any function without
  ``**kwargs``) refuses an argument it does not name, instead of silently absorbing it;
- a dataset column never overrides a bound argument of the same name;
- TRL's per-call extras (``completion_ids``, ``trainer_state``, ``log_metric``,
  ``log_extra``) reach functions that name them or take ``**kwargs``.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, SupportsFloat

from grpokit.errors import RewardError
from grpokit.rewards.registry import RUN_IN, kind_of, resolve_reward, run_in_of

BATCH_EXTRAS = ("completion_ids", "trainer_state")  # what the trainer knows of the batch
LOGGERS = ("log_metric", "log_extra")  # callables a function reports through
TRL_EXTRAS = BATCH_EXTRAS + LOGGERS
POSITIONAL = ("prompts", "completions", "prompt")


def completion_text(completion: Any) -> str:
    """Text of a completion in TRL's standard (string) or conversational (message list) form."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    if isinstance(completion, list) and not completion:
        return ""
    raise RewardError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


MAX_REWARD = 1e30  # far from float32's 3.4e38, so weighted sums and running variances stay finite


class Unusable(float):
    """Marks a value that was a number but not a usable one (inf, or beyond MAX_REWARD)."""


def _as_value(value: Any) -> float | None:
    """A reward value as a float; ``None`` and NaN (Python's or NumPy's) are missing; a bool is 0/1
    as TRL's float tensor makes it; a string is refused rather than read as a number; an infinite
    or huge value is missing too (one inf would make the running normaliser NaN for good)."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (numbers.Real, SupportsFloat)):
        raise RewardError(f"returned {value!r} ({type(value).__name__}); a reward value must be a number or None")
    value = float(value)
    if math.isnan(value):
        return None
    return value if abs(value) <= MAX_REWARD else Unusable(value)


def clean_values(values: Any, expected: int) -> list[float | None]:
    """The values as floats or None; an unusable one is None here and counted by ``unusable_count``."""
    if not isinstance(values, (list, tuple)) or len(values) != expected:
        got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
        raise RewardError(f"returned {got} values for {expected} completions")
    return [_as_value(v) for v in values]


def split_unusable(values: list) -> tuple[list[float | None], list[float]]:
    """``(values with unusable ones as None, the unusable ones)``."""
    return [None if isinstance(v, Unusable) else v for v in values], [float(v) for v in values if isinstance(v, Unusable)]


@dataclass
class CallLog:
    """What a function reported through TRL's ``log_metric(name, value)`` and ``log_extra(column, values)``."""

    metrics: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, list] = field(default_factory=dict)

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(str(name), []).append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        # kept for samples.jsonl: anything that is not a JSON scalar is written as its text
        self.extra[str(column)] = [v if v is None or isinstance(v, (str, int, float, bool)) else str(v) for v in values]


@dataclass
class Outcome:
    """A component's values for one batch, with what it logged and how long the call took where it ran."""

    values: list[float | None]
    log: CallLog
    seconds: float = 0.0
    unusable: list[float] = field(default_factory=list)  # inf / huge values, dropped to None


def _parameters(fn) -> tuple[bool, set[str]]:
    """(takes ``**kwargs``, the names it takes by keyword)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable: assume TRL's open signature
        return True, set()
    accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    return accepts_all, {p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


class RewardComponent:
    """One recipe reward, from its spec (a ``RewardSpec``): resolved, built, arguments checked."""

    def __init__(self, spec, search_path: list[str] = ()):
        self.spec, self.name, self.weight = spec, spec.name, spec.weight
        self.timeout_s = float(getattr(spec, "timeout_s", 120.0))
        args = dict(spec.args)
        target = resolve_reward(spec.name, list(search_path))
        # a factory (spec.factory), or a built-in that keeps state across calls (curiosity): built once per run
        if getattr(spec, "factory", False) or getattr(target, "grpokit_factory", False):
            target, args = self._build(target, args), {}
        prepare = getattr(target, "grpokit_prepare", None)
        if prepare is not None:  # e.g. the code sandbox probes and logs its protections at start
            prepare()
        self.kind = spec.kind or kind_of(target)
        run_in = getattr(spec, "run_in", "auto")
        self.run_in = run_in_of(target) if run_in == "auto" else run_in
        if self.run_in not in RUN_IN:
            raise RewardError(f"reward {spec.name!r}: run_in must be auto or one of {RUN_IN}, not {self.run_in!r}")
        self.accepts_all, self.accepted = _parameters(target)
        self._check_args(target, args)
        self.bound = set(args)
        self.fn = functools.partial(target, **args) if args else target
        # the columns a function names itself (e.g. accuracy's `answer`, open-r1's `solution`): when it
        # applies to no row, the warning says which of them the data lacked
        self.named_columns = sorted(self.accepted - self.bound - set(POSITIONAL) - set(TRL_EXTRAS)
                                    - {"data_source", "solution_str", "ground_truth", "extra_info"})

    def _build(self, factory, args: dict[str, Any]):
        """Call a factory (``get_cosine_scaled_reward(max_len=...)``) once; it must return the reward."""
        try:
            built = factory(**args)
        except TypeError as exc:
            raise RewardError(f"reward factory {self.name!r} cannot be called with args {args}: {exc}") from None
        except (Exception, SystemExit) as exc:  # user code: say which factory failed and how
            raise RewardError(f"reward factory {self.name!r} failed: {type(exc).__name__}: {exc}") from None
        if not callable(built):
            raise RewardError(f"reward {self.name!r} has factory: true but returned {type(built).__name__}, not a "
                              "function; drop factory: true if the name is the reward function itself")
        return built

    def _check_args(self, fn, args: dict[str, Any]) -> None:
        """A built-in names every argument it supports; a user function without ``**kwargs`` too."""
        if self.accepts_all and not getattr(fn, "grpokit_builtin", False):
            return  # TRL style: **kwargs may read anything
        unknown = sorted(set(args) - (self.accepted - set(POSITIONAL)))
        if unknown:
            supported = sorted(self.accepted - set(POSITIONAL) - set(TRL_EXTRAS) - {"answer"})
            raise RewardError(f"reward {self.name!r} has no argument {', '.join(map(repr, unknown))}; its "
                              f"arguments are {supported or 'none'} (rewards.args is passed to the function)")

    def _kwargs(self, columns: dict[str, Any]) -> dict[str, Any]:
        if self.accepts_all:
            return {k: v for k, v in columns.items() if k not in self.bound}
        return {k: v for k, v in columns.items() if k in self.accepted and k not in self.bound}

    def __call__(self, prompts: list, completions: list, columns: dict[str, list], group_size: int) -> Outcome:
        t0, log = time.perf_counter(), CallLog()
        values, unusable = split_unusable(self._values(prompts, completions, columns, group_size, log))
        return Outcome(values, log, time.perf_counter() - t0, unusable)

    def _values(self, prompts: list, completions: list, columns: dict[str, list], group_size: int,
                log: CallLog) -> list[float | None]:
        columns = {**columns, "log_metric": log.log_metric, "log_extra": log.log_extra}
        if self.kind == "completion":
            # TRL passes prompts= to every function; one that does not take them still gets its completions
            given = {"prompts": prompts} if self.accepts_all or "prompts" in self.accepted else {}
            values = clean_values(self.fn(completions=completions, **given, **self._kwargs(columns)), len(completions))
        elif self.kind == "group":
            values = []
            for start in range(0, len(completions), group_size):
                row = {k: (v if k in LOGGERS else v[start]) for k, v in columns.items()
                       if k not in BATCH_EXTRAS}
                group = completions[start:start + group_size]
                values += clean_values(self.fn(prompts[start], group, **self._kwargs(row)), len(group))
        else:
            values = [self._verl_one(c, {k: v[i] for k, v in columns.items() if k not in LOGGERS})
                      for i, c in enumerate(completions)]
        return values

    def _verl_one(self, completion: Any, row: dict[str, Any]) -> float | None:
        """verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)``."""
        extra = {k: v for k, v in row.items() if k not in ("data_source", "answer", *TRL_EXTRAS)}
        score = self.fn(data_source=row.get("data_source", "grpokit"), solution_str=completion_text(completion),
                        ground_truth=row.get("answer"), extra_info=extra)
        score = score.get("score") if isinstance(score, dict) else score
        return _as_value(score)
