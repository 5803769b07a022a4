"""One exception family, so the CLI can print a message instead of a traceback.

Every message says what was wrong, where (file:line or recipe key path) and how to fix it.
"""


class GrpokitError(Exception):
    """Base of every error grpokit raises on purpose."""


class RecipeError(GrpokitError):
    """The recipe (YAML or a --set override) is invalid."""


class DataError(GrpokitError):
    """A dataset is missing, unreadable or malformed."""


class ModelError(GrpokitError):
    """A model could not be found, converted or loaded."""


class RewardError(GrpokitError):
    """A reward function could not be resolved or returned something unusable."""


class RunDirError(GrpokitError):
    """A run directory is missing, incomplete, or would be overwritten."""


class TrainingError(GrpokitError):
    """Training cannot go on (e.g. the loss stayed non-finite); the last checkpoint is intact."""


class EnvFailure(GrpokitError):
    """An environment or a tool failed (raised, hung, returned something unusable): that trajectory ends with
    the reason logged; ``rollout.max_consecutive_env_failures`` in a row stop the run."""


class LaunchError(GrpokitError):
    """A launcher request (``grpokit launch``) cannot make a job that would run: nodes, GPUs, limits, the
    script's file."""
