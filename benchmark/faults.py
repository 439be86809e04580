"""Test-only fault injection, switched on by the ``WSSS_FAULT`` environment variable.

The reliability tests (``tests/test_faults.py``) use it to kill or break a run at a chosen point,
deterministically, in a subprocess or in-process. Outside tests the variable is unset and every
call of :func:`point` costs one environment lookup.

Format: ``ACTION@POINT[:PATTERN][#N]``, for example ``kill@step:segmenter-*`` or
``enospc@write:*/maps/val.npy#1``.

Actions:
    ``kill``: SIGKILL this process (no cleanup, no ``finally``: like a power cut or the OOM
    killer). ``oom``: raise ``torch.OutOfMemoryError``. ``enospc``: raise
    ``OSError(ENOSPC)`` (disk full). ``term`` / ``int``: send this process SIGTERM (a
    scheduler's cancel) / SIGINT (Ctrl-C); the CLI's handlers unwind it.

Points (the only places that call :func:`point`):
    ``step``: :meth:`benchmark.runner.RunContext.should_continue`, once per training step;
    the target is the stage in flight (``classifier``, ``segmenter-<key>-train``, ...).
    ``write``: :func:`benchmark.cache.atomic_write_bytes`, when half of the bytes have
    reached the temporary file; the target is the destination path.
    ``marker``: :func:`benchmark.cache.write_with_marker`, after the output was renamed into
    place and before its completion marker is written; the target is the output path.

``PATTERN`` is an :func:`fnmatch.fnmatch` pattern on the target (default ``*``); ``N`` fires at
the N-th matching call of this process (default 1, the first).
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import signal
from collections import Counter

logger = logging.getLogger(__name__)

ENV = "WSSS_FAULT"
ACTIONS = ("kill", "oom", "enospc", "term", "int")
POINTS = ("step", "write", "marker")

_hits: Counter[str] = Counter()


def parse(spec: str) -> tuple[str, str, str, int]:
    """Split ``ACTION@POINT[:PATTERN][#N]`` into (action, point, pattern, n).

    Raises:
        ValueError: an unknown action or point, or a malformed spec.
    """
    action, _, rest = spec.partition("@")
    rest, _, count = rest.partition("#")
    where, _, pattern = rest.partition(":")
    if action not in ACTIONS or where not in POINTS:
        raise ValueError(
            f"{ENV}={spec!r}: expected ACTION@POINT[:PATTERN][#N] with ACTION in {ACTIONS} "
            f"and POINT in {POINTS}"
        )
    return action, where, pattern or "*", int(count) if count else 1


def point(where: str, target: str) -> None:
    """Fire the configured fault if ``WSSS_FAULT`` names this point and the target matches."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, want, pattern, n = parse(spec)
    if want != where or not fnmatch.fnmatch(target, pattern):
        return
    _hits[spec] += 1
    if _hits[spec] != n:
        return
    logger.warning("%s: injecting %s at %s %s", ENV, action, where, target)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action in ("term", "int"):  # the handler runs as os.kill returns (main thread)
        os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
    if action == "oom":
        import torch

        raise torch.OutOfMemoryError(
            f"CUDA out of memory. Tried to allocate 2.00 GiB ({ENV} at {where} {target})"
        )
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), target)


def reset() -> None:
    """Forget the hit counts (tests that fire several faults in one process)."""
    _hits.clear()
