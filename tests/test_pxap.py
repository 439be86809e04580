"""Pixel average precision (PxAP) from the one-pass sweep, against independent references.

References: scikit-learn's ``average_precision_score`` on the pooled non-ignored pixels, and a
brute-force loop over the distinct map values (precision times the recall step, from the
highest value down). Maps are drawn on the sweep grid, where PxAP from the grid counts is exact.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from benchmark.evaluate import IGNORE, ThresholdSweep, average_precision, sweep_naive
from benchmark.threshold import map_pxap, pxap_rows
from datasets.conventions import CONVENTIONS, trimap_to_mask

N_BINS = 100


def _case(seed: int, n: int = 4, size: tuple[int, int] = (9, 8)):
    rng = np.random.default_rng(seed)
    maps = rng.integers(0, N_BINS + 1, size=(n, *size)) / N_BINS  # on the grid
    maps = np.clip(maps + 0.3 * rng.random((n, *size)) * (rng.random((n, *size)) < 0.5), 0, 1)
    maps = (np.round(maps * N_BINS) / N_BINS).astype(np.float32)
    gts = (rng.random((n, *size)) < 0.2 + 0.6 * maps).astype(np.uint8)  # informative maps
    gts[rng.random((n, *size)) < 0.1] = IGNORE
    return maps, gts


def _pooled(maps: np.ndarray, gts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    valid = gts != IGNORE
    return (gts[valid] == 1).astype(int), maps[valid].astype(np.float64)


def brute_force_ap(y: np.ndarray, score: np.ndarray) -> float:
    """Sum over distinct scores, highest first, of precision x recall step (no library)."""
    positives = int(y.sum())
    ap, previous_recall = 0.0, 0.0
    for s in sorted(set(score.tolist()), reverse=True):
        predicted = score >= s
        tp = int((y[predicted] == 1).sum())
        recall = tp / positives
        ap += tp / int(predicted.sum()) * (recall - previous_recall)
        previous_recall = recall
    return ap


def _pxap(maps: np.ndarray, gts: np.ndarray, n_bins: int = N_BINS) -> float:
    sweep = ThresholdSweep(n_bins=n_bins)
    sweep.add_many(list(maps), list(gts))
    return sweep.counts().pxap()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pxap_matches_sklearn_and_a_brute_force_loop(seed):
    maps, gts = _case(seed)
    y, score = _pooled(maps, gts)
    got = _pxap(maps, gts)
    assert got == pytest.approx(average_precision_score(y, score), abs=1e-12)
    assert got == pytest.approx(brute_force_ap(y, score), abs=1e-12)
    naive = sweep_naive(list(maps), list(gts), np.arange(N_BINS + 1) / N_BINS)
    assert naive.pxap() == pytest.approx(got, abs=1e-12)


def test_finer_grid_gives_the_same_value_for_maps_on_the_coarse_grid():
    maps, gts = _case(3)
    assert _pxap(maps, gts, 1000) == pytest.approx(_pxap(maps, gts), abs=1e-12)


def test_a_perfect_map_scores_one():
    _, gts = _case(4)
    perfect = (gts == 1).astype(np.float32)
    assert _pxap(perfect, gts) == 1.0


@pytest.mark.parametrize("value", [0.0, 0.37, 1.0])
def test_a_constant_map_scores_the_foreground_ratio(value):
    _, gts = _case(5)
    y, _ = _pooled(gts.astype(np.float32), gts)
    constant = np.full(gts.shape, value, dtype=np.float32)
    assert _pxap(constant, gts) == pytest.approx(y.mean(), abs=1e-12)


def test_no_positive_pixel_is_nan_and_counts_are_checked():
    maps, gts = _case(6)
    assert math.isnan(_pxap(maps, np.where(gts == 1, 0, gts).astype(np.uint8)))
    with pytest.raises(ValueError, match="totals"):
        average_precision([1, 2], [0, 0], [1, 1], [3, 3])
    with pytest.raises(ValueError, match="1-D"):
        average_precision([], [], [], [])


def test_background_side_conventions_score_the_complement():
    maps, gts = _case(7)
    masks = list(gts)
    pet = map_pxap(maps[:, None], iter(masks), "pet", n_bins=N_BINS)
    y, score = _pooled(maps, gts)
    assert pet == pytest.approx(average_precision_score(y, score), abs=1e-12)
    # weaktr_refinery: positive = the background side (GT 1 there), predicted by pet map < t
    bg_gts = [np.where(g == IGNORE, IGNORE, 1 - g).astype(np.uint8) for g in masks]
    bg = map_pxap(maps[:, None], iter(bg_gts), "weaktr_refinery", n_bins=N_BINS)
    assert bg == pytest.approx(average_precision_score(1 - y, 1 - score), abs=1e-12)


def test_pxap_rows_cover_every_part_and_convention():
    rng = np.random.default_rng(8)
    trimaps = {p: rng.integers(1, 4, size=(3, 10, 12)).astype(np.uint8) for p in ("val", "test")}
    maps = {p: rng.random((3, 1, 5, 6)).astype(np.float32) for p in trimaps}

    def masks(part, convention):
        return (trimap_to_mask(t, convention) for t in trimaps[part])

    rows = pxap_rows(maps, masks, {"method_id": "m", "seed": 0}, n_bins=N_BINS)
    assert [(r["split"], r["convention"]) for r in rows] == [
        (p, c) for p in ("val", "test") for c in CONVENTIONS
    ]
    for r in rows:
        assert r["metric"] == "pxap" and r["stage"] == "maps" and r["method_id"] == "m"
        assert math.isnan(r["threshold"]) and r["aggregation"] == "dataset"
        want = map_pxap(
            maps[r["split"]], masks(r["split"], r["convention"]), r["convention"], N_BINS
        )
        assert r["value"] == want and 0 < want < 1
