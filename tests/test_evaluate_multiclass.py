"""Multi-class evaluation (VOC protocol) against a plain per-image numpy reference.

The reference below is written independently of ``benchmark.evaluate``: a per-image loop over
(GT class, predicted class) pairs, per-class ratios with Python floats, and label maps made the
way IRNet's ``eval_cam.py`` makes them (maps padded with a background channel, ``np.argmax``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from benchmark.evaluate import (
    IGNORE,
    BackgroundCurve,
    Evaluator,
    SweepCounts,
    ThresholdSweep,
    accumulate_confusion,
    class_iou,
    labels_from_scores,
    mean_iou,
    metrics_from_confusion,
    multiclass_metrics,
    power_background,
    threshold_map,
    upsample_scores,
)


# ---- the reference ---------------------------------------------------------------------------
def ref_confusion(preds, gts, k: int) -> np.ndarray:
    cm = np.zeros((k, k), dtype=np.int64)
    for pred, gt in zip(preds, gts):
        for g in range(k):
            for p in range(k):
                cm[g, p] += int(np.sum((gt == g) & (pred == p)))
    return cm


def ref_scores(cm: np.ndarray) -> dict:
    k = cm.shape[0]
    iou, prec, rec = [], [], []
    for c in range(k):
        tp = int(cm[c, c])
        gt_c, pred_c = int(cm[c, :].sum()), int(cm[:, c].sum())
        union = gt_c + pred_c - tp
        iou.append(tp / union if union else math.nan)
        prec.append(tp / pred_c if pred_c else math.nan)
        rec.append(tp / gt_c if gt_c else math.nan)

    def mean(values):
        kept = [v for v in values if not math.isnan(v)]
        return sum(kept) / len(kept) if kept else math.nan

    total = int(cm.sum())
    return {
        "iou": iou,
        "miou": mean(iou),
        "precision": mean(prec),
        "recall": mean(rec),
        "accuracy": int(np.trace(cm)) / total if total else math.nan,
    }


def ref_labels(scores, tags, threshold: float) -> np.ndarray:
    """IRNet's eval_cam.py: pad the tagged maps with a background channel, argmax, map keys."""
    out = []
    for cams, tag in zip(scores, tags):
        keys = np.flatnonzero(tag)  # the tagged classes
        padded = np.concatenate(
            [np.full((1, *cams.shape[1:]), threshold, dtype=np.float32), cams[keys]]
        )
        label_keys = np.concatenate([[0], keys + 1])
        out.append(label_keys[np.argmax(padded, axis=0)])
    return np.stack(out).astype(np.uint8)


def close(a, b) -> bool:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(np.allclose(a, b, rtol=0, atol=1e-12, equal_nan=True))


def _random_case(rng, n=5, k=6, size=(9, 11), absent=(4,), ignore_share=0.15):
    gts, preds = [], []
    classes = [c for c in range(k) if c not in absent]
    for _ in range(n):
        gt = rng.choice(classes, size=size).astype(np.uint8)
        gt[rng.random(size) < ignore_share] = IGNORE
        gts.append(gt)
        preds.append(rng.choice([c for c in classes if c != 5], size=size).astype(np.uint8))
    return preds, gts


# ---- the confusion matrix and its scores ---------------------------------------------------
def test_hand_computed_three_class_example():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, IGNORE]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 2]], dtype=np.uint8)  # pred 2 at 255 not counted
    cm = accumulate_confusion([pred], [gt], 3)
    assert cm.tolist() == [[2, 1, 0], [0, 2, 0], [1, 0, 1]]
    s = multiclass_metrics(cm)
    # IoU: bg 2/(3+3-2) = 1/2, class 1 2/(2+3-2) = 2/3, class 2 1/(2+1-1) = 1/2
    assert close(s.iou, [1 / 2, 2 / 3, 1 / 2])
    assert s.miou == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert s.accuracy == pytest.approx(5 / 7)
    assert s.mean_precision == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert s.mean_recall == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)
    assert s.n_classes == 3


def test_random_splits_match_the_reference_and_sklearn():
    rng = np.random.default_rng(0)
    preds, gts = _random_case(rng)
    cm = accumulate_confusion(preds, gts, 6)
    assert cm.tolist() == ref_confusion(preds, gts, 6).tolist()
    valid = np.concatenate([g.ravel() for g in gts]) != IGNORE
    sk = sk_confusion_matrix(
        np.concatenate([g.ravel() for g in gts])[valid],
        np.concatenate([p.ravel() for p in preds])[valid],
        labels=list(range(6)),
    )
    assert cm.tolist() == sk.tolist()
    ref = ref_scores(cm)
    s = multiclass_metrics(cm)
    assert close(s.iou, ref["iou"])
    for key, got in (("miou", s.miou), ("accuracy", s.accuracy)):
        assert close(got, ref[key])
    assert close(s.mean_precision, ref["precision"]) and close(s.mean_recall, ref["recall"])


def test_absent_classes_are_excluded_from_the_mean():
    rng = np.random.default_rng(1)
    preds, gts = _random_case(rng, absent=(4,))  # 4 never in GT or prediction; 5 GT only
    s = multiclass_metrics(accumulate_confusion(preds, gts, 6))
    assert math.isnan(s.iou[4]) and s.iou[5] == 0.0  # 5: in the GT, never predicted
    assert s.n_classes == 5
    assert s.miou == pytest.approx(np.mean(np.delete(s.iou, 4)))
    assert math.isnan(s.precision[5]) and s.recall[5] == 0.0
    d = s.as_dict()
    assert math.isnan(d["iou_4"]) and d["miou"] == s.miou and d["precision"] == s.mean_precision


def test_predicted_class_absent_from_gt_counts_as_zero():
    gt = np.zeros((2, 2), dtype=np.uint8)
    pred = np.array([[0, 2], [0, 0]], dtype=np.uint8)
    s = multiclass_metrics(accumulate_confusion([pred], [gt], 3))
    assert close(s.iou, [3 / 4, math.nan, 0.0])
    assert s.miou == pytest.approx(3 / 8)


def test_ignored_and_empty_images_add_nothing():
    rng = np.random.default_rng(2)
    preds, gts = _random_case(rng, n=3)
    base = accumulate_confusion(preds, gts, 6)
    all_ignored = np.full((4, 4), IGNORE, dtype=np.uint8)
    empty = np.zeros((0, 0), dtype=np.uint8)
    more = accumulate_confusion(
        [*preds, np.full((4, 4), 3, np.uint8), empty], [*gts, all_ignored, empty], 6
    )
    assert more.tolist() == base.tolist()
    nothing = multiclass_metrics(accumulate_confusion([empty], [empty], 6))
    assert math.isnan(nothing.miou) and math.isnan(nothing.accuracy) and nothing.n_classes == 0


def test_invalid_inputs_name_the_image():
    gt = np.array([[0, 7]], dtype=np.uint8)
    with pytest.raises(ValueError, match="found \\[7\\].*'b'"):
        accumulate_confusion(
            [np.zeros((1, 2), np.uint8)] * 2, [np.zeros_like(gt), gt], 3, names=["a", "b"]
        )
    with pytest.raises(ValueError, match="prediction values"):
        accumulate_confusion([np.array([[3]])], [np.array([[0]])], 3)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        accumulate_confusion([gt, gt], [gt], 3)
    with pytest.raises(ValueError, match="K >= 2"):
        multiclass_metrics(np.zeros((1, 1), np.int64))


def test_same_numbers_as_the_binary_evaluator_for_two_classes():
    rng = np.random.default_rng(3)
    preds, gts = _random_case(rng, k=2, absent=(), ignore_share=0.2)
    preds = [np.clip(p, 0, 1) for p in preds]
    cm = accumulate_confusion(preds, gts, 2)
    s = multiclass_metrics(cm)
    binary = metrics_from_confusion(cm)
    ev = Evaluator()
    for i, (p, g) in enumerate(zip(preds, gts)):
        ev.add(p, g, name=str(i))
    assert s.iou[1] == pytest.approx(binary["iou"]) == pytest.approx(ev.dataset_metrics()["iou"])
    assert s.miou == pytest.approx(binary["miou"]) and s.accuracy == pytest.approx(
        binary["accuracy"]
    )
    assert close(class_iou(cm), [binary["iou_0"], binary["iou_1"]])


def test_mean_iou_is_vectorised_over_stacked_matrices():
    rng = np.random.default_rng(4)
    cms = rng.integers(0, 5, size=(7, 4, 4))
    cms[2] = 0
    got = mean_iou(cms)
    for cm, value in zip(cms, got):
        assert close(value, ref_scores(cm)["miou"])


# ---- label maps from class scores ----------------------------------------------------------
def _scores(rng, n=4, c=5, size=(6, 7), grid=None):
    scores = rng.random((n, c, *size)).astype(np.float32)
    if grid:  # values on a threshold grid, so that ties with the background occur
        scores = (np.round(scores * grid) / grid).astype(np.float32)
    tags = rng.random((n, c)) < 0.5
    tags[0] = False  # an image without tags: all background
    tags[1, 2] = True
    return scores, tags


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 1.0])
def test_labels_match_irnet_argmax_with_ties_to_background(threshold):
    scores, tags = _scores(np.random.default_rng(5), grid=10)
    got = labels_from_scores(scores, tags, threshold)
    assert got.dtype == np.uint8
    assert got.tolist() == ref_labels(scores, tags, threshold).tolist()
    assert not got[0].any()


def test_untagged_classes_are_never_predicted():
    scores = np.zeros((1, 3, 2, 2), dtype=np.float32)
    scores[0, 0] = 1.0  # class 1 everywhere, untagged
    scores[0, 2] = 0.4
    got = labels_from_scores(scores, np.array([[False, False, True]]), 0.2)
    assert set(np.unique(got).tolist()) == {3}


def test_power_background_matches_psa():
    rng = np.random.default_rng(6)
    scores, tags = _scores(rng)
    alpha = 4.0
    got = labels_from_scores(scores, tags, alpha=alpha)
    for i, (cams, tag) in enumerate(zip(scores, tags)):
        keys = np.flatnonzero(tag)
        if keys.size == 0:
            assert not got[i].any()
            continue
        bg = np.power(1 - np.max(cams[keys], axis=0), np.float32(alpha), dtype=np.float32)
        padded = np.concatenate([bg[None], cams[keys]])
        assert got[i].tolist() == np.concatenate([[0], keys + 1])[np.argmax(padded, 0)].tolist()
    bg = power_background(scores, tags, alpha)
    assert bg.shape == (4, 6, 7) and bg.dtype == np.float32 and (bg[0] == 1).all()
    with pytest.raises(ValueError, match="exactly one"):
        labels_from_scores(scores, tags, 0.5, alpha=alpha)
    with pytest.raises(ValueError, match="alpha"):
        labels_from_scores(scores, tags, alpha=0.0)


def test_label_input_checks():
    scores = np.zeros((1, 2, 3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="tags must be"):
        labels_from_scores(scores, np.ones((1, 3), bool), 0.5)
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        labels_from_scores(scores + 2, np.ones((1, 2), bool), 0.5)
    with pytest.raises(ValueError, match="\\(N, C, h, w\\)"):
        labels_from_scores(scores[0], np.ones((1, 2), bool), 0.5)


def test_one_class_with_class_ties_is_the_binary_rule():
    rng = np.random.default_rng(7)
    maps = (np.round(rng.random((3, 1, 5, 6)) * 10) / 10).astype(np.float32)
    tags = np.ones((3, 1), bool)
    for t in (0.0, 0.3, 1.0):
        got = labels_from_scores(maps, tags, t, bg_wins_ties=False)
        want = [threshold_map(m[0], m[0].shape, t) for m in maps]
        assert got.astype(bool).tolist() == np.stack(want).tolist()


# ---- the background-threshold curve --------------------------------------------------------
def _curve_case(seed: int, grid: int | None):
    rng = np.random.default_rng(seed)
    scores, tags = _scores(rng, n=4, c=3, size=(5, 6), grid=grid)
    gts = []
    for i in range(len(scores)):
        size = (8, 9) if i % 2 else (5, 6)  # upsampled, or at the maps' size (exact ties)
        gt = rng.integers(0, 4, size=size).astype(np.uint8)
        gt[rng.random(gt.shape) < 0.1] = IGNORE
        gts.append(gt)
    gts[1][:] = IGNORE  # an image whose pixels are all ignored
    return scores, tags, gts


@pytest.mark.parametrize("bg_wins_ties", [True, False])
@pytest.mark.parametrize("grid", [None, 10])
def test_curve_equals_scoring_every_threshold_directly(bg_wins_ties, grid):
    scores, tags, gts = _curve_case(8, grid)
    thresholds = np.arange(21) / 20
    curve = BackgroundCurve(4, thresholds, bg_wins_ties=bg_wins_ties)
    for s, t, g in zip(scores, tags, gts):
        curve.add(s, t, g)
    ups = [upsample_scores(s, g.shape)[None] for s, g in zip(scores, gts)]
    cms = curve.confusions()
    for j, th in enumerate(thresholds):
        preds = [
            labels_from_scores(u, t[None], th, bg_wins_ties=bg_wins_ties)[0]
            for u, t in zip(ups, tags)
        ]
        direct = accumulate_confusion(preds, gts, 4)
        assert cms[j].tolist() == direct.tolist(), th
        assert close(curve.miou()[j], multiclass_metrics(direct).miou)
    best_t, best_v = curve.best()
    assert best_v == pytest.approx(np.nanmax(curve.miou()))
    assert best_t == thresholds[int(np.nanargmax(curve.miou()))]


def test_curve_for_one_class_matches_the_binary_sweep():
    rng = np.random.default_rng(9)
    maps = (np.round(rng.random((5, 12, 10)) * 100) / 100).astype(np.float32)  # on the grid
    gts = [(rng.random((12, 10)) < 0.4).astype(np.uint8) for _ in range(5)]
    gts[0][:3] = IGNORE
    curve = BackgroundCurve(2, np.arange(101) / 100, bg_wins_ties=False)
    sweep = ThresholdSweep(n_bins=100)
    for m, g in zip(maps, gts):
        curve.add(m[None], np.array([True]), g)
    sweep.add_many(maps, gts)
    counts: SweepCounts = sweep.counts()
    assert close(class_iou(curve.confusions())[:, 1], counts.metric("iou"))


def test_curve_input_checks():
    with pytest.raises(ValueError, match="ascending"):
        BackgroundCurve(3, [0.5, 0.2])
    curve = BackgroundCurve(3)
    with pytest.raises(ValueError, match="C \\+ 1 = 3"):
        curve.add(np.zeros((3, 2, 2)), np.ones(3, bool), np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="found \\[9\\]"):
        curve.add(np.zeros((2, 2, 2)), np.ones(2, bool), np.full((2, 2), 9, np.uint8))
    with pytest.raises(ValueError, match="undefined"):
        curve.best()
