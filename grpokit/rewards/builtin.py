"""Built-in rewards needed by the demo and common recipes.

- ``answer_match``: 1.0 when the answer read from the completion equals the reference,
  else 0.0. ``extract`` chooses how the completion is read: ``first_number`` (the
  lenient judge: the first number anywhere in the reply, so "45 is larger" counts),
  ``last_number`` (GSM8K convention: the final number is the answer) or ``exact``
  (whole reply, case and surrounding punctuation ignored). Numbers compare by value
  (``"7.0"`` equals ``"7"``; thousands separators are dropped).
- ``format_regex``: 1.0 when the whole completion (stripped) matches ``pattern``.
"""

from __future__ import annotations

import re

from grpokit.rewards.registry import register
from grpokit.rewards.rewardset import completion_text

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
WORD = re.compile(r"[A-Za-z]+")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def extract_answer(text: str, extract: str) -> str | None:
    """Read the answer out of a reply; None when the reply holds none."""
    if extract == "exact":
        return text.strip().strip(".!?\"' ").lower() or None
    if extract == "first_word":
        match = WORD.search(text)
        return match.group(0).lower() if match else None
    numbers = NUMBER.findall(text)
    if not numbers:
        return None
    if extract == "first_number":
        return numbers[0]
    if extract == "last_number":
        return numbers[-1]
    raise ValueError(f"extract must be first_number, last_number, first_word or exact, not {extract!r}")


def answers_equal(predicted: str | None, reference) -> bool:
    if predicted is None or reference is None:
        return False
    left, right = _as_number(predicted), _as_number(str(reference))
    if left is not None and right is not None:
        return abs(left - right) < 1e-9
    return predicted.strip().lower() == str(reference).strip().lower()


def per_row(completions, answer, score) -> list[float | None]:
    """``score(text, reference)`` per completion; None where there is no reference."""
    if answer is None:
        return [None] * len(completions)
    return [None if ref is None else float(score(completion_text(c), ref)) for c, ref in zip(completions, answer)]


@register("answer_match")
def answer_match(prompts, completions, answer=None, extract: str = "last_number", **_) -> list[float | None]:
    """1.0 for a correct answer, 0.0 otherwise; None for rows without a reference answer."""
    return per_row(completions, answer, lambda text, ref: answers_equal(extract_answer(text, extract), ref))


@register("format_regex")
def format_regex(prompts, completions, pattern: str = r".+", **_) -> list[float]:
    """1.0 when the stripped completion fully matches ``pattern`` (DOTALL), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)
    return [float(compiled.fullmatch(completion_text(c).strip()) is not None) for c in completions]
