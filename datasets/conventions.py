"""Trimap conventions and the one error type for unusable datasets.

Oxford-IIIT Pet trimaps hold 1 = pet, 2 = background, 3 = border ("not classified").
Every evaluation turns a trimap into a binary mask with 0 = negative, 1 = positive and
255 = ignore, under one of three named conventions:

- ``pet`` (primary): pet = 1, background = 0, border = 255 (ignored).
- ``pet_with_border``: pet or border = 1, background = 0 (the CCAM paper's convention).
- ``weaktr_refinery``: positive = background + border (trimap 2 or 3) = 1, pet = 0. This is
  the inverted convention behind the johnamit/weaktr-refinery README table: its "IoU" is a
  background IoU. Offered only to reproduce and explain that published number.

Each convention is a :class:`Convention` record. A prediction is always made once, as a pet
prediction (``pet map >= t``); a convention only says which GT pixels count and which side of
that prediction is positive (:func:`positive_prediction`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

#: Names accepted by :func:`trimap_to_mask`; the first is the primary convention.
CONVENTIONS: tuple[str, ...] = ("pet", "pet_with_border", "weaktr_refinery")

#: Trimap values of the Oxford-IIIT Pet release.
TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER = 1, 2, 3

#: Mask value of ignored pixels.
IGNORE = 255


@dataclass(frozen=True)
class Convention:
    """How one convention turns a trimap into a binary mask, and which side is positive.

    Attributes:
        name: the convention's name (one of :data:`CONVENTIONS`).
        pet: mask value of trimap pet pixels (0, 1 or :data:`IGNORE`).
        background: mask value of trimap background pixels.
        border: mask value of trimap border pixels.
    """

    name: str
    pet: int
    background: int
    border: int

    @property
    def description(self) -> str:
        """What is positive and what is ignored, in words (for tables and reports)."""
        side = {1: "positive", 0: "negative", IGNORE: "ignored"}
        return (
            f"pet {side[self.pet]}, background {side[self.background]}, border {side[self.border]}"
        )

    @property
    def positive_is_background(self) -> bool:
        """True where the positive class is the background side (``weaktr_refinery``)."""
        return self.background == 1


_RECORDS: dict[str, Convention] = {
    c.name: c
    for c in (
        Convention("pet", pet=1, background=0, border=IGNORE),
        Convention("pet_with_border", pet=1, background=0, border=1),
        Convention("weaktr_refinery", pet=0, background=1, border=1),
    )
}

# Lookup tables indexed by the trimap value (0..255); values other than 1/2/3 map to IGNORE.
_LUTS: dict[str, np.ndarray] = {}
for _name, _c in _RECORDS.items():
    _lut = np.full(256, IGNORE, dtype=np.uint8)
    _lut[[TRIMAP_PET, TRIMAP_BACKGROUND, TRIMAP_BORDER]] = (_c.pet, _c.background, _c.border)
    _LUTS[_name] = _lut


class DatasetError(Exception):
    """A dataset (or one of its files) is unusable; the message says which file and why."""


def get_convention(name: str) -> Convention:
    """The :class:`Convention` record of a name.

    Raises:
        ValueError: unknown convention (the message lists the valid ones).
    """
    if name not in _RECORDS:
        raise ValueError(f"unknown trimap convention {name!r}; valid: {', '.join(CONVENTIONS)}")
    return _RECORDS[name]


def positive_prediction(pet: np.ndarray, convention: str) -> np.ndarray:
    """A convention's positive-class prediction from the one binary pet prediction.

    Every convention scores the same prediction (``map >= t`` on the pet map): conventions
    differ only in which GT pixels count and which side is positive, so that a pixel exactly on
    the threshold is pet under every convention.

    Args:
        pet: bool array, True where pet is predicted.
        convention: one of :data:`CONVENTIONS`.

    Returns:
        bool array of the same shape: ``pet``, or its complement where the positive class is
        the background side.
    """
    pet = np.asarray(pet, dtype=bool)
    return ~pet if get_convention(convention).positive_is_background else pet


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
