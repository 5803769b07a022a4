"""``grpokit compare``: several evaluations side by side, and whether their gaps are noise.

Each source is an eval JSON file, or a run directory standing for one of its eval files:
the last ``eval/step-N.json`` by step number (the final model of a training run); when
the directory has no step files, the newest ``eval/*.json`` by modification time (the
latest ``grpokit eval`` of it). Columns are named by the run directory, or by the file
(``runs/sft/eval/final.json`` -> ``sft/final``), made unique.

Differences in accuracy against the first source get a 95% bootstrap interval
(grpokit.report.stats): paired when both files record per-row correctness of the same
held-out rows, else from two independent bootstraps, which is wider.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpokit.errors import RunDirError
from grpokit.io import replace_file
from grpokit.report.files import Row, number, read_json, step_eval_files
from grpokit.report.markdown import EvalFigure, cell, eval_figures, fmt, format_difference, rounded, table
from grpokit.report.plots import plot_comparison
from grpokit.report.stats import accuracy_difference, correct_list, interval, pass_at_k, sampling, verdict

_AGAIN = "run the comparison again"


@dataclass(frozen=True)
class Source:
    """One column of the comparison: the eval file read and what to call it."""

    name: str
    path: Path
    ev: Row


def find_eval_file(source: Path) -> Path:
    """The eval file a source stands for (module docstring); RunDirError when there is none."""
    if source.is_file():
        return source
    if not source.is_dir():
        raise RunDirError(
            f"{source} does not exist. Pass a run directory written by `grpokit train` or an eval "
            "JSON file written by `grpokit eval` (e.g. RUN_DIR/eval/final.json)."
        )
    eval_dir = source / "eval"
    if steps := step_eval_files(eval_dir):
        return steps[-1][1]
    named = [p for p in eval_dir.glob("*.json") if p.is_file()]
    if named:
        return max(named, key=lambda p: (p.stat().st_mtime, p.name))
    hint = " (this looks like an eval/ folder: pass the run directory above it)" if source.name == "eval" else ""
    raise RunDirError(
        f"{source} has no eval files (no {eval_dir}/step-N.json from training, no {eval_dir}/<name>.json "
        f"from `grpokit eval`){hint}. Run `grpokit eval --model {source}` first, or pass an eval JSON file."
    )


def _default_name(source: Path, eval_file: Path) -> str:
    """The run directory's name, or ``<run>/<stem>`` for a file inside a run's ``eval/``."""
    if source.is_dir():
        return source.resolve().name
    resolved = eval_file.resolve()
    if resolved.parent.name == "eval" and resolved.parent.parent.name:
        return f"{resolved.parent.parent.name}/{resolved.stem}"
    return resolved.stem


def _unique(names: list[str]) -> list[str]:
    """Repeated names get `` (2)``, `` (3)``… in order, so every column can be told apart."""
    out: list[str] = []
    for name in names:
        candidate, i = name, 1
        while candidate in out:
            i += 1
            candidate = f"{name} ({i})"
        out.append(candidate)
    return out


def load_sources(sources: list[str | Path], names: list[str] | None = None) -> list[Source]:
    """Resolve and read every source; RunDirError naming the source (and line) on any problem."""
    if len(sources) < 2:
        raise RunDirError(
            f"compare needs at least two runs or eval files, got {len(sources)}. "
            "Pass two or more run directories or eval JSON files."
        )
    if names is not None and len(names) != len(sources):
        raise RunDirError(f"got {len(names)} names for {len(sources)} sources; pass one name per source, in order.")
    found = []
    for source in map(Path, sources):
        path = find_eval_file(source)
        ev = read_json(path, _AGAIN)
        if "accuracy" not in ev:
            raise RunDirError(
                f"{path} is not an eval file (it has no `accuracy`). Pass a run directory, its "
                "eval/step-N.json, or a file written by `grpokit eval`."
            )
        found.append((_default_name(source, path), path, ev))
    columns = _unique(list(names) if names is not None else [name for name, _, _ in found])
    return [Source(name, path, ev) for name, (_, path, ev) in zip(columns, found)]


def _ranked_cells(figure: EvalFigure, evs: list[Row]) -> list[str]:
    """One table row's cells, the best in bold with a ★.

    Values are ranked as printed (rounded), so two cells that read the same tie. Nothing is
    marked when fewer than two sources have the value or when all of them tie.
    """
    got = [figure.get(ev) for ev in evs]
    cells = [fmt(value, figure.kind, iv) for value, iv in got]
    if figure.better is None:
        return cells
    shown = {i: v for i, (value, _) in enumerate(got) if (v := rounded(value, figure.kind)) is not None}
    if len(shown) < 2 or len(set(shown.values())) == 1:
        return cells
    best = (max if figure.better == "higher" else min)(shown.values())
    return [f"**{c}** ★" if shown.get(i) == best else c for i, c in enumerate(cells)]


def _describe(source: Source) -> str:
    """Where a column's numbers come from, on one line."""
    ev = source.ev
    parts = [f"`{source.path}`"]
    parts += [f"step {ev['step']}"] if ev.get("step") is not None else []
    parts += [f"{key} {cell(ev[key])}" for key in ("model", "data") if ev.get(key) is not None]
    if block := sampling(ev):
        parts.append(f"{block.get('num_generations')} samples per prompt at temperature {block.get('temperature')}")
    return f"- **{cell(source.name)}**: " + " · ".join(parts)


def _difference_lines(sources: list[Source]) -> list[str]:
    """Each source's accuracy minus the first one's, with its interval and a verdict."""
    base = sources[0]
    lines = [f"## Accuracy against {cell(base.name)}", ""]
    for other in sources[1:]:
        label = f"- {cell(other.name)} − {cell(base.name)}:"
        diff = accuracy_difference(base.ev, other.ev)
        if diff is None:
            lines.append(f"{label} cannot be estimated: a file lacks `accuracy` or `num_examples`.")
            continue
        if diff.paired:
            how = f"paired bootstrap over the same {diff.rows} held-out rows"
        elif correct_list(base.ev) is not None and correct_list(other.ev) is not None:
            how = "two independent bootstraps: the two were not scored on the same rows"
        else:
            how = "two independent bootstraps: a file has no per-row `correct` list to pair, as in older files"
        lines.append(f"{label} {format_difference(diff)} ({how}); {verdict(diff)}.")
    return lines + [""]


def _differing(sources: list[Source], get: Any) -> dict[str, Any]:
    """name -> value for the sources that have one, when those values are not all equal."""
    values = {s.name: v for s in sources if (v := get(s.ev)) is not None}
    return values if len({repr(v) for v in values.values()}) > 1 else {}


def _notes(sources: list[Source]) -> list[str]:
    """Warnings that the columns are not like for like."""

    def listing(values: dict[str, Any]) -> str:
        return ", ".join(f"{cell(name)}: {cell(value)}" for name, value in values.items())

    notes = []
    data = _differing(sources, lambda ev: ev.get("data"))
    examples = _differing(sources, lambda ev: ev.get("num_examples"))
    if data or examples:
        what = "; ".join(f"{label} {listing(values)}" for label, values in (("data", data), ("examples", examples))
                         if values)
        notes.append(f"Note: the sources were evaluated on different data ({what}), so this is not a like-for-like "
                     "comparison: differences mix the models with the eval sets.")
    if scorer := _differing(sources, lambda ev: ev.get("accuracy_reward")):
        notes.append(f"Note: accuracy was scored by different rewards ({listing(scorer)}).")
    keys = ("num_generations", "temperature", "top_p")
    settings = _differing(sources, lambda ev: tuple(b.get(k) for k in keys) if (b := sampling(ev)) else None)
    if settings:
        shown = {name: f"K={n}, temperature {t}, top-p {p}" for name, (n, t, p) in settings.items()}
        notes.append(f"Note: pass@k, self-BLEU and distinct-n were sampled with different settings "
                     f"({listing(shown)}); diversity figures depend strongly on them.")
    return notes


def _plot(sources: list[Source], path: Path) -> bool:
    """Accuracy and every pass@k as grouped bars, one colour per source."""
    ks = sorted({k for s in sources for k in pass_at_k(s.ev)})
    groups = ["accuracy", *(f"pass@{k}" for k in ks)]
    values = [[number(s.ev.get("accuracy")) for s in sources]]
    intervals = [[interval(s.ev.get("accuracy_interval")) for s in sources]]
    for k in ks:
        points = [pass_at_k(s.ev).get(k, (None, None)) for s in sources]
        values.append([number(v) for v, _ in points])
        intervals.append([iv for _, iv in points])
    return plot_comparison([s.name for s in sources], groups, values, intervals, path)


def comparison_body(sources: list[Source]) -> list[str]:
    """The side-by-side table, its legend, the notes and the accuracy differences (Markdown lines)."""
    evs = [s.ev for s in sources]
    header = ["metric", *(cell(s.name) for s in sources)]
    rows = [[f.label, *_ranked_cells(f, evs)] for f in eval_figures(evs)]
    legend = ("★ marks the best value of each row: higher is better, except self-BLEU, where lower means more "
              "diverse samples; completion length and examples are not ranked. Brackets: 95% bootstrap intervals "
              "over the held-out rows; pass@k is the unbiased estimator of Chen et al. 2021.")
    lines = [*map(_describe, sources), "", *table(header, rows), "", legend, ""]
    lines += [*(f"{note}\n" for note in _notes(sources))]
    return lines + _difference_lines(sources)


def comparison_markdown(sources: list[Source], plotted: bool) -> str:
    """The whole comparison page."""
    lines = [f"# Comparison of {len(sources)} evaluations", "", *comparison_body(sources)]
    if plotted:
        lines += ["## Accuracy and pass@k", "", "![Accuracy and pass@k per source](comparison.png)", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_comparison(sources: list[str | Path], out_dir: str | Path, names: list[str] | None = None) -> Path:
    """Write ``out_dir/comparison.md`` and ``out_dir/comparison.png``; return the Markdown's path.

    ``sources`` are run directories or eval JSON files (module docstring for which file a
    run directory stands for); ``names`` optionally name the columns, one per source.
    Raises ``RunDirError`` for fewer than two sources, a missing source, a run directory
    without eval files, or a malformed file (naming ``file:line``).
    """
    loaded = load_sources(list(sources), names)
    out = Path(out_dir)  # the user's choice of folder: a link there is theirs to make
    out.mkdir(parents=True, exist_ok=True)
    plotted = _plot(loaded, out / "comparison.png")
    path = out / "comparison.md"
    replace_file(path, comparison_markdown(loaded, plotted).encode("utf-8"))
    return path
