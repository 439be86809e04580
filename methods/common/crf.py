"""Fully connected CRF (Kraehenbuehl & Koltun, NIPS 2011) through pydensecrf2.

Runs on the original uint8 RGB image, never on a normalised tensor (the bilateral kernel's
``srgb`` is in 0..255 colour units). Defaults (METHODS.md): 10 mean-field iterations, Gaussian
kernel sxy=3 compat=3, bilateral kernel sxy=50 srgb=5 compat=10; ``unary_from_softmax`` for
soft inputs and ``unary_from_labels`` (gt_prob 0.7) for label inputs.
"""

from __future__ import annotations

import logging

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

logger = logging.getLogger(__name__)

IGNORE = 255


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
    return np.ascontiguousarray(image)


def _crf(
    image: np.ndarray,
    unary: np.ndarray,
    n_labels: int,
    iters: int,
    gauss_sxy: float,
    gauss_compat: float,
    bilat_sxy: float,
    bilat_srgb: float,
    bilat_compat: float,
) -> np.ndarray:
    h, w = image.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=gauss_sxy, compat=gauss_compat)
    d.addPairwiseBilateral(sxy=bilat_sxy, srgb=bilat_srgb, rgbim=image, compat=bilat_compat)
    q = d.inference(int(iters))
    return np.asarray(q, dtype=np.float32).reshape(n_labels, h, w)


def dense_crf(
    image: np.ndarray,
    probs: np.ndarray,
    iters: int = 10,
    gauss_sxy: float = 3,
    gauss_compat: float = 3,
    bilat_sxy: float = 50,
    bilat_srgb: float = 5,
    bilat_compat: float = 10,
) -> np.ndarray:
    """Refine soft class probabilities with a dense CRF.

    Args:
        image: uint8 RGB image (H, W, 3).
        probs: (L, H, W) class probabilities (e.g. L = 2: background, pet); clipped at 1e-5.
        iters: mean-field iterations.
        gauss_sxy: Gaussian kernel spatial std (pixels).
        gauss_compat: Gaussian kernel weight.
        bilat_sxy: bilateral kernel spatial std (pixels).
        bilat_srgb: bilateral kernel colour std (0..255 units).
        bilat_compat: bilateral kernel weight.

    Returns:
        (L, H, W) float32 posterior marginals.
    """
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3 or probs.shape[0] < 2:
        raise ValueError(f"dense_crf expects probs of shape (L>=2, H, W); got {probs.shape}")
    image = _check_image(image, probs.shape[1:])
    unary = unary_from_softmax(probs)  # (L, H*W) = -log p
    return _crf(
        image, unary, probs.shape[0], iters, gauss_sxy, gauss_compat, bilat_sxy, bilat_srgb,
        bilat_compat,
    )  # fmt: skip


def crf_labels(
    image: np.ndarray,
    labels: np.ndarray,
    gt_prob: float = 0.7,
    n_labels: int = 2,
    iters: int = 10,
    gauss_sxy: float = 3,
    gauss_compat: float = 3,
    bilat_sxy: float = 50,
    bilat_srgb: float = 5,
    bilat_compat: float = 10,
) -> np.ndarray:
    """Clean a hard label map with a dense CRF; ignored pixels (255) start uniform.

    Args:
        image: uint8 RGB image (H, W, 3).
        labels: (H, W) integer labels in ``0..n_labels-1`` or 255 (unsure).
        gt_prob: confidence given to the input labels.
        n_labels: number of classes (2: background, pet).
        iters: mean-field iterations.
        gauss_sxy: Gaussian kernel spatial std (pixels).
        gauss_compat: Gaussian kernel weight.
        bilat_sxy: bilateral kernel spatial std (pixels).
        bilat_srgb: bilateral kernel colour std (0..255 units).
        bilat_compat: bilateral kernel weight.

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
    q = _crf(
        image, unary, n_labels, iters, gauss_sxy, gauss_compat, bilat_sxy, bilat_srgb,
        bilat_compat,
    )  # fmt: skip
    return q.argmax(axis=0).astype(np.uint8)
