"""Bad, random and hostile input (issue #7 items 5-7): refused with a message for people,
never a traceback, and never executed.

- Bad input through the CLI: exit code 2, exactly one ``grpokit: error: ...`` line on stderr
  saying what and where (file:line:column, key path, the nearest valid key), and no run
  directory left behind -- an existing run is left byte for byte as it was.
- Property tests (hypothesis): random recipes, YAML text, ``--set`` strings, dataset files and
  episode files either load or raise the stage's ``GrpokitError``; nothing else escapes.
  Every leak they found is pinned below as a plain regression test.
- Security: recipes go through a safe YAML loader, ``trust_remote_code`` comes only from the
  recipe, weights are written and read as safetensors, state files are unpickled with
  ``weights_only=True``, and dataset values stay data.

Checkpoints, resume, signals and NaN handling are in test_faults.py.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from grpokit.cli import main
from grpokit.config import (DataConfig, ModelConfig, Recipe, RewardModelRecipe, Section, SftRecipe, dump_recipe,
                            load_recipe, recipe_from_dict)
from grpokit.data.episodes import episodes_to_prompts, episodes_to_sft, load_episodes
from grpokit.data.loaders import load_splits, read_jsonl
from grpokit.errors import DataError, GrpokitError, RecipeError, RunDirError
from grpokit.models.checkpoint import load_checkpoint, load_torch_state
from grpokit.models.loading import load_policy
from grpokit.rewards import resolve_reward
from grpokit.train import train

from conftest import tiny_recipe

# GRPOKIT_FUZZ_EXAMPLES=5000 searches harder (a nightly job); the default keeps the file near 30 s on 2 cores
FUZZ = settings(max_examples=int(os.environ.get("GRPOKIT_FUZZ_EXAMPLES", 250)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


# ============================================================================ helpers


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def line_of(path: Path, needle: str) -> int:
    """1-based line of the first line of ``path`` containing ``needle``."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), start=1) if needle in line)


def refused(capsys, *argv: str) -> str:
    """Run the CLI and check the contract for bad input: exit 2, one error line, no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert len(lines) == 1 and lines[0].startswith("grpokit: error: "), f"not one error line:\n{err}"
    assert "Traceback" not in err
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows as JSON lines; a str row is written as it is (to inject broken lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_ROWS = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(8)]


# one torch thread: on a busy 2-core machine two threads made a one-step run 40x slower (12 s vs 0.3 s)
ONE_STEP = {"max_steps": 1, "num_threads": 1}



@pytest.fixture
def recipe(tiny_model_dir, tmp_path):
    """A tiny full-fine-tuning recipe of one step; output_dir is tmp_path / 'run'."""
    return tiny_recipe(tiny_model_dir, tmp_path / "run", training=ONE_STEP, data={"train_size": 8, "eval_size": 2})


def with_data(recipe: dict, path: Path, **data) -> dict:
    """The recipe reading ``path`` (held-out rows split off the file)."""
    recipe = copy.deepcopy(recipe)
    recipe["data"] = {"source": str(path), "eval_size": 1, **data}
    return recipe


# ============================================================================ item 5: bad recipes


def test_malformed_yaml_names_line_and_column(recipe, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    lines = len(path.read_text().splitlines())
    path.write_text(path.read_text() + "extra: x: y\n")
    message = refused(capsys, "train", str(path))
    assert f"recipe.yaml:{lines + 1}:9: malformed YAML: mapping values are not allowed here" in message
    assert not (tmp_path / "run").exists()


def test_tab_indentation_names_line_and_column(recipe, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    text = path.read_text().replace("  max_steps: 1", "\tmax_steps: 1")
    path.write_text(text)
    message = refused(capsys, "train", str(path))
    assert f"recipe.yaml:{line_of(path, 'max_steps')}:1: malformed YAML" in message and "'\\t'" in message
    assert not (tmp_path / "run").exists()


def test_wrong_type_names_key_path_and_line(recipe, tmp_path, capsys):
    recipe["rollout"]["temperature"] = "hot"
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    message = refused(capsys, "train", str(path))
    assert f"recipe.yaml:{line_of(path, 'temperature')}: rollout.temperature: " in message
    assert "valid number" in message and "'hot'" in message
    assert not (tmp_path / "run").exists()


def test_wrong_type_in_a_list_names_the_index(recipe, tmp_path, capsys):
    recipe["rewards"] = [{"name": "toy_digits"}, {"name": "format_regex", "weight": "heavy"}]
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    message = refused(capsys, "train", str(path))
    assert f"recipe.yaml:{line_of(path, 'weight')}: rewards.1.weight: " in message and "'heavy'" in message
    assert not (tmp_path / "run").exists()


def test_unknown_key_names_key_path_and_nearest_valid_key(recipe, tmp_path, capsys):
    recipe["training"]["learnin_rate"] = 0.1
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    message = refused(capsys, "train", str(path))
    assert f"recipe.yaml:{line_of(path, 'learnin_rate')}: unknown key 'training.learnin_rate'" in message
    assert "did you mean 'training.learning_rate'?" in message
    assert not (tmp_path / "run").exists()


def test_unknown_section_lists_the_valid_ones(recipe, tmp_path, capsys):
    recipe["trainnig"] = {"max_steps": 1}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    message = refused(capsys, "train", str(path))
    assert "unknown key 'trainnig'; did you mean 'training'?" in message


@pytest.mark.parametrize("override, expected", [
    ("training.max_steps=many", r"--set training.max_steps=many: training.max_steps: .*valid integer.*'many'"),
    ("training.max_stepz=3", r"--set training.max_stepz=3: unknown key 'training.max_stepz'; did you mean 'training.max_steps'"),
    ("training.max_steps", r"--set 'training.max_steps': expected KEY=VALUE"),
    ("=3", r"--set '=3': expected KEY=VALUE"),
    ("rollout.temperature=[1, 2", r"--set 'rollout.temperature=\[1, 2': the value is not valid YAML"),
    ("rewards.5.weight=1", r"--set rewards.5.weight=1: rewards.5 is not an index of that list"),
    ("training.seed.x=1", r"--set training.seed.x=1: training.seed: .*valid integer \(got a mapping\)"),
    ("training.max_steps.x=1", r"--set training.max_steps.x=1: training.max_steps is not a section"),
    ("training.seed=2001-02-30", r"--set 'training.seed=2001-02-30': the value is not valid YAML \(cannot read '2001-02-30'"),
])
def test_bad_set_override(recipe, tmp_path, capsys, override, expected):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    message = refused(capsys, "train", str(path), "--set", override)
    assert re.search(expected, message), message
    assert not (tmp_path / "run").exists()


def test_missing_recipe_file(tmp_path, capsys):
    message = refused(capsys, "train", str(tmp_path / "nope.yaml"))
    assert f"{tmp_path / 'nope.yaml'}: recipe file not found" in message


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_recipe_file(recipe, tmp_path, capsys):
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    path.chmod(0)
    try:
        message = refused(capsys, "train", str(path))
    finally:
        path.chmod(0o644)
    assert f"{path}: cannot read the recipe" in message and "Permission denied" in message
    assert not (tmp_path / "run").exists()


def test_unreadable_recipe_file_even_as_root(recipe, tmp_path, capsys, monkeypatch):
    """The same refusal where chmod cannot cause it (root): the read itself fails."""
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    message = refused(capsys, "train", str(path))
    assert f"{path}: cannot read the recipe" in message and "Permission denied" in message
    assert not (tmp_path / "run").exists()


def test_directory_given_as_recipe(tmp_path, capsys):
    message = refused(capsys, "train", str(tmp_path))
    assert f"{tmp_path}: cannot read the recipe" in message and "Is a directory" in message


def test_recipe_that_is_not_utf8(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"rewards: [{name: caf\xe9}]\n")
    message = refused(capsys, "train", str(path))
    assert f"{path}: cannot read the recipe" in message and "utf-8" in message


def test_recipe_that_is_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text("- rewards\n- training\n")
    message = refused(capsys, "train", str(path))
    assert "a recipe must be a YAML mapping of sections, got list" in message


# ============================================================================ item 5: bad data


DATA_FAULTS = {
    "missing file": (None, r"missing\.jsonl: data file not found"),
    "empty dataset": (b"\n  \n\n", r"data\.jsonl: the dataset is empty"),
    "row without the prompt field": (
        [GOOD_ROWS[0], GOOD_ROWS[1], {"question": "What is 1 + 1?", "answer": "2"}],
        r"data\.jsonl:3: row has no 'prompt' field .*set data\.prompt_field"),
    "invalid UTF-8": (
        json.dumps(GOOD_ROWS[0]).encode() + b'\n{"prompt": "caf\xe9", "answer": "1"}\n',
        rf"data\.jsonl:2: not valid UTF-8 \(byte {len(json.dumps(GOOD_ROWS[0])) + 1 + 15} of the file\); "
        "re-encode the file as UTF-8"),
    "invalid JSON": ([GOOD_ROWS[0], '{"prompt": "a", "answer": 1,}'], r"data\.jsonl:2: not valid JSON \(.*column 29\)"),
    "a line that is not an object": ([GOOD_ROWS[0], '["a", "b"]'], r"data\.jsonl:2: expected a JSON object, got list"),
    "prompt of the wrong type": ([GOOD_ROWS[0], {"prompt": 7}], r"data\.jsonl:2: 'prompt' is 7; expected a non-empty string"),
    "chat prompt that is not messages": (
        [GOOD_ROWS[0], {"prompt": [{"role": "user", "content": "hi"}, "and then"]}],
        r"data\.jsonl:2: prompt\[1\] is not a chat message; each needs a string 'role' and a string 'content'"),
    "too few rows for the held-out split": ([GOOD_ROWS[0]], r"data\.jsonl: 1 rows cannot give 1 held-out rows .*data\.eval_size"),
}


@pytest.mark.parametrize("fault", DATA_FAULTS)
def test_bad_data_file(recipe, tmp_path, capsys, fault):
    content, expected = DATA_FAULTS[fault]
    path = tmp_path / ("missing.jsonl" if content is None else "data.jsonl")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        write_jsonl(path, content)
    recipe_path = write_recipe(tmp_path / "recipe.yaml", with_data(recipe, path))
    message = refused(capsys, "train", str(recipe_path))
    assert re.search(expected, message), message
    assert not (tmp_path / "run").exists()


def test_unreadable_data_file(recipe, tmp_path, capsys, monkeypatch):
    path = write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS)
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    message = refused(capsys, "train", str(write_recipe(tmp_path / "recipe.yaml", with_data(recipe, path))))
    assert f"{path}: cannot read the data file (Permission denied)" in message
    assert not (tmp_path / "run").exists()


def overflow_data(tmp_path: Path) -> Path:
    """10 rows, 3 of them far over 64 tokens with the chat template (one character = one token)."""
    long = [{"prompt": "Please add these. " * 12 + f"What is {i} + 1?", "answer": str(i + 1)} for i in range(3)]
    return write_jsonl(tmp_path / "data.jsonl", GOOD_ROWS[:7] + long)


def test_prompts_over_max_prompt_length_refused_with_count_and_limit(recipe, tmp_path, capsys):
    recipe = with_data(recipe, overflow_data(tmp_path), eval_size=2)
    recipe["rollout"].update(max_prompt_length=64, prompt_overflow="error")
    message = refused(capsys, "train", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert "3 of 10 prompts" in message and "rollout.max_prompt_length = 64" in message
    assert "prompt_overflow: truncate" in message
    assert not (tmp_path / "run").exists()


def test_prompts_over_max_prompt_length_truncated_with_a_warning(recipe, tmp_path, capsys, caplog):
    recipe = with_data(recipe, overflow_data(tmp_path), eval_size=2)
    recipe["rollout"]["max_prompt_length"] = 64
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    with caplog.at_level(logging.WARNING, logger="grpokit.train.run"):
        assert main(["train", str(path)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "grpokit.train.run" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 of 10 prompts" in warnings[0] and "= 64" in warnings[0], warnings
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


# ============================================================================ item 5: bad rewards


def test_reward_module_that_does_not_exist(recipe, tmp_path, capsys):
    recipe["rewards"] = [{"name": "grpokit_no_such_module:score"}]
    message = refused(capsys, "train", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert "reward 'grpokit_no_such_module:score': no module 'grpokit_no_such_module' in the installed packages" in message
    assert f"folders searched ({tmp_path.resolve()}, " in message  # where it looked: the recipe's folder first
    assert not (tmp_path / "run").exists()


def test_reward_module_that_fails_on_import(recipe, tmp_path, capsys, monkeypatch):
    (tmp_path / "broken_reward_module.py").write_text("raise RuntimeError('boom at import time')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe["rewards"] = [{"name": "broken_reward_module:score"}]
    message = refused(capsys, "train", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert "cannot import module 'broken_reward_module' (RuntimeError: boom at import time)" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["json:no_such_function", "json:JSONDecodeError.msg", "json:__doc__", "json:"])
def test_reward_function_that_does_not_exist(recipe, tmp_path, capsys, name):
    recipe["rewards"] = [{"name": name}]
    message = refused(capsys, "train", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert f"reward {name!r}: module 'json' has no function" in message
    assert not (tmp_path / "run").exists()


def test_unknown_reward_name_lists_the_registered_ones(recipe, tmp_path, capsys):
    recipe["rewards"] = [{"name": "acuracy"}]
    message = refused(capsys, "train", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert "unknown reward 'acuracy'; registered rewards are [" in message and "'accuracy'" in message
    assert not (tmp_path / "run").exists()


# ============================================================================ item 5: an existing run


@pytest.fixture
def old_run(recipe, tmp_path):
    """A different, finished run already in training.output_dir."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step-3").mkdir(parents=True)
    old = recipe_from_dict({**recipe, "training": {**recipe["training"], "max_steps": 3, "seed": 7}})
    (run_dir / "recipe.yaml").write_text(dump_recipe(old))
    (run_dir / "run.json").write_text(json.dumps({"status": "finished", "steps": 3}))
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "reward": 0.5}\n')
    (run_dir / "checkpoints" / "step-3" / "model.safetensors").write_bytes(b"the old run's weights")
    (run_dir / "checkpoints" / "latest").write_text("step-3\n")
    return run_dir


def test_existing_run_is_refused_and_left_untouched(recipe, old_run, tmp_path, capsys):
    before = snapshot(old_run)
    message = refused(capsys, "train", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert f"{old_run} already holds a run" in message and "--resume" in message and "--overwrite" in message
    assert snapshot(old_run) == before


def test_resume_of_a_different_run_is_refused_and_left_untouched(recipe, old_run, tmp_path, capsys):
    before = snapshot(old_run)
    message = refused(capsys, "train", str(write_recipe(tmp_path / "recipe.yaml", recipe)), "--resume")
    assert f"--resume: the recipe differs from the run's {old_run / 'recipe.yaml'} at training.seed;" in message
    assert snapshot(old_run) == before


def test_overwrite_with_bad_input_keeps_the_old_run(recipe, old_run, tmp_path, capsys):
    before = snapshot(old_run)
    bad = with_data(recipe, tmp_path / "missing.jsonl")
    message = refused(capsys, "train", str(write_recipe(tmp_path / "recipe.yaml", bad)), "--overwrite")
    assert "missing.jsonl: data file not found" in message
    assert snapshot(old_run) == before


def test_output_dir_that_is_a_file(recipe, tmp_path, capsys):
    (tmp_path / "run").write_text("not a directory")
    message = refused(capsys, "train", str(write_recipe(tmp_path / "recipe.yaml", recipe)))
    assert "is a file, not a directory" in message
    assert (tmp_path / "run").read_text() == "not a directory"


def test_overwrite_replaces_the_old_run(recipe, old_run, tmp_path, capsys):
    assert main(["train", str(write_recipe(tmp_path / "recipe.yaml", recipe)), "--overwrite"]) == 0
    assert not (old_run / "checkpoints" / "step-3").exists()
    assert json.loads((old_run / "run.json").read_text())["status"] == "finished"
    assert yaml.safe_load((old_run / "recipe.yaml").read_text())["training"]["seed"] == 0


# ============================================================================ item 6: fuzzing recipes


def _section_models() -> dict[str, type[Section]]:
    """Recipe section name -> its schema model (rewards -> RewardSpec); plain top-level keys (python_path) aside."""
    models = {}
    for name, field in Recipe.model_fields.items():
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, Section)), None)
        if model is not None:
            models[name] = model
    return models


def _all_sections(model: type = Section) -> list[type]:
    return [sub for child in model.__subclasses__() for sub in (child, *_all_sections(child))]


SECTION_MODELS = _section_models()
FIELD_NAMES = sorted({name for model in _all_sections() for name in model.model_fields})
PLAUSIBLE = ["answer_match", "toy_digits", "builtin:addition", "all-linear", "cosine", "k3", "grpo", "dapo",
             "group_std", "truncate", "error", "auto", "cpu", "float32", "bfloat16", "sequence", "1e-4", "-1",
             "2001-02-30", "", "~", "null", "yes", "0x1F", "1_000", ".inf", "nan"]
keys = st.sampled_from(FIELD_NAMES) | st.sampled_from(list(SECTION_MODELS)) | st.text(max_size=10) | st.integers(-2, 5)
scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
           | st.sampled_from(PLAUSIBLE) | st.integers(-(10**30), 10**30))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                      max_leaves=12)


DEFAULTS = Recipe(rewards=[{"name": "answer_match"}]).model_dump(mode="json")


def plausible(default) -> st.SearchStrategy:
    """Values of the default's type near it: often valid, sometimes out of range."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.integers(0, 2 * default + 2)
    if isinstance(default, float):
        return st.floats(0, 2 * default + 1)
    return st.just(default)


@st.composite
def near_valid_recipes(draw) -> dict:
    """A valid recipe with a few fields set to random values: deep type and range errors."""
    recipe: dict = {"rewards": [{"name": "answer_match"}]}
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from(list(SECTION_MODELS)))
        fields = list(SECTION_MODELS[section].model_fields)
        key = draw(st.one_of(*[st.sampled_from(fields)] * 3, st.text(max_size=8)))
        defaults = DEFAULTS[section] if isinstance(DEFAULTS[section], dict) else {}
        value = draw(st.one_of(*[plausible(defaults[key])] * 3, values)) if key in defaults else draw(values)
        if section == "rewards":
            recipe["rewards"] = draw(st.lists(st.dictionaries(st.sampled_from(fields) | st.text(max_size=6), values,
                                                              max_size=4) | values, max_size=3))
        elif draw(st.integers(0, 9)) == 0:
            recipe[section] = value
        elif isinstance(recipe.setdefault(section, {}), dict):
            recipe[section][key] = value
    return recipe


random_recipes = st.dictionaries(st.sampled_from(list(SECTION_MODELS)) | keys, values, max_size=6)
any_recipe = near_valid_recipes() | random_recipes | values


def loads_or_refuses(load, error: type[GrpokitError]):
    """``load()``'s result, or the error it raised on purpose: a clean one-off message for people."""
    try:
        result = load()
    except error as err:
        event(f"refused: {error.__name__}")  # --hypothesis-show-statistics shows the mix
        message = str(err)
        assert message.strip(), "an empty error message"
        assert "errors.pydantic.dev" not in message and "Traceback" not in message, message
        return err
    event("loaded")
    return result


SCHEMAS = st.sampled_from([Recipe, Recipe, SftRecipe, RewardModelRecipe])  # GRPO first: the fields drawn are its


@FUZZ
@given(recipe=any_recipe, schema=SCHEMAS)
def test_fuzz_recipe_from_dict(recipe, schema):
    result = loads_or_refuses(lambda: recipe_from_dict(copy.deepcopy(recipe), schema=schema), RecipeError)
    assert isinstance(result, (schema, RecipeError))


YAML_TOKENS = ["rewards", "training", "model", "max_steps", "name", "answer_match", ":", ": ", "- ", "-", "[", "]",
               "{", "}", ",", "&a ", "*a", "*b", "!!int ", "!!float ", "!!binary ", "!!timestamp ", "!!str ", "!!map ",
               "!!python/object/apply:builtins.len ", "!!python/name:builtins.len", "!custom ", "2001-02-30",
               "1e400", "0o99", ".nan", "~", "\n", "\n  ", "\n    ", "\t", "  ", "'", '"', "#", "|", ">", "? ", "<<: ",
               "%YAML 1.1\n", "---\n", "...\n", "\\", "\x00", "\x85", "\ufeff", "é", "null", "[*a]"]
yaml_texts = (st.lists(st.sampled_from(YAML_TOKENS), max_size=40).map("".join)
              | st.text(max_size=200)
              | any_recipe.map(lambda r: yaml.safe_dump(r, allow_unicode=True)))


@st.composite
def mangled_yaml(draw) -> str:
    """A dumped recipe with a few tokens inserted at random places."""
    text = yaml.safe_dump(draw(near_valid_recipes()), sort_keys=False)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(YAML_TOKENS)) + text[at:]
    return text


@FUZZ
@given(text=yaml_texts | mangled_yaml(), as_bytes=st.binary(max_size=64), use_bytes=st.booleans(), schema=SCHEMAS)
def test_fuzz_load_recipe_from_yaml_text(text, as_bytes, use_bytes, schema):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "recipe.yaml"
        if use_bytes:
            path.write_bytes(as_bytes)
        else:
            path.write_text(text, encoding="utf-8", errors="surrogatepass")
        result = loads_or_refuses(lambda: load_recipe(path, schema=schema), RecipeError)
    assert isinstance(result, (schema, RecipeError))


key_paths = st.lists(st.sampled_from(FIELD_NAMES) | st.sampled_from(list(SECTION_MODELS))
                     | st.sampled_from(["0", "1", "7", "²", "-1", "", " "]) | st.text(max_size=6), min_size=1,
                     max_size=4).map(".".join)
overrides = st.builds(lambda k, sep, v: k + sep + v, key_paths, st.sampled_from(["=", "=", "", "==", " = "]),
                      st.text(max_size=12) | st.lists(st.sampled_from(YAML_TOKENS), max_size=6).map("".join)
                      | st.sampled_from(PLAUSIBLE))
SCALAR_FIELDS = [(f"{section}.{key}", default) for section, fields in DEFAULTS.items() if isinstance(fields, dict)
                 for key, default in fields.items() if not isinstance(default, (dict, list))]
plausible_overrides = st.sampled_from(SCALAR_FIELDS).flatmap(
    lambda item: plausible(item[1]).map(lambda value: f"{item[0]}={json.dumps(value)}"))


@FUZZ
@given(base=near_valid_recipes() | st.just({"rewards": [{"name": "answer_match"}]}),
       sets=st.lists(plausible_overrides | overrides | st.text(max_size=30), min_size=1, max_size=3))
def test_fuzz_set_overrides(base, sets):
    result = loads_or_refuses(lambda: recipe_from_dict(copy.deepcopy(base), overrides=sets), RecipeError)
    assert isinstance(result, (Recipe, RecipeError))


NASTY_RECIPES = {
    "a date that is no date": ("training:\n  seed: 2001-02-30\n",
                               r"recipe.yaml:2:9: malformed YAML: cannot read '2001-02-30' as timestamp"),
    "a bad explicit tag": ("training:\n  seed: !!int abc\n", r"recipe.yaml:2:9: malformed YAML: cannot read 'abc' as int"),
    "an alias inside its own anchor": ("rewards: &x [*x]\n", r"rewards.0: Input should be a valid dictionary"),
    "a mapping that contains itself": ("rewards: [{name: a}]\nmodel: &m {lora: *m}\n", r"unknown key 'model.lora.lora'"),
    "nesting too deep": ("rewards: " + "[" * 1000 + "]" * 1000 + "\n", r"recipe.yaml: malformed YAML: nested too deeply"),
    "a non-string key": ("rewards: [{name: a}]\n1: 2\n", r"1: Keys should be strings"),
}


@pytest.mark.parametrize("case", NASTY_RECIPES)
def test_recipes_that_used_to_escape_as_other_errors(tmp_path, case):
    text, expected = NASTY_RECIPES[case]
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=expected):
        load_recipe(path)


@pytest.mark.parametrize("override, expected", [
    ("rewards.0.name=x", r"rewards.0 is not a section"),  # rewards: [1]: a scalar list element
    ("rewards.0.name.y=x", r"rewards.0 is not a section"),
    ("rewards.²=x", r"no list element ²"),
    ("training.seed=" + "[" * 1000, r"the value is not valid YAML"),
])
def test_overrides_that_used_to_escape_as_other_errors(override, expected):
    with pytest.raises(RecipeError, match=expected):
        recipe_from_dict({"rewards": [1]}, overrides=[override])


def test_a_recipe_path_with_a_nul_byte():
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe("recipe\0.yaml")


def test_one_error_is_one_line_and_several_are_listed():
    with pytest.raises(RecipeError) as one:
        recipe_from_dict({"rewards": [{"name": "a"}], "training": {"max_steps": "x"}})
    assert "\n" not in str(one.value)
    with pytest.raises(RecipeError) as two:
        recipe_from_dict({"rewards": [{"name": "a"}], "training": {"max_steps": "x", "seed": "y"}})
    assert str(two.value).startswith("invalid recipe (2 errors):\n  ") and len(str(two.value).splitlines()) == 3


# ============================================================================ item 6: fuzzing datasets


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=10)
FIELDS = ["prompt", "answer", "question", "q", "gold", "_line", "role", "content"]
messages = st.lists(st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values | st.text(max_size=12),
                                    max_size=3) | json_values, max_size=3)
rows = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6),
                       st.text(max_size=20) | messages | json_values, max_size=5)
ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252", "shift_jis"]


@st.composite
def jsonl_files(draw) -> bytes:
    """Bytes of a JSONL file: valid-looking rows, any JSON values, broken lines, any encoding."""
    ascii_only = draw(st.booleans())  # else non-ASCII characters are written as themselves
    dump = lambda value: json.dumps(value, ensure_ascii=ascii_only)  # noqa: E731
    lines = draw(st.lists(rows.map(dump) | json_values.map(dump) | st.text(max_size=20) | st.just(""), max_size=8))
    text = draw(st.sampled_from(["\n", "\r\n", "\r"])).join(lines)
    return text.encode(draw(st.sampled_from(ENCODINGS)), errors="replace")


datasets = jsonl_files() | st.binary(max_size=200)


def write_bytes(folder: str, data: bytes, suffix: str = ".jsonl") -> Path:
    path = Path(folder) / f"data{suffix}"
    path.write_bytes(data)
    return path


@FUZZ
@given(data=datasets, suffix=st.sampled_from([".jsonl", ".json"]), eval_size=st.integers(0, 3),
       prompt_field=st.sampled_from(["prompt", "question", "q"]), answer_field=st.sampled_from(["answer", "gold"]),
       train_size=st.none() | st.integers(1, 3))
def test_fuzz_dataset_files(data, suffix, eval_size, prompt_field, answer_field, train_size):
    with tempfile.TemporaryDirectory() as folder:
        path = write_bytes(folder, data, suffix)
        read = loads_or_refuses(lambda: read_jsonl(path), DataError)
        config = DataConfig(source=str(path), eval_size=eval_size, prompt_field=prompt_field,
                            answer_field=answer_field, train_size=train_size)
        splits = loads_or_refuses(lambda: load_splits(config), DataError)
    if isinstance(read, DataError):
        assert isinstance(splits, DataError)
        assert str(path) in str(read)  # every data error names the file
        return
    assert all(isinstance(row, dict) and isinstance(row["_line"], int) for row in read)
    if isinstance(splits, DataError):
        assert str(path) in str(splits)
        return
    train_rows, held_out = splits
    assert len(held_out) == eval_size and train_rows and len(train_rows) <= (train_size or len(train_rows))
    for row in train_rows + held_out:  # what the trainer relies on
        prompt = row["prompt"]
        assert (isinstance(prompt, str) and prompt) or (
            isinstance(prompt, list) and prompt
            and all(isinstance(m, dict) and isinstance(m["role"], str) and isinstance(m["content"], str) for m in prompt))


DATA_LEAKS = {
    "an integer of 5000 digits": (b'{"prompt": ' + b"1" * 5000 + b"}\n", r"data.jsonl:1: not valid JSON \(Exceeds the limit"),
    "nesting too deep": (b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", r"data.jsonl:1: not valid JSON \(nested too deeply\)"),
    "a bad byte past the first 8 KiB": (b'{"prompt": "aaaaaaaaaaaaaaaaaaaaaaaaa"}\n' * 1000 + b'{"prompt": "\xff"}\n',
                                        r"data.jsonl:1001: not valid UTF-8 \(byte 40012 of the file\)"),
}


@pytest.mark.parametrize("case", DATA_LEAKS)
def test_data_that_used_to_escape_or_mislead(tmp_path, case):
    data, expected = DATA_LEAKS[case]
    with pytest.raises(DataError, match=expected):
        read_jsonl(write_bytes(str(tmp_path), data))


def test_a_utf8_byte_order_mark_is_allowed(tmp_path):
    path = write_bytes(str(tmp_path), "\ufeff".encode() + b'{"prompt": "a"}\r\n{"prompt": "b"}\n')
    assert [(r["prompt"], r["_line"]) for r in read_jsonl(path)] == [("a", 1), ("b", 2)]


# ---------------------------------------------------------------------------- episodes


def episode_strategy(junk: bool) -> st.SearchStrategy:
    """Episode objects: valid ones, or (``junk``) with any field three times in four of the right type."""
    def mostly(good: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(good, good, good, json_values) if junk else good

    finite = st.floats(allow_nan=False, allow_infinity=False)
    observations = st.fixed_dictionaries({}, optional={
        "text": mostly(st.text(max_size=8)), "image_path": mostly(st.text(max_size=8)),
        "extra": mostly(st.dictionaries(st.text(max_size=4), json_values, max_size=2))})
    actions = st.fixed_dictionaries({"type": mostly(st.text(min_size=1, max_size=6))}, optional={
        "args": mostly(st.dictionaries(st.text(max_size=4), json_values, max_size=2)), "text": mostly(st.text(max_size=8))})
    step_optional = {"reasoning": mostly(st.text(max_size=6)), "reward": mostly(finite | st.none())}
    if junk:
        step_optional["junk"] = json_values

    @st.composite
    def step_lists(draw) -> list:
        indexes = range(draw(st.integers(0, 3)))
        return [draw(st.fixed_dictionaries({"index": mostly(st.just(i)), "observation": mostly(observations),
                                            "action": mostly(actions)}, optional=step_optional)) for i in indexes]

    ids = st.sampled_from(["e1", "e2", ""]) if junk else st.uuids().map(str)
    optional = {"final_reward": mostly(finite | st.none()),
                "metadata": mostly(st.dictionaries(st.text(max_size=4), json_values, max_size=2))}
    if junk:
        optional["junk"] = json_values
    return st.fixed_dictionaries({"episode_id": mostly(ids), "instruction": mostly(st.text(max_size=10)),
                                  "steps": mostly(step_lists()), "success": mostly(st.booleans())}, optional=optional)


episodes = st.one_of(episode_strategy(junk=False), episode_strategy(junk=True))


@st.composite
def episode_files(draw) -> bytes:
    lines = draw(st.lists(st.one_of(*[episodes.map(json.dumps)] * 4, json_values.map(json.dumps), st.text(max_size=10)),
                          max_size=4))
    return "\n".join(lines).encode(draw(st.sampled_from(ENCODINGS)), errors="replace")


@FUZZ
@given(data=episode_files() | datasets)
def test_fuzz_episode_files(data):
    with tempfile.TemporaryDirectory() as folder:
        path = write_bytes(folder, data)
        loaded = loads_or_refuses(lambda: load_episodes(path), DataError)
    if isinstance(loaded, DataError):
        assert str(path) in str(loaded)
        return
    # what loaded converts without surprises
    prompts, sft = episodes_to_prompts(loaded), episodes_to_sft(loaded, only_successful=False)
    assert len(prompts.rows) == len(sft.rows)


# ============================================================================ item 7: security


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/object/apply:subprocess.call"])
def test_recipe_yaml_cannot_run_code(tmp_path, monkeypatch, capsys, tag):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    args = f'["touch {marker}"]' if "subprocess" not in tag else f'[["touch", "{marker}"]]'
    path = tmp_path / "recipe.yaml"
    path.write_text(f"rewards: [{{name: answer_match}}]\ntraining:\n  output_dir: {tag} {args}\n")
    with pytest.raises(RecipeError, match=r"recipe.yaml:3:15: malformed YAML: could not determine a constructor"):
        load_recipe(path)
    # as a --set value, and as the whole recipe, through the CLI
    (tmp_path / "ok.yaml").write_text("rewards: [{name: answer_match}]\n")
    assert "not valid YAML" in refused(capsys, "train", str(tmp_path / "ok.yaml"), "--set", f"training.output_dir={tag} {args}")
    path.write_text(f"{tag} {args}\n")
    assert "malformed YAML" in refused(capsys, "train", str(path))
    assert not marker.exists() and not (tmp_path / "PWNED").exists()


def test_python_name_tags_are_refused_too(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("rewards: [{name: !!python/name:os.system }]\n")
    with pytest.raises(RecipeError, match="malformed YAML"):
        load_recipe(path)


def test_trust_remote_code_is_off_unless_the_recipe_turns_it_on(tiny_model_dir, tmp_path, monkeypatch):
    import transformers

    assert ModelConfig().trust_remote_code is False
    assert recipe_from_dict({"rewards": [{"name": "answer_match"}]}).model.trust_remote_code is False
    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        def record(*args, _original=cls.from_pretrained, _name=cls.__name__, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", False)))
            return _original(*args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", record)
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run")
    for overrides, expected in (([], False), (["model.trust_remote_code=true"], True),
                                (["model.trust_remote_code=false"], False)):
        seen.clear()
        load_policy(recipe_from_dict(copy.deepcopy(recipe), overrides=overrides).model, beta=0.0)
        assert sorted(seen) == [("AutoModelForCausalLM", expected), ("AutoTokenizer", expected)], overrides
    with pytest.raises(RecipeError, match="model.trust_remote_code"):
        recipe_from_dict(copy.deepcopy(recipe), overrides=["model.trust_remote_code=maybe"])


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A one-step full fine-tuning run of the tiny model."""
    out = tmp_path_factory.mktemp("security") / "run"
    threads = torch.get_num_threads()
    try:
        return train(recipe_from_dict(tiny_recipe(tiny_model_dir, out, training=ONE_STEP,
                                                  data={"train_size": 8, "eval_size": 2})))
    finally:
        torch.set_num_threads(threads)


TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model"}
STATE_FILES = {"optimizer", "scheduler", "rng", "replay"}


def test_weights_are_safetensors_and_state_loads_weights_only(finished_run):
    files = [p for p in (finished_run / "checkpoints").rglob("*") if p.is_file()]
    unexpected = [p for p in files if not (p.suffix in (".safetensors", ".json") or p.name in TOKENIZER_FILES
                                           or (p.suffix == ".pt" and p.stem in STATE_FILES) or p.name == "latest")]
    assert not unexpected, unexpected
    assert any(p.suffix == ".safetensors" for p in files) and any(p.name == "optimizer.pt" for p in files)
    pickles = [p for p in finished_run.rglob("*") if p.suffix in (".bin", ".pkl", ".pickle", ".pth", ".ckpt")]
    assert not pickles, pickles
    for state in (p for p in files if p.suffix == ".pt"):
        torch.load(state, map_location="cpu", weights_only=True)  # raises on anything but tensors and plain types


class _Payload:
    """Unpickling this runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_poisoned_state_file_is_refused(finished_run, tmp_path):
    checkpoint = tmp_path / "step-1"
    shutil.copytree(finished_run / "checkpoints" / "step-1", checkpoint)
    marker = tmp_path / "PWNED2"
    torch.save({"state": _Payload(f"touch {marker}")}, checkpoint / "optimizer.pt")
    with pytest.raises(RunDirError, match=r"optimizer.pt: refused \(UnpicklingError\).*never runs code"):
        load_torch_state(checkpoint, "optimizer")
    assert not marker.exists()


def resumable_copy(finished_run: Path, tmp_path: Path) -> tuple[Path, Recipe]:
    """A copy of the finished run, and its recipe with one more step: ready for --resume."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    stored = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    stored["training"]["output_dir"] = str(run_dir)
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    stored["training"]["max_steps"] = 2
    return run_dir, recipe_from_dict(stored)


def test_resume_from_a_poisoned_state_file_runs_no_code(finished_run, tmp_path):
    run_dir, recipe = resumable_copy(finished_run, tmp_path)
    marker = tmp_path / "PWNED4"
    torch.save({"state": _Payload(f"touch {marker}")}, run_dir / "checkpoints" / "step-1" / "optimizer.pt")
    with pytest.raises(RunDirError, match="optimizer.pt: refused"):
        train(recipe, resume=True)
    assert not marker.exists()


def test_resume_with_a_tampered_run_recipe_runs_no_code(finished_run, tmp_path):
    run_dir, recipe = resumable_copy(finished_run, tmp_path)
    marker = tmp_path / "PWNED5"
    (run_dir / "recipe.yaml").write_text(f'training: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(RunDirError, match="cannot read the run's"):
        train(recipe, resume=True)
    assert not marker.exists()


def test_a_pickled_weights_file_beside_the_safetensors_is_never_read(finished_run, tmp_path, monkeypatch):
    import transformers

    checkpoint = tmp_path / "step-1"
    shutil.copytree(finished_run / "checkpoints" / "step-1", checkpoint)
    marker = tmp_path / "PWNED-bin"
    torch.save({"model.embed_tokens.weight": _Payload(f"touch {marker}")}, checkpoint / "pytorch_model.bin")
    kwargs_seen = []
    original = transformers.AutoModelForCausalLM.from_pretrained

    def record(*args, **kwargs):
        kwargs_seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", record)
    model, _ = load_checkpoint(checkpoint, dtype=torch.float32)
    assert not marker.exists()
    assert kwargs_seen and not any(k.get("trust_remote_code") for k in kwargs_seen)
    reference = torch.load(finished_run / "checkpoints" / "step-1" / "optimizer.pt", weights_only=True)
    assert reference  # the real state next to it still loads
    assert sum(p.numel() for p in model.parameters()) > 0


def test_dataset_values_are_never_evaluated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED3"
    payload = f"__import__('os').system('touch {marker}')"
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"prompt": payload, "answer": payload, "note": payload},
        {"prompt": [{"role": "user", "content": payload}], "answer": f"${payload}$"},
        {"prompt": "What is 1 + 1?", "answer": "2"},
    ])
    assert [r["prompt"] for r in read_jsonl(path)][0] == payload
    train_rows, held_out = load_splits(DataConfig(source=str(path), eval_size=1))
    rows = {json.dumps(r["prompt"]): r for r in train_rows + held_out}
    assert rows[json.dumps(payload)] == {"prompt": payload, "answer": payload, "note": payload, "data_source": "data"}
    assert rows[json.dumps([{"role": "user", "content": payload}])]["answer"] == f"${payload}$"
    # the maths rewards parse answers and completions: they must not evaluate them either
    for name in ("accuracy", "answer_match"):
        scores = resolve_reward(name)([payload] * 3, [payload, f"\\boxed{{{payload}}}", f"${payload}$"],
                                      answer=[payload, payload, f"${payload}$"])
        assert all(isinstance(s, float) for s in scores), (name, scores)
    assert not marker.exists() and not (tmp_path / "PWNED3").exists()


# ============================================================================ issue 14: poisoned values and state

POISON_MODULE = '''
import sys

calls = []


def inf_once(completions, **kwargs):
    """Digits, as toy_digits, except one +inf on the very first call: a judge's overflow."""
    calls.append(1)
    values = [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]
    if len(calls) == 1:
        values[0] = float("inf")
    return values


def exits(completions, **kwargs):
    sys.exit(3)
'''


@pytest.fixture
def poison_folder(tmp_path):
    (tmp_path / "poison_rewards.py").write_text(POISON_MODULE)
    return tmp_path


def test_one_infinite_reward_does_not_end_learning(recipe, poison_folder, caplog):
    recipe["rewards"] = [{"name": "poison_rewards:inf_once"}]
    recipe["reward_shaping"] = {"normalize": True}
    recipe["training"] = {**recipe["training"], "max_steps": 3, "save_every": 1}
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(write_recipe(poison_folder / "recipe.yaml", recipe))]) == 0
    assert any("returned 1 non-finite or out-of-range value(s) (e.g. inf" in r.getMessage() for r in caplog.records)
    run_dir = Path(recipe["training"]["output_dir"])
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["kind"] == "train"]
    # the normaliser stayed finite, so later steps still have non-zero, finite advantages to learn from
    assert all(math.isfinite(x["reward"]) for x in train_lines)
    assert any(x["grad_norm"] > 0 for x in train_lines[1:])
    stats = json.loads((run_dir / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    stats = stats["reward_orchestrator"]["stats"]["poison_rewards:inf_once"]
    assert math.isfinite(stats["mean"]) and math.isfinite(stats["m2"])


def test_values_beyond_float32_and_poisoned_statistics_are_refused():
    from grpokit.rewards.component import clean_values, split_unusable
    from grpokit.rewards.orchestrator import RunningStats

    values, unusable = split_unusable(clean_values([1.0, float("-inf"), 3.5e38, 1e30], 4))
    assert values == [1.0, None, None, 1e30] and unusable == [float("-inf"), 3.5e38]
    stats = RunningStats()
    stats.update([1.0, float("inf"), 3.0])
    assert stats.mean_std() == (2.0, pytest.approx(2 ** 0.5))
    with pytest.raises(GrpokitError, match="running reward statistics are not finite"):
        RunningStats().load_state_dict({"values": [], "count": 2, "mean": float("nan"), "m2": 0.0})


def test_system_exit_in_reward_code_is_isolated(recipe, poison_folder, tmp_path, capsys, caplog):
    recipe["rewards"] = [{"name": "toy_digits"}, {"name": "poison_rewards:exits"}]
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(write_recipe(poison_folder / "recipe.yaml", recipe))]) == 0
    assert any("'poison_rewards:exits' failed on this batch" in r.getMessage() and "SystemExit: 3" in r.getMessage()
               for r in caplog.records)
    (poison_folder / "exits_at_import.py").write_text("import sys\nsys.exit(4)\n")
    recipe["rewards"] = [{"name": "exits_at_import:anything"}]
    recipe["training"] = {**recipe["training"], "output_dir": str(tmp_path / "run2")}
    message = refused(capsys, "train", str(write_recipe(poison_folder / "recipe2.yaml", recipe)))
    assert "cannot import module 'exits_at_import' (SystemExit: 4)" in message


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused_in_every_field(recipe, tmp_path, capsys, value):
    message = refused(capsys, "train", str(write_recipe(tmp_path / "recipe.yaml", recipe)),
                      "--set", f"training.learning_rate={value}")
    assert "training.learning_rate" in message and "finite" in message


def test_a_step_that_makes_weights_non_finite_stops_the_run():
    from grpokit.errors import TrainingError
    from grpokit.train.update import check_finite_weights

    check_finite_weights([torch.ones(3)])
    with pytest.raises(TrainingError, match="made trainable weights non-finite.*last checkpoint is intact"):
        check_finite_weights([torch.ones(3), torch.tensor([1.0, float("nan")])])


def test_a_data_file_larger_than_memory_is_a_message(tmp_path, monkeypatch):
    import grpokit.data.loaders as loaders

    def no_memory(path):
        raise MemoryError

    monkeypatch.setattr(loaders, "read_jsonl_lines", no_memory)
    path = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError, match=r"big.jsonl: the data file \(0.0 GiB\) does not fit in memory"):
        read_jsonl(path)


@pytest.mark.parametrize("damage", [{"cursor": 10**6}, {"cursor": -1}, {"order": [0, 0, 1]}, {"cursor": "3"},
                                    {"order": None}])
def test_a_tampered_data_position_is_refused_on_resume(recipe, tmp_path, capsys, damage):
    recipe["training"] = {**recipe["training"], "max_steps": 2, "save_every": 1}
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    assert main(["train", str(path), "--set", "training.max_steps=1"]) == 0
    state_file = tmp_path / "run" / "checkpoints" / "step-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["data"].update(damage)
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    message = refused(capsys, "train", str(path), "--resume")
    assert "trainer_state.json's data position is damaged" in message
