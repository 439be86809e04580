"""Shared fixtures: tiny generated data, the real Oxford-IIIT Pet sample, torch threads."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "oxford-pet-sample"

torch.set_num_threads(int(os.environ.get("WSSS_TEST_THREADS", "2")))


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """The 121-image real sample beside the checkout; skipped when absent."""
    if not (SAMPLE / "images").is_dir():
        pytest.skip(f"real Oxford-IIIT Pet sample not found at {SAMPLE} (shared/data beside repo)")
    return SAMPLE


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory):
    """The synthetic `tiny` dataset, generated once per session into a temp folder."""
    import datasets

    root = tmp_path_factory.mktemp("synthetic") / "tiny"
    return datasets.create_dataset("synthetic", root=root, preset="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_cache(tiny_dataset, tmp_path_factory: pytest.TempPathFactory):
    """An image cache of every usable tiny image at 64 px."""
    import datasets

    names = [r.name for r in tiny_dataset.records]
    return datasets.build_cache(tiny_dataset, names, 64, tmp_path_factory.mktemp("cache"))


@pytest.fixture()
def tiny_imageset(tiny_dataset, tiny_cache):
    """An ImageSet (no masks) of the tiny images, as a method's fit() would see it."""
    from methods.base import ImageSet

    return ImageSet(
        images=np.asarray(tiny_cache.images),
        labels=np.asarray(tiny_cache.labels),
        num_classes=tiny_dataset.num_classes,
        names=list(tiny_cache.names),
    )


@pytest.fixture()
def tiny_imageset_with_masks(tiny_imageset, tiny_cache):
    """The same ImageSet with `pet` masks, as references (uses_masks=True) see it."""
    tiny_imageset.masks = np.asarray(tiny_cache.masks("pet"))
    return tiny_imageset
