"""AdamW with linear warmup then cosine/linear decay to 10% of the peak learning rate.

The learning rate is a pure function of the optimiser update ``u`` (0-based; a skipped update
does not advance it): ``peak * lr_factor(u, warmup, total, schedule)``. A resumed run rebuilds
the schedule from its current recipe and restores only the position ``u`` (``restore_scheduler``),
so when ``training.max_steps`` changed on ``--resume`` the remaining updates follow the new
total, as HF Trainer's do: every update from the checkpoint on gets the learning rate an
uninterrupted run with the new ``max_steps`` would give it (docs/run-directory.md, "Resuming").
"""

from __future__ import annotations

import math

import torch

FINAL_LR_FRACTION = 0.1


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak LR for optimiser step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * decay


def build_optimizer(params, training, updates_per_step: int = 1) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule; with num_iterations > 1 each training step makes several updates."""
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=training.weight_decay)
    warmup, total = training.warmup_steps * updates_per_step, training.max_steps * updates_per_step
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda update: lr_factor(update, warmup, total, training.lr_schedule)
    )
    return optimizer, scheduler


def restore_scheduler(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Put a checkpoint's schedule position into ``scheduler`` (built for the current recipe), after
    its optimiser's state was loaded, and set the learning rate *this* schedule gives there.

    The optimiser's state holds the learning rate the checkpointed run would have used next; with
    the same ``max_steps`` it equals the recomputed one bit for bit (the same function of the same
    position), with another one it would give the first resumed update the old schedule's rate and
    only the next ones the new schedule's.
    """
    scheduler.load_state_dict(state)  # last_epoch (the position) and base_lrs; the lambdas stay ours
    rates = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = rate
    scheduler._last_lr = rates  # what get_last_lr() reports (the logged lr), as LRScheduler.step sets it
