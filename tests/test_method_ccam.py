"""Tests of ccam_ecs: the CCAM loss, rank weights, polarity, ECS erasure, CRF path, optimiser."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from methods.base import Context, ImageSet, create_method
from methods.ccam_ecs import (
    CCAMNet,
    border_mean,
    build_optimizer,
    ccam_loss,
    class_cam,
    crf_refine,
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
from methods.common.backbones import create_resnet


def _imageset(n: int = 12, size: int = 64, seed: int = 0) -> ImageSet:
    """Dark noisy images, each with one bright square (the 'object'), two classes."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        y0, x0 = rng.integers(size // 8, size // 2, 2)
        images[i, y0 : y0 + size // 3, x0 : x0 + size // 3] = (220, 120 + 8 * (i % 2), 40)
    return ImageSet(images, np.arange(n) % 2, 2, [f"im{i}" for i in range(n)])


class RecordingContext(Context):
    """Caches stage results in memory and can cut the budget after a number of steps."""

    def __init__(self, max_steps: int | None = None, cache: dict | None = None) -> None:
        super().__init__()
        self.max_steps = max_steps
        self.steps = 0
        self.cache = {} if cache is None else cache
        self.computed: list[str] = []

    def should_continue(self) -> bool:
        if self.max_steps is not None and self.steps >= self.max_steps:
            return False
        self.steps += 1
        return True

    def stage(self, name, compute):
        if name not in self.cache:
            self.computed.append(name)
            self.cache[name] = {k: v.clone() for k, v in compute().items()}
        return self.cache[name]


# ---- the loss --------------------------------------------------------------------------------
def test_ccam_loss_symmetric_under_fg_bg_swap():
    g = torch.Generator().manual_seed(0)
    z = torch.rand(6, 10, 4, 4, generator=g)
    p = torch.rand(6, 1, 4, 4, generator=g)
    fg, bg = pool_fg_bg(z, p)
    fg2, bg2 = pool_fg_bg(z, 1 - p)
    a = ccam_loss(fg, bg, alpha=0.25)
    b = ccam_loss(fg2, bg2, alpha=0.25)
    torch.testing.assert_close(a["total"], b["total"])
    torch.testing.assert_close(a["pos_fg"], b["pos_bg"])
    torch.testing.assert_close(a["neg"], b["neg"])
    # the parts are not all equal, so the symmetry is not a tautology of identical terms
    assert not torch.allclose(a["pos_fg"], a["pos_bg"])


def test_pool_divides_by_hw():
    z = torch.ones(1, 3, 2, 5)
    p = torch.zeros(1, 1, 2, 5)
    p[..., 0, 0] = 1.0  # one foreground cell out of 10
    fg, bg = pool_fg_bg(z, p)
    torch.testing.assert_close(fg, torch.full((1, 3), 0.1))
    torch.testing.assert_close(bg, torch.full((1, 3), 0.9))


def test_rank_weights_by_hand():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.4, 0.6, 0.7]])
    a = 0.25
    # descending ranks: row0 -> 1,3,2 ; row1 -> 3,1,2 ; row2 -> 3,2,1
    expected = torch.exp(-a * torch.tensor([[0.0, 2.0, 1.0], [2.0, 0.0, 1.0], [2.0, 1.0, 0.0]]))
    torch.testing.assert_close(rank_weights(sim, a), expected)
    # the official 0-based rank puts exp(alpha) on the top pair
    torch.testing.assert_close(rank_weights(sim, a, first_rank=0), expected * math.exp(a))


def test_positive_and_negative_loss_by_hand():
    v = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    c = 1 / math.sqrt(2)
    s = torch.tensor([[1.0, c, 0.0], [c, 1.0, c], [0.0, c, 1.0]]).clamp(5e-4, 1 - 5e-4)
    w = rank_weights(s, 0.25)
    torch.testing.assert_close(positive_loss(v, 0.25), (w * -torch.log(s)).mean())
    # orthogonal bg/fg: every similarity is clamped at 5e-4
    bg = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    fg = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    torch.testing.assert_close(negative_loss(bg, fg), torch.tensor(-math.log(1 - 5e-4)))


# ---- polarity --------------------------------------------------------------------------------
def test_ring_width():
    assert ring_width(8, 8) == 1
    assert ring_width(28, 28) == 4
    assert ring_width(14, 20) == 2


def test_polarity_rule_flips_an_inverted_map():
    maps = torch.full((5, 1, 8, 8), 0.9)  # bright border
    maps[:, :, 1:-1, 1:-1] = 0.1  # dark interior (the object)
    assert is_inverted(maps)
    fixed = orient(maps, is_inverted(maps))
    assert float(border_mean(fixed).mean()) == pytest.approx(0.1)
    assert float(fixed[0, 0, 4, 4]) == pytest.approx(0.9)
    # a direct map (object bright, border dark) is left alone
    assert not is_inverted(fixed)
    torch.testing.assert_close(orient(fixed, False), fixed)
    # averaged over images: one bright-border image among dark ones does not flip the set
    mixed = torch.cat([maps[:1], fixed[:4]])
    assert not is_inverted(mixed)


# ---- ECS -------------------------------------------------------------------------------------
def test_ecs_erasure_changes_only_high_cam_pixels():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=g)
    cam = torch.zeros(2, 1, 32, 32)
    cam[0, 0, 4:12, 6:20] = 0.9
    cam[1, 0, 20:30, 2:9] = 0.61
    cam[1, 0, 0:5, 0:5] = 0.6  # exactly at the threshold: kept
    out = ecs_erase(x, cam, threshold=0.6, sigma_frac=0.1)
    keep = (cam <= 0.6).expand_as(x)
    assert out[keep].numpy().tobytes() == x[keep].numpy().tobytes()
    erased = ~keep
    assert (out[erased] != x[erased]).float().mean() > 0.99
    # a strong blur: the erased region is much smoother than the noise it replaced
    assert out[erased].std() < 0.5 * x[erased].std()


def test_ecs_erasure_upsamples_a_coarse_cam():
    x = torch.randn(1, 3, 32, 32)
    cam = torch.zeros(1, 1, 4, 4)
    cam[0, 0, 0, 0] = 1.0
    out = ecs_erase(x, cam)
    changed = (out != x).any(dim=1)[0]
    assert changed[:4, :4].all() and not changed[16:, :].any() and not changed[:, 16:].any()


# ---- optimiser -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cfg():
    return create_method("ccam_ecs", "tiny").config


def _net() -> CCAMNet:
    return CCAMNet(create_resnet("resnet18", pretrained=False, output_stride=16), num_classes=3)


def _group(opt, name):
    return next(g for g in opt.param_groups if g["name"] == name)


def test_default_optimizer_as_intended(tiny_cfg):
    net = _net()
    cfg = replace(tiny_cfg, optimizer="sgd", lr=1e-3, weight_decay=1e-4, faithful=False)
    opt = build_optimizer(net, cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert _group(opt, "backbone")["lr"] == pytest.approx(1e-3)
    assert _group(opt, "new")["lr"] == pytest.approx(1e-2)
    assert all(g["momentum"] == pytest.approx(0.9) for g in opt.param_groups)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in net.parameters()}  # BN affine included


def test_faithful_optimizer_has_the_official_quirks(tiny_cfg):
    net = _net()
    cfg = replace(tiny_cfg, optimizer="sgd", lr=1e-3, weight_decay=1e-4, faithful=True)
    opt = build_optimizer(net, cfg)
    assert _group(opt, "new")["lr"] == pytest.approx(_group(opt, "backbone")["lr"])  # no 10x
    assert all(g["momentum"] == pytest.approx(1e-4) for g in opt.param_groups)  # wd in momentum
    assert all(g["weight_decay"] == pytest.approx(1e-4) for g in opt.param_groups)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    bn = [p for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert bn and not any(id(p) in in_opt for p in bn)
    assert not any(p.requires_grad for p in bn)
    assert id(net.head.weight) in {id(p) for p in _group(opt, "new")["params"]}


# ---- the method end to end (tiny) ------------------------------------------------------------
def test_fit_localize_and_polarity_survives_the_stage_cache():
    data = _imageset()
    method = create_method("ccam_ecs[epochs=2]", "tiny")
    ctx = RecordingContext()
    method.fit(data, ctx)
    assert ctx.computed == ["ccam"]
    state = ctx.cache["ccam"]
    assert state["polarity_inverted"].item() == int(method.inverted)
    maps = method.localize(data, ctx)
    assert maps.shape == (len(data), 1, 64, 64) and maps.dtype == np.float32
    assert 0.0 <= maps.min() and maps.max() <= 1.0 and maps.max() > 0.9

    # a fresh instance reading the cached stage trains nothing and reproduces the maps
    again = create_method("ccam_ecs[epochs=2]", "tiny")
    ctx2 = RecordingContext(cache=ctx.cache)
    again.fit(data, ctx2)
    assert ctx2.computed == [] and ctx2.steps == 0
    assert again.inverted == method.inverted
    np.testing.assert_array_equal(again.localize(data, ctx2), maps)

    # flipping the stored flag flips the map before normalisation
    flipped = {k: v.clone() for k, v in ctx.cache["ccam"].items()}
    flipped["polarity_inverted"] = torch.tensor(1 - int(method.inverted))
    other = create_method("ccam_ecs[epochs=2]", "tiny")
    other.fit(data, RecordingContext(cache={"ccam": flipped}))
    assert other.inverted != method.inverted
    assert not np.allclose(other.localize(data, ctx2), maps)


def test_budget_stops_training_and_still_votes_polarity():
    data = _imageset()
    method = create_method("ccam_ecs[epochs=5,ecs=false,faithful=true,optimizer=sgd]", "tiny")
    ctx = RecordingContext(max_steps=1)
    method.fit(data, ctx)
    assert ctx.steps == 1
    assert "polarity_inverted" in ctx.cache["ccam"]
    assert "classifier.weight" not in ctx.cache["ccam"]  # plain CCAM: no ECS classifier


def test_too_few_images_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2"):
        create_method("ccam_ecs", "tiny").fit(_imageset(n=1), Context())


def test_crf_path_runs_and_stays_in_unit_range():
    from methods.common.crf import crf_labels

    data = _imageset(n=4)
    method = create_method("ccam_ecs[crf=true]", "tiny")
    method.fit(data, Context())
    maps = method.localize(data, Context())
    refined = method.refine(data, maps, Context())
    assert refined.shape == maps.shape and refined.dtype == np.float32
    assert 0.0 <= refined.min() and refined.max() <= 1.0
    # same decision as the label CRF (unary_from_labels, gt_prob 0.7) on the binarised cue
    for i in range(len(data)):
        labels = crf_labels(data.images[i], (maps[i, 0] > 0.3).astype(np.uint8), gt_prob=0.7)
        agree = ((refined[i, 0] > 0.5) == (labels == 1)).mean()
        assert agree > 0.999
    # crf=False is the identity
    plain = create_method("ccam_ecs", "tiny")
    assert plain.refine(data, maps, Context()) is maps


def test_crf_refine_follows_image_edges():
    images = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    images[0, 8:24, 8:24] = 255  # a white square on black
    cue = np.zeros((1, 1, 32, 32), dtype=np.float32)
    cue[0, 0, 6:26, 6:26] = 0.8  # a cue that overshoots the square by 2 px
    out = crf_refine(images, cue, threshold=0.5)
    fg = out[0, 0] > 0.5
    assert fg[8:24, 8:24].all()
    assert not fg[6:8, 6:26].any()  # the overshoot onto black is removed
    with pytest.raises(ValueError, match="do not match"):
        crf_refine(images, cue[:, :, :16], threshold=0.5)


def test_bad_config_values_are_clear_errors():
    with pytest.raises(ValueError, match="optimizer must be"):
        create_method("ccam_ecs[optimizer=rmsprop]", "tiny")
    with pytest.raises(ValueError, match="ecs_threshold"):
        create_method("ccam_ecs[ecs_threshold=1.5]", "tiny")
    with pytest.raises(ValueError, match="batch_size"):
        create_method("ccam_ecs[batch_size=1]", "tiny")


# ---- the multi-label form (issue 17) ------------------------------------------------------------
def test_class_maps_are_fg_times_the_class_share_of_the_tagged_cams():
    fg = torch.tensor([[[[0.8, 0.3], [0.6, 0.0]]]])  # (1, 1, 2, 2)
    cams = torch.tensor(
        [[[[0.9, 0.2], [0.0, 0.5]], [[0.45, 0.4], [0.0, 0.1]], [[1.0, 1.0], [1.0, 1.0]]]]
    )  # (1, 3, 2, 2); class 2 has the largest CAM everywhere but is not tagged
    tags = torch.tensor([[1.0, 1.0, 0.0]])
    maps = fg_times_class_share(fg, cams, tags)
    assert torch.all(maps[:, 2] == 0)  # untagged: never a score, never the argmax
    torch.testing.assert_close(maps.amax(dim=1, keepdim=True), fg, atol=1e-4, rtol=0)
    # the winner is the tagged class with the largest CAM; fg decides against background
    assert maps[0, :, 0, 0].argmax() == 0 and maps[0, :, 0, 1].argmax() == 1
    torch.testing.assert_close(maps[0, 1, 0, 0], torch.tensor(0.8 * 0.5), atol=1e-4, rtol=0)
    # every tagged CAM zero: both tagged classes share the fg score equally
    torch.testing.assert_close(maps[0, :2, 1, 0], torch.tensor([0.6, 0.6]))


def test_ecs_class_cam_with_tags_is_the_max_over_the_tagged_classes():
    torch.manual_seed(0)
    feat, weight = torch.randn(2, 8, 4, 4), torch.randn(3, 8)
    tags = torch.tensor([[1, 0, 1], [0, 1, 0]])
    got = class_cam(feat, weight, tags)  # (2, 1, 4, 4)
    per_class = torch.cat([class_cam(feat, weight, torch.full((2,), k)) for k in range(3)], 1)
    expected = (per_class * tags[:, :, None, None]).amax(dim=1, keepdim=True)
    torch.testing.assert_close(got, expected)


def test_multilabel_maps_share_the_class_agnostic_foreground():
    rng = np.random.default_rng(0)
    n, c, s = 8, 3, 32
    tags = np.zeros((n, c), dtype=np.uint8)
    for i in range(n):
        tags[i, rng.choice(c, size=1 + i % 2, replace=False)] = 1
    data = ImageSet(
        images=rng.integers(0, 255, size=(n, s, s, 3), dtype=np.uint8),
        labels=tags,
        num_classes=c,
        names=[f"im{i}" for i in range(n)],
    )
    method = create_method("ccam_ecs[ecs=false]", preset="tiny")
    ctx = Context(max_epochs=1)
    method.fit(data, ctx)
    assert method.model.classifier is not None  # the class CAMs need it, ECS or not
    maps = method.localize(data, ctx)
    assert maps.shape == (n, c, s, s)
    single = ImageSet(data.images, np.argmax(tags, 1), c, data.names)  # same net, binary path
    fg = method.localize(single, ctx)  # (N, 1, H, W): the class-agnostic map
    np.testing.assert_allclose(maps.max(axis=1, keepdims=True), fg, atol=1e-4)
    method.config = replace(method.config, crf=True)
    refined = method.refine(data, maps, ctx)
    untagged = np.broadcast_to(tags[:, :, None, None] == 0, refined.shape)
    assert np.all(refined[untagged] == 0) and np.all((refined >= 0) & (refined <= 1))
