"""The supervised loop shared by SFT (``grpokit sft``) and reward-model training (``grpokit reward-model``).

A stage supplies its examples, a ``loss_fn(micro_batch) -> (loss, metrics)`` that returns the
micro-batch's *mean* loss, and an ``eval_fn() -> metrics`` on its held-out rows; this module
owns everything else, once: seeded shuffling per epoch, gradient accumulation, AdamW with
warmup and decay (``schedule.py``, the same as GRPO's), gradient clipping, skipping updates
whose loss or gradient is not finite (``skips.py``, GRPO's rule and key), ``metrics.jsonl``
lines, early stopping on a loss threshold, and the run directory (``recipe.yaml``,
``run.json``, the saved weights).

Gradient accumulation is exact: each example carries a weight (its number of loss tokens
for SFT, 1 for a preference pair), and each micro-batch's mean loss is scaled by its share
of the batch's total weight, so the summed gradient equals that of the full batch's mean
(TRL's token-mean SFT loss, the pair-mean Bradley-Terry loss) whatever ``grad_accum`` is.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch

from grpokit import __version__
from grpokit.config import SupervisedTrainingConfig, dump_recipe
from grpokit.errors import DataError
from grpokit.log import JsonlSink
from grpokit.io import write_json, write_text
from grpokit.train.rundir import RunLock, check_run_dir, now_iso, prepare_run_dir
from grpokit.train.schedule import build_optimizer
from grpokit.train.skips import count_skips

log = logging.getLogger(__name__)

# the end of the message when training.max_consecutive_skips updates in a row were skipped (train/skips.py)
SKIP_REMEDY = ("the skipped updates never changed the weights, but the run saves only at its end, so nothing was "
               "saved. Check the data for extreme values, or lower training.learning_rate, and run it again")
EARLY_STOP_WINDOW = 10
"""Steps averaged for ``loss_threshold`` when ``eval_every`` is 0."""

LossFn = Callable[[list], tuple[torch.Tensor, dict[str, float]]]
ProgressFn = Callable[[int, int, dict[str, Any]], None]


@dataclass
class SupervisedJob:
    """What one stage hands the shared loop; built by the stage after data and model are loaded."""

    model: torch.nn.Module  # switched between train() and eval()
    params: list[torch.nn.Parameter]  # what AdamW updates
    train_examples: list
    loss_fn: LossFn
    eval_fn: Callable[[], dict[str, float]]
    save: Callable[[Path], Path]  # writes the trained weights into the run dir, returns where
    weight: Callable[[Any], float] = lambda example: 1.0  # the example's share of the batch loss
    rate: tuple[str, Callable[[Any], float]] = ("examples_per_s", lambda example: 1.0)
    info: dict[str, Any] = field(default_factory=dict)  # extra run.json fields (row counts, parameters)


def hold_out(rows: list, eval_size: int, seed: int, source: str) -> tuple[list, list]:
    """Split off ``eval_size`` rows (seeded, the file's order otherwise kept): ``(train, held_out)``."""
    if eval_size >= len(rows):
        raise DataError(f"{source}: data.eval_size = {eval_size} leaves no training rows out of {len(rows)}; "
                        "lower data.eval_size")
    picked = set(random.Random(seed).sample(range(len(rows)), eval_size))
    return ([r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked])


def total_steps(num_examples: int, training: SupervisedTrainingConfig) -> int:
    """Optimiser steps of the run: every epoch's batches (the last may be short), capped by max_steps."""
    steps = math.ceil(num_examples / training.batch_size) * training.epochs
    return min(steps, training.max_steps) if training.max_steps else steps


def batches(examples: list, batch_size: int, epochs: int, seed: int) -> Iterator[list]:
    """Batches of a fresh seeded shuffle each epoch."""
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [examples[i] for i in order[start:start + batch_size]]


def train_step(params: list[torch.nn.Parameter], optimizer, scheduler, batch: list, loss_fn: LossFn,
               weight: Callable[[Any], float], grad_accum: int, max_grad_norm: float) -> dict[str, float]:
    """One optimiser step over ``batch`` in ``grad_accum`` micro-batches; metrics are batch means.

    The update is skipped (``skipped_update`` = 1) when the loss or the gradient norm is not
    finite: one NaN step would poison the weights and AdamW's moments for good.
    """
    total_weight = sum(weight(e) for e in batch)
    size = math.ceil(len(batch) / grad_accum)
    totals: dict[str, float] = {"loss": 0.0}
    for start in range(0, len(batch), size):
        micro = batch[start:start + size]
        share = sum(weight(e) for e in micro) / total_weight if total_weight else len(micro) / len(batch)
        loss, metrics = loss_fn(micro)
        (loss * share).backward()  # share-weighted micro-batch means sum to the batch mean
        for key, value in {"loss": loss.item(), **metrics}.items():
            totals[key] = totals.get(key, 0.0) + share * value
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    totals.update(lr=scheduler.get_last_lr()[0], grad_norm=grad_norm.item(), skipped_update=0.0)
    if math.isfinite(totals["loss"]) and torch.isfinite(grad_norm):
        optimizer.step()
        scheduler.step()
    else:
        totals["skipped_update"] = 1.0
    optimizer.zero_grad(set_to_none=True)
    return totals


def _evaluate(job: SupervisedJob, step: int, sink: JsonlSink) -> dict[str, float]:
    job.model.eval()
    with torch.no_grad():
        metrics = job.eval_fn()
    if metrics:
        sink.log({"step": step, "kind": "eval", **metrics})
        log.info("eval at step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def below_threshold(window: deque, threshold: float | None) -> str | None:
    """Why to stop early (the window's mean loss is below ``threshold``), or None to go on."""
    if threshold is None or len(window) < window.maxlen:
        return None
    mean_loss = sum(window) / len(window)
    if not mean_loss < threshold:  # a NaN mean (a skipped step in the window) never stops the run
        return None
    return (f"mean training loss {mean_loss:.4g} of the last {len(window)} steps is below "
            f"training.loss_threshold = {threshold}")


def fit(job: SupervisedJob, training: SupervisedTrainingConfig, sink: JsonlSink,
        progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train ``job`` for its epochs (or max_steps); log every step and eval; return run.json's summary.

    Evaluates before the first step, every ``eval_every`` steps and after the last. Stops
    early once the mean training loss of the last ``eval_every`` steps (10 when eval_every
    is 0) is below ``loss_threshold``.
    """
    total = total_steps(len(job.train_examples), training)
    schedule = SimpleNamespace(learning_rate=training.learning_rate, weight_decay=training.weight_decay,
                               warmup_steps=training.warmup_steps, max_steps=total, lr_schedule=training.lr_schedule)
    optimizer, scheduler = build_optimizer(job.params, schedule)
    rate_name, rate_count = job.rate
    window = deque(maxlen=training.eval_every or EARLY_STOP_WINDOW)
    summary: dict[str, Any] = {"total_steps": total, "steps": 0, "skipped_updates": 0, "stopped_early": False,
                               "eval_before": _evaluate(job, 0, sink)}
    consecutive_skips, step, evaluated = 0, 0, (0, summary["eval_before"])
    for step, batch in zip(range(1, total + 1), batches(job.train_examples, training.batch_size, training.epochs,
                                                        training.seed)):
        t0 = time.perf_counter()
        job.model.train()
        metrics = train_step(job.params, optimizer, scheduler, batch, job.loss_fn, job.weight, training.grad_accum,
                             training.max_grad_norm)
        seconds = time.perf_counter() - t0
        metrics.update(step_time_s=seconds, **{rate_name: sum(rate_count(e) for e in batch) / seconds})
        sink.log({"step": step, "kind": "train", **metrics})
        summary["steps"] = step
        if progress:
            progress(step, total, metrics)
        summary["skipped_updates"] += int(metrics["skipped_update"])
        consecutive_skips = count_skips(bool(metrics["skipped_update"]), consecutive_skips, step,
                                        training.max_consecutive_skips, SKIP_REMEDY)
        window.append(metrics["loss"])
        if training.eval_every and step % training.eval_every == 0 and step < total:
            evaluated = (step, _evaluate(job, step, sink))
        reason = below_threshold(window, training.loss_threshold)
        if reason:
            summary.update(stopped_early=True, stop_reason=reason)
            log.info("stopping early at step %d: %s", step, reason)
            break
    summary["eval_after"] = evaluated[1] if evaluated[0] == step else _evaluate(job, step, sink)
    if window:
        summary["train_loss_last"] = sum(window) / len(window)
    return summary


def run_stage(recipe, kind: str, setup: Callable[[], SupervisedJob], overwrite: bool = False,
              progress: ProgressFn | None = None) -> Path:
    """``_run_stage`` holding the run directory's lock: two processes never write one run directory."""
    with RunLock(recipe.training.output_dir):
        return _run_stage(recipe, kind, setup, overwrite, progress)


def _run_stage(recipe, kind: str, setup: Callable[[], SupervisedJob], overwrite: bool = False,
               progress: ProgressFn | None = None) -> Path:
    """Check the run dir, build the job (data and model), train, save; return the run directory.

    The run directory is touched only after ``setup`` succeeded, so bad data or a missing
    model never leaves a half-written run behind (or deletes the old one under --overwrite).
    run.json: status running -> finished (or failed, with the error), steps, wall_s, the
    eval before and after, early stopping, skipped updates, and where the weights went.
    """
    t0 = time.perf_counter()
    training = recipe.training
    check_run_dir(training.output_dir, overwrite)
    if training.num_threads:
        torch.set_num_threads(training.num_threads)
    torch.manual_seed(training.seed)
    job = setup()
    run_dir = prepare_run_dir(training.output_dir, overwrite)
    write_text(run_dir / "recipe.yaml", dump_recipe(recipe))
    info = {"status": "running", "kind": kind, "started": now_iso(), "steps": 0, "model": recipe.model.path,
            "train_rows": len(job.train_examples), "trainable_parameters": sum(p.numel() for p in job.params),
            **job.info, "grpokit_version": __version__}
    write_json(run_dir / "run.json", info)
    sink = JsonlSink(run_dir / "metrics.jsonl")
    try:
        summary = fit(job, training, sink, progress)
        saved = job.save(run_dir)
    except BaseException as exc:
        info.update(status="failed", error=f"{type(exc).__name__}: {exc}", failed=now_iso(),
                    wall_s=time.perf_counter() - t0)
        write_json(run_dir / "run.json", info)
        raise
    finally:
        sink.close()
    info.update(summary, status="finished", finished=now_iso(), saved=str(saved), wall_s=time.perf_counter() - t0)
    write_json(run_dir / "run.json", info)
    return run_dir
