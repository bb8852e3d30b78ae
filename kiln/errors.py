"""Which stage failures are permanent: the one list the flow's retry policy and the torchrun launcher both read."""

from __future__ import annotations

from kiln.preemption import Preempted

# Failures a retry cannot fix (bad config or data, a NaN loss, a missing or existing input, pre-emption): the stage
# fails once with its one-line message and keeps its last good checkpoint. Anything else (I/O, a lost GPU, a
# dropped connection) is transient and retried, resuming from that checkpoint.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FloatingPointError, FileNotFoundError, FileExistsError, KeyError, TypeError, Preempted)


def is_permanent(error: BaseException) -> bool:
    return isinstance(error, PERMANENT_ERRORS)


def permanent_class(error: BaseException) -> type[BaseException] | None:
    """The class in PERMANENT_ERRORS that error is an instance of (a ShardError is a ValueError), else None."""
    return next((cls for cls in PERMANENT_ERRORS if isinstance(error, cls)), None)
