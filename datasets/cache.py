"""Decode-and-resize-once image cache: uint8 arrays memory-mapped from ``.npy`` files.

A cache holds, for an ordered list of image names of a dataset, at one working size S:

- ``images.npy``  (N, S, S, 3) uint8, PIL bilinear resize of the decoded RGB image (the aspect
  ratio is squashed; evaluation restores it, since original trimaps are kept);
- ``trimaps.npy`` (N, S, S) uint8, raw trimap values 1/2/3, PIL nearest resize (for a
  multi-class dataset such as ``voc2012``: its class masks, 0..C and 255, read through the
  same ``load_trimap``; :meth:`ImageCache.masks` with ``convention=None`` returns them as is);
- ``orig_trimaps.npy`` one flat uint8 array of every original-resolution trimap, with
  ``orig_offsets.npy`` (N + 1,) int64 and ``orig_sizes.npy`` (N, 2) int64 (H, W);
- ``labels.npy`` (N,) int64 (or (N, C) multi-hot when the records' ``label`` is a vector),
  ``names.json``; ``manifest.json`` (key and counts) written last.

The folder is ``root / key[:16]`` where ``key = sha256(dataset fingerprint, size, names)``: any
change of a file, a label, the size or the name list gives a new folder. It is built in a
temporary sibling and renamed into place (under a file lock) after the manifest is written,
so a folder with a manifest is complete, and a folder without one is rebuilt. A temporary
folder is removed whatever the failure (and one left by a killed build is removed by the next).

Integrity. The manifest holds a BLAKE2b checksum of every file, recorded at build time and
verified when the cache is opened (once per process and file version: path, size, mtime,
inode); a mismatch (bytes altered on disk) or a manifest without checksums is reported with a
warning naming the file and the cache is rebuilt by :func:`build_cache`.

Disk space. Every memory-mapped array file has all its blocks reserved
(``os.posix_fallocate``, or written zeros where that is unavailable) before it is mapped, so a
full disk is an ``OSError`` (ENOSPC, naming the file) raised up front, never a SIGBUS while
pixels are written into a sparse file.

Undecodable images. Datasets validate every image fully at construction (the default
``verify="full"``), so the builder normally never meets a bad file. If it does (a file changed
since, or ``verify="header"``), the image is **left out of the cache** with its reason in
``manifest["excluded"]`` / :attr:`ImageCache.excluded` and a warning; nothing crashes. Always
address cached images through :attr:`ImageCache.names` / :meth:`ImageCache.index`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from numpy.lib.format import dtype_to_descr, open_memmap, write_array_header_1_0
from PIL import Image

from datasets.conventions import DatasetError, trimap_to_mask

logger = logging.getLogger(__name__)

#: Bumped when the cache's content or layout changes (part of the key).
CACHE_VERSION = 1
MANIFEST = "manifest.json"
_ARRAYS = ("images", "trimaps", "orig_trimaps", "orig_offsets", "orig_sizes", "labels")
#: Files whose BLAKE2b checksums the manifest records.
CHECKED = (*(f"{name}.npy" for name in _ARRAYS), "names.json")
_CHUNK = 1 << 20
#: (folder, file versions) of caches verified by this process.
_verified: set[tuple[Any, ...]] = set()


def file_digest(path: Path) -> str:
    """BLAKE2b (hex) of a file's bytes."""
    h = hashlib.blake2b()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp(folder: Path) -> tuple[Any, ...]:
    """The identity of the current version of a cache folder's files (no content read)."""
    stats = [(folder / name).stat() for name in CHECKED]
    return (str(folder.resolve()), *((s.st_size, s.st_mtime_ns, s.st_ino) for s in stats))


def verify_checksums(folder: Path, manifest: dict[str, Any]) -> None:
    """Check every file of a cache folder against the checksums of its manifest.

    Done once per process and file version (see :func:`_stamp`).

    Raises:
        DatasetError: no checksums in the manifest, or a file that does not match (named).
        OSError: a file is missing or unreadable.
    """
    sums = manifest.get("checksums")
    if not isinstance(sums, dict) or set(sums) != set(CHECKED):
        raise DatasetError(f"{folder}: {MANIFEST} has no checksums (built by an older version?)")
    stamp = _stamp(folder)
    if stamp in _verified:
        return
    for name in CHECKED:
        if file_digest(folder / name) != sums[name]:
            raise DatasetError(
                f"{folder / name} does not match its checksum in {MANIFEST} (altered on disk?)"
            )
    _verified.add(stamp)


def reserve(path: Path, length: int) -> None:
    """Make ``path`` ``length`` bytes long with every block allocated (no sparse holes).

    Raises:
        OSError: no space (ENOSPC) or another error, with ``filename`` set to ``path``.
    """
    fd = os.open(path, os.O_RDWR)
    try:
        _allocate(fd, length)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
    finally:
        os.close(fd)


def _allocate(fd: int, length: int) -> None:
    """posix_fallocate where the OS and file system have it, else write the missing zeros."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None and length > 0:
        try:
            fallocate(fd, 0, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    start = os.fstat(fd).st_size  # the header; everything after it is written as zeros
    os.lseek(fd, start, os.SEEK_SET)
    zeros = bytes(min(_CHUNK, max(0, length - start)))
    for pos in range(start, length, _CHUNK):
        os.write(fd, zeros[: min(_CHUNK, length - pos)])


def new_array(path: Path, dtype: Any, shape: tuple[int, ...]) -> np.memmap:
    """A new zero-filled .npy file mapped for writing, its blocks reserved before mapping.

    Equivalent to ``open_memmap(path, "w+", dtype, shape)``, which extends the file sparsely:
    on a full disk its first write into a hole kills the process with SIGBUS.

    Raises:
        OSError: no space left for the whole file (``filename`` is ``path``).
    """
    dtype = np.dtype(dtype)
    header = {"descr": dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(shape)}
    with open(path, "wb") as f:
        write_array_header_1_0(f, header)
        length = f.tell() + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    reserve(path, length)
    return open_memmap(path, "r+")


def resize_image(rgb: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 image to (size, size, 3) with PIL bilinear (squashing)."""
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR))


def resize_trimap(trimap: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W) uint8 trimap to (size, size) with PIL nearest (values preserved)."""
    return np.asarray(Image.fromarray(trimap).resize((size, size), Image.Resampling.NEAREST))


def cache_key(dataset: Any, names: Sequence[str], size: int) -> str:
    """SHA-256 over the dataset fingerprint, the size, the ordered names and the cache version."""
    payload = {
        "fingerprint": dataset.fingerprint(),
        "size": int(size),
        "names": list(names),
        "version": CACHE_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class ImageCache:
    """A built cache, opened read-only from its folder (use :meth:`open` or :func:`build_cache`).

    Attributes:
        folder: the cache folder.
        manifest: the parsed ``manifest.json``.
        size: the working side S.
        names: image names, in cache order.
        images: (N, S, S, 3) uint8 memory map.
        trimaps: (N, S, S) uint8 memory map (values 1/2/3).
        labels: (N,) int64, or (N, C) multi-hot for a multi-label dataset.
        orig_sizes: (N, 2) int64, (H, W) of each original image.
        excluded: images requested but left out, as ``{"name", "file", "reason"}`` dicts.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.size = int(manifest["size"])
        arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in _ARRAYS}
        self.images: np.ndarray = arrays["images"]
        self.trimaps: np.ndarray = arrays["trimaps"]
        self._orig: np.ndarray = arrays["orig_trimaps"]
        self._offsets = np.asarray(arrays["orig_offsets"])
        self.orig_sizes: np.ndarray = np.asarray(arrays["orig_sizes"])
        self.labels: np.ndarray = np.asarray(arrays["labels"])
        self.names: tuple[str, ...] = tuple(json.loads((folder / "names.json").read_text()))
        self.excluded: list[dict[str, str]] = list(manifest.get("excluded", []))
        self._index = {name: i for i, name in enumerate(self.names)}
        self._masks: dict[str, np.ndarray] = {}
        n = len(self.names)
        shapes = {
            "images": (n, self.size, self.size, 3),
            "trimaps": (n, self.size, self.size),
            "orig_sizes": (n, 2),
            "labels": (n, *arrays["labels"].shape[1:2]),  # (N,) or (N, C)
            "orig_offsets": (n + 1,),
        }
        for key, shape in shapes.items():
            if arrays[key].shape != shape:
                raise DatasetError(
                    f"{folder}: {key}.npy has shape {arrays[key].shape}, expected {shape}; "
                    "delete the folder to rebuild the cache"
                )

    @classmethod
    def open(cls, folder: str | Path) -> ImageCache:
        """Open a complete cache folder.

        Raises:
            DatasetError: no manifest (an incomplete build), a file that does not match its
                checksum, or unreadable / inconsistent files.
        """
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as error:
            raise DatasetError(
                f"{folder}: not a complete image cache (no readable {MANIFEST}: {error})"
            ) from error
        if not isinstance(manifest, dict):
            raise DatasetError(f"{folder}: {MANIFEST} is not a JSON object")
        try:
            verify_checksums(folder, manifest)
            return cls(folder, manifest)
        except (OSError, ValueError, KeyError) as error:
            raise DatasetError(f"{folder}: unreadable image cache ({error})") from error

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"ImageCache({str(self.folder)!r}, n={len(self)}, size={self.size})"

    def index(self, name: str) -> int:
        """Position of image ``name`` in the cache.

        Raises:
            KeyError: not in the cache (the message says if it was excluded at build time).
        """
        try:
            return self._index[name]
        except KeyError:
            why = [e["reason"] for e in self.excluded if e["name"] == name]
            detail = f"left out at build: {why[0]}" if why else "not requested"
            raise KeyError(f"image {name!r} is not in the cache {self.folder} ({detail})") from None

    def orig_trimap(self, i: int) -> np.ndarray:
        """(H, W) uint8 original-resolution trimap of image ``i`` (a read-only view)."""
        h, w = (int(v) for v in self.orig_sizes[i])
        return self._orig[self._offsets[i] : self._offsets[i + 1]].reshape(h, w)

    def masks(self, convention: str | None = "pet") -> np.ndarray:
        """(N, S, S) uint8 masks (0 / 1 / 255) of the resized trimaps, computed once.

        ``convention=None``: the stored values as they are (class masks of a multi-class
        dataset: 0 background, 1..C, 255 ignored).
        """
        if convention is None:
            return np.asarray(self.trimaps)
        if convention not in self._masks:
            self._masks[convention] = trimap_to_mask(np.asarray(self.trimaps), convention)
        return self._masks[convention]

    def orig_mask(self, i: int, convention: str | None = "pet") -> np.ndarray:
        """(H, W) uint8 mask of image ``i`` at its original resolution (None: stored values)."""
        if convention is None:
            return np.asarray(self.orig_trimap(i))
        return trimap_to_mask(self.orig_trimap(i), convention)


def _write_arrays(
    folder: Path,
    dataset: Any,
    records: list[Any],
    size: int,
) -> tuple[list[str], list[dict[str, str]]]:
    """Decode, resize and write every record; returns (names kept, exclusions)."""
    n = len(records)
    sizes = np.array([dataset.image_size(r) for r in records], dtype=np.int64).reshape(n, 2)
    offsets = np.zeros(n + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(sizes[:, 0] * sizes[:, 1])
    images = new_array(folder / "images.npy", np.uint8, (n, size, size, 3))
    trimaps = new_array(folder / "trimaps.npy", np.uint8, (n, size, size))
    orig = new_array(folder / "orig_trimaps.npy", np.uint8, (int(offsets[-1]),))
    kept: list[int] = []
    excluded: list[dict[str, str]] = []
    for i, record in enumerate(records):
        try:
            rgb = dataset.load_image(record)
            trimap = dataset.load_trimap(record)
            if rgb.shape[:2] != trimap.shape or trimap.shape != tuple(sizes[i]):
                raise DatasetError(
                    f"{record.image_path}: image {rgb.shape[:2]} / trimap {trimap.shape} sizes "
                    f"differ from the validated size {tuple(sizes[i])} (files changed?)"
                )
        except DatasetError as error:
            reason = str(error)
            logger.warning("image cache: leaving out %s: %s", record.name, reason)
            excluded.append({"name": record.name, "file": str(record.image_path), "reason": reason})
            continue
        images[i] = resize_image(rgb, size)
        trimaps[i] = resize_trimap(trimap, size)
        orig[offsets[i] : offsets[i + 1]] = trimap.ravel()
        kept.append(i)
    labels = np.array([r.label for r in records], dtype=np.int64)
    if excluded:  # rare: compact every array to the kept rows
        keep = np.array(kept, dtype=np.int64)
        new_offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        new_offsets[1:] = np.cumsum(sizes[keep, 0] * sizes[keep, 1])
        for name, full in (("images", images), ("trimaps", trimaps)):
            part = new_array(folder / f"{name}.tmp.npy", np.uint8, (len(keep), *full.shape[1:]))
            for j, i in enumerate(keep):
                part[j] = full[i]
            part.flush()
            del part
        flat = new_array(folder / "orig_trimaps.tmp.npy", np.uint8, (int(new_offsets[-1]),))
        for j, i in enumerate(keep):
            flat[new_offsets[j] : new_offsets[j + 1]] = orig[offsets[i] : offsets[i + 1]]
        flat.flush()
        del flat, images, trimaps, orig
        for name in ("images", "trimaps", "orig_trimaps"):
            os.replace(folder / f"{name}.tmp.npy", folder / f"{name}.npy")
        sizes, offsets, labels = sizes[keep], new_offsets, labels[keep]
    else:
        for array in (images, trimaps, orig):
            array.flush()
        del images, trimaps, orig
    np.save(folder / "orig_offsets.npy", offsets)
    np.save(folder / "orig_sizes.npy", sizes)
    np.save(folder / "labels.npy", labels)
    names = [records[i].name for i in kept]
    (folder / "names.json").write_text(json.dumps(names))
    return names, excluded


def build_cache(dataset: Any, names: Sequence[str], size: int, root: str | Path) -> ImageCache:
    """Build (or reuse) the cache of ``names`` of ``dataset`` at ``size`` x ``size`` under ``root``.

    Args:
        dataset: an ``OxfordPet``-like dataset (``record``, ``load_image``, ``load_trimap``,
            ``image_size``, ``fingerprint``).
        names: image names, in the order the cache will hold them (no duplicates).
        size: the working side in pixels.
        root: folder holding cache folders.

    Returns:
        The opened :class:`ImageCache` (from ``root / key[:16]``).

    Raises:
        ValueError: duplicate names or a non-positive size.
        KeyError: a name that is not a usable image of the dataset.
    """
    names = list(names)
    if size <= 0:
        raise ValueError(f"cache size must be positive, got {size}")
    if len(set(names)) != len(names):
        raise ValueError("build_cache: duplicate image names")
    records = [dataset.record(name) for name in names]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(dataset, names, size)
    folder = root / key[:16]
    cache = _reuse(folder, key)
    if cache is not None:
        return cache
    with FileLock(str(root / f".{key[:16]}.lock")):
        cache = _reuse(folder, key, quiet=True)  # built by another process while we waited?
        if cache is not None:
            return cache
        for stale in root.glob(f".{key[:16]}.tmp-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        if folder.exists():
            logger.warning("image cache %s is incomplete or damaged; rebuilding", folder)
            shutil.rmtree(folder)
        count = _build(folder, key, dataset, records, size)
    logger.info("built image cache %s: %d images at %d px", folder, count, size)
    return ImageCache.open(folder)


def _reuse(folder: Path, key: str, quiet: bool = False) -> ImageCache | None:
    """The complete, intact cache of ``key`` in ``folder``, else None (a warning if damaged)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        return None
    try:
        return ImageCache.open(folder)
    except DatasetError as error:
        if not quiet:
            logger.warning("image cache unusable: %s", error)
        return None


def _build(folder: Path, key: str, dataset: Any, records: list[Any], size: int) -> int:
    """Build the cache in a temporary sibling of ``folder``, then rename it; returns its count.

    The temporary folder is removed on any failure (a full disk is an OSError naming the file).
    """
    tmp = folder.with_name(f".{key[:16]}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        kept, excluded = _write_arrays(tmp, dataset, records, size)
        manifest = {
            "key": key,
            "version": CACHE_VERSION,
            "dataset": dataset.name,
            "fingerprint": dataset.fingerprint(),
            "size": int(size),
            "requested": len(records),
            "count": len(kept),
            "excluded": excluded,
            "checksums": {name: file_digest(tmp / name) for name in CHECKED},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.rename(tmp, folder)
    except OSError as exc:  # name the file as it would be in the cache, not in the temp folder
        if not exc.filename or Path(exc.filename).parent != tmp:
            raise
        name = str(folder / Path(exc.filename).name)
        raise OSError(exc.errno, exc.strerror or str(exc), name) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _verified.add(_stamp(folder))  # just computed from these very files
    return len(kept)


def read_epoch_pil(dataset: Any, names: Sequence[str], size: int) -> np.ndarray:
    """The no-cache baseline: decode and resize every image with PIL, once.

    Returns:
        (N, size, size, 3) uint8, equal to what the cache stores for the same names.
    """
    out = np.empty((len(names), size, size, 3), dtype=np.uint8)
    for i, name in enumerate(names):
        out[i] = resize_image(dataset.load_image(dataset.record(name)), size)
    return out


def read_epoch_cache(cache: ImageCache) -> float:
    """Read every cached image pixel once (a contiguous copy, then a sum); return the sum.

    The copy makes the comparison with :func:`read_epoch_pil` (which produces an array) fair;
    the sum is a checksum that depends on every byte.
    """
    out = np.empty(cache.images.shape, dtype=np.uint8)
    np.copyto(out, cache.images)
    return float(out.sum(dtype=np.uint64))
