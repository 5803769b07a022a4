"""grpokit compare against eval files and run directories written by hand, values worked out here."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from grpokit.errors import RunDirError
from grpokit.report import write_comparison
from grpokit.report.stats import paired_difference_interval, unpaired_difference_interval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sampling(ks: dict[int, float], self_bleu: float, distinct_1: float, distinct_2: float, reward: float) -> dict:
    """A sampling block; every pass@k interval is the value ± 0.1, clipped to [0, 1]."""
    return {
        "num_generations": 8, "temperature": 1.0, "top_p": 1.0, "seed": 0,
        "pass_at_k": {str(k): v for k, v in ks.items()},
        "pass_at_k_interval": {str(k): [max(0.0, v - 0.1), min(1.0, v + 0.1)] for k, v in ks.items()},
        "num_correct": [], "self_bleu": self_bleu, "distinct_1": distinct_1, "distinct_2": distinct_2,
        "reward": reward, "rewards": {}, "completion_length": 9.0,
    }


def _write(path: Path, **fields) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields))
    return path


def _base(path: Path, **overrides) -> Path:
    """20 rows, every second one correct: 50%; a sampling block with pass@1 and pass@4."""
    fields = dict(
        step=20, accuracy=0.5, accuracy_interval=[0.3, 0.7], correct=[1, 0] * 10, reward=0.6,
        rewards={"answer_match": 0.5, "format": 1.0}, completion_length=10.0, num_examples=20,
        data="builtin:larger_number", accuracy_reward="answer_match",
        sampling=_sampling({1: 0.4, 4: 0.7}, self_bleu=0.8, distinct_1=0.1, distinct_2=0.2, reward=0.5),
    )
    return _write(path, **{**fields, **overrides})


def _tuned(path: Path, **overrides) -> Path:
    """The same 20 rows, all correct (right wherever the base was wrong); pass@8 only here."""
    fields = dict(
        name="final", model="runs/sft", accuracy=1.0, accuracy_interval=[1.0, 1.0], correct=[1] * 20, reward=1.2,
        rewards={"answer_match": 1.0, "format": 1.0}, completion_length=8.0, num_examples=20,
        data="builtin:larger_number", accuracy_reward="answer_match",
        sampling=_sampling({1: 0.9, 4: 1.0, 8: 1.0}, self_bleu=0.6, distinct_1=0.1, distinct_2=0.15, reward=1.1),
    )
    return _write(path, **{**fields, **overrides})


def _old(path: Path) -> Path:
    """An older-format file: no interval, no per-row correctness, no sampling."""
    return _write(path, step=50, accuracy=0.5, reward=0.6, rewards={"answer_match": 1.0, "format": None},
                  completion_length=12.0, num_examples=20, accuracy_reward="answer_match", samples=[])


def _row(text: str, label: str) -> list[str]:
    """The cells of the table row whose first cell is ``label``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == label:
            return cells
    raise AssertionError(f"no table row {label!r}")


def _difference(text: str, name: str) -> tuple[float, float, float, str]:
    """Estimate, interval bounds (pp) and the rest of the sentence for source ``name``."""
    line = next(l for l in text.splitlines() if l.startswith(f"- {name} − "))
    est, lo, hi = re.search(r": ([+-][\d.]+) pp \[([+-][\d.]+), ([+-][\d.]+)\]", line).groups()
    return float(est), float(lo), float(hi), line


@pytest.fixture
def three(tmp_path: Path) -> Path:
    """A run directory (base), a `grpokit eval` file (sft/final) and an old file; compared."""
    _base(tmp_path / "base" / "eval" / "step-20.json")
    _base(tmp_path / "base" / "eval" / "step-5.json", accuracy=0.0)  # step 20 > 5 as numbers
    tuned = _tuned(tmp_path / "sft" / "eval" / "final.json")
    old = _old(tmp_path / "old.json")
    return write_comparison([tmp_path / "base", str(tuned), old], tmp_path / "out")


def test_table_cells_and_stars(three: Path) -> None:
    text = three.read_text()
    assert three.name == "comparison.md"
    assert "| metric | base | sft/final | old |" in text
    assert _row(text, "Accuracy")[1:] == ["50.0% [30.0, 70.0]", "**100.0% [100.0, 100.0]** ★", "50.0%"]
    assert _row(text, "pass@1")[1:] == ["40.0% [30.0, 50.0]", "**90.0% [80.0, 100.0]** ★", "—"]
    assert _row(text, "pass@4")[1:] == ["70.0% [60.0, 80.0]", "**100.0% [90.0, 100.0]** ★", "—"]
    # only one source has pass@8: nothing to rank
    assert _row(text, "pass@8")[1:] == ["—", "100.0% [90.0, 100.0]", "—"]
    # lower self-BLEU (more diverse) wins
    assert _row(text, "self-BLEU (lower = more diverse)")[1:] == ["0.800", "**0.600** ★", "—"]
    # every source that has it ties: no winner
    assert _row(text, "distinct-1")[1:] == ["0.100", "0.100", "—"]
    assert _row(text, "distinct-2")[1:] == ["**0.200** ★", "0.150", "—"]
    assert _row(text, "Mean reward")[1:] == ["0.600", "**1.200** ★", "0.600"]
    # a tie for best marks both tied cells
    assert _row(text, "reward `answer_match`")[1:] == ["0.500", "**1.000** ★", "**1.000** ★"]
    assert _row(text, "reward `format`")[1:] == ["1.000", "1.000", "—"]  # null = not applicable
    assert _row(text, "Mean reward (sampled)")[1:] == ["0.500", "**1.100** ★", "—"]
    # lengths and example counts are not ranked
    assert _row(text, "Mean completion length (tokens)")[1:] == ["10.0", "8.0", "12.0"]
    assert _row(text, "Examples")[1:] == ["20", "20", "20"]
    # the run directory stands for its last step file by number, and the sources are listed
    assert "`" + str(three.parent.parent / "base" / "eval" / "step-20.json") + "` · step 20" in text
    assert "model runs/sft" in text and "Note:" not in text


def test_paired_and_unpaired_differences(three: Path) -> None:
    text = three.read_text()
    # paired differences are 10 zeros and 10 ones: +50 pp, well clear of 0 and of ±100
    est, lo, hi, line = _difference(text, "sft/final")
    assert est == 50.0 and 20 < lo < 50 < hi < 80
    assert "paired bootstrap over the same 20 held-out rows" in line
    assert line.endswith("the gain is larger than resampling noise.")
    # the old file has no `correct`: two bootstraps of 10/20 ones each, centred on 0
    est, lo, hi, line = _difference(text, "old")
    assert est == 0.0 and lo < 0 < hi
    assert "independent bootstraps" in line and "older files" in line
    assert line.endswith("the difference is within noise.")


def test_identical_correct_lists_give_a_zero_interval(tmp_path: Path) -> None:
    a = _base(tmp_path / "a.json")
    b = _base(tmp_path / "b.json")
    text = write_comparison([a, b], tmp_path / "out").read_text()
    est, lo, hi, line = _difference(text, "b")
    assert (est, lo, hi) == (0.0, 0.0, 0.0)
    assert line.endswith("the interval includes 0, so the difference is within noise.")
    assert "★" not in _row(text, "Accuracy")[1] + _row(text, "Accuracy")[2]  # a tie between all: no star


def test_paired_interval_hand_cases() -> None:
    assert paired_difference_interval([1, 0, 1, 1], [1, 0, 1, 1]) == (0.0, 0.0)
    # B right on every row A got wrong, and A never right: every resample differs by 1
    assert paired_difference_interval([0] * 10, [1] * 10) == (1.0, 1.0)
    lo, hi = paired_difference_interval([1, 0] * 10, [1] * 20)
    assert 0.2 < lo < 0.5 < hi < 0.8
    # B fixes 2 of A's 10 misses and breaks nothing: every paired resample is >= 0, while
    # two independent bootstraps of 50% and 60% straddle 0 and are much wider
    a, b = [1] * 10 + [0] * 10, [1] * 12 + [0] * 8
    lo, hi = paired_difference_interval(a, b)
    u_lo, u_hi = unpaired_difference_interval(a, b)
    assert 0 <= lo < 0.1 < hi <= 0.3 and u_lo < 0 < 0.1 < u_hi and u_hi - u_lo > 2 * (hi - lo)
    assert unpaired_difference_interval([0] * 5, [1] * 7) == (1.0, 1.0)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference_interval([1, 0], [1])


def test_different_data_is_noted_and_not_paired(tmp_path: Path) -> None:
    a = _base(tmp_path / "a.json")
    b = _tuned(tmp_path / "b.json", data="builtin:arithmetic")
    text = write_comparison([a, b], tmp_path / "out").read_text()
    note = next(l for l in text.splitlines() if l.startswith("Note:"))
    assert "evaluated on different data" in note and "builtin:arithmetic" in note and "not a like-for-like" in note
    assert "not scored on the same rows" in _difference(text, "b")[3]
    c = _tuned(tmp_path / "c.json", data=None, num_examples=40, correct=[1] * 40)
    text = write_comparison([a, c], tmp_path / "out2").read_text()
    assert any(l.startswith("Note: the sources were evaluated on different data (examples a: 20, c: 40)")
               for l in text.splitlines())


def test_pngs_are_written(three: Path) -> None:
    png = three.parent / "comparison.png"
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 5_000
    assert "](comparison.png)" in three.read_text()


def test_names_are_given_or_made_unique(tmp_path: Path) -> None:
    a = _base(tmp_path / "runs" / "sft" / "eval" / "final.json")
    text = write_comparison([a, a, a], tmp_path / "out").read_text()
    assert "| metric | sft/final | sft/final (2) | sft/final (3) |" in text
    text = write_comparison([a, a], tmp_path / "out", names=["before", "after"]).read_text()
    assert "| metric | before | after |" in text
    with pytest.raises(RunDirError, match="got 1 names for 2 sources"):
        write_comparison([a, a], tmp_path / "out", names=["x"])


def test_run_dir_without_step_files_uses_newest_named_eval(tmp_path: Path) -> None:
    run = tmp_path / "sft"
    older = _base(run / "eval" / "zzz.json", accuracy=0.1)
    newer = _base(run / "eval" / "aaa.json", accuracy=0.9)
    os.utime(older, (1_000_000, 1_000_000))
    os.utime(newer, (2_000_000, 2_000_000))
    text = write_comparison([run, _base(tmp_path / "b.json")], tmp_path / "out").read_text()
    assert _row(text, "Accuracy")[1].startswith("**90.0%")
    # step files win over named files once there are any
    _base(run / "eval" / "step-3.json", accuracy=0.3)
    text = write_comparison([run, _base(tmp_path / "b.json")], tmp_path / "out").read_text()
    assert _row(text, "Accuracy")[1] == "30.0% [30.0, 70.0]"


def test_errors_say_what_where_and_how(tmp_path: Path) -> None:
    good = _base(tmp_path / "good.json")
    with pytest.raises(RunDirError, match="compare needs at least two runs or eval files"):
        write_comparison([good], tmp_path / "out")
    with pytest.raises(RunDirError, match=r"nope does not exist\. Pass a run directory"):
        write_comparison([good, tmp_path / "nope"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match=r"empty has no eval files.*Run `grpokit eval --model .*empty` first"):
        write_comparison([good, tmp_path / "empty"], tmp_path / "out")
    bad = tmp_path / "bad" / "eval" / "final.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"accuracy": 0.5,\n "correct": [1, 0,}\n')
    with pytest.raises(RunDirError, match=r"final\.json:2: not valid JSON.*run the comparison again"):
        write_comparison([good, tmp_path / "bad"], tmp_path / "out")
    not_eval = _write(tmp_path / "run.json", status="finished")
    with pytest.raises(RunDirError, match=r"run\.json is not an eval file \(it has no `accuracy`\)"):
        write_comparison([good, not_eval], tmp_path / "out")
