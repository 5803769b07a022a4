"""Many processes, one run: the ranks a launcher started, and the few collectives the trainer needs.

``accelerate launch`` and ``torchrun`` start N copies of ``grpokit train`` with ``RANK`` /
``WORLD_SIZE`` in their environment; ``World.from_environment`` joins them through accelerate's
``PartialState`` (gloo on CPU, NCCL on GPUs), and a single process gets a ``World`` of one whose
collectives return their input, so the trainer has one code path.

What crosses ranks is small: each rank samples and scores its share of the step's prompts (whole
groups), then the raw reward values, counts and metrics are gathered so every rank computes the
batch-wide statistics (reward normalisation, advantages, token counts) from the whole batch, the
same numbers a single process would; gradients are summed, since each rank's loss is already its
share of the global loss. Rank 0 alone writes the run directory.

No silent hangs: every collective names its stage. Before entering one a rank records
``(stage, step)`` in the launcher's key-value store; when a collective fails (a rank died, or
stalled past ``training.distributed_timeout_s``), the error says which rank was last seen
where.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from grpokit.errors import GrpokitError, TrainingError

log = logging.getLogger(__name__)


def launched_world_size() -> int:
    """How many processes the launcher started (1 when none did)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class World:
    """This process's place among the run's processes; a single process is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    timeout_s: float = 600.0
    step: int = 0  # the step being run, for the stage records
    _store: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_environment(cls, timeout_s: float) -> "World":
        """Join the launcher's processes, or a World of one when there is no launcher."""
        if launched_world_size() <= 1:
            return cls(timeout_s=timeout_s)
        from accelerate import PartialState

        # without CUDA, accelerate joins the launcher's processes only when told it runs on CPUs (gloo)
        state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_s))
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
        world = cls(rank=state.process_index, size=state.num_processes, timeout_s=timeout_s, _store=store)
        log.info("process %d of %d (%s backend)", world.rank, world.size, dist.get_backend())
        return world

    def share(self, count: int) -> slice:
        """This rank's contiguous block of ``count`` items (prompts): the first ``count % size`` ranks
        take one more, so the blocks in rank order are the items in order."""
        base, extra = divmod(count, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    # ------------------------------------------------------------------ collectives

    def mark(self, stage: str) -> None:
        """Record that this rank is now at ``stage`` (of step ``self.step``): a rank that stalls there is
        named with it by the ranks waiting for it."""
        if self._store is not None:
            self._store.set(f"grpokit/stage/{self.rank}", f"{stage} (step {self.step})")


    def _failed(self, stage: str, exc: BaseException) -> TrainingError:
        seen = []
        for rank in range(self.size):
            if rank == self.rank:
                continue
            try:
                self._store.set_timeout(timedelta(seconds=2))
                where = self._store.get(f"grpokit/stage/{rank}").decode()
            except Exception:  # the store itself lives in a rank that may be gone
                where = "unknown (its process is gone)"
            seen.append(f"rank {rank} was last at {where}")
        return TrainingError(
            f"rank {self.rank} waited at {stage} (step {self.step}) and the other processes did not all arrive: "
            f"{'; '.join(seen)}. A rank died or stalled for over training.distributed_timeout_s = "
            f"{self.timeout_s:g} s ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "The last checkpoint is intact; fix the stalled stage (a reward, an environment) and continue with "
            "--resume, or raise the timeout if that stage is only slow")

    def gather(self, value: Any, stage: str) -> list[Any]:
        """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        self.mark(stage)
        out: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, value)
        except Exception as exc:  # gloo/NCCL raise RuntimeError subclasses (DistBackendError, timeouts)
            raise self._failed(stage, exc) from None
        return out

    def sum_(self, tensor: torch.Tensor, stage: str) -> torch.Tensor:
        """Sum ``tensor`` over ranks, in place (every rank gets the same sum)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        self.mark(stage)
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        except Exception as exc:
            raise self._failed(stage, exc) from None
        return tensor

    def sum_gradients(self, parameters: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``parameters`` over ranks: each rank's loss is its share of the global
        loss, so the sum is the gradient of the whole batch. One flat buffer, one collective; a rank with
        nothing to train on this step contributes zeros."""
        if not self.distributed:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
        flat = self.sum_(torch.cat([g.reshape(-1).float() for g in grads]), "the gradient sum")
        offset = 0
        for p, g in zip(parameters, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def agree(self, flag: bool, stage: str) -> bool:
        """Whether any rank says yes (a stop signal reached one of them)."""
        return bool(self.sum_(torch.tensor([float(flag)]), stage).item()) if self.distributed else flag

    def broadcast(self, value: Any, stage: str) -> Any:
        """Rank 0's ``value`` on every rank."""
        return self.gather(value if self.is_main else None, stage)[0]

    def barrier(self, stage: str) -> None:
        self.gather(None, stage)

    def close(self) -> None:
        """Leave the process group. Exiting without it lets gloo's threads be torn down during interpreter
        shutdown, which can abort the process ("terminate called without an active exception") after the
        run has finished."""
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    def on_main(self, stage: str, fn):
        """``fn()`` run by rank 0 alone (writing the run directory, deciding what to resume), its result
        given to every rank. Its error stops every rank: rank 0 raises it, the others a quiet copy (the
        CLI prints it once, from rank 0)."""
        if not self.distributed:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except GrpokitError as exc:
                error = exc
        result, error = self.broadcast((result, error), stage)
        if error is not None:
            if self.is_main:
                raise error
            raise FollowerError(f"rank 0 stopped at {stage}: {error}")
        return result


class FollowerError(GrpokitError):
    """Another rank's error, already reported by rank 0: this rank exits without printing it again."""

    reported_elsewhere = True


class SilentLogger:
    """What a rank other than 0 logs through: nothing (rank 0 writes metrics, samples and trackers)."""

    def metrics(self, row: dict) -> None:
        pass

    def samples(self, step: int, rows: list[dict]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass
