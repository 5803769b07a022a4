"""The GRPO policy loss: PPO's clipped ratio plus a KL penalty to a reference policy.

Per completion token t of sequence i (DeepSeekMath, arXiv:2402.03300, eq. 3):

    ratio = exp(logp - old_logp)
    l_it  = -min(ratio * A_i, clip(ratio, 1-eps, 1+eps) * A_i) + beta * KL_it

with KL_it the k3 estimator of KL(policy || reference). The loss averages each
sequence's tokens, then the sequences (TRL's ``loss_type="grpo"``). When the update
uses the very samples just generated (one optimiser pass per batch), ``old_logp`` is
the detached ``logp``: the ratio is exactly 1 but its gradient is the policy gradient.
"""

from __future__ import annotations

import torch


def kl_k3(logprobs_NT: torch.Tensor, ref_logprobs_NT: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate ``[N, T]``.

    # k3 = exp(r) - r - 1 with r = ref - logp: unbiased and always >= 0
    (Schulman, "Approximating KL divergence", 2020).
    """
    log_ratio_NT = ref_logprobs_NT - logprobs_NT  # [N, T]
    return torch.exp(log_ratio_NT) - log_ratio_NT - 1.0


def grpo_loss(
    logprobs_NT: torch.Tensor,
    old_logprobs_NT: torch.Tensor,
    advantages_N: torch.Tensor,
    mask_NT: torch.Tensor,
    ref_logprobs_NT: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the scalar loss and detached metrics (KL, clip fraction).

    ``mask_NT`` is 1 on completion tokens and 0 on padding after EOS. With
    ``ref_logprobs_NT=None`` (beta == 0) no KL term is computed at all.
    """
    mask_NT = mask_NT.to(logprobs_NT.dtype)
    ratio_NT = torch.exp(logprobs_NT - old_logprobs_NT)  # [N, T]
    clipped_NT = torch.clamp(ratio_NT, 1.0 - epsilon, 1.0 + epsilon)  # [N, T]
    adv_N1 = advantages_N.unsqueeze(1)  # [N, 1]
    per_token_NT = -torch.min(ratio_NT * adv_N1, clipped_NT * adv_N1)  # [N, T]
    kl_NT = None
    if ref_logprobs_NT is not None and beta != 0.0:
        kl_NT = kl_k3(logprobs_NT, ref_logprobs_NT)  # [N, T]
        per_token_NT = per_token_NT + beta * kl_NT
    tokens_N = mask_NT.sum(dim=1).clamp(min=1.0)  # [N]
    loss = ((per_token_NT * mask_NT).sum(dim=1) / tokens_N).mean()

    with torch.no_grad():
        n_tokens = mask_NT.sum().clamp(min=1.0)
        # a token is clipped when the clipped branch is the one min() picked
        is_clipped_NT = ((ratio_NT < 1.0 - epsilon) & (adv_N1 < 0)) | ((ratio_NT > 1.0 + epsilon) & (adv_N1 > 0))
        metrics = {"clip_frac": ((is_clipped_NT.float() * mask_NT).sum() / n_tokens).item()}
        metrics["kl"] = ((kl_NT * mask_NT).sum() / n_tokens).item() if kl_NT is not None else 0.0
    return loss, metrics
