"""The GRPO math as pure tensor functions: no I/O, no recipe objects (STYLE.md rule 3)."""

from grpokit.algo.advantages import group_advantages
from grpokit.algo.loss import grpo_loss, kl_k3

__all__ = ["group_advantages", "grpo_loss", "kl_k3"]
