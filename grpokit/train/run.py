"""A GRPO run's shared state (``Run``) and how it is built from a recipe (``setup``).

Everything the loop's stages read or advance lives here: the policy, the reward set, the
prompt encoder and the sampler, the data pass (shuffled order and cursor, reshuffled each
epoch), the reward orchestrator, the replay buffer and the skip counters. ``train/grpo.py``
runs the stages in order; ``train/batch.py``, ``train/update.py`` and ``train/state.py``
take a ``Run``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

import torch

from grpokit.algo.replay import ReplayBuffer
from grpokit.config import Recipe
from grpokit.data import load_splits
from grpokit.data.images import message_text
from grpokit.errors import DataError, RecipeError
from grpokit.log import check_trackers
from grpokit.models import Policy, load_policy
from grpokit.models.loading import pick_device
from grpokit.models.sharding import launcher_asks_fsdp, loading_config, shard_policy
from grpokit.rewards import RewardOrchestrator, RewardSet, build_orchestrator
from grpokit.envs import EnvironmentSpec, build_environment
from grpokit.rollout import PromptEncoder, Sampler, build_sampler, turn_options
from grpokit.distributed import World

log = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything the loop's named steps share; built once by ``setup``."""

    recipe: Recipe
    policy: Policy
    rewards: RewardSet
    encoder: PromptEncoder  # rows -> PromptBatch, for training prompts
    sampler: Sampler
    train_rows: list[dict]
    eval_rows: list[dict]
    rng: random.Random
    order: list[int]
    orchestrator: RewardOrchestrator
    environment: EnvironmentSpec | None = None  # multi-turn rollouts' environment (training and its evals)
    replay: ReplayBuffer | None = None
    cursor: int = 0
    consecutive_skips: int = 0
    skipped_updates: int = 0
    world: World = field(default_factory=World)  # this process among the run's (one, without a launcher)


def setup(recipe: Recipe, world: World | None = None) -> Run:
    """Seed, load data, model and rewards: everything before the first step. Every rank of a
    multi-process run sets up the same (same data order, same weights); ``world`` says which it is."""
    world = world or World()
    if world.distributed:
        recipe = for_processes(recipe, world)
    training = recipe.training
    if training.num_threads:
        torch.set_num_threads(training.num_threads)
    torch.manual_seed(training.seed)
    train_rows, eval_rows = load_splits(recipe.data)
    rewards = RewardSet.from_recipe(recipe)  # before the model: a bad reward fails in a second
    check_trackers(recipe.logging)
    rollout = recipe.rollout
    environment = build_environment(rollout)  # before the model: a bad environment or tool fails in a second
    sharded = training.fsdp and world.distributed  # FSDP2: each rank keeps a shard (models/sharding.py)
    device = pick_device(recipe.model.device)
    policy = load_policy(loading_config(recipe.model, device) if sharded else recipe.model, recipe.algorithm.beta,
                         recipe.rollout.merge_lora, training.gradient_checkpointing)
    if sharded:
        policy = shard_policy(policy, world.size, device)
    encoder = PromptEncoder(policy.processor, recipe.data.chat_template, recipe.data.system_prompt,
                            rollout.max_prompt_length, tools=environment.schemas if environment else None)
    check_prompt_lengths(encoder, train_rows + eval_rows, recipe)
    sampler = build_sampler(policy, rollout.backend, max_new_tokens=rollout.max_completion_length,
                            temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
                            seed=training.seed, environment=environment, **turn_options(rollout))
    rng = random.Random(training.seed)
    order = list(range(len(train_rows)))
    rng.shuffle(order)
    replay = ReplayBuffer(recipe.algorithm.replay.capacity) if recipe.algorithm.replay.capacity else None
    orchestrator = build_orchestrator(rewards, recipe.reward_shaping)
    return Run(recipe, policy, rewards, encoder, sampler, train_rows, eval_rows, rng, order, orchestrator,
               environment, replay, world=world)


def for_processes(recipe: Recipe, world: World) -> Recipe:
    """The recipe as ``world.size`` processes run it: prompts_per_step stays the global batch, split in
    whole groups, and each prompt samples from its own seeded stream (so the samples do not depend on
    the split)."""
    P = recipe.training.prompts_per_step
    if P < world.size:
        raise RecipeError(f"training.prompts_per_step = {P} is the global batch, split in whole groups over "
                          f"{world.size} processes: give every process at least one prompt (prompts_per_step >= "
                          f"{world.size}) or launch fewer processes")
    if not recipe.rollout.seed_per_prompt:
        log.info("rollout.seed_per_prompt: on, as in every multi-process run (each prompt samples from its own "
                 "seeded stream, whatever the split)")
    training = recipe.training
    if launcher_asks_fsdp() and not training.fsdp:
        log.info("training.fsdp: on, as accelerate launch was asked for FSDP (grpokit shards with FSDP2, one unit "
                 "per transformer block; accelerate's other fsdp_* settings are not read)")
        training = training.model_copy(update={"fsdp": True})
    return recipe.model_copy(update={"rollout": recipe.rollout.model_copy(update={"seed_per_prompt": True}),
                                     "training": training})


def check_prompt_lengths(encoder: PromptEncoder, rows: list[dict], recipe: Recipe) -> None:
    """Count prompts over rollout.max_prompt_length once, up front: log them, or refuse the data."""
    data, limit = recipe.data, recipe.rollout.max_prompt_length
    ids = [encoder.token_ids(row) for row in rows]
    over = [i for i, seq in enumerate(ids) if len(seq) > limit]
    if not over:
        return
    first = rows[over[0]]["prompt"]
    text = first if isinstance(first, str) else message_text(first[-1].get("content"))
    what = (f"{len(over)} of {len(rows)} prompts of {data.label} are longer than rollout.max_prompt_length = {limit} "
            f"tokens (the first: {len(ids[over[0]])} tokens, {text[:60]!r})")
    if recipe.rollout.prompt_overflow == "error":
        raise DataError(f"{what}; raise rollout.max_prompt_length or set rollout.prompt_overflow: truncate")
    log.warning("%s; they are cut from the left, keeping the end of each prompt", what)


def next_prompts(run: Run, count: int) -> list[dict]:
    """The next P rows of a shuffled pass over the training set (reshuffled each epoch)."""
    rows = []
    while len(rows) < count:
        if run.cursor == len(run.order):
            run.rng.shuffle(run.order)
            run.cursor = 0
        rows.append(run.train_rows[run.order[run.cursor]])
        run.cursor += 1
    return rows
