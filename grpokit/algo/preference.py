"""Losses on preference pairs, as pure tensor functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_n: torch.Tensor, rejected_n: torch.Tensor,
                       margin: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry (InstructGPT's reward model, TRL's RewardTrainer): mean
    ``-log sigmoid(r_chosen - r_rejected - margin)`` over the pairs, with the share of pairs
    ranked right (a tie counts as wrong) and the mean reward margin."""
    diff_n = chosen_n - rejected_n
    loss = -F.logsigmoid(diff_n - margin).mean()
    return loss, {"accuracy": (diff_n > 0).float().mean().item(), "margin": diff_n.mean().item()}
