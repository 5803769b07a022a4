"""Stratified splits: two parts of a dataset with the same distribution of one column.

A numeric column is cut into quantile bins; any other column has one stratum per
value. Within each stratum the rows are shuffled with the seed and ``round(ratio * n)``
of them (Python's round: half to even) go to the first part, the rest to the second,
so every stratum is split in the same proportion, within one row. Both parts keep the
input's row order; the same rows, column, ratio and seed always give the same split.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path

import numpy as np

from grpokit.data.episodes import check_outputs, write_jsonl
from grpokit.io import atomic_write
from grpokit.data.loaders import read_jsonl
from grpokit.errors import DataError


def _where(source: str, row: dict, position: int) -> str:
    return f"{source}:{row.get('_line', position + 1)}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def quantile_bins(values: list[float], quantiles: int) -> tuple[list[int], list[float]]:
    """Bin of each value and the bin edges ``[min, e1, ..., max]``.

    Edges are the values' quantiles at 1/q, ..., (q-1)/q (linear interpolation). Bins are
    ``[e_i, e_i+1)``, the last one closed. Tied quantiles collapse into one edge, and a bin
    left empty is merged into the next one (its upper edge dropped), so every bin holds
    rows; there may be fewer than ``quantiles`` bins.
    """
    array = np.asarray(values, dtype=float)
    inner = np.unique(np.quantile(array, np.linspace(0.0, 1.0, quantiles + 1)[1:-1]))
    # the last bin holds the maximum, so only bins below it can be empty
    counts = np.bincount(np.searchsorted(inner, array, side="right"), minlength=len(inner) + 1)
    inner = inner[counts[:-1] > 0]
    bins = np.searchsorted(inner, array, side="right")
    return bins.tolist(), [float(array.min()), *map(float, inner), float(array.max())]


def _bin_label(edges: list[float], index: int) -> str:
    close = "]" if index == len(edges) - 2 else ")"
    return f"[{edges[index]:.6g}, {edges[index + 1]:.6g}{close}"


def _strata(rows: list[dict], by: str, quantiles: int, source: str) -> tuple[list[str], list[str], str, list | None]:
    """Stratum key of each row, the keys in report order, the column's kind and its bin edges."""
    values = [row[by] for row in rows]
    present = [v for v in values if v is not None]
    if present and all(_is_number(v) for v in present):
        for position, row in enumerate(rows):
            if row[by] is None or math.isnan(row[by]):
                raise DataError(f"{_where(source, row, position)}: column {by!r} is {row[by]!r} here but numeric "
                                "elsewhere; fill it in or drop the row")
        bins, edges = quantile_bins(values, quantiles)
        labels = [_bin_label(edges, i) for i in range(len(edges) - 1)]
        return [labels[b] for b in bins], labels, "numeric", edges
    keys = [v if isinstance(v, str) else json.dumps(v, sort_keys=True, ensure_ascii=False) for v in values]
    return keys, sorted(set(keys)), "categorical", None


def stratified_split(rows: list[dict], by: str, quantiles: int = 4, ratio: float = 0.5, seed: int = 0,
                     source: str = "rows") -> tuple[list[dict], list[dict], dict]:
    """Split ``rows`` into ``(first, second, report)`` with the same distribution of column ``by``.

    ``report`` holds the column's kind, the bin edges (numeric columns) and per-stratum
    counts. ``source`` names the file in errors; rows read by ``read_jsonl`` carry their
    line number (``_line``), so a row lacking the column is named by file:line.
    """
    if not 0 < ratio < 1:
        raise DataError(f"ratio must be strictly between 0 and 1, not {ratio}")
    if quantiles < 1:
        raise DataError(f"quantiles must be at least 1, not {quantiles}")
    if not rows:
        raise DataError(f"{source}: no rows to split")
    for position, row in enumerate(rows):
        if by not in row:
            columns = sorted(k for k in row if k != "_line")
            raise DataError(f"{_where(source, row, position)}: row has no column {by!r} (it has {columns})")
    keys, order, kind, edges = _strata(rows, by, quantiles, source)
    members: dict[str, list[int]] = defaultdict(list)
    for position, key in enumerate(keys):
        members[key].append(position)
    rng = random.Random(seed)
    first_at, strata = [], []
    for key in order:  # one generator, strata in a fixed order: the whole split follows from the seed
        positions = members[key][:]
        rng.shuffle(positions)
        take = round(ratio * len(positions))
        first_at += positions[:take]
        strata.append({"stratum": key, "rows": len(positions), "first": take, "second": len(positions) - take})
    chosen = set(first_at)
    first = [row for position, row in enumerate(rows) if position in chosen]
    second = [row for position, row in enumerate(rows) if position not in chosen]
    for name, part in (("first", first), ("second", second)):
        if not part:
            raise DataError(f"{source}: the {name} split would be empty ({len(rows)} rows, ratio {ratio}, "
                            f"rounded per stratum over {len(order)} strata); change --ratio or use fewer --quantiles")
    report = {"column": by, "kind": kind, "edges": edges, "ratio": ratio, "seed": seed,
              "rows": len(rows), "first": len(first), "second": len(second), "strata": strata}
    return first, second, report


def plot_split(first: list[dict], second: list[dict], report: dict, path: str | Path,
               names: tuple[str, str] = ("first", "second")) -> None:
    """Histogram of the split column in both parts, overlaid as shares so unequal sizes compare."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by = report["column"]
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = [f"{name} ({len(part)} rows)" for name, part in zip(names, (first, second))]
    if report["kind"] == "numeric":
        everything = [row[by] for row in first + second]
        edges = np.histogram_bin_edges(everything, bins=max(5, min(30, math.isqrt(len(everything)))))
        for part, label in zip((first, second), labels):
            values = [row[by] for row in part]
            ax.hist(values, bins=edges, weights=np.full(len(values), 1 / len(values)), alpha=0.5, label=label)
        for edge in report["edges"][1:-1]:
            ax.axvline(edge, color="grey", linestyle="--", linewidth=0.8)
    else:
        strata = [s["stratum"] for s in report["strata"]]
        x = np.arange(len(strata))
        for offset, part, label in ((-0.2, first, labels[0]), (0.2, second, labels[1])):
            counts = {s: 0 for s in strata}
            for row in part:
                value = row[by]
                counts[value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)] += 1
            ax.bar(x + offset, [counts[s] / len(part) for s in strata], width=0.4, alpha=0.7, label=label)
        ax.set_xticks(x, [s[:20] for s in strata], rotation=45 if len(strata) > 6 else 0, ha="right")
    ax.set_xlabel(by)
    ax.set_ylabel("share of rows")
    ax.set_title(f"{by}: {report['kind']} split, ratio {report['ratio']}, seed {report['seed']}")
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))


def default_plot_path(first_out: str | Path) -> Path:
    """``<dir of the first output>/<its stem>.split.png``."""
    first_out = Path(first_out)
    return first_out.with_name(f"{first_out.stem}.split.png")


def write_split(input_path: str | Path, by: str, first_out: str | Path, second_out: str | Path,
                quantiles: int = 4, ratio: float = 0.5, seed: int = 0, plot: str | Path | None = None,
                overwrite: bool = False) -> dict:
    """Split a JSONL file into two files and a histogram; return the report (with the paths written).

    Refuses before reading anything when an output is the input, two outputs are the
    same path, or an output exists (unless ``overwrite``).
    """
    plot = Path(plot) if plot is not None else default_plot_path(first_out)
    check_outputs([first_out, second_out, plot], inputs=[input_path], overwrite=overwrite)
    rows = read_jsonl(input_path)
    first, second, report = stratified_split(rows, by, quantiles, ratio, seed, source=str(input_path))
    write_jsonl(first_out, first)
    write_jsonl(second_out, second)
    plot_split(first, second, report, plot, names=(Path(first_out).name, Path(second_out).name))
    report["paths"] = {"first": str(first_out), "second": str(second_out), "plot": str(plot)}
    return report
