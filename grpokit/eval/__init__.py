"""Held-out evaluation: greedy accuracy, pass@k and diversity, scored by the recipe's rewards."""

from grpokit.eval.runner import EvalSettings, evaluate, metrics_line

__all__ = ["EvalSettings", "evaluate", "metrics_line"]
