"""grpokit's grouped-query eager attention against HF's eager, for every family it is used for."""

import pytest
import torch

from grpokit.models.attention import GROUPED_EAGER_FAMILIES, NAME, eager_for, register
from grpokit.models.loading import choose_attention


def tiny_causal_lm(family: str, attention: str, seed: int = 0):
    import transformers

    register()
    config_class = transformers.AutoConfig.for_model(family).__class__
    config = config_class(vocab_size=50, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                          pad_token_id=0, attn_implementation=attention)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention)


@pytest.mark.parametrize("family", sorted(GROUPED_EAGER_FAMILIES))
def test_grouped_attention_equals_hf_eager_with_padding_cache_and_gradients(family):
    reference, grouped = tiny_causal_lm(family, "eager"), tiny_causal_lm(family, NAME)
    assert grouped.config._attn_implementation == NAME
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding, as grpokit's prompts
    mask[2, :1] = 0
    outputs = []
    for model in (reference, grouped):
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        out.logits[mask.bool()].pow(2).mean().backward()
        # one decode step through the KV cache, as the sampler takes it
        step = model(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, torch.ones_like(mask[:, :1])], 1),
                     past_key_values=out.past_key_values)
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        outputs.append((out.logits[mask.bool()].detach(), step.logits.detach(), grads))
    (ref_logits, ref_step, ref_grads), (logits, step_logits, grads) = outputs
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step_logits, ref_step, atol=1e-5, rtol=1e-5)
    assert len(grads) == len(ref_grads) > 0
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)


def test_grouped_attention_returns_hf_shaped_weights():
    model = tiny_causal_lm("llama", NAME)
    out = model(input_ids=torch.randint(1, 50, (2, 5)), output_attentions=True)
    weights = out.attentions[0]
    assert weights.shape == (2, 6, 5, 5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6, 5))
    assert torch.all(weights[..., 0, 1:] == 0)  # causal: the first token sees only itself


def test_auto_attention_picks_grouped_kernel_only_where_exact():
    import transformers

    cpu = torch.device("cpu")
    assert choose_attention("auto", cpu, transformers.LlamaConfig()) == NAME
    assert choose_attention("auto", cpu, transformers.Gemma2Config()) == "eager"  # soft-capped: HF's own
    assert choose_attention("auto", cpu) == "eager"
    assert choose_attention("sdpa", cpu, transformers.LlamaConfig()) == "sdpa"
    assert eager_for(transformers.Qwen2VLConfig()) == "eager"  # VLMs keep HF's kernels
