"""The reward forms open-r1 and TRL recipes use, as built-ins with their exact formulas.

Written from the formulas of open-r1's ``src/open_r1/rewards.py`` and TRL's ``trl.rewards``
(TRL 1.16), and tested against TRL's functions where TRL has them:

- ``think_format``: TRL's ``think_format_reward`` (one ``<think>…</think>`` at the start).
- ``think_answer_format``: open-r1's ``format_reward`` (``<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>``).
- ``tag_count``: open-r1's ``tag_count_reward``, 0.25 per tag present exactly once.
- ``reasoning_steps``: open-r1's ``reasoning_steps_reward``, step markers / 3, capped at 1.
- ``kimi_length``: open-r1's ``len_reward``, Kimi 1.5's length penalty (arXiv:2501.12599).

Elsewhere: ``cosine_length`` and ``repetition`` (``grpokit.rewards.text``) take arguments
for open-r1's and TRL's variants; TRL's ``get_soft_overlong_punishment`` (DAPO,
arXiv:2503.14476) is the algorithm option ``algorithm.overlong_buffer`` (the cache) with
``rollout.max_completion_length`` (the maximum), not a reward.

open-r1's two format rewards are not ``format`` (``format_regex``) with their pattern:
``format`` strips the reply and matches it whole, while open-r1 and TRL match from the
first character (a leading space or newline fails) with ``re.MULTILINE``, where ``$`` also
matches before any newline (so text after ``</answer>\\n`` passes).
"""

from __future__ import annotations

import re

from grpokit.errors import RewardError
from grpokit.rewards.maths import is_correct
from grpokit.rewards.registry import register
from grpokit.rewards.rewardset import completion_text
from grpokit.rewards.text import completion_sizes

# TRL's and open-r1's patterns and flags, unchanged: matching them exactly is the point
THINK_FORMAT = re.compile(r"^<think>(?!.*<think>)(.*?)</think>.*$", re.DOTALL | re.MULTILINE)
THINK_ANSWER_FORMAT = re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.DOTALL | re.MULTILINE)
TAG_MARKERS = ("<think>\n", "\n</think>\n", "\n<answer>\n", "\n</answer>")
# no re.MULTILINE, as in open-r1: "^\d+\." counts only at the very start of the reply
STEP_MARKERS = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)")
RELATIVE_TO = ("batch", "group")


def _matches(pattern: re.Pattern, completions) -> list[float]:
    return [float(pattern.match(completion_text(c)) is not None) for c in completions]


@register("think_format")
def think_format(prompts, completions, **_) -> list[float]:
    """TRL's ``think_format_reward``: 1.0 when the reply opens with one ``<think>…</think>``, else 0.0.

    The pattern is TRL's, ``^<think>(?!.*<think>)(.*?)</think>.*$`` (DOTALL, MULTILINE),
    matched from the first character; in words: the reply starts with ``<think>`` (no
    leading whitespace), contains no second ``<think>``, and has a ``</think>`` after it;
    anything may follow, including nothing and an empty think block.
    """
    return _matches(THINK_FORMAT, completions)


@register("think_answer_format")
def think_answer_format(prompts, completions, **_) -> list[float]:
    """open-r1's ``format_reward``: 1.0 for ``<think>\\n…\\n</think>\\n<answer>\\n…\\n</answer>``, else 0.0.

    The pattern is open-r1's, ``^<think>\\n.*?\\n</think>\\n<answer>\\n.*?\\n</answer>$``
    (DOTALL, MULTILINE), matched from the first character. In words: the reply starts with
    ``<think>\\n``; later comes ``\\n</think>\\n<answer>\\n``, later still ``\\n</answer>``
    followed by the end or a newline (MULTILINE's ``$``), after which anything may follow.
    An empty block needs both newlines (``<think>\\n\\n</think>``); ``\\r\\n`` line ends fail.
    """
    return _matches(THINK_ANSWER_FORMAT, completions)


@register("tag_count")
def tag_count(prompts, completions, **_) -> list[float]:
    """open-r1's ``tag_count_reward``: ``0.25 * k`` for k of the four tag strings occurring exactly once.

    The strings, newlines included: ``"<think>\\n"``, ``"\\n</think>\\n"``, ``"\\n<answer>\\n"``,
    ``"\\n</answer>"`` (counted without overlap, as ``str.count`` does). Order is not checked:
    that is ``think_answer_format``'s job; this gives partial credit on the way to it.
    """
    return [0.25 * sum(completion_text(c).count(tag) == 1 for tag in TAG_MARKERS) for c in completions]


@register("reasoning_steps")
def reasoning_steps(prompts, completions, min_steps: int = 3, **_) -> list[float]:
    """open-r1's ``reasoning_steps_reward``: ``min(1, k / min_steps)`` for k step markers (open-r1: 3).

    k counts non-overlapping matches of open-r1's ``(Step \\d+:|^\\d+\\.|\\n-|\\n\\*|First,|Second,
    |Next,|Finally,)`` (no flags): "Step 2:" anywhere, a number and a full stop at the very
    start of the reply only (open-r1's docstring says "at start of line", but without
    ``re.MULTILINE`` a later "\\n2." is not counted), a line starting with "-" or "*"
    (not the first line), and the words "First,", "Second,", "Next,", "Finally," (case and
    comma as written).
    """
    if min_steps < 1:
        raise RewardError(f"reasoning_steps min_steps must be >= 1, got {min_steps}")
    return [min(1.0, len(STEP_MARKERS.findall(completion_text(c))) / min_steps) for c in completions]


def kimi_values(lengths: list[int], correct: list[bool]) -> list[float]:
    """Kimi 1.5's length reward for one set of replies: λ if correct, min(0, λ) if wrong."""
    shortest, longest = min(lengths, default=0), max(lengths, default=0)
    if shortest == longest:  # no spread, no signal (and no division by zero)
        return [0.0] * len(lengths)
    # λ = 0.5 at the shortest reply, -0.5 at the longest
    lambdas = [0.5 - (n - shortest) / (longest - shortest) for n in lengths]
    return [lam if ok else min(0.0, lam) for lam, ok in zip(lambdas, correct)]


def _spans(prompts, n: int, relative_to: str) -> list[range]:
    """The completions that share a min and max: all of them, or each run of equal consecutive prompts."""
    if relative_to not in RELATIVE_TO:
        raise RewardError(f"kimi_length relative_to must be one of {RELATIVE_TO}, not {relative_to!r}")
    if relative_to == "batch":
        return [range(n)]
    if prompts is None or len(prompts) != n:
        raise RewardError("kimi_length relative_to 'group' groups completions by their prompt; this call passed "
                          f"{'no' if prompts is None else len(prompts)} prompts for {n} completions")
    # the trainer (grpokit's and TRL's) passes a prompt's G completions next to each other
    spans, start = [], 0
    for i in range(1, n + 1):
        if i == n or prompts[i] != prompts[start]:
            spans.append(range(start, i))
            start = i
    return spans


@register("kimi_length", run_in="main")
def kimi_length(prompts, completions, answer=None, relative_to: str = "batch", unit: str = "chars",
                completion_ids=None, **_) -> list[float | None]:
    """Kimi 1.5's length penalty (arXiv:2501.12599, "length penalty"; open-r1's ``len_reward``).

    Over a set of replies with lengths ``len`` in ``unit`` ("chars": code points, as
    open-r1; "words"; "tokens": ``len(completion_ids[i])``),
    ``λ = 0.5 - (len - min_len) / (max_len - min_len)``; a correct reply (``accuracy``'s
    judge) scores λ, a wrong one ``min(0, λ)``; when all lengths are equal every reply
    scores 0.0. Rows without a reference score None and their lengths do not count
    towards min_len and max_len.

    The set is the whole call (``relative_to="batch"``, as open-r1: TRL and grpokit call a
    reward once per generation batch, P prompts × G completions, so min and max mix
    questions) or each prompt's group (``"group"``, as the paper: over the k responses sampled
    for one problem), where a group is a run of consecutive completions with the same prompt.
    Differs from open-r1 in the maths judge, and where open-r1 cannot parse a reference
    it counts the reply correct.
    """
    sizes = completion_sizes(completions, unit, completion_ids)
    spans = _spans(prompts, len(completions), relative_to)
    values: list[float | None] = [None] * len(completions)
    if answer is None:
        return values
    for span in spans:
        scored = [i for i in span if answer[i] is not None]
        correct = [is_correct(completion_text(completions[i]), answer[i]) for i in scored]
        for i, value in zip(scored, kimi_values([sizes[i] for i in scored], correct)):
            values[i] = value
    return values
