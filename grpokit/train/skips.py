"""One rule for skipped updates, shared by the GRPO loop and the supervised loop (SFT, reward model).

An update whose loss or gradient norm is not finite is skipped: one NaN step would poison the
weights and AdamW's moments for good, while a rare overflow is harmless to drop. Skips that keep
coming mean the run itself has gone wrong, so ``training.max_consecutive_skips`` of them in a row
(the same key and default in every recipe kind) end it with a ``TrainingError``. A good update
resets the count. The schedule does not advance on a skipped update.
"""

from __future__ import annotations

import logging

from grpokit.errors import TrainingError

log = logging.getLogger(__name__)


def count_skips(skipped: bool, in_a_row: int, step: int, limit: int, remedy: str) -> int:
    """Updates skipped in a row after ``step`` (0 after a good one); raise once ``limit`` are.

    ``remedy`` ends the message: what is intact and how to go on, which differs between a loop
    that checkpoints (GRPO) and one that saves only at the end (SFT, reward model).
    """
    if not skipped:
        return 0
    in_a_row += 1
    log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row; %d stop the run, "
                "training.max_consecutive_skips)", step, in_a_row, limit)
    if in_a_row >= limit:
        raise TrainingError(f"step {step}: the loss or gradient was not finite in {in_a_row} consecutive steps "
                            f"(training.max_consecutive_skips = {limit}), so each update was skipped; {remedy}")
    return in_a_row
