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
    """``(line number, object)`` for every non-blank line. Raises JsonLineError or UnicodeDecodeError.

    The file is decoded whole, so a UnicodeDecodeError's ``start`` is the byte offset in the
    file (a text-mode read reports it within an 8 KiB chunk). A leading UTF-8 byte-order
    mark is allowed, as Python's own ``json.load`` allows it; lines end at ``\\n`` only.
    """
    path = Path(path)
    text = path.read_bytes().decode("utf-8")
    rows = []
    for lineno, line in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JsonLineError(path, lineno, f"not valid JSON ({exc.msg}, column {exc.colno})") from None
        except RecursionError:
            raise JsonLineError(path, lineno, "not valid JSON (nested too deeply)") from None
        except ValueError as exc:  # e.g. an integer of over 4300 digits
            raise JsonLineError(path, lineno, f"not valid JSON ({exc})") from None
        if not isinstance(row, dict):
            raise JsonLineError(path, lineno, f"expected a JSON object, got {type(row).__name__}")
        rows.append((lineno, row))
    return rows
