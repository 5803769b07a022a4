"""Rewards by name: built-ins register here; a recipe may also name ``package.module:function``."""

from __future__ import annotations

import importlib
from typing import Callable

from grpokit.errors import RewardError

RewardFn = Callable[..., list]
REWARDS: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register a reward under ``name``; a second function with the same name is an error."""

    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise RewardError(f"reward {name!r} is registered twice ({REWARDS[name].__module__} and {fn.__module__})")
        REWARDS[name] = fn
        return fn

    return add


def resolve_reward(name: str) -> RewardFn:
    """Return the function a recipe names: a registered name or ``package.module:function``."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise RewardError(
            f"unknown reward {name!r}; registered rewards are {sorted(REWARDS)}, "
            "or name your own as 'package.module:function'"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an import can fail in any way; report it, do not crash
        raise RewardError(f"reward {name!r}: cannot import module {module_name!r} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"reward {name!r}: module {module_name!r} has no function {attr!r}")
    return fn
