"""Per-token log-probabilities of completions under a model, computed without waste.

Only completion positions get logits, and the log-softmax over the vocabulary is taken
in fp32 one row-chunk at a time, so the full ``[N, T, V]`` fp32 tensor never exists at
once (49k vocab x 64 seqs x 60 tokens would be 0.75 GB).

Logits come from the backbone's hidden states through the output head as one 2-D
matmul. Calling the whole model with ``logits_to_keep`` hands the head a sliced 3-D
tensor, which torch's matmul turns into a batched matmul with the ``[V, H]`` weight
expanded (copied) once per sequence: measured here, that copy cost more than the
transformer itself (1.7 s of a 3.8 s forward for 32 sequences).
"""

from __future__ import annotations

import functools
import inspect

import torch

from grpokit.models.multimodal import collate, positions_after, prompt_positions, span_positions
from grpokit.models.parts import backbone_and_head
from grpokit.models.sharding import is_sharded


def token_logprobs(logits_NCV: torch.Tensor, ids_NC: torch.Tensor, chunk_rows: int = 8,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(ids) ``[N, C]`` (differentiable) and, if asked, per-token entropy ``[N, C]`` (detached)."""
    logps, entropies = [], []
    for start in range(0, logits_NCV.size(0), chunk_rows):
        chunk_nCV = logits_NCV[start:start + chunk_rows].float()
        logsumexp_nC = torch.logsumexp(chunk_nCV, dim=-1)  # [n, C]
        picked_nC = chunk_nCV.gather(-1, ids_NC[start:start + chunk_rows, :, None]).squeeze(-1)
        logps.append(picked_nC - logsumexp_nC)
        if with_entropy:
            with torch.no_grad():
                logp_nCV = chunk_nCV - logsumexp_nC[..., None]
                entropies.append(-(logp_nCV.exp() * logp_nCV).sum(dim=-1))
    return torch.cat(logps), (torch.cat(entropies) if with_entropy else None)


def head_logits(head, hidden_NCH: torch.Tensor) -> torch.Tensor:
    """Logits ``[N, C, V]`` for hidden states ``[N, C, H]``, as a single 2-D matmul."""
    N, C, H = hidden_NCH.shape
    return head(hidden_NCH.reshape(N * C, H)).view(N, C, -1)


@functools.lru_cache(maxsize=None)
def _cache_keyword(backbone_type: type) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``; looked up once per class (decode is hot)."""
    return "cache" if "cache" in inspect.signature(backbone_type.forward).parameters else "past_key_values"


def run_backbone(backbone, cache=None, **inputs):
    """Hidden states ``[N, L, H]`` and the KV cache; speaks transformers 4.x and 5.x."""
    keyword = _cache_keyword(type(backbone))
    if cache is not None:
        inputs[keyword] = cache
    out = backbone(**inputs, use_cache=True)
    return out.last_hidden_state, (out["cache"] if "cache" in out else out["past_key_values"])


def completion_logprobs(model, prompt_ids_NP, prompt_mask_NP, completion_ids_NC, completion_mask_NC,
                        prompt_inputs_N: list[dict] | None = None, completion_inputs_N: list[dict] | None = None,
                        with_entropy: bool = False, group_size: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Score each completion token given its prompt and the completion tokens before it.

    With ``group_size`` G > 1 (rows ``[i*G, (i+1)*G)`` share a prompt) the prompt goes
    through the model once per group and its KV cache is repeated G times, so a group of
    8 completions pays for its prompt once instead of 8 times; gradients flow back through
    the shared prefix. The result equals the plain forward up to float noise (tested).

    ``prompt_inputs_N`` holds each row's image inputs (a vision-language model's prompts); they
    take the prefix path always, so image features are computed once per prompt (per group).
    ``completion_inputs_N`` holds the images of each multi-turn completion's observations: they go
    through the model with the completion tokens, at the positions the sampler gave them.
    """
    if is_sharded(model):  # FSDP: run inside the root's forward, whose hooks gather and reduce the root's weights
        return model(completion_logprobs, prompt_ids_NP, prompt_mask_NP, completion_ids_NC, completion_mask_NC,
                     prompt_inputs_N, completion_inputs_N, with_entropy=with_entropy, group_size=group_size)
    C = completion_ids_NC.size(1)
    backbone, head = backbone_and_head(model)
    if group_size > 1 or prompt_inputs_N is not None or completion_inputs_N is not None:
        hidden_NCH = _shared_prefix_hidden(backbone, prompt_ids_NP, prompt_mask_NP, completion_ids_NC,
                                           completion_mask_NC, group_size, prompt_inputs_N, completion_inputs_N)
    else:
        input_ids_NL = torch.cat([prompt_ids_NP, completion_ids_NC], dim=1)  # [N, P + C]
        mask_NL = torch.cat([prompt_mask_NP, completion_mask_NC], dim=1)  # [N, P + C]
        pos_NL = (mask_NL.cumsum(dim=1) - 1).clamp(min=0)
        hidden_NLH = backbone(input_ids=input_ids_NL, attention_mask=mask_NL, position_ids=pos_NL,
                              use_cache=False).last_hidden_state
        # position P-1+t predicts completion token t: positions L-C-1 .. L-2
        hidden_NCH = hidden_NLH[:, -C - 1:-1, :]
    return token_logprobs(head_logits(head, hidden_NCH), completion_ids_NC, with_entropy=with_entropy)


def prefill(backbone, prompt_ids_BP, prompt_mask_BP, prompt_inputs_B: list[dict] | None = None):
    """The prompts through the body once: ``(hidden [B, P, H], KV cache, positions [..., B, P])``, image
    inputs (if any) stacked for the batch and their positions as the family counts them."""
    inputs = collate(prompt_inputs_B, prompt_ids_BP.size(1)) if prompt_inputs_B else {}
    inputs = {key: value.to(prompt_ids_BP.device) for key, value in inputs.items()}
    pos_XBP = prompt_positions(backbone, prompt_ids_BP, prompt_mask_BP, inputs)
    hidden_BPH, cache = run_backbone(backbone, input_ids=prompt_ids_BP, attention_mask=prompt_mask_BP,
                                     position_ids=pos_XBP, **inputs)
    return hidden_BPH, cache, pos_XBP


def _shared_prefix_hidden(backbone, prompt_ids_NP, prompt_mask_NP, completion_ids_NC, completion_mask_NC,
                          G: int, prompt_inputs_N: list[dict] | None = None,
                          completion_inputs_N: list[dict] | None = None) -> torch.Tensor:
    """Hidden states ``[N, C, H]`` that predict each completion token, the prompt computed once per group."""
    prompt_ids_BP, prompt_mask_BP = prompt_ids_NP[::G], prompt_mask_NP[::G]  # [B, P]
    prompt_inputs_B = prompt_inputs_N[::G] if prompt_inputs_N is not None else None
    prompt_hidden_BPH, cache, pos_XBP = prefill(backbone, prompt_ids_BP, prompt_mask_BP, prompt_inputs_B)
    if G > 1:
        cache.batch_repeat_interleave(G)  # differentiable: each completion attends to the shared prefix
    C = completion_ids_NC.size(1)
    mask_NL = torch.cat([prompt_mask_NP, completion_mask_NC], dim=1)  # [N, P + C]
    # completion token t sits one past the prompt's last position, plus t; tokens after EOS are masked anyway
    positions = positions_after(pos_XBP, G, C)
    inputs = {}
    if completion_inputs_N is not None and any(completion_inputs_N):  # observation images (multi-turn)
        inputs = {k: v.to(completion_ids_NC.device) for k, v in collate(completion_inputs_N, C, left=False).items()}
        positions = span_positions(backbone, completion_ids_NC, completion_mask_NC, inputs, positions[..., 0])
    completion_hidden_NCH, _ = run_backbone(backbone, cache, input_ids=completion_ids_NC, attention_mask=mask_NL,
                                            position_ids=positions, **inputs)
    last_prompt_N1H = prompt_hidden_BPH[:, -1:, :].repeat_interleave(G, dim=0)  # predicts completion token 0
    return torch.cat([last_prompt_N1H, completion_hidden_NCH[:, :-1, :]], dim=1)
