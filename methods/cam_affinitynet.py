"""CAM + AffinityNet: CAM seeds propagated by a random walk on learned semantic affinities.

Paper: J. Ahn and S. Kwak, "Learning Pixel-level Semantic Affinity with Image-level Supervision
for Weakly Supervised Semantic Segmentation", CVPR 2018 (code: jiwoon-ahn/psa). The
confident-region rule (fg where M >= 0.30, bg where M < 0.05) is IRNet's (Ahn, Cho and Kwak,
CVPR 2019).

Pipeline (internal stages go through ``ctx.stage``):

1. ``classifier``: the plain CAM classifier of :mod:`methods.cam` (ResNet, GAP, bias-free
   linear layer) trained on image-level labels. Fitted inside ``ctx.as_method``: when its
   settings equal a ``cam`` run's (the presets' do), it is that run's classifier, trained once
   with that run's seed, so cam and cam_affinitynet start from the same CAMs.
2. ``affinity``: CAMs of the train images (label class, multi-scale + flip) give confident
   labels: 1 (fg) where ``M >= fg_threshold``, 0 (bg) where ``M < bg_threshold``, 255 (ignore)
   elsewhere, optionally cleaned by a dense CRF on the uint8 image (``crf_confident``, IRNet's
   rule: one CRF per threshold). The labels are downsampled (nearest) to the stride-8 grid of
   the affinity network. Every pair (i, j) of grid nodes with ``|i - j| < radius`` (a half-disk
   of offsets, each unordered pair once) is labelled positive-fg (both fg), positive-bg (both
   bg) or negative (different); pairs touching an ignored node are skipped.

   AffinityNet: three backbone stages (layer2 at stride 8, layer3 and layer4 upsampled to
   stride 8) each reduced by a 1x1 conv + ELU, concatenated, a last 1x1 conv + ELU gives the
   embedding e(u); ``a_ij = exp(-mean_c |e_i - e_j|)``. Loss:

       L = 1/4 mean_{pos_bg} -log(a + 1e-5) + 1/4 mean_{pos_fg} -log(a + 1e-5)
           + 1/2 mean_{neg} -log(1 + 1e-5 - a)

3. ``localize``: the CAM of the label class (as :mod:`methods.cam`, with the configured TTA).
4. ``refine``: the random walk (:func:`methods.common.random_walk.random_walk`). Channels are
   ``[bg, fg]`` with the original's background rule ``bg = (1 - M) ** bg_alpha`` (alpha = 16,
   psa's ``infer_aff.py`` default), both average-pooled to the affinity grid;
   ``A = a ** beta`` (beta = 8) with self loops, ``T = D^-1 A``,
   ``vec(M*_c) = T^t vec(M_c)`` with t = 256 (8 squarings); upsampled bilinearly to the image.
   The map returned is IRNet's ``M*_fg / max M*_fg`` (``output="max"``, the default) or
   ``M*_fg / (M*_fg + M*_bg)`` (``output="ratio"``: threshold 0.5 is exactly psa's argmax over
   [bg, fg]). Either is in [0, 1]; the harness picks the threshold on validation.

Multi-label form (PASCAL VOC, ``synthetic_voc``), psa's own VOC pipeline:

- The shared ``cam`` classifier is multi-label (soft margin loss); its CAMs are one map per
  class, each normalised by its max, zero for untagged classes (psa ``infer_cls.py`` multiplies
  the CAMs by the label vector and keeps the tagged ones).
- Seeds, ``seed_rule="irnet"`` (default, as on binary data; IRNet's ``cam_to_ir_label``):
  ``M = max_c M_c``; label ``1 + argmax_c M_c`` where ``M >= fg_threshold``, bg where
  ``M < bg_threshold``; the CRF, if on, runs over background and the tagged classes.
  ``seed_rule="psa"`` (psa ``infer_cls.py`` + ``voc12/data.py`` ``VOC12AffDataset``):
  argmax over ``[(1 - max_c M_c) ** alpha, M_1..M_C]`` (CRF'd if ``crf_confident``) at
  ``psa_low_alpha`` 4 (its classes are the confident fg) and ``psa_high_alpha`` 32 (its
  background is the confident bg); elsewhere ignore.
- Pairs: positive when both ends carry the same label (bg-bg or the same class), negative when
  the labels differ, two different classes included (psa ``ExtractAffinityLabelInRadius``).
- Walk: every channel of ``[(1 - max_c M_c) ** 16, M_1..M_C]`` (psa ``infer_aff.py``: alpha
  16, beta 8, logt 8). Returned: the walked class channels of the tagged classes, each
  normalised by its own max (``output="max"``, IRNet) or ``M*_c / (M*_c + M*_bg)``
  (``output="ratio"``: background score 0.5 reproduces psa's argmax over ``[M*_bg, M*_c]``);
  the harness's argmax over ``[t, maps]`` with ``t`` chosen on validation replaces psa's
  fixed argmax.

Deviations from the original:

- Backbone: a timm ResNet (ResNet-50 on ``paper``) instead of ResNet-38 / VGG-16; layer3 and
  layer4 run at output stride 16 and are upsampled to stride 8 (``aff_output_stride=8``
  dilates them instead, closer to ResNet-38's stride-8 stages at 4x their cost).
  ``aff_stages`` picks the three stages (psa's conv4-6 correspond to layer2-4).
- Confident regions use IRNet's fixed thresholds on the normalised CAM by default instead of
  psa's two CRF passes on ``(1 - max M) ** alpha`` backgrounds (alpha 4 / 32), which
  ``seed_rule="psa"`` offers; ``crf_confident`` adds the CRF cleaning to either.
- Pairs cover the whole grid (every node pair within the radius that fits), not only the
  nodes whose full half-disk fits inside the crop.
- Training augmentation: random resized crop (side ``aff_crop_min``..1 of the image) and
  flip; no colour jitter. The label map is cropped with the image, then downsampled.
- SGD momentum 0: psa's ``PolyOptimizer`` passes its weight decay into SGD's momentum slot,
  so its effective momentum is 5e-4; lr 0.1 (new layers 10x) was tuned for that.
- Random walk on the stride-8 grid of the whole image; dense ``T`` (squaring) on small grids,
  ``t`` sparse products on large ones (same result; psa always squares a dense matrix).
- Output: soft maps (one channel per class; the label class on binary data) instead of psa's
  hard argmax, so the harness can sweep thresholds. The default is IRNet's max
  normalisation: with a CAM that lights a small part of the object, ``fg / (fg + bg)``
  inside the object scales with the lit fraction, which varies per image. Measured on the
  synthetic ``quick`` data with GT pair affinities (an oracle walk of the same CAMs): pet
  IoU 0.75 with ``max``, 0.41 with ``ratio``.
- ``quick``: the offline ImageNet EfficientNet-Lite0 for both networks (affinity stages 2-4:
  40, 112, 320 channels), Adam with new layers at 10x, BatchNorm of the pretrained trunk
  frozen (as psa), a 64-channel embedding (the pair differences of a 448-channel one cost 3x
  the step time on a CPU). Chosen on the synthetic val split (56 images, one seed each, val pet
  IoU of the walked maps): IRNet's seed thresholds 0.30 / 0.05 on this diffuse pretrained CAM
  label 74 % of the train pixels fg (pets cover ~19 %), and the walk then scores 23.8-25.0
  whatever beta (8-64), steps (16-256), bg_alpha (4, 16) or output; fg/bg seed thresholds
  0.6/0.3: 26.0, 0.7/0.4: 26.3, 0.5/0.2: 27.0 (kept), 0.5/0.2 with CRF-cleaned seeds: 26.8;
  beta 32, 64 steps. On this data the walk does not improve its own CAM seeds (the CAM
  alone, TTA: 30.1 val): the class is decided by a small mark, the body shares its texture
  with background distractors, so the seeds' fg is mark-centred and the affinities learnt from
  them separate "near the mark" from the rest. After cam's classifier moved to one rate for
  trunk and head (2026-12-02; its CAM val IoU 29.4 -> 32.9), the thresholds were checked
  again, three seeds each: 0.5/0.2 30.9 val IoU / 43.8 val PxAP, 0.7/0.3 30.8 / 44.6 (kept
  0.5/0.2). The walk's inference options were then swept on the same three fitted models
  (validation only; val pet IoU at each map's best threshold, mean of the seeds): their own
  CAM (the seeds) 31.0; beta 8: 30.7 (8 steps) down to 27.1 (256); beta 16: 30.9 (8) to 29.9
  (256); beta 32: 30.8 (8-64 steps, the preset: 30.8), 30.4 (256); beta 64: 30.7-30.8;
  bg_alpha 2-32: no change (30.8); ``output="ratio"``: 26.7. Every walk scores at or below the
  CAM it walks, and its val PxAP falls (48.0 for the CAM, 43.6 for the preset's walk): on this
  data the learned affinities spread the CAM's errors with its hits (at fg >= 0.5 the seeds are
  36 % pet and cover 65 % of the pets), so no walk setting makes the method beat ``cam``. The
  preset is within 0.1 of the best walk and was kept. ``tiny``: random-init ResNet-18.
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
from methods.base import Context, ImageSet, Method, register_method
from methods.common.affinity import (
    LOG_EPS,
    AffinityNet,
    affinity_labels,
    affinity_loss,
    confident_labels,
    downsample_labels,
    pair_affinities,
    poly_lr,
    psa_confident_labels,
    random_resized_crop,
)
from methods.common.cam import tagged_only
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
from methods.common.random_walk import PairGrid, pair_grid, random_walk

logger = logging.getLogger(__name__)

__all__ = [  # the AffinityNet pieces live in methods.common.affinity; re-exported here
    "IGNORE",
    "AffinityNet",
    "CAMAffinityNet",
    "Config",
    "affinity_labels",
    "affinity_loss",
    "confident_labels",
    "downsample_labels",
    "pair_affinities",
    "poly_lr",
    "psa_confident_labels",
    "random_resized_crop",
]


# ---- the method ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    """CAM + AffinityNet settings; the defaults are the paper preset."""

    # stage "classifier": the CAM classifier of methods.cam
    backbone: str = "resnet50"  # CAM classifier backbone (timm ResNet)
    pretrained: bool | str = True  # both backbones: True hub, "offline" package, str a file
    cam_epochs: int = 5  # CAM classifier epochs (methods.cam paper preset)
    cam_batch_size: int = 32  # CAM classifier batch size
    cam_lr: float = 1e-4  # CAM classifier Adam learning rate
    cam_backbone_lr_mult: float = 1.0  # CAM classifier backbone lr = cam_lr x this
    cam_min_steps: int = 0  # CAM classifier: at least this many steps (quick: 36)
    cam_tta: bool = True  # multi-scale + flip CAMs for the seeds (psa's infer_cls does this)
    cam_tta_scales: tuple[float, ...] = (1.0, 0.5, 1.5, 2.0)  # psa's CAM inference scales
    # confident regions (IRNet's thresholds on the normalised CAM)
    fg_threshold: float = 0.30  # fg where M >= 0.30 (IRNet conf_fg_thres)
    bg_threshold: float = 0.05  # bg where M < 0.05 (IRNet conf_bg_thres)
    crf_confident: bool = True  # clean both regions with a dense CRF (psa and IRNet do)
    seed_rule: str = "irnet"  # "irnet": the thresholds above; "psa": low / high alpha argmax
    psa_low_alpha: float = 4.0  # seed_rule "psa": confident fg (psa infer_cls --low_alpha)
    psa_high_alpha: float = 32.0  # seed_rule "psa": confident bg (psa infer_cls --high_alpha)
    # stage "affinity": AffinityNet
    aff_backbone: str = "resnet50"  # AffinityNet backbone (psa: ResNet-38; see deviations)
    aff_output_stride: int = 16  # 16: layer3/4 upsampled to stride 8; 8: dilated (4x cost)
    aff_stages: tuple[int, ...] = (2, 3, 4)  # ResNet stages of the embedding (psa: conv4-6)
    aff_dims: tuple[int, ...] = (64, 128, 256)  # 1x1 reductions of the 3 stages (psa)
    aff_embed_dim: int = 448  # embedding channels of the last 1x1 conv (psa: 448)
    aff_init_from_classifier: bool = False  # start the backbone from the CAM classifier's
    aff_epochs: int = 8  # psa train_aff max_epoches
    aff_min_steps: int = 0  # AffinityNet: at least this many steps (quick: 152)
    aff_batch_size: int = 8  # psa train_aff batch_size
    aff_optimizer: str = "sgd"  # "sgd" (psa, poly decay) or "adam" (random init; poly too)
    aff_lr: float = 0.1  # psa train_aff lr (backbone); poly power 0.9
    aff_new_lr_mult: float = 10.0  # new layers (reductions, embedding) get 10x the lr (psa)
    aff_momentum: float = 0.0  # psa's PolyOptimizer puts weight decay in SGD's momentum slot
    aff_weight_decay: float = 5e-4  # psa train_aff wt_dec
    aff_crop_min: float = 0.6  # random resized crop, side fraction in [crop_min, 1] (psa:
    # 448 crops of images rescaled to 448-768 px)
    aff_flip: bool = True  # random horizontal flip (psa)
    # refine: the random walk
    radius: int = 5  # pair radius gamma on the stride-8 grid (train and walk)
    beta: float = 8.0  # A = a ** beta (psa infer_aff beta)
    walk_steps: int = 256  # t = 2 ** logt, logt = 8 (psa infer_aff)
    bg_alpha: float = 16.0  # background channel (1 - max M) ** alpha (psa infer_aff alpha)
    output: str = "max"  # "max": fg* / max fg* (IRNet); "ratio": fg* / (fg* + bg*) (psa argmax)
    walk_mode: str = "auto"  # "auto" | "dense" (squaring) | "sparse" (t sparse products)
    infer_batch_size: int = 16  # images per forward pass in localize / refine


OUTPUTS = ("max", "ratio")
OPTIMIZERS = ("sgd", "adam")
SEED_RULES = ("irnet", "psa")


@register_method
class CAMAffinityNet(Method):
    """CAM seeds refined by a random walk on AffinityNet's learned semantic affinities."""

    name = "cam_affinitynet"
    multilabel = True
    inference_fields = frozenset(
        {"beta", "walk_steps", "bg_alpha", "output", "walk_mode", "infer_batch_size"}
    )
    Config = Config
    presets = {
        "paper": {},
        "quick": {  # offline ImageNet EfficientNet-Lite0 for both nets; tuned on val only
            "backbone": "tf_efficientnet_lite0",
            "pretrained": "offline",
            "cam_epochs": 4,
            "cam_min_steps": 36,  # steps of 4 epochs on the 304 synthetic train images
            "cam_lr": 1e-3,
            "cam_backbone_lr_mult": 1.0,  # cam's quick rate (its docstring): one classifier
            "cam_tta_scales": (1.0, 2.0),  # cam's quick scales (its docstring)
            # the pretrained CAM is diffuse: IRNet's 0.30 / 0.05 made 74 % of the train pixels
            # fg seeds (pets cover ~19 %); see the docstring for the thresholds tried on val
            "fg_threshold": 0.5,
            "bg_threshold": 0.2,
            "crf_confident": False,
            "aff_backbone": "tf_efficientnet_lite0",
            "aff_dims": (32, 64, 64),
            "aff_embed_dim": 64,
            "aff_epochs": 4,
            "aff_min_steps": 152,  # 4 epochs x 38 steps of 8 on the synthetic train split
            "aff_optimizer": "adam",
            "aff_lr": 1e-4,
            "aff_new_lr_mult": 10.0,
            "aff_weight_decay": 0.0,
            "beta": 32.0,
            "walk_steps": 64,
        },
        "tiny": {
            "backbone": "resnet18",
            "pretrained": False,
            "cam_epochs": 1,
            "cam_batch_size": 16,
            "cam_lr": 1e-3,
            "cam_tta": False,
            "crf_confident": False,
            "aff_backbone": "resnet18",
            "aff_dims": (8, 8, 16),
            "aff_embed_dim": 16,
            "aff_epochs": 1,
            "aff_optimizer": "adam",
            "aff_lr": 1e-3,
            "aff_new_lr_mult": 1.0,
            "aff_weight_decay": 0.0,
            "walk_steps": 64,
        },
    }

    def __init__(self, config: Config | None = None, preset: str = "paper") -> None:
        super().__init__(config, preset)
        cfg = self.config
        if cfg.output not in OUTPUTS:
            raise ValueError(
                f"cam_affinitynet: output must be one of {OUTPUTS}, got {cfg.output!r}"
            )
        if cfg.seed_rule not in SEED_RULES:
            raise ValueError(
                f"cam_affinitynet: seed_rule must be one of {SEED_RULES}, got {cfg.seed_rule!r}"
            )
        if cfg.aff_optimizer not in OPTIMIZERS:
            raise ValueError(
                f"cam_affinitynet: aff_optimizer must be one of {OPTIMIZERS}, "
                f"got {cfg.aff_optimizer!r}"
            )
        self.cam: Any = None
        self.aff: AffinityNet | None = None
        #: CAMs (C, H, W) of the images whose seeds were computed in this process, by name: the
        #: runner then asks ``localize`` for the same train images, from the same classifier
        self._seed_cams: dict[str, np.ndarray] = {}

    # ---- pieces ------------------------------------------------------------------------
    def weight_sources(self) -> dict[str, Any]:
        """Both backbones (CAM classifier and AffinityNet) take ``pretrained``."""
        cfg = self.config
        return {cfg.backbone: cfg.pretrained, cfg.aff_backbone: cfg.pretrained}

    def _cam_method(self) -> Any:
        from methods.cam import CAM
        from methods.cam import Config as CamConfig

        cfg = self.config
        cam_cfg = CamConfig(
            backbone=cfg.backbone,
            pretrained=cfg.pretrained,
            epochs=cfg.cam_epochs,
            batch_size=cfg.cam_batch_size,
            lr=cfg.cam_lr,
            backbone_lr_mult=cfg.cam_backbone_lr_mult,
            min_steps=cfg.cam_min_steps,
            tta=cfg.cam_tta,
            tta_scales=tuple(cfg.cam_tta_scales),
            infer_batch_size=cfg.infer_batch_size,
        )
        return CAM(cam_cfg, preset=self.preset)

    def _build_aff(self, pretrained: bool | str) -> AffinityNet:
        cfg = self.config
        return AffinityNet(
            cfg.aff_backbone,
            pretrained=pretrained,
            stages=tuple(cfg.aff_stages),
            dims=tuple(cfg.aff_dims),
            embed_dim=cfg.aff_embed_dim,
            output_stride=cfg.aff_output_stride,
        )

    # ---- fit -------------------------------------------------------------------------------
    def fit(self, train: ImageSet, ctx: Context) -> None:
        """Train the CAM classifier, then AffinityNet on the CAMs' confident regions."""
        if len(train) == 0:
            raise ValueError("cam_affinitynet.fit: the train set is empty")
        self.cam = self._cam_method()
        # stage "classifier" of the cam run itself when the CAM settings match (same weights)
        with ctx.as_method(self.cam):
            self.cam.fit(train, ctx)
        state = ctx.stage("affinity", lambda: self._train_affinity(train, ctx))
        net = self._build_aff(pretrained=False)
        net.load_state_dict(state)
        self.aff = place(net, ctx).eval()

    def seed_labels(self, images: ImageSet, ctx: Context) -> np.ndarray:
        """Confident labels (N, H, W) uint8 from the fitted CAM: 0 bg, 1 + c class c, 255 ignore.

        One class (binary data): 1 is the foreground. Multi-label data: only the image's tagged
        classes can be labelled (their CAMs are the only non-zero ones).
        """
        if self.cam is None:
            raise RuntimeError("cam_affinitynet.seed_labels called before fit()")
        cfg = self.config
        h, w = images.images.shape[1:3]
        out = np.empty((len(images), h, w), dtype=np.uint8)
        tags = images.tags() if images.multilabel else None
        for start in range(0, len(images), cfg.infer_batch_size):
            part = images.subset(slice(start, start + cfg.infer_batch_size))
            cams = self.cam.localize(part, ctx)  # (B, 1 or C, H, W)
            self._seed_cams.update(zip(part.names, cams, strict=True))
            imgs = np.asarray(part.images) if cfg.crf_confident else None
            for i in range(len(part)):
                image = None if imgs is None else imgs[i]
                cam = cams[i] if tags is not None else cams[i, 0]  # (C, H, W) or (H, W)
                classes = None if tags is None else np.flatnonzero(tags[start + i])
                if cfg.seed_rule == "psa":
                    out[start + i] = psa_confident_labels(
                        cam,
                        cfg.psa_low_alpha,
                        cfg.psa_high_alpha,
                        image=image,
                        crf=cfg.crf_confident,
                        classes=classes,
                    )
                else:
                    out[start + i] = confident_labels(
                        cam,
                        cfg.fg_threshold,
                        cfg.bg_threshold,
                        image=image,
                        crf=cfg.crf_confident,
                        classes=classes,
                    )
        return out

    def _train_affinity(self, train: ImageSet, ctx: Context) -> dict[str, torch.Tensor]:
        cfg = self.config
        labels = self.seed_labels(train, ctx)  # (N, H, W) uint8
        logger.info(
            "cam_affinitynet: seeds fg %.3f bg %.3f ignore %.3f of the train pixels",
            float(((labels != 0) & (labels != IGNORE)).mean()),
            float((labels == 0).mean()),
            float((labels == IGNORE).mean()),
        )
        with seeded(ctx.seed + 2):
            net = self._build_aff(cfg.pretrained)
        if cfg.aff_init_from_classifier:
            if cfg.aff_backbone != cfg.backbone:
                raise ValueError(
                    "cam_affinitynet: aff_init_from_classifier needs aff_backbone == backbone "
                    f"({cfg.aff_backbone!r} != {cfg.backbone!r})"
                )
            net.backbone.load_state_dict(self.cam.model.backbone.state_dict())
        place(net, ctx).train()
        new = {id(p) for p in net.new_parameters()}
        frozen_bn = set()
        if net.freeze_bn:
            for m in net.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    frozen_bn.update(id(p) for p in m.parameters())
                    m.requires_grad_(False)
        old = [p for p in net.parameters() if id(p) not in new and id(p) not in frozen_bn]
        groups = [
            {"params": old, "lr": cfg.aff_lr},
            {"params": net.new_parameters(), "lr": cfg.aff_lr * cfg.aff_new_lr_mult},
        ]
        if cfg.aff_optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                groups, lr=cfg.aff_lr, momentum=cfg.aff_momentum, weight_decay=cfg.aff_weight_decay
            )
        else:
            opt = torch.optim.Adam(groups, lr=cfg.aff_lr, weight_decay=cfg.aff_weight_decay)
        base_lrs = [g["lr"] for g in opt.param_groups]
        gen = ctx.generator(offset=2)
        n, bs = len(train), cfg.aff_batch_size
        drop_last = n > bs
        wanted = stage_epochs(cfg.aff_epochs, n, bs, cfg.aff_min_steps, drop_last)
        max_step = ctx.epochs(wanted) * (n // bs if drop_last else -(-n // bs))
        step = 0
        for epoch in ctx.epoch_range(wanted, "affinity net"):
            total, count = 0.0, 0
            for idx in minibatches(n, bs, gen, shuffle=True, drop_last=drop_last):
                if not ctx.should_continue():
                    logger.info(
                        "cam_affinitynet: affinity stopped by the budget after %d steps", step
                    )
                    return _cpu_state(net)
                idx = np.sort(idx)
                x = to_tensor(train.images[idx], ctx.device, net.input_norm)  # (B, 3, H, W)
                lab = torch.from_numpy(labels[idx]).to(ctx.device)  # (B, H, W)
                if cfg.aff_flip:
                    flags = flip_flags(len(idx), gen)
                    x, lab = apply_hflip(x, flags), apply_hflip(lab, flags)
                x, lab = random_resized_crop(x, lab, cfg.aff_crop_min, gen)
                with autocast(ctx.device, ctx.amp):
                    emb = net(x)  # (B, D, h, w)
                grid = pair_grid(emb.shape[2], emb.shape[3], cfg.radius, device=ctx.device)
                node = downsample_labels(lab, (emb.shape[2], emb.shape[3]))  # (B, h, w)
                pos_bg, pos_fg, neg = affinity_labels(node, grid)
                aff = pair_affinities(emb.float(), grid)  # (B, E)
                loss, parts = affinity_loss(aff, pos_bg, pos_fg, neg)
                for g, base in zip(opt.param_groups, base_lrs, strict=True):
                    g["lr"] = poly_lr(base, step, max_step)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, count, step = total + loss.item(), count + 1, step + 1
                logger.debug("cam_affinitynet: step %d loss %s", step, parts)
            logger.debug("cam_affinitynet: epoch %d mean loss %.4f", epoch, total / max(1, count))
        return _cpu_state(net)

    # ---- inference -----------------------------------------------------------------------
    def localize(self, batch: ImageSet, ctx: Context) -> np.ndarray:
        """CAM of each image's label class, (N, 1, H, W) float32 in [0, 1] (the walk's seeds).

        Multi-label data: the CAMs of every class (N, C, H, W), untagged classes zero.
        """
        if self.cam is None:
            raise RuntimeError("cam_affinitynet.localize called before fit()")
        if batch.names and all(n in self._seed_cams for n in batch.names):
            return np.stack([self._seed_cams[n] for n in batch.names])  # (N, 1 or C, H, W)
        return self.cam.localize(batch, ctx)

    @torch.no_grad()
    def affinities(self, batch: ImageSet, ctx: Context) -> tuple[torch.Tensor, PairGrid]:
        """Pair affinities (N, E) on the stride-8 grid of the batch images, and the grid."""
        if self.aff is None:
            raise RuntimeError("cam_affinitynet: affinities asked before fit()")
        cfg = self.config
        net = place(self.aff, ctx).eval()
        parts = []
        grid = None
        for start in range(0, len(batch), cfg.infer_batch_size):
            x = to_tensor(
                batch.images[start : start + cfg.infer_batch_size], ctx.device, net.input_norm
            )
            with autocast(ctx.device, ctx.amp):
                emb = net(x)  # (B, D, h, w)
            grid = pair_grid(emb.shape[2], emb.shape[3], cfg.radius, device=ctx.device)
            parts.append(pair_affinities(emb.float(), grid))
        assert grid is not None
        return torch.cat(parts), grid

    @torch.no_grad()
    def refine(self, batch: ImageSet, maps: np.ndarray, ctx: Context) -> np.ndarray:
        """Random walk of the CAMs (with a background channel) on AffinityNet's affinities.

        Every channel walks; on multi-label data the output keeps one channel per class
        (untagged classes zero) and the background channel is ``(1 - max_c M_c) ** alpha``.
        """
        if self.aff is None:
            raise RuntimeError("cam_affinitynet.refine called before fit()")
        cfg = self.config
        h, w = batch.images.shape[1:3]
        maps = np.asarray(maps, dtype=np.float32)
        if maps.ndim != 4 or maps.shape[0] != len(batch):
            raise ValueError(
                f"cam_affinitynet.refine: maps must be (N={len(batch)}, C, h, w); got {maps.shape}"
            )
        out = np.empty((len(batch), maps.shape[1], h, w), dtype=np.float32)
        for start in range(0, len(batch), cfg.infer_batch_size):
            sl = slice(start, start + cfg.infer_batch_size)
            part = batch.subset(sl)
            aff, grid = self.affinities(part, ctx)  # (B, E)
            m = torch.from_numpy(maps[sl]).to(ctx.device)  # (B, C, h', w')
            if m.shape[-2:] != (h, w):
                m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
            m = m.clamp(0.0, 1.0)
            res = self.walk(m, aff, grid)  # (B, C, H, W)
            if part.multilabel:  # the walk keeps untagged (zero) channels at zero; say so
                res = tagged_only(res, torch.from_numpy(part.tags()))
            out[sl] = res.cpu().numpy()
        return out

    def walk(self, maps: torch.Tensor, aff: torch.Tensor, grid: PairGrid) -> torch.Tensor:
        """Walk image-resolution maps (N, C, H, W) on a grid; returns (N, C, H, W) in [0, 1].

        The stack walked is ``[(1 - max_c M_c) ** bg_alpha, M_1, ..., M_C]`` (psa's
        ``infer_aff.py``); with ``output="ratio"`` the argmax over ``[0.5, M*_c / (M*_c +
        M*_bg)]`` is psa's argmax over ``[M*_bg, M*_1, ..., M*_C]``.
        """
        cfg = self.config
        size = maps.shape[-2:]
        bg = (1.0 - maps.amax(dim=1, keepdim=True)).pow(cfg.bg_alpha)  # (N, 1, H, W)
        stack = torch.cat([bg, maps], dim=1)  # (N, 1 + C, H, W)
        stack = F.adaptive_avg_pool2d(stack, (grid.height, grid.width))  # (N, 1 + C, h, w)
        rw = random_walk(stack, aff, cfg.beta, cfg.walk_steps, cfg.radius, cfg.walk_mode)
        rw = F.interpolate(rw, size=size, mode="bilinear", align_corners=False)
        bg_rw, fg_rw = rw[:, :1], rw[:, 1:]
        if cfg.output == "ratio":
            res = fg_rw / (fg_rw + bg_rw + LOG_EPS)
        else:
            res = fg_rw / (fg_rw.flatten(2).amax(dim=2)[:, :, None, None] + LOG_EPS)
        return res.clamp(0.0, 1.0)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
