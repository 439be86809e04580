"""The named stages of one run after the fit: maps, threshold, train masks, segmenter, scores.

Each function is one step of :meth:`benchmark.runner.Runner.run_one`, in this order:

1. :func:`compute_maps`: soft maps (N, C, h, w) of a split, float16, cached with a marker;
2. :func:`pick_threshold`: fixed (option or method) or chosen on validation, never on test;
3. :func:`make_train_masks`: pseudo masks of the train images, a ``gt_ratio`` share from GT;
4. :func:`segmenter_predictions`: the shared segmenter, trained on them, predicting test;
5. :func:`score_stages` and :func:`quality_rows`: the one evaluator under every convention;
   :func:`cost_rows` for the cost of every stage;
6. :func:`write_run_outputs`: per-image values, the threshold curve, qualitative arrays.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmark import cache as bcache
from benchmark.accounting import measure
from benchmark.bundle import DataBundle, orig_gts
from benchmark.config import RunConfig
from benchmark.context import RunContext, progress
from benchmark.evaluate import METRICS, Evaluator, threshold_map
from benchmark.store import write_curve, write_per_image
from benchmark.supervision import gt_rule_masks, gt_subset
from benchmark.threshold import choose_threshold
from datasets.conventions import CONVENTIONS, positive_prediction
from methods.base import Context, ImageSet, Method
from methods.common.segmenter import (
    SegmenterConfig,
    build_segmenter,
    predict_segmenter,
    train_segmenter,
)

logger = logging.getLogger(__name__)

#: Test images saved per run for the report's qualitative grid.
QUALITATIVE_IMAGES = 6
#: The segmenter's pet probability threshold: its test predictions are ``prob >= 0.5``.
SEGMENTER_THRESHOLD = 0.5
#: A 0/1 mask scored as a map (the GT masks a segmenter trains on) is thresholded here.
MASK_THRESHOLD = 0.5
MAP_BATCH = 64  # images per localize() call
#: (stage, split) -> (evaluators by convention, threshold, threshold source)
Scored = Mapping[tuple[str, str], tuple[dict[str, Evaluator], float, str]]


# ---- 1. maps ------------------------------------------------------------------------------------
def compute_maps(
    method: Method,
    images: ImageSet,
    ctx: Context,
    path: Path,
    force: bool,
    like: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Maps (N, C, h, w) of a split, float16 memory-mapped, cached with a marker.

    A cached file is reused only if it holds float16 values in [0, 1] of shape (N, C, h, w)
    with N the number of images of the split (and ``(C, h, w) == like`` when given: the shape
    of the method's maps of another split); otherwise it is reported and recomputed.
    """
    with bcache.computing(path):  # a concurrent run on the same folder waits, then reuses
        return _compute_maps(method, images, ctx, path, force, like)


def _compute_maps(
    method: Method,
    images: ImageSet,
    ctx: Context,
    path: Path,
    force: bool,
    like: tuple[int, ...] | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    info = None if force else bcache.read_marker(path)
    if info is not None:
        shape = (len(images), *(like or (None, None, None)))
        array = bcache.load_checked_array(path, shape, np.float16, "maps", unit_range=True)
        if array is not None:
            return array, {**info["meta"].get("cost", {}), "reused": True}
    bcache.invalidate(path)
    chunks = []
    with measure(ctx.device) as cost:
        for batch in progress(images.batches(MAP_BATCH), desc=f"maps {path.stem}", unit="batch"):
            maps = method.localize(batch, ctx)
            maps = method.refine(batch, maps, ctx)
            maps = np.asarray(maps, dtype=np.float32)
            if maps.ndim != 4 or maps.shape[0] != len(batch):
                raise ValueError(f"{method.name}: localize returned shape {maps.shape}")
            if not np.isfinite(maps).all():
                raise FloatingPointError(f"{method.name}: maps contain NaN or inf")
            chunks.append(np.clip(maps, 0.0, 1.0).astype(np.float16))
    array = np.concatenate(chunks) if chunks else np.zeros((0, 1, 1, 1), np.float16)
    bcache.save_array(path, array, {"cost": cost.to_dict()})
    return bcache.load_array(path), {**cost.to_dict(), "reused": False}


# ---- 2. threshold -------------------------------------------------------------------------------
@dataclass
class ThresholdChoice:
    """The pseudo-label threshold of a run and where it came from.

    Attributes:
        value: the threshold on the pet map.
        source: ``fixed`` (``--threshold``), ``method`` (the method's own) or ``val_sweep``.
        curve: the validation IoU-vs-threshold curve of a sweep (None otherwise).
    """

    value: float
    source: str
    curve: pd.DataFrame | None = None


def pick_threshold(
    cfg: RunConfig, method: Method, bundle: DataBundle, maps: dict[str, np.ndarray]
) -> ThresholdChoice:
    """Fixed (the option, then the method's own) or swept: on validation, never on test.

    ``cfg.threshold_on == "train_gt"`` sweeps on the train GT instead (the literature's
    protocol, by name only: source ``train_gt``, and the run's method_id says so).
    """
    if cfg.threshold is not None:
        return ThresholdChoice(cfg.threshold, "fixed")
    if method.fixed_threshold is not None:
        return ThresholdChoice(method.fixed_threshold, "method")
    part = "train" if cfg.threshold_on == "train_gt" else "val"
    value, curve = choose_threshold(
        maps[part], bundle.orig_masks(part, cfg.convention), cfg.convention
    )
    return ThresholdChoice(value, "train_gt" if part == "train" else "val_sweep", curve)


# ---- 3. train masks -----------------------------------------------------------------------------
@dataclass
class TrainMasks:
    """What the shared segmenter trains on.

    Attributes:
        pseudo: (N, S, S) uint8 {0, 1, 255}: thresholded maps, the ``replaced`` share from GT.
        masks: what the segmenter reads: ``pseudo``, or a per-batch GT draw over it.
        replaced: indices of the train images whose pseudo mask is their GT mask.
        used: image index -> the mask that replaces its pseudo mask (scored instead of its map).
    """

    pseudo: np.ndarray
    masks: Any
    replaced: np.ndarray
    used: dict[int, np.ndarray]


def make_train_masks(
    cfg: RunConfig,
    bundle: DataBundle,
    method: Method,
    train_maps: np.ndarray,
    threshold: float,
    gt_rule: str,
    seed: int,
) -> TrainMasks:
    """Pseudo masks of the train images; a seeded, nested ``gt_ratio`` share replaced by GT.

    ``gt_rule`` ``subset`` replaces a fixed nested subset; any other rule draws GT per batch
    (see :func:`benchmark.supervision.gt_rule_masks`) and replaces nothing here.
    """
    n_train = len(bundle.index["train"])
    replaced = gt_subset(n_train, cfg.gt_ratio, f"{bundle.split.sha256}|{cfg.base_seed}")
    if gt_rule != "subset":
        replaced = replaced[:0]  # GT is drawn per batch instead
    pet_train = np.asarray(bundle.cache.masks("pet"))[bundle.index["train"]]
    from_gt = method.pseudo_from_gt
    pseudo = pseudo_masks(train_maps, threshold, pet_train, replaced, from_gt)
    masks: Any = pseudo
    if gt_rule != "subset":
        masks = gt_rule_masks(gt_rule, pseudo, pet_train, cfg.gt_ratio, seed)
    rep = range(n_train) if from_gt else (int(i) for i in replaced)
    return TrainMasks(pseudo, masks, replaced, {i: pseudo[i] for i in rep})


def pseudo_masks(
    maps: np.ndarray,
    threshold: float,
    gt_masks: np.ndarray,
    replaced: np.ndarray,
    from_gt: bool,
) -> np.ndarray:
    """Pet pseudo masks (N, S, S) uint8 {0, 1, 255} at the working resolution.

    A pixel is pet where the pet map (upsampled to S) is ``>= threshold``, under every
    convention (the threshold is a pet-map threshold, see :func:`benchmark.threshold.sweep_counts`).
    """
    if from_gt:
        return np.asarray(gt_masks).copy()
    soft = maps[:, 0].astype(np.float32)
    if soft.shape[1:] != gt_masks.shape[1:]:
        t = torch.from_numpy(soft)[:, None]
        t = torch.nn.functional.interpolate(
            t, size=gt_masks.shape[1:], mode="bilinear", align_corners=False
        )
        soft = t[:, 0].numpy()
    out = (soft >= np.float32(threshold)).astype(np.uint8)
    if len(replaced):
        out[replaced] = np.asarray(gt_masks)[replaced]
    return out


# ---- 4. the shared segmenter --------------------------------------------------------------------
def segmenter_predictions(
    cfg: RunConfig,
    bundle: DataBundle,
    config: SegmenterConfig,
    ctx: RunContext,
    run_dir: Path,
    seg_key: str,
    train_masks: Any,
) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """Train the shared segmenter on ``train_masks`` (a cached stage) and predict the test set.

    The segmenter, its recipe and epochs are identical for every method. Its test predictions
    (n_test, 1, S, S) are stored as float16 with a marker and scored as stored, fresh or reused.

    Returns:
        ``(predictions, stage_costs)``.
    """
    seg_ctx = segmenter_context(cfg, ctx, run_dir, f"segmenter-{seg_key}-")
    images = np.asarray(bundle.imageset("train").images)
    ctx.phase = "segmenter"
    state = seg_ctx.stage(
        "train",
        lambda: train_segmenter(images, train_masks, config, seg_ctx),
        check=functools.partial(segmenter_problem, config),
    )
    costs = {"segmenter": seg_ctx.costs["train"]}
    model = build_segmenter(config)
    model.load_state_dict(state)
    model.to(ctx.device).eval()
    test = bundle.imageset("test")
    path = run_dir / "preds" / f"segmenter-{seg_key}-test.npy"
    ctx.phase = "segmenter_predict"
    with bcache.computing(path):
        shape = (len(test), 1, bundle.size, bundle.size)
        preds = None if cfg.force else cached_predictions(path, shape)
        if preds is None:
            bcache.invalidate(path)
            with measure(ctx.device) as cost:
                fresh = predict_segmenter(model, np.asarray(test.images), seg_ctx)
            bcache.save_array(path, fresh.astype(np.float16), {"cost": cost.to_dict()})
            preds = bcache.load_array(path)  # score what is stored, fresh or reused
            costs["segmenter_predict"] = {**cost.to_dict(), "reused": False}
    return preds, costs


def segmenter_context(cfg: RunConfig, ctx: RunContext, run_dir: Path, prefix: str) -> RunContext:
    """The shared segmenter's own context: the run's device and seed, its own stage files."""
    return RunContext(
        device=ctx.device,
        seed=ctx.seed,
        workdir=ctx.workdir,
        amp=ctx.amp,
        channels_last=ctx.channels_last,
        progress=ctx.progress,
        stage_dir=run_dir / "stages",
        force=cfg.force,
        prefix=prefix,
    )


def cached_predictions(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """Stored segmenter predictions of ``shape`` if complete and intact, else None."""
    if bcache.read_marker(path) is None:
        return None
    return bcache.load_checked_array(path, shape, np.float16, "predictions", unit_range=True)


def segmenter_problem(
    config: SegmenterConfig, state: dict[str, Any], num_classes: int = 2
) -> str | None:
    """Why a cached segmenter state does not load into the segmenter ``config`` builds, or None."""
    with torch.random.fork_rng(devices=[]):  # building the model must not move the seeds
        model = build_segmenter(config, num_classes)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
        return str(exc).splitlines()[0][:300]
    return None


# ---- 5. scores ----------------------------------------------------------------------------------
def evaluate_maps(
    maps: np.ndarray,
    gts: Iterator[tuple[np.ndarray, ...]],
    names: list[str],
    threshold: float,
    used: Mapping[int, np.ndarray] | None = None,
) -> dict[str, Evaluator]:
    """Score soft pet maps at a threshold under every convention (original-resolution GT).

    Each image's prediction is made once (:func:`benchmark.evaluate.threshold_map`: the pet map
    upsampled to the GT's size, ``>= threshold``); each convention scores it or its complement
    (:func:`datasets.conventions.positive_prediction`), so a pixel on the threshold is pet under
    every convention.

    Images in ``used`` (the gt_ratio share; every image of a method whose pseudo masks are the
    GT) are scored by the mask the segmenter really trains on: the working-resolution ``pet``
    mask, its pet pixels (1) as a 0/1 map (the ignored border, 255, is not pet), upsampled and
    thresholded at :data:`MASK_THRESHOLD` as a method's map would be. Scoring the
    original-resolution GT instead would score the GT against itself (100 everywhere).

    Args:
        maps: (N, 1, h, w) pet maps in [0, 1].
        gts: per image, its GT masks in the order of :data:`CONVENTIONS` (see :func:`orig_gts`).
        names: image names.
        threshold: the threshold of the maps.
        used: image index -> the (S, S) uint8 {0, 1, 255} mask that replaces its pseudo mask.

    Returns:
        convention -> its :class:`Evaluator`.
    """
    evaluators = {c: Evaluator() for c in CONVENTIONS}
    for i, (soft, masks) in enumerate(zip(maps, gts)):
        if used is not None and i in used:
            pet = threshold_map((used[i] == 1).astype(np.float32), masks[0].shape, MASK_THRESHOLD)
        else:
            pet = threshold_map(soft[0].astype(np.float32), masks[0].shape, threshold, names[i])
        for convention, gt in zip(CONVENTIONS, masks):
            evaluators[convention].add(positive_prediction(pet, convention), gt, name=names[i])
    return evaluators


def score_stages(
    bundle: DataBundle,
    maps: dict[str, np.ndarray],
    preds: np.ndarray,
    choice: ThresholdChoice,
    used: Mapping[int, np.ndarray],
) -> dict[tuple[str, str], tuple[dict[str, Evaluator], float, str]]:
    """Score pseudo masks (train), maps (test) and the segmenter (test) under every convention.

    Each score is computed on what the next stage really uses: the pseudo masks the segmenter
    trains on (``used``: the GT share as the segmenter sees it), the maps at the chosen
    threshold, the segmenter's stored predictions at :data:`SEGMENTER_THRESHOLD`.
    """
    names = {p: [bundle.cache.names[i] for i in bundle.index[p]] for p in ("train", "test")}
    t, source = choice.value, choice.source
    train_gts, test_gts = orig_gts(bundle, "train"), orig_gts(bundle, "test")
    return {
        ("pseudo", "train"): (
            evaluate_maps(maps["train"], train_gts, names["train"], t, used),
            t,
            source,
        ),
        ("maps", "test"): (evaluate_maps(maps["test"], test_gts, names["test"], t), t, source),
        ("segmenter", "test"): (
            evaluate_maps(preds, orig_gts(bundle, "test"), names["test"], SEGMENTER_THRESHOLD),
            SEGMENTER_THRESHOLD,
            "segmenter",
        ),
    }


def quality_rows(
    scored: Mapping[tuple[str, str], tuple[dict[str, Evaluator], float, str]],
    common: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[pd.DataFrame]]:
    """Tidy quality rows and per-image frames of the scored stages, convention by convention.

    Each row carries the threshold its prediction was made with: the pseudo-label threshold on
    ``pseudo`` and ``maps`` rows, :data:`SEGMENTER_THRESHOLD` on ``segmenter`` rows.

    Args:
        scored: (stage, split) -> (evaluators by convention, threshold, threshold source).
        common: the columns every row of the run shares.

    Returns:
        ``(rows, per_image)``: rows per convention, stage, aggregation and metric; one
        per-image frame per convention and stage.
    """
    rows: list[dict[str, Any]] = []
    per_image: list[pd.DataFrame] = []
    for convention in CONVENTIONS:
        for (stage, part), (evaluators, threshold, source) in scored.items():
            ev = evaluators[convention]
            head = {**common, "threshold": threshold, "threshold_source": source}
            head.update(stage=stage, split=part, convention=convention)
            for aggregation, values in (
                ("dataset", ev.dataset_metrics()),
                ("image_mean", ev.mean_image_metrics()),
            ):
                rows.extend(
                    {**head, "aggregation": aggregation, "metric": m, "value": float(values[m])}
                    for m in (*METRICS, "miou")
                    if m in values
                )
            frame = ev.per_image()
            frame.insert(0, "convention", convention)
            frame.insert(0, "split", part)
            frame.insert(0, "stage", stage)
            per_image.append(frame)
    return rows, per_image


def common_columns(
    base: dict[str, Any], budget_hit: bool, choice: ThresholdChoice, n_replaced: int
) -> dict[str, Any]:
    """The columns every quality and cost row of a completed run shares."""
    return {
        **base,
        "status": "budget" if budget_hit else "done",
        "reason": "cut by its budget; partial result kept" if budget_hit else "",
        "threshold": choice.value,
        "threshold_source": choice.source,
        "n_gt_replaced": n_replaced,
    }


def status_row(
    base: dict[str, Any], status: str, reason: str, convention: str, **extra: Any
) -> dict[str, Any]:
    """The one row of a run that produced no scores (``error``, ``unsupported``, ...)."""
    return {
        **base,
        "status": status,
        "reason": reason,
        **extra,
        "stage": "run",
        "split": "",
        "convention": convention,
        "aggregation": "",
        "metric": "status",
        "value": float("nan"),
        "threshold": float("nan"),
    }


def cost_rows(common: dict[str, Any], stage_costs: dict[str, dict[str, Any]]) -> list[dict]:
    """One row per (stage, cost metric): seconds, peak memory, ... and whether it was reused."""
    return [
        {
            **common,
            "threshold": float("nan"),  # a cost has no prediction
            "threshold_source": "",
            "stage": stage,
            "split": "",
            "convention": "",
            "aggregation": "cost",
            "metric": metric,
            "value": float(value),
            "reused": bool(cost.get("reused", False)),
        }
        for stage, cost in stage_costs.items()
        for metric, value in cost.items()
        if metric != "reused"
    ]


# ---- 6. outputs besides the rows ----------------------------------------------------------------
def write_run_outputs(
    out: Path,
    cfg: RunConfig,
    base: dict[str, Any],
    seg_key: str,
    per_image: list[pd.DataFrame],
    curve: pd.DataFrame | None,
    convention: str | None = None,
) -> None:
    """Store a run's per-image values (if any) and its validation threshold curve (if swept).

    ``convention`` labels the curve (default: the run's; a multi-class run's is ``multiclass``).
    """
    convention = convention or cfg.convention
    if per_image:
        frame = pd.concat(per_image, ignore_index=True)
        frame.insert(0, "method_id", base["method_id"])
        frame.insert(1, "seed", base["seed"])
        frame.insert(2, "run_key", base["run_key"])
        frame.insert(3, "gt_ratio", float(cfg.gt_ratio))
        write_per_image(out, f"{base['method']}-{base['run_key']}-{seg_key}", frame)
    if curve is not None:
        curve = curve.copy()
        curve.insert(0, "method_id", base["method_id"])
        curve.insert(1, "seed", base["seed"])
        curve.insert(2, "convention", convention)
        curve.insert(3, "run_key", base["run_key"])
        write_curve(out, f"{base['run_key']}-{convention}", curve)


def save_qualitative(
    out: Path,
    bundle: DataBundle,
    base: dict[str, Any],
    seg_key: str,
    maps: np.ndarray,
    preds: np.ndarray,
    threshold: float,
) -> None:
    """Arrays of a few test images for the report's qualitative grid (pet convention).

    The images are the same for every method (a permutation seeded by the split hash); see
    :func:`reports.figures.load_qualitative` for the format.
    """
    b = bundle
    test = b.index["test"]
    if len(test) == 0:
        return
    seed = int(b.split.sha256[:8], 16)
    pick = np.sort(np.random.default_rng(seed).permutation(len(test))[:QUALITATIVE_IMAGES])
    rows = test[pick]
    pet_map = np.asarray(maps[pick, 0], dtype=np.float32)
    seg = np.asarray(preds[pick, 0], dtype=np.float32)
    arrays = {
        "method_id": np.array(base["method_id"]),
        "names": np.array([b.cache.names[i] for i in rows]),
        "image": np.asarray(b.cache.images)[rows],
        "gt": np.asarray(b.cache.masks("pet"))[rows],
        "map": pet_map.astype(np.float16),
        "pseudo": (pet_map >= threshold).astype(np.uint8),
        "prediction": (seg >= SEGMENTER_THRESHOLD).astype(np.uint8),
    }
    path = out / "results" / "qualitative" / f"{base['run_key']}-{seg_key}.npz"
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    bcache.atomic_write_bytes(path, buf.getvalue())  # a partial file never ends in .npz
