"""The sampler: stops at EOS, respects max tokens, agrees with the scorer."""

import pytest
import torch

from grpokit.config import ModelConfig
from grpokit.models.loading import wrap_policy
from grpokit.rollout import PromptEncoder, build_sampler, completion_logprobs
from grpokit.rollout.sampler import sample_next
from tests.conftest import make_tiny_model


def tiny_policy(tokenizer, dtype="float32", lora=None):
    cfg = ModelConfig(path="unused", dtype=dtype, lora=lora, device="cpu")
    return wrap_policy(make_tiny_model(len(tokenizer)), tokenizer, cfg, beta=0.0, device=torch.device("cpu"))


def encode(tokenizer, prompts, chat_template=True, max_length=64):
    return PromptEncoder(tokenizer, chat_template, None, max_length)([{"prompt": p} for p in prompts])


def sampler_of(policy, max_new_tokens, seed=0):
    return build_sampler(policy, max_new_tokens=max_new_tokens, seed=seed)


def test_sampler_respects_max_tokens_and_groups(char_tokenizer):
    policy = tiny_policy(char_tokenizer)
    batch = encode(char_tokenizer, ["hi", "a longer prompt"])
    assert batch.truncated == 0
    out = sampler_of(policy, 5).generate(batch, num_generations=3)
    assert out.completion_ids_NC.shape == (6, 5)
    assert torch.equal(out.prompt_ids_NP[0], out.prompt_ids_NP[2])  # a group shares its prompt
    assert out.completion_lengths_N.max() <= 5


def test_sampler_stops_at_eos_and_masks_after_it(char_tokenizer):
    policy = tiny_policy(char_tokenizer)
    eos = char_tokenizer.eos_token_id
    # make EOS the most likely token everywhere: greedy decoding must stop at once
    policy.model.get_output_embeddings().weight.data.zero_()
    policy.model.get_output_embeddings().weight.data[eos] = 1.0
    out = sampler_of(policy, 8).generate(encode(char_tokenizer, ["x"]), num_generations=2, greedy=True)
    assert out.completion_ids_NC.shape[1] == 1
    assert out.completion_ids_NC[:, 0].tolist() == [eos, eos]
    assert out.completion_mask_NC.tolist() == [[1], [1]] and not out.truncated_N.any()


def test_prompts_truncate_from_the_left(char_tokenizer):
    batch = encode(char_tokenizer, ["abcdefghij"], chat_template=False, max_length=4)
    assert batch.truncated == 1 and char_tokenizer.decode(batch.input_ids_BP[0]) == "ghij"


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
    out = sampler_of(policy, 6).generate(encode(char_tokenizer, ["abc", "a much longer prompt here"]),
                                         num_generations=1, greedy=True)
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
    out = sampler_of(policy, 6).generate(encode(char_tokenizer, ["abc", "a much longer prompt"]), 3)
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


# ---------------------------------------------------------------------------- the Sampler contract


def test_sampling_logprobs_equal_a_fresh_forward_pass(char_tokenizer):
    """What the sampler records per token is log p under the model, as the trainer's pass computes it:
    sampled (not greedy), with left padding and groups sharing a prompt; zero off the loss mask."""
    policy = tiny_policy(char_tokenizer)
    out = sampler_of(policy, 7, seed=3).generate(encode(char_tokenizer, ["ab", "a much longer prompt"]), 4)
    assert out.sampling_logprobs_NC is not None and out.sampling_logprobs_NC.dtype == torch.float32
    assert torch.equal(out.loss_mask_NC, out.completion_mask_NC)  # one turn: every kept token is the policy's
    with torch.no_grad():
        fresh_NC, _ = completion_logprobs(policy.model, out.prompt_ids_NP, out.prompt_mask_NP,
                                          out.completion_ids_NC, out.completion_mask_NC)
    mask = out.loss_mask_NC.bool()
    assert torch.allclose(out.sampling_logprobs_NC[mask], fresh_NC[mask], atol=1e-5)
    assert (out.sampling_logprobs_NC[~mask] == 0).all()
    assert (out.sampling_logprobs_NC[mask] < 0).all()


def test_sampler_state_round_trip_reproduces_samples(char_tokenizer):
    from grpokit.rollout import Sampler

    policy = tiny_policy(char_tokenizer)
    sampler = sampler_of(policy, 6, seed=1)
    assert isinstance(sampler, Sampler)
    batch = encode(char_tokenizer, ["abc", "de"])
    sampler.generate(batch, 2)
    saved = sampler.state()
    first = sampler.generate(batch, 2).completion_ids_NC
    other = sampler_of(policy, 6, seed=99)
    other.load_state(saved)
    assert torch.equal(other.generate(batch, 2).completion_ids_NC, first)
    assert not torch.equal(sampler.generate(batch, 2).completion_ids_NC, first)  # the stream moved on


def test_unknown_backend_and_images_for_a_text_model_are_refused(char_tokenizer):
    from grpokit.errors import DataError, RecipeError
    from grpokit.rollout import PromptEncoder

    policy = tiny_policy(char_tokenizer)
    with pytest.raises(RecipeError, match="rollout.backend 'vllm'"):
        build_sampler(policy, "vllm", max_new_tokens=4)
    with pytest.raises(DataError, match="model reads text only"):
        PromptEncoder(char_tokenizer, chat_template=False)([{"prompt": "abc", "images": [b"png"]}])


def test_concat_and_select_carry_the_loss_mask_and_sampling_logprobs(char_tokenizer):
    from grpokit.rollout import Rollouts, concat_rollouts

    policy = tiny_policy(char_tokenizer)
    sampler = sampler_of(policy, 5)
    a = sampler.generate(encode(char_tokenizer, ["abc"]), 2)
    b = sampler.generate(encode(char_tokenizer, ["a much longer prompt"]), 2)
    b.loss_mask_NC = b.loss_mask_NC.clone()
    b.loss_mask_NC[:, 0] = 0  # as if its first token came from an environment
    both = concat_rollouts([a, b], char_tokenizer.pad_token_id)
    width = both.completion_ids_NC.size(1)
    assert both.loss_mask_NC[2:, 0].tolist() == [0, 0] and both.loss_mask_NC[:2, 0].tolist() == [1, 1]
    assert torch.equal(both.sampling_logprobs_NC[:2, :a.completion_ids_NC.size(1)], a.sampling_logprobs_NC)
    assert both.sampling_logprobs_NC.shape == (4, width)
    picked = both.select(torch.tensor([3, 0]))
    assert torch.equal(picked.loss_mask_NC[0], both.loss_mask_NC[3])
    assert torch.equal(picked.sampling_logprobs_NC[1], both.sampling_logprobs_NC[0])
    # a part without sampling log-probs (an old replayed group): the whole batch has none, never a mix
    old = Rollouts(a.prompt_ids_NP, a.prompt_mask_NP, a.completion_ids_NC, a.completion_mask_NC, a.truncated_N)
    assert torch.equal(old.loss_mask_NC, old.completion_mask_NC)
    assert concat_rollouts([b, old], char_tokenizer.pad_token_id).sampling_logprobs_NC is None


def test_the_update_trains_only_on_the_loss_mask(char_tokenizer):
    """A token outside the loss mask (an environment's) gets no gradient, though it is attended to."""
    from grpokit.train.update import split_micro_batches

    policy = tiny_policy(char_tokenizer)
    out = sampler_of(policy, 6, seed=2).generate(encode(char_tokenizer, ["abc"]), 2)
    out.loss_mask_NC = out.completion_mask_NC.clone()
    out.loss_mask_NC[:, 1] = 0
    (mb,) = split_micro_batches(out, grad_accum=1, mask_truncated=False, G=2)
    assert mb.mask_nC[:, 1].tolist() == [0, 0]
    assert torch.equal(mb.inputs[3], out.completion_mask_NC[:, :mb.inputs[3].size(1)])  # attention unchanged


def test_backbone_and_head_are_found_under_peft_compile_and_ddp_wrappers(char_tokenizer, tmp_path):
    import torch.distributed as dist

    from grpokit.config import LoraConfig
    from grpokit.models.parts import backbone_and_head, unwrap_model

    plain = make_tiny_model(len(char_tokenizer))
    body, head = plain.get_decoder(), plain.get_output_embeddings()
    compiled = torch.compile(plain)  # compiles nothing until called
    assert unwrap_model(compiled) is plain and backbone_and_head(compiled) == (body, head)
    lora = tiny_policy(char_tokenizer, lora=LoraConfig(r=2, alpha=4)).model
    assert unwrap_model(lora) is lora.get_base_model()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(plain)
        assert unwrap_model(wrapped) is plain and backbone_and_head(wrapped) == (body, head)
        assert backbone_and_head(torch.nn.parallel.DistributedDataParallel(lora))[0] is lora.get_base_model().get_decoder()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_token_logprobs_match_log_softmax_values_entropy_and_gradients(dtype):
    from grpokit.rollout import logprobs

    torch.manual_seed(0)
    logits = (torch.randn(3, 45, 300) * 4).to(dtype).requires_grad_()  # 135 rows: several chunks, one partial
    ids = torch.randint(0, 300, (3, 45))
    weights = torch.randn(3, 45)
    before = logits.detach().clone()
    logp, entropy = logprobs.token_logprobs(logits, ids, with_entropy=True)
    (logp * weights).sum().backward()
    fused_grad, logits.grad = logits.grad.clone(), None
    reference = logits.float().log_softmax(-1)
    ref_logp = reference.gather(-1, ids[..., None]).squeeze(-1)
    (ref_logp * weights).sum().backward()
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(entropy, -(reference.exp() * reference).sum(-1), atol=1e-4, rtol=1e-5)
    assert fused_grad.dtype == dtype and not entropy.requires_grad
    torch.testing.assert_close(fused_grad.float(), logits.grad.float(), atol=1e-6, rtol=1e-2)
    assert torch.equal(logits.detach(), before)  # the logits are never shifted in place


def test_masked_token_logprobs_score_only_kept_tokens():
    from grpokit.rollout.logprobs import head_logits, masked_token_logprobs, token_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 20, bias=False)
    hidden = torch.randn(4, 6, 8, requires_grad=True)
    ids = torch.randint(0, 20, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    logp, entropy = masked_token_logprobs(head, hidden, ids, mask, with_entropy=True)
    full, full_entropy = token_logprobs(head_logits(head, hidden), ids, with_entropy=True)
    torch.testing.assert_close(logp, full * mask)
    torch.testing.assert_close(entropy, full_entropy * mask)
    logp.sum().backward()
    assert hidden.grad[0, 3:].abs().sum() == 0 and hidden.grad[0, :3].abs().sum() > 0


def test_flushed_exp_zeroes_only_what_is_below_float32_resolution_of_the_softmax():
    from grpokit.rollout.logprobs import FLUSH_BELOW, exp_flushed_

    x = torch.tensor([0.0, -3.0, FLUSH_BELOW + 0.5, FLUSH_BELOW - 0.5, -95.0, -1e4, float("-inf")])
    flushed = exp_flushed_(x.clone())
    torch.testing.assert_close(flushed[:3], x[:3].exp(), rtol=1e-6, atol=0)
    assert torch.equal(flushed[3:], torch.zeros(4))


def test_wide_logit_tails_give_the_same_logprobs_gradients_and_samples():
    """Most of a peaked model's vocabulary lies far below its top token, where the fused passes flush
    exp to 0: values, entropies, gradients and the plain sampler's draws stay those of the exact maths."""
    from grpokit.rollout import logprobs
    from grpokit.rollout.sampler import next_tokens

    torch.manual_seed(0)
    logits = (torch.randn(70, 500) * 40).requires_grad_()  # most entries < e^-64 of the row's top
    ids = torch.randint(0, 500, (70,))
    reference = logits.log_softmax(-1)
    assert (reference < logprobs.FLUSH_BELOW).float().mean() > 0.5
    logp, entropy = logprobs.token_logprobs(logits[None], ids[None], with_entropy=True)
    logp.sum().backward()
    fused_grad, logits.grad = logits.grad.clone(), None
    reference.gather(-1, ids[:, None]).sum().backward()
    torch.testing.assert_close(logp[0], reference.gather(-1, ids[:, None]).squeeze(-1).detach())
    torch.testing.assert_close(entropy[0], -(reference.exp() * reference).sum(-1).detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_grad, logits.grad, atol=1e-7, rtol=1e-5)
    masked = logits.detach().clone()
    masked[:, 0] = float("-inf")  # a token the model rules out is never drawn
    drawn, drawn_logp = next_tokens(masked, False, 1.0, 0, 1.0, torch.Generator().manual_seed(3))
    exact = torch.searchsorted(masked.log_softmax(-1).exp().cumsum(-1),
                               torch.rand(70, 1, generator=torch.Generator().manual_seed(3))
                               * masked.log_softmax(-1).exp().cumsum(-1)[:, -1:], right=True).squeeze(1)
    assert torch.equal(drawn, exact) and (drawn != 0).all()
    torch.testing.assert_close(drawn_logp, masked.log_softmax(-1).gather(-1, drawn[:, None]).squeeze(-1))


def tiny_qwen2(vocab_size: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        pad_token_id=0, eos_token_id=2, tie_word_embeddings=True))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lean_decode_samples_the_same_tokens_and_logprobs_as_hf_forward(char_tokenizer, family, dtype):
    """Decoding over the preallocated cache (rollout/decode.py) is HF's decode step, token for token:
    sampled, left-padded prompts of different lengths, groups sharing a prompt's cache."""
    from grpokit.models.attention import eager_for
    from grpokit.rollout import decode

    policy = tiny_policy(char_tokenizer, dtype=dtype)
    if family == "qwen2":  # attention biases on q, k, v
        cfg = ModelConfig(path="unused", dtype=dtype, device="cpu")
        policy = wrap_policy(tiny_qwen2(len(char_tokenizer)), char_tokenizer, cfg, beta=0.0, device=torch.device("cpu"))
    policy.model.set_attn_implementation(eager_for(policy.model.config))  # as loading picks on CPU
    batch = encode(char_tokenizer, ["ab", "a much longer prompt", "xyz"])
    outs, leans = [], []
    real = decode.lean_decoder_for
    for lean in (True, False):
        sampler = sampler_of(policy, 9, seed=5)
        sampler.lean_decode = lean
        decode_for = lambda *a: leans.append(real(*a)) or leans[-1]  # noqa: E731 - records what generate built
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("grpokit.rollout.sampler.lean_decoder_for", decode_for)
            outs.append(sampler.generate(batch, 4))
    assert len(leans) == 1 and isinstance(leans[0], decode.LeanDecoder)  # the lean run took the lean path
    lean_out, hf_out = outs
    assert lean_out.completion_ids_NC.size(1) > 3
    assert torch.equal(lean_out.completion_ids_NC, hf_out.completion_ids_NC)
    torch.testing.assert_close(lean_out.sampling_logprobs_NC, hf_out.sampling_logprobs_NC, atol=1e-5, rtol=1e-5)


def test_lean_decode_leaves_other_families_kernels_and_sliding_windows_to_hf():
    from types import SimpleNamespace

    from grpokit.rollout.decode import lean_decode_applies

    def applies(attention="grpokit_eager", **config):
        return lean_decode_applies(SimpleNamespace(_attn_implementation=attention, **config), 13)

    assert applies(model_type="llama") and not applies(model_type="llama", attention="sdpa")
    assert not applies(model_type="gemma")
    assert not applies(model_type="llama", vision_config={})
    assert not applies(model_type="mistral", sliding_window=10) and applies(model_type="mistral", sliding_window=4096)
    assert not applies(model_type="qwen2", sliding_window=4, use_sliding_window=True)
    assert applies(model_type="qwen2", sliding_window=4, use_sliding_window=False)
