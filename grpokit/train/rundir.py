"""The run directory: created fresh, never silently mixed with another run's files."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from grpokit.errors import RunDirError


def prepare_run_dir(output_dir: str, overwrite: bool) -> Path:
    """Create ``output_dir``; refuse one that already holds files unless ``overwrite``."""
    run_dir = Path(output_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"{run_dir} already holds a run; pass --overwrite to replace it "
                "or set training.output_dir (--set training.output_dir=runs/NAME) to keep it"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_json(path: Path, payload: dict) -> None:
    """Write via a temporary file and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    tmp.replace(path)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
