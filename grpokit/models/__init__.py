"""Loading the policy (embedded default, GGUF, model dir or hub id), LoRA, checkpoints."""

from grpokit.models.checkpoint import load_checkpoint, load_checkpoint_policy, save_checkpoint
from grpokit.models.loading import Policy, load_policy, resolve_model_dir

__all__ = ["Policy", "load_checkpoint", "load_checkpoint_policy", "load_policy", "resolve_model_dir", "save_checkpoint"]
