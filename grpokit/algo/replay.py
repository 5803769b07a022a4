"""A replay buffer of whole GRPO groups: keep the most informative, mix them into later steps.

GRPO discards every rollout after one update, and groups whose G rewards are all equal
carry no signal at all. Replay variants (e.g. RePO, arXiv:2506.09340) reuse earlier
samples to raise the number of useful updates per generated token. What is implemented
here is the simplest group-level form:

- the buffer keeps the ``capacity`` groups with the largest mean |advantage| (ties:
  newer step first, since older samples drift further off-policy); groups with no
  reward spread (score 0) are never stored;
- each step, ``replay_count(P, ratio)`` of its P prompt groups are drawn uniformly
  without replacement from the buffer, the rest are freshly sampled (at least one).

Departures from RePO: a replayed group is reused whole with the advantages computed
when it was generated (RePO retrieves off-policy completions per prompt and estimates
their advantages separately); selection is by score, not by recency or reward strategy.
Groups keep their sampling-time log-probs, but the trainer recomputes "old" log-probs under
the current policy, so replayed samples get no importance correction for their staleness.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

import torch

@dataclass
class ReplayGroup:
    """One prompt's G completions, everything needed to train on them again."""

    prompt_ids_GP: torch.Tensor  # [G, P] left-padded, the same prompt repeated
    prompt_mask_GP: torch.Tensor  # [G, P] 1 on real prompt tokens
    completion_ids_GC: torch.Tensor  # [G, C] right-padded
    completion_mask_GC: torch.Tensor  # [G, C] 1 up to and including EOS
    truncated_G: torch.Tensor  # [G] bool: hit max_new_tokens without EOS
    rewards_G: torch.Tensor  # [G] float total rewards
    advantages_G: torch.Tensor  # [G] float, as computed at generation time
    row: dict  # the dataset row (prompt, answer, ...)
    step: int  # training step that generated it
    loss_mask_GC: torch.Tensor | None = None  # [G, C] tokens the policy generated (None: the completion mask)
    sampling_logprobs_GC: torch.Tensor | None = None  # [G, C] log-probs at sampling time, when the sampler gave them
    prompt_inputs: dict | None = None  # a vision-language prompt's image inputs (processor output), else None
    completion_inputs_G: list[dict] | None = None  # each completion's observation images (multi-turn), else None

    @property
    def score(self) -> float:
        """Mean |advantage|: how much gradient signal the group still carries."""
        return self.advantages_G.float().abs().mean().item()


def _rank(group: ReplayGroup) -> tuple[float, int]:
    """Sort key, larger is better: higher score, then newer step (less off-policy)."""
    return group.score, group.step


class ReplayBuffer:
    """The ``capacity`` highest-scoring groups seen so far, ranked best first."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"replay capacity must be >= 1 groups, got {capacity}")
        self.capacity = capacity
        self._groups: list[ReplayGroup] = []

    def __len__(self) -> int:
        return len(self._groups)

    def add(self, groups: list[ReplayGroup]) -> None:
        """Merge ``groups`` in and evict down to capacity by rank.

        Zero-score groups are dropped: replaying them would cost a forward and backward
        for exactly no gradient. ``sorted`` is stable, so groups equal in score and step
        keep insertion order (those already stored first).
        """
        informative = [g for g in groups if g.score > 0.0]  # NaN scores fail this too
        self._groups = sorted(self._groups + informative, key=_rank, reverse=True)[:self.capacity]

    def sample(self, k: int, generator: torch.Generator | random.Random) -> list[ReplayGroup]:
        """``min(k, len)`` distinct groups, uniformly without replacement; the buffer keeps them.

        Uniform rather than score-weighted: the buffer already holds only top-scoring
        groups, and weighting again would replay the same few groups step after step.
        """
        if k < 0:
            raise ValueError(f"cannot sample {k} groups from the replay buffer")
        k = min(k, len(self._groups))
        if isinstance(generator, random.Random):
            picks = generator.sample(range(len(self._groups)), k)
        else:
            picks = torch.randperm(len(self._groups), generator=generator)[:k].tolist()
        return [self._groups[i] for i in picks]

    def stats(self) -> dict[str, float]:
        """Metrics for the step log (``replay/mean_score`` is 0.0 while empty)."""
        scores = [g.score for g in self._groups]
        return {"replay/size": float(len(scores)),
                "replay/mean_score": sum(scores) / len(scores) if scores else 0.0}

    def state_dict(self) -> dict:
        """Plain tensors, dicts and ints, so ``torch.save(..., weights_only=True)`` can load it."""
        groups = [{f.name: getattr(g, f.name) for f in fields(ReplayGroup)} for g in self._groups]
        return {"capacity": self.capacity, "groups": groups}

    def load_state_dict(self, state: dict) -> None:
        """Restore the saved groups in their saved order.

        This buffer's own capacity stands (the recipe may have changed it since); with
        the same capacity the contents are restored exactly.
        """
        self._groups = []
        self.add([ReplayGroup(**saved) for saved in state["groups"]])


def replay_count(prompts_per_step: int, ratio: float) -> int:
    """How many of a step's P groups come from the buffer: round(P * ratio), at most P - 1.

    The cap keeps at least one fresh group per step, so the buffer keeps receiving
    samples from the current policy and the run cannot go fully off-policy.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"replay ratio must be in [0, 1), got {ratio}")
    if prompts_per_step < 1:
        raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
    return min(round(prompts_per_step * ratio), prompts_per_step - 1)


def groups_from_batch(prompt_ids_NP: torch.Tensor, prompt_mask_NP: torch.Tensor, completion_ids_NC: torch.Tensor,
                      completion_mask_NC: torch.Tensor, truncated_N: torch.Tensor, rewards_N: torch.Tensor,
                      advantages_N: torch.Tensor, rows: list[dict], group_size: int, step: int,
                      loss_mask_NC: torch.Tensor | None = None,
                      sampling_logprobs_NC: torch.Tensor | None = None,
                      prompt_inputs_N: list[dict] | None = None,
                      completion_inputs_N: list[dict] | None = None) -> list[ReplayGroup]:
    """Split an ``N = B*G`` batch into B groups; rows ``[i*G, (i+1)*G)`` belong to ``rows[i]``.

    Every tensor is cloned, so later in-place edits of the batch cannot reach the buffer
    (and a stored slice does not keep the whole batch's storage alive). Padding shared
    by the whole group is trimmed: the batch was padded to its widest group, and a
    stored group should cost only its own width when it is replayed.
    """
    G = group_size
    if prompt_ids_NP.size(0) != len(rows) * G:
        raise ValueError(f"{prompt_ids_NP.size(0)} sequences do not match {len(rows)} rows x group size {G}")
    groups = []
    for i, row in enumerate(rows):
        rows_G = slice(i * G, (i + 1) * G)
        prompt_mask_GP = prompt_mask_NP[rows_G]  # [G, P]
        completion_mask_GC = completion_mask_NC[rows_G]  # [G, C]
        # prompts are left-padded: real tokens sit in the last `prompt_width` columns
        prompt_cols = slice(prompt_mask_GP.size(1) - int(prompt_mask_GP.sum(dim=1).max()), None)
        # completions are right-padded: real tokens sit in the first `completion_width` columns
        completion_cols = slice(0, int(completion_mask_GC.sum(dim=1).max()))
        groups.append(ReplayGroup(
            prompt_ids_GP=prompt_ids_NP[rows_G, prompt_cols].clone(),
            prompt_mask_GP=prompt_mask_GP[:, prompt_cols].clone(),
            completion_ids_GC=completion_ids_NC[rows_G, completion_cols].clone(),
            completion_mask_GC=completion_mask_GC[:, completion_cols].clone(),
            truncated_G=truncated_N[rows_G].clone(),
            rewards_G=rewards_N[rows_G].clone(),
            advantages_G=advantages_N[rows_G].clone(),
            row=dict(row), step=step,  # a copy: the dataset's row may be reused
            loss_mask_GC=None if loss_mask_NC is None else loss_mask_NC[rows_G, completion_cols].clone(),
            sampling_logprobs_GC=(None if sampling_logprobs_NC is None
                                  else sampling_logprobs_NC[rows_G, completion_cols].clone()),
            # per-prompt inputs are never padded or edited in place, so the group shares them
            prompt_inputs=None if prompt_inputs_N is None else prompt_inputs_N[i * G],
            completion_inputs_G=None if completion_inputs_N is None else completion_inputs_N[rows_G]))
    return groups
