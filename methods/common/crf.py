"""Fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011) through pydensecrf2.

Runs on the original uint8 RGB image, never on a normalised tensor (the bilateral kernel's
``srgb`` is in 0..255 colour units). Defaults (METHODS.md): 10 mean-field iterations, Gaussian
kernel sxy=3 compat=3, bilateral kernel sxy=50 srgb=5 compat=10; ``unary_from_softmax`` for
soft inputs and ``unary_from_labels`` (gt_prob 0.7) for label inputs.

:func:`dense_crf_many` runs :func:`dense_crf` over many images in a process pool (pydensecrf
holds the GIL, so threads would not help); images are independent, so the speed-up is close to
the number of cores.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

from datasets.conventions import IGNORE

logger = logging.getLogger(__name__)


def _check_image(image: np.ndarray, hw: tuple[int, int] | None = None) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        dtype = getattr(image, "dtype", type(image).__name__)
        raise TypeError(
            f"dense CRF needs the original uint8 RGB image (H, W, 3), got dtype {dtype}; "
            f"do not pass a normalised float tensor"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"dense CRF needs an RGB image of shape (H, W, 3); got {image.shape}")
    if hw is not None and image.shape[:2] != hw:
        raise ValueError(f"image is {image.shape[:2]} but the map is {hw}")
    # pydensecrf takes a writable C buffer: images from the read-only memory-mapped cache are
    # copied (one image, 3 bytes a pixel), others are passed through
    return np.require(image, dtype=np.uint8, requirements=("C", "W"))


@dataclass(frozen=True)
class CRFKernels:
    """Mean-field iterations and the two pairwise kernels of the dense CRF (METHODS.md defaults).

    Attributes:
        iters: mean-field iterations.
        gauss_sxy: Gaussian kernel spatial std (pixels).
        gauss_compat: Gaussian kernel weight.
        bilat_sxy: bilateral kernel spatial std (pixels).
        bilat_srgb: bilateral kernel colour std (0..255 units).
        bilat_compat: bilateral kernel weight.
    """

    iters: int = 10
    gauss_sxy: float = 3
    gauss_compat: float = 3
    bilat_sxy: float = 50
    bilat_srgb: float = 5
    bilat_compat: float = 10


DEFAULT_KERNELS = CRFKernels()


def _crf(image: np.ndarray, unary: np.ndarray, n_labels: int, k: CRFKernels) -> np.ndarray:
    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=k.gauss_sxy, compat=k.gauss_compat)
    d.addPairwiseBilateral(sxy=k.bilat_sxy, srgb=k.bilat_srgb, rgbim=image, compat=k.bilat_compat)
    q = d.inference(int(k.iters))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def dense_crf(
    image: np.ndarray, probs: np.ndarray, kernels: CRFKernels = DEFAULT_KERNELS
) -> np.ndarray:
    """Refine soft class probabilities with a dense CRF.

    Args:
        image: uint8 RGB image (H, W, 3).
        probs: (L, H, W) class probabilities (e.g. L = 2: background, pet); clipped at 1e-5.
        kernels: iterations and pairwise kernels.

    Returns:
        (L, H, W) float32 posterior marginals.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"dense_crf expects probs of shape (L>=2, H, W); got {probs.shape}")
    image = _check_image(image, probs.shape[1:])
    unary = unary_from_softmax(probs)  # (L, H*W) = -log p
    return _crf(image, unary, probs.shape[0], kernels)


def crf_labels(
    image: np.ndarray,
    labels: np.ndarray,
    gt_prob: float = 0.7,
    n_labels: int = 2,
    kernels: CRFKernels = DEFAULT_KERNELS,
) -> np.ndarray:
    """Clean a hard label map with a dense CRF; ignored pixels (255) start uniform.

    Args:
        image: uint8 RGB image (H, W, 3).
        labels: (H, W) integer labels in ``0..n_labels-1`` or 255 (unsure).
        gt_prob: confidence given to the input labels.
        n_labels: number of classes (2: background, pet).
        kernels: iterations and pairwise kernels.

    Returns:
        (H, W) uint8 labels in ``0..n_labels-1`` (the CRF's argmax).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"crf_labels expects an (H, W) label map; got {labels.shape}")
    valid = labels != IGNORE
    if valid.any() and (labels[valid].min() < 0 or labels[valid].max() >= n_labels):
        raise ValueError(f"labels must be in 0..{n_labels - 1} or {IGNORE}")
    image = _check_image(image, labels.shape)
    shifted = np.where(valid, labels.astype(np.int64) + 1, 0)  # 0 = unsure for pydensecrf
    unary = unary_from_labels(shifted, n_labels, gt_prob=gt_prob, zero_unsure=True)
    return _crf(image, unary, n_labels, kernels).argmax(axis=0).astype(np.uint8)


def default_workers() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def _crf_chunk(
    images: Sequence[np.ndarray], probs: Sequence[np.ndarray], kernels: CRFKernels
) -> list[np.ndarray]:
    return [dense_crf(im, pr, kernels) for im, pr in zip(images, probs)]


def dense_crf_many(
    images: Sequence[np.ndarray] | np.ndarray,
    probs: Sequence[np.ndarray] | np.ndarray,
    workers: int | None = None,
    kernels: CRFKernels = DEFAULT_KERNELS,
) -> list[np.ndarray]:
    """:func:`dense_crf` over many images, in parallel across processes.

    Images are split into contiguous chunks (about four per worker, to balance uneven images)
    and run in a ``ProcessPoolExecutor``; the result is the same as the serial loop, in the
    input order. The pool uses ``fork`` where available (children need no imports) and is
    skipped entirely for ``workers=1`` or a single image.

    Args:
        images: N uint8 RGB images (H, W, 3), a list or an (N, H, W, 3) array (a memory map
            is fine: only each chunk is read and pickled to its worker).
        probs: N class-probability arrays (L, H, W), a list or an (N, L, H, W) array.
        workers: processes to use; default: the cores this process may use.
        kernels: iterations and pairwise kernels of every image's CRF.

    Returns:
        N (L, H, W) float32 posterior marginals, in input order.

    Raises:
        ValueError: ``images`` and ``probs`` differ in length, or ``workers < 1``.
    """
    n = len(images)
    if len(probs) != n:
        raise ValueError(f"dense_crf_many: {n} images but {len(probs)} probability maps")
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"dense_crf_many: workers must be >= 1, got {workers}")
    workers = min(workers, n)
    if multiprocessing.current_process().daemon:  # a daemonic pool worker may not fork
        workers = 1
    if workers <= 1:
        return [dense_crf(images[i], probs[i], kernels) for i in range(n)]
    chunks = min(n, 4 * workers)
    bounds = np.linspace(0, n, chunks + 1).astype(int)
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    out: list[np.ndarray] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [
            pool.submit(
                _crf_chunk,
                [np.asarray(images[i]) for i in range(a, b)],
                [np.asarray(probs[i]) for i in range(a, b)],
                kernels,
            )
            for a, b in zip(bounds[:-1], bounds[1:])
        ]
        for future in futures:
            out.extend(future.result())
    logger.debug("dense_crf_many: %d images on %d processes", n, workers)
    return out
