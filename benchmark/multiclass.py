"""The stages of a run on a multi-class dataset (PASCAL VOC 2012, ``synthetic_voc``).

The binary stages (:mod:`benchmark.stages`) threshold one pet map; here every method gives one
map per class (N, C, h, w), zero for the classes an image is not tagged with, and a pixel's
label is the argmax over a constant background score ``t`` and the tagged classes' maps
(:func:`benchmark.evaluate.labels_from_scores`; the background wins ties, as ``np.argmax`` over
``[t, M_1, ..., M_C]`` does in PSA, IRNet and WeakTr). In order:

1. :func:`pick_background`: ``t`` fixed (option or method) or chosen on validation by the
   one-pass mIoU curve (:class:`benchmark.evaluate.BackgroundCurve`), never on test;
2. :func:`make_label_masks`: pseudo labels (N, S, S) of the train images at the working
   resolution, a seeded ``gt_ratio`` share replaced by their GT class masks;
3. the shared segmenter with C + 1 outputs, trained on them; its test predictions are stored
   as labels (N, S, S) uint8 (argmax of the softmax);
4. :func:`score_label_stages`: one dataset-level (C + 1) x (C + 1) confusion matrix per
   (stage, split) at the original resolution: mIoU over the classes present, pixel accuracy,
   class-mean precision and recall, and the IoU of every class (metric ``iou:<class>``).

Rows carry ``convention = "multiclass"``; the trimap conventions of the Pet data do not apply.
Tag-only images (VOC's ``train_aug`` beyond ``train``) have all-ignored GT masks, so they count
in no score. Per-image values and the qualitative grid are binary-only for now.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812

from benchmark import cache as bcache
from benchmark.accounting import measure
from benchmark.bundle import DataBundle
from benchmark.config import RunConfig
from benchmark.context import RunContext
from benchmark.evaluate import (
    BackgroundCurve,
    accumulate_confusion,
    labels_from_scores,
    multiclass_metrics,
    upsample_scores,
)
from benchmark.stages import (
    ThresholdChoice,
    TrainMasks,
    segmenter_context,
    segmenter_problem,
)
from benchmark.supervision import gt_subset
from datasets.conventions import IGNORE
from methods.base import Method
from methods.common.segmenter import (
    SegmenterConfig,
    build_segmenter,
    predict_segmenter,
    train_segmenter,
)

logger = logging.getLogger(__name__)

#: The ``convention`` column of multi-class rows.
MULTICLASS = "multiclass"
#: Background thresholds of the validation curve (SEAM's ``--curve`` scans 0..0.60).
BACKGROUND_GRID = np.round(np.arange(0, 101) / 100, 2)
#: Whole-dataset metrics of a multi-class score (class means), in table order.
MULTICLASS_METRICS = ("miou", "accuracy", "precision", "recall")


def tags_of(bundle: DataBundle, part: str) -> np.ndarray:
    """(N, C) multi-hot tags of a split part."""
    return np.asarray(bundle.cache.labels)[bundle.index[part]]


def class_gts(bundle: DataBundle, part: str) -> Iterator[np.ndarray]:
    """Original-resolution GT class masks (0, 1..C, 255) of a split part."""
    return bundle.orig_masks(part, None)


# ---- 1. background threshold --------------------------------------------------------------------
def pick_background(
    cfg: RunConfig,
    method: Method,
    bundle: DataBundle,
    val_maps: np.ndarray,
    train_maps: np.ndarray,
) -> ThresholdChoice:
    """The background score: fixed (the option, then the method's own) or the best mIoU.

    The sweep runs on the validation split, or, with ``threshold_on="train_gt"`` (the
    literature's protocol, reproduced by name), on the train images' GT that the pseudo
    masks are then scored on: source ``train_gt``, never to be read as a held-out number.
    """
    if cfg.threshold is not None:
        return ThresholdChoice(cfg.threshold, "fixed")
    if method.fixed_threshold is not None:
        return ThresholdChoice(method.fixed_threshold, "method")
    part, maps = ("train", train_maps) if cfg.threshold_on == "train_gt" else ("val", val_maps)
    curve = BackgroundCurve(bundle.dataset.num_classes + 1, thresholds=BACKGROUND_GRID)
    for scores, tags, gt in zip(maps, tags_of(bundle, part), class_gts(bundle, part)):
        curve.add(np.asarray(scores, dtype=np.float32), tags, gt)
    value, _ = curve.best()
    frame = pd.DataFrame({"threshold": curve.thresholds, "miou": curve.miou()})
    return ThresholdChoice(value, "train_gt" if part == "train" else "val_sweep", frame)


# ---- 2. pseudo labels ---------------------------------------------------------------------------
def label_maps(maps: np.ndarray, tags: np.ndarray, threshold: float, size: int) -> np.ndarray:
    """(N, S, S) uint8 labels of class maps upsampled (bilinear) to the working size S."""
    out = np.empty((len(maps), size, size), dtype=np.uint8)
    for i, (scores, tag) in enumerate(zip(maps, tags)):
        up = upsample_scores(np.asarray(scores, dtype=np.float32), (size, size))
        out[i] = labels_from_scores(up[None], tag[None], threshold)[0]
    return out


def make_label_masks(
    cfg: RunConfig, bundle: DataBundle, method: Method, train_maps: np.ndarray, threshold: float
) -> TrainMasks:
    """Pseudo labels of the train images; a seeded, nested ``gt_ratio`` share from GT."""
    n_train = len(bundle.index["train"])
    replaced = gt_subset(n_train, cfg.gt_ratio, f"{bundle.split.sha256}|{cfg.base_seed}")
    gt_train = np.asarray(bundle.cache.masks(None))[bundle.index["train"]]
    if method.pseudo_from_gt:
        pseudo = gt_train.copy()
    else:
        tags = tags_of(bundle, "train")
        pseudo = label_maps(train_maps, tags, threshold, bundle.size)
        pseudo[replaced] = gt_train[replaced]
    rep = range(n_train) if method.pseudo_from_gt else (int(i) for i in replaced)
    return TrainMasks(pseudo, pseudo, replaced, {i: pseudo[i] for i in rep})


# ---- 3. the shared segmenter --------------------------------------------------------------------
def label_predictions(
    cfg: RunConfig,
    bundle: DataBundle,
    config: SegmenterConfig,
    ctx: RunContext,
    run_dir: Path,
    seg_key: str,
    masks: np.ndarray,
) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """Train the (C + 1)-class shared segmenter (a cached stage); its test labels (N, S, S)."""
    k = bundle.dataset.num_classes + 1
    seg_ctx = segmenter_context(cfg, ctx, run_dir, f"segmenter-{seg_key}-k{k}-")
    images = np.asarray(bundle.imageset("train").images)
    ctx.phase = "segmenter"
    state = seg_ctx.stage(
        "train",
        lambda: train_segmenter(images, masks, config, seg_ctx, num_classes=k),
        check=lambda state: segmenter_problem(config, state, k),
    )
    costs = {"segmenter": seg_ctx.costs["train"]}
    model = build_segmenter(config, k)
    model.load_state_dict(state)
    model.to(ctx.device).eval()
    test = bundle.imageset("test")
    path = run_dir / "preds" / f"segmenter-{seg_key}-k{k}-test-labels.npy"
    ctx.phase = "segmenter_predict"
    with bcache.computing(path):
        preds = (
            None if cfg.force else _cached_labels(path, (len(test), bundle.size, bundle.size), k)
        )
        if preds is None:
            bcache.invalidate(path)
            with measure(ctx.device) as cost:
                prob = predict_segmenter(model, np.asarray(test.images), seg_ctx)
                labels = prob.argmax(axis=1).astype(np.uint8)
            bcache.save_array(path, labels, {"cost": cost.to_dict()})
            preds = bcache.load_array(path)
            costs["segmenter_predict"] = {**cost.to_dict(), "reused": False}
    return preds, costs


def _cached_labels(path: Path, shape: tuple[int, ...], k: int) -> np.ndarray | None:
    """Stored test labels of ``shape`` with values below ``k``, else None (recomputed)."""
    if bcache.read_marker(path) is None:
        return None
    labels = bcache.load_checked_array(path, shape, np.uint8, "predicted labels")
    if labels is not None and labels.size and int(np.max(labels)) >= k:
        logger.warning("cached labels %s hold a class >= %d; recomputing", path, k)
        return None
    return labels


# ---- 4. scores ----------------------------------------------------------------------------------
def _nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (S, S) label map resized to ``size`` by nearest neighbour."""
    if labels.shape == size:
        return np.asarray(labels)
    t = torch.from_numpy(np.array(labels, dtype=np.float32))[None, None]
    return F.interpolate(t, size=size, mode="nearest")[0, 0].numpy().astype(np.uint8)


def _map_labels(
    maps: np.ndarray, tags: np.ndarray, gts: Iterator[np.ndarray], threshold: float, used: dict
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(prediction, GT) per image: maps at the original size, or the mask used instead."""
    for i, (scores, tag, gt) in enumerate(zip(maps, tags, gts)):
        if i in used:  # ignored pixels (255) of a GT mask used for training: background
            mask = np.asarray(used[i])
            yield _nearest(np.where(mask == IGNORE, 0, mask), gt.shape), gt
            continue
        up = upsample_scores(np.asarray(scores, dtype=np.float32), gt.shape)
        yield labels_from_scores(up[None], tag[None], threshold)[0], gt


@dataclass(frozen=True)
class Scored:
    """One stage's scores: dataset-level metrics and the (N, K, K) per-image confusions."""

    values: dict[str, float]
    confusions: np.ndarray


def _score(pairs: Iterator[tuple[np.ndarray, np.ndarray]], k: int) -> Scored:
    """Dataset-level multi-class scores of (prediction, GT) pairs, and each image's counts."""
    per_image = []
    for pred, gt in pairs:  # accumulated image by image (memory stays one image)
        per_image.append(accumulate_confusion([pred], [gt], k))
    stack = np.stack(per_image) if per_image else np.zeros((0, k, k), dtype=np.int64)
    return Scored(multiclass_metrics(stack.sum(axis=0)).as_dict(), stack)


def per_image_counts(
    confusions: np.ndarray, names: list[str], class_names: list[str]
) -> pd.DataFrame:
    """One row per image: ``tp:<class>``, ``fp:<class>``, ``fn:<class>`` from its confusion.

    These are what the report's bootstrap of the dataset-level mIoU resamples (an image's
    counts summed over a resample give that resample's confusion diagonal and margins).
    """
    tp = np.diagonal(confusions, axis1=1, axis2=2)  # (N, K)
    fp = confusions.sum(axis=1) - tp  # predicted as the class, GT another
    fn = confusions.sum(axis=2) - tp  # GT the class, predicted another
    data: dict[str, Any] = {"name": list(names)}
    for j, cls in enumerate(["background", *class_names]):
        data[f"tp:{cls}"], data[f"fp:{cls}"], data[f"fn:{cls}"] = tp[:, j], fp[:, j], fn[:, j]
    return pd.DataFrame(data)


def score_label_stages(
    bundle: DataBundle,
    maps: dict[str, np.ndarray],
    preds: np.ndarray,
    choice: ThresholdChoice,
    used: dict[int, np.ndarray],
) -> dict[tuple[str, str], tuple[Scored, float, str]]:
    """Scores of pseudo labels (train), maps (test) and the segmenter (test); see module doc."""
    k, t = bundle.dataset.num_classes + 1, choice.value
    pseudo = _map_labels(
        maps["train"], tags_of(bundle, "train"), class_gts(bundle, "train"), t, used
    )
    on_test = _map_labels(maps["test"], tags_of(bundle, "test"), class_gts(bundle, "test"), t, {})
    seg = ((_nearest(p, gt.shape), gt) for p, gt in zip(preds, class_gts(bundle, "test")))
    return {
        ("pseudo", "train"): (_score(pseudo, k), t, choice.source),
        ("maps", "test"): (_score(on_test, k), t, choice.source),
        ("segmenter", "test"): (_score(seg, k), float("nan"), "segmenter"),
    }


def label_rows(
    scored: dict[tuple[str, str], tuple[Scored, float, str]],
    common: dict[str, Any],
    class_names: list[str],
) -> list[dict[str, Any]]:
    """Tidy rows of multi-class scores: the metric means and ``iou:<class>`` for each class."""
    names = ["background", *class_names]
    rows = []
    for (stage, part), (score, threshold, source) in scored.items():
        values = score.values
        head = {**common, "threshold": threshold, "threshold_source": source}
        head.update(stage=stage, split=part, convention=MULTICLASS, aggregation="dataset")
        for metric, value in values.items():
            if metric.startswith("iou_"):
                metric = f"iou:{names[int(metric[4:])]}"
            rows.append({**head, "metric": metric, "value": float(value)})
    return rows


def label_per_image(
    scored: dict[tuple[str, str], tuple[Scored, float, str]], bundle: DataBundle
) -> list[pd.DataFrame]:
    """Per-image class counts of every scored stage (images with a GT mask only)."""
    frames = []
    for (stage, part), (score, _, _) in scored.items():
        names = [bundle.cache.names[int(i)] for i in bundle.index[part]]
        frame = per_image_counts(score.confusions, names, bundle.class_names)
        frame = frame[score.confusions.sum(axis=(1, 2)) > 0]  # tag-only images count nowhere
        frame.insert(0, "convention", MULTICLASS)
        frame.insert(0, "split", part)
        frame.insert(0, "stage", stage)
        frames.append(frame.reset_index(drop=True))
    return frames


def check_labels(masks: np.ndarray, k: int) -> None:
    """Raise ValueError if pseudo labels hold a value other than 0..k-1 and 255."""
    values = set(np.unique(masks).tolist()) - set(range(k)) - {IGNORE}
    if values:
        raise ValueError(f"pseudo labels hold values {sorted(values)} outside 0..{k - 1}, 255")
