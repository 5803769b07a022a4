"""Reward models (``grpokit reward-model``): the loss, the data, training, reloading, and use as a GRPO reward."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from grpokit.config import RewardModelRecipe, load_recipe, recipe_from_dict
from grpokit.errors import DataError, ModelError
from grpokit.data.pairs import pair_of, read_preference_rows
from grpokit.models.reward_head import load_reward_model
from grpokit.rewards.reward_model import reward_model
from grpokit.train.reward_model import PairExample, bradley_terry, train_reward_model

from conftest import run_cli, tiny_recipe

ROOT = Path(__file__).resolve().parents[1]
WORDS = "apple river stone cloud green quiet table window music light paper summer".split()
REWARD = "reward_model"  # registered by grpokit.rewards; "grpokit.rewards.reward_model:score" names the same function


def planted_pairs(n, seed=0):
    """The planted preference: the chosen reply has a digit where the rejected one has a word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, at = rng.sample(WORDS, 4), rng.randint(0, 4)
        rows.append({"prompt": f"Describe {rng.choice(WORDS)}.",
                     "chosen": " ".join(words[:at] + [str(rng.randint(1, 9))] + words[at:]),
                     "rejected": " ".join(words[:at] + [rng.choice(WORDS)] + words[at:])})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rm_recipe(model_dir, data, out, **training):
    return recipe_from_dict({
        "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu", "lora": {"r": 8, "alpha": 16}},
        "data": {"source": str(data), "eval_size": 64},
        "training": {"learning_rate": 3e-3, "epochs": 2, "batch_size": 16, "eval_every": 0, "lr_schedule": "constant",
                     "num_threads": 1, "output_dir": str(out), **training},
    }, schema=RewardModelRecipe)


class FixedScorer:
    def __init__(self, rewards):
        self.values = torch.tensor(rewards)

    def rewards(self, sequences):
        return self.values[:len(sequences)]


def test_bradley_terry_by_hand():
    # r_chosen = [2, 0], r_rejected = [1, 1]: differences [1, -1], margin 0.5
    loss, metrics = bradley_terry(FixedScorer([2.0, 0.0, 1.0, 1.0]), [PairExample([], [], "")] * 2, margin=0.5)
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))) / 2  # -log sigmoid(x) = log(1 + e^-x)
    assert math.isclose(loss.item(), expected, rel_tol=1e-6) and math.isclose(expected, 1.0877, abs_tol=1e-4)
    assert metrics == {"accuracy": 0.5, "margin": 0.0}


def test_pair_rows_explicit_and_implicit_prompt():
    user, a, b = ({"role": r, "content": c} for r, c in [("user", "q"), ("assistant", "yes"), ("assistant", "no")])
    assert pair_of({"prompt": "q", "chosen": "yes", "rejected": "no"}, "f:1") == ([user], [a], [b])
    assert pair_of({"prompt": [user], "chosen": [a], "rejected": [b]}, "f:1") == ([user], [a], [b])
    assert pair_of({"chosen": [user, a], "rejected": [user, b]}, "f:1") == ([user], [a], [b])


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "yes"}, "needs 'chosen' and 'rejected'"),
    ({"prompt": "q", "chosen": 1, "rejected": "no"}, "'chosen' must be a string or a list of chat messages"),
    ({"prompt": "q", "chosen": [{"role": "assistant"}], "rejected": "no"}, r"chosen\[0\] is not a chat message"),
    ({"chosen": "yes", "rejected": "no"}, "without 'prompt', chosen and rejected must be conversations"),
    ({"chosen": [{"role": "user", "content": "q"}], "rejected": [{"role": "user", "content": "q"}]},
     "start with the same messages"),
])
def test_bad_pairs_fail_with_file_and_line(tmp_path, row, message):
    data = write_jsonl(tmp_path / "p.jsonl", [planted_pairs(1)[0], row])
    with pytest.raises(DataError, match=message) as err:
        read_preference_rows(rm_recipe("unused", data, tmp_path / "o").data.source)
    assert f"{data}:2:" in str(err.value)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no preference pairs"):
        read_preference_rows(rm_recipe("unused", tmp_path / "empty.jsonl", tmp_path / "o").data.source)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One reward model for the tests below: 200 training pairs, 64 held out."""
    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "pairs.jsonl", planted_pairs(264))
    return train_reward_model(rm_recipe(tiny_model_dir, data, tmp / "run"))


def test_reward_model_learns_a_planted_preference(trained):
    info = json.loads((trained / "run.json").read_text())
    assert info["status"] == "finished" and info["train_rows"] == 200 and info["eval_rows"] == 64
    assert info["eval_after"]["accuracy"] >= 0.9, info["eval_after"]
    assert info["eval_after"]["loss"] < info["eval_before"]["loss"] - 0.3
    saved = trained / "reward_model"
    assert info["saved"] == str(saved)
    for name in ("adapter_model.safetensors", "adapter_config.json", "head.safetensors", "reward_model.json",
                 "tokenizer_config.json"):
        assert (saved / name).is_file(), name
    meta = json.loads((saved / "reward_model.json").read_text())
    assert meta["weights"] == "adapter" and meta["head"]["kind"] == "linear" and meta["max_length"] == 512
    assert Path(meta["base_model_resolved"]).is_dir() and meta["dtype"] == "float32"
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 26]
    for key in ("loss", "accuracy", "margin", "lr", "grad_norm", "pairs_per_s"):
        assert key in rows[1], key


def test_reloaded_model_gives_identical_scores_and_ranks_the_planted_pair(trained):
    from grpokit.train.reward_model import encode_pairs, held_out_preferences
    from grpokit.train.supervised import hold_out

    recipe = load_recipe(trained / "recipe.yaml", schema=RewardModelRecipe)
    reloaded = load_reward_model(trained / "reward_model", device="cpu")
    # the held-out pairs scored again from disk: the same loss, accuracy and margin as at the end of training
    data = recipe.data
    _, rows = hold_out(read_preference_rows(data.source), data.eval_size, data.seed, data.source)
    held_out, _ = encode_pairs(rows, reloaded.tokenizer, recipe.training.max_length, data.system_prompt)
    with torch.no_grad():
        again = held_out_preferences(reloaded, held_out, recipe.head.margin, recipe.training.batch_size)
    assert again == pytest.approx(json.loads((trained / "run.json").read_text())["eval_after"], abs=1e-6)

    rows = planted_pairs(8, seed=99)
    prompts = [r["prompt"] for r in rows] * 2
    completions = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    scores = reloaded.score(prompts, completions, batch_size=5)
    assert all(s > r for s, r in zip(scores[:8], scores[8:])), scores
    # one float per completion, from the reward function (loaded once, cached) in the conversational form too
    values = reward_model(prompts, completions, path=str(trained), batch_size=16, device="cpu")
    assert len(values) == 16 and all(isinstance(v, float) for v in values)
    assert values == pytest.approx(scores, abs=1e-5)
    chat = reward_model([[{"role": "user", "content": p}] for p in prompts],
                        [[{"role": "assistant", "content": c}] for c in completions], path=str(trained), device="cpu")
    assert chat == pytest.approx(scores, abs=1e-5)
    with pytest.raises(ModelError, match="no reward_model.json"):
        load_reward_model(trained / "nowhere")


def test_grpo_runs_a_step_with_the_reward_model_as_reward(trained, tiny_model_dir, tmp_path):
    from grpokit.train import train

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "grpo", training={"max_steps": 1, "num_threads": 1})
    recipe["rewards"] = [{"name": REWARD, "args": {"path": str(trained / "reward_model"), "device": "cpu"}}]
    run_dir = train(recipe_from_dict(recipe))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in rows if r["kind"] == "train")
    assert isinstance(step[f"rewards/{REWARD}"], float) and step["reward"] is not None


def test_cli_trains_and_prints_the_held_out_accuracy(tiny_model_dir, tmp_path, capsys):
    import yaml

    data = write_jsonl(tmp_path / "pairs.jsonl", planted_pairs(40))
    recipe = rm_recipe(tiny_model_dir, data, tmp_path / "run").model_dump(mode="json")
    path = tmp_path / "rm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert run_cli(["reward-model", path, "--set", "data.eval_size=8", "--set", "training.max_steps=2",
                    "--set", "model.lora=null", "--set", "head.kind=mlp", "--set", "head.hidden=16"]) == 0
    out = capsys.readouterr().out
    assert "held-out preference accuracy" in out and REWARD in out
    saved = tmp_path / "run" / "reward_model"
    meta = json.loads((saved / "reward_model.json").read_text())
    assert (saved / "model.safetensors").is_file() and meta["head"] == {"kind": "mlp", "hidden": 16, "hidden_size": 64}
    assert len(load_reward_model(saved, device="cpu").score(["q"], ["a 1"])) == 1


def test_shipped_reward_model_recipe_validates():
    recipe = load_recipe(ROOT / "recipes" / "reward-model-demo.yaml", schema=RewardModelRecipe)
    assert (ROOT / recipe.data.source).is_file() and recipe.model.path == "smollm2-135m-instruct"
