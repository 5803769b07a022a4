"""The report stage against a run directory written by hand, with values worked out here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from grpokit.errors import RunDirError
from grpokit.report import write_report

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


def test_report_writes_every_plot_as_png(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    report = write_report(run).read_text()
    for name in ("reward", "accuracy", "kl", "completion_length", "loss_entropy"):
        png = run / "plots" / f"{name}.png"
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 5_000, name
        assert f"](plots/{name}.png)" in report


def test_report_pairs_samples_by_prompt_and_escapes_cells(tmp_path: Path) -> None:
    report = write_report(make_run(tmp_path)).read_text()
    # the 3*3 row pairs step 0's "6" with step 20's "9" although the files list them in
    # different orders; `*` is escaped so it cannot start emphasis
    assert _table_row(report, "What is 3\\*3?") == ["What is 3\\*3?", "9", "6", "no", "9", "yes"]
    escaped = _table_row(report, "Say \\| pipes<br>and newlines")
    assert escaped[2] == "a" * 200 + "…"  # the 300-character completion, truncated
    assert escaped[3:] == ["no", "x", "yes"]


def test_run_without_evals_or_kl_still_reports(tmp_path: Path) -> None:
    run = make_run(tmp_path, evals=False, with_kl=False)
    report = write_report(run).read_text()
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


def test_minimal_run_with_one_eval_and_sparse_lines(tmp_path: Path) -> None:
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
