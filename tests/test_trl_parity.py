"""Parity of grpokit's policy loss with TRL's ``GRPOTrainer``, on identical tensors.

TRL's GRPOTrainer is the reference implementation of the GRPO family (grpo, bnpo,
dr_grpo, dapo; token- and sequence-level importance weights; clip-higher; the k3 KL
penalty; top-entropy token selection): it defines the behaviour grpokit promises to
reproduce. So these tests run TRL's own code, not a transcription of it, and compare
loss values, gradients w.r.t. the log-probabilities and the logged metrics.

No model is built: the trainer instance is made with ``object.__new__`` and given only
the attributes ``GRPOTrainer._compute_loss`` reads, and its ``_get_per_token_logps_and_entropies``
is replaced by a function returning prepared tensors, so TRL's loss sees exactly the
log-probabilities grpokit sees. With one process, one accumulation step and one step per
generation, TRL's micro-batch is the whole generation batch.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl import GRPOTrainer

from grpokit.algo.loss import BatchNorms, high_entropy_mask, policy_loss

N, T = 6, 5
LENGTHS = [5, 3, 1, 4, 5, 2]  # rows of different lengths, one of a single token
ADVANTAGES = [1.0, -0.7, 0.5, -1.2, 0.3, -0.4]  # mixed signs
# Per-sequence shift of log(pi/pi_old) in the off-policy case, chosen so that both
# clipping sides fire at token and at sequence level: row 0 (A > 0) above 1 + eps_high,
# row 1 (A < 0) below 1 - eps_low; per-token noise moves some tokens of other rows out too.
OFF_POLICY_SHIFT = [0.4, -0.4, 0.1, -0.05, 0.0, 0.15]
DTYPE = torch.float64
METRIC_RTOL = 1e-6  # both sides reduce metrics in float32 (grpokit's token_mean, TRL's mask.sum().float())


class _Accelerator:
    """Single-process stand-in for ``accelerate.Accelerator``: every collective is the identity."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


def make_trl_trainer(*, loss_type, beta, epsilon_low, epsilon_high, importance_level, top_entropy_quantile=1.0):
    trainer = object.__new__(GRPOTrainer)
    # exactly the attributes _compute_loss reads, as GRPOTrainer.__init__ would set them
    vars(trainer).update(
        loss_type=loss_type, beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
        importance_sampling_level=importance_level, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=None, use_vllm=False, vllm_importance_sampling_correction=False,
        aux_loss_enabled=False, _entropy_bonus_enabled=False, max_completion_length=T,
        current_gradient_accumulation_steps=1, _metrics=defaultdict(lambda: defaultdict(list)),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        model=SimpleNamespace(training=True), accelerator=_Accelerator(),
    )
    return trainer


def make_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]).long()  # [N, T], right-padded
    probs = torch.rand(N, T, generator=g, dtype=DTYPE) * 0.9 + 0.05
    logp = probs.log()
    ref = logp + 0.3 * torch.randn(N, T, generator=g, dtype=DTYPE)
    noise = 0.15 * torch.randn(N, T, generator=g, dtype=DTYPE)
    # old = logp - shift, so log(pi / pi_old) = shift + noise
    old_off = logp - torch.tensor(OFF_POLICY_SHIFT, dtype=DTYPE)[:, None] - noise
    # >= 0 like entropies; float32 as a model's are (TRL takes the quantile in float32 and
    # compares it with the entropies in their own dtype)
    entropy = torch.rand(N, T, generator=g, dtype=torch.float32) * 2.0
    adv = torch.tensor(ADVANTAGES, dtype=DTYPE)
    return SimpleNamespace(mask=mask, logp=logp, ref=ref, old_off=old_off, entropy=entropy, adv=adv)


def run_trl(trainer, batch, *, off_policy: bool):
    """TRL's loss, the gradient w.r.t. its own leaf copy of the log-probs, and its train metrics."""
    logp = batch.logp.clone().requires_grad_(True)
    entropy = batch.entropy.clone()
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (logp, entropy, None)
    inputs = {
        "prompt_ids": torch.zeros(N, 2, dtype=torch.long),
        "prompt_mask": torch.ones(N, 2, dtype=torch.long),
        "completion_ids": torch.ones(N, T, dtype=torch.long),
        "completion_mask": batch.mask,
        "advantages": batch.adv,
        # None: TRL uses per_token_logps.detach(), i.e. the on-policy case
        "old_per_token_logps": batch.old_off if off_policy else None,
        "ref_per_token_logps": batch.ref,
        "num_items_in_batch": batch.mask.sum(),
    }
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), logp.grad, metrics


def run_grpokit(batch, *, off_policy: bool, mask=None, **kwargs):
    logp = batch.logp.clone().requires_grad_(True)
    old = batch.old_off if off_policy else logp.detach()
    mask = batch.mask if mask is None else mask
    norms = BatchNorms(sequences=N, tokens=float(batch.mask.sum()), max_completion_length=T)
    loss, metrics = policy_loss(logp, old, batch.adv, mask, norms, ref_logprobs_nT=batch.ref, kl_estimator="k3", **kwargs)
    loss.backward()
    return loss.detach(), logp.grad, metrics


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]
LEVELS = ["token", "sequence"]
BETAS = [0.0, 0.04]
EPSILONS = [pytest.param(0.2, 0.2, id="eps_sym"), pytest.param(0.2, 0.28, id="eps_clip_higher")]
POLICIES = [pytest.param(False, id="on_policy"), pytest.param(True, id="off_policy")]


@pytest.mark.parametrize("off_policy", POLICIES)
@pytest.mark.parametrize("epsilon_low, epsilon_high", EPSILONS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("importance_level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_policy_loss_matches_trl(loss_type, importance_level, beta, epsilon_low, epsilon_high, off_policy):
    batch = make_batch()
    cfg = dict(loss_type=loss_type, beta=beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    trainer = make_trl_trainer(importance_level=importance_level, **cfg)
    trl_loss, trl_grad, trl_metrics = run_trl(trainer, batch, off_policy=off_policy)
    loss, grad, metrics = run_grpokit(batch, off_policy=off_policy, importance_level=importance_level, **cfg)

    torch.testing.assert_close(loss, trl_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-10, atol=1e-12)
    assert grad.abs().sum() > 0
    assert grad[batch.mask == 0].abs().max() == 0  # padding gets no gradient
    if beta > 0:
        assert metrics["kl"] == pytest.approx(trl_metrics["kl"], rel=METRIC_RTOL)
        assert metrics["kl"] > 0
    else:
        assert "kl" not in trl_metrics and metrics["kl"] == 0.0
    if off_policy:  # the off-policy batch must exercise clipping, on both sides
        assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0
        assert metrics["clip_frac_low"] > 0 and metrics["clip_frac_high"] > 0
    else:  # weight exactly 1: nothing clipped
        assert trl_metrics["clip_ratio/region_mean"] == 0 and metrics["clip_frac"] == 0


@pytest.mark.parametrize("importance_level", LEVELS)
@pytest.mark.parametrize("off_policy", POLICIES)
@pytest.mark.parametrize("epsilon_low, epsilon_high", EPSILONS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_clip_metrics_match_trl(loss_type, epsilon_low, epsilon_high, importance_level, off_policy):
    batch = make_batch()
    cfg = dict(loss_type=loss_type, beta=0.0, epsilon_low=epsilon_low, epsilon_high=epsilon_high)
    trainer = make_trl_trainer(importance_level=importance_level, **cfg)
    _, _, trl_metrics = run_trl(trainer, batch, off_policy=off_policy)
    _, _, metrics = run_grpokit(batch, off_policy=off_policy, importance_level=importance_level, **cfg)
    for ours, theirs in [("clip_frac_low", "low_mean"), ("clip_frac_high", "high_mean"), ("clip_frac", "region_mean")]:
        assert metrics[ours] == pytest.approx(trl_metrics[f"clip_ratio/{theirs}"], rel=METRIC_RTOL, abs=1e-12), ours


@pytest.mark.parametrize("q", [0.2, 0.5, 1.0])
def test_high_entropy_mask_matches_trl(q):
    batch = make_batch()
    trainer = make_trl_trainer(loss_type="grpo", beta=0.0, epsilon_low=0.2, epsilon_high=0.2, importance_level="token")
    ours = high_entropy_mask(batch.entropy, batch.mask, q)
    theirs = trainer.get_high_entropy_mask(batch.entropy, batch.mask, 1 - q)
    assert ours.dtype == torch.bool
    torch.testing.assert_close(ours, theirs)
    assert not ours[batch.mask == 0].any()
    if q >= 1.0:
        torch.testing.assert_close(ours, batch.mask.bool())
    else:
        assert 0 < ours.sum() < batch.mask.sum()


# TRL multiplies only the clipped policy term by the entropy mask (before adding beta * KL,
# which stays on every completion token), still normalises by the completion mask, and takes
# the sequence-level importance weight over the completion mask: grpokit's ``policy_mask_nT``.
@pytest.mark.parametrize("off_policy", POLICIES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("importance_level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("q", [0.2, 0.5])
def test_top_entropy_loss_matches_trl(q, loss_type, importance_level, beta, off_policy):
    batch = make_batch()
    cfg = dict(loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28)
    trainer = make_trl_trainer(importance_level=importance_level, top_entropy_quantile=q, **cfg)
    trl_loss, trl_grad, _ = run_trl(trainer, batch, off_policy=off_policy)
    keep = high_entropy_mask(batch.entropy, batch.mask, q)
    loss, grad, _ = run_grpokit(batch, off_policy=off_policy, importance_level=importance_level,
                                policy_mask_nT=keep, **cfg)
    torch.testing.assert_close(loss, trl_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-10, atol=1e-12)
    # the selection really dropped tokens; without KL and at token level they get no gradient
    dropped = batch.mask.bool() & ~keep
    assert dropped.any()
    if beta == 0 and importance_level == "token":
        assert grad[dropped].abs().max() == 0
