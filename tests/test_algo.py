"""Advantages and the loss against values computed by hand."""

import math

import pytest
import torch

from grpokit.algo import group_advantages, grpo_loss, kl_k3


def test_group_advantages_hand_values():
    # group 1: rewards 0, 1, 2 -> mean 1, unbiased std 1 ; group 2: all equal -> zero
    rewards = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0])
    adv, metrics = group_advantages(rewards, group_size=3)
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-3)
    assert torch.equal(adv[3:], torch.zeros(3))  # equal rewards: exactly no signal
    assert metrics["frac_zero_std_groups"] == 0.5


def test_group_advantages_unscaled_is_mean_centred():
    adv, _ = group_advantages(torch.tensor([1.0, 3.0, 2.0, 2.0]), group_size=2, scale=False)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]))


def test_group_advantages_rejects_ragged_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)


def test_kl_k3_hand_value_and_zero_at_equality():
    logp = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[math.log(0.25)]])
    # r = log(0.25/0.5) = -log 2 ; exp(r) - r - 1 = 0.5 + log 2 - 1
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_k3(ref, ref).item() == 0.0


def test_grpo_loss_on_policy_is_minus_mean_advantage_and_masks_padding():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    loss, metrics = grpo_loss(logp, logp.detach(), adv, mask)
    # ratio == 1: per-sequence loss = -A ; mean over sequences = -(2 - 1)/2
    assert loss.item() == pytest.approx(-0.5)
    loss.backward()
    # d loss / d logp = -A / (tokens in the sequence * N); masked token gets nothing
    expected = torch.tensor([[-2 / 6, -2 / 6, -2 / 6], [1 / 4, 1 / 4, 0.0]])
    assert torch.allclose(logp.grad, expected)
    assert metrics["clip_frac"] == 0.0 and metrics["kl"] == 0.0


def test_grpo_loss_clips_and_adds_kl():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5
    ref = torch.zeros(1, 2)
    loss, metrics = grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), ref, beta=0.1, epsilon=0.2)
    # A > 0: token 1 clipped to 1.2 ; token 2 min(0.5, 0.8) = 0.5
    kl = kl_k3(logp, ref)[0]
    expected = ((-1.2 + 0.1 * kl[0]) + (-0.5 + 0.1 * kl[1])) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert metrics["clip_frac"] == pytest.approx(0.5)
    assert metrics["kl"] == pytest.approx(kl.mean().item(), rel=1e-6)
