"""Trimap conventions and the one error type for unusable datasets.

Oxford-IIIT Pet trimaps hold 1 = pet, 2 = background, 3 = border ("not classified").
Every evaluation turns a trimap into a binary mask with 0 = negative, 1 = positive and
255 = ignore, under one of three named conventions:

- ``pet`` (primary): pet = 1, background = 0, border = 255 (ignored).
- ``pet_with_border``: pet or border = 1, background = 0 (the CCAM paper's convention).
- ``weaktr_refinery``: positive = background + border (trimap 2 or 3) = 1, pet = 0. This is
  the inverted convention behind the johnamit/weaktr-refinery README table: its "IoU" is a
  background IoU. Offered only to reproduce and explain that published number.
"""

from __future__ import annotations

import logging

import numpy as np

logger = logging.getLogger(__name__)

#: Names accepted by :func:`trimap_to_mask`; the first is the primary convention.
CONVENTIONS: tuple[str, ...] = ("pet", "pet_with_border", "weaktr_refinery")

#: Trimap values of the Oxford-IIIT Pet release.
TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3

#: Mask value of ignored pixels.
IGNORE = 255

# Lookup tables indexed by the trimap value (0..255); values other than 1/2/3 map to IGNORE.
_LUTS: dict[str, np.ndarray] = {}
for _name, (_pet, _bg, _border) in {
    "pet": (1, 0, IGNORE),
    "pet_with_border": (1, 0, 1),
    "weaktr_refinery": (0, 1, 1),
}.items():
    _lut = np.full(256, IGNORE, dtype=np.uint8)
    _lut[TRIMAP_PET], _lut[TRIMAP_BACKGROUND], _lut[TRIMAP_BORDER] = _pet, _bg, _border
    _LUTS[_name] = _lut


class DatasetError(Exception):
    """A dataset (or one of its files) is unusable; the message says which file and why."""


def trimap_to_mask(trimap: np.ndarray, convention: str = "pet") -> np.ndarray:
    """Turn an Oxford-IIIT Pet trimap into a binary mask under a named convention.

    Args:
        trimap: integer array of any shape with values 1 (pet), 2 (background), 3 (border).
            Any other value (which a validated dataset never holds) becomes 255 (ignore).
        convention: one of :data:`CONVENTIONS`.

    Returns:
        uint8 array of the same shape: 0 = negative, 1 = positive, 255 = ignore.

    Raises:
        ValueError: unknown convention (the message lists the valid ones).
    """
    if convention not in _LUTS:
        raise ValueError(
            f"unknown trimap convention {convention!r}; valid: {', '.join(CONVENTIONS)}"
        )
    trimap = np.asarray(trimap)
    if trimap.dtype != np.uint8:
        trimap = np.where((trimap >= 0) & (trimap <= 255), trimap, 0).astype(np.uint8)
    return _LUTS[convention][trimap]
