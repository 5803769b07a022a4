"""The maths accuracy judge: is the answer a reply commits to equal to the reference?

math-verify decides equivalence (LaTeX, fractions, ``\\boxed{}``); GSM8K references end in
``#### n``.
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify

from grpokit.rewards.builtin import answers_equal, extract_answer, per_row
from grpokit.rewards.registry import register
from grpokit.rewards.rewardset import completion_text

MATH_TIMEOUT_S = 5
DELIMITED = re.compile(r"(?<!\\)\$|\\boxed|\\\(|\\\[")  # maths markup; "\$18" is a price, not maths


def _math_timeout() -> int | None:
    # math-verify times out with signal.alarm, which raises outside the main thread;
    # in a reward thread pool we run without its timeout rather than crash
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _reference(answer) -> str:
    # GSM8K references end in "#### 72": the final answer follows the last "####"
    return str(answer).split("####")[-1].strip()


def _parse_reference(ref: str, timeout: int | None) -> list:
    if DELIMITED.search(ref):
        return parse(ref, parsing_timeout=timeout)
    # bare references parse reliably only as inline maths: "\sqrt{2}" gives nothing
    # and "(1, 2)" gives 2 unwrapped, the interval (1, 2) inside "$…$"
    return parse(f"${ref}$", parsing_timeout=timeout) or parse(ref, parsing_timeout=timeout)


def is_correct(text: str, answer) -> bool:
    """math-verify equivalence of reply and reference, else the reply's last number equals it."""
    ref, timeout = _reference(answer), _math_timeout()
    gold, pred = _parse_reference(ref, timeout), parse(text, parsing_timeout=timeout)
    if gold and pred and verify(gold, pred, timeout_seconds=timeout):
        return True
    # a boxed answer is the model's explicit choice: a later number ("\boxed{5}; check: 5+1=6")
    # must not rescue it; otherwise the GSM8K convention (last number) decides
    if "\\boxed" in text:
        return False
    return answers_equal(extract_answer(text, "last_number"), ref)


@register("accuracy", run_in="main")
def accuracy(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 for a mathematically correct answer, else 0.0; None without a reference.

    The reference is the text after the last ``####`` (GSM8K), wrapped in ``$…$`` when it
    holds no maths delimiters; the reply is parsed by math-verify (``\\boxed{}``, LaTeX,
    plain numbers). Correct iff ``verify(gold, pred)``, or, when the reply has no
    ``\\boxed{}``, its last number equals the reference by value (``"1,000"`` = ``"1000.0"``).
    Safe from worker threads: off the main thread math-verify runs without its
    signal-based timeout.
    """
    return per_row(completions, answer, is_correct)


