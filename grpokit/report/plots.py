"""Plots of a run's metrics (docs/run-directory.md) as PNG files.

Pure functions: parsed ``metrics.jsonl`` rows in, PNG files out. They draw with
matplotlib's object API on an Agg canvas directly instead of through ``pyplot``, so
importing grpokit never switches the process-wide backend, no display is needed, and
figures are never left open in a global registry. A plot whose data is absent from
every row (no eval lines, no ``kl`` key) is not written at all.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Row = dict[str, Any]
CAPTIONS = {
    "reward": "Reward per training step (total, moving average, and each component)",
    "accuracy": "Eval accuracy",
    "kl": "KL divergence to the reference model",
    "completion_length": "Mean completion length",
    "loss_entropy": "Policy loss and entropy",
}


def number(value: Any) -> float | None:
    """Return ``value`` as a finite float, or None: logged metrics may be None or NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


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
    """Write the figure as PNG; ``dpi`` keeps text legible when the page scales it."""
    fig.savefig(path, format="png", dpi=110)


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
    """Eval accuracy (in %) against the step it was measured at."""
    steps, accuracy = series(eval_rows, "accuracy")
    if not steps:
        return False
    fig, (ax,) = _figure()
    ax.plot(steps, [100 * a for a in accuracy], marker="o", color="tab:green")
    ax.set(title="Eval accuracy", xlabel="step", ylabel="accuracy (%)")
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


def write_plots(train_rows: list[Row], eval_rows: list[Row], plot_dir: Path) -> list[str]:
    """Write every plot that has data into ``plot_dir``; return the names written, in order.

    The names are the keys of ``CAPTIONS``; the report links ``plots/<name>.png``.
    """
    plot_dir.mkdir(parents=True, exist_ok=True)
    jobs = {
        "reward": lambda p: plot_reward(train_rows, p),
        "accuracy": lambda p: plot_accuracy(eval_rows, p),
        "kl": lambda p: plot_single(train_rows, "kl", "KL to the reference (k3)", "nats / token", p),
        "completion_length": lambda p: plot_completion_length(train_rows, eval_rows, p),
        "loss_entropy": lambda p: plot_loss_entropy(train_rows, p),
    }
    return [name for name, draw in jobs.items() if draw(plot_dir / f"{name}.png")]
