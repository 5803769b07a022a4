"""The GRPO-family policy loss, its variants selected by name, as one pure function.

Per completion token t of sequence i (DeepSeekMath, arXiv:2402.03300, eq. 3):

    w    = exp(logp - old_logp)                  token-level importance weight, or
         = exp(mean_t(logp - old_logp))          sequence level (GSPO, arXiv:2507.18071)
    l_it = -min(w * A_i, clip(w, 1 - eps_low, 1 + eps_high) * A_i) + beta * KL_it

``eps_low != eps_high`` is DAPO's clip-higher (arXiv:2503.14476). KL_it is one of
Schulman's estimators of KL(policy || reference) (k1, k2, k3). How the ``l_it`` are
averaged is the loss type:

- ``grpo``: mean over each sequence's tokens, then over sequences (the paper; long
  sequences weigh less per token).
- ``bnpo``: mean over all completion tokens of each micro-batch (TRL's bnpo).
- ``dr_grpo``: sum over tokens / (sequences x max_completion_length): a constant
  normaliser, removing the length bias (Dr. GRPO, arXiv:2503.20783).
- ``dapo``: sum over tokens / completion tokens of the whole generation batch (DAPO's
  token-level loss), so splitting into micro-batches changes nothing.

When the update uses the samples just generated (one pass per batch), ``old_logp`` is
the detached ``logp``: the weight is exactly 1, its gradient the policy gradient.

Aggregators share one signature, ``fn(per_token_NT, mask_NT, norms) -> loss``, where
``norms`` describes the whole generation batch, so micro-batch losses add up to the
full-batch loss (the trainer sums their gradients).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from grpokit.algo.registry import Registry


@dataclass(frozen=True)
class BatchNorms:
    """Sizes of the whole generation batch that a micro-batch's loss is normalised by."""

    sequences: int  # N: completions in the generation batch
    tokens: float  # completion tokens (after masking) in the generation batch
    max_completion_length: int


AggregateFn = Callable[[torch.Tensor, torch.Tensor, BatchNorms], torch.Tensor]
LOSS_TYPES: Registry[AggregateFn] = Registry("loss type")
KlFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
KL_ESTIMATORS: Registry[KlFn] = Registry("KL estimator")


@LOSS_TYPES.register("grpo")
def aggregate_grpo(per_token_nT: torch.Tensor, mask_nT: torch.Tensor, norms: BatchNorms) -> torch.Tensor:
    per_seq_n = (per_token_nT * mask_nT).sum(dim=1) / mask_nT.sum(dim=1).clamp(min=1.0)  # [n]
    return per_seq_n.sum() / norms.sequences


@LOSS_TYPES.register("bnpo")
def aggregate_bnpo(per_token_nT: torch.Tensor, mask_nT: torch.Tensor, norms: BatchNorms) -> torch.Tensor:
    token_mean = (per_token_nT * mask_nT).sum() / mask_nT.sum().clamp(min=1.0)
    return token_mean * (per_token_nT.size(0) / norms.sequences)  # micro-batches weighted by their share


@LOSS_TYPES.register("dr_grpo")
def aggregate_dr_grpo(per_token_nT: torch.Tensor, mask_nT: torch.Tensor, norms: BatchNorms) -> torch.Tensor:
    return (per_token_nT * mask_nT).sum() / (norms.sequences * norms.max_completion_length)


@LOSS_TYPES.register("dapo")
def aggregate_dapo(per_token_nT: torch.Tensor, mask_nT: torch.Tensor, norms: BatchNorms) -> torch.Tensor:
    return (per_token_nT * mask_nT).sum() / max(norms.tokens, 1.0)


@KL_ESTIMATORS.register("k1")
def kl_k1(logprobs_NT: torch.Tensor, ref_logprobs_NT: torch.Tensor) -> torch.Tensor:
    """# k1 = log(p/q): unbiased but high variance, and negative per token."""
    return logprobs_NT - ref_logprobs_NT


@KL_ESTIMATORS.register("k2")
def kl_k2(logprobs_NT: torch.Tensor, ref_logprobs_NT: torch.Tensor) -> torch.Tensor:
    """# k2 = (log(p/q))^2 / 2: biased, low variance, >= 0."""
    return 0.5 * (logprobs_NT - ref_logprobs_NT) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logprobs_NT: torch.Tensor, ref_logprobs_NT: torch.Tensor) -> torch.Tensor:
    """# k3 = exp(r) - r - 1 with r = log(q/p): unbiased, low variance, always >= 0
    (Schulman, "Approximating KL divergence", 2020)."""
    log_ratio_NT = ref_logprobs_NT - logprobs_NT  # [N, T]
    return torch.exp(log_ratio_NT) - log_ratio_NT - 1.0


def importance_log_weights(logprobs_nT, old_logprobs_nT, mask_nT, level: str) -> torch.Tensor:
    """``[n, T]`` per token, or ``[n, 1]`` per sequence (GSPO: the length-normalised log ratio)."""
    log_ratio_nT = logprobs_nT - old_logprobs_nT
    if level == "token":
        return log_ratio_nT
    if level == "sequence":
        return ((log_ratio_nT * mask_nT).sum(dim=1) / mask_nT.sum(dim=1).clamp(min=1.0)).unsqueeze(1)  # [n, 1]
    raise ValueError(f"importance sampling level must be 'token' or 'sequence', not {level!r}")


def policy_loss(
    logprobs_nT: torch.Tensor,
    old_logprobs_nT: torch.Tensor,
    advantages_n: torch.Tensor,
    mask_nT: torch.Tensor,
    norms: BatchNorms,
    *,
    ref_logprobs_nT: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    loss_type: str = "grpo",
    importance_level: str = "token",
    kl_estimator: str = "k3",
    policy_mask_nT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Return the (micro-batch share of the) loss and detached metrics.

    ``mask_nT`` is 1 on tokens that count (completion tokens; the trainer may zero
    truncated completions) and 0 elsewhere. ``policy_mask_nT`` optionally restricts the
    policy-gradient term to some tokens (high-entropy ones) while the KL term and the
    normalisation still use ``mask_nT``, as TRL's ``top_entropy_quantile`` does.
    """
    mask_nT = mask_nT.to(logprobs_nT.dtype)
    log_w = importance_log_weights(logprobs_nT, old_logprobs_nT, mask_nT, importance_level)  # [n, T] or [n, 1]
    weight = torch.exp(log_w)
    clipped = torch.clamp(weight, 1.0 - epsilon_low, 1.0 + epsilon_high)
    adv_n1 = advantages_n.unsqueeze(1).to(weight.dtype)  # [n, 1]
    per_token_nT = -torch.min(weight * adv_n1, clipped * adv_n1)  # [n, T] (broadcast at sequence level)
    if policy_mask_nT is not None:
        per_token_nT = per_token_nT * policy_mask_nT.to(per_token_nT.dtype)
    kl_nT = None
    if ref_logprobs_nT is not None and beta != 0.0:
        kl_nT = KL_ESTIMATORS[kl_estimator](logprobs_nT, ref_logprobs_nT)  # [n, T]
        per_token_nT = per_token_nT + beta * kl_nT
    per_token_nT = per_token_nT.expand_as(mask_nT)
    loss = LOSS_TYPES[loss_type](per_token_nT, mask_nT, norms)

    with torch.no_grad():
        n_tokens = mask_nT.sum().clamp(min=1.0)

        def token_mean(x_nT: torch.Tensor) -> float:
            if x_nT.size(1) < mask_nT.size(1):  # sequence level: one value per sequence, averaged over them (as TRL)
                return x_nT.float().mean().item()
            return ((x_nT.float() * mask_nT).sum() / n_tokens).item()

        # clipped = the clipped branch is the one min() picked, for this advantage sign
        low_nT = (weight < 1.0 - epsilon_low) & (adv_n1 < 0)
        high_nT = (weight > 1.0 + epsilon_high) & (adv_n1 > 0)
        metrics = {
            "clip_frac_low": token_mean(low_nT),
            "clip_frac_high": token_mean(high_nT),
            "clip_frac": token_mean(low_nT | high_nT),
            "kl": token_mean(kl_nT) if kl_nT is not None else 0.0,
        }
    return loss, metrics


def high_entropy_mask(entropy_nT: torch.Tensor, mask_nT: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """``[n, T]`` bool: the tokens whose entropy is in the top ``top_quantile`` of the batch.

    "Beyond the 80/20 rule" (arXiv:2506.01939): training only on the high-entropy
    "forking" tokens works as well or better. Same rule as TRL's ``top_entropy_quantile``:
    keep tokens with entropy >= the (1 - q) quantile over valid tokens.
    """
    valid_nT = mask_nT.bool()
    if top_quantile >= 1.0 or not valid_nT.any():
        return valid_nT
    threshold = torch.quantile(entropy_nT[valid_nT].float(), 1.0 - top_quantile)
    return (entropy_nT >= threshold) & valid_nT


def overlong_penalty(lengths_N: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment ``[N]`` (arXiv:2503.14476, eq. 13).

    0 up to ``max_length - buffer`` tokens, then falling linearly to ``-factor`` at
    ``max_length``: the model learns that running long costs, without the cliff of
    a hard penalty.
    """
    start = max_length - buffer
    over_N = (lengths_N.float() - start).clamp(min=0.0)
    return -factor * (over_N / max(buffer, 1)).clamp(max=1.0)
