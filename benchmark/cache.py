"""Content-addressed stage outputs, atomic writes and completion markers.

A stage's output ``X`` lives beside a marker ``X.done.json`` that holds its size and SHA-256.
Outputs are written to a temporary file in the same folder and renamed into place
(``os.replace`` is atomic on POSIX); the marker is written the same way, last. A stage is done
only when its marker exists and the output matches the marker's size and checksum: a file that
was truncated or altered on disk is detected, reported with a warning naming it, and
recomputed. A crash or SIGKILL therefore loses at most the stage in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def stable_hash(obj: Any, length: int = 16) -> str:
    """SHA-256 of the canonical JSON of ``obj``, truncated to ``length`` hex digits."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file + fsync + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write text atomically."""
    atomic_write_bytes(path, text.encode())


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".done.json")


def write_with_marker(path: Path, data: bytes, meta: dict[str, Any] | None = None) -> None:
    """Write an output atomically, then its completion marker (size, SHA-256, metadata)."""
    atomic_write_bytes(path, data)
    marker = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "meta": meta or {},
    }
    atomic_write_text(_marker(path), json.dumps(marker, indent=1, default=str))


def read_marker(path: Path) -> dict[str, Any] | None:
    """The completion marker of ``path`` if the output is complete and intact, else None.

    A marker whose output is missing, of the wrong size or with the wrong checksum is reported
    (a warning naming the file) and treated as absent, so the stage is recomputed.
    """
    marker = _marker(path)
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        logger.warning("cache marker %s is unreadable; recomputing", marker)
        return None
    if not path.is_file():
        logger.warning("cache file %s is missing although marked done; recomputing", path)
        return None
    size = path.stat().st_size
    if size != info.get("size"):
        logger.warning(
            "cache file %s has %d bytes, expected %s (truncated?); recomputing",
            path,
            size,
            info.get("size"),
        )
        return None
    if file_sha256(path) != info.get("sha256"):
        logger.warning("cache file %s does not match its checksum (altered?); recomputing", path)
        return None
    return info


def invalidate(path: Path) -> None:
    """Remove an output and its marker (marker first, so no half state is ever 'done')."""
    for p in (_marker(path), path):
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


def cached_tensors(
    path: Path, compute: Callable[[], dict[str, Any]], force: bool = False
) -> tuple[dict[str, Any], bool]:
    """Return (tensors, reused): load a complete cached stage, else compute and save it."""
    if not force and read_marker(path) is not None:
        try:
            return load_tensors(path), True
        except Exception as exc:  # a corrupt file that kept its checksum is impossible,
            logger.warning("cannot load %s (%s); recomputing", path, exc)  # but be safe
    invalidate(path)
    result = compute()
    save_tensors(path, result)
    return result, False
