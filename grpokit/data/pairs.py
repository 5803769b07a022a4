"""Preference pairs from episodes, in TRL's conversational format for DPO-style trainers.

Every pair is ``{"prompt": [messages], "chosen": [assistant], "rejected": [assistant]}``
plus provenance (``source``, ``episode_chosen``, ``episode_rejected``, ``step``: the
chosen side's step index). Three ways to decide which action is better:

- ``pairs_from_runs``: two runs of the same tasks; the better episode's action wins
  wherever the two runs saw the same observation and acted differently.
- ``pairs_from_feedback``: human scores for recorded (or alternative) actions; every
  higher-vs-lower pair of candidates for the same observation.
- ``pairs_from_comparator``: a function ranks episodes of the same instruction; the
  preferred episode's actions beat the other's at the observations both saw.

Steps are matched by observation: the k-th step showing observation X in one episode
is matched with the k-th step showing X in the other (X is the observation text, or the
image path of an image-only observation; a step with neither never matches). The
prompt is built from the chosen side's episode (``step_messages``); ``history``
defaults to 0 because the instruction and the current observation are the only context
both sides are known to share.

Pairs whose chosen and rejected texts are identical are dropped, and so are repeats of
a pair already made (same prompt, images, chosen and rejected); both are counted.

When the chosen step's observation has a screenshot, the pair carries it as ``images``
(``episodes.step_images``: an absolute path; TRL's DPO format for vision models), placed as
TRL places it, before the user message's text; in a file where some pairs have an image,
the others carry ``images: []``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

from pydantic import BaseModel, ValidationError

from grpokit.data.episodes import (
    STRICT, Converted, Episode, Step, images_column, read_json_objects, render_action, step_images, step_messages,
    validation_message,
)
from grpokit.data.chat import as_chat, check_messages
from grpokit.data.images import count_placeholders, with_checked_images
from grpokit.errors import DataError
from grpokit.imports import resolve_name

Comparator = Callable[[Episode, Episode], int]


def observation_key(step: Step) -> tuple[str, str] | None:
    """What two steps must share to be 'the same observation'."""
    obs = step.observation
    if obs.text is not None:
        return ("text", obs.text)
    return ("image", obs.image_path) if obs.image_path is not None else None


def match_steps(a: Episode, b: Episode) -> list[tuple[Step, Step]]:
    """Steps of ``a`` and ``b`` with the same observation: k-th occurrence with k-th occurrence, in ``a``'s order."""
    in_b: dict[tuple, list[Step]] = defaultdict(list)
    for step in b.steps:
        key = observation_key(step)
        if key is not None:
            in_b[key].append(step)
    used: dict[tuple, int] = defaultdict(int)
    matched = []
    for step in a.steps:
        key = observation_key(step)
        if key is not None and used[key] < len(in_b[key]):
            matched.append((step, in_b[key][used[key]]))
            used[key] += 1
    return matched


def _candidate(chosen: Episode, chosen_step: Step, chosen_text: str, rejected: Episode, rejected_text: str,
               source: str, history: int, system: str | None) -> dict:
    return {"prompt": step_messages(chosen, chosen_step.index, history, system),
            "chosen": [{"role": "assistant", "content": chosen_text}],
            "rejected": [{"role": "assistant", "content": rejected_text}],
            "source": source, "episode_chosen": chosen.episode_id, "episode_rejected": rejected.episode_id,
            "step": chosen_step.index, "images": step_images(chosen, chosen_step)}


def _finish(candidates: Iterable[dict], skipped: dict[str, int]) -> Converted:
    """Drop pairs with identical texts and repeats of an earlier pair; count both."""
    skipped.update(identical=0, duplicate=0)
    rows, seen = [], set()
    for pair in candidates:
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        key = (json.dumps(pair["prompt"], sort_keys=True), tuple(pair["images"]), chosen, rejected)
        if chosen == rejected:
            skipped["identical"] += 1
        elif key in seen:
            skipped["duplicate"] += 1
        else:
            seen.add(key)
            rows.append(pair)
    return Converted(images_column(rows), skipped)


def _with_steps(episodes: list[Episode], skipped: dict[str, int]) -> list[Episode]:
    """Episodes that have steps; the others are counted as skipped."""
    kept = [e for e in episodes if e.steps]
    skipped["episodes_without_steps"] += len(episodes) - len(kept)
    return kept


def _by_instruction(episodes: Iterable[Episode]) -> dict[str, list[Episode]]:
    groups: dict[str, list[Episode]] = defaultdict(list)
    for episode in episodes:
        groups[episode.instruction].append(episode)
    return groups


# --- (a) two runs ----------------------------------------------------------------------------------

def later_is_better(earlier: Episode, later: Episode) -> bool:
    """Success beats failure; else the higher final_reward; else (equal, or a reward missing) the later run."""
    if earlier.success != later.success:
        return later.success
    if earlier.final_reward is not None and later.final_reward is not None and earlier.final_reward != later.final_reward:
        return later.final_reward > earlier.final_reward
    return True


def pairs_from_runs(earlier: list[Episode], later: list[Episode], history: int = 0,
                    system: str | None = None) -> Converted:
    """Pairs from two runs of the same tasks.

    Episodes are matched by instruction (the k-th episode of an instruction in one run
    with the k-th in the other), then steps by observation; at each matched step the
    better episode's action (``later_is_better``) is chosen. ``source`` says which run won:
    ``runs:later`` or ``runs:earlier``.
    """
    skipped = {"episodes_without_steps": 0, "unmatched_episodes": 0}
    old_groups = _by_instruction(_with_steps(earlier, skipped))
    new_groups = _by_instruction(_with_steps(later, skipped))
    candidates = []
    for instruction in list(old_groups) + [i for i in new_groups if i not in old_groups]:
        olds, news = old_groups.get(instruction, []), new_groups.get(instruction, [])
        skipped["unmatched_episodes"] += abs(len(olds) - len(news))
        for old, new in zip(olds, news):
            win, lose, source = (new, old, "runs:later") if later_is_better(old, new) else (old, new, "runs:earlier")
            for win_step, lose_step in match_steps(win, lose):
                candidates.append(_candidate(win, win_step, render_action(win_step.action), lose,
                                             render_action(lose_step.action), source, history, system))
    return _finish(candidates, skipped)


# --- (b) human feedback ----------------------------------------------------------------------------

class Feedback(BaseModel):
    """One feedback line: a score for episode ``episode_id``'s step ``step`` (or for ``alternative`` there)."""

    model_config = STRICT
    episode_id: str
    step: int
    score: float
    alternative: str | None = None


def load_feedback(path: str | Path, episodes: list[Episode]) -> list[tuple[Feedback, str]]:
    """Validate a feedback file against the episodes; ``(feedback, "file:line")`` per line."""
    by_id = {e.episode_id: e for e in episodes}
    seen: dict[tuple, int] = {}
    out = []
    for lineno, obj in read_json_objects(path):
        where = f"{path}:{lineno}"
        try:
            item = Feedback.model_validate(obj)
        except ValidationError as exc:
            raise DataError(f"{where}: {validation_message(exc)}") from None
        episode = by_id.get(item.episode_id)
        if episode is None:
            raise DataError(f"{where}: episode_id {item.episode_id!r} is not in the episodes file")
        if not 0 <= item.step < len(episode.steps):
            raise DataError(f"{where}: step {item.step}: episode {item.episode_id!r} has "
                            f"{len(episode.steps)} steps ({episode.where})")
        key = (item.episode_id, item.step, item.alternative)
        if key in seen:
            what = "this alternative" if item.alternative is not None else "the recorded action"
            raise DataError(f"{where}: {what} of episode {item.episode_id!r} step {item.step} "
                            f"is already scored on line {seen[key]}")
        seen[key] = lineno
        out.append((item, where))
    if not out:
        raise DataError(f"{path}: no feedback lines (the file is empty)")
    return out


def pairs_from_feedback(episodes: list[Episode], feedback_path: str | Path, history: int = 0,
                        system: str | None = None) -> Converted:
    """Pairs from scored actions: candidates for the same instruction and observation, every higher-vs-lower pair.

    A candidate is a feedback line: the recorded action of its step, or its
    ``alternative`` text. Equal scores make no pair (counted as ``ties``).
    """
    skipped = {"feedback_without_observation": 0, "observations_with_one_candidate": 0, "ties": 0}
    groups: dict[tuple, list[tuple[float, str, Episode, Step]]] = defaultdict(list)
    by_id = {e.episode_id: e for e in episodes}
    for item, _ in load_feedback(feedback_path, episodes):
        episode = by_id[item.episode_id]
        step = episode.steps[item.step]
        key = observation_key(step)
        if key is None:
            skipped["feedback_without_observation"] += 1
            continue
        text = item.alternative if item.alternative is not None else render_action(step.action)
        groups[(episode.instruction, key)].append((item.score, text, episode, step))
    candidates = []
    for group in groups.values():
        if len(group) < 2:
            skipped["observations_with_one_candidate"] += 1
            continue
        ranked = sorted(group, key=lambda c: -c[0])  # stable: equal scores keep file order
        for i, (hi_score, hi_text, hi_episode, hi_step) in enumerate(ranked):
            for lo_score, lo_text, lo_episode, _ in ranked[i + 1:]:
                if hi_score == lo_score:
                    skipped["ties"] += 1
                    continue
                candidates.append(_candidate(hi_episode, hi_step, hi_text, lo_episode, lo_text, "feedback",
                                             history, system))
    return _finish(candidates, skipped)


# --- (c) a comparator over episodes ----------------------------------------------------------------

def prefer_success(a: Episode, b: Episode) -> int:
    """Success over failure; otherwise no preference."""
    return int(a.success) - int(b.success)


def prefer_shorter(a: Episode, b: Episode) -> int:
    """Between two successful episodes, fewer steps wins; otherwise no preference."""
    if not (a.success and b.success):
        return 0
    return len(b.steps) - len(a.steps)


COMPARATORS: dict[str, Comparator] = {"success": prefer_success, "shorter": prefer_shorter}


def resolve_comparator(name: str) -> Comparator:
    """A built-in comparator by name, or a user function ``package.module:function``."""
    return resolve_name(name, COMPARATORS, "comparator", DataError,
                        f"unknown comparator {name!r}; built-ins are {sorted(COMPARATORS)}, or name your own as "
                        "'package.module:function' taking (a, b) and returning an int")


def _compare(fn: Comparator, label: str, a: Episode, b: Episode) -> float:
    try:
        verdict = fn(a, b)
    except Exception as exc:  # user code: say which episodes it failed on
        raise DataError(f"comparator {label!r} failed on episodes {a.episode_id!r} and {b.episode_id!r} "
                        f"({type(exc).__name__}: {exc})") from None
    if not isinstance(verdict, (int, float)) or (isinstance(verdict, float) and math.isnan(verdict)):
        raise DataError(f"comparator {label!r} returned {verdict!r} for episodes {a.episode_id!r} and "
                        f"{b.episode_id!r}; expected an int (>0: the first is preferred, <0: the second, 0: neither)")
    return verdict


def pairs_from_comparator(episodes: list[Episode], comparator: str | Comparator, history: int = 0,
                          system: str | None = None) -> Converted:
    """Pairs from a ranking of episodes with the same instruction.

    ``comparator(a, b) > 0`` means ``a`` is preferred, ``< 0`` that ``b`` is, ``0`` neither
    (counted as ``ties``). It is called once per unordered pair, ``a`` before ``b`` in file
    order. The preferred episode's action beats the other's at every matched step (the
    first step where the two diverge included, when its observation is shared).
    """
    if isinstance(comparator, str):
        label, fn = comparator, resolve_comparator(comparator)
    else:
        label, fn = getattr(comparator, "__name__", "comparator"), comparator
    skipped = {"episodes_without_steps": 0, "ties": 0, "episode_pairs_without_shared_observation": 0}
    candidates = []
    for group in _by_instruction(_with_steps(episodes, skipped)).values():
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                verdict = _compare(fn, label, a, b)
                if verdict == 0:
                    skipped["ties"] += 1
                    continue
                win, lose = (a, b) if verdict > 0 else (b, a)
                matched = match_steps(win, lose)
                if not matched:
                    skipped["episode_pairs_without_shared_observation"] += 1
                for win_step, lose_step in matched:
                    candidates.append(_candidate(win, win_step, render_action(win_step.action), lose,
                                                 render_action(lose_step.action), f"comparator:{label}",
                                                 history, system))
    return _finish(candidates, skipped)


# ----------------------------------------------------------------------------- reading pairs


def pair_of(row: dict, where: str) -> tuple[list[dict], list[dict], list[dict]]:
    """``(prompt, chosen, rejected)`` message lists of one preference row."""
    if "chosen" not in row or "rejected" not in row:
        keys = sorted(k for k in row if k != "_line")
        raise DataError(f"{where}: a preference pair needs 'chosen' and 'rejected' (and usually 'prompt'); "
                        f"this row has {keys}")
    if "prompt" in row:
        return (as_chat(row["prompt"], "user", where, "prompt"), as_chat(row["chosen"], "assistant", where, "chosen"),
                as_chat(row["rejected"], "assistant", where, "rejected"))
    implicit = ("without 'prompt', chosen and rejected must be conversations that start with the same messages "
                "(the prompt) and then differ; add a 'prompt' field")
    if not (isinstance(row["chosen"], list) and isinstance(row["rejected"], list)):
        raise DataError(f"{where}: {implicit}")
    chosen, rejected = check_messages(row["chosen"], where, "chosen"), check_messages(row["rejected"], where, "rejected")
    shared = 0  # implicit prompt: the leading messages both conversations share
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0 or shared == len(chosen) or shared == len(rejected):
        raise DataError(f"{where}: {implicit}")
    return chosen[:shared], chosen[shared:], rejected[shared:]


PreferenceRow = tuple[str, tuple[list[dict], list[dict], list[dict]], list]


def read_preference_rows(source: str) -> list[PreferenceRow]:
    """``(file:line, (prompt, chosen, rejected), images)`` per row of a preference file, every row checked.

    ``images`` are the row's ``image``/``images`` (TRL's columns; paths relative to the data file) as
    absolute paths or bytes, each checked readable now; the prompt then holds one image block per
    image (TRL's placement when it has none), and the replies may hold none. ``[]`` for a text row."""
    from grpokit.data.loaders import read_jsonl

    rows = read_jsonl(source)
    if not rows:
        raise DataError(f"{source}: the file holds no preference pairs")
    out = []
    for row in rows:
        where = f"{source}:{row['_line']}"
        prompt, chosen, rejected = pair_of(row, where)
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            if count_placeholders(reply):
                raise DataError(f"{where}: {name!r} has an image block; a pair's images belong in its prompt, "
                                "which both replies share")
        refs, prompt = with_checked_images(row, prompt, where, Path(source).parent)
        out.append((where, (prompt, chosen, rejected), refs))
    return out
