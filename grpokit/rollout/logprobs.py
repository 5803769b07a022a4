"""Per-token log-probabilities of completions under a model, computed without waste.

Only completion positions get logits, and the log-softmax over the vocabulary is taken
in fp32 one cache-sized row chunk at a time (``_ChosenLogProbs``), so the full ``[N, T, V]``
fp32 tensor never exists (49k vocab x 64 seqs x 60 tokens would be 0.75 GB).

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


ROWS_PER_CHUNK = 32  # token rows per pass over the vocabulary: 32 x 49k fp32 = 6 MB, which stays in cache

# Exponents below this are flushed to probability 0. torch's vectorised CPU exp (and a multiply
# whose result is subnormal) leaves its fast path once results fall below float32's smallest
# normal number, e^-87.3: measured here, exp over 32 x 49k log-probs took 15 ms instead of
# 0.25 ms, because most of a 49k vocabulary lies that far below the likeliest token. e^-64 is
# 1.6e-28: all of a 256k vocabulary at that level sums to 4e-23, far below half an fp32 ulp of
# the softmax's total (6e-8), so no sum, sample or entropy changes, and the backward's
# products of such a probability with a token's gradient (down to 1e-9) stay normal numbers.
FLUSH_BELOW = -64.0


def exp_flushed_(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)`` in place (fp32), with every result below e^``FLUSH_BELOW`` set to exactly 0 (so
    ``-inf`` still gives 0)."""
    flushed = x < FLUSH_BELOW
    return x.clamp_(min=FLUSH_BELOW).exp_().masked_fill_(flushed, 0.0)


class _ChosenLogProbs(torch.autograd.Function):
    """log softmax(logits)[id] per token row, with the vocabulary passes fused by hand.

    Autograd through ``logsumexp`` + ``gather`` keeps an fp32 copy of every logit for the
    backward, and each of its steps (cast, max, subtract, exp, sum; then the backward's
    exp, zero fill, scatter, add, cast) is a full pass over ``[rows, V]`` in DRAM: measured
    here, those passes cost more than the output head's matmul. This function walks the
    rows in cache-sized chunks, keeps only the (bf16) logits and each row's log-normaliser,
    and recomputes the softmax chunk by chunk in the backward. Entropy comes from the same
    chunk while it is in cache: H = lse - sum(softmax * logits).
    """

    @staticmethod
    def forward(ctx, logits_RV, ids_R, with_entropy: bool):
        R = logits_RV.size(0)
        lse_R = torch.empty(R, dtype=torch.float32, device=logits_RV.device)
        picked_R = torch.empty_like(lse_R)
        entropy_R = torch.empty_like(lse_R) if with_entropy else None
        for start in range(0, R, ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            x_rV = logits_RV[rows].to(torch.float32, copy=True)  # a copy: shifted in place below
            max_r1 = x_rV.amax(dim=-1, keepdim=True)
            x_rV.sub_(max_r1)  # shifted: exp cannot overflow
            exp_rV = exp_flushed_(x_rV.clone())
            sum_r = exp_rV.sum(dim=-1)
            log_sum_r = sum_r.log()
            lse_R[rows] = log_sum_r + max_r1.squeeze(-1)
            picked_R[rows] = x_rV.gather(-1, ids_R[rows, None]).squeeze(-1) - log_sum_r
            if with_entropy:  # -sum p log p with p = exp / sum and log p = shifted - log sum
                entropy_R[rows] = log_sum_r - (exp_rV * x_rV).sum(dim=-1) / sum_r
        ctx.save_for_backward(logits_RV, ids_R, lse_R)
        if with_entropy:
            ctx.mark_non_differentiable(entropy_R)
            return picked_R, entropy_R
        return picked_R

    @staticmethod
    def backward(ctx, grad_R, *_):
        # d log p(id) / d logits = onehot(id) - softmax
        logits_RV, ids_R, lse_R = ctx.saved_tensors
        grad_RV = torch.empty_like(logits_RV)
        for start in range(0, logits_RV.size(0), ROWS_PER_CHUNK):
            rows = slice(start, start + ROWS_PER_CHUNK)
            g_r1 = grad_R[rows, None]
            p_rV = exp_flushed_(logits_RV[rows].to(torch.float32, copy=True).sub_(lse_R[rows, None]))
            grad_rV = p_rV.mul_(-g_r1).scatter_add_(-1, ids_R[rows, None], g_r1)
            grad_RV[rows] = grad_rV
        return grad_RV, None, None


def token_logprobs(logits_NCV: torch.Tensor, ids_NC: torch.Tensor,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(ids) ``[N, C]`` (differentiable, fp32) and, if asked, per-token entropy ``[N, C]`` (detached)."""
    N, C, V = logits_NCV.shape
    out = _ChosenLogProbs.apply(logits_NCV.reshape(N * C, V), ids_NC.reshape(N * C), with_entropy)
    if with_entropy:
        return out[0].view(N, C), out[1].view(N, C)
    return out.view(N, C), None


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
    return masked_token_logprobs(head, hidden_NCH, completion_ids_NC, completion_mask_NC, with_entropy)


def masked_token_logprobs(head, hidden_NCH, ids_NC, mask_NC, with_entropy: bool = False):
    """``token_logprobs`` for the tokens the mask keeps, 0 elsewhere: the output head and the vocabulary
    passes run only there. A batch's completions stop at different lengths; the padding after each
    EOS is a third of the positions in a typical step, and no loss, KL or metric reads them."""
    keep_K = mask_NC.reshape(-1).nonzero().squeeze(1)  # [K] flat indices of kept tokens
    if keep_K.numel() == mask_NC.numel():
        return token_logprobs(head_logits(head, hidden_NCH), ids_NC, with_entropy=with_entropy)
    N, C, H = hidden_NCH.shape
    hidden_K1H = hidden_NCH.reshape(N * C, H).index_select(0, keep_K)[:, None, :]
    logp_K1, entropy_K1 = token_logprobs(head_logits(head, hidden_K1H), ids_NC.reshape(-1)[keep_K, None],
                                         with_entropy=with_entropy)

    def scatter(values_K1):
        return values_K1.new_zeros(N * C).index_copy(0, keep_K, values_K1.squeeze(1)).view(N, C)
    return scatter(logp_K1), (scatter(entropy_K1) if with_entropy else None)


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
