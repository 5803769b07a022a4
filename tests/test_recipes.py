"""Every shipped recipe validates (litgpt's test that binds every YAML), in every subfolder.

The stage is read from the file name: ``sft-*.yaml`` are `grpokit sft` recipes,
``reward-model-*.yaml`` are `grpokit reward-model` recipes, the rest are GRPO recipes.
"""

from pathlib import Path

import pytest

from grpokit.config import Recipe, RewardModelRecipe, SftRecipe, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


def schema_of(path: Path):
    if path.name.startswith("sft-"):
        return SftRecipe
    if path.name.startswith("reward-model-"):
        return RewardModelRecipe
    return Recipe


def test_there_are_recipes():
    assert RECIPES, "recipes/ holds no YAML files"
    assert {schema_of(p) for p in RECIPES} == {Recipe, SftRecipe, RewardModelRecipe}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates(path):
    recipe = load_recipe(path, schema=schema_of(path))
    if isinstance(recipe, Recipe):
        assert recipe.rewards
    else:
        assert Path(recipe.data.source).is_file() or not recipe.data.source.endswith(".jsonl"), recipe.data.source
