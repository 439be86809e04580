"""Decoding helpers: images by content (never by extension), trimaps, content hashes.

Colour handling of :func:`to_rgb` (documented once, used everywhere):

- ``RGB``: as is. ``L``, ``1``: grey replicated to three channels. ``CMYK``, ``YCbCr``,
  ``LAB``, ``HSV``: PIL's own conversion.
- Modes with alpha (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry, ...) are
  **composited on white**, as an image viewer shows them. (The release's one RGBA image,
  ``Abyssinian_5``, has alpha 255 everywhere, so this equals dropping the alpha.)
- 16/32-bit and float modes (``I;16``, ``I``, ``F``): scaled linearly from [0, max] to
  [0, 255] (``I;16`` by its 16-bit range), then replicated.

EXIF orientation is deliberately **not** applied: the trimaps of the release were drawn on
the stored pixel grid, so rotating the image would misalign it with its annotation.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def to_rgb(image: Image.Image) -> np.ndarray:
    """Convert a decoded PIL image of any mode to an (H, W, 3) uint8 RGB array.

    Args:
        image: a PIL image (it is loaded if not yet).

    Returns:
        (H, W, 3) uint8 array.
    """
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image, dtype=np.uint8)
    if (mode == "P" and "transparency" in image.info) or mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(values.max()), 1e-12)
        grey = np.clip(np.round(values / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def open_image(path: Path) -> Image.Image:
    """``PIL.Image.open`` whose decompression-bomb refusal is a ``ValueError``.

    PIL raises ``DecompressionBombError`` (a plain ``Exception``, not an ``OSError``) for a
    header claiming more than twice ``Image.MAX_IMAGE_PIXELS``; as a ``ValueError`` it meets
    the ``except (OSError, ValueError, ...)`` of every caller, like any other unreadable file.

    Raises:
        OSError, ValueError, SyntaxError, PIL.UnidentifiedImageError: unreadable header.
    """
    try:
        return Image.open(path)
    except Image.DecompressionBombError as error:
        raise ValueError(f"image too large to decode safely ({error})") from error


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise ValueError(f"image too large to decode safely ({error})") from error


def decode_image(path: Path) -> np.ndarray:
    """Fully decode an image file (format sniffed from its bytes) to (H, W, 3) uint8 RGB.

    Raises:
        OSError, ValueError, SyntaxError, PIL.UnidentifiedImageError: the file cannot be
            decoded (callers turn these into a :class:`~datasets.DatasetError` or an
            exclusion); a decompression bomb is a ``ValueError``.
    """
    with open_image(path) as image:
        _load(image)
        return to_rgb(image)


def trimap_array(image: Image.Image) -> np.ndarray:
    """The raw values of a trimap image as a 2-D uint8 array.

    Grey (``L``), palette (``P``: the indices, not the colours) and 16-bit modes give their
    stored values; a colour trimap is accepted only if its channels are equal.

    Raises:
        ValueError: a colour image whose channels differ, or values beyond 255.
    """
    values = np.asarray(image)
    if values.ndim == 3:
        if values.shape[2] >= 3 and not (
            np.array_equal(values[:, :, 0], values[:, :, 1])
            and np.array_equal(values[:, :, 0], values[:, :, 2])
        ):
            raise ValueError(f"trimap is a colour image (mode {image.mode}), not a label map")
        values = values[:, :, 0]
    if values.dtype != np.uint8:
        if values.size and (values.min() < 0 or values.max() > 255):
            raise ValueError(f"trimap values span {values.min()}..{values.max()}, beyond 0..255")
        values = values.astype(np.uint8)
    return values


def read_trimap(path: Path) -> np.ndarray:
    """Read a trimap file to a 2-D uint8 array of its raw values (see :func:`trimap_array`).

    Raises:
        OSError, ValueError, SyntaxError, PIL.UnidentifiedImageError: unreadable file (a
            decompression bomb is a ``ValueError``).
    """
    with open_image(path) as image:
        _load(image)
        return trimap_array(image)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class FileHashes:
    """SHA-256 of files, cached in memory by path, size and modification time.

    A dataset's fingerprint hashes every file it serves; a second fingerprint in the same
    process re-reads only the files that changed.
    """

    def __init__(self) -> None:
        self._seen: dict[Path, tuple[int, int, str]] = {}

    def __call__(self, path: Path) -> str:
        """The hex SHA-256 of ``path`` (recomputed when its size or mtime changed)."""
        stat = path.stat()
        cached = self._seen.get(path)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = file_sha256(path)
        self._seen[path] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest
