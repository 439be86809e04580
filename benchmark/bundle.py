"""The data every run of a command shares: dataset, split, image cache, split indices.

:func:`prepare_data` loads (or generates) the dataset, makes and saves the split and builds the
image cache once per command; :class:`DataBundle` hands each split part to methods as an
:class:`~methods.base.ImageSet` and to the evaluator as original-resolution GT masks.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

import datasets
from benchmark import cache as bcache
from benchmark.config import RunConfig
from datasets.conventions import CONVENTIONS
from methods.base import ImageSet

logger = logging.getLogger(__name__)


class Dataset(Protocol):
    """What the runner uses of a dataset object (see :class:`datasets.OxfordPet`)."""

    num_classes: int
    exclusions: list[Any]

    def fingerprint(self) -> str:
        """A hash of the files and labels the dataset serves."""
        ...


@dataclass
class DataBundle:
    """The dataset, its split, the image cache and the indices of each split part.

    Attributes:
        dataset: the dataset object (its labels, fingerprint and exclusions).
        split: the split (image names per part, its sha256).
        cache: the image cache at the working resolution (images, labels, masks).
        index: split part -> positions of its images in the cache.
        size: the working resolution S (images are S x S).
    """

    dataset: Dataset
    split: datasets.Split
    cache: datasets.ImageCache
    index: dict[str, np.ndarray]
    size: int

    @property
    def multiclass(self) -> bool:
        """True on a multi-label dataset (tags (N, C) and class masks 0..C, 255)."""
        return np.ndim(self.cache.labels) == 2

    @property
    def class_names(self) -> list[str]:
        """The dataset's class names (``class_0``, ... when it names none)."""
        names = getattr(self.dataset, "class_names", None)
        return list(names) if names else [f"class_{i}" for i in range(self.dataset.num_classes)]

    def imageset(self, part: str, masks: bool = False, boxes: bool = False) -> ImageSet:
        """The ImageSet of a split part; masks (:attr:`mask_convention`), boxes when asked."""
        idx = self.index[part]
        contiguous = len(idx) and np.all(np.diff(idx) == 1)
        sel: Any = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
        return ImageSet(
            images=self.cache.images[sel],
            labels=np.asarray(self.cache.labels)[sel],
            num_classes=self.dataset.num_classes,
            names=[self.cache.names[i] for i in idx],
            masks=np.asarray(self.cache.masks(self.mask_convention))[sel] if masks else None,
            boxes=self.boxes(idx) if boxes else None,
        )

    def boxes(self, idx: np.ndarray) -> np.ndarray:
        """(N, 4) float32 head boxes of cache positions ``idx`` at the working resolution.

        Scaled from the image's original size (the cache squashes every image to S x S);
        NaN rows where the dataset has no box (Oxford Pet: test images, some trainval ones).
        """
        out = np.full((len(idx), 4), np.nan, dtype=np.float32)
        read = getattr(self.dataset, "head_box", None)
        record = getattr(self.dataset, "record", None)
        if not callable(read) or not callable(record):
            return out
        for row, i in enumerate(idx):
            box = read(record(self.cache.names[int(i)]))
            if box is not None:
                h, w = (float(v) for v in self.cache.orig_sizes[int(i)])
                sx, sy = self.size / w, self.size / h
                out[row] = (box[0] * sx, box[1] * sy, (box[2] + 1) * sx, (box[3] + 1) * sy)
        return out

    @property
    def mask_convention(self) -> str | None:
        """How working-resolution masks are read: ``pet``, or None (class masks as stored)."""
        return None if self.multiclass else "pet"

    def orig_masks(self, part: str, convention: str | None) -> Iterator[np.ndarray]:
        """Original-resolution GT masks of a split part under a convention (None: classes)."""
        for i in self.index[part]:
            yield self.cache.orig_mask(int(i), convention)


def prepare_data(cfg: RunConfig) -> DataBundle:
    """Load (or generate) the dataset, make and save the split, build the image cache."""
    out = Path(cfg.out)
    params: dict[str, Any] = {}
    generated = {"synthetic": "synthetic", "synthetic_voc": "synthetic-voc"}
    folder = generated.get(cfg.dataset.replace("-", "_"))
    if folder is not None:
        params["preset"] = "tiny" if cfg.preset == "tiny" else "quick"
        if cfg.data_root is None:
            params["root"] = out / "data" / f"{folder}-{params['preset']}"
    if cfg.data_root is not None:
        params["root"] = Path(cfg.data_root)
    dataset = datasets.create_dataset(cfg.dataset, **params)
    for exc in dataset.exclusions:
        logger.warning("excluded %s (%s): %s", exc.name, exc.file, exc.reason)
    # a dataset with its own protocol (VOC: train_aug / train / val) makes its split itself
    make = getattr(dataset, "make_split", None)
    if not callable(make):
        make = functools.partial(datasets.make_split, dataset)
    split = make(scheme=cfg.split, val_fraction=cfg.val_fraction, seed=cfg.base_seed)
    split.save(out / "splits" / f"{cfg.dataset}-{cfg.split}-{split.sha256[:12]}.json")
    names = list(split.train) + list(split.val) + list(split.test)
    try:
        cache = datasets.build_cache(dataset, names, cfg.size, out / "cache")
    except OSError as exc:
        if not bcache.is_disk_full(exc):
            raise
        what = f"building the image cache {exc.filename or out / 'cache'}"
        raise bcache.disk_full_error(exc, what, out / "cache") from exc
    position = {n: i for i, n in enumerate(cache.names)}
    for reason in cache.excluded:
        logger.warning("left out of the image cache: %s", reason)
    write_manifest(out / "data" / f"{cfg.dataset}-manifest.json", dataset, cache)
    index = {
        part: np.array([position[n] for n in getattr(split, part) if n in position], dtype=np.int64)
        for part in ("train", "val", "test")
    }
    return DataBundle(dataset=dataset, split=split, cache=cache, index=index, size=cfg.size)


def write_manifest(path: Path, dataset: Dataset, cache: datasets.ImageCache) -> None:
    """Write the data manifest: counts, classes and every excluded file with its reason.

    ``excluded`` comes from the dataset's validation, ``cache_excluded`` from the image cache
    (files that changed after validation). Written atomically; read it with ``json.load``.
    """
    check = getattr(dataset, "check", None)
    info: dict[str, Any] = check() if callable(check) else {}
    info["cache_excluded"] = list(cache.excluded)
    info["cached_images"] = len(cache.names)
    bcache.atomic_write_text(path, dump_json(info))


def orig_gts(bundle: DataBundle, part: str) -> Iterator[tuple[np.ndarray, ...]]:
    """Per image of a split part, its original-resolution GT under each of :data:`CONVENTIONS`."""
    return zip(*(bundle.orig_masks(part, c) for c in CONVENTIONS))


def dump_json(obj: Any) -> str:
    """Compact, key-sorted JSON (values it cannot encode are written as strings)."""
    return json.dumps(obj, sort_keys=True, default=str)
