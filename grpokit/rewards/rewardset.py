"""The weighted sum of a recipe's reward components, with each component kept for logging."""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any

import torch

from grpokit.errors import RewardError
from grpokit.rewards.registry import resolve_reward


def completion_text(completion: Any) -> str:
    """Text of a completion in TRL's standard (string) or conversational (message list) form."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    raise RewardError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")


class RewardComponent:
    """One recipe reward: the resolved function with its args bound, and its weight."""

    def __init__(self, name: str, weight: float, args: dict[str, Any]):
        self.name, self.weight = name, weight
        fn = resolve_reward(name)
        self.fn = functools.partial(fn, **args) if args else fn
        params = inspect.signature(fn).parameters.values()
        # TRL passes every column; a function without **kwargs gets only what it names
        self.accepts_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
        self.accepted = {p.name for p in params}

    def __call__(self, prompts: list, completions: list, columns: dict[str, list]) -> list[float | None]:
        kwargs = columns if self.accepts_all else {k: v for k, v in columns.items() if k in self.accepted}
        try:
            values = self.fn(prompts=prompts, completions=completions, **kwargs)
        except Exception as exc:
            raise RewardError(f"reward {self.name!r} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            raise RewardError(f"reward {self.name!r} must return one value per completion ({len(completions)})")
        return [None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]


class RewardSet:
    """Score completions with every component; the total is the weighted sum over applicable ones."""

    def __init__(self, specs: list):
        self.components = [RewardComponent(s.name, s.weight, dict(s.args)) for s in specs]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    def __call__(self, prompts: list, completions: list, columns: dict[str, list]) -> tuple[torch.Tensor, dict[str, list]]:
        """Return ``(total_N, parts)``; ``parts[name]`` is the raw per-completion list (None kept)."""
        parts = {c.name: c(prompts, completions, columns) for c in self.components}
        total_N = torch.zeros(len(completions))  # [N]
        for component in self.components:
            values = parts[component.name]
            # None = "does not apply": contributes nothing, as TRL's nansum does
            total_N += component.weight * torch.tensor([0.0 if v is None else v for v in values])
        return total_N, parts
