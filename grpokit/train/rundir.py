"""The run directory: created fresh, never silently mixed with another run's files."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from grpokit.errors import RunDirError


def check_run_dir(output_dir: str, overwrite: bool) -> Path:
    """Refuse, before anything is loaded or written, a run dir that already holds files."""
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"training.output_dir {run_dir} is a file, not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run; pass --overwrite to replace it "
            "or set training.output_dir (--set training.output_dir=runs/NAME) to keep it"
        )
    return run_dir


def prepare_run_dir(output_dir: str, overwrite: bool) -> Path:
    """Create an empty ``output_dir`` (replacing an old run only when ``overwrite``)."""
    run_dir = check_run_dir(output_dir, overwrite)
    if run_dir.is_dir():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


def write_json(path: Path, payload: dict) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    tmp.replace(path)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
