"""Rewards by name: built-ins register here; a recipe may also name ``package.module:function``.

Three kinds of reward function, all usable from a recipe:

- ``completion`` (TRL's signature): ``fn(prompts, completions, **columns) -> list[float | None]``,
  one value per completion; ``columns`` are the dataset's other fields, plus TRL's extra
  keyword arguments ``completion_ids`` and ``trainer_state`` for functions that accept them.
- ``group``: sees one prompt's whole group of G completions at once (e.g. a diversity
  bonus): ``fn(prompt, completions, **row) -> list[float | None]`` of length G, where
  ``row`` holds that prompt's columns as single values.
- ``verl``: verl's ``compute_score(data_source, solution_str, ground_truth, extra_info)
  -> float | dict``, called once per completion (a dict's ``"score"`` is the reward).

Built-ins declare their kind with ``register(name, kind=...)``; a user function declares
it with the ``group_reward`` / ``verl_reward`` decorators or the recipe's ``kind`` key.

Where a function runs (``grpokit/rewards/placement.py``) is declared the same way: built-ins
say ``register(name, run_in="thread")`` when they are thread-safe and bounded in time (the
default for built-ins), ``run_in="main"`` when they need the main thread (math-verify's
timeout is a ``signal.alarm``); a user function runs on the main thread, as TRL calls it,
unless it is marked ``@thread_safe`` or the recipe sets ``run_in``.
"""

from __future__ import annotations

from typing import Callable, Literal

from grpokit.errors import RewardError
from grpokit.imports import resolve_name

RewardFn = Callable[..., list]
Kind = Literal["completion", "group", "verl"]
KINDS = ("completion", "group", "verl")
RunIn = Literal["thread", "main", "process"]
RUN_IN = ("thread", "main", "process")
REWARDS: dict[str, RewardFn] = {}


def _mark(fn: RewardFn, kind: Kind) -> RewardFn:
    if kind not in KINDS:
        raise RewardError(f"reward kind must be one of {KINDS}, not {kind!r}")
    fn.grpokit_kind = kind  # type: ignore[attr-defined]
    return fn


def group_reward(fn: RewardFn) -> RewardFn:
    """Mark a user function as a group-level reward."""
    return _mark(fn, "group")


def verl_reward(fn: RewardFn) -> RewardFn:
    """Mark a user function as a verl ``compute_score`` function."""
    return _mark(fn, "verl")


def thread_safe(fn: RewardFn) -> RewardFn:
    """Mark a user function as safe to call from a worker thread, concurrently with other rewards."""
    fn.grpokit_run_in = "thread"  # type: ignore[attr-defined]
    return fn


def kind_of(fn: RewardFn) -> Kind:
    return getattr(fn, "grpokit_kind", "completion")


def run_in_of(fn: RewardFn) -> RunIn:
    """Where ``fn`` runs unless the recipe says otherwise: as declared, else the main thread (TRL's choice)."""
    return getattr(fn, "grpokit_run_in", "main")


def register(name: str, kind: Kind = "completion", run_in: RunIn = "thread") -> Callable[[RewardFn], RewardFn]:
    """Register a reward under ``name``; a second function with the same name is an error."""
    if run_in not in RUN_IN:
        raise RewardError(f"run_in must be one of {RUN_IN}, not {run_in!r}")

    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise RewardError(f"reward {name!r} is registered twice ({REWARDS[name].__module__} and {fn.__module__})")
        REWARDS[name] = _mark(fn, kind)
        fn.grpokit_run_in = run_in  # type: ignore[attr-defined]
        fn.grpokit_builtin = True  # type: ignore[attr-defined]
        return fn

    return add


def resolve_reward(name: str, search_path: list[str] = ()) -> RewardFn:
    """Return the function a recipe names: a registered name or ``package.module:function``."""
    return resolve_name(name, REWARDS, "reward", RewardError,
                        f"unknown reward {name!r}; registered rewards are {sorted(REWARDS)}, "
                        "or name your own as 'package.module:function'", search_path)


