"""`grpokit generate` on a tiny random model: lines, rewards, determinism, resume, repair, refusals."""

from __future__ import annotations

import json

import pytest
import yaml

from grpokit.config import recipe_from_dict
from grpokit.data import load_splits
from grpokit.errors import DataError, GrpokitError
from grpokit.eval.generate import meta_path, row_seed

from conftest import run_cli, tiny_recipe, toy_digits, toy_leading_digit


@pytest.fixture
def recipe(tiny_model_dir, tmp_path):
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run")
    raw["rewards"] = [{"name": "toy_leading_digit"}, {"name": "toy_digits", "weight": 0.5}]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def generate(model, recipe, out, *flags, k=3):
    return run_cli(["generate", "--model", model, "--recipe", recipe, "--out", out, "--num-generations", k, *flags])


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lines_and_fields(tiny_model_dir, recipe, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    assert generate(tiny_model_dir, recipe, out, k=3) == 0
    assert "generated 8/8 rows (skipped 0 already written)" in capsys.readouterr().out
    _, held_out = load_splits(recipe_from_dict(yaml.safe_load(recipe.read_text())).data)
    got = lines(out)
    assert [g["index"] for g in got] == list(range(8)) and [g["prompt"] for g in got] == [r["prompt"] for r in held_out]
    for line, row in zip(got, held_out):
        assert list(line)[:4] == ["index", "prompt", "completions", "completion_lengths"]
        assert len(line["completions"]) == 3 and all(isinstance(t, str) for t in line["completions"])
        assert len(line["completion_lengths"]) == 3 and all(0 < n <= 8 for n in line["completion_lengths"])
        assert (line["answer"], line["a"], line["b"]) == (row["answer"], row["a"], row["b"])
        assert line["model"] == str(tiny_model_dir) and line["seed"] == 0 and "rewards" not in line
    assert len({t for g in got for t in g["completions"]}) > 8, "sampled, not one greedy reply per row"
    assert json.loads(meta_path(out).read_text())["num_generations"] == 3


def test_rewards_components_and_weighted_total(tiny_model_dir, recipe, tmp_path):
    out = tmp_path / "gen.jsonl"
    generate(tiny_model_dir, recipe, out, "--rewards", "--limit", 4, k=5)
    for line in lines(out):
        rewards, texts = line["rewards"], line["completions"]
        assert set(rewards) == {"total", "toy_leading_digit", "toy_digits"}
        assert all(len(values) == 5 for values in rewards.values())
        assert rewards["toy_leading_digit"] == toy_leading_digit(None, texts)
        assert rewards["toy_digits"] == pytest.approx(toy_digits(None, texts))
        expected = [lead + 0.5 * digits for lead, digits in zip(rewards["toy_leading_digit"], rewards["toy_digits"])]
        assert rewards["total"] == pytest.approx(expected, abs=1e-6)


def test_jsonl_rows_all_in_file_order_with_prompt_field(tiny_model_dir, recipe, tmp_path):
    data = tmp_path / "questions.jsonl"
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1), "source": "mine"} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "gen.jsonl"
    # 5 rows < data.eval_size 8: a train/eval split would fail, but a generation job takes every row
    generate(tiny_model_dir, recipe, out, "--data", data, "--set", "data.prompt_field=question", k=2)
    got = lines(out)
    assert [g["prompt"] for g in got] == [r["question"] for r in rows]
    assert [g["answer"] for g in got] == [r["answer"] for r in rows] and all(g["source"] == "mine" for g in got)
    assert all("question" not in g for g in got)


def test_same_seed_same_file_other_seed_other_samples(tiny_model_dir, recipe, tmp_path):
    first, again, other = (tmp_path / f"{name}.jsonl" for name in ("first", "again", "other"))
    generate(tiny_model_dir, recipe, first, "--seed", 7)
    generate(tiny_model_dir, recipe, again, "--seed", 7)
    generate(tiny_model_dir, recipe, other, "--seed", 8)
    assert first.read_bytes() == again.read_bytes()
    assert [g["completions"] for g in lines(first)] != [g["completions"] for g in lines(other)]
    assert row_seed(7, 3) != row_seed(7, 4) != row_seed(8, 3)


def test_blocks_follow_the_split_not_the_limit_and_the_batch_size_is_part_of_the_job(tiny_model_dir, recipe, tmp_path,
                                                                                      capsys):
    whole, resumed = tmp_path / "whole.jsonl", tmp_path / "resumed.jsonl"
    generate(tiny_model_dir, recipe, whole, "--rewards", "--batch-size", 4)
    # --limit 3 cuts the first block (rows 0-3): it is decoded whole, rows 0-2 written
    generate(tiny_model_dir, recipe, resumed, "--rewards", "--batch-size", 4, "--limit", 3)
    head = resumed.read_bytes()
    assert len(lines(resumed)) == 3 and whole.read_bytes().startswith(head)
    with pytest.raises(GrpokitError, match="batch_size was 4 there and is 2 now"):
        generate(tiny_model_dir, recipe, resumed, "--rewards", "--batch-size", 2)
    capsys.readouterr()
    generate(tiny_model_dir, recipe, resumed, "--rewards", "--batch-size", 4)
    assert "generated 5/8 rows (skipped 3 already written)" in capsys.readouterr().out
    assert resumed.read_bytes() == whole.read_bytes()
    generate(tiny_model_dir, recipe, resumed, "--rewards", "--batch-size", 4)  # complete: the model is not even loaded
    assert "generated 0/8 rows (skipped 8 already written)" in capsys.readouterr().out
    assert resumed.read_bytes() == whole.read_bytes()
    # a block of 4 rows shares one generator: other blocks, other samples
    single = tmp_path / "single.jsonl"
    generate(tiny_model_dir, recipe, single, "--rewards", "--batch-size", 1)
    assert [g["completions"] for g in lines(single)] != [g["completions"] for g in lines(whole)]


@pytest.mark.parametrize("cut", [1, 40])
def test_a_torn_last_line_is_cut_away_and_regenerated(tiny_model_dir, recipe, tmp_path, capsys, cut):
    whole, torn = tmp_path / "whole.jsonl", tmp_path / "torn.jsonl"
    generate(tiny_model_dir, recipe, whole)
    content = whole.read_bytes()
    torn.write_bytes(content[:-cut])  # killed mid-write: the last line lacks its end (or just its newline)
    meta_path(torn).write_bytes(meta_path(whole).read_bytes())
    capsys.readouterr()
    generate(tiny_model_dir, recipe, torn)
    printed = capsys.readouterr().out
    assert "cut away a torn last line" in printed and "generated 1/8 rows (skipped 7 already written)" in printed
    assert torn.read_bytes() == content


def test_another_jobs_file_is_refused(tiny_model_dir, recipe, tmp_path):
    out = tmp_path / "gen.jsonl"
    generate(tiny_model_dir, recipe, out, "--limit", 2)
    before = out.read_bytes()
    for flags, setting in ((["--seed", 1], "seed"), (["--temperature", 0.5], "temperature"),
                           (["--rewards"], "rewards"), (["--set", "data.system_prompt=Be brief."], "recipe.data.system_prompt")):
        with pytest.raises(GrpokitError, match=rf"written by another job: {setting} was .*new --out"):
            generate(tiny_model_dir, recipe, out, *flags)
    with pytest.raises(GrpokitError, match="num_generations was 3 there and is 4 now"):
        generate(tiny_model_dir, recipe, out, k=4)
    assert out.read_bytes() == before
    meta_path(out).unlink()
    with pytest.raises(GrpokitError, match="gen.jsonl.meta.json beside it does not"):
        generate(tiny_model_dir, recipe, out)


def test_changed_data_or_damaged_file_is_refused(tiny_model_dir, recipe, tmp_path):
    data, out = tmp_path / "q.jsonl", tmp_path / "gen.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    generate(tiny_model_dir, recipe, out, "--data", data, "--limit", 2)
    data.write_text("".join(json.dumps({"prompt": f"Q{i}"}) + "\n" for i in range(4)))
    with pytest.raises(GrpokitError, match="gen.jsonl:1: the prompt of row 0 is not the data's row 0"):
        generate(tiny_model_dir, recipe, out, "--data", data)
    out.write_text("{broken\n" + out.read_text().splitlines()[1] + "\n")
    with pytest.raises(GrpokitError, match="gen.jsonl:1: not valid JSON .* not the last line"):
        generate(tiny_model_dir, recipe, out, "--data", data)


def test_argument_and_data_errors(tiny_model_dir, recipe, tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(GrpokitError, match="is the input data file"):
        generate(tiny_model_dir, recipe, data, "--data", data)
    with pytest.raises(GrpokitError, match="--num-generations 0: must be at least 1"):
        generate(tiny_model_dir, recipe, tmp_path / "gen.jsonl", k=0)
    with pytest.raises(DataError, match=r"q.jsonl:1: row has no 'prompt' field"):
        generate(tiny_model_dir, recipe, tmp_path / "gen.jsonl", "--data", data)
    data.write_text(json.dumps({"prompt": "q", "seed": 3}) + "\n")
    with pytest.raises(GrpokitError, match="column 'seed'"):
        generate(tiny_model_dir, recipe, tmp_path / "gen.jsonl", "--data", data)
    with pytest.raises(GrpokitError, match="pass --recipe"):
        run_cli(["generate", "--model", tiny_model_dir, "--num-generations", 2, "--out", tmp_path / "gen.jsonl"])
    assert not (tmp_path / "gen.jsonl").exists()
