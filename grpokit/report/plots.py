"""Plots of a run's metrics (docs/run-directory.md) as PNG files.

Pure functions: parsed ``metrics.jsonl`` rows in, PNG files out. They draw with
matplotlib's object API on an Agg canvas directly instead of through ``pyplot``, so
importing grpokit never switches the process-wide backend, no display is needed, and
figures are never left open in a global registry. A plot whose data is absent from
every row (no eval lines, no ``kl`` key) is not written at all.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator

from grpokit.io import replace_file
from grpokit.report.files import Row, number, output_dir

CAPTIONS = {
    "reward": "Reward per training step (total, moving average, and each component)",
    "accuracy": "Eval accuracy",
    "pass_at_k": "pass@k against k, sampled completions (bars: 95% bootstrap interval)",
    "kl": "KL divergence to the reference model",
    "completion_length": "Mean completion length",
    "loss_entropy": "Policy loss and entropy",
}


def series(rows: list[Row], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of ``key`` over ``rows``, skipping rows where it is missing."""
    steps: list[int] = []
    values: list[float] = []
    for row in rows:
        value = number(row.get(key))
        if value is not None:
            steps.append(row["step"])
            values.append(value)
    return steps, values


def reward_components(rows: list[Row]) -> list[str]:
    """Names of the ``rewards/<name>`` components logged in ``rows``, in first-seen order.

    ``rewards/<name>_std`` is the spread of ``<name>``, not a component of its own; it is
    recognised by its base key being present too, so a reward really called ``x_std``
    still counts.
    """
    keys = [k for row in rows for k in row if k.startswith("rewards/")]
    present = set(keys)
    names = [k for k in dict.fromkeys(keys) if not (k.endswith("_std") and k[: -len("_std")] in present)]
    return [k[len("rewards/") :] for k in names]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values; the first points average what exists so far."""
    out: list[float] = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _figure(nrows: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure bound to an Agg canvas, sized for a Markdown page."""
    fig = Figure(figsize=(7.0, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, 1, i + 1) for i in range(nrows)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    return fig, axes


def _line(ax: Axes, steps: list[int], values: list[float], **style: Any) -> None:
    """Plot a series; a single point gets a marker, or it would be invisible."""
    if len(steps) == 1:
        style.setdefault("marker", "o")
    ax.plot(steps, values, **style)


def _save(fig: Figure, path: Path) -> None:
    """Write the figure as PNG (by atomic replace); ``dpi`` keeps text legible when the page scales it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    replace_file(path, buffer.getvalue())


def plot_reward(train_rows: list[Row], path: Path) -> bool:
    """Total reward per step, its moving average, and each raw reward component."""
    steps, reward = series(train_rows, "reward")
    components = [(name, *series(train_rows, f"rewards/{name}")) for name in reward_components(train_rows)]
    components = [c for c in components if c[1]]
    if not steps and not components:
        return False
    fig, (ax,) = _figure()
    if steps:
        _line(ax, steps, reward, color="tab:blue", alpha=0.35, label="reward (total)")
        window = max(1, min(25, len(reward) // 10))
        if window > 1:
            ax.plot(steps, moving_average(reward, window), color="tab:blue", label=f"moving average ({window} steps)")
    # components start at colour C1: C0 is the total's
    for i, (name, c_steps, c_values) in enumerate(components, start=1):
        _line(ax, c_steps, c_values, color=f"C{i % 10}", linestyle="--", linewidth=1.0, label=name)
    ax.set(title="Reward per training step", xlabel="step", ylabel="mean reward")
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def plot_accuracy(eval_rows: list[Row], path: Path) -> bool:
    """Eval accuracy (in %) against the step it was measured at, with its interval as a band."""
    steps, accuracy = series(eval_rows, "accuracy")
    if not steps:
        return False
    fig, (ax,) = _figure()
    band = [(r["step"], lo, hi) for r in eval_rows
            if (lo := number(r.get("accuracy_lo"))) is not None and (hi := number(r.get("accuracy_hi"))) is not None]
    if band:
        b_steps, lo, hi = zip(*band)
        ax.fill_between(b_steps, [100 * v for v in lo], [100 * v for v in hi], color="tab:green", alpha=0.2,
                        linewidth=0, label="95% bootstrap interval")
    ax.plot(steps, [100 * a for a in accuracy], marker="o", color="tab:green", label="accuracy (greedy)")
    if band:
        ax.legend(fontsize="small")
    ax.set(title="Eval accuracy", xlabel="step", ylabel="accuracy (%)")
    _save(fig, path)
    return True


def _error_bars(values: list[float], intervals: list[tuple[float, float] | None]) -> list[list[float]]:
    """Matplotlib's asymmetric ``yerr`` from [lo, hi] pairs; an unknown interval draws no bar."""
    below = [0.0 if iv is None else max(0.0, v - iv[0]) for v, iv in zip(values, intervals)]
    above = [0.0 if iv is None else max(0.0, iv[1] - v) for v, iv in zip(values, intervals)]
    return [below, above]


def _spread(items: list, most: int) -> list:
    """At most ``most`` items, always the first and the last, the rest evenly spaced."""
    if len(items) <= most:
        return items
    picks = sorted({round(i * (len(items) - 1) / (most - 1)) for i in range(most)})
    return [items[i] for i in picks]


def _ramp(i: int, n: int) -> Any:
    """Colour ``i`` of ``n`` along viridis, light (early) to dark (late), skipping its faint yellow end."""
    return colormaps["viridis"](0.8 - 0.8 * i / max(n - 1, 1))


PassCurve = tuple[str, dict[int, tuple[float, tuple[float, float] | None]]]


def plot_pass_at_k(curves: list[PassCurve], path: Path, most: int = 5) -> bool:
    """pass@k (in %) against k, one line per labelled eval, with interval error bars.

    ``curves`` are (label, {k: (pass@k, interval or None)}) in training order; with many
    evals only ``most`` are drawn (first, last, evenly spaced between), darker = later. The
    k axis is logarithmic when k spans a factor of 10 or more, where pass@k's gains live.
    """
    known = [(label, {k: p for k, p in points.items() if p[0] is not None}) for label, points in curves]
    curves = _spread([(label, points) for label, points in known if points], most)
    if not curves:
        return False
    fig, (ax,) = _figure()
    ks = sorted({k for _, points in curves for k in points})
    for i, (label, points) in enumerate(curves):
        k_axis = sorted(points)
        values = [100 * points[k][0] for k in k_axis]
        intervals = [None if points[k][1] is None else tuple(100 * v for v in points[k][1]) for k in k_axis]
        color = _ramp(i, len(curves))
        ax.errorbar(k_axis, values, yerr=_error_bars(values, intervals), marker="o", capsize=3, color=color,
                    label=label)
    if ks[-1] >= 10 * ks[0]:
        ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(k) for k in ks])
    ax.set(title="pass@k (sampled completions)", xlabel="k", ylabel="pass@k (%)")
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def plot_comparison(names: list[str], groups: list[str], values: list[list[float | None]],
                    intervals: list[list[tuple[float, float] | None]], path: Path) -> bool:
    """Grouped bars: one group per figure (accuracy, pass@k), one bar per source, in %.

    ``values[g][s]`` and ``intervals[g][s]`` are figure ``g`` of source ``s`` as fractions;
    None where that source lacks the figure (no bar).
    """
    if not any(v is not None for row in values for v in row):
        return False
    fig = Figure(figsize=(max(6.0, 1.2 + 0.45 * len(groups) * len(names)), 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, axis="y", alpha=0.3)
    width = 0.8 / len(names)
    for s, name in enumerate(names):
        shown = [(g, 100 * row[s], intervals[g][s]) for g, row in enumerate(values) if row[s] is not None]
        if not shown:
            continue
        xs = [g - 0.4 + width * (s + 0.5) for g, _, _ in shown]
        heights = [h for _, h, _ in shown]
        ivs = [None if iv is None else (100 * iv[0], 100 * iv[1]) for _, _, iv in shown]
        bars = {"yerr": _error_bars(heights, ivs), "capsize": 3} if any(ivs) else {}
        ax.bar(xs, heights, width=width * 0.95, color=f"C{s % 10}", label=name, **bars)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(title="Accuracy and pass@k per source", ylabel="%", ylim=(0, 108))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a bar
    _save(fig, path)
    return True


def plot_single(train_rows: list[Row], key: str, title: str, ylabel: str, path: Path) -> bool:
    """One train metric against the step, e.g. ``kl``."""
    steps, values = series(train_rows, key)
    if not steps:
        return False
    fig, (ax,) = _figure()
    _line(ax, steps, values, color="tab:red")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    _save(fig, path)
    return True


def plot_completion_length(train_rows: list[Row], eval_rows: list[Row], path: Path) -> bool:
    """Mean completion length in training, with eval lengths as points to compare."""
    steps, length = series(train_rows, "completion_length")
    e_steps, e_length = series(eval_rows, "completion_length")
    if not steps and not e_steps:
        return False
    fig, (ax,) = _figure()
    if steps:
        _line(ax, steps, length, color="tab:purple", label="train")
    if e_steps:
        ax.plot(e_steps, e_length, "o", color="tab:orange", label="eval")
    ax.set(title="Mean completion length", xlabel="step", ylabel="tokens")
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def plot_loss_entropy(train_rows: list[Row], path: Path) -> bool:
    """Policy loss and entropy stacked, one panel each, only those that were logged."""
    panels = [(key, *series(train_rows, key)) for key in ("loss", "entropy")]
    panels = [p for p in panels if p[1]]
    if not panels:
        return False
    fig, axes = _figure(len(panels))
    for ax, (key, steps, values) in zip(axes, panels):
        _line(ax, steps, values, color="tab:gray")
        ax.set(title=key, xlabel="step", ylabel="nats / token" if key == "entropy" else key)
    _save(fig, path)
    return True


def write_plots(train_rows: list[Row], eval_rows: list[Row], plot_dir: Path,
                pass_curves: list[PassCurve] = (), kl_estimator: str | None = None) -> list[str]:
    """Write every plot that has data into ``plot_dir``; return the names written, in order.

    The names are the keys of ``CAPTIONS``; the report links ``plots/<name>.png``.
    ``kl_estimator`` is the run's ``algorithm.kl_estimator``, named in the KL plot's title
    (k1 can go negative, k2 and k3 cannot); None when the run directory does not say.
    """
    output_dir(plot_dir)
    kl_title = f"KL to the reference ({kl_estimator})" if kl_estimator else "KL to the reference"
    jobs = {
        "reward": lambda p: plot_reward(train_rows, p),
        "accuracy": lambda p: plot_accuracy(eval_rows, p),
        "pass_at_k": lambda p: plot_pass_at_k(list(pass_curves), p),
        "kl": lambda p: plot_single(train_rows, "kl", kl_title, "nats / token", p),
        "completion_length": lambda p: plot_completion_length(train_rows, eval_rows, p),
        "loss_entropy": lambda p: plot_loss_entropy(train_rows, p),
    }
    return [name for name, draw in jobs.items() if draw(plot_dir / f"{name}.png")]
