"""wsss-bench datasets: Oxford-IIIT Pet, PASCAL VOC 2012, synthetic generators, splits, a cache.

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
from datasets.synthetic_voc import SYNTHETIC_VOC_PRESETS, SyntheticVOC, generate_synthetic_voc
from datasets.voc import VOC2012, VocRecord
from datasets.voc_format import VOC_CLASSES, load_cls_labels

logger = logging.getLogger(__name__)

__all__ = [
    "CONVENTIONS",
    "SPLIT_SCHEMES",
    "SYNTHETIC_PRESETS",
    "SYNTHETIC_VOC_PRESETS",
    "DatasetError",
    "Exclusion",
    "ImageCache",
    "OxfordPet",
    "Record",
    "Split",
    "SyntheticPets",
    "SyntheticVOC",
    "VOC2012",
    "VOC_CLASSES",
    "VocRecord",
    "build_cache",
    "create_dataset",
    "generate_synthetic",
    "generate_synthetic_voc",
    "get_dataset",
    "list_datasets",
    "load_cls_labels",
    "make_split",
    "register_dataset",
    "trimap_to_mask",
]
