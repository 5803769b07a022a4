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

import importlib
import sys
from pathlib import Path
from typing import Callable, Literal

from grpokit.errors import RewardError

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
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise RewardError(
            f"unknown reward {name!r}; registered rewards are {sorted(REWARDS)}, "
            "or name your own as 'package.module:function'"
        )
    return import_function(name, "reward", RewardError, search_path)


def extend_import_path(folders) -> list[str]:
    """Append ``folders`` (and the working directory) to ``sys.path`` where missing: a user's module
    beside the recipe imports as a script's sibling would. Appended, not prepended, so a user file
    named like an installed package (``datasets.py``) cannot shadow it. Returns the folders searched."""
    wanted = [str(Path(f).resolve()) for f in (*folders, Path.cwd())]
    for folder in dict.fromkeys(wanted):
        if folder not in sys.path:
            sys.path.append(folder)
    return list(dict.fromkeys(wanted))


def import_function(name: str, what: str, error: type[Exception], search_path: list[str] = ()) -> Callable:
    """The function ``package.module:function`` names; every failure is ``error`` saying what failed
    and, for a module not found, where it was looked for."""
    module_name, _, attr = name.partition(":")
    searched = extend_import_path(search_path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):  # the named module itself, not one it imports
            raise error(f"{what} {name!r}: no module {module_name!r} in the installed packages or in the folders "
                        f"searched ({', '.join(searched)}); put {module_name.replace('.', '/')}.py beside the recipe "
                        "(its folder is searched first) or in a folder listed in python_path") from None
        raise error(f"{what} {name!r}: module {module_name!r} imports {exc.name!r}, which is not installed "
                    f"({exc})") from None
    except (Exception, SystemExit) as exc:  # an import can fail in any way (sys.exit too); report it, do not crash
        raise error(f"{what} {name!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise error(f"{what} {name!r}: module {module_name!r} has no function {attr!r} "
                    f"(the module is {getattr(module, '__file__', None) or 'built in'})")
    return fn
