"""Every shipped recipe validates (litgpt's test that binds every YAML), in every subfolder."""

from pathlib import Path

import pytest

from grpokit.config import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES, "recipes/ holds no YAML files"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.rewards
