"""What a rollout backend promises: the ``Sampler`` protocol and the ``Rollouts`` it returns.

The trainer, the evaluator and ``grpokit generate`` only ever talk to a sampler through
this contract, and build it through ``rollout.build_sampler`` (``rollout.backend`` in a
recipe), so another backend (a rollout server, a multi-turn environment driver) is an
addition here, not a change there.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Protocol, runtime_checkable

import torch

from grpokit.rollout.encoding import PromptBatch


@dataclass
class Rollouts:
    """N = B*G sequences; rows ``[i*G, (i+1)*G)`` are prompt i's samples.

    ``completion_mask_NC`` is what the model attends to after the prompt; ``loss_mask_NC`` is
    what the policy itself generated, the only tokens that may enter the loss. One turn: the
    two are equal. Several turns: environment and tool tokens sit in the completion (attended,
    masked 1) but not in the loss (0).
    """

    prompt_ids_NP: torch.Tensor  # [N, P] left-padded
    prompt_mask_NP: torch.Tensor  # [N, P] 1 on real prompt tokens
    completion_ids_NC: torch.Tensor  # [N, C] right-padded
    completion_mask_NC: torch.Tensor  # [N, C] 1 on tokens the model attends to, up to and including EOS
    truncated_N: torch.Tensor  # [N] bool: hit the length limit without EOS
    loss_mask_NC: torch.Tensor | None = None  # [N, C] 1 on tokens the policy generated; None: the completion mask
    # [N, C] fp32 log p(token) under the sampling model's own distribution at sampling time (0 off the loss
    # mask): an importance correction's denominator when a backend samples with other numerics
    sampling_logprobs_NC: torch.Tensor | None = None
    # [N] a vision-language prompt's image inputs as its processor gave them (one dict per prompt, shared
    # by reference across its group); None for a text model. The log-prob passes need them again.
    prompt_inputs_N: list[dict] | None = None
    # [N] the image inputs of a multi-turn completion's observations (a vision-language environment's),
    # one dict per sequence, empty for one without images; None when no completion holds an image
    completion_inputs_N: list[dict] | None = None
    # [N] a multi-turn episode per sequence (messages, steps, how it ended): what trajectory rewards read
    trajectories_N: list[dict] | None = None

    def __post_init__(self):
        if self.loss_mask_NC is None:
            self.loss_mask_NC = self.completion_mask_NC

    @property
    def completion_lengths_N(self) -> torch.Tensor:
        return self.completion_mask_NC.sum(dim=1)

    def completion_id_lists(self) -> list[list[int]]:
        """Each completion's generated token ids, padding dropped: TRL's ``completion_ids`` reward argument."""
        return [ids_C[mask_C.bool()].tolist() for ids_C, mask_C in zip(self.completion_ids_NC, self.completion_mask_NC)]

    def select(self, rows_M: torch.Tensor) -> "Rollouts":
        """The sequences at ``rows_M``, in that order."""
        return Rollouts(**{f.name: _pick(getattr(self, f.name), rows_M) for f in fields(self)})


def _pick(value, rows_M: torch.Tensor):
    if value is None or isinstance(value, torch.Tensor):
        return None if value is None else value[rows_M]
    return [value[i] for i in rows_M.tolist()]


def _pad_to(x_NW: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    missing = width - x_NW.size(1)
    if missing <= 0:
        return x_NW
    pad_NM = torch.full((x_NW.size(0), missing), value, dtype=x_NW.dtype, device=x_NW.device)
    return torch.cat([pad_NM, x_NW] if left else [x_NW, pad_NM], dim=1)


def _joined(parts: list[Rollouts], name: str, missing) -> list | None:
    """A per-sequence list field of every part in order, ``missing`` for a part without it; None if none has it."""
    if all(getattr(r, name) is None for r in parts):
        return None
    return [item for r in parts for item in (getattr(r, name) or [missing] * len(r.truncated_N))]


def concat_rollouts(parts: list[Rollouts], pad_id: int) -> Rollouts:
    """Stack rollouts of different widths: prompts re-padded on the left, completions on the right.
    Sampling log-probs survive only when every part has them (a replayed group may not)."""
    P = max(r.prompt_ids_NP.size(1) for r in parts)
    C = max(r.completion_ids_NC.size(1) for r in parts)
    sampled = all(r.sampling_logprobs_NC is not None for r in parts)
    return Rollouts(
        prompt_ids_NP=torch.cat([_pad_to(r.prompt_ids_NP, P, pad_id, left=True) for r in parts]),
        prompt_mask_NP=torch.cat([_pad_to(r.prompt_mask_NP, P, 0, left=True) for r in parts]),
        completion_ids_NC=torch.cat([_pad_to(r.completion_ids_NC, C, pad_id, left=False) for r in parts]),
        completion_mask_NC=torch.cat([_pad_to(r.completion_mask_NC, C, 0, left=False) for r in parts]),
        truncated_N=torch.cat([r.truncated_N for r in parts]),
        loss_mask_NC=torch.cat([_pad_to(r.loss_mask_NC, C, 0, left=False) for r in parts]),
        sampling_logprobs_NC=(torch.cat([_pad_to(r.sampling_logprobs_NC, C, 0.0, left=False) for r in parts])
                              if sampled else None),
        # a text prompt in a vision-language run has no image inputs (nor a text reply): an empty dict each
        prompt_inputs_N=_joined(parts, "prompt_inputs_N", {}),
        completion_inputs_N=_joined(parts, "completion_inputs_N", {}),
        # a replayed group keeps no trajectory: its rewards are stored, nothing rescores it
        trajectories_N=_joined(parts, "trajectories_N", None),
    )


@runtime_checkable
class Sampler(Protocol):
    """A rollout backend. One is built per job by ``rollout.build_sampler`` from ``rollout.backend``."""

    def generate(self, batch: PromptBatch, num_generations: int, greedy: bool = False) -> Rollouts:
        """``num_generations`` completions of each prompt of ``batch``, a prompt's group in adjacent rows."""
        ...

    def sync_weights(self, policy: Any) -> None:
        """Make the next ``generate`` sample from ``policy``'s current weights (called after each update)."""
        ...

    def state(self) -> dict:
        """Everything that decides future samples (random streams), for an exact resume."""
        ...

    def load_state(self, state: dict) -> None:
        """Put back what ``state`` returned."""
        ...
