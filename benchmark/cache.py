"""Content-addressed stage outputs, atomic writes and completion markers.

A stage's output ``X`` lives beside a marker ``X.done.json`` that holds its size and SHA-256.
Outputs are written to a temporary file in the same folder and renamed into place
(``os.replace`` is atomic on POSIX); the marker is written the same way, last. A stage is done
only when its marker exists and the output matches the marker's size and checksum: a file that
was truncated or altered on disk is detected, reported with a warning naming it, and
recomputed. A crash or SIGKILL therefore loses at most the stage in flight.

Concurrency: several ``run`` processes may share one output folder. Integrity never depends on
locks (every file appears whole, by rename, and is trusted only through its marker); a lock
file beside each output (:func:`output_lock`, ``filelock``, released by the OS when a process
dies) only makes the second process wait and reuse the first one's result instead of computing
it again and replacing the file under the other's feet.

A write that fails because the disk is full raises :class:`DiskFullError` naming the file; the
temporary file is removed and whatever was complete before stays complete.

A marker is trusted only when it is a JSON object with the fields this module writes, of the
right types; anything else (``[]``, ``null``, a string, a wrong type) is a missing marker: a
warning names it and the stage is recomputed. Markers vouch for bytes, not for meaning: callers
that load a cached array check it against what they expect (:func:`load_checked_array`: shape
against the split, dtype, value range), so a well-formed file of the wrong shape is recomputed
too, never used.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout

from benchmark import faults
from methods.common.weights import file_sha256  # one implementation

logger = logging.getLogger(__name__)

_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class OutputError(OSError):
    """An output (stage, result file, image cache) could not be written; the message names it.

    Completed stages and stored rows are kept; the CLI prints the message as one line.
    """


class DiskFullError(OutputError):
    """No space left (or quota exceeded) while writing an output; the message names the file."""


def is_disk_full(exc: BaseException) -> bool:
    """True for an OSError meaning "no space left on device" or "disk quota exceeded"."""
    return isinstance(exc, OSError) and exc.errno in _FULL


def disk_full_error(exc: OSError, what: str, where: Path) -> DiskFullError:
    """A :class:`DiskFullError` for ``exc`` (ENOSPC / EDQUOT) raised while writing ``what``.

    Args:
        exc: the original error.
        what: what was written, naming the file (``"writing X (N bytes)"``).
        where: the folder that needs free space.
    """
    return DiskFullError(
        exc.errno,
        f"disk full ({exc.strerror or os.strerror(exc.errno or errno.ENOSPC)}) while {what}; "
        f"free space under {where} and run again: completed stages and results are kept",
    )


def stable_hash(obj: Any, length: int = 16) -> str:
    """SHA-256 of the canonical JSON of ``obj``, truncated to ``length`` hex digits."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename).

    Raises:
        DiskFullError: the disk is full or the quota exceeded (the temporary file is removed).
    """
    view = memoryview(data)
    half = len(view) // 2
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(view[:half])
            f.flush()
            faults.point("write", str(path))  # test-only; see benchmark.faults
            f.write(view[half:])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and is_disk_full(exc):
            raise disk_full_error(exc, f"writing {path} ({len(data)} bytes)", path.parent) from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write text atomically."""
    atomic_write_bytes(path, text.encode())


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".done.json")


def write_with_marker(path: Path, data: bytes, meta: dict[str, Any] | None = None) -> None:
    """Write an output atomically, then its completion marker (size, SHA-256, metadata)."""
    atomic_write_bytes(path, data)
    faults.point("marker", str(path))  # test-only; see benchmark.faults
    marker = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "meta": meta or {},
    }
    atomic_write_text(_marker(path), json.dumps(marker, indent=1, default=str))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def marker_problem(info: Any) -> str | None:
    """Why a parsed marker is not one :func:`write_with_marker` writes (None when it is).

    Expected: ``{"size": int >= 0, "sha256": 64 hex digits, "meta": {...}}``, where ``meta``
    may hold ``cost`` (names to numbers) and ``budget_hit`` (a bool), as the runner writes them.
    """
    if not isinstance(info, dict):
        return f"not a JSON object but {type(info).__name__}"
    size, digest, meta = info.get("size"), info.get("sha256"), info.get("meta")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return f"bad size {size!r}"
    if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
        return f"bad sha256 {digest!r}"[:120]
    if not isinstance(meta, dict):
        return f"bad meta of type {type(meta).__name__}"
    cost = meta.get("cost", {})
    if not isinstance(cost, dict) or not all(_is_number(v) for v in cost.values()):
        return "bad meta.cost (expected names to numbers)"
    if not isinstance(meta.get("budget_hit", False), bool):
        return "bad meta.budget_hit (expected true or false)"
    return None


def read_marker(path: Path) -> dict[str, Any] | None:
    """The completion marker of ``path`` if the output is complete and intact, else None.

    A marker that is unreadable or malformed (see :func:`marker_problem`), or whose output is
    missing, of the wrong size or with the wrong checksum, is reported (a warning naming the
    file) and treated as absent, so the stage is recomputed.
    """
    marker = _marker(path)
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        logger.warning("cache marker %s is unreadable; recomputing", marker)
        return None
    problem = marker_problem(info)
    if problem is not None:
        logger.warning("cache marker %s is malformed (%s); recomputing", marker, problem)
        return None
    if not path.is_file():
        logger.warning("cache file %s is missing although marked done; recomputing", path)
        return None
    size = path.stat().st_size
    if size != info["size"]:
        logger.warning(
            "cache file %s has %d bytes, expected %s (truncated?); recomputing",
            path,
            size,
            info["size"],
        )
        return None
    if file_sha256(path) != info["sha256"]:
        logger.warning("cache file %s does not match its checksum (altered?); recomputing", path)
        return None
    return info


def output_lock(path: Path) -> FileLock:
    """A lock (file ``.NAME.lock`` beside ``path``) held while an output is checked or computed.

    Acquire it with ``with output_lock(path):``; the lock is released when the block ends or the
    process dies. It is not reentrant across separate calls for the same path.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(f".{path.name}.lock")))


@contextlib.contextmanager
def computing(path: Path) -> Iterator[FileLock]:
    """Hold :func:`output_lock` of ``path``, logging when another process holds it first."""
    lock = output_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process that is computing %s", path)
        lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def invalidate(path: Path) -> None:
    """Remove an output and its marker (marker first, so no half state is ever 'done').

    Temporary files left by a killed writer of ``path`` (``.NAME.*.tmp``) are removed too;
    call it while holding :func:`computing` of ``path``, so that no live writer owns them.
    """
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp")) if path.parent.is_dir() else []
    for p in (_marker(path), path, *stale):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def save_tensors(path: Path, tensors: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    """Save a dict of tensors (a state dict) with torch.save, atomically, with a marker."""
    buf = io.BytesIO()
    torch.save(tensors, buf)
    write_with_marker(path, buf.getvalue(), meta)


def load_tensors(path: Path) -> dict[str, Any]:
    """Load tensors saved by :func:`save_tensors` (``weights_only=True``: never plain pickle)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_array(path: Path, array: np.ndarray, meta: dict[str, Any] | None = None) -> None:
    """Save a numpy array as .npy, atomically, with a marker."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    write_with_marker(path, buf.getvalue(), meta)


def load_array(path: Path) -> np.ndarray:
    """Memory-map a .npy saved by :func:`save_array` (no pickle)."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def array_problem(
    array: np.ndarray,
    shape: Sequence[int | None],
    dtype: np.dtype | type,
    unit_range: bool = False,
) -> str | None:
    """Why a loaded array does not fit what the caller expects (None when it does).

    Args:
        array: the loaded array.
        shape: the expected shape; ``None`` entries accept any positive length.
        dtype: the expected dtype.
        unit_range: the values must be finite and in [0, 1] (maps, probabilities).
    """
    want = tuple(shape)
    fits = array.ndim == len(want) and all(
        (n > 0) if w is None else (n == w) for n, w in zip(array.shape, want)
    )
    if not fits or array.dtype != np.dtype(dtype):
        shown = "(" + ", ".join("*" if w is None else str(w) for w in want) + ")"
        return f"{array.dtype} {tuple(array.shape)}, expected {np.dtype(dtype)} {shown}"
    if unit_range:
        step = max(1, (1 << 24) // max(1, array[:1].size))  # about 16 M values per chunk
        for start in range(0, len(array), step):
            chunk = np.asarray(array[start : start + step])
            if not np.all((chunk >= 0) & (chunk <= 1)):  # NaN fails both comparisons
                return "values outside [0, 1] (or NaN)"
    return None


def load_checked_array(
    path: Path,
    shape: Sequence[int | None],
    dtype: np.dtype | type,
    what: str,
    unit_range: bool = False,
) -> np.ndarray | None:
    """Memory-map a cached .npy whose marker was checked; None (with a warning) if unusable.

    Unusable: unreadable (or a pickled object array, refused), or not of the expected shape,
    dtype or value range (see :func:`array_problem`); the caller recomputes it.
    """
    try:
        array = load_array(path)  # allow_pickle=False: an object array is refused
    except (OSError, ValueError) as exc:
        logger.warning("cannot load cached %s %s (%s); recomputing", what, path, exc)
        return None
    problem = array_problem(array, shape, dtype, unit_range)
    if problem is not None:
        logger.warning(
            "cached %s %s does not fit the run: %s (corrupt or replaced?); recomputing",
            what,
            path,
            problem,
        )
        return None
    return array


def cached_tensors(
    path: Path, compute: Callable[[], dict[str, Any]], force: bool = False
) -> tuple[dict[str, Any], bool]:
    """Return (tensors, reused): load a complete cached stage, else compute and save it."""
    with computing(path):
        if not force and read_marker(path) is not None:
            try:
                return load_tensors(path), True
            except Exception as exc:  # a corrupt file that kept its checksum is impossible,
                logger.warning("cannot load %s (%s); recomputing", path, exc)  # but be safe
        invalidate(path)
        result = compute()
        save_tensors(path, result)
        return result, False
