"""The report stage against a run directory written by hand, with values worked out here."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from grpokit.errors import RunDirError
from grpokit.report import plots, write_report
from grpokit.report.plots import plot_accuracy, plot_reward

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 20
RECIPE = {
    "model": {"path": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "float32", "lora": {"r": 16, "alpha": 32}},
    "data": {"source": "builtin:arithmetic"},
    "rollout": {"num_generations": 4, "max_completion_length": 64, "temperature": 1.0},
    "training": {"prompts_per_step": 8, "max_steps": STEPS, "learning_rate": 1e-5},
    "algorithm": {"beta": 0.04, "epsilon": 0.2},
    "rewards": [{"name": "answer_match", "weight": 1.0}, {"name": "format", "weight": 0.2}],
}


def _train_line(step: int, with_kl: bool) -> dict:
    """Reward rises by 0.05 a step, so the first/last 10% means are easy to work out."""
    line = {
        "step": step, "kind": "train", "reward": 0.05 * step, "reward_std": 0.1,
        "rewards/answer_match": 0.04 * step, "rewards/answer_match_std": 0.2, "rewards/format": 1.0,
        "loss": -0.01 * step, "entropy": 1.5 - 0.02 * step, "completion_length": 30.0 + step,
        "step_time_s": float(step % 3 + 1), "tokens_per_s": 1000.0 + 10 * step,
    }
    if with_kl:
        line["kl"] = 0.001 * step
    return line


def _eval(step: int, accuracy: float, completions: list[str], correct: list[bool]) -> dict:
    """One eval/step-N.json; samples are listed in a different order per file on purpose."""
    prompts = ["What is 2+2?", "What is 3*3?", "Say | pipes\nand newlines"]
    answers = ["4", "9", "x"]
    order = range(3) if step == 0 else reversed(range(3))
    samples = [
        {"prompt": prompts[i], "completion": completions[i], "answer": answers[i], "correct": correct[i]} for i in order
    ]
    return {
        "step": step, "accuracy": accuracy, "reward": accuracy + 0.125, "rewards": {"answer_match": accuracy},
        "completion_length": 40.0 - step / 2, "num_examples": 32, "accuracy_reward": "answer_match",
        "samples": samples,
    }


def make_run(root: Path, *, evals: bool = True, with_kl: bool = True) -> Path:
    """A finished 20-step run: recipe, run.json, metrics, and evals at steps 0, 5 and 20."""
    run = root / "demo-run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    run_info = {"status": "finished", "started": "2025-01-01T00:00:00", "wall_s": 750.0, "steps": STEPS,
                "model": "SmolLM2-135M-Instruct", "grpokit_version": "0.1.0"}
    (run / "run.json").write_text(json.dumps(run_info))
    lines = [_train_line(s, with_kl) for s in range(1, STEPS + 1)]
    if evals:
        # 8/32 correct before, 15/32 after: +21.875 pp, printed +21.9 pp
        files = {0: _eval(0, 0.25, ["5", "6", "a" * 300], [False, False, False]),
                 5: _eval(5, 0.3, ["4", "6", "y"], [True, False, False]),
                 20: _eval(20, 15 / 32, ["4", "9", "x"], [True, True, True])}
        (run / "eval").mkdir()
        for step, data in files.items():
            (run / "eval" / f"step-{step}.json").write_text(json.dumps(data))
            eval_line = {k: v for k, v in data.items() if k not in ("samples", "rewards", "accuracy_reward")}
            lines.append({**eval_line, "kind": "eval", "rewards/answer_match": data["accuracy"]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


@pytest.fixture
def drawn(monkeypatch) -> dict[str, Figure]:
    """Every figure the report saves, by file name without ``.png``: what the plots show.

    The PNG is still written; the test reads the figure's artists (line data, band, error
    bars, titles) instead of the image, so a plot of the wrong series fails."""
    figures: dict[str, Figure] = {}
    real_save = plots._save

    def save(fig: Figure, path: Path) -> None:
        figures[Path(path).stem] = fig
        real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return figures


def _line(ax: Axes, label: str | None = None) -> tuple[list[float], list[float]]:
    """x and y of the line called ``label`` (the only line when None)."""
    lines = [l for l in ax.get_lines() if label is None or l.get_label() == label]
    assert len(lines) == 1, f"{len(lines)} lines called {label!r}: {[l.get_label() for l in ax.get_lines()]}"
    return [float(x) for x in lines[0].get_xdata()], [float(y) for y in lines[0].get_ydata()]


def _labels(ax: Axes) -> list[str]:
    return [l.get_label() for l in ax.get_lines()]


def _band(ax: Axes) -> dict[float, list[float]]:
    """The shaded interval: step -> [lower, upper] edge, read off the polygon fill_between drew."""
    (band,) = ax.collections
    vertices = band.get_paths()[0].vertices
    return {float(x): sorted({float(y) for vx, y in vertices if vx == x}) for x in sorted(set(vertices[:, 0]))}


def _table_row(report: str, label: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is ``label``."""
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no table row {label!r} in the report")


def test_report_before_after_table_and_summary(tmp_path: Path) -> None:
    path = write_report(make_run(tmp_path))
    assert path == tmp_path / "demo-run" / "report.md"
    report = path.read_text()
    assert report.startswith("# Training report: demo-run\n")
    assert "**Status:** finished · **Steps:** 20 · **Wall time:** 12.5 min" in report
    # earliest (step 0) vs latest (step 20), not step 5, which sorts last as text
    assert "| metric | before (step 0) | after (step 20) | change |" in report
    assert _table_row(report, "Accuracy") == ["Accuracy", "25.0%", "46.9%", "+21.9 pp"]
    assert _table_row(report, "Mean reward") == ["Mean reward", "0.375", "0.594", "+0.219"]
    assert _table_row(report, "Mean completion length (tokens)")[1:] == ["40.0", "30.0", "-10.0"]
    assert _table_row(report, "Examples")[1:] == ["32", "32", "+0"]
    assert "reward `answer_match` scored as correct" in report
    # 10% of 20 steps = 2: rewards (0.05 + 0.10) / 2 and (0.95 + 1.00) / 2
    assert _table_row(report, "mean reward, first 10% (steps 1–2)")[1] == "0.075"
    assert _table_row(report, "mean reward, last 10% (steps 19–20)")[1] == "0.975"
    assert _table_row(report, "reward change (last − first)")[1] == "+0.900"
    assert _table_row(report, "median step time")[1] == "2.00 s"
    assert _table_row(report, "median throughput")[1] == "1,105 tokens/s"


def test_report_recipe_table(tmp_path: Path) -> None:
    report = write_report(make_run(tmp_path)).read_text()
    assert _table_row(report, "`model.lora`")[1] == "LoRA r=16, alpha=32"
    assert _table_row(report, "`training.learning_rate`")[1] == "1e-05"
    assert _table_row(report, "`rewards`")[1] == "answer\\_match × 1.0, format × 0.2"  # `_` escaped for Markdown
    assert _table_row(report, "`rollout.num_generations`")[1] == "4"


def test_report_plots_draw_the_run_metrics(tmp_path: Path, drawn: dict[str, Figure]) -> None:
    run = make_run(tmp_path)
    report = write_report(run).read_text()
    assert list(drawn) == ["reward", "accuracy", "kl", "completion_length", "loss_entropy"]  # no pass@k: no sampling
    for name in drawn:
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 5_000, name
        assert f"](plots/{name}.png)" in report
    steps = [float(s) for s in range(1, STEPS + 1)]

    (ax,) = drawn["reward"].axes
    # each component once, its spread (rewards/answer_match_std) not drawn as a component
    assert _labels(ax) == ["reward (total)", "moving average (2 steps)", "answer_match", "format"]
    assert _line(ax, "reward (total)") == (steps, pytest.approx([0.05 * s for s in steps]))
    # 20 steps: a 2-step trailing window; the first point averages itself alone
    moving = [0.05] + [0.05 * s - 0.025 for s in steps[1:]]
    assert _line(ax, "moving average (2 steps)") == (steps, pytest.approx(moving))
    assert _line(ax, "answer_match") == (steps, pytest.approx([0.04 * s for s in steps]))
    assert _line(ax, "format") == (steps, [1.0] * STEPS)
    assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("Reward per training step", "step", "mean reward")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == _labels(ax)

    (ax,) = drawn["accuracy"].axes
    assert _line(ax, "accuracy (greedy)") == ([0.0, 5.0, 20.0], pytest.approx([25.0, 30.0, 100 * 15 / 32]))  # in %
    assert len(ax.collections) == 0 and ax.get_legend() is None  # no interval logged: no band
    assert ax.get_ylabel() == "accuracy (%)"

    (ax,) = drawn["kl"].axes
    assert _line(ax) == (steps, pytest.approx([0.001 * s for s in steps]))
    assert ax.get_title() == "KL to the reference"  # the recipe names no estimator: the title names none

    (ax,) = drawn["completion_length"].axes
    assert _line(ax, "train") == (steps, [30.0 + s for s in steps])
    assert _line(ax, "eval") == ([0.0, 5.0, 20.0], [40.0, 37.5, 30.0])  # eval lengths as points, not a line
    assert [l.get_linestyle() for l in ax.get_lines()] == ["-", "None"]

    loss_ax, entropy_ax = drawn["loss_entropy"].axes
    assert (loss_ax.get_title(), entropy_ax.get_title()) == ("loss", "entropy")
    assert _line(loss_ax) == (steps, pytest.approx([-0.01 * s for s in steps]))
    assert _line(entropy_ax) == (steps, pytest.approx([1.5 - 0.02 * s for s in steps]))
    assert entropy_ax.get_ylabel() == "nats / token"


def test_pass_at_k_error_bars_are_the_intervals_and_many_evals_are_thinned(tmp_path: Path,
                                                                          drawn: dict[str, Figure]) -> None:
    # asymmetric intervals, one unknown (no bar); seven evals of which five are drawn
    points = {1: (0.3, (0.25, 0.4)), 4: (0.5, None), 16: (0.7, (0.6, 0.72))}
    curves = [(f"s{i}", {k: (v + i / 100, iv) for k, (v, iv) in points.items()}) for i in range(7)]
    assert plots.plot_pass_at_k(curves, tmp_path / "pass.png", most=5)
    (ax,) = drawn["pass"].axes
    # first and last always, the rest evenly spaced: indices round(i * 6 / 4) = 0, 2, 3, 4, 6
    assert [c.get_label() for c in ax.containers] == ["s0", "s2", "s3", "s4", "s6"]
    data_line, _, (bars,) = ax.containers[0].lines
    assert [float(v) for v in data_line.get_ydata()] == pytest.approx([30.0, 50.0, 70.0])
    # below and above the point, not mirrored: [25, 40] around 30, nothing at k = 4, [60, 72] around 70
    assert [float(y) for segment in bars.get_segments() for _, y in segment] == pytest.approx(
        [25.0, 40.0, 50.0, 50.0, 60.0, 72.0])
    assert ax.get_xscale() == "log" and [float(k) for k in ax.get_xticks()] == [1.0, 4.0, 16.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "4", "16"]


@pytest.mark.parametrize("algorithm, title", [({"kl_estimator": "k1"}, "KL to the reference (k1)"),
                                               ({"kl_estimator": "k3", "beta": 0.1}, "KL to the reference (k3)"),
                                               (None, "KL to the reference")])
def test_kl_plot_names_the_runs_estimator(tmp_path: Path, drawn: dict[str, Figure], algorithm, title) -> None:
    run = make_run(tmp_path, evals=False)
    if algorithm is None:
        (run / "recipe.yaml").unlink()
    else:
        (run / "recipe.yaml").write_text(yaml.safe_dump({**RECIPE, "algorithm": algorithm}))
    write_report(run)
    assert drawn["kl"].axes[0].get_title() == title


def test_single_step_is_drawn_as_a_point_without_moving_average(tmp_path: Path, drawn: dict[str, Figure]) -> None:
    assert plot_reward([{"step": 3, "kind": "train", "reward": 0.5}], tmp_path / "reward.png")
    (ax,) = drawn["reward"].axes
    assert _labels(ax) == ["reward (total)"]
    assert _line(ax) == ([3.0], [0.5]) and ax.get_lines()[0].get_marker() == "o"


def test_report_pairs_samples_by_prompt_and_escapes_cells(tmp_path: Path) -> None:
    report = write_report(make_run(tmp_path)).read_text()
    # the 3*3 row pairs step 0's "6" with step 20's "9" although the files list them in
    # different orders; `*` is escaped so it cannot start emphasis
    assert _table_row(report, "What is 3\\*3?") == ["What is 3\\*3?", "9", "6", "no", "9", "yes"]
    escaped = _table_row(report, "Say \\| pipes<br>and newlines")
    assert escaped[2] == "a" * 200 + "…"  # the 300-character completion, truncated
    assert escaped[3:] == ["no", "x", "yes"]


def test_run_without_evals_or_kl_still_reports(tmp_path: Path, drawn: dict[str, Figure]) -> None:
    run = make_run(tmp_path, evals=False, with_kl=False)
    report = write_report(run).read_text()
    assert list(drawn) == ["reward", "completion_length", "loss_entropy"]
    assert _labels(drawn["completion_length"].axes[0]) == ["train"]  # no eval points
    assert "No eval files" in report
    assert not (run / "plots" / "kl.png").exists() and not (run / "plots" / "accuracy.png").exists()
    assert "plots/kl.png" not in report and "plots/accuracy.png" not in report
    assert (run / "plots" / "reward.png").read_bytes().startswith(PNG_MAGIC)


def test_full_fine_tuning_recipe_and_training_samples_fallback(tmp_path: Path) -> None:
    run = make_run(tmp_path, evals=False)
    (run / "recipe.yaml").write_text(yaml.safe_dump({**RECIPE, "model": {"path": "m", "lora": None}}))
    sample = {"step": 20, "prompt": "What is 2+2?", "completion": "<answer>4</answer>", "answer": "4", "reward": 1.0}
    (run / "samples.jsonl").write_text(json.dumps({**sample, "step": 10}) + "\n" + json.dumps(sample) + "\n")
    report = write_report(run).read_text()
    assert _table_row(report, "`model.lora`")[1] == "full fine-tuning"
    assert "training completions from step 20" in report
    assert _table_row(report, "What is 2+2?") == ["What is 2+2?", "&lt;answer&gt;4&lt;/answer&gt;", "4", "1.000"]


def test_missing_run_dir_and_metrics_raise(tmp_path: Path) -> None:
    with pytest.raises(RunDirError, match="does not exist.*grpokit train"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match=r"metrics\.jsonl is missing.*grpokit train RECIPE"):
        write_report(tmp_path / "empty")


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    run = make_run(tmp_path, evals=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:25]  # a line cut off mid-write
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:3: not valid JSON"):
        write_report(run)


def test_bad_eval_file_names_file_and_line(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / "eval" / "step-5.json").write_text('{"step": 5,\n "accuracy": }\n')
    with pytest.raises(RunDirError, match=r"step-5\.json:2: not valid JSON"):
        write_report(run)


def test_minimal_run_with_one_eval_and_sparse_lines(tmp_path: Path, drawn: dict[str, Figure]) -> None:
    """A run killed early: no recipe, no run.json, one train line with only a reward."""
    run = tmp_path / "early"
    (run / "eval").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "reward": null}\n')
    (run / "eval" / "step-0.json").write_text(json.dumps({"step": 0, "accuracy": 0.5, "samples": []}))
    report = write_report(run).read_text()
    assert "**Status:** unknown · **Steps:** 1 · **Wall time:** —" in report
    assert "No recipe.yaml" in report
    assert _table_row(report, "Accuracy") == ["Accuracy", "50.0%"]
    assert "Only one evaluation so far" in report
    assert "No sample completions were recorded." in report
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["accuracy.png"]
    (ax,) = drawn["accuracy"].axes  # the reward was null: no reward plot; the one eval is one marked point
    assert _line(ax) == ([0.0], [50.0]) and ax.get_lines()[0].get_marker() == "o"


# --- the newer eval fields: intervals, per-row correctness, sampling (pass@k, diversity) ---


def _sampling(p1: float, p10: float, self_bleu: float, reward: float) -> dict:
    """A ``sampling`` block with pass@1/pass@10 and ±0.1 intervals (0.05 on pass@10)."""
    return {
        "num_generations": 16, "temperature": 1.0, "top_p": 1.0, "seed": 0,
        "pass_at_k": {"1": p1, "10": p10},
        "pass_at_k_interval": {"1": [p1 - 0.1, p1 + 0.1], "10": [p10 - 0.05, p10 + 0.05]},
        "num_correct": [], "self_bleu": self_bleu, "distinct_1": 0.05, "distinct_2": 0.08,
        "reward": reward, "rewards": {"answer_match": p1}, "completion_length": 12.0,
    }


def make_new_format_run(root: Path, *, sampling_at: tuple[int, ...] = (0, 20)) -> Path:
    """make_run's run with the newer fields added to every eval file and eval line.

    Correct rows: the first 8 of 32 at step 0, the first 15 at step 20 (a superset), so
    the paired differences are 7 ones and 25 zeros: +21.875 pp, and no row got worse.
    """
    root.mkdir(parents=True, exist_ok=True)
    run = make_run(root)
    extra = {
        0: {"accuracy_interval": [0.125, 0.40625], "correct": [1] * 8 + [0] * 24},
        5: {"accuracy_interval": [0.15, 0.45], "correct": [1] * 10 + [0] * 22},
        20: {"accuracy_interval": [0.3125, 0.625], "correct": [1] * 15 + [0] * 17},
    }
    blocks = {0: _sampling(0.3, 0.6, 0.9, 0.4), 5: _sampling(0.35, 0.7, 0.85, 0.45),
              20: _sampling(0.55, 0.9, 0.7, 0.65)}
    for step, fields in extra.items():
        path = run / "eval" / f"step-{step}.json"
        data = {**json.loads(path.read_text()), **fields, "sampling": blocks[step] if step in sampling_at else None}
        path.write_text(json.dumps(data))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        if line["kind"] == "eval":
            line["accuracy_lo"], line["accuracy_hi"] = extra[line["step"]]["accuracy_interval"]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


def test_report_shows_intervals_pass_at_k_and_diversity(tmp_path: Path) -> None:
    run = make_new_format_run(tmp_path)
    report = write_report(run).read_text()
    assert _table_row(report, "Accuracy") == ["Accuracy", "25.0% [12.5, 40.6]", "46.9% [31.2, 62.5]", "+21.9 pp"]
    assert _table_row(report, "pass@1") == ["pass@1", "30.0% [20.0, 40.0]", "55.0% [45.0, 65.0]", "+25.0 pp"]
    assert _table_row(report, "pass@10") == ["pass@10", "60.0% [55.0, 65.0]", "90.0% [85.0, 95.0]", "+30.0 pp"]
    assert _table_row(report, "self-BLEU (lower = more diverse)")[1:] == ["0.900", "0.700", "-0.200"]
    assert _table_row(report, "distinct-1")[1:] == ["0.050", "0.050", "+0.000"]
    assert _table_row(report, "distinct-2")[1:] == ["0.080", "0.080", "+0.000"]
    assert _table_row(report, "Mean reward (sampled)")[1:] == ["0.400", "0.650", "+0.250"]
    # the greedy rows read as before
    assert _table_row(report, "Mean reward") == ["Mean reward", "0.375", "0.594", "+0.219"]
    assert "16 completions per prompt at temperature 1.0, top-p 1.0, seed 0" in report
    # paired bootstrap of 7 ones and 25 zeros: centred on +21.9 pp, strictly above 0
    line = next(l for l in report.splitlines() if l.startswith("Accuracy change, paired bootstrap"))
    lo, hi = (float(x) for x in re.search(r"\+21\.9 pp \[\+?(-?[\d.]+), \+?(-?[\d.]+)\]", line).groups())
    assert 0 < lo < 21.9 < hi <= 100 * 15 / 32
    assert "over the same 32 held-out rows" in line and "the gain is larger than resampling noise" in line


def test_report_pass_at_k_plot_only_with_sampling(tmp_path: Path, drawn: dict[str, Figure]) -> None:
    run = make_new_format_run(tmp_path / "new")
    report = write_report(run).read_text()
    assert (run / "plots" / "pass_at_k.png").read_bytes().startswith(PNG_MAGIC)
    assert "](plots/pass_at_k.png)" in report
    (ax,) = drawn["pass_at_k"].axes
    # one curve per eval that sampled (steps 0 and 20, not 5), in %, with the files' intervals as error bars
    curves = {c.get_label(): c for c in ax.containers}
    assert list(curves) == ["step 0", "step 20"]
    for label, values, intervals in [("step 0", [30.0, 60.0], [[20.0, 40.0], [55.0, 65.0]]),
                                     ("step 20", [55.0, 90.0], [[45.0, 65.0], [85.0, 95.0]])]:
        data_line, _, (bars,) = curves[label].lines
        assert [float(k) for k in data_line.get_xdata()] == [1.0, 10.0]
        assert [float(v) for v in data_line.get_ydata()] == pytest.approx(values)
        assert [float(y) for segment in bars.get_segments() for _, y in segment] == pytest.approx(sum(intervals, []))
    assert ax.get_xscale() == "log" and list(ax.get_xticks()) == [1, 10]  # k spans a factor of 10
    first, last = (curves[label].lines[0].get_color() for label in ("step 0", "step 20"))
    assert sum(first[:3]) > sum(last[:3])  # later evals darker
    drawn.clear()
    (tmp_path / "old").mkdir()
    old = make_run(tmp_path / "old")
    old_report = write_report(old).read_text()
    assert "pass_at_k" not in drawn and "accuracy" in drawn  # nothing sampled: the figure is not even built
    assert not (old / "plots" / "pass_at_k.png").exists() and "pass_at_k" not in old_report
    assert "pass@" not in old_report and "paired bootstrap" not in old_report
    assert _table_row(old_report, "Accuracy")[1] == "25.0%"


def test_report_sampling_only_in_last_eval(tmp_path: Path) -> None:
    report = write_report(make_new_format_run(tmp_path, sampling_at=(20,))).read_text()
    assert _table_row(report, "pass@1") == ["pass@1", "—", "55.0% [45.0, 65.0]", "—"]
    assert _table_row(report, "self-BLEU (lower = more diverse)")[1:] == ["—", "0.700", "—"]


def test_report_identical_correct_lists_are_within_noise(tmp_path: Path) -> None:
    run = make_new_format_run(tmp_path)
    first = json.loads((run / "eval" / "step-0.json").read_text())
    last_path = run / "eval" / "step-20.json"
    last_path.write_text(json.dumps({**json.loads(last_path.read_text()), "correct": first["correct"]}))
    report = write_report(run).read_text()
    assert "[+0.0, +0.0]; the interval includes 0, so the difference is within noise." in report


def test_accuracy_band_is_the_logged_interval(tmp_path: Path, drawn: dict[str, Figure]) -> None:
    rows = [{"step": 0, "accuracy": 0.25}, {"step": 20, "accuracy": 0.5}]
    band = [{**rows[0], "accuracy_lo": 0.1, "accuracy_hi": 0.4}, {**rows[1], "accuracy_lo": 0.3, "accuracy_hi": 0.7}]
    assert plot_accuracy(rows, tmp_path / "plain.png") and plot_accuracy(band, tmp_path / "band.png")
    plain, banded = drawn["plain"].axes[0], drawn["band"].axes[0]
    assert len(plain.collections) == 0 and _line(plain) == ([0.0, 20.0], [25.0, 50.0])
    assert _band(banded) == {0.0: pytest.approx([10.0, 40.0]), 20.0: pytest.approx([30.0, 70.0])}
    assert _line(banded, "accuracy (greedy)") == ([0.0, 20.0], [25.0, 50.0])
    assert [t.get_text() for t in banded.get_legend().get_texts()] == ["95% bootstrap interval", "accuracy (greedy)"]


def test_report_band_from_eval_files_when_metrics_lack_eval_lines(tmp_path: Path, drawn: dict[str, Figure]) -> None:
    run = make_new_format_run(tmp_path)
    lines = [l for l in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' not in l]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    write_report(run)
    (ax,) = drawn["accuracy"].axes
    # the eval files' accuracy and accuracy_interval, in %
    assert _line(ax, "accuracy (greedy)") == ([0.0, 5.0, 20.0], pytest.approx([25.0, 30.0, 100 * 15 / 32]))
    assert _band(ax) == {0.0: pytest.approx([12.5, 40.625]), 5.0: pytest.approx([15.0, 45.0]),
                         20.0: pytest.approx([31.25, 62.5])}
    (tmp_path / "plain").mkdir()
    plain = make_run(tmp_path / "plain")
    (plain / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    write_report(plain)
    (ax,) = drawn["accuracy"].axes  # eval files without intervals: the same curve, no band
    assert len(ax.collections) == 0 and _line(ax)[1] == pytest.approx([25.0, 30.0, 100 * 15 / 32])


def test_report_lists_grpokit_eval_files_beside_the_first_and_last_training_evals(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    assert "Evaluations with `grpokit eval`" not in write_report(run).read_text()
    named = {**_eval(20, 0.5, ["4", "9", "x"], [True, True, True]), "name": "gsm8k-k4", "data": "gsm8k"}
    del named["step"]
    (run / "eval" / "gsm8k-k4.json").write_text(json.dumps(named))
    report = write_report(run).read_text()
    section = report.split("## Evaluations with `grpokit eval`", 1)[1]
    assert "| metric | step 0 | step 20 | gsm8k-k4 |" in section
    accuracy = [line for line in section.splitlines() if line.startswith("| Accuracy |")][0]
    assert "**50.0%" in accuracy and "★" in accuracy  # the eval file's 50 % is the best of the three
    assert "`" + str(run / "eval" / "step-0.json") + "`" in section
