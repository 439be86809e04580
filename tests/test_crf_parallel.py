"""``dense_crf_many``: the process-parallel CRF gives the serial loop's result, in order."""

from __future__ import annotations

import numpy as np
import pytest

from methods.common.crf import CRFKernels, dense_crf, dense_crf_many


def _inputs(n: int, size: int = 24) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    images, probs = [], []
    for i in range(n):
        img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        img[:, : size // 2 + i % 3] = 200  # a different edge per image: order matters
        p = np.clip(rng.random((size, size), dtype=np.float32), 0.05, 0.95)
        images.append(img)
        probs.append(np.stack([1 - p, p]))
    return images, probs


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_parallel_equals_serial_in_order(workers):
    images, probs = _inputs(7)
    serial = [dense_crf(im, pr, CRFKernels(iters=3)) for im, pr in zip(images, probs)]
    parallel = dense_crf_many(images, probs, workers=workers, kernels=CRFKernels(iters=3))
    assert len(parallel) == len(serial)
    for a, b in zip(parallel, serial):
        np.testing.assert_array_equal(a, b)


def test_array_inputs_and_errors():
    images, probs = _inputs(3)
    out = dense_crf_many(np.stack(images), np.stack(probs), workers=2)
    assert [q.shape for q in out] == [(2, 24, 24)] * 3
    with pytest.raises(ValueError, match="3 images but 2"):
        dense_crf_many(images, probs[:2])
    with pytest.raises(ValueError, match="workers"):
        dense_crf_many(images, probs, workers=0)
    with pytest.raises(TypeError, match="uint8"):
        dense_crf_many([im.astype(np.float32) for im in images], probs, workers=2)
    assert dense_crf_many([], [], workers=2) == []
