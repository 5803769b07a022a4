"""The report stage: turn a run directory into ``report.md`` and ``plots/*.png``.

It reads the run directory and nothing else (docs/run-directory.md), so a report can be
written on another machine, long after training, or while a run is still going. The
required files are the directory itself and ``metrics.jsonl``; every other file and
every metric key is optional and its section or plot is skipped when absent. Malformed
files are errors that name ``file:line``, since a silently skipped line would make the
report lie about the run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from grpokit.errors import RunDirError
from grpokit.jsonio import JsonLineError, read_jsonl_lines
from grpokit.report.markdown import build_markdown
from grpokit.report.plots import Row, write_plots

__all__ = ["write_report"]

_EVAL_FILE = re.compile(r"step-(\d+)\.json")


def _bad_line(path: Path, lineno: int, what: str) -> RunDirError:
    """The one message for a malformed line: where, what, and how to get past it."""
    return RunDirError(
        f"{path}:{lineno}: {what}. The file was probably cut off by a crash or edited by hand; "
        "repair or delete that line and run the report again."
    )


def _read_jsonl(path: Path) -> list[tuple[int, Row]]:
    """(line number, object) for each non-blank line; anything but a JSON object is an error."""
    try:
        return read_jsonl_lines(path)
    except JsonLineError as e:
        raise _bad_line(e.path, e.lineno, e.what) from e


def _read_json(path: Path) -> Row:
    """One JSON object from a whole file, errors pointing at the offending line."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise _bad_line(path, e.lineno, f"not valid JSON ({e.msg}, column {e.colno})") from e
    if not isinstance(data, dict):
        raise _bad_line(path, 1, f"expected a JSON object, got {type(data).__name__}")
    return data


def _read_recipe(path: Path) -> dict[str, Any]:
    """The resolved recipe as a plain nested dict; an absent file gives an empty one."""
    if not path.is_file():
        return {}
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise _bad_line(path, mark.line + 1 if mark else 1, f"not valid YAML ({getattr(e, 'problem', e)})") from e
    if recipe is not None and not isinstance(recipe, dict):
        raise _bad_line(path, 1, f"expected a mapping of recipe sections, got {type(recipe).__name__}")
    return recipe or {}


def _split_metrics(path: Path) -> tuple[list[Row], list[Row]]:
    """Train and eval lines, each sorted by step.

    A resumed run logs the steps after its last checkpoint a second time; the later line
    is the one that led to the final model, so for a repeated (kind, step) the last wins.
    """
    latest: dict[tuple[str, int], Row] = {}
    for lineno, row in _read_jsonl(path):
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise _bad_line(path, lineno, f"`step` must be an integer, got {step!r}")
        latest[(row.get("kind", "train"), step)] = row
    ordered = sorted(latest.items(), key=lambda item: item[0][1])
    train = [row for (kind, _), row in ordered if kind == "train"]
    evals = [row for (kind, _), row in ordered if kind == "eval"]
    return train, evals


def _read_evals(eval_dir: Path) -> list[Row]:
    """Every ``eval/step-N.json``, ordered by N as a number (step-10 comes after step-9)."""
    found = []
    for path in eval_dir.glob("step-*.json"):
        if match := _EVAL_FILE.fullmatch(path.name):
            data = _read_json(path)
            data.setdefault("step", int(match.group(1)))
            found.append((int(match.group(1)), data))
    return [data for _, data in sorted(found, key=lambda item: item[0])]


def _check_run_dir(run: Path) -> None:
    """Fail early, saying which required file is missing and how to produce it."""
    if not run.is_dir():
        raise RunDirError(
            f"run directory {run} does not exist. Pass the directory a training run wrote "
            "(its `output_dir`), or run `grpokit train RECIPE` first."
        )
    if not (run / "metrics.jsonl").is_file():
        raise RunDirError(
            f"{run / 'metrics.jsonl'} is missing: {run} is not a training run directory, or training "
            "stopped before its first step. Run `grpokit train RECIPE` first (see docs/run-directory.md)."
        )


def write_report(run_dir: str | Path) -> Path:
    """Write ``<run_dir>/report.md`` and ``<run_dir>/plots/*.png``; return the report's path.

    Raises ``RunDirError`` when the directory or its ``metrics.jsonl`` is missing, or when a
    file in it is malformed (the message names ``file:line``).
    """
    run = Path(run_dir)
    _check_run_dir(run)
    train_rows, eval_rows = _split_metrics(run / "metrics.jsonl")
    run_info = _read_json(run / "run.json") if (run / "run.json").is_file() else {}
    evals = _read_evals(run / "eval")
    samples_path = run / "samples.jsonl"
    samples = [row for _, row in _read_jsonl(samples_path)] if samples_path.is_file() else []
    # metrics.jsonl and eval/*.json carry the same eval figures; the files stand in for
    # the lines when a run logged only the files
    curve = eval_rows or [{k: v for k, v in e.items() if k != "samples"} for e in evals]
    plot_names = write_plots(train_rows, curve, run / "plots")
    text = build_markdown(
        name=run.resolve().name,
        run_info=run_info,
        recipe=_read_recipe(run / "recipe.yaml"),
        train_rows=train_rows,
        evals=evals,
        samples=samples,
        plot_names=plot_names,
    )
    report = run / "report.md"
    report.write_text(text, encoding="utf-8")
    return report
