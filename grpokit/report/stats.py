"""Is a difference in accuracy real? Bootstrap intervals of differences, and eval-file figures.

Every interval is a percentile bootstrap (Efron & Tibshirani 1993, ch. 13) with a seeded
``random.Random``, the same recipe as ``grpokit.eval.metrics.bootstrap_interval``, so the
report and the comparison print the same interval on every machine. It is re-stated here
rather than imported because importing ``grpokit.eval`` loads torch, and reading a run
directory must stay cheap.

- paired: two evaluations of the same held-out rows. Resampling row indices and taking
  mean(b[idx]) - mean(a[idx]) is the same as resampling the per-row differences b_i - a_i,
  which is what is done. Rows both got right (or both wrong) add no noise, so this
  interval is much narrower than comparing two independent intervals.
- unpaired: different rows (or no per-row record); each side is resampled on its own.

Eval files come in two generations (docs/run-directory.md): the accessors below read
both, returning None for what an older file does not have.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from grpokit.report.files import Row, number

ITERATIONS = 2000
CONFIDENCE = 0.95


def percentile_interval(estimates: list[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The central ``confidence`` share of bootstrap estimates (indices as in ``bootstrap_interval``)."""
    ordered = sorted(estimates)
    tail, last = (1 - confidence) / 2, len(ordered) - 1
    return ordered[int(tail * last)], ordered[int((1 - tail) * last)]


def paired_difference_interval(a: list[float], b: list[float], iterations: int = ITERATIONS,
                               confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Interval of mean(b) - mean(a) when ``a[i]`` and ``b[i]`` score the same row ``i``."""
    if len(a) != len(b):
        raise ValueError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no values to bootstrap")
    diffs = [y - x for x, y in zip(a, b)]
    n, rng = len(diffs), random.Random(seed)
    return percentile_interval([sum(rng.choices(diffs, k=n)) / n for _ in range(iterations)], confidence)


def unpaired_difference_interval(a: list[float], b: list[float], iterations: int = ITERATIONS,
                                 confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Interval of mean(b) - mean(a) for independent samples: each side resampled on its own."""
    if not a or not b:
        raise ValueError("no values to bootstrap")
    rng = random.Random(seed)
    estimates = [sum(rng.choices(b, k=len(b))) / len(b) - sum(rng.choices(a, k=len(a))) / len(a)
                 for _ in range(iterations)]
    return percentile_interval(estimates, confidence)


def interval(value: Any) -> tuple[float, float] | None:
    """A stored ``[lo, hi]`` pair, or None when absent or malformed."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        lo, hi = number(value[0]), number(value[1])
        if lo is not None and hi is not None:
            return lo, hi
    return None


def correct_list(ev: Row) -> list[float] | None:
    """Per-row 0/1 correctness of the greedy answers, when the file records it."""
    values = ev.get("correct")
    if not isinstance(values, list) or not values:
        return None
    numbers = [float(v) if isinstance(v, bool) else number(v) for v in values]  # true/false reads as 1/0
    return None if any(v is None for v in numbers) else numbers  # type: ignore[return-value]


def accuracy_rows(ev: Row) -> list[float] | None:
    """Per-row correctness, or (older files) rows rebuilt from accuracy × num_examples.

    The bootstrap of a mean of 0/1 values depends only on how many ones there are, not on
    their order, so ``round(accuracy * n)`` ones and the rest zeros give the same unpaired
    interval as the real rows would.
    """
    if (rows := correct_list(ev)) is not None:
        return rows
    accuracy, n = number(ev.get("accuracy")), ev.get("num_examples")
    if accuracy is None or isinstance(n, bool) or not isinstance(n, int) or n < 1:
        return None
    ones = round(accuracy * n)
    return [1.0] * ones + [0.0] * (n - ones)


def sampling(ev: Row) -> Row | None:
    """The ``sampling`` block (pass@k and diversity), or None when no samples were drawn."""
    block = ev.get("sampling")
    return block if isinstance(block, dict) else None


def pass_at_k(ev: Row) -> dict[int, tuple[float | None, tuple[float, float] | None]]:
    """k -> (pass@k, its interval), ordered by k; empty without sampling."""
    block = sampling(ev) or {}
    values = block.get("pass_at_k") if isinstance(block.get("pass_at_k"), dict) else {}
    intervals = block.get("pass_at_k_interval") if isinstance(block.get("pass_at_k_interval"), dict) else {}
    found = {}
    for key, value in values.items():
        if str(key).isdigit():
            found[int(key)] = (number(value), interval(intervals.get(key)))
    return dict(sorted(found.items()))


@dataclass(frozen=True)
class Difference:
    """Accuracy of B minus accuracy of A, with a 95% bootstrap interval."""

    estimate: float
    lo: float
    hi: float
    paired: bool
    rows: int  # held-out rows behind the paired estimate, or B's rows when unpaired


def accuracy_difference(a: Row, b: Row, *, allow_unpaired: bool = True) -> Difference | None:
    """B − A accuracy: paired when both record ``correct`` for the same rows, else unpaired.

    Rows count as the same when the two ``correct`` lists have equal length and the files
    do not name different ``data``. None when either side has no accuracy to resample.
    """
    ca, cb = correct_list(a), correct_list(b)
    same_data = not (a.get("data") and b.get("data") and a.get("data") != b.get("data"))
    if ca is not None and cb is not None and len(ca) == len(cb) and same_data:
        lo, hi = paired_difference_interval(ca, cb)
        return Difference(sum(cb) / len(cb) - sum(ca) / len(ca), lo, hi, True, len(ca))
    ra, rb = accuracy_rows(a), accuracy_rows(b)
    if not allow_unpaired or ra is None or rb is None:
        return None
    lo, hi = unpaired_difference_interval(ra, rb)
    return Difference(sum(rb) / len(rb) - sum(ra) / len(ra), lo, hi, False, len(rb))


def verdict(diff: Difference) -> str:
    """A plain sentence: does the interval exclude 0?"""
    if diff.lo > 0:
        return "the interval excludes 0, so the gain is larger than resampling noise"
    if diff.hi < 0:
        return "the interval excludes 0, so the drop is larger than resampling noise"
    return "the interval includes 0, so the difference is within noise"
