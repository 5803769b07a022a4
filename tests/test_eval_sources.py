"""Mixed data sources through evaluation: each held-out row keeps its source, accuracy is reported per source,
relative source paths are found beside the recipe, and `--data` replaces a mix."""

import json
import os

import yaml

from grpokit.config import load_recipe
from grpokit.eval.runner import metrics_line, source_accuracy
from grpokit.eval.standalone import run_evaluation

from conftest import tiny_recipe


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_source_accuracy_splits_correctness_by_source():
    rows = [{"data_source": "a"}, {"data_source": "b"}, {"data_source": "a"}, {"data_source": "a"}]
    result = source_accuracy(rows, [True, False, False, True], seed=0)
    assert {name: (v["accuracy"], v["num_examples"]) for name, v in result.items()} == {"a": (2 / 3, 3), "b": (0.0, 1)}
    assert source_accuracy(rows[:1], [True], seed=0) == {}  # one source: the overall accuracy says it all
    line = metrics_line({"accuracy": 0.5, "accuracy_interval": [0, 1], "reward": 0.0, "completion_length": 1.0,
                         "num_examples": 4, "rewards": {}, "by_source": result})
    assert line["accuracy/a"] == 2 / 3 and line["accuracy/b"] == 0.0


def test_eval_of_a_mix_reports_each_source_and_finds_files_beside_the_recipe(tiny_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "task"
    folder.mkdir()
    write_jsonl(folder / "digits.jsonl", [{"prompt": f"say {i}", "answer": str(i)} for i in range(6)])
    write_jsonl(folder / "words.jsonl", [{"prompt": f"spell {i}", "answer": "x"} for i in range(6)])
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run")
    raw["data"] = {"sources": [{"path": "digits.jsonl", "weight": 2.0}, {"path": "words.jsonl", "eval_size": 2}],
                   "eval_size": 3}
    raw["rewards"] = [{"name": "toy_leading_digit"}]
    recipe_path = folder / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # not the recipe's folder: the relative sources must still be found
    recipe = load_recipe(recipe_path)
    assert [s.path for s in recipe.data.sources] == [str(folder / "digits.jsonl"), str(folder / "words.jsonl")]

    out, result = run_evaluation(str(tiny_model_dir), recipe_path=str(recipe_path), out=str(tmp_path / "e.json"))
    assert result["data"] == "digits+words"
    assert {name: block["num_examples"] for name, block in result["by_source"].items()} == {"digits": 3, "words": 2}
    assert result["num_examples"] == 5
    by_hand = sum(result["correct"][:3]) / 3  # held-out rows come source by source, in the recipe's order
    assert result["by_source"]["digits"]["accuracy"] == by_hand
    assert json.loads(out.read_text())["by_source"] == result["by_source"]

    # --data replaces the whole mix with one source
    _, single = run_evaluation(str(tiny_model_dir), recipe_path=str(recipe_path), out=str(tmp_path / "s.json"),
                               overrides=[f"data.source={folder / 'words.jsonl'}", "data.sources=null"])
    assert single["data"].endswith("words.jsonl") and "by_source" not in single
    assert os.getcwd() == str(tmp_path)
