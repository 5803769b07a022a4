"""The GRPO loop and what it needs around it: the run directory, the optimiser, checkpoints."""

from grpokit.train.grpo import dry_run, train

__all__ = ["dry_run", "train"]
