"""CCAM + ECS: class-agnostic activation maps learnt by contrast, supervised by erased CAMs.

Papers:
    Xie, Xiang, Jin, Wang and Shen, "C2AM: Contrastive learning of Class-agnostic Activation
    Map for Weakly Supervised Object Localization and Semantic Segmentation", CVPR 2022
    (official code: CVI-SZU/CCAM). Erased CAM Supervision (ECS): Sun, Wang, Ma and Zhang,
    "ECS-Net: Improving Weakly Supervised Semantic Segmentation by Using Connections Between
    Class Activation Maps", ICCV 2021, as used by the Oxford-IIIT Pet seed repository
    (JiakangC/Ensembled-Weakly-Supervised-Segmentation, ``train_ECS_CCAM``).

Model. Backbone features at stride 16, ``z = concat(layer3, layer4)`` of shape (N, K, h, w);
a class-agnostic head ``p = sigmoid(BN(conv3x3(z -> 1)))`` (N, 1, h, w). Pooled embeddings::

    v_fg = sum_u p(u) z(u) / (h w),        v_bg = sum_u (1 - p(u)) z(u) / (h w)

Loss over a batch (cosine similarity ``s`` clamped to [5e-4, 1 - 5e-4])::

    L_neg    = mean_{i,j} -log(1 - s(v_bg_i, v_fg_j))
    L_pos^fg = mean_{i,j} w_ij * -log s(v_fg_i, v_fg_j),  w_ij = exp(-alpha (rank_ij - 1))
    L_pos^bg = the same on v_bg
    L_CCAM   = L_pos^fg + L_neg + L_pos^bg

with ``rank_ij`` the 1-based descending rank of ``s_ij`` within row i (the diagonal, the
most similar pair, has rank 1 and weight 1). The loss is symmetric in fg and bg, so which side
of the map is the object is arbitrary: after a warm-up epoch the mean of ``p`` on the map's
border ring (averaged over many training images) decides it; above 0.5 the map is inverted.
The flag is frozen and stored, as a tensor, in the stage state.

ECS (``ecs=True``). A linear classifier without bias on globally pooled layer4 features
gives logits (cross-entropy on the image label) and the class CAM ``M`` of the label class
(ReLU, / max). Pixels with ``M > 0.6`` (M upsampled bilinearly to the image) are replaced by
a strong Gaussian blur of the image; the CAM ``M'`` of the erased image is computed without
gradient, and ``T = max(M, M')`` (no gradient, stride-16 grid) supervises the oriented map::

    L = L_CCAM + CE(logits, y) + MSE(p_oriented, T)       (MSE only once polarity is known)

Inference: sigmoid map, ``1 - p`` if inverted, test-time augmentation (scales x flip, maps
flipped back, summed, normalised by the max), upsampled to the batch resolution. ``crf=True``
binarises the cue at ``crf_threshold`` and runs the dense CRF on the uint8 image (METHODS.md
parameters, ``unary_from_labels`` with gt_prob 0.7); the refined map is the CRF's foreground
probability.

Defaults (``paper``): ResNet-50 ImageNet, batch 32, 20 epochs, SGD lr 1e-3 (new layers 10x),
momentum 0.9, weight decay 1e-4, poly decay (power 0.9), alpha 0.25, flip augmentation, TTA
scales {0.5, 1, 1.5, 2} x flip.

Deviations from the original:
    - The official optimiser (``faithful=True`` reproduces it) gives every new layer the base
      rate (its ``from_scratch_layers`` test compares a Conv2d with the head *module*, never
      true), leaves every BatchNorm affine parameter out of the optimiser, and passes weight
      decay positionally into ``torch.optim.SGD``'s momentum slot (momentum = 1e-4). We give
      the new layers 10x, train BN and use momentum 0.9 (the ECS classifier, absent from the
      official code, gets the base rate under ``faithful=True``, like the head).
    - The official rank weight is ``exp(-alpha (rank0 - 1))`` with a 0-based rank, so the top
      pair weighs ``exp(alpha)``; we use 1-based ranks as in the paper's formula (top weight 1:
      the positive terms are ``exp(-alpha)`` times the official ones). ``faithful=True`` uses
      the official offset.
    - Polarity: the official code votes once on one training batch at iteration 600 with a
      4-cell ring (at 28 x 28 maps); the Pet repo re-votes on every batch (and at inference on
      the 4 corner cells of each image), so its polarity can flip during training. We vote once
      after ``warmup_epochs`` on up to ``polarity_images`` images in eval mode, with a ring
      ``max(1, min(h, w) // 7)`` cells wide (4 at 28 x 28, 1 at 8 x 8), and freeze the flag.
    - ECS: the Pet repo erases with a weak blur (kernel 15, random sigma in [0.1, 2]), uses
      the *predicted* class for the CAM and a cat/dog label on a 37-way head; we use the known
      label class, a strong blur (sigma = ``blur_sigma`` x image side) and the dataset labels.
      The MSE term starts after the warm-up epoch (before it, the polarity is unknown). The
      erased batch goes through the network in train mode (as in the Pet repo), so it also
      updates the BN running statistics.
    - Augmentation: horizontal flip only (the official code also resizes to 512 and crops 448).
    - Preset ``quick``: the offline ImageNet EfficientNet-Lite0 trunk (stride 16; z = concat of
      its stride-16 stages, 112 + 320 channels) and Adam (lr 1e-4, new layers 10x). Without
      pretrained features (the earlier random-init ResNet-18 preset) neither SGD nor Adam
      learnt a usable map on the synthetic data in 8-20 epochs (pet IoU 0.22-0.245, the level
      of all-foreground): the contrastive loss has little to contrast without pretrained
      features. ``tiny`` keeps a random-init ResNet-18 for speed.
    - dCRF: the Pet repo binarises the cue at 0.3 (its background score) before
      ``unary_from_labels``; ``crf_threshold`` defaults to that value. The published Pet
      figures (68.2 IoU, 76.0 with dCRF) are per-image means with the border counted as pet.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from methods.base import Context, ImageSet, Method, register_method
from methods.common.cam import cam_from_features, normalize_cams, tta_maps
from methods.common.crf import dense_crf_many
from methods.common.data import (
    apply_hflip,
    autocast,
    flip_flags,
    minibatches,
    place,
    seeded,
    stage_epochs,
    to_tensor,
)

logger = logging.getLogger(__name__)

SIM_MIN = 5e-4  # cosine similarity clamp, as in the official code
SIM_MAX = 1.0 - 5e-4


# ---- losses ------------------------------------------------------------------------------------
def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity ``s_ij = cos(a_i, b_j)`` clamped to [5e-4, 1 - 5e-4].

    Args:
        a: (N, C) embeddings.
        b: (M, C) embeddings.

    Returns:
        (N, M) clamped similarities.
    """
    sim = F.normalize(a, dim=1) @ F.normalize(b, dim=1).T  # (N, M)
    return sim.clamp(SIM_MIN, SIM_MAX)


def rank_weights(sim: torch.Tensor, alpha: float, first_rank: int = 1) -> torch.Tensor:
    """Rank weights ``w_ij = exp(-alpha (rank_ij - 1))``, ranks descending within each row.

    Args:
        sim: (N, M) similarities.
        alpha: decay of the weight with the rank.
        first_rank: the rank of a row's most similar entry: 1 (the paper's formula) or 0
            (the official code, whose top pair then weighs ``exp(alpha)``).

    Returns:
        (N, M) float weights (no gradient).
    """
    order = torch.argsort(sim.detach(), dim=1, descending=True, stable=True)  # (N, M)
    rank = torch.argsort(order, dim=1, stable=True) + first_rank  # (N, M)
    return torch.exp(-alpha * (rank.to(sim.dtype) - 1.0))


def positive_loss(v: torch.Tensor, alpha: float, first_rank: int = 1) -> torch.Tensor:
    """Rank-weighted pull of same-side embeddings: mean of ``w_ij * -log s_ij`` (all i, j)."""
    sim = cosine_similarity_matrix(v, v)  # (N, N)
    return (rank_weights(sim, alpha, first_rank) * -torch.log(sim)).mean()


def negative_loss(v_bg: torch.Tensor, v_fg: torch.Tensor) -> torch.Tensor:
    """Push of background from foreground: mean over all i, j of ``-log(1 - s(bg_i, fg_j))``."""
    return -torch.log(1.0 - cosine_similarity_matrix(v_bg, v_fg)).mean()


def ccam_loss(
    v_fg: torch.Tensor, v_bg: torch.Tensor, alpha: float = 0.25, first_rank: int = 1
) -> dict[str, torch.Tensor]:
    """The CCAM contrastive loss ``L_pos^fg + L_neg + L_pos^bg`` over a batch.

    Args:
        v_fg: (N, C) foreground embeddings.
        v_bg: (N, C) background embeddings.
        alpha: rank-weight decay (0.25 official, 0.8 in the Pet repo).
        first_rank: see :func:`rank_weights`.

    Returns:
        ``{"total", "pos_fg", "neg", "pos_bg"}`` scalar tensors.
    """
    if v_fg.shape != v_bg.shape or v_fg.ndim != 2:
        raise ValueError(f"ccam_loss: expected two (N, C) tensors, got {v_fg.shape}, {v_bg.shape}")
    pos_fg = positive_loss(v_fg, alpha, first_rank)
    pos_bg = positive_loss(v_bg, alpha, first_rank)
    neg = negative_loss(v_bg, v_fg)
    return {"total": pos_fg + neg + pos_bg, "pos_fg": pos_fg, "neg": neg, "pos_bg": pos_bg}


def pool_fg_bg(z: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool features under the map and its complement, both divided by ``h * w``.

    Args:
        z: (N, K, h, w) features.
        p: (N, 1, h, w) foreground probability.

    Returns:
        ``(v_fg, v_bg)``, each (N, K).
    """
    hw = z.shape[-2] * z.shape[-1]
    p = p.to(z.dtype)
    v_fg = torch.einsum("nkhw,nhw->nk", z, p[:, 0]) / hw  # (N, K)
    v_bg = torch.einsum("nkhw,nhw->nk", z, 1.0 - p[:, 0]) / hw  # (N, K)
    return v_fg, v_bg


# ---- polarity ----------------------------------------------------------------------------------
def ring_width(h: int, w: int) -> int:
    """Border ring width in cells: 1 on small maps, 4 on the official 28 x 28 maps."""
    return max(1, min(h, w) // 7)


def border_mean(p: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Mean of each map on its border ring.

    Args:
        p: (N, 1, h, w) maps.
        width: ring width in cells; ``None`` uses :func:`ring_width`.

    Returns:
        (N,) per-image border means.
    """
    h, w = p.shape[-2:]
    width = ring_width(h, w) if width is None else width
    ring = torch.ones(h, w, dtype=torch.bool, device=p.device)
    if h > 2 * width and w > 2 * width:
        ring[width : h - width, width : w - width] = False
    return p[:, 0][:, ring].float().mean(dim=1)  # (N,)


def is_inverted(p: torch.Tensor, width: int | None = None) -> bool:
    """Polarity vote: True when the border ring, averaged over images, is above 0.5.

    Objects rarely fill the border, so a map that is bright there marks the background.
    """
    return bool(border_mean(p, width).mean() > 0.5)


def orient(p: torch.Tensor, inverted: bool | torch.Tensor) -> torch.Tensor:
    """Return ``1 - p`` for an inverted head, ``p`` otherwise."""
    return 1.0 - p if bool(inverted) else p


# ---- ECS ---------------------------------------------------------------------------------------
def blur_images(x: torch.Tensor, sigma_frac: float) -> torch.Tensor:
    """A strong Gaussian blur of (N, 3, H, W) images; sigma = ``sigma_frac`` x min(H, W).

    Separable (one pass along x, one along y), so a wide kernel stays cheap; the kernel covers
    +-3 sigma, capped so that its reflect padding stays smaller than the image.
    """
    side = min(x.shape[-2:])
    sigma = max(sigma_frac * side, 0.5)
    k = min(2 * math.ceil(3.0 * sigma) + 1, 2 * side - 1)  # odd
    x = gaussian_blur(x, kernel_size=[k, 1], sigma=[sigma, sigma])  # along W
    return gaussian_blur(x, kernel_size=[1, k], sigma=[sigma, sigma])  # along H


def ecs_erase(
    images: torch.Tensor, cam: torch.Tensor, threshold: float = 0.6, sigma_frac: float = 0.08
) -> torch.Tensor:
    """Replace the pixels where the CAM exceeds ``threshold`` by a blurred copy of the image.

    Args:
        images: (N, 3, H, W) images (any normalisation; the blur is linear).
        cam: (N, 1, h, w) class CAM in [0, 1]; upsampled bilinearly to (H, W) if needed.
        threshold: erase where ``cam > threshold`` (0.6 in ECS).
        sigma_frac: blur sigma as a fraction of the image side.

    Returns:
        (N, 3, H, W) erased images; pixels with ``cam <= threshold`` are unchanged bit for bit.
    """
    if cam.shape[-2:] != images.shape[-2:]:
        size = images.shape[-2:]
        cam = F.interpolate(cam.float(), size=size, mode="bilinear", align_corners=False)
    mask = cam > threshold  # (N, 1, H, W)
    return torch.where(mask, blur_images(images, sigma_frac), images)


def class_cam(feat: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Normalised CAM of each image's label class: ReLU(sum_k W[y, k] f_k) / (max + 1e-5).

    Args:
        feat: (N, K, h, w) features.
        weight: (C, K) classifier weight.
        labels: (N,) class indices.

    Returns:
        (N, 1, h, w) float32 maps in [0, 1).
    """
    return normalize_cams(cam_from_features(feat.float(), weight.float(), labels))


# ---- network -----------------------------------------------------------------------------------
class CCAMNet(nn.Module):
    """ResNet (stride 16) + class-agnostic head on concat(layer3, layer4) (+ ECS classifier).

    Args:
        backbone: a module whose forward returns the four stage outputs and that has
            ``.channels`` (see ``methods.common.backbones.create_backbone``).
        num_classes: classes of the ECS classifier; 0 builds no classifier.
    """

    def __init__(self, backbone: nn.Module, num_classes: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        c3, c4 = backbone.channels[2], backbone.channels[3]
        self.head = nn.Conv2d(c3 + c4, 1, kernel_size=3, padding=1, bias=False)
        self.head_bn = nn.BatchNorm2d(1)
        self.classifier = nn.Linear(c4, num_classes, bias=False) if num_classes > 0 else None
        self.input_norm = getattr(
            backbone, "input_norm", None
        )  # input normalisation of its weights

    def new_modules(self) -> list[nn.Module]:
        """The layers trained from scratch (the head, its BN, the classifier)."""
        mods: list[nn.Module] = [self.head, self.head_bn]
        if self.classifier is not None:
            mods.append(self.classifier)
        return mods

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``p`` (N, 1, h, w), ``z`` (N, K3+K4, h, w), ``f4`` (N, K4, h, w), ``logits``."""
        _, _, f3, f4 = self.backbone(x)
        if f3.shape[-2:] != f4.shape[-2:]:
            f3 = F.interpolate(f3, size=f4.shape[-2:], mode="bilinear", align_corners=False)
        z = torch.cat([f3, f4], dim=1)  # (N, K3 + K4, h, w)
        p = torch.sigmoid(self.head_bn(self.head(z)))  # (N, 1, h, w)
        out = {"p": p, "z": z, "f4": f4}
        if self.classifier is not None:
            out["logits"] = self.classifier(f4.mean(dim=(2, 3)))  # (N, C)
        return out


# ---- optimiser ---------------------------------------------------------------------------------
def build_optimizer(model: CCAMNet, cfg: Any) -> torch.optim.Optimizer:
    """The optimiser of the config, with the official quirks when ``cfg.faithful``.

    Correct (default): backbone at ``lr``, new layers at ``lr * head_lr_mult``, every
    parameter (BN included) trained, SGD momentum ``cfg.momentum``. Faithful: conv/linear
    weights only (all BN affine parameters frozen), new layers at ``lr`` too, and weight
    decay in SGD's momentum slot (momentum = weight decay).

    Args:
        model: the network.
        cfg: the method config (``optimizer``, ``lr``, ``head_lr_mult``, ``momentum``,
            ``weight_decay``, ``faithful``).

    Returns:
        A torch optimiser with two parameter groups (``backbone``, ``new``).
    """
    new_ids = {id(p) for m in model.new_modules() for p in m.parameters()}
    if cfg.faithful:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for prm in m.parameters():
                    prm.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    backbone = [p for p in trainable if id(p) not in new_ids]
    new = [p for p in trainable if id(p) in new_ids]
    head_lr = cfg.lr if cfg.faithful else cfg.lr * cfg.head_lr_mult
    groups = [
        {"params": backbone, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "backbone"},
        {"params": new, "lr": head_lr, "weight_decay": cfg.weight_decay, "name": "new"},
    ]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    if cfg.optimizer != "sgd":
        raise ValueError(f"ccam_ecs: optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")
    momentum = cfg.weight_decay if cfg.faithful else cfg.momentum
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=momentum)


# ---- the method --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """CCAM + ECS settings; defaults are the paper's (official CCAM code, Pet repo for ECS)."""

    backbone: str = "resnet50"  # timm ResNet name (official: ResNet-50)
    pretrained: bool | str = True  # True: timm hub; "offline": installed package; str: a file
    epochs: int = 20  # training epochs (Pet repo: 20)
    min_steps: int = 0  # at least this many steps (more epochs on small sets; quick: 45)
    batch_size: int = 32  # images per step; the contrastive loss needs many pairs (>= 32)
    optimizer: str = "sgd"  # sgd (official) | adam
    lr: float = 1e-3  # base learning rate (official 1e-3)
    head_lr_mult: float = 10.0  # learning-rate factor of the new layers (intended 10x)
    momentum: float = 0.9  # SGD momentum (intended; the official code ends up with 1e-4)
    weight_decay: float = 1e-4  # official 1e-4 (the Pet repo uses 1e-3)
    poly_power: float = 0.9  # poly learning-rate decay power
    alpha: float = 0.25  # rank-weight decay of the positive losses (official 0.25; Pet 0.8)
    hflip: bool = True  # random horizontal flip augmentation
    warmup_epochs: int = 1  # epochs before the polarity vote (and before the ECS MSE term)
    polarity_images: int = 512  # training images averaged in the polarity vote
    ecs: bool = True  # erased CAM supervision (classifier + CE + MSE(p, max(M, M')))
    ecs_threshold: float = 0.6  # erase pixels where the class CAM exceeds this (ECS: 0.6)
    blur_sigma: float = 0.08  # erasing blur sigma as a fraction of the image side (strong)
    tta: bool = True  # test-time augmentation over tta_scales (and flips)
    tta_scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # TTA scales (METHODS.md)
    tta_flip: bool = True  # add horizontally flipped inputs to the TTA
    crf: bool = False  # dense CRF refinement of the binarised cue in refine()
    crf_threshold: float = 0.3  # binarisation of the cue before the CRF (Pet repo: 0.3)
    infer_batch_size: int = 16  # images per inference minibatch
    faithful: bool = False  # official quirks: head not 10x, BN frozen, momentum = wd, rank0

    def __post_init__(self) -> None:
        problems = []
        if self.optimizer not in ("sgd", "adam"):
            problems.append(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 (pairs), got {self.batch_size}")
        if self.epochs < 1 or self.warmup_epochs < 0 or self.polarity_images < 1:
            problems.append("epochs and polarity_images must be >= 1, warmup_epochs >= 0")
        if self.infer_batch_size < 1:
            problems.append(f"infer_batch_size must be >= 1, got {self.infer_batch_size}")
        for name in ("ecs_threshold", "crf_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.tta_scales or any(s <= 0 for s in self.tta_scales):
            problems.append(f"tta_scales must be positive and non-empty, got {self.tta_scales}")
        if self.lr <= 0 or self.blur_sigma <= 0 or self.alpha < 0:
            problems.append("lr and blur_sigma must be > 0, alpha >= 0")
        if problems:
            raise ValueError("ccam_ecs: " + "; ".join(problems))


@register_method
class CCAMECS(Method):
    """CCAM (contrastive class-agnostic map) with optional Erased CAM Supervision."""

    name = "ccam_ecs"
    inference_fields = frozenset({"crf", "crf_threshold", "infer_batch_size"})
    Config = Config
    presets = {
        "paper": {},
        "quick": {  # offline ImageNet EfficientNet-Lite0; tuned on val only (docstring)
            "backbone": "tf_efficientnet_lite0",
            "pretrained": "offline",
            "epochs": 5,  # val IoU 44.8 (5 epochs) vs 41.6 (8); CRF on the cue: 21.0
            "min_steps": 45,  # 5 epochs x 9 steps of 32 on the synthetic train split
            "batch_size": 32,
            "optimizer": "adam",
            "lr": 1e-4,  # new layers 10x (head_lr_mult)
            "polarity_images": 256,
            "tta_scales": (1.0,),
        },
        "tiny": {
            "backbone": "resnet18",
            "pretrained": False,
            "epochs": 1,
            "batch_size": 8,
            "optimizer": "adam",
            "lr": 1e-3,
            "polarity_images": 16,
            "tta_scales": (1.0,),
            "infer_batch_size": 8,
        },
    }

    def __init__(self, config: Any | None = None, preset: str = "paper") -> None:
        super().__init__(config, preset)
        self.model: CCAMNet | None = None
        self.inverted: bool = False

    # ---- building -----------------------------------------------------------------------
    def _build(self, num_classes: int, ctx: Context, pretrained: bool | str) -> CCAMNet:
        from methods.common.backbones import create_backbone

        cfg = self.config
        with seeded(ctx.seed):
            backbone = create_backbone(cfg.backbone, pretrained=pretrained, output_stride=16)
            model = CCAMNet(backbone, num_classes if cfg.ecs else 0)
        return place(model, ctx)

    # ---- training -----------------------------------------------------------------------
    def fit(self, train: ImageSet, ctx: Context) -> None:
        """Train the CCAM head (and ECS classifier) on ``train``; one stage, ``ccam``."""
        if len(train) < 2:
            raise ValueError(
                f"ccam_ecs: the contrastive loss needs at least 2 training images, got {len(train)}"
            )
        cfg = self.config

        def compute() -> dict[str, torch.Tensor]:
            return self._train(self._build(train.num_classes, ctx, cfg.pretrained), train, ctx)

        state = dict(ctx.stage("ccam", compute))
        inverted = state.pop("polarity_inverted")
        # the stage holds every weight: rebuild without downloading pretrained ones
        model = self._build(train.num_classes, ctx, pretrained=False)
        model.load_state_dict(state)
        model.eval()
        self.model, self.inverted = model, bool(inverted.item())
        logger.info("ccam_ecs: polarity %s", "inverted" if self.inverted else "direct")

    def _train(self, model: CCAMNet, train: ImageSet, ctx: Context) -> dict[str, torch.Tensor]:
        cfg = self.config
        device = ctx.device
        n = len(train)
        bs = min(cfg.batch_size, n)
        steps_per_epoch = n // bs
        wanted = stage_epochs(cfg.epochs, n, bs, cfg.min_steps, drop_last=True)
        epochs = ctx.epochs(wanted)
        total_steps = max(1, epochs * steps_per_epoch)
        optimizer = build_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: max(0.0, 1.0 - s / total_steps) ** cfg.poly_power
        )
        gen = ctx.generator(1)
        labels_all = torch.tensor(np.asarray(train.labels), dtype=torch.long)  # a copy
        inverted: bool | None = None
        stopped = False
        for epoch in ctx.epoch_range(wanted, "ccam"):
            model.train()
            sums: dict[str, float] = {}
            steps = 0
            for idx in minibatches(n, bs, gen, shuffle=True, drop_last=True):
                if not ctx.should_continue():
                    stopped = True
                    break
                x = to_tensor(train.images[np.sort(idx)], device, model.input_norm)  # (B, 3, H, W)
                y = labels_all[np.sort(idx)].to(device)
                if cfg.hflip:
                    x = apply_hflip(x, flip_flags(x.shape[0], gen))
                losses = self._step_losses(model, x, y, inverted, ctx)
                optimizer.zero_grad(set_to_none=True)
                losses["total"].backward()
                optimizer.step()
                scheduler.step()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                steps += 1
            if steps:
                logger.info(
                    "ccam_ecs epoch %d/%d: %s",
                    epoch + 1,
                    epochs,
                    ", ".join(f"{k}={v / steps:.4f}" for k, v in sums.items()),
                )
            if inverted is None and (epoch + 1 >= cfg.warmup_epochs or stopped):
                inverted = self._vote_polarity(model, train, ctx)
            if stopped:
                break
        if inverted is None:
            inverted = self._vote_polarity(model, train, ctx)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        state["polarity_inverted"] = torch.tensor(int(inverted), dtype=torch.int64)
        return state

    def _step_losses(
        self,
        model: CCAMNet,
        x: torch.Tensor,
        y: torch.Tensor,
        inverted: bool | None,
        ctx: Context,
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        with autocast(ctx.device, ctx.amp):
            out = model(x)
        p, z = out["p"].float(), out["z"].float()
        v_fg, v_bg = pool_fg_bg(z, p)
        losses = ccam_loss(v_fg, v_bg, cfg.alpha, first_rank=0 if cfg.faithful else 1)
        total = losses["total"]
        if cfg.ecs:
            ce = F.cross_entropy(out["logits"].float(), y)
            total = total + ce
            losses["ce"] = ce
            if inverted is not None:
                target = self._ecs_target(model, x, out["f4"].detach(), y, ctx)  # (B, 1, h, w)
                mse = F.mse_loss(orient(p, inverted), target)
                total = total + mse
                losses["mse"] = mse
        losses["total"] = total
        return losses

    @torch.no_grad()
    def _ecs_target(
        self, model: CCAMNet, x: torch.Tensor, f4: torch.Tensor, y: torch.Tensor, ctx: Context
    ) -> torch.Tensor:
        """``T = max(M, M')`` on the stride-16 grid, without gradient."""
        cfg = self.config
        weight = model.classifier.weight.detach()
        cam = class_cam(f4, weight, y)  # (B, 1, h, w)
        erased = ecs_erase(x, cam, cfg.ecs_threshold, cfg.blur_sigma)
        with autocast(ctx.device, ctx.amp):
            f4_erased = model(erased)["f4"]
        cam_erased = class_cam(f4_erased, weight, y)
        return torch.maximum(cam, cam_erased)

    @torch.no_grad()
    def _vote_polarity(self, model: CCAMNet, train: ImageSet, ctx: Context) -> bool:
        cfg = self.config
        was_training = model.training
        model.eval()
        n = min(len(train), cfg.polarity_images)
        means = []
        for idx in minibatches(n, cfg.infer_batch_size, shuffle=False):
            x = to_tensor(train.images[idx], ctx.device, model.input_norm)
            with autocast(ctx.device, ctx.amp):
                p = model(x)["p"].float()
            means.append(border_mean(p).cpu())
        value = float(torch.cat(means).mean())
        model.train(was_training)
        logger.info("ccam_ecs polarity vote: border mean %.3f over %d images", value, n)
        return value > 0.5

    # ---- inference ----------------------------------------------------------------------
    def localize(self, batch: ImageSet, ctx: Context) -> np.ndarray:
        """Class-agnostic maps (N, 1, H, W) float32 in [0, 1] at the batch resolution."""
        if self.model is None:
            raise RuntimeError("ccam_ecs: localize() called before fit()")
        cfg = self.config
        model = self.model.eval()
        scales = tuple(cfg.tta_scales) if cfg.tta else (1.0,)
        flip = cfg.tta_flip if cfg.tta else False
        h, w = batch.images.shape[1:3]

        def fn(x: torch.Tensor) -> torch.Tensor:
            with autocast(ctx.device, ctx.amp):
                p = model(x)["p"].float()
            return orient(p, self.inverted)  # (B, 1, h', w'); tta_maps resizes to (H, W)

        out = np.empty((len(batch), 1, h, w), dtype=np.float32)
        with torch.no_grad():
            for idx in minibatches(len(batch), cfg.infer_batch_size, shuffle=False):
                x = to_tensor(batch.images[idx], ctx.device, model.input_norm)  # (B, 3, H, W)
                maps = tta_maps(fn, x, scales=scales, flip=flip)  # (B, 1, H, W)
                out[idx] = maps.float().clamp(0.0, 1.0).cpu().numpy()
        return out

    def refine(self, batch: ImageSet, maps: np.ndarray, ctx: Context) -> np.ndarray:
        """Dense CRF on the binarised cue when ``crf=True``; the identity otherwise.

        The cue is binarised at ``crf_threshold``; each pixel's unary is that label with
        probability 0.7 (exactly ``unary_from_labels(gt_prob=0.7)`` for two labels, written
        as soft probabilities so the CRF's marginals can be read back). The refined map is
        the CRF's foreground probability, float32 in [0, 1].
        """
        cfg = self.config
        if not cfg.crf:
            return maps
        return crf_refine(batch.images, maps, cfg.crf_threshold, gt_prob=0.7)


def crf_refine(
    images: np.ndarray,
    maps: np.ndarray,
    threshold: float,
    gt_prob: float = 0.7,
    workers: int | None = None,
) -> np.ndarray:
    """Dense CRF foreground probability of binarised cues, images in parallel processes.

    Args:
        images: (N, H, W, 3) uint8 images (the originals, never normalised).
        maps: (N, 1, H, W) cues in [0, 1].
        threshold: foreground where ``map > threshold``.
        gt_prob: confidence of the binarised label in the unary.
        workers: processes for :func:`~methods.common.crf.dense_crf_many` (default: all
            cores this process may use; 1 runs serially).

    Returns:
        (N, 1, H, W) float32 foreground marginals of the CRF.
    """
    if maps.ndim != 4 or maps.shape[1] != 1 or maps.shape[2:] != images.shape[1:3]:
        raise ValueError(
            f"crf_refine: maps {maps.shape} do not match images {images.shape} as (N, 1, H, W)"
        )
    p_fg = np.where(maps[:, 0] > threshold, gt_prob, 1.0 - gt_prob).astype(np.float32)
    probs = np.stack([1.0 - p_fg, p_fg], axis=1)  # (N, 2, H, W): background, foreground
    q = dense_crf_many(images, probs, workers=workers)  # N x (2, H, W), across processes
    out = np.empty(maps.shape, dtype=np.float32)
    for i, qi in enumerate(q):
        out[i, 0] = np.clip(qi[1], 0.0, 1.0)
    return out
