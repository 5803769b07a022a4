"""The maths accuracy judge: is the answer a reply *commits to* equal to the reference?

Only the committed final answer is judged, never any other number in the reply: a judge
that parses the whole reply (as ``math_verify.parse(reply)`` does) finds whichever
expression it meets first, so "Each survey has 10 questions, so … 70 questions.\\n#### 70"
scored 1.0 against a reference of 10, and a policy could learn to scatter candidate
numbers early in its reasoning (issue #13). The rules, applied in order:

1. **The committed segment** (``final_answer``). GSM8K calculator annotations
   ``<<48/2=24>>`` are removed first. The explicit commitment markers are a closed
   ``\\boxed{…}`` or ``\\fbox{…}`` (balanced braces: ``\\boxed{\\frac{1}{2}}`` is
   ``\\frac{1}{2}``; ``\\{``/``\\}`` are literal), a ``####`` (GSM8K), and an answer
   phrase ("the answer is", "final answer:", "answer:", "answer is", case-insensitive,
   Markdown bold allowed: "**Answer:**"). The marker that starts last in the text
   decides; a marker inside a box's braces belongs to that box. A box gives its
   content. ``####`` and a phrase give the rest of their sentence (up to a newline, or a
   ``.``, ``!`` or ``?`` followed by a space or the end; the next non-blank line when the
   marker ends its line), without maths delimiters, and if that holds ``=``, what
   follows the last ``=`` ("the answer is 10 * 7 = 70 questions" gives "70 questions").
   An unclosed ``\\boxed{`` is no commitment: the other rules judge the reply. Without
   any marker, the last number in the reply (the GSM8K convention), or the content of
   the last inline maths span (``$…$``, ``$$…$$``, ``\\(…\\)``, ``\\[…\\]``) if that ends
   later than the last number. A blank segment, or a reply with neither, commits to
   nothing and is wrong.
2. **Nothing else counts**: an earlier number equal to the reference never rescues a
   wrong committed answer.
3. **Comparison.** When both the segment and the reference read as plain numbers, they
   compare by value within 1e-9 ("1,000" equals "1000.0"). A plain number may carry
   thousands separators, a leading ``$`` or ``\\$`` and a trailing ``.``; the segment may
   also be followed by unit words ("70 questions", "$18 dollars"; words of two or more
   letters other than "pi"). Otherwise math-verify decides,
   ``verify(parse(gold), parse(segment))``, with its signal-based timeout always on
   (``MATH_TIMEOUT_S`` for each parse and each comparison); a text without maths
   delimiters is parsed as ``$…$`` inline maths (a bare "\\sqrt{2}" parses to nothing and
   "(1, 2)" to 2; inside ``$…$`` they are √2 and the interval), else as it is. math-verify
   answers a timeout with "no match", so an expression too costly to compare
   (``9^{9^{9^{9}}}``) is judged wrong within seconds.
4. **The reference** is the text after the last ``####`` if it holds one (GSM8K
   solutions), else the content of its last closed ``\\boxed{}`` (MATH / open-r1
   ``solution`` columns: worked solutions ending in a boxed answer), else the whole
   reference.

math-verify's timeout is a ``signal.alarm``, which works only on a process's main
thread; ``accuracy`` is therefore registered ``run_in="main"``. Called off the main
thread, math-verify raises ``ValueError`` and the error propagates (the reward runner
counts a failed call) rather than becoming a silent 0.0. Plain numbers never reach
math-verify, so GSM8K-style judging is fast and thread-agnostic.
"""

from __future__ import annotations

import re

from math_verify import parse, verify

from grpokit.rewards.builtin import per_row
from grpokit.rewards.registry import register

MATH_TIMEOUT_S = 5
DELIMITED = re.compile(r"(?<!\\)\$|\\boxed|\\\(|\\\[")  # maths markup; "\$18" is a price, not maths
CALCULATOR = re.compile(r"<<[^<>\n]*>>")  # GSM8K's "<<48/2=24>>": working, never the answer
BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
TEXT_MARKER = re.compile(r"####|\b(?:the\s+|final\s+)?answer(?:\s+is\b|\**\s*:)", re.IGNORECASE)
SENTENCE_END = re.compile(r"\n|[.!?](?=\s|$)")  # "3.5" and "\frac{1}{2}" do not end a sentence
MATH_DELIMITER = re.compile(r"\$\$|(?<!\\)\$|\\[()\[\]]")
MATH_SPAN = re.compile(r"\$\$(.+?)\$\$|(?<!\\)\$(.+?)(?<!\\)\$|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)
# thousands groups of exactly three digits, so "(1,2)" holds 1 and 2, not 12; a minus after
# a letter, digit or ")" is subtraction ("10-7"), not a sign
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
NUMBER = re.compile(rf"(?:(?<![\w)])-)?{_DIGITS}")
PLAIN = re.compile(rf"(?:\\?\$\s*)?(-?{_DIGITS})\.?")
PLAIN_WITH_UNITS = re.compile(rf"(?:\\?\$\s*)?(-?{_DIGITS})(?:\s+(?!pi\b)[A-Za-z]{{2,}})*\.?", re.IGNORECASE)


# ---------------------------------------------------------------- the committed segment


def _braced(text: str, start: int) -> str | None:
    """The text up to the brace closing the one opened just before ``start``; None if unclosed."""
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # "\{" and "\}" are literal braces, not grouping
            continue
        depth += (char == "{") - (char == "}")
        if depth == 0:
            return text[start:i]
        i += 1
    return None


def last_box(text: str) -> tuple[int, int, str] | None:
    """Start, end and content of the last closed ``\\boxed{…}`` / ``\\fbox{…}``; None without one."""
    for match in reversed(list(BOX.finditer(text))):
        content = _braced(text, match.end())
        if content is not None:
            return match.start(), match.end() + len(content) + 1, content
    return None


def _sentence(text: str, start: int) -> str:
    # "Final answer:\n\n72" and "**Answer:** 72": skip the blank, the colon and the bold first
    rest = text[start:].lstrip(" \t\r\n*:")
    end = SENTENCE_END.search(rest)
    return rest[: end.start()] if end else rest


def _text_segment(segment: str) -> str:
    # the answer phrase and "####" give prose: drop maths delimiters, keep what follows the last "="
    return MATH_DELIMITER.sub("", segment).rsplit("=", 1)[-1]


def _unmarked(text: str) -> str | None:
    """The last number, or the last inline maths span's content if that ends later."""
    number = next(reversed(list(NUMBER.finditer(text))), None)
    span = next(reversed(list(MATH_SPAN.finditer(text))), None)
    if span and (number is None or span.end() > number.end()):
        return next(group for group in span.groups() if group is not None)
    return number.group() if number else None


def final_answer(text: str) -> str | None:
    """The answer segment ``text`` commits to (module docstring, rule 1); None when it commits to nothing."""
    text = CALCULATOR.sub("", text)
    box = last_box(text)
    marker = next(reversed(list(TEXT_MARKER.finditer(text))), None)
    if marker and (box is None or marker.start() >= box[1]):  # a marker inside the box is the box's
        segment = _text_segment(_sentence(text, marker.end()))
    elif box:
        segment = box[2]
    else:
        segment = _unmarked(text) or ""
    return segment.strip() or None


# ---------------------------------------------------------------- comparison


def reference_answer(answer) -> str:
    """The reference's final answer (rule 4): after the last ``####``, else its last box, else all of it."""
    ref = str(answer)
    if "####" in ref:
        return ref.rsplit("####", 1)[-1].strip()
    box = last_box(ref)
    return (box[2] if box else ref).strip()


def _number(text: str, pattern: re.Pattern) -> str | None:
    match = pattern.fullmatch(text.strip())
    return match.group(1).replace(",", "") if match else None


def _parse(text: str) -> list:
    if DELIMITED.search(text):
        return parse(text, parsing_timeout=MATH_TIMEOUT_S)
    # bare text parses reliably only as inline maths: "\sqrt{2}" gives nothing
    # and "(1, 2)" gives 2 unwrapped, the interval (1, 2) inside "$…$"
    return parse(f"${text}$", parsing_timeout=MATH_TIMEOUT_S) or parse(text, parsing_timeout=MATH_TIMEOUT_S)


def answers_match(segment: str, reference: str) -> bool:
    """Rule 3: by value when both read as plain numbers, else math-verify (errors propagate)."""
    predicted, gold = _number(segment, PLAIN_WITH_UNITS), _number(reference, PLAIN)
    if predicted is not None and gold is not None:
        return abs(float(predicted) - float(gold)) < 1e-9
    # a segment "70 questions" reaches math-verify as "70", not as the product 70·q·u·e·…
    gold_parsed, predicted_parsed = _parse(gold or reference), _parse(predicted or segment)
    return bool(gold_parsed and predicted_parsed and verify(gold_parsed, predicted_parsed, timeout_seconds=MATH_TIMEOUT_S))


def is_correct(text: str, answer) -> bool:
    """Whether the answer ``text`` commits to equals the reference ``answer`` (module docstring rules)."""
    segment = final_answer(text)
    return segment is not None and answers_match(segment, reference_answer(answer))


@register("accuracy", run_in="main")
def accuracy(prompts, completions, answer=None, **_) -> list[float | None]:
    """1.0 when the reply's committed final answer equals the reference, else 0.0; None without a reference.

    The committed answer is the segment of the last commitment marker: a closed
    ``\\boxed{…}``/``\\fbox{…}``, a ``####`` line, or an answer phrase ("the answer is",
    "final answer:", "answer:", "answer is"; the rest of that sentence, after its last
    ``=``); without a marker, the last number, or the last inline maths span if it ends
    later. No other number in the reply counts, so an earlier right number never rescues a
    wrong final answer. The reference is the text after its last ``####``, else its last
    boxed content, else all of it. Plain numbers (thousands separators, ``$``, a trailing
    ``.``; unit words after the reply's number) compare by value within 1e-9; anything else
    by math-verify with its timeout on, which needs the main thread (hence
    ``run_in="main"``); off it math-verify's ``ValueError`` propagates.
    """
    return per_row(completions, answer, is_correct)
