"""AdamW with linear warmup then cosine/linear decay to 10% of the peak learning rate."""

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
