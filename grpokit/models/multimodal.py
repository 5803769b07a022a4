"""Image inputs for a vision-language model's forward: batching prompts' processor outputs, and positions.

A prompt's processor output is kept per prompt (``PromptEncoder`` runs the processor on one
row at a time), so a group's rows, a replayed group and a micro-batch can each pick the
prompts they need and stack them here, whatever padding width the batch has.

The families store pixels two ways. Qwen-VL flattens every image's patches into one
``[patches, D]`` tensor plus an ``image_grid_thw`` row per image: prompts concatenate along
dim 0. Idefics3/SmolVLM give ``[1, images, C, H, W]`` per prompt: prompts with fewer images
are padded with all-zero images, which the model recognises and drops, as its processor
pads a batch itself. Token-type ids line up with the prompt tokens and are left-padded like
them.

Positions: a family whose body has ``get_rope_index`` (Qwen's multimodal rotary embedding)
gets its ``[3, B, P]`` positions from it; every other family counts real tokens. They are
always passed explicitly, so the model's stored ``rope_deltas`` (state left by a previous
``generate``) never decide a position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TOKEN_TYPE_SUFFIX = "token_type_ids"
STACKED_NDIM = 4  # [1, images, ...]: one prompt's images stacked (Idefics3's pixels and pixel mask)


def collate(prompt_inputs: list[dict], width: int, left: bool = True) -> dict[str, torch.Tensor]:
    """One batch's image inputs from per-sequence processor outputs, sequences padded to ``width`` tokens
    on the left (prompts) or on the right (SFT samples)."""
    keys = sorted({key for inputs in prompt_inputs for key in inputs})
    batch = {}
    for key in keys:
        if key.endswith(TOKEN_TYPE_SUFFIX):
            batch[key] = torch.cat([_pad(inputs.get(key), width, left) for inputs in prompt_inputs])
            continue
        present = [inputs[key] for inputs in prompt_inputs if key in inputs]
        if present[0].ndim >= STACKED_NDIM:
            batch[key] = _stack_images(prompt_inputs, key, present)
        else:
            batch[key] = torch.cat(present)
    return batch


def _pad(type_ids_1L: torch.Tensor | None, width: int, left: bool) -> torch.Tensor:
    """Token-type ids ``[1, width]``: zeros (text) on the padding, and for a sequence without any."""
    if type_ids_1L is None:
        return torch.zeros(1, width, dtype=torch.long)
    missing = width - type_ids_1L.size(1)
    return F.pad(type_ids_1L, (missing, 0) if left else (0, missing))


def join_pieces(pieces: list[tuple[dict, int]]) -> dict[str, torch.Tensor]:
    """One sequence's image inputs from the processor outputs of its consecutive pieces ``(inputs,
    tokens)`` (an SFT sample is encoded turn by turn): images in order, token types end to end."""
    keys = sorted({key for inputs, _ in pieces for key in inputs})
    joined = {}
    for key in keys:
        if key.endswith(TOKEN_TYPE_SUFFIX):
            joined[key] = torch.cat([inputs.get(key, torch.zeros(1, length, dtype=torch.long))
                                     for inputs, length in pieces], dim=1)
            continue
        present = [inputs[key] for inputs, _ in pieces if key in inputs]
        joined[key] = torch.cat(present, dim=1 if present[0].ndim >= STACKED_NDIM else 0)
    return joined


def _stack_images(prompt_inputs: list[dict], key: str, present: list[torch.Tensor]) -> torch.Tensor:
    """``[B, max images, ...]``: each prompt's images, then all-zero images up to the most any prompt has."""
    most = max(t.size(1) for t in present)
    template = present[0]
    rows = []
    for inputs in prompt_inputs:
        images = inputs.get(key, template[:, :0])
        missing = most - images.size(1)
        if missing:
            images = torch.cat([images, images.new_zeros(1, missing, *template.shape[2:])], dim=1)
        rows.append(images)
    return torch.cat(rows)


def prompt_positions(body, ids_BP: torch.Tensor, mask_BP: torch.Tensor, inputs: dict) -> torch.Tensor:
    """Position ids of left-padded prompts: ``[B, P]``, or ``[3, B, P]`` for a multimodal rotary embedding."""
    if hasattr(body, "get_rope_index") and "mm_token_type_ids" in inputs:
        rope_inputs = {k: v for k, v in inputs.items() if k in ("image_grid_thw", "video_grid_thw")}
        positions, _ = body.get_rope_index(ids_BP, mm_token_type_ids=inputs["mm_token_type_ids"],
                                           attention_mask=mask_BP, **rope_inputs)
        return positions.to(ids_BP.device)
    return (mask_BP.cumsum(dim=1) - 1).clamp(min=0)


def span_positions(body, ids_NW: torch.Tensor, mask_NW: torch.Tensor, inputs: dict,
                   start_XN: torch.Tensor) -> torch.Tensor:
    """Positions ``[..., N, W]`` of a right-padded span of tokens that continues each row, its first real
    token at ``start_XN`` (``[N]``, or ``[3, N]`` for Qwen's rotary embedding): a multi-turn observation
    fed after the policy's turn, or a whole multi-turn completion after its prompt. Text tokens count
    up; an image block inside the span takes Qwen's (time, height, width) positions from
    ``get_rope_index`` run on the span alone, which counts from 0 exactly as it would have continued
    from the tokens before (a block starts one past the largest position so far)."""
    offsets_XNW = (mask_NW.cumsum(dim=1) - 1).clamp(min=0)
    if start_XN.dim() == 2:  # Qwen: text positions are equal in the three rotary dimensions
        offsets_XNW = offsets_XNW.expand(start_XN.size(0), -1, -1)
        if "image_grid_thw" in inputs:
            types_NW = (ids_NW == body.config.image_token_id).long()
            counted_NW = mask_NW.clone()
            counted_NW[:, 0] |= ~mask_NW.bool().any(dim=1)  # a row with nothing to feed: one token, never read
            offsets_XNW, _ = body.get_rope_index(ids_NW, mm_token_type_ids=types_NW, attention_mask=counted_NW,
                                                 image_grid_thw=inputs["image_grid_thw"])
    return start_XN[..., None] + offsets_XNW.to(start_XN.device)


def next_positions(positions_XNW: torch.Tensor, mask_NW: torch.Tensor) -> torch.Tensor:
    """The position ``[..., N]`` the token after each row's span takes: one past the largest position
    the row's real tokens used, in every rotary dimension (after an image block Qwen's text resumes
    one past the block's largest (t, h, w) index, not one past its token count). A row without real
    tokens gets 0; the caller keeps its old position."""
    used_XNW = positions_XNW.masked_fill(~mask_NW.bool(), -1)
    last_N = used_XNW.amax(dim=-1)
    if last_N.dim() == 2:
        last_N = last_N.amax(dim=0, keepdim=True).expand_as(last_N)
    return last_N + 1


def positions_after(positions_XBP: torch.Tensor, group_size: int, steps: int) -> torch.Tensor:
    """The positions of the ``steps`` tokens that follow each prompt, for each of its ``group_size`` rows:
    ``[..., B*G, steps]``. A text token after the prompt sits one past the prompt's last position, in
    every rotary dimension (Qwen's text tokens share one position across the three)."""
    last_XN1 = positions_XBP[..., -1:].repeat_interleave(group_size, dim=-2)
    return last_XN1 + 1 + torch.arange(steps, device=positions_XBP.device)


def tokenizer_of(processor):
    """The text tokenizer: the processor itself (a text model), or the one a VLM's processor holds."""
    return getattr(processor, "tokenizer", processor)


def chat_template_of(processor) -> str | None:
    """The template prompts are rendered with: a VLM processor's own (it renders image blocks), else the
    tokenizer's; None when there is neither."""
    return getattr(processor, "chat_template", None) or tokenizer_of(processor).chat_template


def reads_images(processor) -> bool:
    """Whether ``processor`` prepares images (a VLM's processor has an image processor)."""
    return getattr(processor, "image_processor", None) is not None


def process_text(processor, text: str, images: list) -> tuple[list[int], dict]:
    """Rendered text with its images through a multimodal processor: the token ids (each image's
    placeholder expanded to its image tokens) and the other model inputs it returns, unpadded."""
    options = {"return_mm_token_type_ids": True} if "mm_token_type_ids" in processor.model_input_names else {}
    out = processor(text=[text], images=images or None, return_tensors="pt", add_special_tokens=False, **options)
    return out["input_ids"][0].tolist(), {key: value for key, value in out.items()
                                          if key not in ("input_ids", "attention_mask")}
