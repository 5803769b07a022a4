"""``grpokit eval``: evaluate a run, a checkpoint or a plain model on held-out rows.

What to evaluate and how are kept apart: the model argument picks the weights, the recipe
(the run's own ``recipe.yaml`` unless another is given) picks the data, the rewards and
the decoding lengths. So ``grpokit eval --model runs/demo`` re-evaluates a run on the rows
it was evaluated on during training, and ``--model smollm2-135m-instruct --recipe R`` gives
the untrained baseline on the same rows for ``grpokit compare``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpokit.errors import GrpokitError
from grpokit.eval.thumbnails import write_thumbnails
from grpokit.models.checkpoint import latest_checkpoint

_STEP_NAME = re.compile(r"step-\d+")


@dataclass
class Target:
    """The weights to evaluate and where their recipe and results live."""

    model: str  # a checkpoint directory, a model directory, a .gguf file or the embedded name
    checkpoint: Path | None  # set when the weights are a grpokit checkpoint
    run_dir: Path | None  # the run the checkpoint belongs to, if any


def resolve_target(model: str) -> Target:
    """A run dir (its latest checkpoint, as ``--resume`` picks it: ``latest_checkpoint``), a checkpoint
    dir, or anything ``model.path`` accepts."""
    path = Path(model).expanduser()
    if (path / "recipe.yaml").is_file() and (path / "checkpoints").is_dir():
        checkpoint = latest_checkpoint(path / "checkpoints")
        if checkpoint is None:
            raise GrpokitError(f"{path}: the run has no complete checkpoints/step-N directory yet; train it "
                               "first, or pass a checkpoint or model directory to --model")
        return Target(model, checkpoint, path)
    if (path / "trainer_state.json").is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return Target(model, path, run_dir if run_dir and (run_dir / "recipe.yaml").is_file() else None)
    return Target(model, None, None)


def default_name(recipe, target: Target, num_generations: int) -> str:
    """``<data>`` for a run's own checkpoint, ``<model>-<data>`` otherwise, ``-k<K>`` when sampling."""
    from grpokit.config import source_name

    sources = recipe.data.sources
    data = "-".join(spec.label for spec in sources) if sources else source_name(recipe.data.source)
    name = data if target.run_dir else f"{Path(target.model).name.removesuffix('.gguf')}-{data}"
    return f"{name}-k{num_generations}" if num_generations else name


def load_target_policy(target: Target, recipe):
    """The policy to decode with: a checkpoint, or a plain model, built as training builds it.

    A plain model is loaded with the recipe's model section (LoRA keeps the base in the
    compute dtype; fresh adapters change nothing), so its evaluation equals a run's step-0
    evaluation exactly: a baseline and a trained run then differ only by training.
    """
    from grpokit.models import load_checkpoint_policy, load_policy

    if target.checkpoint is not None:
        return load_checkpoint_policy(target.checkpoint, recipe.model, recipe.rollout.merge_lora)
    return load_policy(recipe.model.model_copy(update={"path": target.model}), beta=0.0,
                       merge_lora=recipe.rollout.merge_lora)


def load_eval_recipe(target: Target, recipe_path: str | None, overrides: list[str]):
    from grpokit.config import load_recipe

    if recipe_path is None and target.run_dir is None:
        raise GrpokitError(f"--model {target.model!r} is not a grpokit run: pass --recipe RECIPE.yaml to say "
                           "which data and rewards to evaluate with (e.g. recipes/demo.yaml)")
    return load_recipe(recipe_path or target.run_dir / "recipe.yaml", overrides)


def cli_overrides(data: str | None, num_generations: int | None, pass_k: list[int] | None,
                  temperature: float | None, seed: int | None) -> list[str]:
    """The eval command's flags as recipe overrides, so they are validated like any recipe key."""
    # --data replaces the recipe's data, a single source or a mix
    pairs = {"data.source": data, "data.sources": None if data is None else "null",
             "eval.num_generations": num_generations, "eval.temperature": temperature, "training.seed": seed,
             "eval.pass_k": None if pass_k is None else "[" + ",".join(map(str, pass_k)) + "]"}
    return [f"{key}={value}" for key, value in pairs.items() if value is not None]


def checkpoint_step(target: Target) -> int:
    """The training step of a ``step-N`` checkpoint (what rewards see as ``trainer_state.global_step``); 0 otherwise."""
    name = target.checkpoint.name if target.checkpoint is not None else ""
    return int(name.split("-", 1)[1]) if _STEP_NAME.fullmatch(name) else 0


def run_evaluation(model: str, *, recipe_path: str | None = None, overrides: list[str] | None = None,
                   name: str | None = None, limit: int | None = None, out: str | None = None,
                   overwrite: bool = False) -> tuple[Path, dict[str, Any]]:
    """Evaluate and write ``eval/<name>.json`` (in the run dir, or ./eval); return its path and the result."""
    from grpokit.data import load_splits
    from grpokit.eval.runner import EvalSettings, evaluate
    from grpokit.rewards import RewardSet
    from grpokit.io import write_json

    target = resolve_target(model)
    recipe = load_eval_recipe(target, recipe_path, list(overrides or []))
    name = name or default_name(recipe, target, recipe.eval.num_generations)
    if _STEP_NAME.fullmatch(name) or not re.fullmatch(r"[\w.-]+", name):
        raise GrpokitError(f"--name {name!r}: use letters, digits, '.', '-' or '_', and not step-N "
                           "(those names belong to the evaluations written during training)")
    destination = Path(out) if out else (target.run_dir or Path(".")) / "eval" / f"{name}.json"
    if destination.exists() and not overwrite:
        raise GrpokitError(f"{destination} already exists; pass --name NEW_NAME to keep it, or --overwrite")
    _, rows = load_splits(recipe.data)
    rows = rows[:limit] if limit else rows
    with RewardSet.from_recipe(recipe) as rewards:
        policy = load_target_policy(target, recipe)
        result = {"name": name, "model": str(target.checkpoint or model), "data": recipe.data.label,
                  **evaluate(policy, rows, rewards, EvalSettings.from_recipe(recipe), checkpoint_step(target))}
    write_json(destination, result)
    write_thumbnails(rows[:recipe.eval.num_samples], destination.parent / "images")
    return destination, result
