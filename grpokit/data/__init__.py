"""Datasets as plain rows: dicts with a ``prompt`` column plus any extra columns (TRL's format).

Extra columns (``answer`` above all) reach reward functions as keyword arguments.
"""

from grpokit.data.loaders import load_splits, read_jsonl
from grpokit.data.tasks import TASKS, make_task

__all__ = ["TASKS", "load_splits", "make_task", "read_jsonl"]
