"""The policy update: micro-batches, the reference and old log-prob passes, mu optimiser passes.

Passes per generation batch: one reference forward when beta > 0; one "old policy"
forward when num_iterations > 1 (with mu == 1 the old log-probs are the detached
current ones, so that pass is skipped and the ratio is exactly 1); then mu passes of
forward + backward, each ending in one optimiser step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from grpokit.algo import BatchNorms, high_entropy_mask, policy_loss
from grpokit.errors import TrainingError
from grpokit.models.sharding import is_sharded
from grpokit.rollout import Rollouts, completion_logprobs
from grpokit.train.run import Run

METRIC_KEYS = ("loss", "kl", "clip_frac", "clip_frac_low", "clip_frac_high", "entropy")


@dataclass
class MicroBatch:
    rows_n: torch.Tensor  # [n] indices into the generation batch
    inputs: tuple  # prompt ids/mask, completion ids/mask (trimmed to the longest completion), image inputs
    mask_nC: torch.Tensor  # [n, C] tokens in the loss: the policy's own (truncated completions zeroed if asked)
    group_size: int  # G when the micro-batch holds whole groups (prompt computed once per group), else 1
    ref_logp_nC: torch.Tensor | None = None
    old_logp_nC: torch.Tensor | None = None


def split_micro_batches(rollouts: Rollouts, grad_accum: int, mask_truncated: bool, G: int) -> list[MicroBatch]:
    # the loss sees only tokens the policy generated; attention sees the whole completion
    mask_NC = rollouts.loss_mask_NC
    if mask_truncated:
        mask_NC = mask_NC * (~rollouts.truncated_N).long()[:, None]
    batches = []
    for rows_n in torch.arange(mask_NC.size(0)).chunk(grad_accum):
        if not rows_n.numel():  # a rank whose groups were all filtered out this step trains on nothing
            continue
        # drop columns that are padding in every row of this micro-batch
        width = max(int(rollouts.completion_mask_NC[rows_n].sum(dim=1).max()), 1)
        images, observed = rollouts.prompt_inputs_N, rollouts.completion_inputs_N
        inputs = (rollouts.prompt_ids_NP[rows_n], rollouts.prompt_mask_NP[rows_n],
                  rollouts.completion_ids_NC[rows_n, :width], rollouts.completion_mask_NC[rows_n, :width],
                  None if images is None else [images[i] for i in rows_n.tolist()],
                  None if observed is None else [observed[i] for i in rows_n.tolist()])
        whole_groups = rows_n[0] % G == 0 and rows_n.numel() % G == 0
        batches.append(MicroBatch(rows_n, inputs, mask_NC[rows_n, :width], G if whole_groups else 1))
    return batches


def align_passes(micro_batches: list[MicroBatch], world, G: int, device, pad_id: int) -> list[MicroBatch]:
    """FSDP: every rank runs the same passes the same way, since each forward and backward gathers and reduces
    the shards with the other ranks (unequal counts would hang; unlike paths, the prompt once per group on
    one rank and per row on another, would pair one block's gather with another's). A rank with fewer
    micro-batches (groups dropped by dynamic sampling, an uneven split) runs idle ones: one pad token a row,
    nothing in the loss (``rows_n`` empty)."""
    ranks = world.gather((len(micro_batches), all(mb.group_size == G for mb in micro_batches)),
                         "aligning the update's passes")
    group_size = G if all(whole for _, whole in ranks) else 1
    for mb in micro_batches:
        mb.group_size = group_size
    ids_n1 = torch.full((group_size, 1), pad_id, dtype=torch.long, device=device)
    idle = MicroBatch(torch.empty(0, dtype=torch.long), (ids_n1, torch.ones_like(ids_n1), ids_n1,
                                                         torch.ones_like(ids_n1), None, None),
                      torch.zeros_like(ids_n1), group_size)
    return micro_batches + [idle] * (max(count for count, _ in ranks) - len(micro_batches))


@torch.no_grad()
def fill_fixed_logprobs(policy, micro_batches: list[MicroBatch], need_ref: bool, need_old: bool) -> None:
    """Log-probs that stay fixed through the mu passes: reference, and the sampling-time policy."""
    for mb in micro_batches:
        if need_ref:
            with policy.reference_model() as reference, policy.autocast():
                mb.ref_logp_nC, _ = completion_logprobs(reference, *mb.inputs, group_size=mb.group_size)
        if need_old:
            with policy.autocast():
                mb.old_logp_nC, _ = completion_logprobs(policy.model, *mb.inputs, group_size=mb.group_size)


def check_finite_weights(parameters) -> None:
    """Finite loss and gradients can still give a non-finite step (an optimiser state or learning rate
    gone wrong); stop before such weights are sampled from or checkpointed, the last checkpoint intact."""
    # one host sync for all tensors, not one per tensor: this runs after every optimiser step
    if not torch.stack([torch.isfinite(p).all() for p in parameters]).all():
        raise TrainingError("the optimiser step made trainable weights non-finite (NaN or inf) although the loss "
                            "and gradients were finite; the weights in memory are lost, the last checkpoint is "
                            "intact. Lower training.learning_rate or check training.weight_decay, then resume")


def policy_update(run: Run, optimizer, scheduler, rollouts: Rollouts, advantages_N: torch.Tensor) -> dict[str, float]:
    """mu optimiser steps over the generation batch; metrics averaged over them.

    Each micro-batch's loss is its share of the full-batch loss (``BatchNorms``), so the
    summed gradient equals the full-batch gradient whatever ``grad_accum`` is.
    """
    policy, algo, training, world = run.policy, run.recipe.algorithm, run.recipe.training, run.world
    group_size = run.recipe.rollout.num_generations if run.recipe.rollout.share_prompt_prefix and not policy.gradient_checkpointing else 1
    world.mark("the policy update")
    micro_batches = split_micro_batches(rollouts, training.grad_accum, algo.mask_truncated_completions, group_size)
    if is_sharded(policy.model):
        micro_batches = align_passes(micro_batches, world, group_size, policy.device, policy.tokenizer.pad_token_id)
    # the batch-wide counts the loss is normalised by cover every rank's sequences and tokens
    counts = world.sum_(torch.tensor([float(advantages_N.size(0)), float(sum(mb.mask_nC.sum() for mb in micro_batches))],
                                     dtype=torch.float64), "counting the batch's tokens")
    norms = BatchNorms(sequences=int(counts[0]), tokens=float(counts[1]),
                       max_completion_length=run.recipe.rollout.max_completion_length)
    fill_fixed_logprobs(policy, micro_batches, need_ref=algo.beta > 0, need_old=algo.num_iterations > 1)
    epsilon_low, epsilon_high = algo.clip_range
    policy.model.train()
    totals = dict.fromkeys(METRIC_KEYS + ("grad_norm", "lr", "skipped_update"), 0.0)
    for _ in range(algo.num_iterations):
        for mb in micro_batches:
            share = mb.rows_n.numel() / norms.sequences
            with policy.autocast():
                logp_nC, entropy_nC = completion_logprobs(policy.model, *mb.inputs, with_entropy=True,
                                                          group_size=mb.group_size)
            if not mb.rows_n.numel():  # an idle pass (align_passes): it joins the other ranks' collectives
                logp_nC.sum().mul(0.0).backward()
                continue
            policy_mask = None
            if algo.top_entropy_quantile < 1.0:
                policy_mask = high_entropy_mask(entropy_nC, mb.mask_nC, algo.top_entropy_quantile)
            old_logp_nC = mb.old_logp_nC if mb.old_logp_nC is not None else logp_nC.detach()
            loss, metrics = policy_loss(
                logp_nC, old_logp_nC, advantages_N[mb.rows_n].to(logp_nC.device), mb.mask_nC, norms,
                ref_logprobs_nT=mb.ref_logp_nC, beta=algo.beta, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                loss_type=algo.loss_type, importance_level=algo.importance_level, kl_estimator=algo.kl_estimator,
                policy_mask_nT=policy_mask,
            )
            loss.backward()
            tokens = mb.mask_nC.sum().clamp(min=1)
            metrics["entropy"] = ((entropy_nC * mb.mask_nC).sum() / tokens).item()
            metrics["loss"] = loss.item() / share  # the micro-batch's own loss, for averaging below
            for key in METRIC_KEYS:
                totals[key] += share * metrics[key] / algo.num_iterations
        totals["lr"] += scheduler.get_last_lr()[0] / algo.num_iterations
        if not is_sharded(policy.model):  # FSDP's reduce-scatter summed them already (models/sharding.py)
            world.sum_gradients(policy.trainable_parameters())  # each rank's loss is its share: the sum is the batch's
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), training.max_grad_norm)
        totals["grad_norm"] += grad_norm.item() / algo.num_iterations
        finite = not world.agree(not math.isfinite(totals["loss"]), "checking the loss")  # all step, or none
        if finite and torch.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
            check_finite_weights(policy.trainable_parameters())
        else:  # one NaN step would poison the weights and AdamW's moments for good
            totals["skipped_update"] = 1.0
        optimizer.zero_grad(set_to_none=True)
    run.sampler.sync_weights(policy)  # the next rollout samples from the updated weights
    if world.distributed:  # the share-weighted metrics summed over ranks are the batch's
        summed = world.sum_(torch.tensor([totals[key] for key in METRIC_KEYS], dtype=torch.float64),
                            "averaging the update's metrics")
        totals.update(zip(METRIC_KEYS, summed.tolist()))
    return totals
