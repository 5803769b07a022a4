"""Recipe validation: every error names what and where."""

from pathlib import Path

import pytest

from grpokit.config import dump_recipe, load_recipe, recipe_from_dict
from grpokit.errors import RecipeError

MINIMAL = "rewards:\n  - name: answer_match\n"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_fill_in_and_round_trip(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.rollout.num_generations == 8 and recipe.model.lora.r == 16
    again = load_recipe(write(tmp_path, dump_recipe(recipe)))
    assert again == recipe


def test_unknown_key_names_the_key_its_line_and_nearest_valid_key(tmp_path):
    path = write(tmp_path, MINIMAL + "training:\n  max_step: 5\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert f"{path}:4" in message
    assert "'training.max_step'" in message and "did you mean 'training.max_steps'" in message


def test_wrong_type_names_the_key_path(tmp_path):
    path = write(tmp_path, MINIMAL + "rollout:\n  temperature: hot\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:4: rollout.temperature: .*'hot'"):
        load_recipe(path)


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match=r"recipe.yaml:2:\d+: malformed YAML"):
        load_recipe(write(tmp_path, "rewards: [\n  - {name: x\n"))


def test_set_overrides_apply_with_types_and_are_validated(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["training.max_steps=10", "rewards.0.weight=0.5", "model.lora=null"])
    assert recipe.training.max_steps == 10 and recipe.rewards[0].weight == 0.5 and recipe.model.lora is None
    with pytest.raises(RecipeError, match=r"--set training.max_stepz=3: unknown key .*did you mean 'training.max_steps'"):
        load_recipe(path, ["training.max_stepz=3"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["training.max_steps"])


def test_rewards_are_required_and_accuracy_reward_must_exist():
    with pytest.raises(RecipeError, match="missing required key 'rewards'"):
        recipe_from_dict({})
    with pytest.raises(RecipeError, match="accuracy_reward 'nope'"):
        recipe_from_dict({"rewards": [{"name": "a"}], "eval": {"accuracy_reward": "nope"}})


def test_differences_name_the_dotted_key_or_the_whole_section_that_changed_shape():
    from grpokit.config import differences

    assert differences({"rewards": [{"name": "x", "weight": 1}]}, {"rewards": [{"name": "x", "weight": 2}]}) == [
        ("rewards.0.weight", 1, 2)]
    assert differences({"rewards": None, "a": {"b": 1}}, {"rewards": [{"name": "x"}], "a": {"b": 2}}) == [
        ("rewards", None, [{"name": "x"}]), ("a.b", 1, 2)]
    assert differences({"a": 1, "gone": 2}, {"a": 1}) == [("gone", 2, None)]
