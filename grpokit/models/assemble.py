"""Building a vision-language model and its processor from configs alone (no download).

Two uses: the tests build tiny randomly initialised models of every supported family, and
the worked example assembles a SmolVLM-style model around the embedded SmolLM2 (a small
vision encoder and a connector in front of a pretrained language model, as SmolVLM and
LLaVA are built). Both go through the same code, and the result is an ordinary
transformers model directory that ``model.path`` loads like any downloaded VLM.

Processors: Qwen's and SmolVLM's processors name a video processor, which transformers
builds only with torchvision installed; ``models/processors.py`` composes an image-only
processor when it is absent (these machines have no torchvision for torch 2.13).
"""

from __future__ import annotations

from pathlib import Path

import torch

from grpokit.errors import ModelError

# family -> (the transformers config / model / processor class names, the text architecture it embeds)
FAMILIES = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor", "Qwen2VLImageProcessorPil"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor",
                   "Qwen2VLImageProcessorPil"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor", "Qwen2VLImageProcessorPil"),
    "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration", "Idefics3Processor",
                 "Idefics3ImageProcessorPil"),
    "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration", "SmolVLMProcessor", "SmolVLMImageProcessorPil"),
}
QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]


def chatml_template(image_placeholder: str, default_system: str | None = None) -> str:
    """A ChatML template (SmolLM2's and Qwen's turn format) whose messages may hold content blocks:
    ``{"type": "text", "text": ...}`` and ``{"type": "image"}`` (rendered as ``image_placeholder``)."""
    system = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n" + default_system
              + "<|im_end|>\n' }}{% endif %}") if default_system else ""
    return (system + "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for block in message['content'] %}{% if block['type'] == 'image' %}{{ '" + image_placeholder + "' }}"
            "{% elif block['type'] == 'text' %}{{ block['text'] }}{% endif %}{% endfor %}{% endif %}"
            "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _transformers_class(name: str):
    import transformers

    return getattr(transformers, name)


def add_image_tokens(tokenizer, family: str) -> dict[str, int]:
    """The family's image special tokens added to ``tokenizer``; their ids by name."""
    tokens = QWEN_TOKENS if family.startswith("qwen") else IDEFICS_TOKENS
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}


def build_processor(family: str, tokenizer, image_size: int = 64, default_system: str | None = None):
    """The family's processor around ``tokenizer`` (its image tokens added), sized for ``image_size`` pixels a side."""
    from grpokit.models.processors import image_only_processor, pil_image_processor

    _, _, processor_name, image_processor_name = FAMILIES[family]
    add_image_tokens(tokenizer, family)
    image_processor_class = pil_image_processor(image_processor_name)
    if family.startswith("qwen"):
        # patches of 14 (16 for Qwen3) merged 2x2: image_size**2 pixels give (image_size / 28)**2 tokens
        patch = 16 if family == "qwen3_vl" else 14
        side = 2 * patch
        image_processor = image_processor_class(patch_size=patch, merge_size=2, temporal_patch_size=2,
                                                size={"shortest_edge": side * side,
                                                      "longest_edge": image_size * image_size})
        placeholder, extra = "<|vision_start|><|image_pad|><|vision_end|>", {}
    else:
        image_processor = image_processor_class(do_image_splitting=False, size={"longest_edge": image_size},
                                                max_image_size={"longest_edge": image_size})
        placeholder, extra = "<image>", {"image_seq_len": idefics_image_tokens(image_size)}
    template = chatml_template(placeholder, default_system)
    return image_only_processor(_transformers_class(processor_name), image_processor, tokenizer, template, **extra)


IDEFICS_PATCH, IDEFICS_SCALE = 8, 2


def idefics_image_tokens(image_size: int) -> int:
    """Tokens per image of the Idefics3/SmolVLM builds here: (side / patch)^2 patches, pixel-shuffled by scale^2."""
    return (image_size // IDEFICS_PATCH) ** 2 // IDEFICS_SCALE ** 2


def build_config(family: str, tokenizer, text: dict, vision: dict, image_size: int = 64):
    """The family's config: ``text`` (a dict, or a text model's config) inside, a vision encoder of ``vision``'s sizes."""
    ids = add_image_tokens(tokenizer, family)
    text = text if isinstance(text, dict) else text.to_dict()
    # the tokenizer's own special ids: the config classes' defaults are Qwen's, outside this vocabulary
    text = {**text, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config_class = _transformers_class(FAMILIES[family][0])
    if family.startswith("qwen"):
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        half = head_dim // 2  # the temporal, height and width rotary sections share half the head dimension
        section = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        rope = {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}
        if family == "qwen3_vl":
            rope["mrope_interleaved"] = True
            vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 16,
                      "out_hidden_size": text["hidden_size"], "num_position_embeddings": 64,
                      "deepstack_visual_indexes": [0], **vision}
        elif family == "qwen2_5_vl":
            vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                      "out_hidden_size": text["hidden_size"], "fullatt_block_indexes": [1], "window_size": 56,
                      **vision}
        else:
            vision = {"depth": 2, "embed_dim": 32, "hidden_size": text["hidden_size"], "num_heads": 2,
                      "mlp_ratio": 2, "patch_size": 14, **vision}
        vision.update(spatial_merge_size=2, temporal_patch_size=2)
        text = {**text, "rope_parameters": rope}
        text.pop("rope_scaling", None)
        return config_class(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"],
                            tie_word_embeddings=text.get("tie_word_embeddings", False))
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              **vision, "image_size": image_size, "patch_size": IDEFICS_PATCH}
    return config_class(text_config=text, vision_config=vision, image_token_id=ids["<image>"],
                        scale_factor=IDEFICS_SCALE, tie_word_embeddings=text.get("tie_word_embeddings", False))


def assemble(family: str, tokenizer, text: dict, vision: dict | None = None, image_size: int = 64,
             language_model_state: dict[str, torch.Tensor] | None = None, default_system: str | None = None,
             seed: int = 0):
    """``(model, processor)``: a randomly initialised VLM of ``family``; with ``language_model_state`` (a causal
    LM's state dict, e.g. SmolLM2's), its language model and output head start from those weights."""
    if family not in FAMILIES:
        raise ModelError(f"unknown vision-language family {family!r}; choose one of {sorted(FAMILIES)}")
    processor = build_processor(family, tokenizer, image_size, default_system)
    config = build_config(family, tokenizer, text, vision or {}, image_size)
    torch.manual_seed(seed)
    model = _transformers_class(FAMILIES[family][1])(config)
    if language_model_state is not None:
        load_language_model(model, language_model_state)
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


def load_language_model(model, state: dict[str, torch.Tensor]) -> None:
    """Copy a causal LM's weights (``model.layers...``, ``lm_head``) into the VLM's language model and head;
    new token rows (the image tokens) keep their random initialisation."""
    language_model, head = model.get_decoder(), model.get_output_embeddings()
    body = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    own = language_model.state_dict()
    for name, value in body.items():
        if name not in own:
            raise ModelError(f"the language model has no weight {name!r}: the text config does not match")
        own[name][: value.size(0)] = value  # embed_tokens grew by the image tokens
    language_model.load_state_dict(own)
    head_weight = state.get("lm_head.weight", body["embed_tokens.weight"])
    with torch.no_grad():
        head.weight[: head_weight.size(0)] = head_weight


def save_model(model, processor, out: str | Path) -> Path:
    """Model (safetensors) and processor in one directory, loadable by ``model.path``."""
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_around(language_model: str, out: str | Path, family: str = "idefics3", image_size: int = 64,
                 vision: dict | None = None, seed: int = 0) -> Path:
    """A VLM of ``family`` around a pretrained causal LM (``model.path`` forms: a directory, a .gguf file or
    the embedded smollm2-135m-instruct), its vision encoder and connector new and random, saved to ``out``.

    That is how SmolVLM and LLaVA start; the connector then needs aligning on image-caption pairs
    (``builtin:shape_caption`` with ``grpokit sft``, the language model frozen) before the model can
    answer about an image. The language model's chat template and its default system message are kept.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grpokit.models.loading import resolve_model_dir

    source = resolve_model_dir(language_model)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model, processor = assemble(family, tokenizer, lm.config, vision=vision, image_size=image_size,
                                language_model_state=lm.state_dict(), default_system=_default_system(tokenizer),
                                seed=seed)
    return save_model(model, processor, out)


def _default_system(tokenizer) -> str | None:
    """The system message a chat template adds when a conversation has none (SmolLM2's names itself)."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    start, end = "<|im_start|>system\n", "<|im_end|>"
    if rendered.startswith(start) and end in rendered:
        return rendered[len(start):rendered.index(end)]
    return None


def add_assemble_command(subparsers) -> None:
    parser = subparsers.add_parser("assemble", help="build a vision-language model around a pretrained language "
                                                    "model (new vision encoder and connector), as SmolVLM is built")
    parser.add_argument("--language-model", default="smollm2-135m-instruct",
                        help="a model directory, a .gguf file or smollm2-135m-instruct (default)")
    parser.add_argument("--family", default="idefics3", choices=sorted(FAMILIES))
    parser.add_argument("--image-size", type=int, default=64, help="pixels a side the processor resizes to")
    parser.add_argument("--vision-hidden", type=int, default=128, help="the vision encoder's width")
    parser.add_argument("--vision-layers", type=int, default=2, help="the vision encoder's blocks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the model directory to write (used as model.path)")
    parser.set_defaults(func=_cmd_assemble)


def _cmd_assemble(args) -> int:
    if Path(args.out).exists():
        raise ModelError(f"{args.out} exists; choose another --out or remove it (a model is never overwritten)")
    vision = {"hidden_size": args.vision_hidden, "intermediate_size": 2 * args.vision_hidden,
              "num_hidden_layers": args.vision_layers, "num_attention_heads": 4}
    out = build_around(args.language_model, args.out, args.family, args.image_size, vision, args.seed)
    print(f"wrote {out}: align its connector with `grpokit sft` on image-caption pairs, then use it as model.path")
    return 0
