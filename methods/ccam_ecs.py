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

Multi-label form (PASCAL VOC, ``synthetic_voc``). C2AM's VOC pipeline (CVI-SZU/CCAM ``WSSS/``)
binarises the class-agnostic map at 0.3, cleans it with a dense CRF (``inference_crf.py``) and
uses it as the background cue of class CAMs from a separate classifier: the channel ``1 - cue``
is stacked before the tagged classes' CAMs and the argmax taken
(``evaluate_using_background_cues.py --with_bg_cues``), or the cue replaces IRNet's
background threshold. Here: the classifier (always built on multi-label data) is trained with
the multi-label soft margin loss, and the class maps are

    map_c = fg * M_c / max_c' M_c'       (tagged classes c, c'; untagged classes zero)

with ``fg`` the oriented CCAM map and ``M_c`` the classifier's normalised CAMs, both through the
same TTA. The harness's argmax over ``[t, map_1..map_C]`` is then C2AM's rule: background
where ``fg <= t`` (``t`` chosen on validation instead of the fixed 0.3), else the tagged class
with the largest CAM. ECS extends as ECS-Net's own multi-class form: erase where the max over
the tagged classes' CAMs exceeds 0.6, target ``T = max_c max(M_c, M'_c)`` over the tagged
classes (a class-agnostic target for the class-agnostic map). ``crf=True`` runs the CRF on
``fg = max_c map_c``; each class keeps its share.

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
    - Multi-label: the class CAMs come from the ECS classifier on this network's layer4,
      not from a separately trained CAM network (C2AM uses PuzzleCAM / IRNet CAMs), and the
      fg / bg decision is a threshold on the soft map chosen on validation, not a fixed 0.3
      + dCRF binary cue (the CRF is the ``crf=True`` variant).
    - dCRF: the Pet repo binarises the cue at 0.3 (its background score) before
      ``unary_from_labels``; ``crf_threshold`` defaults to that value. The published Pet
      figures (68.2 IoU, 76.0 with dCRF) are per-image means with the border counted as pet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Context, ImageSet, Method, register_method
from methods.common.cam import class_cams, multilabel_loss, tta_maps
from methods.common.ccam import (
    SIM_MAX,
    SIM_MIN,
    blur_images,
    border_mean,
    ccam_loss,
    class_cam,
    cosine_similarity_matrix,
    ecs_erase,
    fg_times_class_share,
    is_inverted,
    negative_loss,
    orient,
    pool_fg_bg,
    positive_loss,
    rank_weights,
    ring_width,
)
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

__all__ = [  # the loss, polarity and ECS pieces live in methods.common.ccam; re-exported here
    "SIM_MAX",
    "SIM_MIN",
    "CCAMECS",
    "CCAMNet",
    "Config",
    "blur_images",
    "border_mean",
    "build_optimizer",
    "ccam_loss",
    "class_cam",
    "cosine_similarity_matrix",
    "crf_refine",
    "ecs_erase",
    "fg_times_class_share",
    "is_inverted",
    "negative_loss",
    "orient",
    "pool_fg_bg",
    "positive_loss",
    "rank_weights",
    "ring_width",
]


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
    multilabel = True
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
    def _build(
        self, num_classes: int, ctx: Context, pretrained: bool | str, multilabel: bool = False
    ) -> CCAMNet:
        from methods.common.backbones import create_backbone

        cfg = self.config
        with seeded(ctx.seed):
            backbone = create_backbone(cfg.backbone, pretrained=pretrained, output_stride=16)
            # multi-label data needs the classifier for its class CAMs, with or without ECS
            model = CCAMNet(backbone, num_classes if cfg.ecs or multilabel else 0)
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
            model = self._build(train.num_classes, ctx, cfg.pretrained, train.multilabel)
            return self._train(model, train, ctx)

        state = dict(ctx.stage("ccam", compute))
        inverted = state.pop("polarity_inverted")
        # the stage holds every weight: rebuild without downloading pretrained ones
        model = self._build(train.num_classes, ctx, pretrained=False, multilabel=train.multilabel)
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
        if model.classifier is not None:  # ECS, or the class CAMs of multi-label data
            if y.dim() == 2:  # (B, C) tags: the multi-label soft margin
                ce = multilabel_loss(out["logits"], y)
            else:
                ce = F.cross_entropy(out["logits"].float(), y)
            total = total + ce
            losses["ce"] = ce
            if cfg.ecs and inverted is not None:
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
        """Class-agnostic maps (N, 1, H, W) float32 in [0, 1] at the batch resolution.

        Multi-label data: class maps (N, C, H, W), ``fg * M_c / max_c' M_c'`` over the tagged
        classes (:func:`~methods.common.ccam.fg_times_class_share`), zero for the others; the
        foreground and the class CAMs go through the same test-time augmentation.
        """
        if self.model is None:
            raise RuntimeError("ccam_ecs: localize() called before fit()")
        cfg = self.config
        model = self.model.eval()
        scales = tuple(cfg.tta_scales) if cfg.tta else (1.0,)
        flip = cfg.tta_flip if cfg.tta else False
        h, w = batch.images.shape[1:3]

        multilabel = batch.multilabel

        def fn(x: torch.Tensor) -> torch.Tensor:
            with autocast(ctx.device, ctx.amp):
                out = model(x)
            p = orient(out["p"].float(), self.inverted)  # (B, 1, h', w'); tta_maps resizes
            if not multilabel:
                return p
            cams = class_cams(out["f4"].float(), model.classifier.weight.float())  # (B, C, ..)
            return torch.cat([p, cams], dim=1)  # (B, 1 + C, h', w')

        out = np.empty((len(batch), batch.num_classes if multilabel else 1, h, w), np.float32)
        tags = torch.from_numpy(batch.tags()) if multilabel else None
        with torch.no_grad():
            for idx in minibatches(len(batch), cfg.infer_batch_size, shuffle=False):
                x = to_tensor(batch.images[idx], ctx.device, model.input_norm)  # (B, 3, H, W)
                maps = tta_maps(fn, x, scales=scales, flip=flip)  # (B, 1 or 1 + C, H, W)
                if tags is not None:
                    maps = fg_times_class_share(maps[:, :1], maps[:, 1:], tags[idx])
                out[idx] = maps.float().clamp(0.0, 1.0).cpu().numpy()
        return out

    def refine(self, batch: ImageSet, maps: np.ndarray, ctx: Context) -> np.ndarray:
        """Dense CRF on the binarised cue when ``crf=True``; the identity otherwise.

        The cue is binarised at ``crf_threshold``; each pixel's unary is that label with
        probability 0.7 (exactly ``unary_from_labels(gt_prob=0.7)`` for two labels, written
        as soft probabilities so the CRF's marginals can be read back). The refined map is
        the CRF's foreground probability, float32 in [0, 1].

        Multi-label data: the foreground ``max_c M_c`` goes through the CRF (as C2AM's
        ``inference_crf.py`` cleans the binarised CCAM cue), each class keeps its share.
        """
        cfg = self.config
        if not cfg.crf:
            return maps
        if not batch.multilabel:
            return crf_refine(batch.images, maps, cfg.crf_threshold, gt_prob=0.7)
        maps = np.asarray(maps, dtype=np.float32)
        fg = maps.max(axis=1, keepdims=True)  # (N, 1, H, W)
        tagged = (batch.tags() > 0)[:, :, None, None]
        share = np.where(fg > 0, maps / np.maximum(fg, 1e-12), tagged)  # (N, C, H, W)
        fg_crf = crf_refine(batch.images, fg, cfg.crf_threshold, gt_prob=0.7)
        return (fg_crf * share * tagged).astype(np.float32)


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
