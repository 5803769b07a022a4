"""Loading the policy (embedded default, GGUF, model dir or hub id), LoRA, checkpoints."""

from grpokit.models.checkpoint import load_checkpoint, save_checkpoint
from grpokit.models.loading import Policy, load_policy, resolve_model_dir

__all__ = ["Policy", "load_checkpoint", "load_policy", "resolve_model_dir", "save_checkpoint"]
