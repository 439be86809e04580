"""wsss-bench datasets: Oxford-IIIT Pet, a synthetic generator, splits and an image cache.

This package is ``datasets`` of the wsss-bench project, not the HuggingFace library of the
same name; ``tests/test_datasets.py`` checks that ``import datasets`` resolves here.
"""

from __future__ import annotations

import logging

from datasets.cache import ImageCache, build_cache
from datasets.conventions import CONVENTIONS, DatasetError, trimap_to_mask
from datasets.oxford_pet import Exclusion, OxfordPet, Record
from datasets.registry import create_dataset, get_dataset, list_datasets, register_dataset
from datasets.splits import SPLIT_SCHEMES, Split, make_split
from datasets.synthetic import SYNTHETIC_PRESETS, SyntheticPets, generate_synthetic

logger = logging.getLogger(__name__)

__all__ = [
    "CONVENTIONS",
    "SPLIT_SCHEMES",
    "SYNTHETIC_PRESETS",
    "DatasetError",
    "Exclusion",
    "ImageCache",
    "OxfordPet",
    "Record",
    "Split",
    "SyntheticPets",
    "build_cache",
    "create_dataset",
    "generate_synthetic",
    "get_dataset",
    "list_datasets",
    "make_split",
    "register_dataset",
    "trimap_to_mask",
]
