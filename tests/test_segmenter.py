"""The shared segmenter: learns a separable task, honours ignore, budget and seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.base import Context
from methods.common.backbones import PretrainedWeightsError
from methods.common.data import seeded
from methods.common.segmenter import (
    SEGMENTER_PRESETS,
    SegmenterConfig,
    build_segmenter,
    load_segmenter,
    make_segmenter_config,
    predict_segmenter,
    train_segmenter,
)


def _rectangles(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Red rectangles (pet) on bluish noise (background): separable by colour."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, size, size, 3), dtype=np.uint8)
    images[..., 2] += 100
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        y0, x0 = rng.integers(0, size // 2, 2)
        h, w = rng.integers(size // 3, size // 2, 2)
        masks[i, y0 : y0 + h, x0 : x0 + w] = 1
    images[masks == 1] = (230, 60, 40)
    return images, masks


class Counting(Context):
    def __init__(self, limit: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.limit, self.calls = limit, 0

    def should_continue(self) -> bool:
        self.calls += 1
        return self.limit is None or self.calls <= self.limit


def test_presets_and_paper_defaults():
    assert SEGMENTER_PRESETS["paper"] == {}
    paper = make_segmenter_config("paper")
    assert paper == SegmenterConfig()
    assert paper.arch == "lraspp" and paper.epochs == 4 and paper.pretrained_backbone
    quick = make_segmenter_config("quick")
    assert quick.pretrained_backbone == "offline" and quick.arch == "unet"
    assert quick.unet_encoder == "tu-tf_efficientnet_lite0"
    assert not make_segmenter_config("tiny").pretrained_backbone
    with pytest.raises(ValueError, match="unknown segmenter preset"):
        make_segmenter_config("huge")


def test_learns_a_trivially_separable_set():
    images, masks = _rectangles(24, 64, seed=0)
    test_images, test_masks = _rectangles(8, 64, seed=1)
    cfg = make_segmenter_config("tiny", epochs=8, batch_size=4, lr=3e-3)
    ctx = Counting(seed=0)
    state = train_segmenter(images, masks, cfg, ctx)
    assert ctx.calls == 8 * (24 // 4)  # one call per step
    probs = predict_segmenter(load_segmenter(cfg, state), test_images, Context())
    assert probs.shape == (8, 1, 64, 64) and probs.dtype == np.float32
    assert 0.0 <= probs.min() and probs.max() <= 1.0
    pred, gt = probs[:, 0] > 0.5, test_masks == 1
    iou = (pred & gt).sum() / (pred | gt).sum()
    assert iou > 0.6, f"segmenter did not learn a colour-separable task: IoU {iou:.3f}"


def test_same_seed_same_weights_and_budget_stops():
    images, masks = _rectangles(8, 64, seed=2)
    cfg = make_segmenter_config("tiny", epochs=2, batch_size=2)
    a = train_segmenter(images, masks, cfg, Context(seed=4))
    b = train_segmenter(images, masks, cfg, Context(seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a)
    stopped = Counting(limit=2, seed=4)
    c = train_segmenter(images, masks, cfg, stopped)
    assert stopped.calls == 3  # two steps, then the False that stops everything (of 8 steps)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_all_ignored_masks_train_nothing():
    images, _ = _rectangles(4, 64, seed=3)
    ignored = np.full((4, 64, 64), 255, np.uint8)
    cfg = make_segmenter_config("tiny", epochs=1, batch_size=2)
    state = train_segmenter(images, ignored, cfg, Context(seed=1))
    with seeded(1):
        init = build_segmenter(cfg).state_dict()
    assert all(torch.equal(state[k], init[k]) for k in init)


def test_all_ignored_images_are_left_out_of_the_batches():
    """A tag-only image (all-ignored mask) takes no batch slot; the steps count the others."""
    images, masks = _rectangles(12, 64, seed=5)
    masks[1::2] = 255  # six tag-only images
    cfg = make_segmenter_config("tiny", epochs=2, batch_size=3)
    ctx = Counting(seed=2)
    state = train_segmenter(images, masks, cfg, ctx)
    assert ctx.calls == 2 * (6 // 3)  # 2 epochs of the 6 labelled images, batches of 3
    # the same images without the tag-only ones: the very same training (same batches)
    alone = train_segmenter(images[0::2].copy(), masks[0::2].copy(), cfg, Counting(seed=2))
    assert all(torch.equal(state[k], alone[k]) for k in state)


def test_bad_inputs_are_clear_errors():
    images, masks = _rectangles(2, 64, seed=4)
    cfg = make_segmenter_config("tiny")
    with pytest.raises(ValueError, match="0 \\(background\\), 1 \\(pet\\) or 255"):
        train_segmenter(images, masks * 2, cfg, Context())
    with pytest.raises(ValueError, match="do not match"):
        train_segmenter(images, masks[:, :32], cfg, Context())
    with pytest.raises(ValueError, match="uint8"):
        train_segmenter(images.astype(np.float32), masks, cfg, Context())
    with pytest.raises(ValueError, match="unknown segmenter arch"):
        build_segmenter(SegmenterConfig(arch="fcn"))


def test_unet_option_pads_odd_sizes():
    model = build_segmenter(make_segmenter_config("tiny", arch="unet")).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 40, 52))
    assert out.shape == (1, 2, 40, 52)


def test_pretrained_backbone_offline_is_a_clear_error(monkeypatch):
    import torchvision.models._api as api

    def offline(*args, **kwargs):
        raise OSError("network unreachable (simulated)")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsError, match="pretrained_backbone=False"):
        build_segmenter(make_segmenter_config("paper"))


def test_multiclass_unet_uses_its_own_decoder_widths():
    """quick's narrow decoder (8 channels last) is for the binary task; with C + 1 > 2 classes
    the U-Net takes ``unet_multiclass_decoder_channels``."""
    cfg = make_segmenter_config("quick", pretrained_backbone=False)
    assert cfg.unet_multiclass_decoder_channels == (256, 128, 64, 32, 16)

    def head_in(k: int) -> int:
        return build_segmenter(cfg, num_classes=k).net.segmentation_head[0].in_channels

    assert head_in(2) == 8 and head_in(7) == 16
    plain = make_segmenter_config("quick", pretrained_backbone=False,
                                  unet_multiclass_decoder_channels=None)  # fmt: skip
    assert build_segmenter(plain, num_classes=7).net.segmentation_head[0].in_channels == 8
