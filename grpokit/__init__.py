"""grpokit: GRPO fine-tuning from a YAML recipe, with a report that says what changed."""

from grpokit.errors import GrpokitError

__version__ = "0.1.0"
__all__ = ["GrpokitError", "__version__"]
