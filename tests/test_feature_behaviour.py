"""Each algorithm switch does what docs/algorithms.md says, asserted on values.

First the pure functions of grpokit/algo and grpokit/train on small tensors whose
expected losses and gradients are worked out here by hand (test_algo.py has the
on-policy loss-type values and the single-point KL values, test_trl_parity.py the
equality with TRL's loss; this file adds what neither pins). Then the trainer on the
tiny model of conftest.py: the same batch with a switch on and off, comparing what the
update actually computes (the gradient w.r.t. each token's log-prob and the parameters'
gradient), so a switch that is parsed but not wired, or wired to the wrong tensor, fails.
"""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from grpokit.algo import BatchNorms, high_entropy_mask, policy_loss, zero_spread_groups
from grpokit.algo.loss import importance_log_weights
from grpokit.algo.replay import ReplayBuffer, ReplayGroup
from grpokit.distributed import World
from grpokit.config import recipe_from_dict
from grpokit.rewards import REWARDS, register
from grpokit.rollout import Rollouts
from grpokit.train import update
from grpokit.train.batch import collect_batch, mix_replay, sample_round
from grpokit.train.run import next_prompts, setup
from grpokit.train.update import policy_update, split_micro_batches

from conftest import tiny_recipe

EPS = 0.2


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def assert_grad(grad: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def loss_and_grad(logp: list, old: list, adv: list, mask: list, norms: BatchNorms, **kwargs):
    """policy_loss on float64 copies; its value, d loss / d logp, and its metrics."""
    logp_nT = leaf(logp)
    old_nT = torch.tensor(old, dtype=torch.float64)
    loss, metrics = policy_loss(logp_nT, old_nT, torch.tensor(adv, dtype=torch.float64), torch.tensor(mask), norms,
                                **kwargs)
    loss.backward()
    return loss.item(), logp_nT.grad, metrics


# --- GSPO: one importance weight per sequence, the geometric mean of its token ratios ---


def test_sequence_weight_is_the_geometric_mean_of_the_valid_token_ratios():
    old = torch.zeros(2, 4)
    logp = torch.tensor([[0.3, -0.1, 0.4, 0.0], [-0.2, 0.5, 9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])  # row 1's last two tokens are padding
    weight = torch.exp(importance_log_weights(logp, old, mask, "sequence"))  # [2, 1]
    ratios = torch.exp(logp)
    expected = [(ratios[0].prod() ** (1 / 4)).item(), ((ratios[1, 0] * ratios[1, 1]) ** (1 / 2)).item()]
    assert weight.shape == (2, 1)
    assert weight.squeeze(1).tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(importance_log_weights(logp, old, mask, "token"), logp)


def test_sequence_level_off_policy_hand_values_differ_from_token_level():
    # log(pi / pi_old) per token; row 1's third token is padding (a wild value that must not count)
    log_ratio = [[0.1, -0.3, -0.1], [0.5, 0.0, 3.0]]
    old = [[-1.0, -2.0, -0.5], [-1.5, -0.7, -2.0]]
    logp = [[o + r for o, r in zip(o_row, r_row)] for o_row, r_row in zip(old, log_ratio)]
    mask, adv, norms = [[1, 1, 1], [1, 1, 0]], [1.0, 1.0], BatchNorms(2, 5.0, 3)

    loss, grad, metrics = loss_and_grad(logp, old, adv, mask, norms, importance_level="sequence")
    w0 = math.exp((0.1 - 0.3 - 0.1) / 3)  # 0.905: inside [0.8, 1.2], carries gradient w0 / L0 per token
    # row 1: exp(mean(0.5, 0.0)) = 1.284 > 1.2 with A > 0: the clipped branch, constant, so no gradient at all
    assert loss == pytest.approx((-w0 - 1.2) / 2)
    assert_grad(grad, [[-w0 / 3 / 2] * 3, [0.0, 0.0, 0.0]])
    assert metrics["clip_frac_high"] == pytest.approx(0.5)  # per sequence: one of two

    loss_t, grad_t, metrics_t = loss_and_grad(logp, old, adv, mask, norms, importance_level="token")
    e = math.exp
    # per token: row 0 all inside the range (e^-0.3 = 0.741 < 0.8 but A > 0 takes the unclipped min);
    # row 1: e^0.5 clipped to 1.2 (no gradient), e^0 = 1 carries -1 / L1
    assert loss_t == pytest.approx((-(e(0.1) + e(-0.3) + e(-0.1)) / 3 - (1.2 + 1.0) / 2) / 2)
    assert_grad(grad_t, [[-e(0.1) / 6, -e(-0.3) / 6, -e(-0.1) / 6], [0.0, -1 / 4, 0.0]])
    assert metrics_t["clip_frac_high"] == pytest.approx(1 / 5)  # per token: one of five
    assert loss != pytest.approx(loss_t)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_sequence_level_equals_token_level_on_policy(loss_type):
    """With the ratio exactly 1 (mu = 1) GSPO's gradient is GRPO's: the two differ only off policy."""
    g = torch.Generator().manual_seed(3)
    logp = (torch.rand(4, 5, generator=g, dtype=torch.float64) * 0.9 + 0.05).log().tolist()
    mask = [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]
    args = (logp, logp, [0.7, -1.1, 0.4, 0.9], mask, BatchNorms(4, 11.0, 6))
    loss_s, grad_s, _ = loss_and_grad(*args, loss_type=loss_type, importance_level="sequence")
    loss_t, grad_t, _ = loss_and_grad(*args, loss_type=loss_type, importance_level="token")
    assert loss_s == pytest.approx(loss_t, abs=1e-12)
    torch.testing.assert_close(grad_s, grad_t, rtol=1e-12, atol=1e-12)
    assert grad_t.abs().sum() > 0


# --- top-entropy token selection: the policy term on the kept tokens only ---


def test_entropy_mask_leaves_dropped_tokens_only_their_kl_gradient():
    logp = [[-1.0, -0.5, -2.0, -0.2]]
    ref = torch.tensor([[-1.5, -0.5, -1.0, -0.9]], dtype=torch.float64)
    keep = torch.tensor([[True, False, True, False]])
    norms = BatchNorms(1, 4.0, 4)
    beta, A = 0.1, 2.0
    loss, grad, _ = loss_and_grad(logp, logp, [A], [[1, 1, 1, 1]], norms, ref_logprobs_nT=ref, beta=beta,
                                  policy_mask_nT=keep)
    lp = torch.tensor(logp[0], dtype=torch.float64)
    k3 = torch.exp(ref[0] - lp) - (ref[0] - lp) - 1  # the default estimator, per token
    dk3 = 1 - torch.exp(ref[0] - lp)  # d k3 / d logp
    # normalised by all 4 completion tokens, not by the 2 kept ones
    assert loss == pytest.approx((-A * 2 + beta * k3.sum().item()) / 4)
    expected = [(-A * kept + beta * d) / 4 for kept, d in zip([1, 0, 1, 0], dk3.tolist())]
    assert grad[0].tolist() == pytest.approx(expected, abs=1e-12)
    # without the KL term the dropped tokens get exactly nothing
    _, grad0, _ = loss_and_grad(logp, logp, [A], [[1, 1, 1, 1]], norms, policy_mask_nT=keep)
    assert grad0[0].tolist() == [-A / 4, 0.0, -A / 4, 0.0]


def test_entropy_mask_at_sequence_level_only_rescales_each_sequence():
    """Pinned as TRL does it (test_trl_parity.py): with one weight per sequence, every token's
    log-prob feeds the weight, so the mask cannot single tokens out; it scales the sequence's
    gradient by its share of kept tokens, spread evenly over all of its tokens."""
    logp = [[-1.0, -0.5, -2.0, -0.2]]
    keep = torch.tensor([[True, False, True, False]])
    _, grad, _ = loss_and_grad(logp, logp, [2.0], [[1, 1, 1, 1]], BatchNorms(1, 4.0, 4),
                               importance_level="sequence", policy_mask_nT=keep)
    # loss = sum_kept(-A w) / L with w = exp(mean log ratio): d/dlogp_j = -A * w * (1/L) * kept / L
    assert grad[0].tolist() == pytest.approx([-2.0 * 1.0 * (1 / 4) * 2 / 4] * 4, abs=1e-12)


# --- loss types: what each normalises by, seen through micro-batches ---

LOGP = [[-1.0, -2.0, -3.0], [-1.0, -1.0, -9.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [2.0, -1.0]


@pytest.mark.parametrize("loss_type, row0, row1, full", [
    # grpo: each sequence's token mean / N: row 0 mean -2 -> -2/2; row 1 mean +1 -> 1/2
    ("grpo", -1.0, 0.5, -0.5),
    # dr_grpo: token sum / (N x max_completion_length 4): -6/8 and 2/8
    ("dr_grpo", -6 / 8, 2 / 8, -4 / 8),
    # dapo: token sum / the generation batch's 5 tokens: -6/5 and 2/5
    ("dapo", -6 / 5, 2 / 5, -4 / 5),
    # bnpo: each micro-batch's own token mean, weighted by its share of sequences:
    # -2 * 1/2 and 1 * 1/2 sum to -0.5, not the full batch's -4/5 (as TRL, by definition)
    ("bnpo", -1.0, 0.5, -4 / 5),
])
def test_micro_batch_losses_add_up_to_the_full_batch_except_bnpo(loss_type, row0, row1, full):
    norms = BatchNorms(2, 5.0, 4)  # normalisers describe the whole generation batch
    parts = [loss_and_grad([LOGP[i]], [LOGP[i]], [ADV[i]], [MASK[i]], norms, loss_type=loss_type)[0] for i in (0, 1)]
    whole = loss_and_grad(LOGP, LOGP, ADV, MASK, norms, loss_type=loss_type)[0]
    assert parts == pytest.approx([row0, row1])
    assert whole == pytest.approx(full)
    assert (sum(parts) == pytest.approx(whole)) is (loss_type != "bnpo")


# --- KL estimators: value, gradient and the logged metric, padding excluded ---


@pytest.mark.parametrize("estimator, per_token, d_per_token", [
    # tokens: log(p/q) = +log 2 and -log 2 (p = 1/2, q = 1/4, then the other way round)
    ("k1", [math.log(2), -math.log(2)], [1.0, 1.0]),
    ("k2", [0.5 * math.log(2) ** 2] * 2, [math.log(2), -math.log(2)]),
    # k3 = exp(log q/p) - log q/p - 1: 1/2 + log 2 - 1 and 2 - log 2 - 1; d/dlogp = 1 - q/p
    ("k3", [0.5 + math.log(2) - 1, 2 - math.log(2) - 1], [0.5, -1.0]),
])
def test_kl_estimator_value_gradient_and_metric(estimator, per_token, d_per_token):
    logp = [[math.log(0.5), math.log(0.25), -0.1]]
    ref = torch.tensor([[math.log(0.25), math.log(0.5), -7.0]], dtype=torch.float64)  # the third token is padding
    beta = 0.1
    loss, grad, metrics = loss_and_grad(logp, logp, [0.0], [[1, 1, 0]], BatchNorms(1, 2.0, 3),
                                        ref_logprobs_nT=ref, beta=beta, kl_estimator=estimator)
    assert metrics["kl"] == pytest.approx(sum(per_token) / 2, abs=1e-7)  # the mean over the 2 real tokens
    assert loss == pytest.approx(beta * sum(per_token) / 2)
    assert grad[0].tolist() == pytest.approx([beta * d / 2 for d in d_per_token] + [0.0], abs=1e-12)
    # beta = 0 leaves KL out entirely, even with reference log-probs at hand
    loss0, _, metrics0 = loss_and_grad(logp, logp, [0.0], [[1, 1, 0]], BatchNorms(1, 2.0, 3), ref_logprobs_nT=ref,
                                       beta=0.0, kl_estimator=estimator)
    assert loss0 == 0.0 and metrics0["kl"] == 0.0


def test_token_metrics_of_one_token_completions_skip_rows_left_out_of_the_loss():
    """A [n, 1] tensor is per token when every completion is one token long: a row the mask
    leaves out (a truncated completion with mask_truncated_completions) must not count."""
    logp = [[math.log(0.5)], [math.log(0.5)]]
    ref = torch.tensor([[math.log(0.25)], [math.log(0.5)]], dtype=torch.float64)  # log(p/q): log 2, then 0
    old = [[math.log(0.5) - 0.5], [math.log(0.5)]]  # ratios e^0.5 (clipped high for A > 0), then 1
    _, _, metrics = loss_and_grad(logp, old, [1.0, 1.0], [[1], [0]], BatchNorms(2, 1.0, 1), ref_logprobs_nT=ref,
                                  beta=0.1, kl_estimator="k1")
    assert metrics["kl"] == pytest.approx(math.log(2))  # row 0 only; counting row 1 would halve it
    assert metrics["clip_frac_high"] == 1.0  # 1 of 1 counted token, not 1 of 2 rows


# --- dynamic sampling: which groups count as having no spread ---


def test_zero_spread_groups_hand_values():
    rewards_BG = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.5, 0.5 + 1e-9], [0.0, 0.0, 1e-6], [0.0, 1.0, 0.0]])
    # equal within 1e-8 is no spread (float noise of a sum of components); 1e-6 is a real difference
    assert zero_spread_groups(rewards_BG).tolist() == [True, True, False, False]


# --- mask_truncated_completions: truncated rows leave the loss and the token count ---


def test_split_micro_batches_zeroes_truncated_rows_and_trims_padding():
    rollouts = Rollouts(
        prompt_ids_NP=torch.tensor([[5, 6]] * 4), prompt_mask_NP=torch.ones(4, 2, dtype=torch.long),
        completion_ids_NC=torch.tensor([[7, 2, 0, 0, 0], [7, 7, 7, 0, 0], [8, 8, 8, 2, 0], [9, 0, 0, 0, 0]]),
        completion_mask_NC=torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]]),
        truncated_N=torch.tensor([False, True, False, True]))
    (mb,) = split_micro_batches(rollouts, 1, mask_truncated=True, G=2)
    assert mb.mask_nC.tolist() == [[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]  # width 4: the longest
    assert mb.inputs[3].tolist() == rollouts.completion_mask_NC[:, :4].tolist()  # the model still sees every token
    assert mb.group_size == 2
    first, second = split_micro_batches(rollouts, 2, mask_truncated=False, G=4)
    assert first.mask_nC.tolist() == [[1, 1, 0], [1, 1, 1]] and second.mask_nC.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert first.group_size == second.group_size == 1  # half a group each: no shared prompt pass


# --- replay: stored groups join the batch with their stored advantages ---


def stored_group(name: str, advantages: list[float], completion: list[list[int]], step: int) -> ReplayGroup:
    G, C = len(advantages), len(completion[0])
    return ReplayGroup(
        prompt_ids_GP=torch.tensor([[11, 12, 13]] * G), prompt_mask_GP=torch.ones(G, 3, dtype=torch.long),
        completion_ids_GC=torch.tensor(completion), completion_mask_GC=torch.ones(G, C, dtype=torch.long),
        truncated_G=torch.tensor([True] * G), rewards_G=torch.tensor(advantages) + 1,
        advantages_G=torch.tensor(advantages), row={"prompt": name}, step=step)


def test_mix_replay_appends_stored_groups_with_their_advantages_before_storing_the_fresh_ones():
    G = 2
    run = SimpleNamespace(recipe=SimpleNamespace(rollout=SimpleNamespace(num_generations=G)), replay=ReplayBuffer(8),
                          rng=random.Random(0), policy=SimpleNamespace(tokenizer=SimpleNamespace(pad_token_id=0)),
                          world=World())
    run.replay.add([stored_group("old", [0.9, -0.9], [[31, 32, 33], [34, 35, 36]], step=1)])
    fresh = Rollouts(  # two fresh groups, prompts of width 1, completions of width 2
        prompt_ids_NP=torch.tensor([[21]] * 4), prompt_mask_NP=torch.ones(4, 1, dtype=torch.long),
        completion_ids_NC=torch.tensor([[1, 2], [3, 0], [4, 5], [6, 2]]),
        completion_mask_NC=torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1]]), truncated_N=torch.zeros(4, dtype=torch.bool))
    fresh_adv = torch.tensor([2.0, -2.0, 3.0, -3.0])  # more informative than the stored group: scores 2 and 3
    rows, rollouts, advantages = mix_replay(run, 2, 1, [{"prompt": "a"}, {"prompt": "b"}], fresh, fresh_adv,
                                            torch.tensor([1.0, 0.0, 1.0, 0.0]))
    # the stored group was drawn before this step's groups entered the buffer, so it is "old", not "b"
    assert rows == [{"prompt": "a"}, {"prompt": "b"}, {"prompt": "old"}]
    assert advantages.tolist() == pytest.approx([2.0, -2.0, 3.0, -3.0, 0.9, -0.9])
    assert rollouts.prompt_ids_NP.tolist() == [[0, 0, 21]] * 4 + [[11, 12, 13]] * 2  # re-padded on the left
    assert rollouts.completion_ids_NC.tolist() == [[1, 2, 0], [3, 0, 0], [4, 5, 0], [6, 2, 0], [31, 32, 33],
                                                   [34, 35, 36]]
    assert rollouts.completion_mask_NC[:4, 2].tolist() == [0] * 4 and rollouts.truncated_N.tolist()[4:] == [True] * 2
    assert [g.row["prompt"] for g in run.replay._groups] == ["b", "a", "old"]  # by score; old not consumed
    # nothing to replay: the batch is the fresh one, and the fresh groups are still stored
    same = mix_replay(run, 3, 0, [{"prompt": "c"}], fresh.select(torch.arange(2)), fresh_adv[:2] * 5,
                      torch.tensor([1.0, 0.0]))
    assert same[0] == [{"prompt": "c"}] and same[2].tolist() == [10.0, -10.0] and len(run.replay) == 4


# --- the trainer on the tiny model: the same batch with a switch on and off ---


class GradProbe:
    """An SGD optimiser that keeps a copy of the flattened gradient of every step (lr 0: weights never move)."""

    def __init__(self, params, lr: float = 0.0):
        self.params, self.lr, self.grads = list(params), lr, []

    def step(self) -> None:
        self.grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().clone()
                                     for p in self.params]))
        with torch.no_grad():
            for p in self.params:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-self.lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


CONSTANT_LR = SimpleNamespace(get_last_lr=lambda: [0.0], step=lambda: None)


def spy_on_loss(monkeypatch) -> list[SimpleNamespace]:
    """Record every policy_loss call of the update, keeping the per-token gradient d loss / d logp."""
    calls = []
    real = update.policy_loss

    def spy(logprobs_nT, old_logprobs_nT, advantages_n, mask_nT, norms, **kwargs):
        logprobs_nT.retain_grad()
        loss, metrics = real(logprobs_nT, old_logprobs_nT, advantages_n, mask_nT, norms, **kwargs)
        calls.append(SimpleNamespace(logp=logprobs_nT, old=old_logprobs_nT.detach().clone(), adv=advantages_n,
                                     mask=mask_nT.float(), norms=norms, metrics=metrics, **kwargs))
        return loss, metrics

    monkeypatch.setattr(update, "policy_loss", spy)
    return calls


def tiny_run(model_dir, out_dir, algorithm=None, training=None):
    recipe = tiny_recipe(model_dir, out_dir, algorithm={"beta": 0.0, **(algorithm or {})},
                         training={"max_grad_norm": 1e6, **(training or {})})  # unclipped: gradients add up
    return setup(recipe_from_dict(recipe))


def update_grads(run, batch_rollouts, advantages_N, lr: float = 0.0) -> list[torch.Tensor]:
    probe = GradProbe(run.policy.trainable_parameters(), lr)
    policy_update(run, probe, CONSTANT_LR, batch_rollouts, advantages_N)
    return probe.grads


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_importance_level_sets_the_per_token_gradient_of_the_second_pass(tiny_model_dir, tmp_path, monkeypatch, level):
    """mu = 2: the second pass is off policy; each token's gradient is the hand formula for its level."""
    calls = spy_on_loss(monkeypatch)
    run = tiny_run(tiny_model_dir, tmp_path / "r", algorithm={"num_iterations": 2, "importance_level": level})
    batch = collect_batch(run, 1, next_prompts)
    update_grads(run, batch.rollouts, batch.advantages_N, lr=2.0)
    first, second = calls
    assert torch.allclose(first.logp, first.old, atol=1e-5)  # the stored old log-probs: the policy before the step
    c = second
    log_ratio = (c.logp - c.old).detach().double()  # [N, C]
    assert (log_ratio.abs() * c.mask).max() > 0.05, "the first step must move the policy"
    A = c.adv.double()[:, None]  # [N, 1]
    lengths = c.mask.sum(dim=1, keepdim=True).double()  # [N, 1]
    N = c.mask.size(0)
    if level == "token":
        w = log_ratio.exp()
        # d/dlogp_t of -min(w A, clip(w) A) / (L N): -A w / (L N), or 0 where the clipped branch is the min
        clipped = ((w > 1 + EPS) & (A > 0)) | ((w < 1 - EPS) & (A < 0))
        expected = torch.where(clipped, 0.0, -A * w) / (lengths * N)
    else:
        w = ((log_ratio * c.mask).sum(dim=1, keepdim=True) / lengths).exp()  # [N, 1]: one weight per sequence
        clipped = ((w > 1 + EPS) & (A > 0)) | ((w < 1 - EPS) & (A < 0))
        # every token's loss is -A w with w = exp(mean_t log ratio): d/dlogp_t = -A w / L on every token
        expected = (torch.where(clipped, 0.0, -A * w) / (lengths * N)).expand_as(log_ratio)
    expected = expected * c.mask
    torch.testing.assert_close(c.logp.grad.double(), expected, rtol=1e-4, atol=1e-8)
    if level == "sequence":  # every real token of a sequence gets the same gradient
        spread = [(g[m.bool()].max() - g[m.bool()].min()).item() for g, m in zip(c.logp.grad, c.mask)]
        assert max(spread) < 1e-7
    else:
        assert any(g[m.bool()].unique().numel() > 1 for g, m in zip(c.logp.grad, c.mask))


def test_gspo_moves_the_weights_like_grpo_on_the_first_pass_and_differently_on_the_second(tiny_model_dir, tmp_path):
    grads = {}
    for level in ("token", "sequence"):
        run = tiny_run(tiny_model_dir, tmp_path / level, algorithm={"num_iterations": 2, "importance_level": level})
        batch = collect_batch(run, 1, next_prompts)  # same seed: the same batch for both
        grads[level] = update_grads(run, batch.rollouts, batch.advantages_N, lr=2.0)
    (tok1, tok2), (seq1, seq2) = grads["token"], grads["sequence"]
    torch.testing.assert_close(seq1, tok1, rtol=1e-3, atol=1e-6)  # ratio ~1: the same policy gradient
    assert (seq2 - tok2).norm() > 0.05 * tok2.norm()  # off policy they part


def test_top_entropy_quantile_zeroes_the_gradient_of_low_entropy_tokens(tiny_model_dir, tmp_path, monkeypatch):
    calls = spy_on_loss(monkeypatch)
    entropies = []
    real_logprobs = update.completion_logprobs

    def record_entropy(*args, **kwargs):
        out = real_logprobs(*args, **kwargs)
        if kwargs.get("with_entropy"):
            entropies.append(out[1].detach())
        return out

    monkeypatch.setattr(update, "completion_logprobs", record_entropy)
    run = tiny_run(tiny_model_dir, tmp_path / "r")
    batch = collect_batch(run, 1, next_prompts)
    (all_tokens,) = update_grads(run, batch.rollouts, batch.advantages_N)
    run.recipe.algorithm.top_entropy_quantile = 0.3
    (top_tokens,) = update_grads(run, batch.rollouts, batch.advantages_N)

    plain, masked = calls
    assert plain.policy_mask_nT is None
    keep = masked.policy_mask_nT
    # the mask is the top 30 % by the model's own entropy of these very tokens
    assert torch.equal(keep, high_entropy_mask(entropies[1], masked.mask, 0.3))
    valid = masked.mask.bool()
    assert 0.2 < keep.sum() / valid.sum() < 0.4
    dropped = valid & ~keep
    assert masked.logp.grad[dropped].abs().max() == 0  # exactly no gradient below the quantile
    # above it, exactly the gradient they get without the mask: the normaliser still counts every token
    torch.testing.assert_close(masked.logp.grad[keep], plain.logp.grad[keep], rtol=1e-6, atol=0.0)
    assert plain.logp.grad[dropped].abs().max() > 0
    assert (top_tokens - all_tokens).norm() > 0.05 * all_tokens.norm()


def test_replayed_groups_bring_their_stored_advantages_and_their_share_of_the_gradient(tiny_model_dir, tmp_path):
    run = tiny_run(tiny_model_dir, tmp_path / "r", algorithm={"replay": {"capacity": 8, "ratio": 0.5}})
    G = run.recipe.rollout.num_generations
    first = collect_batch(run, 1, next_prompts)
    assert first.metrics["replay/reuse_rate"] == 0.0 and len(first.rows) == 4  # the buffer was empty
    informative = int((~zero_spread_groups(first.advantages_N.view(-1, G))).sum())
    assert len(run.replay) == informative >= 2
    second = collect_batch(run, 2, next_prompts)
    assert second.metrics["replay/reuse_rate"] == 0.5 and len(second.rows) == 4
    by_prompt = {row["prompt"]: i for i, row in enumerate(first.rows)}
    for g in (2, 3):  # the last two groups are replayed step-1 groups, exactly as stored
        src = by_prompt[second.rows[g]["prompt"]]
        new_rows, old_rows = slice(g * G, (g + 1) * G), slice(src * G, (src + 1) * G)
        assert torch.equal(second.advantages_N[new_rows], first.advantages_N[old_rows])
        width = int(first.rollouts.completion_mask_NC[old_rows].sum(dim=1).max())
        assert torch.equal(second.rollouts.completion_ids_NC[new_rows, :width],
                           first.rollouts.completion_ids_NC[old_rows, :width])
    assert second.advantages_N[2 * G:].abs().sum() > 0

    # grpo averages over sequences, so the mixed batch's gradient is the fresh and replayed halves' mean
    fresh_rows, replay_rows = torch.arange(2 * G), torch.arange(2 * G, 4 * G)
    (mixed,) = update_grads(run, second.rollouts, second.advantages_N)
    (fresh,) = update_grads(run, second.rollouts.select(fresh_rows), second.advantages_N[fresh_rows])
    (replayed,) = update_grads(run, second.rollouts.select(replay_rows), second.advantages_N[replay_rows])
    torch.testing.assert_close(mixed, (fresh + replayed) / 2, rtol=1e-3, atol=1e-6)
    assert (mixed - fresh).norm() > 0.1 * fresh.norm()  # replay changed the update


if "toy_constant" not in REWARDS:
    @register("toy_constant")
    def toy_constant(prompts, completions, **_):
        """The same reward for every completion: no group has any spread."""
        return [0.5] * len(completions)


def test_dynamic_sampling_with_no_spread_anywhere_trains_on_the_last_round(tiny_model_dir, tmp_path):
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "r", algorithm={"beta": 0.0, "dynamic_sampling": True,
                                                                   "max_sampling_rounds": 2})
    recipe["rewards"] = [{"name": "toy_constant"}]
    run = setup(recipe_from_dict(recipe))
    order = [run.train_rows[i]["prompt"] for i in run.order]
    batch = collect_batch(run, 1, next_prompts)
    assert len(batch.fresh) == 3  # the first round and both extra rounds asked for 4 prompts each
    assert [r["prompt"] for r in batch.rows] == order[8:12]  # the last round, as it is
    assert batch.metrics["dynamic_sampling/extra_rounds"] == 2
    assert batch.metrics["dynamic_sampling/dropped_groups"] == 8
    assert batch.metrics["frac_zero_std_groups"] == 1.0 and torch.equal(batch.advantages_N, torch.zeros(32))
    (grad,) = update_grads(run, batch.rollouts, batch.advantages_N)
    assert grad.abs().max() == 0  # beta = 0 and no advantage: the step teaches nothing


def test_mask_truncated_completions_takes_truncated_rows_out_of_loss_and_token_count(tiny_model_dir, tmp_path,
                                                                                     monkeypatch):
    calls = spy_on_loss(monkeypatch)
    run = tiny_run(tiny_model_dir, tmp_path / "r", algorithm={"loss_type": "dapo", "mask_truncated_completions": True})
    batch = collect_batch(run, 1, next_prompts)
    truncated = batch.rollouts.truncated_N
    assert 0 < truncated.sum() < truncated.numel(), "the seed must give both kinds"
    update_grads(run, batch.rollouts, batch.advantages_N)
    (c,) = calls
    kept_tokens = batch.rollouts.completion_mask_NC[~truncated].sum().item()
    assert c.norms.tokens == kept_tokens  # dapo divides by the tokens that count
    assert c.logp.grad[truncated].abs().max() == 0
    # on policy, dapo's gradient is -A / tokens on every counted token
    expected = (-c.adv[:, None] / kept_tokens) * c.mask
    torch.testing.assert_close(c.logp.grad, expected, rtol=1e-5, atol=1e-9)


def test_overlong_buffer_adds_the_linear_penalty_to_each_reward(tiny_model_dir, tmp_path):
    run = tiny_run(tiny_model_dir, tmp_path / "r", algorithm={"overlong_buffer": 4, "overlong_penalty": 0.5})
    rnd = sample_round(run, next_prompts(run, 4), step=1)
    lengths = rnd.rollouts.completion_lengths_N.tolist()
    assert len(set(lengths)) > 1, "the seed must give several lengths"
    # max_completion_length 8, buffer 4: free up to 4 tokens, then -0.5/4 per token down to -0.5 at 8
    penalty = [-0.5 * min(max(n - 4, 0) / 4, 1.0) for n in lengths]
    assert rnd.parts["overlong_penalty"] == pytest.approx(penalty)
    base = rnd.parts["toy_digits"]
    assert rnd.rewards_N.tolist() == pytest.approx([b + p for b, p in zip(base, penalty)], abs=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_estimator_reaches_the_loss_and_its_metric(tiny_model_dir, tmp_path, monkeypatch, estimator):
    calls = spy_on_loss(monkeypatch)
    run = tiny_run(tiny_model_dir, tmp_path / "r", algorithm={"beta": 0.5, "kl_estimator": estimator,
                                                             "num_iterations": 2})
    batch = collect_batch(run, 1, next_prompts)
    update_grads(run, batch.rollouts, batch.advantages_N, lr=2.0)
    c = calls[1]  # the second pass: the policy has left the reference
    log_r = (c.logp.detach() - c.ref_logprobs_nT).double()  # log(pi / pi_ref) [N, C]
    per_token = {"k1": log_r, "k2": 0.5 * log_r ** 2, "k3": torch.exp(-log_r) + log_r - 1}[estimator]
    assert c.kl_estimator == estimator and c.beta == 0.5
    assert c.metrics["kl"] == pytest.approx(((per_token * c.mask).sum() / c.mask.sum()).item(), rel=1e-4)
    assert abs(c.metrics["kl"]) > 1e-4
