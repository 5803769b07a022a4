"""Writing a file whole, for every stage: one atomic-replace writer for run files, reports and pointers."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def replace_file(path: Path, data: bytes) -> None:
    """Write ``path`` whole by atomic replace: a new file beside it (``O_EXCL``: never an existing
    file or a link planted under that name; mode from the umask, as a plain write), fsynced, then
    renamed over ``path``. A reader never sees half a file, and a link at ``path`` is replaced,
    never written through."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
