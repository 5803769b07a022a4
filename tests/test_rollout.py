"""The sampler: stops at EOS, respects max tokens, agrees with the scorer."""

import pytest
import torch

from grpokit.config import ModelConfig
from grpokit.models.loading import wrap_policy
from grpokit.rollout import TorchSampler, completion_logprobs, encode_prompts
from grpokit.rollout.sampler import sample_next
from tests.conftest import make_tiny_model


def tiny_policy(tokenizer, dtype="float32", lora=None):
    cfg = ModelConfig(path="unused", dtype=dtype, lora=lora, device="cpu")
    return wrap_policy(make_tiny_model(len(tokenizer)), tokenizer, cfg, beta=0.0, device=torch.device("cpu"))


def test_sampler_respects_max_tokens_and_groups(char_tokenizer):
    policy = tiny_policy(char_tokenizer)
    ids, cut = encode_prompts(char_tokenizer, ["hi", "a longer prompt"], True, None, max_length=64)
    assert cut == 0
    sampler = TorchSampler(policy, max_new_tokens=5, generator=torch.Generator().manual_seed(0))
    out = sampler.generate(ids, num_generations=3)
    assert out.completion_ids_NC.shape == (6, 5)
    assert torch.equal(out.prompt_ids_NP[0], out.prompt_ids_NP[2])  # a group shares its prompt
    assert out.completion_lengths_N.max() <= 5


def test_sampler_stops_at_eos_and_masks_after_it(char_tokenizer):
    policy = tiny_policy(char_tokenizer)
    eos = char_tokenizer.eos_token_id
    # make EOS the most likely token everywhere: greedy decoding must stop at once
    policy.model.get_output_embeddings().weight.data.zero_()
    policy.model.get_output_embeddings().weight.data[eos] = 1.0
    ids, _ = encode_prompts(char_tokenizer, ["x"], True, None, max_length=64)
    out = TorchSampler(policy, max_new_tokens=8).generate(ids, num_generations=2, greedy=True)
    assert out.completion_ids_NC.shape[1] == 1
    assert out.completion_ids_NC[:, 0].tolist() == [eos, eos]
    assert out.completion_mask_NC.tolist() == [[1], [1]] and not out.truncated_N.any()


def test_prompts_truncate_from_the_left(char_tokenizer):
    ids, cut = encode_prompts(char_tokenizer, ["abcdefghij"], False, None, max_length=4)
    assert cut == 1 and char_tokenizer.decode(ids[0]) == "ghij"


def test_top_k_one_is_greedy_and_top_p_keeps_the_head():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_next(logits, 1.0, 1, 1.0, gen).tolist() == [1, 0]
        assert sample_next(logits, 1.0, 0, 0.5, gen).tolist() == [1, 0]


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_cached_decoding_matches_full_forward_scoring(char_tokenizer, attention):
    """Greedy tokens from the KV-cache decode must be the argmax under a full forward,
    with left padding, for both attention kernels."""
    policy = tiny_policy(char_tokenizer)
    policy.model.set_attn_implementation(attention)
    ids, _ = encode_prompts(char_tokenizer, ["abc", "a much longer prompt here"], True, None, 64)
    out = TorchSampler(policy, max_new_tokens=6).generate(ids, num_generations=1, greedy=True)
    with torch.no_grad():
        logp, _ = completion_logprobs(policy.model, out.prompt_ids_NP, out.prompt_mask_NP,
                                      out.completion_ids_NC, torch.ones_like(out.completion_mask_NC))
        input_ids = torch.cat([out.prompt_ids_NP, out.completion_ids_NC], 1)
        mask = torch.cat([out.prompt_mask_NP, torch.ones_like(out.completion_ids_NC)], 1)
        logits = policy.model(input_ids=input_ids, attention_mask=mask,
                              position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    C = out.completion_ids_NC.size(1)
    assert torch.equal(logits[:, -C - 1:-1].argmax(-1), out.completion_ids_NC)
    ref = torch.log_softmax(logits[:, -C - 1:-1].float(), -1).gather(-1, out.completion_ids_NC[..., None]).squeeze(-1)
    assert torch.allclose(logp, ref, atol=1e-5)


def test_inverse_cdf_sampling_matches_the_distribution_and_never_draws_masked_tokens():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    logits = probs.log().expand(20000, 4)
    draws = sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert freq[1] == 0.0
    assert torch.allclose(freq, probs, atol=0.015)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_shared_prompt_prefix_gives_the_same_logprobs_and_gradients(char_tokenizer, attention):
    """Prompt once per group + repeated KV cache == the plain forward over prompt + completion."""
    policy = tiny_policy(char_tokenizer)
    policy.model.set_attn_implementation(attention)
    ids, _ = encode_prompts(char_tokenizer, ["abc", "a much longer prompt"], True, None, 64)
    out = TorchSampler(policy, max_new_tokens=6, generator=torch.Generator().manual_seed(0)).generate(ids, 3)
    inputs = (out.prompt_ids_NP, out.prompt_mask_NP, out.completion_ids_NC, out.completion_mask_NC)
    results = []
    for group_size in (1, 3):
        policy.model.zero_grad()
        logp, entropy = completion_logprobs(policy.model, *inputs, with_entropy=True, group_size=group_size)
        (logp * out.completion_mask_NC).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in policy.model.parameters() if p.grad is not None])
        results.append((logp.detach(), entropy, grads))
    (plain_logp, plain_entropy, plain_grad), (shared_logp, shared_entropy, shared_grad) = results
    mask = out.completion_mask_NC.bool()
    assert torch.allclose(plain_logp[mask], shared_logp[mask], atol=1e-5)
    assert torch.allclose(plain_entropy[mask], shared_entropy[mask], atol=1e-4)
    assert torch.allclose(plain_grad, shared_grad, atol=1e-4, rtol=1e-3)
