"""JSON-lines reading shared by the data loaders and the report: one place for file:line errors."""

from __future__ import annotations

import json
from pathlib import Path


class JsonLineError(ValueError):
    """A line that is not a JSON object; each stage re-raises it as its own error with its own hint."""

    def __init__(self, path: Path, lineno: int, what: str):
        super().__init__(f"{path}:{lineno}: {what}")
        self.path, self.lineno, self.what = path, lineno, what


def read_jsonl_lines(path: str | Path) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line. Raises JsonLineError or UnicodeDecodeError."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as lines:
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise JsonLineError(path, lineno, f"not valid JSON ({exc.msg}, column {exc.colno})") from None
            if not isinstance(row, dict):
                raise JsonLineError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows
