"""Reading run-directory files for the report and the comparison, with ``file:line`` errors.

A silently skipped line would make a report lie about a run, so anything malformed is a
``RunDirError`` naming the file and line and saying how to get past it.

Writing, too, treats a run directory as untrusted (it may come from someone else): files are
written by atomic replace, so a link planted where report.md or a plot goes is replaced, never
written through, and an output folder that is a link is refused.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
from pathlib import Path
from typing import Any

from grpokit.errors import RunDirError
from grpokit.jsonio import JsonLineError, read_jsonl_lines

Row = dict[str, Any]
EVAL_STEP_FILE = re.compile(r"step-(\d+)\.json")


def number(value: Any) -> float | None:
    """Return ``value`` as a finite float, or None: logged metrics may be None or NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def bad_line(path: Path, lineno: int, what: str, again: str = "run the report again") -> RunDirError:
    """The one message for a malformed line: where, what, and how to get past it."""
    return RunDirError(
        f"{path}:{lineno}: {what}. The file was probably cut off by a crash or edited by hand; "
        f"repair or delete that line and {again}."
    )


def read_jsonl(path: Path) -> list[tuple[int, Row]]:
    """(line number, object) for each non-blank line; anything but a JSON object is an error."""
    try:
        return read_jsonl_lines(path)
    except JsonLineError as e:
        raise bad_line(e.path, e.lineno, e.what) from e


def read_json(path: Path, again: str = "run the report again") -> Row:
    """One JSON object from a whole file, errors pointing at the offending line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise bad_line(path, e.lineno, f"not valid JSON ({e.msg}, column {e.colno})", again) from e
    except UnicodeDecodeError as e:
        raise bad_line(path, 1, f"not UTF-8 text ({e.reason} at byte {e.start})", again) from e
    if not isinstance(data, dict):
        raise bad_line(path, 1, f"expected a JSON object, got {type(data).__name__}", again)
    return data


def step_eval_files(eval_dir: Path) -> list[tuple[int, Path]]:
    """``(N, path)`` of every ``eval/step-N.json``, ordered by N as a number (step-10 after step-9)."""
    found = [(int(m.group(1)), p) for p in eval_dir.glob("step-*.json") if (m := EVAL_STEP_FILE.fullmatch(p.name))]
    return sorted(found, key=lambda item: item[0])


def read_step_evals(eval_dir: Path) -> list[Row]:
    """Every ``eval/step-N.json`` in step order, ``step`` filled in from the name when absent."""
    evals = []
    for step, path in step_eval_files(eval_dir):
        data = read_json(path)
        data.setdefault("step", step)
        evals.append(data)
    return evals


def output_dir(path: Path) -> Path:
    """Create ``path`` if needed and make sure it is a real directory, not a link to somewhere else
    (the kernel says so: ``O_NOFOLLOW`` refuses to open a link)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC))
    except FileExistsError:
        raise RunDirError(f"{path} is a file, not a directory; move it away and run again") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and path.is_symlink():
            raise RunDirError(f"{path} is a symbolic link (to {os.readlink(path)}); reports are written only "
                              f"inside the directory itself, never through a link. Remove it (rm {path}) and run "
                              "again") from None
        raise
    return path
