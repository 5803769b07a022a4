"""The parts of a vision-language model by role: vision tower, projector, language model.

ms-swift and verl freeze the vision tower and the projector by default and put LoRA on the
language model only; grpokit does the same, naming parts by role (``model.freeze:
[vision, projector]``) rather than by module names a user has to guess. Each supported
family is one row of ``ROLES`` (module paths inside the Hugging Face model).
"""

from __future__ import annotations

from grpokit.errors import ModelError
from grpokit.models.parts import unwrap_model

# model_type -> role -> the module path inside the *ForConditionalGeneration model
QWEN = {"vision": "model.visual", "projector": "model.visual.merger", "language_model": "model.language_model"}
IDEFICS = {"vision": "model.vision_model", "projector": "model.connector", "language_model": "model.text_model"}
ROLES: dict[str, dict[str, str]] = {"qwen2_vl": QWEN, "qwen2_5_vl": QWEN, "qwen3_vl": QWEN,
                                    "idefics3": IDEFICS, "smolvlm": IDEFICS}
ROLE_NAMES = ("vision", "projector", "language_model")
DEFAULT_FROZEN = ("vision", "projector")


def is_multimodal(model) -> bool:
    return hasattr(unwrap_model(model).config, "vision_config")


def family_roles(model) -> dict[str, str]:
    """The role -> module path table of ``model``'s family; a ModelError for a VLM family not supported yet."""
    model_type = unwrap_model(model).config.model_type
    if model_type not in ROLES:
        raise ModelError(f"vision-language model type {model_type!r} is not supported yet; supported: "
                         f"{sorted(ROLES)}")
    return ROLES[model_type]


def role_prefix(model, role: str, key: str = "model.freeze") -> str:
    """The module path of ``role`` in ``model``, checked to exist; naming a role of a text model is a
    ModelError that names the recipe ``key`` it came from."""
    if not is_multimodal(model):
        raise ModelError(f"{key}: {role!r} names a part of a vision-language model; this is a text model "
                         "(use module-name patterns such as 'embed_tokens')")
    path = family_roles(model)[role]
    names = {name for name, _ in unwrap_model(model).named_modules()}
    if path not in names:
        raise ModelError(f"{type(unwrap_model(model)).__name__} has no module {path!r} ({role}): the family's layout "
                         "differs in this transformers version")
    return path


def role_patterns(model, entries: list[str] | None) -> list[str]:
    """``model.freeze`` entries as regular expressions of module names: a role name becomes its module path
    (anchored, so ``vision`` never matches a language-model module), anything else stays a regex. None (the
    default): a VLM's vision tower and projector, nothing of a text model."""
    if entries is None:
        entries = list(DEFAULT_FROZEN) if is_multimodal(model) else []
    patterns = []
    for entry in entries:
        if entry in ROLE_NAMES:
            patterns.append("^" + role_prefix(model, entry).replace(".", r"\.") + r"(\.|$)")
        else:
            patterns.append(entry)
    return patterns


def language_model_layers(model) -> tuple[str, int]:
    """The language model's block list path (``...language_model.layers``) and its block count."""
    prefix = role_prefix(model, "language_model")
    config = unwrap_model(model).config
    return f"{prefix}.layers", config.text_config.num_hidden_layers
