"""Everything besides weights that a resumed run needs to continue as if never stopped.

A run's future depends on: the optimiser moments and schedule position, where the data
pass stands (the shuffled order and the cursor), every random stream (the data shuffler,
the sampler's state, Python's, NumPy's and torch's global generators), the reward
orchestrator's running statistics, the replay buffer and the count of skipped updates.
The schedule's *position* is restored, its shape comes from the current recipe: a resume
with another ``training.max_steps`` decays over the new total (``schedule.py``).
``capture`` turns that into JSON (small, human-readable) plus torch state files (tensors,
loaded back with ``weights_only=True``); ``restore`` puts it back.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grpokit.models.checkpoint import load_torch_state
from grpokit.models.sharding import load_optimizer_state, optimizer_state
from grpokit.train.run import Run
from grpokit.train.schedule import restore_scheduler


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _set_numpy_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["name"], state["keys"].numpy().astype(np.uint32), state["pos"],
                         state["has_gauss"], state["cached"]))


def rng_state(run: Run) -> dict[str, Any]:
    state = {"python": random.getstate(), "data": run.rng.getstate(), "numpy": _numpy_state(),
             "torch": torch.get_rng_state(), "sampler": run.sampler.state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(run: Run, state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    run.rng.setstate(state["data"])
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    run.sampler.load_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(run: Run, optimizer, scheduler, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(json_state, torch_state)`` for a checkpoint after ``step``."""
    json_state = {
        "step": step,
        "max_steps": run.recipe.training.max_steps,  # the total the schedule decayed over so far
        "data": {"cursor": run.cursor, "order": run.order, "num_rows": len(run.train_rows)},
        "reward_orchestrator": run.orchestrator.state_dict(),
        "consecutive_skips": run.consecutive_skips,
        "skipped_updates": run.skipped_updates,
    }
    # FSDP: the full state, as an unsharded run has it, gathered on rank 0
    torch_state = {"optimizer": optimizer_state(run.policy.model, optimizer), "scheduler": scheduler.state_dict(),
                   "rng": rng_state(run)}
    if run.replay is not None:
        torch_state["replay"] = run.replay.state_dict()
    stateful = stateful_rewards(run)
    if stateful:
        torch_state["rewards"] = {name: fn.state_dict() for name, fn in stateful.items()}
    if run.world.distributed:  # every rank's own streams and learning rewards; rank 0's are the ones above
        own = {"rng": torch_state["rng"], "rewards": torch_state.get("rewards", {})}
        torch_state["ranks"] = run.world.gather(own, "gathering every rank's state for the checkpoint")
        json_state["processes"] = run.world.size
    return json_state, torch_state


def stateful_rewards(run: Run) -> dict[str, Any]:
    """Reward components that learn as the run goes (curiosity's dynamics model), by name."""
    return {c.name: c.fn for c in run.rewards.components if hasattr(c.fn, "state_dict")}


def restore(run: Run, optimizer, scheduler, directory: Path, json_state: dict[str, Any]) -> int:
    """Load the state a checkpoint recorded into a freshly set-up run; return its step."""
    from grpokit.errors import RunDirError

    data = json_state.get("data") if isinstance(json_state.get("data"), dict) else {}
    if data.get("num_rows", len(run.train_rows)) != len(run.train_rows):
        raise RunDirError(f"{directory}: the run trained on {data['num_rows']} rows but the data now gives "
                          f"{len(run.train_rows)}; resume with the same data, or start a new run")
    order, cursor = data.get("order"), data.get("cursor")
    permutation = isinstance(order, list) and sorted(o for o in order if type(o) is int) == list(range(len(run.train_rows)))
    valid = permutation and type(cursor) is int and 0 <= cursor <= len(order)
    if not valid:
        raise RunDirError(f"{directory}: trainer_state.json's data position is damaged (the order must be a "
                          f"permutation of the {len(run.train_rows)} training rows and the cursor within it); "
                          "resume from another checkpoint, or start a new run")
    run.cursor, run.order = cursor, list(order)
    run.orchestrator.load_state_dict(json_state["reward_orchestrator"])
    run.consecutive_skips = json_state.get("consecutive_skips", 0)
    run.skipped_updates = json_state.get("skipped_updates", 0)
    load_optimizer_state(run.policy.model, optimizer, load_torch_state(directory, "optimizer"))  # FSDP: each its shard
    restore_scheduler(scheduler, load_torch_state(directory, "scheduler"))  # after the optimiser: it sets the lr
    rng = load_torch_state(directory, "rng")
    saved = load_torch_state(directory, "rewards") if (directory / "rewards.pt").is_file() else {}
    rank_state = own_rank_state(run, directory, json_state)
    if rank_state is not None:
        rng, saved = rank_state["rng"], rank_state["rewards"]
    set_rng_state(run, rng)
    if run.replay is not None and (directory / "replay.pt").is_file():
        run.replay.load_state_dict(load_torch_state(directory, "replay"))
    for name, fn in stateful_rewards(run).items():
        if name in saved:
            fn.load_state_dict(saved[name])
    return json_state["step"]


def own_rank_state(run: Run, directory: Path, json_state: dict[str, Any]) -> dict[str, Any] | None:
    """This rank's random streams and learning rewards from a multi-process checkpoint (None: use the
    shared ones, rank 0's). With another number of processes than wrote it, what continues exactly and
    what does not is said once."""
    import logging

    written_by = json_state.get("processes", 1)
    world = run.world
    if written_by != world.size and world.is_main:
        logging.getLogger(__name__).warning(
            "%s was written by %d process(es) and this run has %d: the weights, optimiser, data position, reward "
            "statistics and replay buffer continue exactly, and so do the samples (each prompt samples from its "
            "own seeded stream once several processes run); each process's other random streams and learning "
            "rewards (curiosity) start from rank 0's", directory, written_by, world.size)
    if written_by == 1 or world.rank == 0 or not (directory / "ranks.pt").is_file():
        return None
    ranks = load_torch_state(directory, "ranks")
    return ranks[world.rank] if world.rank < len(ranks) else None
