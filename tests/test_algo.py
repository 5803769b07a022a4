"""Advantages, loss variants, KL estimators and penalties against values computed by hand.

(Parity with TRL's own loss is in test_trl_parity.py.)
"""

import math

import pytest
import torch

from grpokit.algo import (ADVANTAGES, BatchNorms, group_advantages, high_entropy_mask, kl_k3, overlong_penalty,
                          policy_loss)
from grpokit.algo.loss import kl_k1, kl_k2


def test_group_std_hand_values_and_equal_groups_are_exactly_zero():
    # group 1: rewards 0, 1, 2 -> mean 1, unbiased std 1 ; group 2: all equal -> zero
    rewards = torch.tensor([0.0, 1.0, 2.0, 5.0, 5.0, 5.0])
    adv, metrics = group_advantages(rewards, group_size=3)
    assert torch.allclose(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]), atol=1e-3)
    assert torch.equal(adv[3:], torch.zeros(3))
    assert metrics["frac_zero_std_groups"] == 0.5


def test_other_estimators_hand_values():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])  # groups of 2: (1, 3) and (2, 2)
    assert group_advantages(rewards, 2, "group_mean")[0].tolist() == [-1.0, 1.0, 0.0, 0.0]
    # RLOO: r_i - mean of the others: 1 - 3 = -2, 3 - 1 = 2
    assert group_advantages(rewards, 2, "rloo")[0].tolist() == [-2.0, 2.0, 0.0, 0.0]
    # batch std: unbiased std of [1, 3, 2, 2] = sqrt(2/3)
    adv, _ = group_advantages(rewards, 2, "batch_std")
    assert adv[1].item() == pytest.approx(1.0 / (math.sqrt(2 / 3) + 1e-4), rel=1e-6)
    rloo3, _ = group_advantages(torch.tensor([0.0, 0.0, 3.0]), 3, "rloo")
    assert rloo3.tolist() == [-1.5, -1.5, 3.0]  # 3 - mean(0, 0) = 3 ; 0 - mean(0, 3) = -1.5


def test_unknown_estimator_lists_the_choices_and_ragged_groups_fail():
    with pytest.raises(ValueError, match="unknown advantage estimator 'nope'; choose one of"):
        group_advantages(torch.zeros(4), 2, "nope")
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="registered twice"):
        ADVANTAGES.register("rloo")(lambda r: r)


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    # r = log(q/p) = -log 2
    assert kl_k3(logp, ref).item() == pytest.approx(0.5 + math.log(2) - 1)
    assert kl_k1(logp, ref).item() == pytest.approx(math.log(2))
    assert kl_k2(logp, ref).item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_k3(ref, ref).item() == 0.0


LOGP = [[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [2.0, -1.0]


@pytest.mark.parametrize("loss_type, expected, grad_row0, grad_row1", [
    # on policy the per-token loss is -A: grpo = mean over sequences of -A = -(2 - 1)/2
    ("grpo", -0.5, -2 / 6, 1 / 4),
    # bnpo: over the 5 tokens, (-2*3 + 1*2) / 5
    ("bnpo", -4 / 5, -2 / 5, 1 / 5),
    # dr_grpo: sum / (2 sequences x max length 4)
    ("dr_grpo", -4 / 8, -2 / 8, 1 / 8),
    # dapo: sum / all 5 tokens of the generation batch
    ("dapo", -4 / 5, -2 / 5, 1 / 5),
])
def test_loss_types_hand_values_and_gradients(loss_type, expected, grad_row0, grad_row1):
    logp = torch.tensor(LOGP, requires_grad=True)
    mask = torch.tensor(MASK)
    loss, metrics = policy_loss(logp, logp.detach(), torch.tensor(ADV), mask, BatchNorms(2, 5.0, 4),
                                loss_type=loss_type)
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[grad_row0] * 3, [grad_row1, grad_row1, 0.0]]))
    assert metrics["clip_frac"] == 0.0 and metrics["kl"] == 0.0


def test_clip_higher_and_kl():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.25), math.log(0.5)]])  # ratios 1.25 and 0.5
    ref = torch.zeros(1, 2)
    norms = BatchNorms(1, 2.0, 2)
    # A > 0, symmetric 0.2: token 1 clipped to 1.2 ; token 2 min(0.5, 0.8) = 0.5
    loss, metrics = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), norms, ref_logprobs_nT=ref, beta=0.1)
    kl = kl_k3(logp, ref)[0]
    assert loss.item() == pytest.approx((((-1.2 + 0.1 * kl[0]) + (-0.5 + 0.1 * kl[1])) / 2).item(), rel=1e-6)
    assert metrics["clip_frac"] == pytest.approx(0.5) and metrics["clip_frac_high"] == pytest.approx(0.5)
    assert metrics["kl"] == pytest.approx(kl.mean().item(), rel=1e-6)
    # clip-higher 0.28: 1.25 is inside the range now, nothing clipped
    loss, metrics = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), norms, epsilon_high=0.28)
    assert loss.item() == pytest.approx((-1.25 - 0.5) / 2) and metrics["clip_frac"] == 0.0
    # A < 0: the low side clips (ratio 0.5 < 0.8) and the high side does not
    _, metrics = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), norms)
    assert metrics["clip_frac_low"] == pytest.approx(0.5) and metrics["clip_frac_high"] == 0.0


def test_sequence_level_weight_is_the_length_normalised_ratio():
    old = torch.zeros(1, 3)
    logp = torch.tensor([[0.1, -0.1, 0.3]])
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding: it must not count
    loss, _ = policy_loss(logp, old, torch.tensor([1.0]), mask, BatchNorms(1, 2.0, 3), importance_level="sequence")
    assert loss.item() == pytest.approx(-math.exp(0.0))  # mean log ratio over real tokens = 0


def test_high_entropy_mask_keeps_the_top_quantile_of_valid_tokens():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])  # 7.0 is padding and must not move the threshold
    kept = high_entropy_mask(entropy, mask, 0.25)
    assert kept.tolist() == [[False, True, False, False], [False, True, False, False]]
    assert torch.equal(high_entropy_mask(entropy, mask, 1.0), mask.bool())


def test_overlong_penalty_is_linear_in_the_buffer():
    lengths = torch.tensor([10, 12, 14, 16, 20])
    # max 16, buffer 4: free up to 12, then -1/4 per token, -1 at 16 and beyond
    assert overlong_penalty(lengths, 16, 4).tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]
    assert overlong_penalty(lengths, 16, 4, factor=0.5).tolist() == [0.0, 0.0, -0.25, -0.5, -0.5]
