"""`grpokit eval` and the evaluation runner on a tiny random model: files, determinism, errors."""

from __future__ import annotations

import json

import pytest
import yaml

from grpokit.cli import main
from grpokit.config import recipe_from_dict
from grpokit.data import load_splits
from grpokit.errors import GrpokitError
from grpokit.eval import EvalSettings, evaluate
from grpokit.eval.metrics import pass_at_k
from grpokit.eval.standalone import run_evaluation
from grpokit.models import load_policy
from grpokit.rewards import RewardSet
from grpokit.train import train

from conftest import tiny_recipe


def build(model_dir, tmp_path, **eval_section):
    raw = tiny_recipe(model_dir, tmp_path / "run", eval={"num_samples": 3, **eval_section})
    raw["rewards"] = [{"name": "toy_leading_digit"}, {"name": "toy_digits", "weight": 0.5}]
    recipe = recipe_from_dict(raw)
    _, rows = load_splits(recipe.data)
    policy = load_policy(recipe.model, beta=0.0)
    return recipe, rows, policy, RewardSet(recipe.rewards)


def test_sampled_eval_is_deterministic_and_consistent(tiny_model_dir, tmp_path):
    recipe, rows, policy, rewards = build(tiny_model_dir, tmp_path, num_generations=6, pass_k=[1, 3, 6, 50])
    settings = EvalSettings.from_recipe(recipe)
    first = evaluate(policy, rows, rewards, settings)
    again = evaluate(policy, rows, rewards, settings)
    assert first == again  # greedy and seeded sampling: the same file twice

    sampling = first["sampling"]
    assert sampling["num_generations"] == 6 and list(sampling["pass_at_k"]) == ["1", "3", "6"]  # 50 > K left out
    counts = sampling["num_correct"]
    assert len(counts) == len(rows) and all(0 <= c <= 6 for c in counts)
    for k in (1, 3, 6):
        expected = sum(pass_at_k(6, c, k) for c in counts) / len(counts)
        assert sampling["pass_at_k"][str(k)] == pytest.approx(expected)
        lo, hi = sampling["pass_at_k_interval"][str(k)]
        assert lo <= sampling["pass_at_k"][str(k)] <= hi
    assert sampling["pass_at_k"]["1"] <= sampling["pass_at_k"]["3"] <= sampling["pass_at_k"]["6"]
    assert 0 < sampling["pass_at_k"]["6"] < 1, "the toy reward should be hit by some samples, not all"
    assert 0.0 <= sampling["self_bleu"] <= 1.0 and 0 < sampling["distinct_1"] <= 1.0

    assert first["correct"] == [int(s["correct"]) for s in first["samples"]] + first["correct"][3:]
    assert first["accuracy"] == pytest.approx(sum(first["correct"]) / len(rows))
    assert len(first["samples"]) == 3
    # another seed draws other samples; greedy accuracy does not move
    settings.seed = 1
    other = evaluate(policy, rows, rewards, settings)
    assert other["accuracy"] == first["accuracy"] and other["sampling"]["num_correct"] != counts


def test_greedy_only_eval_has_no_sampling_block(tiny_model_dir, tmp_path):
    recipe, rows, policy, rewards = build(tiny_model_dir, tmp_path)
    result = evaluate(policy, rows, rewards, EvalSettings.from_recipe(recipe))
    assert result["sampling"] is None
    assert set(result["rewards"]) == {"toy_leading_digit", "toy_digits"}
    lo, hi = result["accuracy_interval"]
    assert 0.0 <= lo <= result["accuracy"] <= hi <= 1.0


@pytest.mark.slow
def test_eval_of_a_run_reproduces_its_final_eval(tiny_model_dir, tmp_path, capsys):
    raw = tiny_recipe(tiny_model_dir, tmp_path / "run", model={"lora": {"r": 4, "alpha": 8}, "dtype": "bfloat16"},
                      training={"max_steps": 3, "eval_every": 0, "learning_rate": 5e-2})
    raw["rewards"] = [{"name": "toy_leading_digit"}]
    run_dir = train(recipe_from_dict(raw))
    final = json.loads((run_dir / "eval" / "step-3.json").read_text())

    assert main(["eval", "--model", str(run_dir), "--num-generations", "4", "--k", "1", "4"]) == 0
    out = capsys.readouterr().out
    path = run_dir / "eval" / "addition-k4.json"
    assert "pass@4" in out and str(path) in out
    result = json.loads(path.read_text())
    # the checkpoint rebuilt for evaluation decodes exactly as the policy did at the end of training
    assert result["correct"] == final["correct"] and result["samples"] == final["samples"]
    assert result["model"].endswith("step-3") and result["data"] == "builtin:addition"
    assert list(result["sampling"]["pass_at_k"]) == ["1", "4"]

    # the untrained model under the run's recipe is the run's step 0, exactly (same dtype handling)
    _, baseline = run_evaluation(str(tiny_model_dir), recipe_path=str(run_dir / "recipe.yaml"),
                                 out=str(tmp_path / "baseline.json"))
    start = json.loads((run_dir / "eval" / "step-0.json").read_text())
    assert baseline["correct"] == start["correct"] and baseline["samples"] == start["samples"]

    # an existing file is kept unless asked; training's own names are refused
    assert main(["eval", "--model", str(run_dir), "--num-generations", "4"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(GrpokitError, match="not step-N"):
        run_evaluation(str(run_dir), name="step-7")


def test_plain_model_needs_a_recipe_and_writes_to_dot_eval(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(GrpokitError, match="--recipe"):
        run_evaluation(str(tiny_model_dir))
    raw = tiny_recipe(tiny_model_dir, tmp_path / "unused")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    path, result = run_evaluation(str(tiny_model_dir), recipe_path="r.yaml", limit=4,
                                  overrides=["data.source=builtin:larger_number"])
    assert path.resolve() == tmp_path / "eval" / f"{tiny_model_dir.name}-larger_number.json"
    assert result["num_examples"] == 4 and result["data"] == "builtin:larger_number"
    assert json.loads(path.read_text())["accuracy"] == result["accuracy"]


def test_eval_flags_are_validated_like_recipe_keys(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(tiny_recipe(tiny_model_dir, tmp_path / "x")))
    assert main(["eval", "--model", str(tiny_model_dir), "--recipe", str(tmp_path / "r.yaml"), "--k", "0"]) == 2
    assert "pass_k" in capsys.readouterr().err
