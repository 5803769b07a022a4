"""The GRPO loop (DeepSeekMath, arXiv:2402.03300), read top to bottom.

Each step: take P prompts, sample G completions each, score them with the recipe's
rewards, turn rewards into group-relative advantages (``train/batch.py``), and take
AdamW steps on the clipped-ratio loss plus beta * KL(policy || reference)
(``train/update.py``). By default, as TRL's: one optimiser pass per generation batch
(so the PPO ratio is exactly 1 and old log-probs are the detached current ones, no
extra forward pass), and the loss averages tokens within a sequence, then sequences.
The DAPO, Dr. GRPO and GSPO variants are recipe switches (docs/algorithms.md).

This module is the only place that knows the order of the stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from statistics import median
from typing import Any, Callable

import torch

from grpokit import __version__
from grpokit.config import Recipe, dump_recipe
from grpokit.envs.trajectory import episode_metrics
from grpokit.eval import EvalSettings, evaluate, metrics_line
from grpokit.eval.thumbnails import write_thumbnails
from grpokit.io import write_json, write_text
from grpokit.log import RunLogger
from grpokit.models import save_checkpoint
from grpokit.models.checkpoint import STATE_FILE, load_trained_weights, publish_checkpoint
from grpokit.models.sharding import full_model_state
from grpokit.rollout import Rollouts
from grpokit.train.batch import Batch, collect_batch, sample_round
from grpokit.distributed import SilentLogger, World
from grpokit.train.run import Run, setup
from grpokit.train.rundir import RunLock, check_run_dir, check_writable, find_resume_checkpoint, now_iso, prepare_run_dir
from grpokit.train.schedule import build_optimizer
from grpokit.train.signals import GracefulStop
from grpokit.train.skips import count_skips
from grpokit.train.state import capture, restore
from grpokit.train.update import policy_update

log = logging.getLogger(__name__)
ProgressFn = Callable[[int, dict[str, Any]], None]
# sees the live run (its policy) before the first step and after each step, on the main process; a bench evaluates
# the model there on its own clock (bench/time_to_accuracy.py) and may end the run with SIGTERM, as a scheduler would
StepHook = Callable[[Run, int], None]
# the end of the message when training.max_consecutive_skips updates in a row were skipped (train/skips.py)
SKIP_REMEDY = ("the skipped updates never changed the weights, and the last checkpoint is intact. Check the rewards "
               "for extreme values and continue with --resume (training.max_consecutive_skips may be raised on "
               "resume), or start a new run with a lower training.learning_rate")


def reward_metrics(rounds: list) -> dict[str, float]:
    """Mean and std of the total and of each raw component over every completion sampled this
    step, the orchestrator's metrics of the first round, and each component's latency."""
    total_N = torch.cat([r.rewards_N for r in rounds])
    parts = {name: [v for r in rounds for v in r.parts[name]] for name in rounds[0].parts}
    # only components that were called have a latency (the overlong penalty is the trainer's own arithmetic)
    latency = {f"reward_time_s/{name}": sum(r.latency_s.get(name, 0.0) for r in rounds)
               for name in parts if name in rounds[0].latency_s}
    metrics = {"reward": total_N.mean().item(), "reward_std": total_N.std().item() if total_N.numel() > 1 else 0.0}
    for name, values in parts.items():
        applicable = torch.tensor([v for v in values if v is not None])
        if applicable.numel():
            metrics[f"rewards/{name}"] = applicable.mean().item()
            metrics[f"rewards/{name}_std"] = applicable.std().item() if applicable.numel() > 1 else 0.0
    return {**metrics, **rounds[0].shaping_metrics, **latency}


def run_eval(run: Run, step: int, run_dir: Path, logger: RunLogger) -> dict[str, Any]:
    """Evaluate on the fixed held-out rows (every rank its share); write eval/step-N.json and an eval line."""
    run.world.mark("evaluating")
    result = evaluate(run.policy, run.eval_rows, run.rewards, EvalSettings.from_recipe(run.recipe, run.environment),
                      step, world=run.world)
    result["step"] = step
    if run.world.is_main:
        log.info("eval at step %d: accuracy %.1f%% (%d held-out rows), mean reward %.3f",
                 step, 100 * result["accuracy"], result["num_examples"], result["reward"])
        write_json(run_dir / "eval" / f"step-{step}.json", result)
        write_thumbnails(run.eval_rows[:run.recipe.eval.num_samples], run_dir / "eval" / "images")
    logger.metrics({"step": step, "kind": "eval", **metrics_line(result)})
    return result


def write_samples(run: Run, step: int, batch: Batch, logger: RunLogger) -> None:
    """A few completions of the step's first round, spread over its groups, with their rewards."""
    rnd, G, k = batch.fresh[0], run.recipe.rollout.num_generations, run.recipe.logging.num_samples
    picks = list(range(0, len(rnd.texts), max(1, len(rnd.texts) // k)))[:k]
    extra = {column: values for column, values in rnd.logged_extra.items() if len(values) == len(rnd.texts)}
    logger.samples(step, [{"prompt": rnd.rows[i // G]["prompt"], "completion": rnd.texts[i],
                           "answer": rnd.rows[i // G].get("answer"), "reward": rnd.own_rewards_N[i].item(),
                           "rewards": {name: values[rnd.first + i] for name, values in rnd.parts.items()},
                           **({"extra": {c: v[i] for c, v in extra.items()}} if extra else {})} for i in picks])


def train(recipe: Recipe, overwrite: bool = False, resume: bool = False, progress: ProgressFn | None = None,
          on_step: StepHook | None = None) -> Path:
    """Run the recipe end to end (or on from its latest checkpoint); return the run directory.

    One process per run directory: an exclusive lock on it is taken before anything is read
    or loaded and held to the end, so a second ``train`` refuses at once (``RunLock``). Data,
    rewards and model load before the run directory is written, so bad input never leaves a
    half-written run behind (or deletes the old one under --overwrite). From the step-0
    evaluation to the final checkpoint, SIGINT/SIGTERM end the run cleanly: after the current
    evaluation or step, with a checkpoint (run.json status "stopped"); ``resume=True``
    continues it exactly. A signal during the final evaluation or checkpoint lets both finish.
    ``on_step(run, step)``: see ``StepHook``.
    """
    t_start = time.perf_counter()
    output_dir = recipe.training.output_dir
    world = World.from_environment(recipe.training.distributed_timeout_s)
    # rank 0 alone holds the run directory: it takes the lock and decides; the other ranks only read
    try:
        with RunLock(output_dir) if world.is_main else contextlib.nullcontext():
            resume_from = world.on_main("choosing the checkpoint to resume",
                                        lambda: choose_start(recipe, resume, overwrite))
            run = setup(recipe, world)
            try:
                with GracefulStop() as stop:
                    run_dir = run_to_end(run, resume_from, overwrite, stop, progress, t_start, on_step)
                world.barrier("finishing the run")  # every rank done before any leaves the process group
                return run_dir
            finally:
                run.rewards.close()
    finally:
        world.close()


def choose_start(recipe: Recipe, resume: bool, overwrite: bool) -> Path | None:
    """The checkpoint to continue from, or None for a new run (after checking the directory may be used)."""
    output_dir = recipe.training.output_dir
    resume_from = find_resume_checkpoint(output_dir, recipe) if resume else None
    if resume_from is None:
        check_run_dir(output_dir, overwrite)
    return resume_from


def open_run(run: Run, optimizer, scheduler, resume_from: Path | None, overwrite: bool) -> tuple[Path, int, dict]:
    """The run directory, the step to go on from and run.json: a checkpoint loaded, or a fresh directory."""
    recipe, world = run.recipe, run.world
    if resume_from is not None:  # every rank loads the checkpoint: weights, optimiser, its own random streams
        run_dir = resume_from.parent.parent
        start, run_info = resume_run(run, optimizer, scheduler, resume_from)
    else:
        run_dir = world.on_main("preparing the run directory",
                                lambda: prepare_run_dir(recipe.training.output_dir, overwrite))
        run_info = {"status": "running", "started": now_iso(), "steps": 0, "model": recipe.model.path,
                    "grpokit_version": __version__}
        if world.distributed:
            run_info["processes"] = world.size
        start = 0
    if world.is_main:  # the resolved recipe; on resume with what a resume may change (more steps, the run's new place)
        write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
        write_json(run_dir / "run.json", run_info)
    return run_dir, start, run_info


def run_to_end(run: Run, resume_from: Path | None, overwrite: bool, stop: GracefulStop, progress: ProgressFn | None,
               t_start: float, on_step: StepHook | None = None) -> Path:
    """Evaluate, train step by step, evaluate, checkpoint; stop cleanly after the eval or step a signal lands in."""
    recipe, training = run.recipe, run.recipe.training
    optimizer, scheduler = build_optimizer(run.policy.trainable_parameters(), training, recipe.algorithm.num_iterations)
    run_dir, start, run_info = open_run(run, optimizer, scheduler, resume_from, overwrite)
    prior_wall, logger = run_info.get("wall_s", 0.0), None

    world = run.world

    def checkpoint(step: int) -> None:
        save_run_checkpoint(run, optimizer, scheduler, run_dir, step, prior_wall + time.perf_counter() - t_start)
        run_info.update(steps=step)
        if world.is_main:
            write_json(run_dir / "run.json", run_info)

    def stopping() -> str | None:
        """The signal that asks the run to stop, agreed by every rank (a signal may reach only one)."""
        if world.agree(stop.requested is not None, "the stop check"):
            return stop.requested or "a signal to another process"
        return None

    try:
        logger = RunLogger(run_dir, recipe.logging, recipe.model_dump(mode="json")) if world.is_main else SilentLogger()
        # a run stopped at step 0 may have evaluated already: its checkpoint holds the state after that
        evaluated = world.on_main("reading the run directory", lambda: (run_dir / "eval" / "step-0.json").is_file())
        if start == 0 and not stopping() and not evaluated:
            run_eval(run, 0, run_dir, logger)
        step = start
        if on_step is not None and world.is_main:
            on_step(run, step)
        while step < training.max_steps and not stopping():
            step += 1
            world.step = step
            run_step(run, optimizer, scheduler, step, logger, progress)
            if on_step is not None and world.is_main:
                on_step(run, step)
            if step < training.max_steps:  # the last step's eval and checkpoint are the final ones, below
                if training.eval_every and step % training.eval_every == 0:
                    run_eval(run, step, run_dir, logger)
                if training.save_every and step % training.save_every == 0 and not stopping():
                    checkpoint(step)
        signal = stopping()
        if signal and step < training.max_steps:
            checkpoint(step)
            logger.close()
            run_info.update(status="stopped", stopped=now_iso(), stop_signal=signal)
            if world.is_main:
                write_json(run_dir / "run.json", run_info)
                log.warning("stopped by %s after step %d with a checkpoint; continue with the same command (the "
                            "same recipe and --set overrides) plus --resume", signal, step)
            return run_dir
        final = training.max_steps
        if final > start or final == 0:
            run_eval(run, final, run_dir, logger)
        checkpoint(final)
    except BaseException as exc:
        if world.is_main:
            record_failure(run_dir, run_info, logger, exc)
        raise
    if stop.requested and world.is_main:
        log.warning("%s arrived during the last step, evaluation or checkpoint: they completed, the run is finished",
                    stop.requested)
    logger.close()
    run_info.update(status="finished", finished=now_iso(), steps=final, wall_s=prior_wall + time.perf_counter() - t_start)
    if world.is_main:
        write_json(run_dir / "run.json", run_info)
    return run_dir


def run_step(run: Run, optimizer, scheduler, step: int, logger: RunLogger, progress: ProgressFn | None) -> None:
    """One GRPO step: sample and score a batch, take the update, log its metrics (and samples)."""
    recipe = run.recipe
    t0 = time.perf_counter()
    batch = collect_batch(run, step)
    t_generate = time.perf_counter() - t0
    metrics = policy_update(run, optimizer, scheduler, batch.rollouts, batch.advantages_N)
    skipped = bool(metrics.get("skipped_update"))
    run.skipped_updates += int(skipped)
    run.consecutive_skips = count_skips(skipped, run.consecutive_skips, step, recipe.training.max_consecutive_skips,
                                        SKIP_REMEDY)
    step_time = time.perf_counter() - t0
    rewards = reward_metrics(batch.fresh)
    rollout = mean_over_ranks(run, rollout_metrics(batch.rollouts, recipe, step_time), batch.rollouts.truncated_N.numel())
    if not run.world.is_main:
        return
    logger.metrics({"step": step, "kind": "train", **rewards, **batch.metrics, **metrics, **rollout,
                    "generate_time_s": t_generate})
    if progress:
        progress(step, {"reward": rewards["reward"], "kl": metrics["kl"], "step_time_s": step_time})
    if recipe.logging.samples_every and step % recipe.logging.samples_every == 0:
        write_samples(run, step, batch, logger)


def mean_over_ranks(run: Run, metrics: dict[str, float], sequences: int) -> dict[str, float]:
    """Per-rank rollout figures as the whole batch's: means weighted by each rank's sequences, except
    throughput, which adds up (and the step's time, the slowest rank's)."""
    if not run.world.distributed:
        return metrics
    pieces = run.world.gather((metrics, sequences), "gathering the rollout metrics")
    total = sum(n for _, n in pieces) or 1
    keys = set().union(*(m for m, _ in pieces))
    out = {key: sum(m.get(key, 0.0) * n for m, n in pieces) / total for key in keys}
    out["tokens_per_s"] = sum(m["tokens_per_s"] for m, _ in pieces)
    out["step_time_s"] = max(m["step_time_s"] for m, _ in pieces)
    return out


def record_failure(run_dir: Path, run_info: dict[str, Any], logger: RunLogger | None, exc: BaseException) -> None:
    """Mark run.json "failed" with the error, as far as the disk allows: a full disk must still end in
    the error that says so, not in a second one raised while recording it."""
    try:
        if logger is not None:
            logger.close(failed=True)
    except Exception as close_error:  # a tracker or a full disk: the run's own error is the one to report
        log.warning("closing the run's logs failed too: %s: %s", type(close_error).__name__, close_error)
    run_info.update(status="failed", error=f"{type(exc).__name__}: {exc}", failed=now_iso())
    try:
        write_json(run_dir / "run.json", run_info)
    except OSError as write_error:
        log.warning("could not record the failure in %s: %s", run_dir / "run.json", write_error)


def save_run_checkpoint(run: Run, optimizer, scheduler, run_dir: Path, step: int, wall_s: float) -> Path:
    """Weights plus the whole training state, written atomically, then published as ``latest``."""
    json_state, torch_state = capture(run, optimizer, scheduler, step)  # every rank: each gives its random streams
    weights = full_model_state(run.policy.model)  # FSDP: every rank gives its shards, rank 0 gets them whole
    json_state["wall_s"] = wall_s
    directory = run_dir / "checkpoints" / f"step-{step}"
    if run.world.is_main:
        directory = save_checkpoint(run.policy, directory, json_state, torch_state, weights)
        publish_checkpoint(directory, run.recipe.training.keep_checkpoints)
    run.world.barrier("writing the checkpoint")  # no rank runs ahead of a checkpoint it may have to resume from
    return directory


def resume_run(run: Run, optimizer, scheduler, checkpoint: Path) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint's weights and state into a set-up run; return its step and run.json."""
    run_dir = checkpoint.parent.parent
    json_state = json.loads((checkpoint / STATE_FILE).read_text())
    load_trained_weights(run.policy, checkpoint)
    step = restore(run, optimizer, scheduler, checkpoint, json_state)
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    run_info.update(status="running", steps=step, wall_s=json_state.get("wall_s", 0.0))
    resumed = {"from_step": step, "at": now_iso()}
    training, before = run.recipe.training, json_state.get("max_steps")
    if type(before) is int and before != training.max_steps:
        resumed["max_steps"] = [before, training.max_steps]
        if training.lr_schedule != "constant":
            log.warning("training.max_steps changed from %d to %d: the %s learning-rate schedule now decays over "
                        "%d steps, so from step %d on each step gets the rate an uninterrupted %d-step run gives it",
                        before, training.max_steps, training.lr_schedule, training.max_steps, step + 1,
                        training.max_steps)
    run_info.setdefault("resumed", []).append(resumed)
    for key in ("error", "failed", "stopped", "stop_signal", "finished"):
        run_info.pop(key, None)
    log.info("resuming %s from %s (step %d of %d)", run_dir, checkpoint.name, step, run.recipe.training.max_steps)
    return step, run_info


def rollout_metrics(rollouts: Rollouts, recipe: Recipe, step_time: float) -> dict[str, float]:
    """Lengths and throughput: tokens x model passes (generate, reference if beta > 0, old
    log-probs if mu > 1, mu updates)."""
    lengths_N = rollouts.completion_lengths_N.float()
    tokens = rollouts.prompt_mask_NP.sum().item() + lengths_N.sum().item()
    mu = recipe.algorithm.num_iterations
    passes = 1 + (recipe.algorithm.beta > 0) + (mu > 1) + mu
    return {"completion_length": lengths_N.mean().item(), "truncated_frac": rollouts.truncated_N.float().mean().item(),
            "step_time_s": step_time, "tokens_per_s": tokens * passes / step_time,
            **episode_metrics(rollouts.trajectories_N)}


def dry_run(recipe: Recipe, num_prompts: int = 2) -> dict[str, Any]:
    """Validate everything a run needs and sample once, without writing a run directory (whether
    training.output_dir could be written is asked of the kernel first, leaving nothing there)."""
    t0 = time.perf_counter()
    check_writable(recipe.training.output_dir)
    run = setup(recipe)
    try:
        rnd = sample_round(run, run.train_rows[:num_prompts], step=0)
    finally:
        run.rewards.close()
    rows, rollouts, texts, total_N = rnd.rows, rnd.rollouts, rnd.texts, rnd.rewards_N
    params = sum(p.numel() for p in run.policy.model.parameters())
    trainable = sum(p.numel() for p in run.policy.trainable_parameters())
    return {
        "train_rows": len(run.train_rows), "eval_rows": len(run.eval_rows),
        "model": recipe.model.path, "parameters": params, "trainable_parameters": trainable,
        "device": str(run.policy.device), "compute_dtype": str(run.policy.compute_dtype).replace("torch.", ""),
        "reference": "none (beta = 0)" if recipe.algorithm.beta == 0 else ("adapters off" if run.policy.is_lora else "frozen copy"),
        "rewards": run.rewards.names, "seconds": time.perf_counter() - t0,
        "samples": [{"prompt": rows[i // recipe.rollout.num_generations]["prompt"], "completion": texts[i],
                     "reward": total_N[i].item()} for i in range(len(texts))],
        "median_completion_tokens": median(rollouts.completion_lengths_N.tolist()),
    }
