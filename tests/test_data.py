"""Loaders: built-in tasks, JSONL with file:line errors, GSM8K from ../shared."""

from pathlib import Path

import pytest

from grpokit.config import DataConfig
from grpokit.data import load_splits, make_task, read_jsonl
from grpokit.data.loaders import find_gsm8k, gsm8k_answer
from grpokit.errors import DataError

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def test_builtin_task_is_seeded_and_held_out_rows_never_train():
    train, held_out = make_task("larger_number", 500, 64, seed=7)
    assert len(train) == 500 and len(held_out) == 64
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert all(r["answer"] == str(max(r["a"], r["b"])) for r in train)
    assert make_task("larger_number", 500, 64, seed=7) == (train, held_out)
    with pytest.raises(DataError, match="unknown built-in task 'nope'"):
        make_task("nope", 1, 1, 0)


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": \n')
    with pytest.raises(DataError, match=r"d.jsonl:3: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"prompt": "a"}\n{"question": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: row has no 'prompt' field"):
        load_splits(DataConfig(source=str(path), eval_size=1))
    path.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match="not valid UTF-8"):
        read_jsonl(path)
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_jsonl_columns_renamed_and_split(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(f'{{"q": "question {i}", "gold": "{i}", "topic": "t"}}\n' for i in range(10)))
    train, held_out = load_splits(DataConfig(source=str(path), prompt_field="q", answer_field="gold", eval_size=3))
    assert len(train) == 7 and len(held_out) == 3
    # the answer column also keeps its own name: a TRL function asking for `gold` (or `solution`) gets it
    assert set(train[0]) == {"prompt", "answer", "gold", "topic", "data_source"} and train[0]["gold"] == train[0]["answer"]
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in held_out)


def test_gsm8k_answer_after_hashes():
    assert gsm8k_answer("He has 3 + 4 = <<3+4=7>>7 apples.\n#### 1,007") == "1007"


@pytest.mark.skipif(not SHARED_GSM8K.is_dir(), reason="../shared/data/gsm8k is beside the repo in CI")
def test_gsm8k_loads_from_shared():
    train, test = load_splits(DataConfig(source="gsm8k", path=str(SHARED_GSM8K), eval_size=50))
    assert len(train) > 7000 and len(test) == 50
    assert train[0]["answer"].lstrip("-").replace(".", "").isdigit() and "####" in train[0]["solution"]
    assert find_gsm8k(str(SHARED_GSM8K)) == SHARED_GSM8K
