"""Data sources: JSON arrays, CSV, Parquet, save_to_disk folders, weighted mixes, and `data_source` on every row."""

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from grpokit.config import DataConfig, dump_recipe, load_recipe, recipe_from_dict, source_name
from grpokit.data import load_splits
from grpokit.data.loaders import read_jsonl, read_rows
from grpokit.errors import DataError, RecipeError

ROOT = Path(__file__).resolve().parents[1]
SHARED_GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"
REWARDS = [{"name": "accuracy"}]
ROWS = [{"q": f"question {i}", "gold": str(i), "topic": "t" if i % 2 else "u"} for i in range(10)]


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """datasets' Arrow copies of the test files go to tmp_path, not to ~/.cache/huggingface."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def digest(rows: list[dict]) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


def without_source(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "data_source"} for row in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------ the single source did not change


def test_demo_rows_are_the_rows_of_before_plus_data_source():
    # digests of load_splits at commit 7d36c46 (before sources): the demo's figures rest on these rows
    train, held_out = load_splits(load_recipe(ROOT / "recipes" / "demo.yaml").data)
    assert (len(train), len(held_out)) == (2000, 128)
    assert (digest(without_source(train)), digest(without_source(held_out))) == ("6b90c1f6ede2c92e", "1be21737fa66f315")
    assert held_out[0] == {"prompt": "Which number is larger, 66 or 24? Answer with the number only.",
                           "answer": "66", "a": 66, "b": 24, "data_source": "larger_number"}
    assert [r["answer"] for r in held_out[:10]] == ["66", "21", "84", "98", "22", "55", "13", "54", "92", "88"]
    assert list(train[0]) == ["prompt", "answer", "a", "b", "data_source"]  # the old keys in their order, then the name
    assert {r["data_source"] for r in train + held_out} == {"larger_number"}


@pytest.mark.skipif(not SHARED_GSM8K.is_dir(), reason="../shared/data/gsm8k is beside the repo in CI")
def test_gsm8k_rows_are_the_rows_of_before_plus_data_source():
    train, held_out = load_splits(DataConfig(source="gsm8k", path=str(SHARED_GSM8K), eval_size=128))
    assert (digest(without_source(train)), digest(without_source(held_out))) == ("ac83cc797377ae36", "089a065e087f0bb7")
    assert {r["data_source"] for r in train + held_out} == {"gsm8k"}


def test_a_file_names_its_rows_by_stem_and_a_data_source_column_wins(tmp_path):
    path = write_jsonl(tmp_path / "algebra.jsonl", [*ROWS[:4], {"q": "own", "gold": "1", "data_source": "mine"}])
    train, held_out = load_splits(DataConfig(source=str(path), prompt_field="q", answer_field="gold", eval_size=1))
    by_prompt = {r["prompt"]: r for r in train + held_out}
    assert by_prompt["own"]["data_source"] == "mine"
    assert by_prompt["question 0"] == {"gold": "0", "topic": "u", "prompt": "question 0", "answer": "0",
                                       "data_source": "algebra"}


def test_source_names():
    assert [source_name(s) for s in ("builtin:larger_number", "gsm8k", "data/algebra.jsonl", "x/y.PARQUET",
                                     "saved/my.dataset", "saved/plain/")] == \
        ["larger_number", "gsm8k", "algebra", "y", "my.dataset", "plain"]


# ------------------------------------------------------------------ formats


def test_json_array_reads_as_its_json_lines_twin(tmp_path):
    lines = write_jsonl(tmp_path / "lines.jsonl", ROWS)
    array = tmp_path / "array.json"
    array.write_text("\n  " + json.dumps(ROWS, indent=2))  # leading blanks: still an array
    as_lines_json = write_jsonl(tmp_path / "lines.json", ROWS)  # .json holding JSON lines still reads
    expected = read_rows(lines, "q", "gold")
    assert read_rows(array, "q", "gold") == expected == read_rows(as_lines_json, "q", "gold")
    assert expected[3] == {"gold": "3", "topic": "t", "prompt": "question 3", "answer": "3"}
    # each element remembers the line it starts on (indent=2: element i opens at line 3 + 5i)
    assert [r["_line"] for r in read_jsonl(array)][:3] == [3, 8, 13]
    config = dict(prompt_field="q", answer_field="gold", eval_size=3, seed=5)
    assert without_source(load_splits(DataConfig(source=str(array), **config))[1]) == \
        without_source(load_splits(DataConfig(source=str(lines), **config))[1])


@pytest.mark.parametrize("text, message", [
    ('[\n{"prompt": "a"},\n{"prompt": "b",\n]', r"d.json:4: not a valid JSON array \(Expecting property name"),
    ('[\n{"prompt": "a"},\n"just text"\n]', r"d.json:3: element 2 of the array is a str; each row must be a JSON object"),
    ('[{"prompt": "a"}] [', r"d.json:1: not a valid JSON array \(text after the closing"),
    ('[{"prompt": "a"}', r"d.json:1: not a valid JSON array \(expected ',' or '\]' after an element, got the end"),
    ('[\n{"prompt": "a"},\n{"question": "b"}\n]', r"d.json:3: row has no 'prompt' field"),
    ("[]", r"d.json: the dataset is empty"),
])
def test_json_array_errors_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_splits(DataConfig(source=str(path), eval_size=0))


def test_csv_reads_through_datasets(tmp_path):
    path = tmp_path / "quiz.csv"
    path.write_text('q,gold,n\n"What is 1, plus 1?",2,1\n"multi\nline",x,2\nthird,3,3\n')
    # pandas infers each column's type: `gold` holds "x", so it is text; `n` is numbers
    assert read_rows(path, "q", "gold") == [
        {"gold": "2", "n": 1, "prompt": "What is 1, plus 1?", "answer": "2"},
        {"gold": "x", "n": 2, "prompt": "multi\nline", "answer": "x"},
        {"gold": "3", "n": 3, "prompt": "third", "answer": "3"}]
    train, held_out = load_splits(DataConfig(source=str(path), prompt_field="q", answer_field="gold", eval_size=1))
    assert len(train) == 2 and len(held_out) == 1 and {r["data_source"] for r in train + held_out} == {"quiz"}


def test_csv_errors(tmp_path):
    path = tmp_path / "quiz.csv"
    path.write_text("question,answer\na,1\n")
    with pytest.raises(DataError, match=r"quiz.csv: no column 'prompt' \(its columns: question, answer\); "
                                        r"set data.prompt_field"):
        load_splits(DataConfig(source=str(path), eval_size=0))
    path.write_text('prompt,answer\na,1\n,2\n')  # an empty prompt cell
    with pytest.raises(DataError, match=r"quiz.csv: row 2: 'prompt' is None; expected a non-empty string"):
        load_splits(DataConfig(source=str(path), eval_size=0))
    path.write_text('prompt,answer\n"never closed,1\n')
    with pytest.raises(DataError, match=r"quiz.csv: cannot read it as CSV \(ParserError: .*EOF inside string.*\); "
                                        r"it must be a CSV file with a header row"):
        load_splits(DataConfig(source=str(path), eval_size=0))
    with pytest.raises(DataError, match=r"gone.csv: data file not found"):
        load_splits(DataConfig(source=str(tmp_path / "gone.csv"), eval_size=0))


def test_parquet_reads_chat_prompts(tmp_path):
    import pandas as pd

    path = tmp_path / "chats.parquet"
    pd.DataFrame({"messages": [[{"role": "user", "content": f"hi {i}"}] for i in range(5)],
                  "gold": [str(i) for i in range(5)]}).to_parquet(path)
    rows = read_rows(path, "messages", "gold")
    assert rows[4] == {"gold": "4", "prompt": [{"role": "user", "content": "hi 4"}], "answer": "4"}
    train, held_out = load_splits(DataConfig(source=str(path), prompt_field="messages", answer_field="gold", eval_size=2))
    assert len(train) == 3 and held_out[0]["data_source"] == "chats"


def test_unreadable_parquet_and_unknown_format(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet at all PAR1")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read it as PARQUET \(.+\); it must be a Parquet file"):
        load_splits(DataConfig(source=str(path), eval_size=0))
    other = tmp_path / "rows.txt"
    other.write_text("hello\n")
    with pytest.raises(DataError, match=r"'.*rows.txt': unknown format; expected builtin:<task>, gsm8k, or .jsonl, .json"):
        load_splits(DataConfig(source=str(other), eval_size=0))
    with pytest.raises(DataError, match=r"'.*nothing-here': no such folder or file"):
        load_splits(DataConfig(source=str(tmp_path / "nothing-here"), eval_size=0))


def test_saved_dataset_folders(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list([{"prompt": f"p{i}", "answer": str(i)} for i in range(6)]).save_to_disk(tmp_path / "flat")
    train, held_out = load_splits(DataConfig(source=str(tmp_path / "flat"), eval_size=2))
    assert len(train) == 4 and len(held_out) == 2 and {r["data_source"] for r in train} == {"flat"}

    # a DatasetDict: train on "train", hold out a seeded sample of "test", as GSM8K's files are used
    make = lambda tag, n: Dataset.from_list([{"prompt": f"{tag}{i}", "answer": str(i)} for i in range(n)])  # noqa: E731
    DatasetDict(train=make("tr", 5), test=make("te", 4)).save_to_disk(tmp_path / "dd")
    train, held_out = load_splits(DataConfig(source=str(tmp_path / "dd"), eval_size=2))
    assert [r["prompt"] for r in train] == ["tr0", "tr1", "tr2", "tr3", "tr4"]
    assert len(held_out) == 2 and {r["prompt"] for r in held_out} <= {"te0", "te1", "te2", "te3"}
    DatasetDict(train=make("tr", 5), validation=make("va", 3)).save_to_disk(tmp_path / "dv")
    assert {r["prompt"][:2] for r in load_splits(DataConfig(source=str(tmp_path / "dv"), eval_size=5))[1]} == {"va"}
    DatasetDict(train=make("tr", 5)).save_to_disk(tmp_path / "donly")  # no held-out split: split one off
    assert [len(part) for part in load_splits(DataConfig(source=str(tmp_path / "donly"), eval_size=1))] == [4, 1]

    DatasetDict(mine=make("m", 3)).save_to_disk(tmp_path / "odd")
    with pytest.raises(DataError, match=r"odd: a DatasetDict with the splits \['mine'\]; grpokit trains on the split named 'train'"):
        load_splits(DataConfig(source=str(tmp_path / "odd"), eval_size=1))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"plain: a folder, but not one written by datasets' save_to_disk"):
        load_splits(DataConfig(source=str(tmp_path / "plain"), eval_size=1))
    DatasetDict(train=make("tr", 3)).save_to_disk(tmp_path / "noprompt")
    with pytest.raises(DataError, match=r"noprompt \[train\]: no column 'question' \(its columns: prompt, answer\)"):
        load_splits(DataConfig(source=str(tmp_path / "noprompt"), prompt_field="question", eval_size=1))


# ------------------------------------------------------------------ weighted mixes


def mixed_config(**extra) -> DataConfig:
    return DataConfig(sources=[{"path": "builtin:larger_number", "weight": 0.8},
                               {"path": "builtin:addition", "weight": 0.2, "name": "sums"}], eval_size=16, **extra)


def test_mix_draws_by_weight_and_keeps_every_source_held_out():
    config = mixed_config()
    train, held_out = load_splits(config)
    share = Counter(r["data_source"] for r in train)
    # all_exhausted: the mix runs until the rarer-drawn source (2000 rows at p = 0.2) has given every row once
    assert 9000 < len(train) < 11000
    assert share["larger_number"] / len(train) == pytest.approx(0.8, abs=0.015)
    for name, task in (("larger_number", "builtin:larger_number"), ("sums", "builtin:addition")):
        alone_train, alone_held_out = load_splits(DataConfig(source=task, eval_size=16))
        drawn = [r for r in train if r["data_source"] == name]
        # each source is walked in its own training order and restarted when it runs out
        assert drawn == [{**alone_train[i % len(alone_train)], "data_source": name} for i in range(len(drawn))]
        assert len(drawn) >= len(alone_train)
        part = [r for r in held_out if r["data_source"] == name]
        assert part == [{**r, "data_source": name} for r in alone_held_out]  # split as the single source is
    assert [r["data_source"] for r in held_out] == ["larger_number"] * 16 + ["sums"] * 16  # in source order
    assert load_splits(mixed_config()) == (train, held_out)  # same seed, same mix
    other = load_splits(mixed_config(seed=99))[0]
    assert [r["data_source"] for r in other[:200]] != [r["data_source"] for r in train[:200]]


def test_mix_train_size_and_per_source_eval_size(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "data_source": "tagged"} for i in range(30)])
    config = DataConfig(sources=[{"path": str(a), "weight": 1}, {"path": str(b), "weight": 1, "eval_size": 0}],
                        eval_size=5, train_size=40)
    train, held_out = load_splits(config)
    assert len(train) == 40 and [r["prompt"][0] for r in held_out] == ["a"] * 5
    assert {r["data_source"] for r in train} == {"a", "tagged"}  # a row's own data_source is kept
    single = load_splits(DataConfig(sources=[{"path": str(a)}], eval_size=5))
    assert single == load_splits(DataConfig(source=str(a), eval_size=5))  # one source: the single-source rows


def test_sources_validation():
    with pytest.raises(RecipeError, match=r"data.source and data.sources are both set.*--set data.source=null"):
        recipe_from_dict({"data": {"source": "builtin:addition", "sources": [{"path": "a.jsonl"}]}, "rewards": REWARDS})
    with pytest.raises(RecipeError, match=r"data.sources is empty"):
        recipe_from_dict({"data": {"sources": []}, "rewards": REWARDS})
    with pytest.raises(RecipeError, match=r"no data: set data.source"):
        recipe_from_dict({"data": {"source": None}, "rewards": REWARDS})
    with pytest.raises(RecipeError, match=r"the name\(s\) \['a'\] appear twice.*give each source its own `name`"):
        recipe_from_dict({"data": {"sources": [{"path": "a.jsonl"}, {"path": "x/a.csv"}]}, "rewards": REWARDS})
    with pytest.raises(RecipeError, match=r"data.sources.0.weight: Input should be greater than 0"):
        recipe_from_dict({"data": {"sources": [{"path": "a.jsonl", "weight": 0}]}, "rewards": REWARDS})
    assert DataConfig().source == "builtin:larger_number" and DataConfig().sources is None
    recipe = recipe_from_dict({"data": {"sources": [{"path": "a.jsonl"}, {"path": "x/a.csv", "name": "b"}]}, "rewards": REWARDS},
                              overrides=["data.sources.1.weight=3"])
    assert recipe.data.label == "a+b" and recipe.data.sources[1].weight == 3.0
    # the resolved recipe a run writes loads again (resume)
    import yaml

    assert recipe_from_dict(yaml.safe_load(dump_recipe(recipe))).data == recipe.data


def test_anchor_paths_finds_data_beside_the_recipe(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    (folder / "saved").mkdir(parents=True)
    (folder / "a.csv").write_text("prompt\nx\n")
    monkeypatch.chdir(tmp_path)
    data = DataConfig(sources=[{"path": "a.csv"}, {"path": "saved"}, {"path": "builtin:addition"}, {"path": "gone.jsonl"}])
    data.anchor_paths(folder)
    assert [s.path for s in data.sources] == [str(folder / "a.csv"), str(folder / "saved"), "builtin:addition", "gone.jsonl"]
    single = DataConfig(source="a.csv")
    single.anchor_paths(folder)
    assert single.source == str(folder / "a.csv")
