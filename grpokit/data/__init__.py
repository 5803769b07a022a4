"""Datasets as plain rows: dicts with a ``prompt`` column plus any extra columns (TRL's format).

Extra columns (``answer`` above all, and ``data_source``, the name of the row's source) reach
reward functions as keyword arguments.
"""

from grpokit.data.loaders import load_splits, mix_sources, read_jsonl, read_rows
from grpokit.data.tasks import TASKS, make_task

__all__ = ["TASKS", "load_splits", "make_task", "mix_sources", "read_jsonl", "read_rows"]
