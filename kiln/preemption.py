"""Pre-emption: a SIGTERM (what schedulers and spot instances send before they kill) becomes a request that a
training loop honours at the end of its current step, by writing a checkpoint and stopping with `Preempted`.
The next run of the stage resumes from that checkpoint.

    with Preemption() as preemption:
        while step < steps:
            ...one step...
            if preemption.requested:
                path = save()
                raise Preempted(f"... checkpoint {path}")

Python delivers signals to the main thread only, so the handler is installed only there (elsewhere SIGTERM keeps
its default action and the latest periodic checkpoint is what a rerun resumes from).
"""

from __future__ import annotations

import signal
import threading


class Preempted(RuntimeError):
    """A training stage stopped on SIGTERM after writing a checkpoint."""


class Preemption:
    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
