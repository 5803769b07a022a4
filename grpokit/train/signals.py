"""SIGINT/SIGTERM end a run cleanly: finish the step, write a checkpoint, exit 0.

Schedulers (Slurm, Kubernetes, a laptop's Ctrl-C) send SIGTERM or SIGINT before they kill;
the step in flight is finished instead of lost, and the run resumes exactly from there.
The trainer holds this handler from the end of setup (data, rewards, model loaded) to the
final checkpoint, so the step-0 evaluation, the final evaluation and the checkpoint writes
are covered too: whatever is in flight completes, then the run stops with a checkpoint.
During setup nothing is worth saving yet and the default action (exit) stands.
A second signal while the first is being honoured aborts at once (KeyboardInterrupt), for
a user who really means it.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulStop:
    """Context manager: ``requested`` becomes the signal's name once SIGINT or SIGTERM arrives."""

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: finishing the current step or evaluation, then writing a checkpoint "
                    "(send it again to abort now)", self.requested)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
