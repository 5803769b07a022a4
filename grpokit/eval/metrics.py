"""Evaluation metrics as pure functions: unbiased pass@k, self-BLEU, distinct-n, bootstrap intervals.

- pass@k (Chen et al. 2021, arXiv:2107.03374): with n samples of which c are correct,
  the unbiased estimate of "at least one of k draws is correct" is 1 - C(n-c, k) / C(n, k),
  computed as the product 1 - prod_{i=n-c+1..n} (1 - k/i) to stay exact for large n.
- self-BLEU (Zhu et al. 2018, Texygen): the mean BLEU of each sample against the others
  of the same prompt; 1 = all samples identical, near 0 = nothing shared. BLEU here is
  the geometric mean of clipped 1..4-gram precisions with add-one smoothing for n > 1
  (Lin & Och 2004) and the brevity penalty against the closest reference length.
- distinct-n (Li et al. 2016): unique n-grams / all n-grams over a set of samples.
"""

from __future__ import annotations

import math
import random
from collections import Counter


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one prompt with ``n`` samples, ``c`` of them correct."""
    if not 0 <= c <= n:
        raise ValueError(f"correct samples c={c} must be between 0 and n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs at least k samples per prompt, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypothesis: str, references: list[str], max_n: int = 4) -> float:
    """Sentence BLEU of ``hypothesis`` against ``references`` (whitespace tokens)."""
    hyp = hypothesis.split()
    refs = [r.split() for r in references]
    if not hyp or not refs:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = _ngrams(hyp, n)
        max_ref = Counter()
        for ref in refs:
            max_ref |= _ngrams(ref, n)
        matched = sum(min(count, max_ref[gram]) for gram, count in counts.items())
        total = sum(counts.values())
        smooth = 1.0 if n > 1 else 0.0
        if matched + smooth == 0 or total + smooth == 0:
            return 0.0
        log_precision += math.log((matched + smooth) / (total + smooth)) / max_n
    closest = min((len(r) for r in refs), key=lambda length: (abs(length - len(hyp)), length))
    brevity = 1.0 if len(hyp) >= closest else math.exp(1 - closest / len(hyp))
    return brevity * math.exp(log_precision)


def self_bleu(samples: list[str], max_n: int = 4) -> float:
    """Mean BLEU of each sample against the rest; needs at least two samples."""
    if len(samples) < 2:
        raise ValueError("self-BLEU needs at least two samples")
    return sum(bleu(s, samples[:i] + samples[i + 1:], max_n) for i, s in enumerate(samples)) / len(samples)


def distinct_n(samples: list[str], n: int) -> float:
    """Unique n-grams over all n-grams of the samples (0 when there are none)."""
    grams = Counter()
    for sample in samples:
        grams.update(_ngrams(sample.split(), n))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def bootstrap_interval(values: list[float], iterations: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (e.g. of 0/1 correctness)."""
    if not values:
        raise ValueError("no values to bootstrap")
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(iterations))
    tail = (1 - confidence) / 2
    return means[int(tail * (iterations - 1))], means[int((1 - tail) * (iterations - 1))]
