"""Scoring completions with every reward component, isolated from each other's failures.

Each component runs where it is safe (``placement.py``): thread-safe built-ins concurrently
in a thread pool, user functions on the main thread as TRL calls them, or in a worker
process; each call has a timeout and its latency is measured. A component that raises,
times out or returns a list of the wrong length does not stop the step: its values for
that batch become missing (``None``), the error is reported, and the other components still
count. The orchestrator decides when repeated failure is fatal.

A component that returns ``None`` for every row of a batch (it applies to nothing: often a
column it reads has another name in the data) is reported once per run, with the columns it
got and the ones it names.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from statistics import mean
from types import SimpleNamespace
from typing import Any

from grpokit.rewards.component import MAX_REWARD, TRL_EXTRAS, CallLog, Outcome, RewardComponent, completion_text
from grpokit.rewards.orchestrator import RewardOrchestrator
from grpokit.rewards.placement import ProcessWorker, RewardTimeout, call_in_thread, call_on_main_thread

log = logging.getLogger(__name__)
__all__ = ["RewardSet", "Scores", "as_completions", "columns_of", "completion_text", "trainer_state"]


def columns_of(rows: list[dict]) -> dict[str, list]:
    """Dataset columns other than the prompt, as lists aligned with ``rows`` (TRL's kwargs)."""
    keys = sorted({k for row in rows for k in row if k != "prompt"})
    return {k: [row.get(k) for row in rows] for k in keys}


def as_completions(prompts: list, texts: list[str]) -> list:
    """TRL's convention: conversational prompts get completions as assistant message lists."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def trainer_state(step: int, max_steps: int) -> SimpleNamespace:
    """TRL's ``trainer_state`` as reward functions read it (``.global_step``, ``.max_steps``)."""
    return SimpleNamespace(global_step=step, max_steps=max_steps)


@dataclass
class Scores:
    """Raw values per component (``None`` = missing), latency in seconds, failures, and what the
    functions logged through TRL's ``log_metric`` (mean per name) and ``log_extra`` (columns)."""

    parts: dict[str, list[float | None]]
    latency_s: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    logged_metrics: dict[str, float] = field(default_factory=dict)
    logged_extra: dict[str, list] = field(default_factory=dict)


class RewardSet:
    """Every component of a recipe, each run where it is safe; ``close()`` (or ``with``) ends its workers."""

    def __init__(self, specs: list, search_path: list[str] = ()):
        self.components = [RewardComponent(s, search_path) for s in specs]
        self.workers = {c.name: ProcessWorker(c.spec, search_path) for c in self.components if c.run_in == "process"}
        self._search_path = list(search_path)
        self._warned_inapplicable: set[str] = set()

    @classmethod
    def from_recipe(cls, recipe) -> "RewardSet":
        """The recipe's rewards, with its ``python_path`` (the recipe's folder first) searched for user modules."""
        return cls(recipe.rewards, recipe.python_path)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.components]

    @property
    def weights(self) -> dict[str, float]:
        return {c.name: c.weight for c in self.components}

    def _worker(self, component: RewardComponent) -> ProcessWorker:
        # a main-thread component scored from another thread cannot be signalled there: it gets a process
        if component.name not in self.workers:
            self.workers[component.name] = ProcessWorker(component.spec, self._search_path)
        return self.workers[component.name]

    def score(self, prompts: list, completions: list, columns: dict[str, list], group_size: int = 1,
              extras: dict[str, Any] | None = None) -> Scores:
        """Score N completions; ``extras`` (TRL's completion_ids, trainer_state) reach functions that accept them."""
        payload = (prompts, completions, {**columns, **(extras or {})}, group_size)
        on_main = threading.current_thread() is threading.main_thread()
        placement = {c.name: ("process" if c.run_in == "main" and not on_main else c.run_in) for c in self.components}
        started, pending, latency = {}, {}, {}  # pending: a Future (thread) or the error that kept it from starting
        for component in self.components:  # start the concurrent ones first, so they overlap the main-thread ones
            where, started[component.name] = placement[component.name], time.perf_counter()
            try:
                if where == "thread":
                    pending[component.name] = call_in_thread(component, payload)
                elif where == "process":
                    self._worker(component).send(payload)
            except Exception as exc:  # a worker that cannot start fails this batch, like a raising reward
                pending[component.name] = exc
        outcomes: dict[str, Outcome | BaseException] = {}
        for component in self.components:
            name, where = component.name, placement[component.name]
            if isinstance(pending.get(name), BaseException):
                outcomes[name], latency[name] = pending[name], 0.0
                continue
            try:
                if where == "main":
                    outcomes[name] = call_on_main_thread(lambda c=component: c(*payload), component.timeout_s)
                elif where == "process":
                    outcomes[name] = self.workers[name].result(component.timeout_s)
                else:
                    waited = time.perf_counter() - started[name]
                    outcomes[name] = pending[name].result(timeout=max(0.0, component.timeout_s - waited))
            except FutureTimeout:
                outcomes[name] = RewardTimeout(f"timed out after {component.timeout_s:g} s (the call goes on in "
                                               "its thread; its values for this batch are missing)")
            except (Exception, RewardTimeout, SystemExit) as exc:  # isolate: a broken reward must not stop the step
                outcomes[name] = exc
            latency[name] = time.perf_counter() - started[name]
        return self._collect(outcomes, latency, columns, len(completions))

    def _collect(self, outcomes: dict, latency: dict[str, float], columns: dict[str, list], n: int) -> Scores:
        scores = Scores(parts={}, latency_s=latency)
        for component in self.components:
            name, outcome = component.name, outcomes[component.name]
            if isinstance(outcome, BaseException):
                prompt_id = columns.get("id", [None])[0] if "id" in columns else 0
                scores.errors[name] = f"{type(outcome).__name__}: {outcome}"
                scores.parts[name] = [None] * n
                log.warning("reward %r failed on this batch (first prompt id %s): %s", name, prompt_id,
                            scores.errors[name])
                continue
            scores.parts[name] = outcome.values
            if outcome.unusable:
                log.warning("reward %r returned %d non-finite or out-of-range value(s) (e.g. %r; |value| must be <= "
                            "%g); they count as missing", name, len(outcome.unusable), outcome.unusable[0], MAX_REWARD)
            scores.latency_s[name] = outcome.seconds  # the call itself, not the wait behind other components
            self._merge_log(scores, name, outcome.log)
            if n and all(v is None for v in outcome.values):
                self._warn_inapplicable(component, columns)
        return scores

    @staticmethod
    def _merge_log(scores: Scores, name: str, logged: CallLog) -> None:
        scores.logged_metrics.update({f"{name}/{key}": mean(values) for key, values in logged.metrics.items() if values})
        scores.logged_extra.update({f"{name}/{key}": values for key, values in logged.extra.items()})

    def _warn_inapplicable(self, component: RewardComponent, columns: dict[str, list]) -> None:
        if component.name in self._warned_inapplicable:
            return
        self._warned_inapplicable.add(component.name)
        have = sorted(k for k in columns if k not in TRL_EXTRAS)
        lacking = [c for c in component.named_columns if c not in columns]
        hint = (f"it reads {lacking}, which the data does not have; rename the column (data.answer_field for "
                "`answer`) or pass the right one" if lacking else "check that its columns hold what it expects")
        log.warning("reward %r returned None (does not apply) for every completion of a batch, so it teaches nothing: "
                    "the columns were %s; %s. Reported once per run.", component.name, have, hint)

    def __call__(self, prompts: list, completions: list, columns: dict[str, list], group_size: int = 1,
                 extras: dict[str, Any] | None = None):
        """Weighted sum of raw values and the parts, for evaluation (no normalisation, no state)."""
        scores = self.score(prompts, completions, columns, group_size, extras)
        total_N, _ = RewardOrchestrator(self.weights).combine(scores.parts, step=0, update=False)
        return total_N, scores.parts

    def close(self) -> None:
        for worker in self.workers.values():
            worker.close()

    def __enter__(self) -> "RewardSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def completions_of(episodes: list | None, prompts: list, texts: list[str]) -> list:
    """What reward functions receive as completions. One turn: TRL's convention (``as_completions``).
    A multi-turn episode: its messages (the policy's turns and the observations between them, as TRL
    passes a tool-calling completion), so ``completion_text`` reads the final turn."""
    plain = as_completions(prompts, texts)
    if episodes is None:
        return plain
    return [episode["messages"] if episode else single for episode, single in zip(episodes, plain)]


def episode_columns(episodes: list | None) -> dict[str, list]:
    """Columns a trajectory reward may ask for, one value per completion: ``trajectory`` (messages, steps
    with action / observation / reward / done / info, how it ended), ``step_rewards`` and
    ``episode_reward`` (the environment's own); none for one-turn rollouts."""
    if episodes is None:
        return {}
    return {"trajectory": list(episodes),
            "step_rewards": [[s["reward"] for s in e["steps"]] if e else [] for e in episodes],
            "episode_reward": [e["episode_reward"] if e else None for e in episodes]}
