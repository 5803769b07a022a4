"""training.gradient_checkpointing: the same update with less activation memory, sampling untouched.

HF recomputes each decoder block in the backward only in training mode with gradients on, and
there it turns the KV cache off: the update pass then scores each completion with its own prompt
(grpokit/train/update.py sets the shared prefix aside), while sampling and the no-grad passes run as
before. Memory and time are measured by bench/memory.py, not asserted here.
"""

import json

import pytest
import torch

from grpokit.config import LoraConfig, ModelConfig, recipe_from_dict
from grpokit.errors import ModelError
from grpokit.models import load_policy
from grpokit.models.loading import wrap_policy
from grpokit.rollout import completion_logprobs

from conftest import tiny_recipe


def count_block_forwards(policy) -> list[int]:
    """A counter of the first decoder block's forwards: checkpointing runs it once more in the backward.
    The hook sits on the block's attention: HF checkpoints a block's ``forward``, so the block's own hooks
    stay outside the recompute, and torch's recompute may stop early, after the attention."""
    calls = [0]
    attention = next(m for name, m in policy.model.named_modules() if name.endswith("layers.0.self_attn"))
    attention.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_recipe_switch_validates_and_defaults_off(tiny_model_dir, tmp_path):
    assert recipe_from_dict(tiny_recipe(tiny_model_dir, tmp_path)).training.gradient_checkpointing is False
    on = recipe_from_dict(tiny_recipe(tiny_model_dir, tmp_path, training={"gradient_checkpointing": True}))
    assert on.training.gradient_checkpointing is True


@pytest.mark.parametrize("bits", [None, "load_in_4bit"], ids=["lora", "qlora"])
def test_checkpointing_gives_the_same_loss_and_gradients(tiny_model_dir, bits):
    """One forward + backward of the log-probs in training mode, with and without checkpointing."""
    if bits:
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install grpokit[qlora])")
    results = []
    for on in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation both times
        cfg = ModelConfig(path=str(tiny_model_dir), dtype="float32", device="cpu", lora=LoraConfig(r=4, alpha=8),
                          **({bits: True} if bits else {}))
        policy = load_policy(cfg, beta=0.1, gradient_checkpointing=on)
        assert policy.gradient_checkpointing is on
        with torch.no_grad():  # LoRA's B starts at zero: move it so every adapter gets a gradient
            for p in policy.trainable_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        calls = count_block_forwards(policy)
        torch.manual_seed(0)
        prompt_NP = torch.randint(3, 90, (4, 6))
        completion_NC = torch.randint(3, 90, (4, 5))
        mask_NP, mask_NC = torch.ones_like(prompt_NP), torch.ones_like(completion_NC)
        mask_NP[0, :2] = 0  # left padding in one prompt
        policy.model.train()
        logp_NC, _ = completion_logprobs(policy.model, prompt_NP, mask_NP, completion_NC, mask_NC)
        loss = -(logp_NC * torch.linspace(-1, 1, 4)[:, None]).sum()
        loss.backward()
        assert calls[0] == (2 if on else 1)  # recomputed in the backward exactly when checkpointing
        results.append((loss.detach(), [p.grad.clone() for p in policy.trainable_parameters()]))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert torch.allclose(loss_on, loss_off, atol=1e-6)
    assert len(grads_on) == len(grads_off) > 0
    for a, b in zip(grads_on, grads_off):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_the_update_is_the_same_and_sampling_untouched(tiny_model_dir, tmp_path, monkeypatch):
    """A whole policy_update (reference pass, shared prefix asked for) with and without checkpointing:
    the same sampled completions, the same weights after one step."""
    from grpokit.train.batch import collect_batch
    from grpokit.train.run import next_prompts, setup
    from grpokit.train.update import policy_update

    completions, params, losses = [], [], []
    for on in (False, True):
        recipe = recipe_from_dict(tiny_recipe(tiny_model_dir, tmp_path / f"gc{on}", algorithm={"beta": 0.1},
                                              model={"lora": {"r": 4, "alpha": 8}},
                                              training={"gradient_checkpointing": on},
                                              rollout={"share_prompt_prefix": True, "merge_lora": False}))
        run = setup(recipe)
        assert run.policy.gradient_checkpointing is on
        optimizer = torch.optim.SGD(run.policy.trainable_parameters(), lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        batch = collect_batch(run, 1, next_prompts)
        completions.append(batch.rollouts.completion_ids_NC)
        calls = count_block_forwards(run.policy)
        before = torch.cat([p.detach().flatten() for p in run.policy.trainable_parameters()])
        losses.append(policy_update(run, optimizer, scheduler, batch.rollouts, batch.advantages_N)["loss"])
        # off: the reference and update passes each run the block twice (the group's prompt once, then its
        # completions on the shared KV cache); on: once each with its own prompt, plus the backward's recompute
        assert calls[0] == (3 if on else 4)
        params.append(torch.cat([p.detach().flatten() for p in run.policy.trainable_parameters()]))
        assert not torch.equal(params[-1], before)
    assert torch.equal(completions[0], completions[1])
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert torch.allclose(params[0], params[1], atol=1e-6, rtol=1e-4)


@pytest.mark.slow
def test_a_short_run_with_checkpointing_trains(tiny_model_dir, tmp_path, monkeypatch):
    from grpokit.train import train

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", model={"lora": {"r": 4, "alpha": 8}},
                         algorithm={"beta": 0.05}, training={"max_steps": 3, "gradient_checkpointing": True,
                                                             "grad_accum": 2})
    run_dir = train(recipe_from_dict(recipe))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["skipped_update"] == 0.0 and r["grad_norm"] > 0 for r in steps)
    assert steps[-1]["kl"] > 0  # the adapters moved away from the reference
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


def test_a_vision_language_model_is_refused(char_tokenizer):
    from grpokit.models.assemble import assemble

    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096, "model_type": "qwen2"}
    model, processor = assemble("qwen2_vl", char_tokenizer, text, seed=0)
    cfg = ModelConfig(path="unused", dtype="float32", device="cpu")
    with pytest.raises(ModelError, match="gradient_checkpointing is not supported for vision-language models"):
        wrap_policy(model, processor, cfg, beta=0.0, device=torch.device("cpu"), gradient_checkpointing=True)
