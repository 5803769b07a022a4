"""Finding the transformer body and the output head of a model, whatever wraps it.

Log-probs, the SFT loss and the reward head all run the body and the head separately
(``rollout/logprobs.py`` says why). A trained model reaches them wrapped: PEFT's
``PeftModel`` today, DDP/FSDP's ``.module`` and ``torch.compile``'s ``_orig_mod`` when
those run; each wrapper is peeled until the Hugging Face model is left.
"""

from __future__ import annotations


def unwrap_model(model):
    """The Hugging Face model inside any DDP/FSDP, ``torch.compile`` or PEFT wrappers."""
    while True:
        if hasattr(model, "get_base_model"):  # PEFT: PeftModel -> LoraModel -> the HF model
            model = model.get_base_model()
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif type(model).__name__ in {"DistributedDataParallel", "DataParallel"} or (
                hasattr(model, "module") and not hasattr(model, "get_decoder")):
            model = model.module
        else:
            return model


def backbone_and_head(model):
    """The transformer body and the output projection of a causal LM or a vision-language model, wrapped
    or not. A VLM's ``get_decoder()`` is its text-only language model; its body is the multimodal model
    that merges image features into the embeddings and then runs that language model, so image inputs
    reach it, and text-only inputs pass through unchanged."""
    base = unwrap_model(model)
    body = base.model if hasattr(base.config, "vision_config") else base.get_decoder()
    return body, base.get_output_embeddings()
