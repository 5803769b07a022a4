"""The report stage: turn a run directory into ``report.md`` and ``plots/*.png``.

It reads the run directory and nothing else (docs/run-directory.md), so a report can be
written on another machine, long after training, or while a run is still going. The
required files are the directory itself and ``metrics.jsonl``; every other file and
every metric key is optional and its section or plot is skipped when absent. Malformed
files are errors that name ``file:line``, since a silently skipped line would make the
report lie about the run.

``write_comparison`` (grpokit.report.compare) puts several eval files or runs side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from grpokit.errors import RunDirError
from grpokit.report.compare import write_comparison
from grpokit.io import replace_file
from grpokit.report.files import Row, bad_line, read_json, read_jsonl, read_step_evals, step_eval_files
from grpokit.report.markdown import build_markdown
from grpokit.report.plots import write_plots
from grpokit.report.stats import interval, pass_at_k

__all__ = ["write_comparison", "write_report"]


def _read_recipe(path: Path) -> dict[str, Any]:
    """The resolved recipe as a plain nested dict; an absent file gives an empty one."""
    if not path.is_file():
        return {}
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise bad_line(path, mark.line + 1 if mark else 1, f"not valid YAML ({getattr(e, 'problem', e)})") from e
    if recipe is not None and not isinstance(recipe, dict):
        raise bad_line(path, 1, f"expected a mapping of recipe sections, got {type(recipe).__name__}")
    return recipe or {}


def _split_metrics(path: Path) -> tuple[list[Row], list[Row]]:
    """Train and eval lines, each sorted by step.

    A resumed run logs the steps after its last checkpoint a second time; the later line
    is the one that led to the final model, so for a repeated (kind, step) the last wins.
    """
    latest: dict[tuple[str, int], Row] = {}
    for lineno, row in read_jsonl(path):
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int):
            raise bad_line(path, lineno, f"`step` must be an integer, got {step!r}")
        latest[(row.get("kind", "train"), step)] = row
    ordered = sorted(latest.items(), key=lambda item: item[0][1])
    train = [row for (kind, _), row in ordered if kind == "train"]
    evals = [row for (kind, _), row in ordered if kind == "eval"]
    return train, evals


def _eval_line(ev: Row) -> Row:
    """An eval file's scalars under the names a metrics.jsonl eval line uses."""
    line = {k: v for k, v in ev.items() if k not in ("samples", "correct", "sampling", "accuracy_interval")}
    if iv := interval(ev.get("accuracy_interval")):
        line["accuracy_lo"], line["accuracy_hi"] = iv
    return line


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
    run_info = read_json(run / "run.json") if (run / "run.json").is_file() else {}
    evals = read_step_evals(run / "eval")
    samples_path = run / "samples.jsonl"
    samples = [row for _, row in read_jsonl(samples_path)] if samples_path.is_file() else []
    # metrics.jsonl and eval/*.json carry the same eval figures; the files stand in for
    # the lines when a run logged only the files
    curve = eval_rows or [_eval_line(e) for e in evals]
    pass_curves = [(f"step {e.get('step')}", points) for e in evals if (points := pass_at_k(e))]
    recipe = _read_recipe(run / "recipe.yaml")
    algorithm = recipe.get("algorithm") if isinstance(recipe.get("algorithm"), dict) else {}
    estimator = algorithm.get("kl_estimator") if isinstance(algorithm.get("kl_estimator"), str) else None
    plot_names = write_plots(train_rows, curve, run / "plots", pass_curves, kl_estimator=estimator)
    text = build_markdown(
        name=run.resolve().name,
        run_info=run_info,
        recipe=recipe,
        train_rows=train_rows,
        evals=evals,
        samples=samples,
        plot_names=plot_names,
    )
    text += named_evals_section(run / "eval", evals)
    report = run / "report.md"
    replace_file(report, text.encode("utf-8"))  # a link planted as report.md is replaced, not written through
    return report


def named_evals_section(eval_dir: Path, evals: list[Row]) -> str:
    """The run's `grpokit eval` files beside its first and last training evals, as compare shows them."""
    from grpokit.report.compare import Source, comparison_body

    steps = {path for _, path in step_eval_files(eval_dir)}
    named = sorted(p for p in eval_dir.glob("*.json") if p.is_file() and p not in steps)
    if not named:
        return ""
    ends = evals[:1] + evals[-1:] if len(evals) > 1 else evals
    sources = [Source(f"step {e.get('step')}", eval_dir / f"step-{e.get('step')}.json", e) for e in ends]
    sources += [Source(p.stem, p, read_json(p)) for p in named]
    lines = ["", "## Evaluations with `grpokit eval`", "", *comparison_body(sources)]
    return "\n".join(lines).rstrip() + "\n"
