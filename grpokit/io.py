"""Writing a file whole, for every stage: one atomic-replace writer for run files, data files,
reports and pointers, and the JSON/text forms of it the run directory uses."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(handle)`` on a new file beside ``path``, fsync it, then rename it over ``path``.

    The new file is opened with ``O_EXCL | O_NOFOLLOW`` (never an existing file or a link planted
    under that name; mode from the umask, as a plain write). A reader never sees half a file, a
    failed write leaves the old file as it was, and a link at ``path`` is replaced, never written
    through."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` as the whole of ``path`` by atomic replace."""
    atomic_write(path, lambda handle: handle.write(data))


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` atomically with ``text`` (UTF-8), creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, text.encode("utf-8"))


def write_json(path: str | Path, payload: dict) -> None:
    """Write a JSON file (indented, UTF-8) by atomic replace."""
    write_text(path, json.dumps(payload, indent=2, ensure_ascii=False))
