"""The text of ``report.md``: what was trained, what changed, and how training went.

Every number comes from the run directory (docs/run-directory.md), already parsed by
``grpokit.report``; nothing here reads files. Missing keys become "—" or a skipped
section, never an exception, so a report can be written for a run that is still going
or that died early.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from grpokit.report.plots import CAPTIONS, Row, number, series
from grpokit.report.stats import Difference, accuracy_difference, interval, pass_at_k, sampling, verdict

_MISSING = object()
_DASH = "—"
_RECIPE_FIELDS = (
    "model.path model.dtype model.lora data.source rollout.num_generations rollout.max_completion_length"
    " rollout.temperature training.prompts_per_step training.max_steps training.learning_rate"
    " algorithm.beta algorithm.epsilon rewards"
).split()
# kind of eval figure -> (digits, scale, suffix of a value, unit of a change)
_KINDS = {"pct": (1, 100, "%", " pp"), "score": (3, 1, "", ""), "length": (1, 1, "", ""), "count": (0, 1, "", "")}
MAX_SAMPLES = 8
MAX_CELL_CHARS = 200


def cell(value: Any, limit: int = MAX_CELL_CHARS) -> str:
    """Make text show verbatim in one Markdown table cell: truncated, then escaped.

    A ``|`` would end the cell and a newline the row; ``*``, ``_`` and backticks would turn
    ``3*4*5`` into emphasis; ``<think>``-style tags would be swallowed as HTML, hiding
    exactly what a reader wants to see. Newlines become ``<br>`` so lines stay visible.
    """
    text = str(value).strip()
    if len(text) > limit:
        text = text[:limit].rstrip() + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = re.sub(r"([\\`*_|])", r"\\\1", text)
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def signed(delta: float, digits: int, unit: str = "") -> str:
    """``+21.9 pp``; rounding first so a tiny negative never prints as ``-0.0``."""
    delta = round(delta, digits) or 0.0
    return f"{delta:+.{digits}f}{unit}"


def _dig(tree: Any, path: str) -> Any:
    """Look up ``a.b.c`` in nested dicts, returning ``_MISSING`` at the first absent key."""
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return _MISSING
        tree = tree[key]
    return tree


def _format_lora(lora: Any) -> str:
    """LoRA rank and alpha, or "full fine-tuning" when the recipe sets no adapter."""
    if lora is None:
        return "full fine-tuning"
    if isinstance(lora, dict):
        rank, alpha = lora.get("r", lora.get("rank")), lora.get("alpha", lora.get("lora_alpha"))
        if rank is not None or alpha is not None:
            return f"LoRA r={rank}, alpha={alpha}"
    return f"LoRA {lora}"


def _format_rewards(rewards: Any) -> str:
    """``name × weight`` for each reward, whether the recipe lists them or maps names."""
    if isinstance(rewards, dict):
        rewards = [{"name": k, **(v if isinstance(v, dict) else {"weight": v})} for k, v in rewards.items()]
    if not isinstance(rewards, list):
        return str(rewards)
    items = [r if isinstance(r, dict) else {"name": r} for r in rewards]
    weights = ["" if r.get("weight") is None else f" × {r['weight']}" for r in items]
    return ", ".join(f"{r.get('name', '?')}{w}" for r, w in zip(items, weights))


def recipe_section(recipe: dict[str, Any]) -> list[str]:
    """The important recipe fields, those present, as a two-column table."""
    formats = {"model.lora": _format_lora, "rewards": _format_rewards}
    fields = [(p, v) for p in _RECIPE_FIELDS if (v := _dig(recipe, p)) is not _MISSING]
    rows = [[f"`{p}`", cell(formats.get(p, str)(v))] for p, v in fields]
    if not rows:
        return ["## Recipe", "", "No recipe.yaml in the run directory.", ""]
    return ["## Recipe", "", *table(["field", "value"], rows), ""]


Interval = tuple[float, float] | None


@dataclass(frozen=True)
class EvalFigure:
    """One row of an eval table: its label, how to print it, how to read it from an eval file."""

    label: str
    kind: str  # a key of _KINDS
    get: Callable[[Row], tuple[Any, Interval]]  # eval file -> (value, 95% interval or None)
    better: str | None = "higher"  # "higher", "lower", or None when no value is better


def _key(key: str, block: bool = False) -> Callable[[Row], tuple[Any, Interval]]:
    """Getter of a top-level figure, or (``block``) of one in the ``sampling`` block."""
    return lambda ev: (((sampling(ev) or {}) if block else ev).get(key), None)


def _component(name: str) -> Callable[[Row], tuple[Any, Interval]]:
    """Getter of one greedy reward component (None where it did not apply)."""

    def get(ev: Row) -> tuple[Any, Interval]:
        rewards = ev.get("rewards")
        return (rewards.get(name) if isinstance(rewards, dict) else None), None

    return get


def eval_figures(evals: list[Row]) -> list[EvalFigure]:
    """The rows an eval table of ``evals`` needs, in reading order.

    Files without the newer fields (intervals, ``sampling``) give exactly the older rows:
    accuracy, mean reward, each reward component, completion length, examples.
    """
    ks = sorted({k for ev in evals for k in pass_at_k(ev)})
    names = [n for ev in evals if isinstance(ev.get("rewards"), dict) for n in ev["rewards"]]
    sampled = any(sampling(ev) for ev in evals)
    figures = [EvalFigure("Accuracy", "pct", lambda ev: (ev.get("accuracy"), interval(ev.get("accuracy_interval"))))]
    figures += [EvalFigure(f"pass@{k}", "pct", lambda ev, k=k: pass_at_k(ev).get(k, (None, None))) for k in ks]
    if sampled:
        figures += [
            EvalFigure("self-BLEU (lower = more diverse)", "score", _key("self_bleu", True), "lower"),
            EvalFigure("distinct-1", "score", _key("distinct_1", True)),
            EvalFigure("distinct-2", "score", _key("distinct_2", True)),
        ]
    figures.append(EvalFigure("Mean reward", "score", _key("reward")))
    figures += [EvalFigure(f"reward `{n}`", "score", _component(n)) for n in dict.fromkeys(names)]
    if sampled:
        figures.append(EvalFigure("Mean reward (sampled)", "score", _key("reward", True)))
    figures.append(EvalFigure("Mean completion length (tokens)", "length", _key("completion_length"), None))
    if sampled:
        figures.append(EvalFigure("Mean completion length, sampled (tokens)", "length",
                                  _key("completion_length", True), None))
    figures.append(EvalFigure("Examples", "count", _key("num_examples"), None))
    return figures


def fmt(value: Any, kind: str, iv: Interval = None) -> str:
    """One figure in its kind's precision, accuracy as a percentage: ``99.2% [97.7, 100.0]``."""
    digits, scale, suffix, _ = _KINDS[kind]
    value = number(value)
    if value is None:
        return _DASH
    text = f"{value * scale:.{digits}f}{suffix}"
    return text if iv is None else f"{text} [{iv[0] * scale:.{digits}f}, {iv[1] * scale:.{digits}f}]"


def rounded(value: Any, kind: str) -> float | None:
    """A figure as printed (scaled and rounded), so values that read the same compare equal."""
    digits, scale, _, _ = _KINDS[kind]
    value = number(value)
    return None if value is None else round(value * scale, digits)


def _delta(before: Any, after: Any, kind: str) -> str:
    """after − before, signed; accuracy in percentage points, not a relative change."""
    digits, scale, _, unit = _KINDS[kind]
    b, a = number(before), number(after)
    return _DASH if b is None or a is None else signed((a - b) * scale, digits, unit)


def format_difference(diff: Difference) -> str:
    """``+21.9 pp [+9.4, +34.4]``: a difference of accuracies and its interval."""
    return f"{signed(100 * diff.estimate, 1, ' pp')} [{signed(100 * diff.lo, 1)}, {signed(100 * diff.hi, 1)}]"


def sampling_note(evals: list[Row]) -> list[str]:
    """Where the sampled figures come from; one line per distinct set of sampling settings."""
    keys = ("num_generations", "temperature", "top_p", "seed")
    settings = dict.fromkeys(tuple(block.get(k) for k in keys) for ev in evals if (block := sampling(ev)))
    if not settings:
        return []
    described = "; ".join(f"{n} completions per prompt at temperature {t}, top-p {p}, seed {s}"
                          for n, t, p, s in settings)
    return [f"Accuracy, mean reward and length are from greedy answers; pass@k (the unbiased estimator of "
            f"Chen et al. 2021), self-BLEU, distinct-n and the sampled rows from {described}. "
            "Brackets: 95% bootstrap intervals over the held-out rows."]


def eval_section(evals: list[Row]) -> list[str]:
    """Earliest eval against the latest one, with the signed change of each figure."""
    if not evals:
        return ["## Before and after", "", "No eval files (`eval/step-N.json`) in the run directory.", ""]
    compare = len(evals) > 1
    first, last = evals[0], evals[-1]
    header = ["metric", f"before (step {first.get('step')})"]
    header += [f"after (step {last.get('step')})", "change"] if compare else []
    rows = []
    for figure in eval_figures([first, last] if compare else [first]):
        (b, b_iv), (a, a_iv) = figure.get(first), figure.get(last)
        after = [fmt(a, figure.kind, a_iv), _delta(b, a, figure.kind)] if compare else []
        rows.append([figure.label, fmt(b, figure.kind, b_iv), *after])
    source = last.get("accuracy_reward")
    notes = [f"Accuracy is the share of eval examples that reward `{source}` scored as correct."] if source else []
    notes += sampling_note([first, last] if compare else [first])
    if compare and (diff := accuracy_difference(first, last, allow_unpaired=False)):
        notes.append(f"Accuracy change, paired bootstrap over the same {diff.rows} held-out rows: "
                     f"{format_difference(diff)}; {verdict(diff)}.")
    notes += [] if compare else ["Only one evaluation so far: nothing to compare yet."]
    return ["## Before and after", "", *table(header, rows), "", *notes, ""]


def plots_section(plot_names: list[str]) -> list[str]:
    """Relative image links, so the report renders wherever the run directory is copied."""
    if not plot_names:
        return ["## Plots", "", "No plottable metrics were logged.", ""]
    lines = ["## Plots", ""]
    for name in plot_names:
        caption = CAPTIONS.get(name, name)
        lines += [f"### {caption}", "", f"![{caption}](plots/{name}.png)", ""]
    return lines


def _median(rows: list[Row], key: str) -> float | None:
    """Median rather than mean: the first steps pay compilation and warm-up costs."""
    values = series(rows, key)[1]
    return statistics.median(values) if values else None


def training_section(train_rows: list[Row]) -> list[str]:
    """Speed figures and whether the training reward went up, from the train lines."""
    lines = ["## Training summary", ""]
    if not train_rows:
        return lines + ["No training steps were logged.", ""]
    rows = []
    if (step_time := _median(train_rows, "step_time_s")) is not None:
        rows.append(["median step time", f"{step_time:.2f} s"])
    if (throughput := _median(train_rows, "tokens_per_s")) is not None:
        rows.append(["median throughput", f"{throughput:,.0f} tokens/s"])
    steps, reward = series(train_rows, "reward")
    if reward:
        k = max(1, len(reward) // 10)
        first, last = statistics.fmean(reward[:k]), statistics.fmean(reward[-k:])
        rows.append([f"mean reward, first 10% (steps {steps[0]}–{steps[k - 1]})", f"{first:.3f}"])
        rows.append([f"mean reward, last 10% (steps {steps[-k]}–{steps[-1]})", f"{last:.3f}"])
        rows.append(["reward change (last − first)", signed(last - first, 3)])
    return lines + (table(["figure", "value"], rows) if rows else ["No speed or reward figures were logged."]) + [""]


def _prompt_text(prompt: Any) -> str:
    """A chat prompt (list of messages) shows its last message: the question itself."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        return str(prompt[-1].get("content", prompt[-1]))
    return str(prompt)


def _correct(sample: Row) -> str:
    """yes / no from the eval's own verdict; a missing verdict shows as unknown."""
    return {True: "yes", False: "no"}.get(sample.get("correct"), _DASH)


def _paired_samples(evals: list[Row]) -> list[tuple[Row, Row]]:
    """The latest eval's samples whose prompt the earliest eval also sampled, in order."""
    if len(evals) < 2:
        return []
    before = {_sample_key(s): s for s in evals[0].get("samples") or [] if isinstance(s, dict)}
    after = [s for s in evals[-1].get("samples") or [] if isinstance(s, dict)]
    return [(before[k], s) for s in after if (k := _sample_key(s)) in before][:MAX_SAMPLES]


def _sample_key(sample: Row) -> tuple:
    """A held-out row as its prompt and its images: a visual task asks one question of many images."""
    images = sample.get("images")
    return _prompt_text(sample.get("prompt")), tuple(images) if isinstance(images, list) else ()


def _prompt_cell(sample: Row) -> str:
    """The question, after thumbnails of its images (``eval/images/<key>.png``, written beside the evals)."""
    images = sample.get("images") if isinstance(sample.get("images"), list) else []
    thumbnails = "".join(f"![image](eval/images/{key}.png) " for key in images if re.fullmatch(r"[0-9a-f]+", str(key)))
    return thumbnails + cell(_prompt_text(sample.get("prompt")))


def _training_samples(samples: list[Row]) -> list[str]:
    """Fallback when evals cannot be paired: completions from the last logged train step."""
    steps = [s["step"] for s in samples if isinstance(s.get("step"), int)]
    if not steps:
        return ["No sample completions were recorded.", ""]
    chosen = [s for s in samples if s.get("step") == max(steps)][:MAX_SAMPLES]
    texts = [[_prompt_text(s.get("prompt")), s.get("completion", ""), s.get("answer", _DASH)] for s in chosen]
    rows = [[*map(cell, t), fmt(s.get("reward"), "score")] for t, s in zip(texts, chosen)]
    intro = f"No eval samples to compare; training completions from step {max(steps)} (`samples.jsonl`):"
    return [intro, "", *table(["prompt", "completion", "answer", "reward"], rows), ""]


def samples_section(evals: list[Row], samples: list[Row]) -> list[str]:
    """The same eval prompts answered before and after training, side by side."""
    lines = ["## Sample completions", ""]
    pairs = _paired_samples(evals)
    if not pairs:
        return lines + _training_samples(samples)
    before, after = f"before (step {evals[0].get('step')})", f"after (step {evals[-1].get('step')})"
    header = ["prompt", "answer", before, "correct", after, "correct"]
    rows = [
        [_prompt_cell(a), cell(a.get("answer", _DASH))]
        + [cell(b.get("completion", "")), _correct(b), cell(a.get("completion", "")), _correct(a)]
        for b, a in pairs
    ]
    return lines + table(header, rows) + [""]


def trajectory_section(evals: list[Row]) -> list[str]:
    """One held-out episode before and after training, turn by turn (multi-turn runs only)."""
    pair = next(((b, a) for b, a in _paired_samples(evals) if b.get("trajectory") and a.get("trajectory")), None)
    if pair is None:
        return []
    lines = ["## A trajectory before and after", "", f"Prompt: {cell(_prompt_text(pair[1].get('prompt')))}", ""]
    for label, sample in zip((f"before (step {evals[0].get('step')})", f"after (step {evals[-1].get('step')})"), pair):
        episode = sample["trajectory"]
        rows = [[str(i + 1), cell(m.get("role", "")), cell(message_content(m))]
                for i, m in enumerate(episode.get("messages") or [])]
        lines += [f"**{label}**: {episode.get('turns')} turns, ended: {cell(episode.get('end', ''))}, "
                  f"correct: {_correct(sample)}", "", *table(["#", "role", "message"], rows), ""]
    return lines


def message_content(message: Row) -> str:
    content = message.get("content")
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


def header_section(name: str, run_info: Row, train_rows: list[Row]) -> list[str]:
    """Title and the run's status line from run.json; steps fall back to the last train line."""
    steps = run_info.get("steps", train_rows[-1]["step"] if train_rows else _DASH)
    wall_s = number(run_info.get("wall_s"))
    wall = _DASH if wall_s is None else f"{wall_s / 60:.1f} min"
    status = f"**Status:** {run_info.get('status', 'unknown')} · **Steps:** {steps} · **Wall time:** {wall}"
    keys = {"model": "Model", "started": "started", "finished": "finished", "grpokit_version": "grpokit"}
    details = " · ".join(f"{label} {cell(run_info[k])}" for k, label in keys.items() if run_info.get(k) is not None)
    return [f"# Training report: {name}", "", status, "", *([details, ""] if details else [])]


def build_markdown(
    *,
    name: str,
    run_info: Row,
    recipe: dict[str, Any],
    train_rows: list[Row],
    evals: list[Row],
    samples: list[Row],
    plot_names: list[str],
) -> str:
    """The whole report, section by section, in the order a reader asks the questions."""
    sections = (
        header_section(name, run_info, train_rows),
        recipe_section(recipe),
        eval_section(evals),
        plots_section(plot_names),
        training_section(train_rows),
        samples_section(evals, samples),
        trajectory_section(evals),
    )
    return "\n".join(line for section in sections for line in section).rstrip() + "\n"
