"""Text rewards: maths accuracy, label match, output structure, length shaping, repetition.

All take TRL's signature ``fn(prompts, completions, **columns) -> list[float | None]``
(``None`` = no reference for that row) and read string or chat-message completions.

- ``label``: classification verdict read from the start of the reply.
- ``tags``: ``<think>…</think><answer>…</answer>``-style structure, 1/len(tags) per pair.
- ``two_line_verdict``: a verdict line, then a ``Reason: …`` line, nothing else.
- ``length``: trapezoid in words or characters, 1.0 inside [min_len, max_len].
- ``cosine_length``: Yeo et al. 2025 (arXiv:2502.03373) cosine length scaling by
  correctness. By default as TRL's ``get_cosine_scaled_reward`` in form (lengths past
  ``max_len`` clipped) but in characters; ``unit="tokens"`` counts tokens as TRL does,
  ``clip=False`` is open-r1's unclipped form (its cosine turns back up past ``max_len``).
  The paper's separate exceed-length penalty is left out.
- ``repetition``: n-gram repetition penalty: open-r1's ``get_repetition_penalty_reward``
  on words (``language`` "en" or "zh"), or TRL's on token ids (``unit="tokens"``).
- ``format``: another name for ``format_regex`` (the same function).
"""

from __future__ import annotations

import math
import re
import unicodedata
from typing import Callable

from grpokit.errors import RewardError
from grpokit.rewards.builtin import format_regex
from grpokit.rewards.maths import is_correct
from grpokit.rewards.registry import register
from grpokit.rewards.rewardset import completion_text

register("format")(format_regex)

WORDS = re.compile(r"\w+")


# ---------------------------------------------------------------- label


def _words(text: str) -> list[str]:
    """Words after NFKC (full-width to ASCII) and case folding; punctuation and emoji drop out."""
    return WORDS.findall(unicodedata.normalize("NFKC", text).casefold())


def _first_line(text: str) -> str:
    stripped = text.strip()
    return stripped.splitlines()[0] if stripped else ""


def label_matches(text: str, reference, labels=None) -> bool:
    head, ref = _words(_first_line(text)), _words(str(reference))
    if labels is None:
        return bool(ref) and head[: len(ref)] == ref
    found = [words for words in map(_words, labels) if words and head[: len(words)] == words]
    # the longest allowed label wins: "Not sure" is "not sure", not "not"
    return bool(found) and max(found, key=len) == ref


@register("label")
def label(prompts, completions, answer=None, labels=None, **_) -> list[float | None]:
    """1.0 when the reply's label equals ``answer``, else 0.0; None without a reference.

    Text is compared as words (``\\w+`` after NFKC and case folding), so case, spacing,
    ASCII and full-width punctuation ("。", "：", "！") and emoji are ignored. Only the
    first non-empty line is read. Without ``labels`` the reply's first n words must equal
    the reference's n words (n = 1 for a one-word label). With ``labels`` (allowed labels),
    the predicted label is the longest allowed label whose words begin the line (the
    first such label in list order when none is a prefix of another); it must equal the
    reference. No allowed label at the start gives 0.0. ``labels`` is a recipe argument (one list
    for every row) or a data column (each row its own list, as the built-in visual tasks carry).
    """
    if answer is None:
        return [None] * len(completions)
    return [None if ref is None else float(label_matches(completion_text(c), ref, allowed))
            for c, ref, allowed in zip(completions, answer, each_row(labels, len(completions)))]


def each_row(option, n: int) -> list:
    """A list option per completion: a data column (a list of lists, one per row) as it is, a recipe
    argument (one list, or None) repeated for every completion."""
    if isinstance(option, (list, tuple)) and len(option) == n and option and all(
            isinstance(item, (list, tuple)) for item in option):
        return list(option)
    return [option] * n


# ---------------------------------------------------------------- tags


def _pair_span(text: str, tag: str) -> tuple[int, int] | None:
    """(start of ``<tag>``, end of ``</tag>``) when each occurs exactly once, opening first."""
    opening, closing = f"<{tag}>", f"</{tag}>"
    if text.count(opening) != 1 or text.count(closing) != 1:
        return None
    start, end = text.index(opening), text.index(closing)
    return (start, end + len(closing)) if start + len(opening) <= end else None


def _longest_ordered_chain(spans: list) -> int:
    """Most pairs that follow one another, without overlap, in the given tag order."""
    best: list[int] = []  # best[i]: longest chain that ends with pair i
    for i, span in enumerate(spans):
        before = [best[j] for j in range(i) if span and spans[j] and spans[j][1] <= span[0]]
        best.append(1 + max(before, default=0) if span else 0)
    return max(best, default=0)


@register("tags")
def tags(prompts, completions, tags=("think", "answer"), require_order: bool = True, **_) -> list[float]:
    """Share of ``tags`` present as one well-formed pair: ``k / len(tags)``.

    A tag's pair is well formed when ``<tag>`` and ``</tag>`` each occur exactly once,
    the opening first. Without ``require_order``, k counts well-formed pairs. With it,
    k is the largest number of well-formed pairs that appear one after another (no
    overlap, so no nesting) in the order ``tags`` lists them; e.g. for ("think",
    "answer"), ``<answer>a</answer><think>t</think>`` scores 0.5 and
    ``<think><answer>a</answer></think>`` scores 0.5.
    """
    names = (tags,) if isinstance(tags, str) else tuple(tags)
    if not names:
        raise RewardError("reward 'tags' needs at least one tag name")
    values = []
    for completion in completions:
        spans = [_pair_span(completion_text(completion), tag) for tag in names]
        count = _longest_ordered_chain(spans) if require_order else sum(s is not None for s in spans)
        values.append(count / len(names))
    return values


# ---------------------------------------------------------------- two_line_verdict


def _core(text: str) -> str:
    """NFKC, case-folded, stripped of surrounding spaces and trailing punctuation ("!", "。")."""
    text = unicodedata.normalize("NFKC", text).casefold().strip()
    while text and unicodedata.category(text[-1]).startswith("P"):
        text = text[:-1].rstrip()
    return text


def _is_reason(line: str, prefix: str) -> bool:
    word = prefix.rstrip(":：").rstrip()
    # a prefix ending in a colon accepts ":" or "：", with spaces either side of it
    pattern = re.escape(word) + r"\s*[:：]\s*\S" if word != prefix else re.escape(prefix) + r"\s*\S"
    return re.match(pattern, line, re.IGNORECASE) is not None


@register("two_line_verdict")
def two_line_verdict(prompts, completions, verdicts=None, reason_prefix: str = "Reason:", **_) -> list[float]:
    """1.0 for exactly "verdict line, reason line", else 0.0.

    Lines are right-stripped and trailing empty lines dropped; exactly two must remain.
    Line 1 is a verdict: with ``verdicts``, one of them ignoring case, surrounding
    spaces and trailing punctuation (ASCII or full-width); without, any non-empty line
    that is not itself a reason line. Line 2 starts with ``reason_prefix`` (case
    ignored); if the prefix ends in a colon, the colon may be ":" or "：" with optional
    spaces around it; non-empty text must follow.
    """
    values = []
    for completion, row_verdicts in zip(completions, each_row(verdicts, len(completions))):
        allowed = None if row_verdicts is None else {
            _core(v) for v in ([row_verdicts] if isinstance(row_verdicts, str) else row_verdicts)}
        lines = [line.rstrip() for line in completion_text(completion).splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        ok = len(lines) == 2 and _is_reason(lines[1], reason_prefix)
        if ok and allowed is not None:
            ok = _core(lines[0]) in allowed
        elif ok:
            ok = bool(_core(lines[0])) and not _is_reason(lines[0], reason_prefix)
        values.append(float(ok))
    return values


# ---------------------------------------------------------------- length


def _size(text: str, unit: str) -> int:
    if unit == "words":
        return len(text.split())
    if unit == "chars":
        return len(text)  # Unicode code points: "👍" is 1
    raise RewardError(f"length unit must be 'words' or 'chars', not {unit!r} (no tokenizer here)")


SIZE_UNITS = ("chars", "words", "tokens")


def completion_sizes(completions, unit: str, completion_ids=None) -> list[int]:
    """Each completion's length in ``unit``: code points, whitespace-split words, or tokens.

    Tokens are ``len(completion_ids[i])``, the ids the trainer passes as TRL does (EOS
    included, padding not), so no tokenizer is needed here; a call without them (e.g.
    scoring saved completions) cannot count tokens and says so.
    """
    if unit not in SIZE_UNITS:
        raise RewardError(f"length unit must be one of {SIZE_UNITS}, not {unit!r}")
    if unit == "tokens":
        return [len(ids) for ids in token_ids(completions, completion_ids)]
    return [_size(completion_text(c), unit) for c in completions]


def token_ids(completions, completion_ids) -> list[list[int]]:
    """The trainer's ``completion_ids``, one list per completion; an error when the call has none."""
    if completion_ids is None:
        raise RewardError("unit 'tokens' counts the trainer's completion_ids, which this call did not pass; "
                          "use unit 'chars' or 'words' to score text alone")
    if len(completion_ids) != len(completions):
        raise RewardError(f"{len(completion_ids)} completion_ids for {len(completions)} completions")
    return [list(ids) for ids in completion_ids]


def length_score(n: int, min_len: int, max_len: int) -> float:
    """Trapezoid: n/min_len below min_len, 1.0 on [min_len, max_len], 2 - n/max_len after, floored at 0."""
    if not 0 <= min_len <= max_len or max_len <= 0:
        raise RewardError(f"length needs 0 <= min_len <= max_len and max_len > 0, got {min_len}, {max_len}")
    if n < min_len:
        return n / min_len
    return 1.0 if n <= max_len else max(0.0, 2.0 - n / max_len)


@register("length")
def length(prompts, completions, min_len: int = 10, max_len: int = 500, unit: str = "words", **_) -> list[float]:
    """Length in ``unit`` ("words": whitespace-split; "chars": code points) shaped as a trapezoid.

    ``r(n) = n / min_len`` for n < min_len (0 at n = 0), ``1.0`` for min_len <= n <= max_len,
    ``max(0, 2 - n / max_len)`` for n > max_len (0 from n = 2 * max_len on). The defaults
    are placeholders; a recipe should set both bounds.
    """
    return [length_score(_size(completion_text(c), unit), min_len, max_len) for c in completions]


# ---------------------------------------------------------------- cosine_length


def cosine_value(n: int, correct: bool, max_len: int, min_value_wrong: float = -1.0, max_value_wrong: float = -0.5,
                 min_value_correct: float = 0.5, max_value_correct: float = 1.0, clip: bool = True) -> float:
    """``lo + 0.5 * (hi - lo) * (1 + cos(pi * p))``, p = n / max_len (clipped to 1); hi at n = 0, lo at max_len."""
    # clipped, a reply past max_len stays at lo; unclipped (open-r1), 2 * max_len scores as a 0-length reply
    progress = min(n / max_len, 1.0) if clip else n / max_len
    # correct: short is best (1.0 -> 0.5); wrong: long is least bad (-1.0 -> -0.5)
    lo, hi = (min_value_correct, max_value_correct) if correct else (max_value_wrong, min_value_wrong)
    return lo + 0.5 * (hi - lo) * (1.0 + math.cos(progress * math.pi))


@register("cosine_length", run_in="main")
def cosine_length(prompts, completions, answer=None, max_len: int = 1000, min_value_wrong: float = -1.0,
                  max_value_wrong: float = -0.5, min_value_correct: float = 0.5, max_value_correct: float = 1.0,
                  clip: bool = True, unit: str = "chars", completion_ids=None, **_) -> list[float | None]:
    """Cosine length scaling by correctness (Yeo et al. 2025, arXiv:2502.03373; open-r1, TRL).

    With n the reply's length in ``unit`` ("chars": code points; "words"; "tokens":
    ``len(completion_ids[i])``), p = min(n / max_len, 1) (``clip=False``: p = n / max_len)
    and correctness from ``accuracy``'s judge: ``r = lo + 0.5 * (hi - lo) * (1 + cos(pi * p))``
    where for a correct reply (lo, hi) = (min_value_correct, max_value_correct) = (0.5, 1.0),
    falling from 1.0 at n = 0 to 0.5 at max_len; for a wrong one (lo, hi) =
    (max_value_wrong, min_value_wrong) = (-0.5, -1.0), rising from -1.0 at n = 0 to -0.5 at
    max_len. None without a reference.

    ``unit="tokens"`` (clipped) is TRL's ``get_cosine_scaled_reward``; ``clip=False`` in
    chars is open-r1's, whose cosine turns back up past max_len (a wrong reply of
    2 * max_len scores -1.0 again, a correct one 1.0). The two differ from this only in
    their maths judge, and open-r1 scores 1.0 where its judge cannot parse the reference.
    """
    if max_len <= 0:
        raise RewardError(f"cosine_length max_len must be > 0, got {max_len}")
    sizes = completion_sizes(completions, unit, completion_ids)
    if answer is None:
        return [None] * len(completions)
    bounds = (min_value_wrong, max_value_wrong, min_value_correct, max_value_correct)
    return [None if ref is None else cosine_value(n, is_correct(completion_text(c), ref), max_len, *bounds, clip=clip)
            for c, ref, n in zip(completions, answer, sizes)]


# ---------------------------------------------------------------- repetition

LANGUAGES = ("en", "zh")


def word_splitter(language: str) -> Callable[[str], list[str]]:
    """Words as open-r1 splits them: "en" lower-cased on whitespace, "zh" by jieba (no lower-casing)."""
    if language == "en":
        return lambda text: text.lower().split()
    if language != "zh":
        raise RewardError(f"repetition language must be one of {LANGUAGES}, not {language!r}")
    try:
        import jieba  # optional: only Chinese segmentation needs it
    except ImportError:
        raise RewardError("repetition language 'zh' segments words with jieba, which is not installed: "
                          "pip install jieba") from None
    # jieba.cut keeps whitespace and punctuation as segments ("苹果 我" -> 苹果, " ", 我), as open-r1 counts them
    return lambda text: list(jieba.cut(text))


def ngram_penalty(units: list, ngram_size: int, max_penalty: float) -> float:
    """``(1 - unique / total n-grams) * max_penalty``; 0.0 with fewer than ``ngram_size`` units."""
    if len(units) < ngram_size:
        return 0.0
    ngrams = list(zip(*(units[i:] for i in range(ngram_size))))
    return (1.0 - len(set(ngrams)) / len(ngrams)) * max_penalty + 0.0  # + 0.0 turns -0.0 into 0.0


@register("repetition")
def repetition(prompts, completions, ngram_size: int = 3, max_penalty: float = -1.0, language: str = "en",
               unit: str = "words", completion_ids=None, **_) -> list[float]:
    """N-gram repetition penalty (Yeo et al. 2025, arXiv:2502.03373, appendix C.2).

    ``r = (1 - unique_ngrams / total_ngrams) * max_penalty`` over the reply's n-grams of
    ``ngram_size`` consecutive units: 0 for no repeats, towards ``max_penalty`` <= 0 as the
    reply repeats itself; 0.0 with fewer than ``ngram_size`` units (empty reply included).

    Units are, with ``unit="words"``, words split as open-r1's
    ``get_repetition_penalty_reward(ngram_size, max_penalty, language)`` does: ``language``
    "en" lower-cases and splits on whitespace; "zh" segments with ``jieba.cut`` as is (no
    lower-casing; whitespace and punctuation are segments too) and needs ``pip install
    jieba``. With ``unit="tokens"``, units are the completion's token ids, as TRL's
    ``get_repetition_penalty_reward(ngram_size, max_penalty)`` counts them (``language``
    does not apply).
    """
    if max_penalty > 0:
        raise RewardError(f"repetition max_penalty must be <= 0, got {max_penalty}")
    if ngram_size < 1:
        raise RewardError(f"repetition ngram_size must be >= 1, got {ngram_size}")
    if unit == "tokens":
        if language != "en":
            raise RewardError(f"repetition language {language!r} applies to unit 'words'; unit 'tokens' counts token ids")
        return [ngram_penalty(ids, ngram_size, max_penalty) for ids in token_ids(completions, completion_ids)]
    if unit != "words":
        raise RewardError(f"repetition unit must be 'words' or 'tokens', not {unit!r}")
    split = word_splitter(language)
    return [ngram_penalty(split(completion_text(c)), ngram_size, max_penalty) for c in completions]
