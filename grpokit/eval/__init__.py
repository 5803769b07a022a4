"""Held-out evaluation: greedy answers scored by the recipe's rewards."""

from grpokit.eval.runner import evaluate

__all__ = ["evaluate"]
