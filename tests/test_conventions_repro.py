"""The WeakTR-Refinery convention scores background: why its published IoU is not a pet IoU."""

from __future__ import annotations

import numpy as np
import pytest

from benchmark.evaluate import Evaluator
from datasets import trimap_to_mask


def test_all_background_prediction_under_both_conventions(tiny_dataset):
    ours, theirs = Evaluator(), Evaluator()
    bg_pixels = total = 0
    for record in tiny_dataset.records:
        trimap = tiny_dataset.load_trimap(record)
        pet_pred = np.zeros(trimap.shape, np.uint8)  # "everything is background"
        ours.add(pet_pred, trimap_to_mask(trimap, "pet"))
        # the repository's positive class is background + border: predicting "all background"
        # means predicting its positive class everywhere
        theirs.add(1 - pet_pred, trimap_to_mask(trimap, "weaktr_refinery"))
        bg_pixels += int(np.isin(trimap, (2, 3)).sum())
        total += trimap.size
    assert ours.dataset_metrics()["iou"] == 0.0
    # under the repository's convention the same useless prediction scores the background share
    assert theirs.dataset_metrics()["iou"] == pytest.approx(bg_pixels / total)
    assert theirs.dataset_metrics()["iou"] > 0.5


def test_conventions_map_trimap_values():
    trimap = np.array([[1, 2, 3]], np.uint8)
    assert trimap_to_mask(trimap, "pet").tolist() == [[1, 0, 255]]
    assert trimap_to_mask(trimap, "pet_with_border").tolist() == [[1, 0, 1]]
    assert trimap_to_mask(trimap, "weaktr_refinery").tolist() == [[0, 1, 1]]
