"""Group-relative advantages (GRPO, DeepSeekMath, arXiv:2402.03300, section 4.1.2).

Each prompt's G completions form a group; a completion's advantage is its reward minus
the group mean, divided by the group standard deviation when ``scale`` is true. Like
TRL, the standard deviation is the unbiased one and a small epsilon keeps groups whose
rewards are all equal at an advantage of exactly zero (they carry no learning signal).
Dr. GRPO (arXiv:2503.20783) argues the division by std biases learning toward easy and
hard prompts; ``scale=False`` gives its mean-only form.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards_N: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return advantages ``[N]`` for rewards ``[N]`` laid out group by group.

    ``N = B * G``: rows ``[i*G, (i+1)*G)`` are the completions of prompt ``i``.
    The metrics dict reports the share of groups with zero reward spread.
    """
    if rewards_N.dim() != 1 or rewards_N.numel() % group_size != 0:
        raise ValueError(f"rewards of shape {tuple(rewards_N.shape)} do not split into groups of {group_size}")
    rewards_BG = rewards_N.view(-1, group_size).float()  # [B, G]
    mean_B1 = rewards_BG.mean(dim=1, keepdim=True)  # [B, 1]
    # unbiased std as in TRL; a group of one has no spread by definition
    std_B1 = rewards_BG.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean_B1)
    advantages_BG = rewards_BG - mean_B1  # [B, G]
    if scale:
        advantages_BG = advantages_BG / (std_B1 + eps)
    zero_std_B = std_B1.squeeze(1) < 1e-8  # [B]
    metrics = {"frac_zero_std_groups": zero_std_B.float().mean().item()}
    return advantages_BG.reshape(-1), metrics
