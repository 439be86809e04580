"""The one evaluator: hand-computed cases, scikit-learn agreement, aggregation, the sweep."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from benchmark.evaluate import (
    IGNORE,
    METRICS,
    Evaluator,
    SweepCounts,
    ThresholdSweep,
    confusion_matrix,
    evaluate_predictions,
    metrics_from_confusion,
    sweep_naive,
    upsample_map,
)

nan = math.nan


def _metrics(pred, gt, **kw) -> dict[str, float]:
    return metrics_from_confusion(
        confusion_matrix(np.asarray(pred), np.asarray(gt, dtype=np.uint8), **kw)
    )


def _assert_metrics(got: dict[str, float], expected: dict[str, float]) -> None:
    for key, want in expected.items():
        if math.isnan(want):
            assert math.isnan(got[key]), f"{key}: expected NaN, got {got[key]}"
        else:
            assert got[key] == pytest.approx(want, abs=1e-12), f"{key}: {got[key]} != {want}"


# --- hand-computed cases ------------------------------------------------------------------


def test_empty_prediction():
    got = _metrics([[0, 0], [0, 0]], [[1, 1], [0, 0]])
    _assert_metrics(
        got,
        {"iou": 0, "dice": 0, "accuracy": 0.5, "precision": nan, "recall": 0, "tp": 0, "fn": 2},
    )
    # class 0: tn=2, fn=2 (predicted 0 but GT 1) -> 2 / 4; class 1: 0 -> miou 0.25
    _assert_metrics(got, {"iou_0": 0.5, "iou_1": 0.0, "miou": 0.25})


def test_empty_gt():
    got = _metrics([[1, 0], [0, 0]], [[0, 0], [0, 0]])
    _assert_metrics(
        got,
        {"iou": 0, "dice": 0, "accuracy": 0.75, "precision": 0, "recall": nan, "fp": 1, "tn": 3},
    )


def test_empty_gt_and_empty_prediction_is_undefined_not_perfect():
    got = _metrics([[0, 0]], [[0, 0]])
    _assert_metrics(
        got,
        {
            "iou": nan,
            "dice": nan,
            "precision": nan,
            "recall": nan,
            "accuracy": 1.0,
            "iou_0": 1.0,
            "iou_1": nan,
            "miou": 1.0,  # only class 0 is present
        },
    )


def test_all_pixels_ignored():
    cm = confusion_matrix(np.array([[1, 0], [1, 1]]), np.full((2, 2), IGNORE, np.uint8))
    assert cm.tolist() == [[0, 0], [0, 0]]
    got = metrics_from_confusion(cm)
    for key in (*METRICS, "miou"):
        assert math.isnan(got[key]), key


def test_perfect_prediction():
    gt = np.array([[1, 0, 1], [IGNORE, 0, 1]], np.uint8)
    pred = np.array([[1, 0, 1], [0, 0, 1]], np.uint8)  # the ignored pixel's value is irrelevant
    _assert_metrics(
        _metrics(pred, gt),
        {"iou": 1, "dice": 1, "accuracy": 1, "precision": 1, "recall": 1, "miou": 1},
    )


def test_disjoint_prediction():
    gt = np.array([[1, 1, 0, 0]], np.uint8)
    _assert_metrics(
        _metrics(1 - gt, gt),
        {"iou": 0, "dice": 0, "accuracy": 0, "precision": 0, "recall": 0, "miou": 0},
    )


def test_mixed_case_known_numbers():
    gt = np.array([[1, 1, 1, 0], [0, 0, IGNORE, 1]], np.uint8)
    pred = np.array([[1, 1, 0, 1], [0, 1, 1, 0]], np.uint8)
    # pairs (gt, pred): (1,1) (1,1) (1,0) (0,1) (0,0) (0,1) [ignored] (1,0)
    cm = confusion_matrix(pred, gt)
    assert cm.tolist() == [[1, 2], [2, 2]]
    _assert_metrics(
        metrics_from_confusion(cm),
        {
            "tp": 2,
            "fp": 2,
            "fn": 2,
            "tn": 1,
            "iou": 2 / 6,
            "dice": 4 / 8,
            "accuracy": 3 / 7,
            "precision": 0.5,
            "recall": 0.5,
            "iou_0": 1 / 5,
            "miou": (1 / 3 + 1 / 5) / 2,
        },
    )


def test_three_class_per_class_iou_and_positive():
    gt = np.array([0, 0, 1, 1, 2, 2, IGNORE], np.uint8)
    pred = np.array([0, 1, 1, 1, 2, 0, 2], np.uint8)
    cm = confusion_matrix(pred, gt, num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    got = metrics_from_confusion(cm, positive=2)
    # class 0: inter 1, union 2+2-1=3; class 1: 2 / (2+3-2)=2/3; class 2: 1 / (2+1-1) = 1/2
    _assert_metrics(
        got,
        {
            "iou_0": 1 / 3,
            "iou_1": 2 / 3,
            "iou_2": 1 / 2,
            "miou": (1 / 3 + 2 / 3 + 1 / 2) / 3,
            "iou": 1 / 2,
            "accuracy": 4 / 6,
            "precision": 1.0,
            "recall": 0.5,
        },
    )


# --- agreement with scikit-learn ----------------------------------------------------------


@pytest.mark.parametrize("num_classes", [2, 4])
def test_confusion_matrix_matches_sklearn(num_classes):
    rng = np.random.default_rng(num_classes)
    gt = rng.integers(0, num_classes, (37, 53)).astype(np.uint8)
    gt[rng.random(gt.shape) < 0.2] = IGNORE
    pred = rng.integers(0, num_classes, gt.shape).astype(np.uint8)
    valid = gt != IGNORE
    want = sk_confusion_matrix(gt[valid], pred[valid], labels=list(range(num_classes)))
    got = confusion_matrix(pred, gt, num_classes)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)
    # other dtypes and a negative ignore index (general path) give the same counts
    gt64 = np.where(valid, gt.astype(np.int64), -1)
    np.testing.assert_array_equal(
        confusion_matrix(pred.astype(np.int32), gt64, num_classes, ignore_index=-1), want
    )


def test_bool_prediction_equals_uint8_prediction():
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 2, (20, 20)).astype(np.uint8)
    pred = rng.random((20, 20)) > 0.5
    np.testing.assert_array_equal(
        confusion_matrix(pred, gt), confusion_matrix(pred.astype(np.uint8), gt)
    )


# --- input errors -------------------------------------------------------------------------


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"shape \(2, 3\) does not match GT shape \(3, 2\)"):
        confusion_matrix(np.zeros((2, 3), np.uint8), np.zeros((3, 2), np.uint8), name="cat_1")


def test_prediction_out_of_range_is_an_error():
    with pytest.raises(ValueError, match=r"prediction values must be in \[0, 2\), found \[2\]"):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]))


@pytest.mark.parametrize("num_classes", [2, 4])
def test_raw_trimap_as_gt_is_an_error_naming_the_image(num_classes):
    trimap = np.array([[1, 2], [3, 3]], np.uint8)  # raw Oxford-IIIT Pet values, not converted
    pred = np.zeros_like(trimap)
    bad = [2, 3] if num_classes == 2 else []
    if not bad:  # with 4 classes 1..3 are valid classes; 7 is not
        trimap[0, 0] = 7
        bad = [7]
    with pytest.raises(ValueError, match=re.escape(f"found {bad} (image 'Abyssinian_1')")):
        confusion_matrix(pred, trimap, num_classes, name="Abyssinian_1")


def test_float_prediction_and_class_ignore_index_are_errors():
    with pytest.raises(ValueError, match="integer class labels"):
        confusion_matrix(np.array([0.7, 0.2]), np.array([0, 1]))
    with pytest.raises(ValueError, match="ignore_index 1 is a class index"):
        confusion_matrix(np.array([0, 1]), np.array([0, 1]), ignore_index=1)


def test_evaluator_errors():
    ev = Evaluator()
    with pytest.raises(ValueError, match="no images"):
        ev.dataset_metrics()
    ev.add(np.array([[1]]), np.array([[1]], np.uint8), name="a")
    with pytest.raises(ValueError, match="'a' was already added"):
        ev.add(np.array([[1]]), np.array([[1]], np.uint8), name="a")
    with pytest.raises(ValueError, match=r"values must be in \[0, 1\].*'b'"):
        ev.add_map(np.array([[1.5]]), np.array([[1]], np.uint8), 0.5, name="b")
    with pytest.raises(ValueError, match="NaN"):
        ev.add_map(np.array([[nan]]), np.array([[1]], np.uint8), 0.5, name="c")
    with pytest.raises(ValueError, match="2-D"):
        ev.add_map(np.zeros((1, 2, 2)), np.zeros((2, 2), np.uint8), 0.5, name="d")
    assert len(ev) == 1  # failed adds leave no trace
    with pytest.raises(ValueError, match="binary"):
        Evaluator(num_classes=3).add_map(np.zeros((2, 2)), np.zeros((2, 2), np.uint8), 0.5)


# --- aggregation --------------------------------------------------------------------------


def test_dataset_level_and_per_image_mean_differ():
    ev = Evaluator()
    ev.add(np.ones((2, 2), np.uint8), np.ones((2, 2), np.uint8), name="small_perfect")
    big_pred = np.zeros((4, 4), np.uint8)
    big_pred[0] = 1  # 4 of 16 positive pixels found
    ev.add(big_pred, np.ones((4, 4), np.uint8), name="big_poor")
    ev.add(np.zeros((3, 3), np.uint8), np.zeros((3, 3), np.uint8), name="empty")  # IoU undefined

    ds = ev.dataset_metrics()
    assert ds["iou"] == pytest.approx(8 / 20)  # tp 4+4, fn 12
    assert ds["dice"] == pytest.approx(16 / 28)
    assert ds["accuracy"] == pytest.approx((8 + 9) / 29)

    mean = ev.mean_image_metrics()
    assert mean["iou"] == pytest.approx((1 + 4 / 16) / 2)  # the empty image is skipped (NaN)
    assert mean["dice"] == pytest.approx((1 + 8 / 20) / 2)
    assert mean["accuracy"] == pytest.approx((1 + 4 / 16 + 1) / 3)  # defined for all three
    assert mean["recall"] == pytest.approx((1 + 0.25) / 2)

    df = ev.per_image()
    assert list(df.columns[:10]) == [
        "name",
        "tp",
        "fp",
        "fn",
        "tn",
        "iou",
        "dice",
        "accuracy",
        "precision",
        "recall",
    ]
    assert df["name"].tolist() == ["small_perfect", "big_poor", "empty"]
    assert df["tp"].tolist() == [4, 4, 0]
    assert df["fn"].tolist() == [0, 12, 0]
    assert df["tn"].tolist() == [0, 0, 9]
    assert df["iou"].iloc[1] == pytest.approx(0.25)
    assert math.isnan(df["iou"].iloc[2])
    np.testing.assert_array_equal(ev.confusion, [[9, 0], [12, 8]])


def test_evaluate_predictions_convenience():
    out = evaluate_predictions(
        [np.array([[1, 0]]), np.array([[1, 1]])],
        [np.array([[1, 1]], np.uint8), np.array([[1, 1]], np.uint8)],
        names=["x", "y"],
    )
    assert out["dataset"]["iou"] == pytest.approx(3 / 4)
    assert out["image_mean"]["iou"] == pytest.approx((0.5 + 1) / 2)
    assert out["per_image"]["name"].tolist() == ["x", "y"]


# --- maps, upsampling ---------------------------------------------------------------------


def test_upsample_4x4_map_against_8x8_gt():
    soft = np.zeros((4, 4), np.float32)
    soft[:, :2] = 1.0
    up = upsample_map(soft, (8, 8))
    assert up.dtype == np.float32 and up.shape == (8, 8)
    # align_corners=False: output column j samples x = (j + 0.5) / 2 - 0.5 (clamped at 0)
    np.testing.assert_allclose(up[3], [1, 1, 1, 0.75, 0.25, 0, 0, 0], atol=1e-6)

    gt = np.zeros((8, 8), np.uint8)
    gt[:, :4] = 1
    ev = Evaluator()
    ev.add_map(soft, gt, threshold=0.5, name="t05")  # columns 0..3 positive: perfect
    assert ev.per_image()["iou"].iloc[0] == pytest.approx(1.0)
    ev.add_map(soft, gt, threshold=0.8, name="t08")  # columns 0..2 positive
    row = ev.per_image().iloc[1]
    assert (row["tp"], row["fn"], row["fp"]) == (24, 8, 0)
    assert row["iou"] == pytest.approx(0.75)


def test_add_map_same_size_equals_thresholded_add():
    rng = np.random.default_rng(5)
    soft = rng.random((9, 11)).astype(np.float32)
    soft[0, :3] = np.float32(0.7)  # on the threshold: counts as positive (float32 comparison)
    gt = rng.integers(0, 2, (9, 11)).astype(np.uint8)
    a, b = Evaluator(), Evaluator()
    a.add_map(soft, gt, 0.7)
    b.add(soft >= np.float32(0.7), gt)
    np.testing.assert_array_equal(a.confusion, b.confusion)
    assert a.confusion[:, 1].sum() == np.count_nonzero(soft >= np.float32(0.7))


# --- the one-pass threshold sweep ---------------------------------------------------------


def _sweep_inputs(n_bins: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Maps of differing sizes (some need upsampling) with values exactly on the grid, 0, 1."""
    rng = np.random.default_rng(seed)
    specs = [((12, 17), (12, 17)), ((5, 7), (20, 28)), ((16, 16), (16, 16)), ((9, 4), (13, 11))]
    maps, gts = [], []
    grid = (np.arange(n_bins + 1) / n_bins).astype(np.float32)
    for map_shape, gt_shape in specs:
        m = rng.random(map_shape).astype(np.float32)
        on_grid = rng.random(map_shape) < 0.4
        m[on_grid] = rng.choice(grid, int(on_grid.sum()))
        m.flat[:3] = (0.0, 1.0, 1.0)
        g = (rng.random(gt_shape) < 0.5).astype(np.uint8)
        g[rng.random(gt_shape) < 0.1] = IGNORE
        maps.append(m)
        gts.append(g)
    # one map made only of grid points (all of them, repeated) to hit every float edge case
    all_points = np.resize(grid, (1, grid.size))
    maps.append(all_points)
    gts.append((np.arange(grid.size)[None] % 3 == 0).astype(np.uint8))
    return maps, gts


@pytest.mark.parametrize("n_bins", [100, 1000])
def test_one_pass_sweep_equals_naive_loop_at_every_threshold(n_bins):
    maps, gts = _sweep_inputs(n_bins)
    sweep = ThresholdSweep(n_bins)
    for m, g in zip(maps, gts):
        sweep.add(m, g)
    fast = sweep.counts()
    naive = sweep_naive(maps, gts, np.arange(n_bins + 1) / n_bins)
    assert fast.thresholds.shape == (n_bins + 1,)
    np.testing.assert_array_equal(fast.thresholds, naive.thresholds)
    for key in ("tp", "fp", "fn", "tn"):
        np.testing.assert_array_equal(getattr(fast, key), getattr(naive, key), err_msg=key)
    # at t = 0 every non-ignored pixel is predicted positive; totals are constant
    assert fast.fn[0] == 0 and fast.tn[0] == 0
    assert len(set((fast.tp + fast.fn).tolist())) == 1
    assert fast.n_images == len(maps)

    best_t, best_v = fast.best("iou")
    naive_iou = naive.metric("iou")
    i = int(np.nanargmax(naive_iou))
    assert best_t == naive.thresholds[i] and best_v == naive_iou[i]


@pytest.mark.parametrize("n_bins", [100, 1000])
def test_add_many_equals_naive_loop_and_is_all_or_nothing(n_bins):
    maps, gts = _sweep_inputs(n_bins, seed=3)
    # same-size runs (batched), a float64 map, a bool GT and an int64 GT with a large label
    rng = np.random.default_rng(4)
    grid = (np.arange(n_bins + 1) / n_bins).astype(np.float32)
    for k in range(5):
        m = rng.choice(grid, (16, 16)) if k % 2 else rng.random((16, 16)).astype(np.float32)
        maps.append(m.astype(np.float64) if k == 4 else m)
        g = (rng.random((16, 16)) < 0.5).astype(np.uint8)
        g[0, k] = IGNORE
        gts.append(g)
    gts.append(rng.random((16, 16)) < 0.5)
    maps.append(rng.choice(grid, (16, 16)))
    big = np.where(rng.random((16, 16)) < 0.5, 1, 300).astype(np.int64)
    gts.append(big)
    maps.append(rng.random((16, 16)).astype(np.float32))
    sweep = ThresholdSweep(n_bins, ignore_index=300)
    naive = sweep_naive(maps[-1:], gts[-1:], np.arange(n_bins + 1) / n_bins, ignore_index=300)
    sweep.add_many(maps[-1:], gts[-1:])
    np.testing.assert_array_equal(sweep.counts().tp, naive.tp)
    np.testing.assert_array_equal(sweep.counts().fp, naive.fp)
    maps, gts = maps[:-1], gts[:-1]
    for positive in (0, 1):
        sweep = ThresholdSweep(n_bins)
        sweep.add_many(maps, gts, positive=positive)
        fast = sweep.counts()
        naive = sweep_naive(maps, gts, np.arange(n_bins + 1) / n_bins, positive=positive)
        for key in ("tp", "fp", "fn", "tn"):
            np.testing.assert_array_equal(getattr(fast, key), getattr(naive, key), err_msg=key)
        assert fast.n_images == len(maps)
    bad_gt = [g.copy() for g in gts[-3:]]
    bad_gt[1] = np.full_like(bad_gt[1], 2)
    with pytest.raises(ValueError, match=r"found \[2\].*'b'"):
        sweep.add_many(maps[-3:], bad_gt, names=["a", "b", "c"])
    bad_map = [m.copy() for m in maps[-3:]]
    bad_map[2] = np.full((16, 16), 1.5, np.float32)
    with pytest.raises(ValueError, match=r"\[0, 1\].*'#2'"):
        sweep.add_many(bad_map, gts[-3:])
    assert sweep.counts().n_images == len(maps)  # failed calls changed nothing
    np.testing.assert_array_equal(sweep.counts().tp, fast.tp)


def test_bin_index_is_exact_for_float32_values_around_every_grid_point():
    edge_case_seen = False
    for n_bins in (100, 255, 1000):
        grid32 = (np.arange(n_bins + 1) / n_bins).astype(np.float32)
        values = np.concatenate(
            [
                grid32,
                np.nextafter(grid32, np.float32(-1)),
                np.nextafter(grid32, np.float32(2)),
            ]
        )
        values = np.clip(values, 0, 1).astype(np.float32)
        want = np.searchsorted(grid32, values, side="right") - 1
        got = ThresholdSweep(n_bins).bin_index(values)
        np.testing.assert_array_equal(got, want, err_msg=f"n_bins={n_bins}")
        # the float edge case: grid points that float32 rounds below i / n_bins
        floor = np.floor(grid32.astype(np.float64) * n_bins)
        edge_case_seen |= bool(np.any(floor < np.arange(n_bins + 1)))
    assert edge_case_seen


def test_sweep_at_matches_evaluator_add_map():
    maps, gts = _sweep_inputs(100, seed=1)
    sweep = ThresholdSweep(100)
    for m, g in zip(maps, gts):
        sweep.add(m, g)
    counts = sweep.counts()
    for t in (0.0, 0.07, 0.3, 0.7, 1.0):
        ev = Evaluator()
        for m, g in zip(maps, gts):
            ev.add_map(m, g, t)
        want = ev.dataset_metrics()
        got = counts.at(t)
        for key in (*METRICS, "tp", "fp", "fn", "tn"):
            assert got[key] == pytest.approx(want[key], nan_ok=True), (t, key)


def test_sweep_positive_zero_and_bad_gt():
    rng = np.random.default_rng(2)
    m = rng.random((6, 6)).astype(np.float32)
    g = rng.integers(0, 2, (6, 6)).astype(np.uint8)
    sweep = ThresholdSweep(20)
    sweep.add(m, g, positive=0)
    naive = sweep_naive([m], [g], np.arange(21) / 20, positive=0)
    np.testing.assert_array_equal(sweep.counts().tp, naive.tp)
    np.testing.assert_array_equal(sweep.counts().fp, naive.fp)
    ev = Evaluator(positive=0)
    ev.add_map(m, g, 0.35)
    assert ev.dataset_metrics()["tp"] == sweep.counts().at(0.35)["tp"]
    assert ev.dataset_metrics()["fp"] == sweep.counts().at(0.35)["fp"]
    trimap = np.full((6, 6), 2, np.uint8)
    with pytest.raises(ValueError, match=r"found \[2\].*'Bengal_3'"):
        sweep.add(m, trimap, name="Bengal_3")
    assert sweep.counts().n_images == 1  # the failed add changed nothing


def test_sweep_counts_best_ties_metric_names_and_grid():
    counts = SweepCounts(
        thresholds=np.array([0.0, 0.5, 1.0]),
        tp=np.array([5, 5, 0]),
        fp=np.array([5, 5, 0]),
        fn=np.array([0, 0, 5]),
        tn=np.array([0, 0, 5]),
    )
    assert counts.best("iou") == (0.0, 0.5)  # tie between 0.0 and 0.5 -> lowest threshold
    assert counts.best("precision") == (0.0, 0.5)  # NaN at t = 1 is skipped
    assert math.isnan(counts.metric("precision")[2])
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        counts.metric("f1")
    with pytest.raises(ValueError, match="not on the sweep grid"):
        counts.at(0.25)
    assert counts.at(0.5)["tp"] == 5.0
