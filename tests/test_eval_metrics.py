"""pass@k, self-BLEU, distinct-n and bootstrap intervals against hand values and edge cases."""

import math

import pytest

from grpokit.eval.metrics import bleu, bootstrap_interval, distinct_n, pass_at_k, self_bleu


def test_pass_at_k_hand_values_and_edges():
    # n = 5, c = 2, k = 2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the plain accuracy
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(4, 4, 2) == 1.0
    assert pass_at_k(5, 4, 2) == 1.0  # fewer than k wrong samples: some draw must be right
    assert pass_at_k(200, 13, 100) == pytest.approx(1 - math.comb(187, 100) / math.comb(200, 100))
    with pytest.raises(ValueError, match="at least k samples"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="between 0 and n"):
        pass_at_k(3, 4, 1)


def test_self_bleu_identical_vs_disjoint():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(1.0)
    assert self_bleu(["alpha beta gamma delta", "one two three four", "red green blue black"]) < 0.05
    partly = self_bleu(["the cat sat on the mat", "the cat sat on a rug"])
    assert 0.05 < partly < 1.0
    with pytest.raises(ValueError):
        self_bleu(["only one"])


def test_bleu_hand_value_with_brevity_penalty():
    # unigram 2/2 ; bigram (1+1)/(1+1) ; trigram+ smoothed (0+1)/(0+1); BP = exp(1 - 4/2)
    assert bleu("a b", ["a b c d"]) == pytest.approx(math.exp(1 - 2))
    assert bleu("", ["a"]) == 0.0


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == pytest.approx(2 / 4)
    assert distinct_n(["a b", "a b"], 2) == pytest.approx(1 / 2)
    assert distinct_n(["x"], 2) == 0.0


def test_bootstrap_interval_contains_the_mean_and_narrows_with_more_data():
    small = bootstrap_interval([1.0, 0.0] * 10)
    large = bootstrap_interval([1.0, 0.0] * 500)
    assert small[0] < 0.5 < small[1] and large[0] < 0.5 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
    assert bootstrap_interval([1.0] * 10) == (1.0, 1.0)
