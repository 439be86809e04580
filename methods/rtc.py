"""RTC: single-stage WSSS with Representation, Transform and Compensator.

Paper: C. Wang et al., "Boosting Weakly-Supervised Image Segmentation via Representation,
Transform, and Compensator" (code: ChunyanWang1/RTC, built on usr922/wseg). Published on PASCAL
VOC 2012 (WideResNet-38): val 65.34 mIoU (67.20 with dense CRF), test 66.90 / 68.76.

One network is trained once (``fit``), as a siamese pair over two transforms of each image:
view 1 is the training image x, view 2 is x resized by ``view2_scale`` (the original: a 448 px
crop and its 128 px copy), optionally flipped (``view2_flip``; the original does not). For
backbone stages f1..f4 (strides 4, 8, 8, 8), with F foreground maps per image (single-label:
F = 1, the label class's; multi-label: F = C, one per class, zero for untagged classes):

- CAM: ``proj = relu(W_p dropout(f4))``, ``M = W_c proj`` (1x1 convolutions), GAP logits
  trained by cross-entropy (multi-label: the multi-label soft margin on the tags).
- Cross-representation refinement: seeds ``S = [1 - max_c M~_c, onehot(M~)]`` (M~ = M / max,
  no gradient; onehot keeps each pixel's strongest class) propagated along the affinities of
  two representations of the (detached) backbone, a deep one ``g(f3, f4)`` and a shallow one
  ``g(image, f2)`` (1x1 convolutions): ``R = (PCM(S, deep) + PCM(S, shallow)) / 2`` with
  ``PCM`` in :mod:`methods.common.prototypes`.
- Cross-transform regularisation, with T the view-1 -> view-2 transform and N = min-max norm:
  ``L_er = |T N(M_1) - N(M_2)|``; ``L_ecr = top20%|T N(R_1) - [1 - max N(M_2), onehot]| +
  sym.`` (targets detached); prototypes of background and every class pooled from the
  *other* view's features at the k = h w / 8 top positions of this view's refined map
  (``class_prototypes``), and the pixel-to-prototype contrast ``0.1 (L_intra +
  L_cross-label + L_cross-prototype)`` with temperature 0.1 and pixel labels
  ``argmax [bg_threshold, N(R)]``.
- Compensator: every pixel attends to the features of a class's top positions and adds their
  attention-weighted scores to its own (``compensate``, classes present in the batch);
  ``L_struct = top80%|onehot N(R') - onehot N(M)|`` makes the rough CAM follow it.
- Segmentation head (DeepLab-like, two 3x3 convolutions dilated ``seg_dilation`` plus a 3x3
  branch on f4, fused with 48 channels of f1 at stride 4; 1 + F outputs) trained, from epoch
  ``seg_start_epoch`` on, with a class-balanced cross-entropy on pseudo labels from the
  refined CAM: PAMR-refined softmax of ``[b, N(R_1)]`` over background and the tagged
  classes at half resolution for b = 0.55 and b = 0.2; a class where it wins against 0.55,
  background where it wins against both, ignored (255) elsewhere. An image counts only if its
  labels hold the background and every class it is tagged with (the original's rule).

Total: ``L_cls + L_minpool + L_er + L_ecr + L_nce + L_struct + L_seg`` (``L_minpool``: mean of
the lowest quarter of R's per-pixel foreground maximum, pushed to 0).

``localize`` = the refined CAMs ``N(R)`` (TTA: scales x flip, summed, / max); ``refine`` = the
seg head's class probabilities (softmax over background and the tagged classes, mean over the
TTA passes), so the shared segmenter trains on its pseudo masks like every method's.

Defaults (``paper``, from ``run.sh`` and ``contrast_train.py``): WideResNet-38 at output
stride 8, 448 px crops (RandomResizeLong 448-768, flip, colour jitter) with a 128 px second
view, batch 8, 25 epochs, SGD poly (power 0.9) lr 0.01, new layers 10x, weight decay 5e-4,
BatchNorm frozen, seg loss from epoch 7, TTA scales (0.5, 1, 1.5, 2) x flip.

Deviations from the original:
    - Single-label data: the classifier is trained with softmax cross-entropy and only the
      label class's CAM is used (F = 1; seg head with 2 outputs). No background CAM channel
      (the original's 21st, overwritten by ``1 - max`` anyway).
    - Tags mask the seeds (the original's forward has no labels, so an untagged class's
      spurious CAM can suppress tagged ones in its seeds): refined maps of untagged classes
      are zero, and so are the prototypes of classes no image in the batch is tagged with
      (the original pools them from spurious top responses). Inference uses the tags too:
      the seg softmax is over background and tagged classes, not times sigmoid scores.
    - The background prototype: the original's background score is the constant 0.2, so its
      top-k picks arbitrary tied positions; we rank background by ``1 - max N(R)`` (the most
      confident background), as the method intends.
    - VARM, the original's label refiner, is shipped only as a compiled file; we use PAMR
      (:mod:`methods.common.pamr`, the repository's own ``pamr.py``, same iterations and
      dilations). No dense CRF (the published +CRF figures use one on the seg output).
    - Momentum: the original's PolyOptimizer passes weight decay into SGD's momentum slot
      (momentum 5e-4 in effect); ``momentum`` keeps that value on ``paper`` to reproduce its
      numbers. Bias learning rates are not doubled; the first backbone stage is not frozen.
    - L_minpool and the seg pseudo labels are computed at the feature grid / image size we
      train at, not on 448 px crops; the image is fixed-size (no resize-crop, no jitter).
    - Backbone: WideResNet-38 (MXNet ImageNet weights) is named by ``paper`` but not
      provided here: ``quick`` uses the offline ImageNet EfficientNet-Lite0 trunk at output
      stride 8, Adam, fewer epochs, second view 0.5 (8 x 8 maps), seg dilation 3 (16 x 16
      maps), seg loss after a quarter of the epochs; not yet tuned or measured on validation.
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
from methods.common.backbones import create_backbone
from methods.common.cam import multilabel_loss, normalize_cams, tagged_only, tta_maps
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
from methods.common.prototypes import (
    affinity_refine,
    class_prototypes,
    compensate,
    minmax_norm,
    prototype_contrast,
    topk_mean,
)
from methods.common.single_stage import (
    FG,
    balanced_seg_loss,
    contrast_labels,
    keep_tagged,
    map_channels,
    max_onehot,
    min_pool_loss,
    seg_pseudo_labels,
    tagged_softmax,
    targets,
    to_view,
    view2_size,
    with_background,
)

logger = logging.getLogger(__name__)


# ---- network -------------------------------------------------------------------------------
def _conv(cin: int, cout: int, k: int = 1, dilation: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=bias)


class RTCNet(nn.Module):
    """Backbone + CAM branch + two-representation refinement + segmentation head."""

    def __init__(
        self, backbone: nn.Module, num_classes: int, cfg: Any, multilabel: bool = False
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_norm = backbone.input_norm
        self.freeze_bn = cfg.freeze_bn
        c1, c2, c3, c4 = backbone.channels
        sd, dd, seg = cfg.aff_shallow_dim, cfg.aff_deep_dim, cfg.seg_dim
        self.dropout = nn.Dropout2d(cfg.dropout)
        self.proj = _conv(c4, cfg.proj_dim)
        self.classifier = _conv(cfg.proj_dim, num_classes)
        self.aff_c2, self.aff_c3, self.aff_c4 = _conv(c2, sd), _conv(c3, dd), _conv(c4, dd)
        self.aff_deep, self.aff_shallow = _conv(2 * dd, dd), _conv(sd + 3, sd)
        d = cfg.seg_dilation
        self.seg_a1 = _conv(c4, 2 * seg, 3, dilation=d, bias=True)
        self.seg_a2 = _conv(2 * seg, seg, 3, dilation=d, bias=True)
        self.seg_b = _conv(c4, seg, 3)
        self.seg_fuse = _conv(2 * seg, seg)
        self.seg_low = _conv(c1, cfg.seg_low_dim, 3)
        self.seg_proj = _conv(seg + cfg.seg_low_dim, seg)
        self.seg_cls = _conv(seg, num_classes + 1 if multilabel else 2)  # [bg, classes]
        for m in self.new_modules():
            nn.init.xavier_uniform_(m.weight)
        for m in (self.aff_c2, self.aff_c3, self.aff_c4):
            nn.init.kaiming_normal_(m.weight)
        nn.init.xavier_uniform_(self.aff_deep.weight, gain=4)

    def new_modules(self) -> list[nn.Conv2d]:
        """The layers trained from scratch (10x learning rate)."""
        return [m for n, m in self.named_children() if n != "backbone" and isinstance(m, nn.Conv2d)]

    def train(self, mode: bool = True) -> RTCNet:
        """Train mode; the backbone's BatchNorm stays in eval mode when ``freeze_bn``."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, with_seg: bool = False
    ) -> dict[str, torch.Tensor]:
        """Run both branches (and the seg head when ``with_seg``) on a normalised batch.

        ``labels``: (N,) class indices (F = 1 foreground map, the label class's), or (N, C)
        multi-hot tags (F = C maps, the untagged ones zero).

        Returns:
            ``logits`` (N, C), ``cam`` (N, F, h, w), ``proj`` (N, D, h, w), ``cam_rv``
            (N, 1 + F, h, w) refined [bg, fg], ``seg`` (N, 1 + F, h1, w1) with ``with_seg``.
        """
        f1, f2, f3, f4 = self.backbone(x)
        grid = f4.shape[-2:]
        f2, f3 = (_resize(f, grid) for f in (f2, f3))
        proj = F.relu(self.proj(self.dropout(f4)))  # (N, D, h, w)
        maps = self.classifier(proj)  # (N, K, h, w)
        if labels.dim() == 2:  # tags: every class's CAM, untagged ones zero
            cam = tagged_only(maps, labels)  # (N, C, h, w)
        else:
            cam = maps.gather(1, labels.view(-1, 1, 1, 1).expand(-1, 1, *grid))  # (N, 1, h, w)
        out = {"logits": maps.mean(dim=(2, 3)), "cam": cam, "proj": proj}
        with torch.no_grad():  # seeds [1 - max_c fg_c, the strongest fg channel per pixel]
            seeds = with_background(max_onehot(normalize_cams(cam.detach().float())))
        deep = torch.cat([self.aff_c3(f3.detach()), self.aff_c4(f4.detach())], dim=1)
        deep = self.aff_deep(F.relu(deep))
        shallow = torch.cat([_resize(x, grid), F.relu(self.aff_c2(f2.detach()))], dim=1)
        shallow = self.aff_shallow(shallow)
        out["cam_rv"] = (affinity_refine(seeds, deep) + affinity_refine(seeds, shallow)) / 2
        if with_seg:
            out["seg"] = self.segment(f1, f4)
        return out

    def segment(self, f1: torch.Tensor, f4: torch.Tensor) -> torch.Tensor:
        """Seg logits (N, 1 + F, h1, w1) at f1's stride."""
        deep = torch.cat([self.seg_a2(self.seg_a1(f4)), self.seg_b(f4)], dim=1)
        deep = _resize(self.seg_fuse(deep), f1.shape[-2:])
        fused = torch.cat([deep, self.seg_low(f1)], dim=1)
        return self.seg_cls(F.relu(self.seg_proj(fused)))


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


# ---- the method ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """RTC settings; the defaults are the original's (``run.sh``, ``contrast_train.py``)."""

    backbone: str = "wide_resnet38"  # original: WideResNet-38 (resnet38d), not in timm
    pretrained: bool | str = True  # True: hub; "offline": installed package; str: a file
    output_stride: int = 8  # original: stride 8 (56 x 56 maps at 448 px)
    epochs: int = 25  # run.sh: --max_epoches 25
    min_steps: int = 0  # at least this many steps (more epochs on small sets)
    batch_size: int = 8  # run.sh: --batch_size 8
    optimizer: str = "sgd"  # sgd (original, poly) | adam (poly too)
    lr: float = 0.01  # backbone learning rate (original 0.01)
    new_lr_mult: float = 10.0  # new layers' learning-rate factor (original 10x)
    momentum: float = 5e-4  # SGD momentum in effect in the original (weight decay's slot)
    weight_decay: float = 5e-4  # original 5e-4
    poly_power: float = 0.9  # poly learning-rate decay power
    freeze_bn: bool = True  # backbone BatchNorm frozen in eval mode (original)
    hflip: bool = True  # random horizontal flip of the training images
    dropout: float = 0.5  # Dropout2d before the projection (original 0.5)
    proj_dim: int = 256  # projection (contrast feature) channels (original 256)
    aff_deep_dim: int = 128  # deep representation channels (original 128)
    aff_shallow_dim: int = 64  # shallow representation channels (original 64)
    seg_dim: int = 256  # seg head channels (original 256)
    seg_low_dim: int = 48  # seg head stride-4 channels (original 48)
    seg_dilation: int = 12  # dilation of the seg head's two 3x3 convs (original 12)
    view2_scale: float = 0.2857  # view 2 = view 1 resized by this (original 128 / 448)
    view2_flip: bool = False  # also flip view 2 (the original does not)
    bg_threshold: float = 0.2  # contrast pixel label: fg where N(R) > this (original 0.2)
    topk_div: int = 8  # prototype positions per class: k = h w / this (original 8)
    temperature: float = 0.1  # contrast temperature (original 0.1)
    nce_weight: float = 0.1  # weight of each contrast term (original 0.1)
    ecr_topk: float = 0.2  # share of hardest pixels in L_ecr (original 0.2)
    struct_topk: float = 0.8  # share of hardest pixels in L_struct (original 0.8)
    seg_start_epoch: int = 7  # seg loss from this epoch on (original: ep >= 7)
    seg_bg_high: float = 0.55  # background score confident fg must beat (original 0.55)
    seg_bg_low: float = 0.2  # background score confident bg must beat too (original 0.2)
    pamr_iters: int = 10  # label-refinement iterations (original 10)
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)  # original dilations
    tta: bool = True  # test-time augmentation (original: 4 scales x flip)
    tta_scales: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)  # original inference scales
    infer_batch_size: int = 16  # images per inference minibatch

    def __post_init__(self) -> None:
        problems = []
        if self.optimizer not in ("sgd", "adam"):
            problems.append(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.output_stride not in (8, 16):
            problems.append(f"output_stride must be 8 or 16, got {self.output_stride}")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2, got {self.batch_size}")
        for name in ("view2_scale", "seg_bg_high", "seg_bg_low", "ecr_topk", "struct_topk"):
            if not 0.0 < getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0 or self.temperature <= 0:
            problems.append("dropout must be in [0, 1), temperature > 0")
        if not self.tta_scales or not self.pamr_dilations:
            problems.append("tta_scales and pamr_dilations must not be empty")
        if problems:
            raise ValueError("rtc: " + "; ".join(problems))


@register_method
class RTC(Method):
    """RTC: siamese CAMs, cross-representation refinement, prototypes, compensator, seg head."""

    name = "rtc"
    multilabel = True
    inference_fields = frozenset({"tta", "tta_scales", "infer_batch_size"})
    Config = Config
    presets = {
        "paper": {},
        "quick": {  # offline ImageNet EfficientNet-Lite0 (no WideResNet-38 offline)
            "backbone": "tf_efficientnet_lite0",
            "pretrained": "offline",
            # cost-capped, not tuned: 8 epochs and TTA scales (1, 2) cost ~27 min per seed on
            # the 2-core CPU (a profiled step x 152 steps + 1.2 s per image of maps); 4 epochs
            # and scale 1 (+ flip) ~10 min
            "epochs": 4,
            "min_steps": 76,  # 4 epochs x 19 steps of 16 on the synthetic train split
            "batch_size": 16,
            "optimizer": "adam",
            "lr": 1e-4,  # new layers 10x
            "weight_decay": 0.0,
            "freeze_bn": False,
            "proj_dim": 128,
            "seg_dim": 128,
            "seg_dilation": 3,  # 12 at 56 x 56 maps; 16 x 16 maps here
            "view2_scale": 0.5,  # 64 px: 8 x 8 maps (128 / 448 would leave 4 x 4)
            "seg_start_epoch": 2,
            "tta_scales": (1.0,),  # scale 2 costs 6.5x scale 1 here (32 x 32 affinities)
        },
        "tiny": {
            "backbone": "resnet18",
            "pretrained": False,
            "epochs": 1,
            "batch_size": 8,
            "optimizer": "adam",
            "lr": 1e-3,
            "weight_decay": 0.0,
            "proj_dim": 32,
            "aff_deep_dim": 16,
            "aff_shallow_dim": 8,
            "seg_dim": 32,
            "seg_low_dim": 8,
            "seg_dilation": 2,
            "view2_scale": 0.5,
            "seg_start_epoch": 0,  # one epoch: the seg loss from the first step
            "pamr_iters": 2,
            "pamr_dilations": (1, 2),
            "tta_scales": (1.0,),
            "infer_batch_size": 8,
        },
    }

    def __init__(self, config: Any | None = None, preset: str = "paper") -> None:
        super().__init__(config, preset)
        self.model: RTCNet | None = None

    # ---- building -----------------------------------------------------------------------
    def _build(
        self, num_classes: int, ctx: Context, pretrained: bool | str, multilabel: bool = False
    ) -> RTCNet:
        cfg = self.config
        if cfg.backbone == "wide_resnet38":
            raise ValueError(
                "rtc: the WideResNet-38 backbone of the paper preset (MXNet ImageNet weights, "
                "ilsvrc-cls_rna-a1_cls1000_ep-0001.params) is not provided by timm or by this "
                "package; use backbone=<a timm CNN> (e.g. resnet50, or --preset quick)"
            )
        with seeded(ctx.seed):
            backbone = create_backbone(
                cfg.backbone, pretrained=pretrained, output_stride=cfg.output_stride
            )
            model = RTCNet(backbone, num_classes, cfg, multilabel)
        return place(model, ctx)

    def _optimizer(self, model: RTCNet) -> torch.optim.Optimizer:
        cfg = self.config
        new = {id(p) for m in model.new_modules() for p in m.parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        if cfg.freeze_bn:
            bn = {
                id(p)
                for m in model.backbone.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)
                for p in m.parameters()
            }
            params = [p for p in params if id(p) not in bn]
        groups = [
            {"params": [p for p in params if id(p) not in new], "lr": cfg.lr},
            {"params": [p for p in params if id(p) in new], "lr": cfg.lr * cfg.new_lr_mult},
        ]
        if cfg.optimizer == "adam":
            return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )

    # ---- training -----------------------------------------------------------------------
    def fit(self, train: ImageSet, ctx: Context) -> None:
        """Train the siamese network and its seg head on ``train`` (one stage, ``rtc``)."""
        if len(train) < 2:
            raise ValueError(f"rtc: needs at least 2 training images, got {len(train)}")
        cfg = self.config

        def compute() -> dict[str, torch.Tensor]:
            model = self._build(train.num_classes, ctx, cfg.pretrained, train.multilabel)
            with seeded(ctx.seed + 1):  # dropout draws from the global generator
                return self._train(model, train, ctx)

        state = ctx.stage("rtc", compute)
        model = self._build(train.num_classes, ctx, False, train.multilabel)
        model.load_state_dict(state)
        self.model = model.eval()

    def _train(self, model: RTCNet, train: ImageSet, ctx: Context) -> dict[str, torch.Tensor]:
        cfg = self.config
        n, bs = len(train), min(cfg.batch_size, len(train))
        wanted = stage_epochs(cfg.epochs, n, bs, cfg.min_steps, drop_last=True)
        total = max(1, ctx.epochs(wanted) * (n // bs))
        opt = self._optimizer(model)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: max(0.0, 1.0 - s / total) ** cfg.poly_power
        )
        gen = ctx.generator(1)
        labels_all = targets(train)  # (N,) label indices or (N, C) tags
        model.train()
        steps, stopped = 0, False
        for epoch in ctx.epoch_range(wanted, "rtc"):
            sums: dict[str, float] = {}
            for idx in minibatches(n, bs, gen, shuffle=True, drop_last=True):
                if not ctx.should_continue():
                    stopped = True
                    break
                idx = np.sort(idx)
                x = to_tensor(train.images[idx], ctx.device, model.input_norm)  # (B, 3, H, W)
                if cfg.hflip:
                    x = apply_hflip(x, flip_flags(len(idx), gen))
                losses = self.step_losses(model, x, labels_all[idx].to(ctx.device), epoch, ctx)
                check_loss(losses["total"], "rtc", steps)
                opt.zero_grad(set_to_none=True)
                losses["total"].backward()
                opt.step()
                sched.step()
                steps += 1
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
            logger.info(
                "rtc epoch %d: %s",
                epoch + 1,
                ", ".join(f"{k}={v / max(1, n // bs):.4f}" for k, v in sums.items()),
            )
            if stopped:
                logger.info("rtc: training stopped by the budget after %d steps", steps)
                break
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    def step_losses(
        self, model: RTCNet, x: torch.Tensor, y: torch.Tensor, epoch: int, ctx: Context
    ) -> dict[str, torch.Tensor]:
        """All losses of one training step on a normalised batch ``x`` (B, 3, H, W).

        ``y``: (B,) label indices, or (B, C) float tags on a multi-label dataset.
        """
        cfg = self.config
        tags = y if y.dim() == 2 else None
        size2 = view2_size(tuple(x.shape[-2:]), cfg.view2_scale)
        x2 = to_view(x, size2, cfg.view2_flip)
        with_seg = epoch >= cfg.seg_start_epoch
        with autocast(ctx.device, ctx.amp):
            o1 = model(x, y, with_seg=with_seg)
            o2 = model(x2, y)
        o1 = {k: v.float() for k, v in o1.items()}
        o2 = {k: v.float() for k, v in o2.items()}
        losses = self._siamese_losses(o1, o2, y, size2)
        losses.update(self._contrast_losses(o1, o2, size2, tags))
        if with_seg:
            norm = model.input_norm
            mean = torch.tensor(norm.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(norm.std, device=x.device).view(1, 3, 1, 1)
            fg = minmax_norm(o1["cam_rv"])[:, FG:]  # (B, F, h, w)
            fg = F.interpolate(fg, size=x.shape[-2:], mode="bilinear", align_corners=True)
            labels = seg_pseudo_labels(
                (x * std + mean).clamp(0, 1), fg, cfg.seg_bg_high, cfg.seg_bg_low,
                cfg.pamr_iters, tuple(cfg.pamr_dilations), tags,
            )  # fmt: skip
            losses["seg"] = balanced_seg_loss(o1["seg"], labels, tags)
        losses["total"] = sum(losses.values())
        return losses

    def _siamese_losses(
        self, o1: dict[str, torch.Tensor], o2: dict[str, torch.Tensor], y: torch.Tensor,
        size2: tuple[int, int],
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Classification, min-pooling, equivariance (L_er) and cross-refinement (L_ecr)."""
        cfg = self.config
        loss = multilabel_loss if y.dim() == 2 else F.cross_entropy  # tags: soft margin
        cls = (loss(o1["logits"], y) + loss(o2["logits"], y)) / 2
        minpool = (min_pool_loss(o1["cam_rv"][:, FG:]) + min_pool_loss(o2["cam_rv"][:, FG:])) / 2
        c1 = to_view(minmax_norm(o1["cam"]), size2, cfg.view2_flip)  # (B, F, H2, W2)
        c2 = _resize(minmax_norm(o2["cam"]), size2)
        r1 = to_view(minmax_norm(o1["cam_rv"]), size2, cfg.view2_flip)  # (B, 1 + F, H2, W2)
        r2 = _resize(minmax_norm(o2["cam_rv"]), size2)
        t1 = with_background(max_onehot(c1)).detach()  # [1 - max_c c, the strongest c]
        t2 = with_background(max_onehot(c2)).detach()
        ecr = topk_mean((t2 - r1).abs(), cfg.ecr_topk) + topk_mean((t1 - r2).abs(), cfg.ecr_topk)
        return {"cls": cls + minpool, "er": (c1 - c2).abs().mean(), "ecr": ecr}

    def _contrast_losses(
        self, o1: dict[str, torch.Tensor], o2: dict[str, torch.Tensor], size2: tuple[int, int],
        tags: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Cross-transform prototypes, pixel-to-prototype contrast and the compensator.

        Prototypes for background and every class (zero for a class no image of the batch is
        tagged with); the compensator acts on the classes present in the batch.
        """
        cfg = self.config
        grid = tuple(o2["proj"].shape[-2:])
        p1 = to_view(o1["proj"], grid, cfg.view2_flip)  # view 1 in view 2's grid
        p2 = o2["proj"]
        with torch.no_grad():
            fg1 = minmax_norm(to_view(o1["cam_rv"][:, FG:], grid, cfg.view2_flip))
            fg2 = minmax_norm(o2["cam_rv"][:, FG:])
            s1, s2 = with_background(fg1), with_background(fg2)  # (B, 1 + F, h2, w2)
            lab1 = contrast_labels(fg1, cfg.bg_threshold)  # (B, h2, w2) contrast labels
            lab2 = contrast_labels(fg2, cfg.bg_threshold)
            k = grid[0] * grid[1] // cfg.topk_div
            pr1 = class_prototypes(s1, p2.detach(), k)  # view-1 positions, view-2 features
            pr2 = class_prototypes(s2, p1.detach(), k)
            on = [FG] if tags is None else (FG + torch.nonzero(tags.sum(0) > 0)[:, 0]).tolist()
            new1 = keep_tagged(compensate(s1, p2.detach(), pr1, on)[:, FG:], tags)
            new2 = keep_tagged(compensate(s2, p1.detach(), pr2, on)[:, FG:], tags)
        tau, w = cfg.temperature, cfg.nce_weight / 2
        v1, v2 = pr1.vectors, pr2.vectors
        nce = w * (
            prototype_contrast(p1, v1, lab1, tau) + prototype_contrast(p2, v2, lab2, tau)
        ) + w * (  # cross pseudo label
            prototype_contrast(p1, v1, lab2, tau) + prototype_contrast(p2, v2, lab1, tau)
        ) + w * (  # cross prototype
            prototype_contrast(p1, v2, lab1, tau) + prototype_contrast(p2, v1, lab2, tau)
        )  # fmt: skip
        c1 = to_view(minmax_norm(o1["cam"]), size2, cfg.view2_flip)
        c2 = _resize(minmax_norm(o2["cam"]), size2)
        t1, t2 = _resize(minmax_norm(new1), size2), _resize(minmax_norm(new2), size2)
        struct = topk_mean((max_onehot(t1) - max_onehot(c1)).abs(), cfg.struct_topk) + topk_mean(
            (max_onehot(t2) - max_onehot(c2)).abs(), cfg.struct_topk
        )
        return {"nce": nce, "struct": struct}

    # ---- inference ----------------------------------------------------------------------
    def _passes(self) -> tuple[tuple[float, ...], bool]:
        cfg = self.config
        return (tuple(cfg.tta_scales), True) if cfg.tta else ((1.0,), False)

    @torch.no_grad()
    def localize(self, batch: ImageSet, ctx: Context) -> np.ndarray:
        """Refined CAMs N(R) of the label class, (N, 1, H, W) float32 in [0, 1].

        On a multi-label dataset: of every class, (N, C, H, W), untagged classes zero.
        """
        model = self._ready("localize", ctx)
        scales, flip = self._passes()
        h, w = batch.images.shape[1:3]
        out = np.empty((len(batch), map_channels(batch), h, w), dtype=np.float32)
        labels = targets(batch)
        for idx in minibatches(len(batch), self.config.infer_batch_size, shuffle=False):
            x = to_tensor(batch.images[idx], ctx.device, model.input_norm)  # (B, 3, H, W)
            y = labels[idx].to(ctx.device)

            def fn(inp: torch.Tensor, y: torch.Tensor = y) -> torch.Tensor:
                with autocast(ctx.device, ctx.amp):
                    return minmax_norm(model(inp, y)["cam_rv"][:, FG:].float())

            maps = keep_tagged(
                tta_maps(fn, x, scales=scales, flip=flip), y if y.dim() == 2 else None
            )
            out[idx] = maps.clamp(0, 1).cpu().numpy()
        return out

    @torch.no_grad()
    def refine(self, batch: ImageSet, maps: np.ndarray, ctx: Context) -> np.ndarray:
        """The seg head's foreground probability, mean over the TTA passes, (N, 1, H, W).

        On a multi-label dataset: each class's probability, (N, C, H, W), the softmax taken
        over the background and the tagged classes only (untagged classes zero).
        """
        model = self._ready("refine", ctx)
        scales, flip = self._passes()
        h, w = batch.images.shape[1:3]
        c = map_channels(batch)
        out = np.empty((len(batch), c, h, w), dtype=np.float32)
        tags = torch.from_numpy(batch.tags()) if batch.multilabel else None
        for idx in minibatches(len(batch), self.config.infer_batch_size, shuffle=False):
            x = to_tensor(batch.images[idx], ctx.device, model.input_norm)
            total = torch.zeros(len(idx), c, h, w, device=ctx.device)
            y = None if tags is None else tags[idx].to(ctx.device)  # (B, C)
            for scale in scales:
                xs = _resize(x, (max(1, round(h * scale)), max(1, round(w * scale))))
                for flipped in (False, True) if flip else (False,):
                    inp = torch.flip(xs, dims=(-1,)) if flipped else xs
                    with autocast(ctx.device, ctx.amp):
                        f1, _, _, f4 = model.backbone(inp)
                        logits = model.segment(f1, f4).float()  # (B, 1 + F, h1, w1)
                    prob = tagged_softmax(logits, y)[:, FG:]
                    prob = torch.flip(prob, dims=(-1,)) if flipped else prob
                    total += F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)
            passes = len(scales) * (2 if flip else 1)
            out[idx] = (total / passes).clamp(0, 1).cpu().numpy()
        return out

    def _ready(self, what: str, ctx: Context) -> RTCNet:
        if self.model is None:
            raise RuntimeError(f"rtc.{what} called before fit()")
        return place(self.model, ctx).eval()
