"""The layering contract: every import in grpokit/ runs one way along DESIGN.md's flow.

Layers, lowest first; a module may import its own package and any lower layer, never a
higher one, and the stage packages sharing a layer are independent of each other:

    shared     grpokit (the version), errors, io, jsonio, imports, distributed (the processes of a run)
    config     the recipe schema
    log        metrics sinks
    data       rows, chat messages, episodes, pairs
    models     policy + processor, loading, checkpoints, reward head
    envs       environments and tools the policy acts in (multi-turn rollouts)
    rollout    PromptBatch encoder, the Sampler contract and its backends, log-probs
    rewards | algo   reward functions and their orchestration | the pure GRPO math
    eval       evaluation runner, grpokit eval, grpokit generate, metrics
    train | report | launch   the loops (GRPO, SFT, reward model) | reports from run directories | job scripts
    cli        the command line

Imports inside functions count too: a lazy import is still a dependency. Each arrow that
breaks the order is one failure, with its file:line.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "grpokit"

LAYERS: list[list[str]] = [
    ["grpokit", "grpokit.errors", "grpokit.io", "grpokit.jsonio", "grpokit.imports", "grpokit.distributed"],
    ["grpokit.config"],
    ["grpokit.log"],
    ["grpokit.data"],
    ["grpokit.models"],
    ["grpokit.envs"],
    ["grpokit.rollout"],
    ["grpokit.rewards", "grpokit.algo"],
    ["grpokit.eval"],
    ["grpokit.train", "grpokit.report", "grpokit.launch"],
    ["grpokit.cli"],
    ["grpokit.__main__"],
]
TOP_LEVEL_FILES = {"__init__.py", "__main__.py", "errors.py", "io.py", "jsonio.py", "imports.py", "config.py",
                   "log.py", "cli.py", "launch.py", "distributed.py"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The layer entry a module belongs to: its stage package, or the top-level module itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return "grpokit"
    return ".".join(parts[:2])


def layer_of(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"{unit} is in no layer of tests/test_layering.py: place it in LAYERS")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, imported grpokit module)`` for every import statement of ``path``, lazy ones included."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "grpokit"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "grpokit":
                continue
            if target == "grpokit":  # `from grpokit import x`: x may be a module (a stage) or a name (__version__)
                found += [(node.lineno, f"grpokit.{a.name}" if (PACKAGE / a.name).is_dir()
                           or (PACKAGE / f"{a.name}.py").is_file() else "grpokit") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def violations() -> list[str]:
    broken = []
    for path in sources():
        here = unit_of(module_name(path))
        for line, target in imports_of(path):
            there = unit_of(target)
            if there == here:
                continue
            if layer_of(there) > layer_of(here):
                broken.append(f"grpokit/{path.relative_to(PACKAGE)}:{line} imports {target}: {here} must not "
                              f"import the later stage {there}")
            elif layer_of(there) == layer_of(here) and layer_of(here) > 0:  # the shared modules may use each other
                broken.append(f"grpokit/{path.relative_to(PACKAGE)}:{line} imports {target}: {here} and {there} "
                              "share a layer and are independent of each other")
    return broken


def test_imports_run_one_way_along_the_layers():
    assert violations() == []


def test_the_contract_sees_a_broken_arrow(tmp_path, monkeypatch):
    """The checker itself can fail: a backwards import planted in a copy of a module is reported."""
    import tests.test_layering as layering

    fake = tmp_path / "grpokit"
    (fake / "data").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "data" / "bad.py").write_text("def f():\n    from grpokit.train.grpo import train\n")
    monkeypatch.setattr(layering, "PACKAGE", fake)
    assert layering.violations() == ["grpokit/data/bad.py:2 imports grpokit.train.grpo: grpokit.data must not "
                                     "import the later stage grpokit.train"]


def test_top_level_holds_only_stage_packages_and_small_shared_modules():
    files = {p.name for p in PACKAGE.glob("*.py")}
    assert files <= TOP_LEVEL_FILES, f"new top-level modules {sorted(files - TOP_LEVEL_FILES)}: put each in its stage"
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert {f"grpokit.{name}" for name in packages} <= {unit for layer in LAYERS for unit in layer}


def test_the_sampler_is_constructed_in_one_place():
    """Backends are built by rollout.build_sampler only; everyone else asks it for one."""
    from grpokit.rollout import BACKENDS

    names = {cls.__name__ for cls in BACKENDS.values()}
    calls = []
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                if name in names or (isinstance(node.func, ast.Subscript)
                                     and getattr(node.func.value, "id", None) == "BACKENDS"):
                    calls.append(f"grpokit/{path.relative_to(PACKAGE)}:{node.lineno}")
    assert len(calls) == 1 and calls[0].startswith("grpokit/rollout/__init__.py"), calls


@pytest.mark.parametrize("field, registry", [("loss_type", "LOSS_TYPES"), ("advantage", "ADVANTAGES"),
                                             ("kl_estimator", "KL_ESTIMATORS")])
def test_recipe_choices_equal_the_algorithm_registries(field, registry):
    """config.py spells the choices out (loading a recipe imports no torch); they must match algo's."""
    import grpokit.algo as algo
    from grpokit.config import AlgorithmConfig

    choices = set(get_args(AlgorithmConfig.model_fields[field].annotation))
    assert choices == set(getattr(algo, registry).names())


def test_recipe_backends_equal_the_rollout_backends():
    from grpokit.config import RolloutConfig
    from grpokit.rollout import BACKENDS

    assert set(get_args(RolloutConfig.model_fields["backend"].annotation)) == set(BACKENDS)


def test_every_declared_dependency_is_imported():
    """pyproject's dependencies are what grpokit imports: none declared and never used."""
    import re
    import tomllib

    module_of = {"PyYAML": "yaml", "math-verify": "math_verify", "pillow": "PIL"}
    used_through = {"gguf": "transformers reads the embedded GGUF model with it (models/gguf.py)"}
    declared = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    imported = set()
    for path in sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                imported.add(node.module.split(".")[0])
    names = [re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0] for spec in declared]
    unused = [name for name in names if module_of.get(name, name.replace("-", "_")) not in imported
              and name not in used_through]
    assert unused == []
