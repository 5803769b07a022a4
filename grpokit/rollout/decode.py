"""One decode step of a Llama-family text model over a preallocated KV cache.

HF's forward for one new token per sequence rebuilds the causal mask, grows every layer's
KV cache by concatenation (a copy of the whole cache, twice per layer per token) and passes
each layer's call through kwarg-deprecation and output-capture wrappers. For a 135M model
decoding 32 sequences on a CPU that machinery costs more than the matmuls do. Here the
cache is allocated once at its final length and each token's keys and values are written
into it in place, the padding mask is built once, and each block runs its own modules (so
LoRA, quantized or merged linear layers are called as they are) in HF's order with HF's
rotary function and grpokit's grouped eager attention: the same arithmetic as the
``grpokit_eager`` forward, which ``tests/test_rollout.py`` checks token for token.

On the CPU the bf16 linear layers run on weights reordered once per rollout into oneDNN's
blocked layout (``PackedLinears``, what inductor's CPU freezing does): the same oneDNN kernel
and the same bits as ``torch.nn.functional.linear`` at these shapes, without re-laying the
weight out on every call, which for 32 rows is most of the call (a 576 x 1536 projection:
94 us -> 56 us here).

Only the families whose decoder block is exactly HF's Llama block (``LEAN_FAMILIES``) take
this path, only when the model runs ``grpokit_eager`` (what ``models/loading.py`` picks on
the CPU), and only without a sliding window shorter than the sequence; any other model, and
any model on SDPA or flash attention, decodes through HF's forward.
"""

from __future__ import annotations

import importlib

import torch

from grpokit.models.attention import GROUPED_EAGER_FAMILIES, NAME as GROUPED_EAGER, grouped_eager_attention

# the grouped-eager families whose decoder block is Llama's: Qwen3 also normalises q and k per head
LEAN_FAMILIES = GROUPED_EAGER_FAMILIES - {"qwen3"}
# oneDNN's weight prepacking, where this torch build has it
PACKING = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def lean_decode_applies(config, length: int) -> bool:
    """Whether a model with ``config`` decodes exactly as HF's forward would over ``length`` tokens."""
    if config.model_type not in LEAN_FAMILIES or hasattr(config, "vision_config"):
        return False
    if getattr(config, "_attn_implementation", None) != GROUPED_EAGER:
        return False  # SDPA or flash attention (a GPU): HF's forward keeps the model's own kernel
    window = getattr(config, "sliding_window", None)
    windowed = getattr(config, "use_sliding_window", True)  # Qwen2 says whether; Mistral applies any window set
    return window is None or not windowed or window >= length


def lean_decoder_for(backbone, cache, mask_NP: torch.Tensor, max_new_tokens: int):
    """A ``LeanDecoder`` continuing from a prefilled HF cache, or None where the model needs HF's forward.
    The model is in eval mode (the sampler sets it), so no dropout is left out."""
    if not lean_decode_applies(backbone.config, mask_NP.size(1) + max_new_tokens):
        return None
    rotary = getattr(importlib.import_module(type(backbone).__module__), "apply_rotary_pos_emb", None)
    layers = getattr(cache, "layers", None)  # transformers >= 4.54; older caches keep lists
    if rotary is None or layers is None or len(layers) != len(backbone.layers):
        return None
    return LeanDecoder(backbone, rotary, [(layer.keys, layer.values) for layer in layers], mask_NP, max_new_tokens)


class PackedLinears:
    """Plain bf16 CPU ``nn.Linear`` layers called on prepacked oneDNN weights; any other layer (LoRA,
    quantized, fp32, on a GPU) is called as it is. Made per rollout, so the packs never outlive the
    weights they were made from (the merged sampling copy is refreshed after each update)."""

    def __init__(self, rows: int):
        self.rows = rows  # the batch the packing is tuned for; any other works too
        self.packed: dict[int, torch.Tensor | None] = {}  # per layer, decided once: its pack, or None

    def _pack(self, module) -> torch.Tensor | None:
        weight = getattr(module, "weight", None)
        if PACKING and type(module) is torch.nn.Linear and weight.dtype == torch.bfloat16 and weight.is_cpu:
            return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), self.rows)
        return None

    def __call__(self, module, x: torch.Tensor) -> torch.Tensor:
        key = id(module)
        if key not in self.packed:
            self.packed[key] = self._pack(module)
        weight = self.packed[key]
        if weight is None:
            return module(x)
        return torch.ops.mkldnn._linear_pointwise(x, weight, module.bias, "none", [], "")


class LeanDecoder:
    """Decodes one token per sequence per ``step``, the KV cache filled in place."""

    def __init__(self, backbone, rotary, prompt_kv: list[tuple[torch.Tensor, torch.Tensor]], mask_NP: torch.Tensor,
                 max_new_tokens: int):
        self.backbone = backbone
        self.rotary = rotary  # the modeling file's own apply_rotary_pos_emb
        keys_NKPD = prompt_kv[0][0]
        N, KV, P, D = keys_NKPD.shape
        self.length = P  # tokens in the cache so far
        total = P + max_new_tokens
        self.kv = []
        for keys, values in prompt_kv:
            k_buf = keys.new_empty(N, KV, total, D)
            v_buf = values.new_empty(N, KV, total, D)
            k_buf[:, :, :P], v_buf[:, :, :P] = keys, values
            self.kv.append((k_buf, v_buf))
        # HF's eager padding mask (dtype min where a prompt is left-padded); completion columns always attend
        dtype = keys_NKPD.dtype
        self.mask_N11L = torch.zeros(N, 1, 1, total, dtype=dtype, device=mask_NP.device)
        self.mask_N11L[..., :P].masked_fill_(mask_NP[:, None, None, :] == 0, torch.finfo(dtype).min)
        self.linear = PackedLinears(N)

    def step(self, ids_N1: torch.Tensor, position_ids_N1: torch.Tensor) -> torch.Tensor:
        """The final-norm hidden state ``[N, 1, H]`` after ``ids_N1``, which sit at ``position_ids_N1``."""
        backbone, t, linear = self.backbone, self.length, self.linear
        L = t + 1
        x = backbone.embed_tokens(ids_N1)  # [N, 1, H]
        cos, sin = backbone.rotary_emb(x, position_ids=position_ids_N1)
        mask = self.mask_N11L[..., :L]
        N = x.size(0)
        for layer, (k_buf, v_buf) in zip(backbone.layers, self.kv):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = linear(attn.q_proj, h).view(N, 1, -1, attn.head_dim).transpose(1, 2)
            k = linear(attn.k_proj, h).view(N, 1, -1, attn.head_dim).transpose(1, 2)
            v = linear(attn.v_proj, h).view(N, 1, -1, attn.head_dim).transpose(1, 2)
            q, k = self.rotary(q, k, cos, sin)
            k_buf[:, :, t:L] = k
            v_buf[:, :, t:L] = v
            out, _ = grouped_eager_attention(attn, q, k_buf[:, :, :L], v_buf[:, :, :L], mask, attn.scaling)
            x = x + linear(attn.o_proj, out.reshape(N, 1, -1))
            mlp, h = layer.mlp, layer.post_attention_layernorm(x)
            x = x + linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, h)) * linear(mlp.up_proj, h))
        self.length = L
        return backbone.norm(x)

    def logits(self, head, hidden_NH: torch.Tensor) -> torch.Tensor:
        """The output head on the last hidden states, on its packed weight where it has one."""
        return self.linear(head, hidden_NH)
