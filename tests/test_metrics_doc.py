"""The metrics table in docs/run-directory.md is the one list of metrics.jsonl keys.

A short run with every feature that adds keys switched on (reward normalisation and a
curriculum, dynamic sampling, replay, the overlong penalty, mu = 2, top-entropy tokens,
beta > 0, sampled evaluation, a reward that calls TRL's ``log_metric``) must write only
keys the table lists, and every row of the table must match a key that run wrote, unless
the row says it is present "only with" a recipe field this run leaves off. The table is
parsed from the Markdown, so editing the page is what makes this pass.
"""

from __future__ import annotations

import json
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from grpokit.cli import main

from conftest import tiny_recipe

DOC = Path(__file__).resolve().parents[1] / "docs" / "run-directory.md"
HEADER = ["key", "kind", "meaning", "present"]
USER_MODULE = "metrics_doc_rewards"  # unique, so no other test's module of that name is cached
LOGGING_REWARD = f"{USER_MODULE}:logged"

REWARDS_SOURCE = '''
def logged(completions, log_metric, **kwargs):
    """Pays odd-length replies and reports their mean length, as a TRL reward may."""
    lengths = [len(c if isinstance(c, str) else c[-1]["content"]) for c in completions]
    log_metric("mean_chars", sum(lengths) / len(lengths))
    return [float(n % 2) for n in lengths]
'''


@dataclass
class Row:
    key: str  # as written, e.g. rewards/<name>_std
    kinds: frozenset[str]
    present: str
    pattern: re.Pattern


def split_cells(line: str) -> list[str]:
    """The cells of a Markdown table line; ``\\|`` is a literal bar inside a cell."""
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def key_pattern(key: str, reward_names: list[str]) -> re.Pattern:
    """``<name>`` is one of the run's reward names, ``<k>`` a number, ``<metric>`` any text,
    any other ``<...>`` one path segment. Binding ``<name>`` to real names keeps
    ``rewards/<name>`` from also matching ``rewards/x_std`` and hiding a missing row."""
    names = "|".join(re.escape(n) for n in sorted(reward_names, key=len, reverse=True))
    placeholder = {"name": f"(?:{names})", "k": r"\d+", "metric": r".+"}
    parts = re.split(r"<([a-z_]+)>", key)
    regex = "".join(re.escape(p) if i % 2 == 0 else placeholder.get(p, r"[^/]+") for i, p in enumerate(parts))
    return re.compile(regex)


def metrics_table(reward_names: list[str]) -> list[Row]:
    """The rows of the first ``| key | kind | meaning | present |`` table under ``## metrics.jsonl``."""
    text = DOC.read_text()
    section = text.split("\n## metrics.jsonl\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|") and split_cells(line) == HEADER)
    rows = []
    for line in lines[start + 2:]:  # past the header and the |---| line
        if not line.startswith("|"):
            break
        key_cell, kind_cell, _meaning, present = split_cells(line)
        key = re.fullmatch(r"`([^`]+)`", key_cell)
        assert key, f"{DOC.name}: the key cell {key_cell!r} should be one `key` in backticks"
        kinds = frozenset(k.strip() for k in kind_cell.split(","))
        assert kinds <= {"train", "eval"}, f"{DOC.name}: row {key_cell}: kind {kind_cell!r} is not train / eval"
        rows.append(Row(key.group(1), kinds, present, key_pattern(key.group(1), reward_names)))
    assert rows, f"no metrics table found in {DOC}"
    return rows


def lookup(recipe: dict, dotted: str):
    """A recipe field by dotted path, or KeyError when it is no field."""
    value = recipe
    for part in dotted.split("."):
        value = value[part]
    return value


def condition_is_off(row: Row, recipe: dict) -> bool:
    """The row says "only with `a.b`" and field a.b is off (false, 0, null, empty) in this run."""
    if not row.present.startswith("only"):
        return False
    for dotted in re.findall(r"`([a-z_]+(?:\.[a-z_]+)+)`", row.present):
        try:
            if not lookup(recipe, dotted):
                return True
        except (KeyError, TypeError):
            continue
    return False


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, tmp_path_factory):
    """(resolved recipe, every metrics.jsonl line) of a 3-step run with every keyed feature on."""
    folder = tmp_path_factory.mktemp("metrics-doc")
    (folder / f"{USER_MODULE}.py").write_text(textwrap.dedent(REWARDS_SOURCE))
    recipe = tiny_recipe(
        tiny_model_dir, folder / "run",
        data={"eval_size": 4, "train_size": 32},
        rollout={"num_generations": 4, "max_completion_length": 6},
        algorithm={"beta": 0.04, "num_iterations": 2, "dynamic_sampling": True, "max_sampling_rounds": 1,
                   "overlong_buffer": 2, "top_entropy_quantile": 0.5, "replay": {"capacity": 8, "ratio": 0.25}},
        reward_shaping={"normalize": True,
                        "curriculum": [{"step": 2, "weights": {"toy_digits": 1.0, LOGGING_REWARD: 1.0}}]},
        training={"max_steps": 3, "eval_every": 2, "num_threads": 1},  # one thread: 2 on 2 busy cores is far slower
        eval={"num_generations": 2, "pass_k": [1, 2]},
        logging={"progress": False, "samples_every": 1},
    )
    recipe["rewards"] = [{"name": "toy_digits"}, {"name": LOGGING_REWARD, "weight": 0.5}]  # found beside the recipe
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    run_dir = folder / "run"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return yaml.safe_load((run_dir / "recipe.yaml").read_text()), lines


@pytest.mark.slow
def test_every_key_the_run_writes_is_in_the_table_and_every_row_is_reachable(full_run):
    recipe, lines = full_run
    rows = metrics_table([r["name"] for r in recipe["rewards"]])
    written = sorted({(line["kind"], key) for line in lines for key in line})
    assert {kind for kind, _ in written} == {"train", "eval"}

    def rows_for(kind: str, key: str) -> list[Row]:
        return [r for r in rows if kind in r.kinds and r.pattern.fullmatch(key)]

    undocumented = [f"{kind} line: {key}" for kind, key in written if not rows_for(kind, key)]
    assert not undocumented, f"metrics.jsonl keys missing from the table in {DOC}: {undocumented}"

    ambiguous = [f"{kind} line: {key} ({', '.join(r.key for r in rows_for(kind, key))})"
                 for kind, key in written if len(rows_for(kind, key)) > 1]
    assert not ambiguous, f"keys matched by more than one row of {DOC}: {ambiguous}"

    unreached = [f"{r.key} ({', '.join(sorted(r.kinds))})" for r in rows
                 if not any(kind in r.kinds and r.pattern.fullmatch(key) for kind, key in written)
                 and not condition_is_off(r, recipe)]
    assert not unreached, (f"rows of {DOC} that match no key of a run with every feature on, and are not marked "
                           f"'only with `<recipe field>`' for a field this run leaves off: {unreached}")


def test_the_table_parser_reads_escaped_bars_and_binds_names():
    assert split_cells(r"| `replay/mean_score` | train | mean \|advantage\| | always |") == [
        "`replay/mean_score`", "train", "mean |advantage|", "always"]
    pattern = key_pattern("rewards/<name>", ["accuracy", "my:fn"])
    assert pattern.fullmatch("rewards/my:fn") and not pattern.fullmatch("rewards/accuracy_std")
    assert key_pattern("pass@<k>", []).fullmatch("pass@10") and not key_pattern("pass@<k>", []).fullmatch("pass@x")
    assert key_pattern("reward_log/<name>/<metric>", ["r"]).fullmatch("reward_log/r/judge/calls")
    row = Row("replay/size", frozenset({"train"}), "only with `algorithm.replay.capacity` > 0", re.compile(""))
    assert condition_is_off(row, {"algorithm": {"replay": {"capacity": 0}}})
    assert not condition_is_off(row, {"algorithm": {"replay": {"capacity": 8}}})
