"""Eager attention for grouped-query models without copying the KV cache per head.

HF's eager attention expands each key/value head to the query heads it serves
(``repeat_kv``: a full copy of K and V, 3x for SmolLM2's 9 query / 3 KV heads) before two
matmuls, on every layer of every decode step and again in the backward. Here the query
heads of a group are stacked instead, so one matmul per group reads its K/V once: the same
products and the same fp32 softmax, no copy. Measured on the 2-core CPU, those copies were a
tenth of decode time.

Registered with transformers' ``AttentionInterface`` (and the eager mask) as
``grpokit_eager``; ``models/loading.py`` picks it on CPU for the model families whose eager
attention is exactly HF's ``eager_attention_forward`` (``GROUPED_EAGER_FAMILIES``); any
other family keeps HF's eager.
"""

from __future__ import annotations

import torch

NAME = "grpokit_eager"
# families whose modeling file's eager attention is the plain one (no soft-capping, sinks or extra
# arguments), checked against transformers' code; others keep HF's own
GROUPED_EAGER_FAMILIES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


def grouped_eager_attention(module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0,
                            **kwargs):
    """HF's ``eager_attention_forward`` with the query heads of each KV head stacked (no ``repeat_kv``).

    query ``[N, H, Q, D]``, key/value ``[N, KV, L, D]``; returns ``([N, Q, H, D], weights [N, H, Q, L])``.
    """
    N, H, Q, D = query.shape
    KV, L = key.size(1), key.size(2)
    R = H // KV  # query heads per KV head: head h reads KV head h // R, as repeat_kv lays them out
    scores = torch.matmul(query.reshape(N, KV, R * Q, D), key.transpose(2, 3)).view(N, KV, R, Q, L) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None, :, :L]  # [N, 1, Q, L] -> every head of every group
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.view(N, KV, R * Q, L), value).view(N, H, Q, D)
    return out.transpose(1, 2).contiguous(), weights.view(N, H, Q, L)


def register() -> str:
    """Make ``grpokit_eager`` a name transformers accepts (idempotent); returns it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(NAME, grouped_eager_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)
    return NAME


def eager_for(config) -> str:
    """The eager kernel for a model: grpokit's grouped one where it is exact, else HF's."""
    return register() if getattr(config, "model_type", None) in GROUPED_EAGER_FAMILIES else "eager"
