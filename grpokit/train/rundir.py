"""The run directory: created fresh, never silently mixed with another run's files."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import yaml

from grpokit.errors import RunDirError

log = logging.getLogger(__name__)


def check_run_dir(output_dir: str, overwrite: bool) -> Path:
    """Refuse, before anything is loaded or written, a run dir that already holds files."""
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"training.output_dir {run_dir} is a file, not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or set training.output_dir (--set training.output_dir=runs/NAME) to keep it and start another"
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


# what a resumed run may change: how long it goes on and what it logs, never what it learns from
RESUMABLE_CHANGES = ("training.max_steps", "training.eval_every", "training.save_every", "training.keep_checkpoints",
                     "training.max_consecutive_skips", "training.num_threads", "eval.batch_size", "eval.num_samples",
                     "logging.", "python_path")


def recipe_changes(stored: dict, current: dict) -> list[str]:
    """Recipe keys whose values differ, other than those a resume may change."""
    from grpokit.config import differences

    return sorted(key for key, _, _ in differences(stored, current) if not key.startswith(RESUMABLE_CHANGES))


def find_resume_checkpoint(output_dir: str, recipe) -> Path | None:
    """The checkpoint ``--resume`` continues from; None when there is no run yet (a fresh start).

    Refuses a directory that is not a grpokit run, a recipe that changed what the run
    learns from, a run without a complete checkpoint, and a run that already finished.
    """
    from grpokit.config import dump_recipe
    from grpokit.models.checkpoint import latest_checkpoint

    run_dir = Path(output_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        log.info("--resume: nothing to resume in %s, starting a new run", run_dir)
        return None
    recipe_file = run_dir / "recipe.yaml"
    if not recipe_file.is_file():
        raise RunDirError(f"--resume: {run_dir} holds files but no recipe.yaml, so it is not a grpokit run; "
                          "set training.output_dir to another directory")
    try:
        stored = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"--resume: cannot read the run's {recipe_file} ({type(exc).__name__}); "
                          "restore it, or start a new run with --overwrite") from None
    if not isinstance(stored, dict):
        raise RunDirError(f"--resume: the run's {recipe_file} is not a recipe mapping; restore it, or use --overwrite")
    changed = recipe_changes(stored, yaml.safe_load(dump_recipe(recipe)))
    if changed:
        raise RunDirError(f"--resume: the recipe differs from the run's {recipe_file} at {', '.join(changed[:5])}"
                          f"{' and more' if len(changed) > 5 else ''}; a resumed run must learn from the same recipe "
                          "(only training.max_steps, eval/save cadence and logging may change). Use the run's recipe, "
                          "or train into a new training.output_dir")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise RunDirError(f"--resume: {run_dir} holds a run but no complete checkpoint (it stopped before its first "
                          "save, see training.save_every); start it again with --overwrite")
    step = int(checkpoint.name.split("-")[1])
    if step >= recipe.training.max_steps:
        raise RunDirError(f"--resume: {run_dir} already reached step {step} of training.max_steps = "
                          f"{recipe.training.max_steps}; raise it (--set training.max_steps=N) to train further")
    return checkpoint
