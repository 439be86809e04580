"""Small data helpers shared by the methods: normalisation, minibatches, flips, autocast, seeding.

Images reach methods as uint8 (N, H, W, 3) arrays, often memory maps: convert them per
minibatch with :func:`to_tensor`, never the whole set at once.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from methods.common.weights import IMAGENET_MEAN, IMAGENET_STD, Normalization

logger = logging.getLogger(__name__)

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Normalization", "to_tensor"]


def check_loss(loss: torch.Tensor, where: str, step: int) -> float:
    """Return the loss as a float; raise FloatingPointError if it is NaN or inf.

    Call it once per step, before ``backward()``, so that a diverged training stops with a
    clear reason instead of caching NaN weights.

    Args:
        loss: the scalar loss of this step.
        where: the method and stage, for the message (``cam classifier``).
        step: the step number, for the message.
    """
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{where}: training loss became {value} at step {step} (diverged; try a lower "
            "learning rate or check the inputs)"
        )
    return value


def to_tensor(
    images: np.ndarray, device: torch.device | str = "cpu", norm: Normalization | None = None
) -> torch.Tensor:
    """Convert uint8 (N, H, W, 3) images to a normalised float tensor (N, 3, H, W).

    Args:
        images: uint8 RGB images, channels last (a memory-map slice is fine).
        device: where the tensor should live.
        norm: the normalisation of the network's weights (``backbone.input_norm``, see
            :func:`methods.common.weights.normalization`); ``None``: ImageNet mean/std.

    Returns:
        float32 tensor (N, 3, H, W), ``(x / 255 - mean) / std``.

    Raises:
        ValueError: if ``images`` is not uint8 with shape (N, H, W, 3).
    """
    arr = np.asarray(images)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(
            f"to_tensor expects uint8 images of shape (N, H, W, 3); got {arr.dtype} {arr.shape}"
        )
    x = torch.from_numpy(np.array(arr, copy=True)).to(device)  # (N, H, W, 3) uint8, writable
    x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (N, 3, H, W) in [0, 1]
    norm = norm or Normalization()
    mean = torch.tensor(norm.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(norm.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def stage_epochs(
    epochs: int, n: int, batch_size: int, min_steps: int = 0, drop_last: bool = False
) -> int:
    """Epochs a training stage runs: ``epochs``, raised to reach at least ``min_steps`` steps.

    A recipe given in epochs trains a 50-image set for a tenth of the steps of a 500-image one;
    ``min_steps`` (the ``quick`` presets: the steps their epochs give on the synthetic train
    split) keeps small real sets from being trained for a handful of steps.

    Args:
        epochs: the recipe's epochs.
        n: training items.
        batch_size: items per step.
        min_steps: the least number of optimiser steps (0: ``epochs`` as given).
        drop_last: whether a last, smaller minibatch is dropped (when ``n > batch_size``).
    """
    full = n // batch_size if drop_last and n > batch_size else -(-n // batch_size)
    return max(epochs, -(-min_steps // max(1, full)))


def minibatches(
    n: int,
    batch_size: int,
    generator: torch.Generator | None = None,
    shuffle: bool = True,
    drop_last: bool = False,
) -> Iterator[np.ndarray]:
    """Yield index arrays covering ``range(n)`` in minibatches.

    Args:
        n: number of items.
        batch_size: items per minibatch (>= 1).
        generator: seeds the shuffle (required for reproducible order when ``shuffle``).
        shuffle: permute the indices first.
        drop_last: drop a last, smaller minibatch.

    Yields:
        int64 index arrays of length ``batch_size`` (the last one may be shorter).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle:
        order = torch.randperm(n, generator=generator).numpy()
    else:
        order = np.arange(n, dtype=np.int64)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and len(idx) < batch_size:
            return
        yield idx


def flip_flags(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` fair coin flips (bool tensor) from ``generator``."""
    return torch.rand(n, generator=generator) < 0.5


def apply_hflip(x: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """Flip left-right the items of ``x`` (N, ..., W) whose flag is True."""
    if not bool(flags.any()):
        return x
    flags = flags.to(x.device)
    out = x.clone()
    out[flags] = torch.flip(x[flags], dims=(-1,))
    return out


def hflip_random(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each item of ``x`` (N, ..., W) left-right with probability 1/2.

    To flip images and masks together, draw :func:`flip_flags` once and call
    :func:`apply_hflip` on each tensor.
    """
    return apply_hflip(x, flip_flags(x.shape[0], generator))


def place(model: nn.Module, ctx: Any) -> nn.Module:
    """Move a network to ``ctx.device``, in channels_last when ``ctx.channels_last`` is set.

    channels_last (NHWC) is the memory format oneDNN and cuDNN run convolutions fastest in. On
    the CPU our inputs already are NHWC-strided (:func:`to_tensor` permutes uint8 NHWC images
    without a copy), and a convolution follows its input's format, so there the methods' paths
    measure the same with or without it (``perf --only stages``: 1.00x on the README's 2-core
    CPU). It matters where a tensor arrives NCHW-contiguous (a resnet18 forward of such a batch:
    ~1.3x faster in channels_last, ``perf --only cam_extraction``) and on GPUs. Call it before
    creating the optimizer (the parameters are replaced). A state dict saved from a
    channels_last model loads into either format.

    Args:
        model: the network (modified in place and returned).
        ctx: anything with ``device`` and ``channels_last`` (a :class:`methods.base.Context`).
    """
    if getattr(ctx, "channels_last", False):
        return model.to(ctx.device, memory_format=torch.channels_last)
    return model.to(ctx.device)


def autocast(device: torch.device | str, amp: bool) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when ``amp``; a no-op otherwise (the CPU path stays fp32)."""
    if amp and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator inside the block and restore it afterwards.

    Use it around model construction so weight initialisation depends on the run seed only.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield
