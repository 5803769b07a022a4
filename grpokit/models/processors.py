"""Loading a model's processor: the tokenizer of a text model, the multimodal processor of a VLM.

transformers builds Qwen's and SmolVLM's processors with a video processor, and a video
processor only with torchvision installed. grpokit feeds images, never videos, so where
torchvision is absent (these CPU machines: no torchvision build matches torch 2.13) the same
processor class is composed without its video part; everything images need is unchanged.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from grpokit.errors import ModelError


def _without_video(processor_class):
    """A subclass of ``processor_class`` whose constructor takes no video processor (transformers reads a
    processor's parts off its ``__init__`` signature)."""
    if "video_processor" not in inspect.signature(processor_class.__init__).parameters:
        return processor_class

    class ImageOnly(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnly.__name__ = ImageOnly.__qualname__ = processor_class.__name__
    return ImageOnly


def has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def image_only_processor(processor_class, image_processor, tokenizer, chat_template: str, **kwargs):
    """``processor_class`` built from its image processor and tokenizer (no video processor without torchvision)."""
    cls = processor_class if has_torchvision() else _without_video(processor_class)
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def load_processor(source: str, multimodal: bool, trust_remote_code: bool = False, **image_options):
    """The tokenizer (text model) or the processor (VLM) of ``source``; ``image_options`` (min_pixels,
    max_pixels) go to the image processor."""
    from transformers import AutoProcessor, AutoTokenizer

    if not multimodal:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    if has_torchvision():
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **image_options)
    return _compose_processor(source, trust_remote_code, image_options)


def _compose_processor(source: str, trust_remote_code: bool, image_options: dict):
    """What AutoProcessor builds, from its saved parts, without the video processor."""
    import transformers
    from transformers import AutoTokenizer

    saved = Path(source) / "processor_config.json"
    if not saved.is_file():
        raise ModelError(f"model.path {source!r}: a vision-language model without processor_config.json; "
                         "install torchvision (transformers then loads its processor), or save the processor "
                         "beside the model (processor.save_pretrained)")
    config = json.loads(saved.read_text())
    name = config.get("processor_class")
    processor_class = getattr(transformers, name, None) if name else None
    if processor_class is None:
        raise ModelError(f"model.path {source!r}: unknown processor class {name!r} in processor_config.json")
    image_config = dict(config.get("image_processor") or {})
    image_class_name = image_config.pop("image_processor_type", "")
    image_class = pil_image_processor(image_class_name)
    image_config.pop("processor_class", None)
    image_processor = image_class(**{**image_config, **_image_options(image_class_name, image_options)})
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    template = config.get("chat_template")
    template_file = Path(source) / "chat_template.jinja"
    if template is None and template_file.is_file():
        template = template_file.read_text()
    extra = {k: v for k, v in config.items() if k in inspect.signature(processor_class.__init__).parameters
             and k not in {"image_processor", "tokenizer", "video_processor", "chat_template"}}
    if "image_seq_len" in inspect.signature(processor_class.__init__).parameters and "image_seq_len" not in extra:
        extra["image_seq_len"] = _idefics_image_seq_len(source)
    return image_only_processor(processor_class, image_processor, tokenizer, template, **extra)


def _idefics_image_seq_len(source: str) -> int:
    """Image tokens per image of an Idefics3/SmolVLM model, by the formula its processor documents:
    (image_size // patch_size)^2 / scale_factor^2 (not every version saves it with the processor)."""
    config = json.loads((Path(source) / "config.json").read_text())
    vision = config["vision_config"]
    return (vision["image_size"] // vision["patch_size"]) ** 2 // config.get("scale_factor", 2) ** 2


def pil_image_processor(name: str):
    """The PIL (torchvision-free) image processor class for an ``image_processor_type`` (``Qwen2VLImageProcessor``,
    its ``...Fast`` or its ``...Pil`` name)."""
    import importlib

    import transformers

    pil_name = name.removesuffix("Fast").removesuffix("Pil") + "Pil"
    for module_name in ("qwen2_vl", "idefics3", "smolvlm"):
        module = importlib.import_module(f"transformers.models.{module_name}.image_processing_pil_{module_name}")
        if hasattr(module, pil_name):
            return getattr(module, pil_name)
    found = getattr(transformers, name, None)
    if found is None:
        raise ModelError(f"no image processor {name!r} in this transformers")
    return found


def _image_options(image_class_name: str, options: dict) -> dict:
    """model.min_pixels / max_pixels in the words of the image processor: Qwen's pixel bounds, or
    Idefics3's longest edge (the square root of max_pixels)."""
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        return {}
    if "Qwen" in image_class_name:
        return {"size": {"shortest_edge": options.get("min_pixels", 56 * 56),
                         "longest_edge": options.get("max_pixels", 28 * 28 * 1280)}}
    if "max_pixels" in options:
        edge = int(options["max_pixels"] ** 0.5)
        return {"size": {"longest_edge": edge}, "max_image_size": {"longest_edge": edge}}
    return {}
