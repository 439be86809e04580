"""Seeded train / val / test splits, saved with a SHA-256 so every method sees the same one.

Schemes:

- ``official``: train and val carved from the release's ``trainval.txt`` (stratified by label,
  seeded); test = the release's ``test.txt``. Usable images listed in neither file are left out.
- ``weaktr_refinery``: the johnamit/weaktr-refinery split, reproduced exactly: every ``*.jpg``
  file in ``images/`` sorted by file name (as its ``scripts/split_data.py`` does), permuted by
  ``torch.randperm`` after seeding 42; the first ``int(0.2 * total)`` go to test, the rest to
  train. Unusable images are then dropped from both sides (the original kept them). Val is
  carved from that train part (stratified, with ``seed``); the original had no val split and
  tuned its threshold on test.

Only usable records ever appear. Val per label is ``round(val_fraction * n)``, at least one
image when the label has two or more (so a threshold can always be chosen on val) and never all
of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasets.conventions import DatasetError

logger = logging.getLogger(__name__)

SPLIT_SCHEMES: tuple[str, ...] = ("official", "weaktr_refinery")

#: Seed and test share of the weaktr-refinery split (fixed by that repository).
WEAKTR_SEED, WEAKTR_TEST_RATIO = 42, 0.2


@dataclass(frozen=True)
class Split:
    """Image names of each part of a split.

    Attributes:
        scheme: one of :data:`SPLIT_SCHEMES`.
        seed: the seed of the val carve (and of nothing else for ``weaktr_refinery``).
        val_fraction: fraction of each label's train pool put in val.
        train: image names, sorted.
        val: image names, sorted.
        test: image names, sorted.
        dataset: the dataset's registry name.
    """

    scheme: str
    seed: int
    val_fraction: float
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    dataset: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able content (without the hash)."""
        return {
            "scheme": self.scheme,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "dataset": self.dataset,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
        }

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`to_dict`."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def counts(self) -> dict[str, int]:
        """Number of images per part."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def save(self, path: str | Path) -> Path:
        """Write the split as JSON with its ``sha256`` inside (atomically); return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {**self.to_dict(), "sha256": self.sha256}
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Split:
        """Read a split saved by :meth:`save` and verify its hash.

        Raises:
            DatasetError: unreadable file, missing fields, or content that does not match its
                stored ``sha256`` (the file was altered).
        """
        path = Path(path)
        try:
            payload = json.loads(path.read_text())
            split = cls(
                scheme=str(payload["scheme"]),
                seed=int(payload["seed"]),
                val_fraction=float(payload["val_fraction"]),
                train=tuple(payload["train"]),
                val=tuple(payload["val"]),
                test=tuple(payload["test"]),
                dataset=str(payload["dataset"]),
            )
            stored = payload["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DatasetError(f"{path}: not a readable split file ({error!r})") from error
        if stored != split.sha256:
            raise DatasetError(
                f"{path}: split content does not match its stored sha256 "
                f"({stored[:12]}... stored, {split.sha256[:12]}... computed): the file was "
                "altered; re-create it with make_split()"
            )
        return split


def _carve_val(
    names: list[str], labels: dict[str, int], val_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
    """Stratified, seeded carve of val out of ``names``; returns (train, val)."""
    by_label: dict[int, list[str]] = defaultdict(list)
    for name in sorted(names):
        by_label[labels[name]].append(name)
    rng = np.random.default_rng(seed)
    train: list[str] = []
    val: list[str] = []
    for label in sorted(by_label):
        group = by_label[label]
        order = rng.permutation(len(group))
        n_val = int(math.floor(val_fraction * len(group) + 0.5))
        if val_fraction > 0 and len(group) >= 2:
            n_val = min(max(n_val, 1), len(group) - 1)
        else:
            n_val = 0
        val.extend(group[i] for i in order[:n_val])
        train.extend(group[i] for i in order[n_val:])
    return sorted(train), sorted(val)


def weaktr_refinery_test_files(file_names: list[str] | tuple[str, ...]) -> set[str]:
    """File names the weaktr-refinery repository puts in its test split.

    Args:
        file_names: names of the files in ``images/`` (only ``*.jpg`` are used, as there).

    Returns:
        The test file names (the first ``int(0.2 * total)`` of ``torch.randperm(total)``
        after ``torch.manual_seed(42)``).
    """
    import torch

    jpgs = sorted(f for f in file_names if f.endswith(".jpg"))
    generator = torch.Generator().manual_seed(WEAKTR_SEED)
    order = torch.randperm(len(jpgs), generator=generator).tolist()
    n_test = int(len(jpgs) * WEAKTR_TEST_RATIO)
    return {jpgs[i] for i in order[:n_test]}


def make_split(
    dataset: Any, scheme: str = "official", val_fraction: float = 0.1, seed: int = 0
) -> Split:
    """Make a seeded split of a dataset's usable images.

    Args:
        dataset: an ``OxfordPet``-like object (``records``, ``name``, ``image_file_names``).
        scheme: one of :data:`SPLIT_SCHEMES`.
        val_fraction: fraction of each label's train pool put in val, in [0, 1).
        seed: seed of the val carve.

    Returns:
        The :class:`Split`; identical inputs give an identical split (and hash).

    Raises:
        ValueError: unknown scheme or val_fraction out of range.
        DatasetError: the official scheme on a dataset without official lists.
    """
    if scheme not in SPLIT_SCHEMES:
        raise ValueError(f"unknown split scheme {scheme!r}; valid: {', '.join(SPLIT_SCHEMES)}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    records = list(dataset.records)
    labels = {r.name: r.label for r in records}
    if scheme == "official":
        pool = [r.name for r in records if r.official_split == "trainval"]
        test = sorted(r.name for r in records if r.official_split == "test")
        if not pool or not test:
            raise DatasetError(
                f"{dataset.name} at {dataset.root}: the official split needs usable images in "
                f"both annotations/trainval.txt and test.txt ({len(pool)} trainval, "
                f"{len(test)} test); use scheme='weaktr_refinery'"
            )
        left_out = len(records) - len(pool) - len(test)
        if left_out:
            logger.warning(
                "%s: %d usable images are in neither trainval.txt nor test.txt; left out",
                dataset.name,
                left_out,
            )
    else:
        test_files = weaktr_refinery_test_files(list(dataset.image_file_names))
        test = sorted(r.name for r in records if r.image_path.name in test_files)
        test_set = set(test)
        pool = [r.name for r in records if r.name not in test_set]
    train, val = _carve_val(pool, labels, val_fraction, seed)
    split = Split(
        scheme=scheme,
        seed=int(seed),
        val_fraction=float(val_fraction),
        train=tuple(train),
        val=tuple(val),
        test=tuple(test),
        dataset=dataset.name,
    )
    logger.info(
        "split %s of %s: %s, sha256 %s", scheme, dataset.name, split.counts(), split.sha256[:12]
    )
    return split
