"""The run directory: created fresh, never silently mixed with another run's files, and written by
one process at a time.

A run holds an exclusive ``flock`` on ``<output_dir>/.lock`` from before anything is read or
loaded until it ends; a second ``train`` (fresh, ``--resume`` or ``--overwrite``) on the same
directory refuses at once, naming the holder. The kernel drops the lock when the holder dies,
however it dies, so a crashed run never leaves a stale lock behind (the file may stay; it is
only the lock on it that counts). The lock file lives inside the run directory, not beside it,
so a run directory is self-contained and nothing appears next to it in ``runs/``; ``--overwrite``
empties the directory *around* the lock file instead of deleting it, so the lock it holds
stays the one a third process finds.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

import yaml

from grpokit.errors import RunDirError


log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


def holds_files(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything besides a lock file."""
    return run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir())


def check_run_dir(output_dir: str, overwrite: bool) -> Path:
    """Refuse, before anything is loaded or written, a run dir that already holds files."""
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"training.output_dir {run_dir} is a file, not a directory; set training.output_dir "
                          "(--set training.output_dir=runs/NAME) to a directory")
    if holds_files(run_dir) and not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run; pass --resume to continue it, --overwrite to replace it, "
            "or set training.output_dir (--set training.output_dir=runs/NAME) to keep it and start another"
        )
    return run_dir


def prepare_run_dir(output_dir: str, overwrite: bool) -> Path:
    """An empty ``output_dir`` (an old run's files removed only when ``overwrite``); a lock file in it
    is kept, so the lock of the process preparing it stays in force."""
    run_dir = check_run_dir(output_dir, overwrite)
    if run_dir.is_dir():
        for entry in run_dir.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# ----------------------------------------------------------------------------- writability and the lock


def cannot_write(path: Path, exc: OSError, key: str = "training.output_dir") -> RunDirError:
    """The message for a run directory the kernel refused to create or write (``exc``)."""
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        return RunDirError(f"{key} {path}: {blocker} is a file, not a directory; set {key} "
                           f"(--set {key}=runs/NAME) to a directory path")
    if exc.errno == errno.ELOOP:
        return RunDirError(f"cannot write to {path}: {exc.filename} is a symbolic link, and grpokit writes a run "
                           "directory only through its own files; remove the link")
    return RunDirError(f"cannot write to {path}: {os.strerror(exc.errno).lower() if exc.errno else exc} "
                       f"({exc.filename or path}); set {key} (--set {key}=runs/NAME) to a directory on a writable "
                       "disk, or fix its permissions")


def check_writable(output_dir: str | Path) -> None:
    """Refuse an ``output_dir`` that could not be created or written, writing nothing that stays: the
    kernel is asked by creating an unnamed temporary file in it, or in its nearest existing folder."""
    import tempfile

    path = Path(output_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())  # the last parent, "." or "/", does
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "Not a directory", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise cannot_write(path, exc) from None


class RunLock:
    """An exclusive ``flock`` on ``<output_dir>/.lock`` (the directory is created for it), held
    while the context is open. Another holder makes ``__enter__`` raise ``RunDirError`` at once.

    On leaving, the lock file is removed (while still locked) and so is any folder the lock
    created that stayed empty: a refused or failed start leaves nothing behind. Removing a
    lock file is safe because a process that gets the lock checks that the file it locked is
    still the one at the path (a remover may have unlinked it in between), and tries again if not.
    """

    def __init__(self, output_dir: str | Path):
        self.run_dir = Path(output_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._pid = os.getpid()
        self._created: list[Path] = []

    def __enter__(self) -> "RunLock":
        try:
            self._make_dirs()
            while not self._try_lock():
                pass
        except OSError as exc:
            self._remove_created()
            raise cannot_write(self.run_dir, exc) from None
        except BaseException:
            self._remove_created()
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso(),
                  "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(holder) + "\n").encode(), 0)
        return self

    def _make_dirs(self) -> None:
        missing = [p for p in (self.run_dir, *self.run_dir.parents) if not os.path.lexists(p)]
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except FileExistsError:
                if os.path.isdir(directory):  # another process made it meanwhile: theirs to remove
                    continue
                raise
            self._created.append(directory)

    def _try_lock(self) -> bool:
        """Lock the file at ``self.path``; False when it was replaced meanwhile (try again)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise self._in_use(holder) from None
        except OSError as exc:  # e.g. ENOLCK: a network filesystem without a lock service
            os.close(fd)
            raise RunDirError(f"cannot lock {self.path}: {exc.strerror or exc}; the filesystem of {self.run_dir} does "
                              "not support file locks, which keep two runs from writing one directory. Set "
                              "training.output_dir to a directory on a local disk") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is None or (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
            os.close(fd)
            return False
        self._fd = fd
        return True

    def _in_use(self, holder: dict) -> RunDirError:
        pid = holder.get("pid")
        who = f"pid {pid}" if pid else "pid unknown"
        if holder.get("host") and holder["host"] != socket.gethostname():
            who += f" on {holder['host']}"
        since = f", since {holder['since']}" if holder.get("since") else ""
        command = f": {holder['command']}" if holder.get("command") else ""
        stop = f"stop it with `kill -TERM {pid}` (it writes a checkpoint and exits; then continue with --resume)" \
            if pid else "stop it (SIGTERM writes a checkpoint; then continue with --resume)"
        return RunDirError(f"{self.run_dir} is in use by another grpokit process ({who}{since}{command}); two "
                           f"processes must never write one run directory. Wait for it to end, {stop}, or train "
                           "into another directory with --set training.output_dir=runs/NAME")

    def __exit__(self, *exc) -> None:
        if self._fd is None or os.getpid() != self._pid:  # a forked child never releases its parent's lock
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for directory in reversed(self._created):
            try:
                directory.rmdir()  # only if still empty
            except OSError:
                break
        self._created = []


def _read_holder(fd: int) -> dict:
    """What the holder wrote into the lock file ({} if nothing readable yet)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


# ----------------------------------------------------------------------------- files


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# what a resumed run may change: how long it goes on, what it logs and where it lies (a run directory
# copied or moved elsewhere resumes at its new place), whether its weights are sharded (checkpoints are full
# models either way), never what it learns from
RESUMABLE_CHANGES = ("training.max_steps", "training.eval_every", "training.save_every", "training.keep_checkpoints",
                     "training.max_consecutive_skips", "training.num_threads", "training.output_dir", "training.fsdp",
                     "eval.batch_size", "eval.num_samples", "logging.", "python_path")
# what a resumed run writes into: none may be a link, which would take the writes outside the run directory
WRITTEN_ON_RESUME = ("recipe.yaml", "run.json", "metrics.jsonl", "samples.jsonl", "eval", "checkpoints",
                     "checkpoints/latest", "tensorboard", "wandb", "mlruns")


def recipe_changes(stored: dict, current: dict) -> list[str]:
    """Recipe keys whose values differ, other than those a resume may change."""
    from grpokit.config import differences

    return sorted(key for key, _, _ in differences(stored, current) if not key.startswith(RESUMABLE_CHANGES))


def with_defaults(stored: dict, schema) -> dict:
    """A run's stored recipe with every field the schema has filled in: a key a newer grpokit added, at
    its default (which keeps the old behaviour), is not a change to the run. A stored recipe the schema
    no longer accepts is compared as written (its differences are then listed)."""
    from grpokit.config import dump_recipe, recipe_from_dict
    from grpokit.errors import RecipeError

    try:
        return yaml.safe_load(dump_recipe(recipe_from_dict(copy.deepcopy(stored), schema=schema)))
    except RecipeError:
        return stored


def find_resume_checkpoint(output_dir: str, recipe) -> Path | None:
    """The checkpoint ``--resume`` continues from; None when there is no run yet (a fresh start).

    Refuses a directory that is not a grpokit run, a recipe that changed what the run
    learns from, a run without a complete checkpoint, and a run that already finished. The
    directory may come from elsewhere: links that would lead writes out of it, a ``latest``
    naming anything but a ``step-N`` inside it, and pickled weights are refused too.
    """
    from grpokit.config import dump_recipe
    from grpokit.models.checkpoint import checkpoint_weights, latest_checkpoint

    run_dir = Path(output_dir)
    if not holds_files(run_dir):
        log.info("--resume: nothing to resume in %s, starting a new run", run_dir)
        return None
    for name in WRITTEN_ON_RESUME:
        if (run_dir / name).is_symlink():
            raise RunDirError(f"--resume: {run_dir / name} is a symbolic link; a run writes only inside its own "
                              "directory, so grpokit will not resume through it. Replace the link with a copy of "
                              "what it points to, or start a new run with --overwrite")
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
    changed = recipe_changes(with_defaults(stored, type(recipe)), yaml.safe_load(dump_recipe(recipe)))
    if changed:
        raise RunDirError(f"--resume: the recipe differs from the run's {recipe_file} at {', '.join(changed[:5])}"
                          f"{' and more' if len(changed) > 5 else ''}; a resumed run must learn from the same recipe "
                          "(only training.max_steps, eval/save cadence, logging and the run directory's place may "
                          "change). Use the run's recipe, or train into a new training.output_dir")
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise RunDirError(f"--resume: {run_dir} holds a run but no complete checkpoint (it stopped before its first "
                          "save, see training.save_every); start it again with --overwrite")
    checkpoint_weights(checkpoint, recipe.model.lora is not None)  # before the model loads
    step = int(checkpoint.name.split("-")[1])
    if step >= recipe.training.max_steps:
        raise RunDirError(f"--resume: {run_dir} already reached step {step} of training.max_steps = "
                          f"{recipe.training.max_steps}; raise it (--set training.max_steps=N) to train further")
    return checkpoint
