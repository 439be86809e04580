"""Perf entries of the evaluation path: threshold sweep, confusion matrices, image cache.

Registered into :data:`benchmark.perf.harness.PERF_ENTRIES` on import, first in the table.
Each entry checks that ours and its baseline compute the same thing before timing them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.evaluate import ThresholdSweep, confusion_matrix, sweep_naive
from benchmark.perf.harness import PerfOptions, Unavailable, best_pair, register_entry

logger = logging.getLogger(__name__)


def _random_sweep_data(
    n: int, size: int, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random float32 maps (a tenth of the pixels exactly on the 0.01 grid) and {0,1,255} GT."""
    rng = np.random.default_rng(seed)
    maps, gts = [], []
    for _ in range(n):
        m = rng.random((size, size), dtype=np.float32)
        on_grid = rng.random((size, size)) < 0.1
        m[on_grid] = rng.integers(0, 101, int(on_grid.sum())) / np.float32(100)
        g = (rng.random((size, size)) < 0.4).astype(np.uint8)
        g[rng.random((size, size)) < 0.05] = 255
        maps.append(m)
        gts.append(g)
    return maps, gts


@register_entry("threshold_sweep")
def _threshold_sweep(options: PerfOptions) -> dict[str, Any]:
    n, size, n_bins = (10, 32, 100) if options.smoke else (200, 128, 100)
    maps, gts = _random_sweep_data(n, size)
    thresholds = np.arange(n_bins + 1) / n_bins

    def ours() -> Any:
        sweep = ThresholdSweep(n_bins)
        sweep.add_many(maps, gts)  # batched path: one bincount per ~65k pixels
        return sweep.counts()

    def baseline() -> Any:
        return sweep_naive(maps, gts, thresholds)

    a, b = ours(), baseline()
    same = all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("tp", "fp", "fn", "tn"))
    if not same:
        raise RuntimeError("one-pass sweep and naive loop disagree: refusing to time them")
    ours_s, base_s = best_pair(ours, baseline, rounds=2 if options.smoke else 10)
    return {
        "ours_s": ours_s,
        "baseline_s": base_s,
        "target": 50.0,
        "throughput": f"{n / ours_s:,.0f} maps/s vs {n / base_s:,.0f} maps/s",
        "note": f"{n} maps {size}x{size}, {n_bins + 1} thresholds; ThresholdSweep.add_many vs "
        "sweep_naive (one confusion_matrix per threshold and image); counts identical",
    }


def _bool_sum_confusion(pred: np.ndarray, gt: np.ndarray, ignore: int = 255) -> np.ndarray:
    """Plain numpy baseline: binary confusion matrix from masked boolean sums, no validation."""
    valid = gt != ignore
    fg = (pred == 1) & valid
    pos = gt == 1
    tp = np.count_nonzero(fg & pos)
    fp = np.count_nonzero(fg) - tp
    fn = np.count_nonzero(pos) - tp
    tn = np.count_nonzero(valid) - tp - fp - fn
    return np.array([[tn, fp], [fn, tp]], dtype=np.int64)


def _histogram2d_confusion(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int = 255
) -> np.ndarray:
    """Plain numpy baseline: ``np.histogram2d`` of (GT, prediction) over non-ignored pixels."""
    valid = gt != ignore
    h, _, _ = np.histogram2d(
        gt[valid], pred[valid], bins=num_classes, range=[[0, num_classes], [0, num_classes]]
    )
    return h.astype(np.int64)


def _label_data(
    n: int, size: int, num_classes: int, seed: int = 1
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n):
        preds.append(rng.integers(0, num_classes, (size, size), dtype=np.uint8))
        g = rng.integers(0, num_classes, (size, size), dtype=np.uint8)
        g[rng.random((size, size)) < 0.05] = 255
        gts.append(g)
    return preds, gts


def _confusion_entry(
    smoke: bool, num_classes: int, baseline_fn: Callable[..., np.ndarray], target: float, what: str
) -> dict[str, Any]:
    n, size = (10, 64) if smoke else (200, 256)
    preds, gts = _label_data(n, size, num_classes)
    for p, g in zip(preds[:3], gts[:3]):
        if not np.array_equal(confusion_matrix(p, g, num_classes), baseline_fn(p, g)):
            raise RuntimeError("confusion_matrix and its baseline disagree: refusing to time them")

    def ours() -> None:
        for p, g in zip(preds, gts):
            confusion_matrix(p, g, num_classes)

    def baseline() -> None:
        for p, g in zip(preds, gts):
            baseline_fn(p, g)

    ours_s, base_s = best_pair(ours, baseline, rounds=2 if smoke else 5)
    pixels = n * size * size
    return {
        "ours_s": ours_s,
        "baseline_s": base_s,
        "target": target,
        "throughput": f"{pixels / ours_s / 1e6:,.0f} Mpx/s vs {pixels / base_s / 1e6:,.0f} Mpx/s",
        "note": f"{n} x {size}x{size}, {num_classes} classes, 5% ignore; {what}",
    }


@register_entry("confusion_matrix")
def _confusion_binary(options: PerfOptions) -> dict[str, Any]:
    return _confusion_entry(
        options.smoke,
        2,
        _bool_sum_confusion,
        0.5,
        "baseline: masked boolean sums without input validation; ours also checks every GT "
        "value and the prediction range, target: at most 2x the bare baseline's time",
    )


@register_entry("confusion_matrix_4class")
def _confusion_multiclass(options: PerfOptions) -> dict[str, Any]:
    return _confusion_entry(
        options.smoke,
        4,
        lambda p, g: _histogram2d_confusion(p, g, 4),
        1.0,
        "baseline: np.histogram2d over non-ignored pixels; ours: one np.bincount with validation",
    )


@register_entry("image_cache")
def _image_cache(options: PerfOptions) -> dict[str, Any]:
    try:
        import datasets
        from datasets import cache as dcache
    except ImportError as exc:
        raise Unavailable(f"datasets.cache cannot be imported ({exc})") from exc
    missing = [
        f"{mod.__name__}.{attr}"
        for mod, attr in (
            (datasets, "create_dataset"),
            (datasets, "build_cache"),
            (dcache, "read_epoch_pil"),
            (dcache, "read_epoch_cache"),
        )
        if not hasattr(mod, attr)
    ]
    if missing:
        raise Unavailable(f"missing API: {', '.join(missing)}")
    preset, size = ("tiny", 128) if options.smoke else ("quick", 128)
    with tempfile.TemporaryDirectory(prefix="wsss-perf-") as tmp:
        ds = datasets.create_dataset("synthetic", root=Path(tmp) / "synth", preset=preset)
        names = [r.name for r in ds.records]
        cache = datasets.build_cache(ds, names, size, Path(tmp) / "cache")
        ours_s, base_s = best_pair(
            lambda: dcache.read_epoch_cache(cache),
            lambda: dcache.read_epoch_pil(ds, names, size),
            rounds=2 if options.smoke else 10,  # decode times drift: 5 rounds moved it 32 %
        )
    n = len(names)
    return {
        "ours_s": ours_s,
        "baseline_s": base_s,
        "target": 5.0,
        "throughput": f"{n / ours_s:,.0f} img/s vs {n / base_s:,.0f} img/s",
        "note": f"one epoch of {n} synthetic '{preset}' images at {size} px: ImageCache "
        "(memory-mapped uint8, files in the OS page cache after the warm-up) vs PIL decode + "
        "resize",
    }
