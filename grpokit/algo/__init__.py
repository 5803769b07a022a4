"""The GRPO math as pure tensor functions: no I/O, no recipe objects (STYLE.md rule 3)."""

from grpokit.algo.advantages import ADVANTAGES, group_advantages, zero_spread_groups
from grpokit.algo.loss import (KL_ESTIMATORS, LOSS_TYPES, BatchNorms, high_entropy_mask, kl_k3, overlong_penalty,
                               policy_loss)

__all__ = ["ADVANTAGES", "KL_ESTIMATORS", "LOSS_TYPES", "BatchNorms", "group_advantages", "high_entropy_mask",
           "kl_k3", "overlong_penalty", "policy_loss", "zero_spread_groups"]
