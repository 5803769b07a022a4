"""Metric sinks. JSONL is always on: it is the run directory's record and the report's input."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol


class MetricsSink(Protocol):
    def log(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write null so every reader can parse the line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlSink:
    """Append one JSON object per line and flush, so a crash loses at most the line in flight."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = self.path.open("a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        self._handle.write(json.dumps({k: _clean(v) for k, v in row.items()}, ensure_ascii=False) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
