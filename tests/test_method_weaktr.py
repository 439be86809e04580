"""WeakTR-Refinery: FineCAM against an independent attention route, the clipping loss, maps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.base import Context, ImageSet, create_method, list_methods
from methods.common.data import to_tensor
from methods.common.refinery_decoder import clip_keep_mask, clip_window_size, clipped_bce
from methods.common.vit import build_vit, vit_forward_with_attention
from methods.weaktr_refinery import FINECAM_PARTS, MAP_OPTIONS, classifier_loss, fine_cam


# ---- helpers -------------------------------------------------------------------------------
def _tiny_vit(num_classes: int = 3, img_size: int = 64) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_vit(
        "tiny",
        False,
        num_classes=num_classes,
        img_size=img_size,
        depth=2,
        embed_dim=64,
        num_heads=2,
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # large random weights: peaked, non-uniform attention
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _independent_finecam(model, x, classes, size, clamp):
    """FineCAM from softmax attention captured at attn_drop on the non-fused path, with loops."""
    captured = []
    handles = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o)))
    try:
        with torch.no_grad():
            t = model.patch_embed(x)
            t = model._pos_embed(t)
            t = model.norm_pre(t)
            for blk in model.blocks:
                t = blk(t)
            pre_ln = t[:, 1:]  # (N, P, D)
            logits = model.forward_head(model.norm(t))
    finally:
        for h in handles:
            h.remove()
        for blk in model.blocks:
            blk.attn.fused_attn = True
    n, p, _ = pre_ln.shape
    g = int(math.isqrt(p))
    W = model.head.weight
    out = []
    for i in range(n):
        feats = pre_ln[i]
        m = torch.stack([(feats[j] / feats[j].norm()).mean() for j in range(p)])
        fused = torch.zeros(p)
        for attn in captured:  # one (N, H, T, T) per layer
            a = attn[i, :, 0, 1:]  # (H, P)
            s = torch.stack([(a[h] * m).sum() for h in range(a.shape[0])])
            w = torch.exp(s) / torch.exp(s).sum()
            for h in range(a.shape[0]):
                fused += w[h] * a[h] / a.shape[0]
        A = (fused - fused.min()) / (fused.max() + 1e-6)
        C = feats @ W[classes[i]]
        C = (C - C.min()) / (C.max() + 1e-6)
        cam = (A * C).reshape(1, 1, g, g)
        cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
        out.append(cam.clamp(0, 1) if clamp else cam)
    return torch.cat(out), logits


class CachingContext(Context):
    """A context that caches chosen stages in memory and counts steps (like the runner)."""

    def __init__(self, cache_stages=(), max_steps=None, **kw):
        super().__init__(**kw)
        self.cache_stages = set(cache_stages)
        self.cache = {}
        self.computed = []
        self.steps = 0
        self.max_steps = max_steps

    def should_continue(self) -> bool:
        self.steps += 1
        return self.max_steps is None or self.steps <= self.max_steps

    def stage(self, name, compute):
        if name in self.cache_stages and name in self.cache:
            return self.cache[name]
        self.computed.append(name)
        result = compute()
        assert all(isinstance(v, torch.Tensor) for v in result.values())
        self.cache[name] = result
        return result


def _imageset(n: int = 12, size: int = 64, seed: int = 0) -> ImageSet:
    """Bright squares (class 1) or discs (class 0) on dark noisy backgrounds."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % 2
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(10, 18)
        if labels[i]:
            inside = (abs(yy - cy) < r) & (abs(xx - cx) < r)
        else:
            inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        images[i][inside] = (220, 180, 90)
    return ImageSet(images=images, labels=labels, num_classes=2, names=[f"im{i}" for i in range(n)])


@pytest.fixture(scope="module")
def shared_ctx(tmp_path_factory) -> CachingContext:
    return CachingContext(
        cache_stages=("classifier",), seed=0, workdir=tmp_path_factory.mktemp("weaktr")
    )


# ---- FineCAM ---------------------------------------------------------------------------------
@pytest.mark.parametrize("clamp", [True, False])
def test_finecam_equals_independent_attention_route(clamp: bool) -> None:
    model = _tiny_vit()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([0, 2, 1])
    with torch.no_grad():
        out = vit_forward_with_attention(model, x)
        ours = fine_cam(out, model.head.weight, classes, (64, 64), clamp=clamp)
    ref, ref_logits = _independent_finecam(model, x, classes, (64, 64), clamp)
    assert out.cls_attn.shape == (3, 2, 2, 16)  # (N, L, H, P)
    assert out.tokens.shape == (3, 16, 64)
    torch.testing.assert_close(out.logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert ours.std() > 1e-3  # a non-trivial map, so the comparison means something
    if not clamp:
        assert ours.max() > 1.0 or ours.min() < 0.0  # the original's range quirk is visible
    # every hook is gone
    for blk in model.blocks:
        assert not blk.attn._forward_pre_hooks
    assert not model.norm._forward_pre_hooks


def test_hooks_removed_when_forward_raises() -> None:
    model = _tiny_vit()
    with pytest.raises(Exception):  # noqa: B017 - any error from timm's shape checks
        vit_forward_with_attention(model, torch.randn(1, 3, 48, 64))
    for blk in model.blocks:
        assert not blk.attn._forward_pre_hooks
    assert not model.norm._forward_pre_hooks


def test_finecam_uses_the_requested_class() -> None:
    model = _tiny_vit()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = vit_forward_with_attention(model, x)
        a = fine_cam(out, model.head.weight, torch.tensor([0]), (64, 64))
        b = fine_cam(out, model.head.weight, torch.tensor([1]), (64, 64))
    assert not torch.allclose(a, b)


def test_finecam_parts_are_its_two_factors() -> None:
    """The ablation's factors: A~ (one map for every class) times C~ is FineCAM, on the grid."""
    model = _tiny_vit()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = vit_forward_with_attention(model, x)
        parts = {
            part: fine_cam(out, model.head.weight, None, out.grid, clamp=False, part=part)
            for part in FINECAM_PARTS
        }
    torch.testing.assert_close(parts["attention"] * parts["coarse"], parts["both"])
    torch.testing.assert_close(parts["attention"][:, :1].expand(-1, 3, -1, -1), parts["attention"])
    assert not torch.allclose(parts["coarse"][:, 0], parts["coarse"][:, 1])


def test_finecam_part_is_an_inference_option_of_map_finecam_only() -> None:
    both = create_method("weaktr_refinery[map=finecam]", "tiny")
    coarse = create_method("weaktr_refinery[map=finecam,finecam_part=coarse]", "tiny")
    assert coarse.fit_identity() == both.fit_identity()  # the classifier is shared
    assert coarse.identity() != both.identity()
    with pytest.raises(ValueError, match="only with map=finecam"):
        create_method("weaktr_refinery[finecam_part=attention]", "tiny")
    with pytest.raises(ValueError, match="finecam_part must be one of"):
        create_method("weaktr_refinery[map=finecam,finecam_part=cls]", "tiny")


# ---- gradient-clipping loss -----------------------------------------------------------------
def _spiky(size: int = 64):
    target = torch.full((1, 1, size, size), 0.5)
    logits = torch.full_like(target, math.log(0.45 / 0.55))  # error 0.05 everywhere
    spikes = [(2, 3), (40, 5), (5, 50), (size - 1, size - 1), (50, 60)]
    for y, x in spikes:
        logits[0, 0, y, x] = -10.0  # error ~0.5: ten times the rest
    return logits, target, spikes


def test_window_scales_with_image_size() -> None:
    assert clip_window_size(224) == 120
    assert clip_window_size(128) == round(120 * 128 / 224)
    assert clip_window_size(64) == 34


def test_low_gradient_image_keeps_every_pixel() -> None:
    g = torch.Generator().manual_seed(0)
    target = 0.4 + 0.05 * torch.rand(2, 1, 64, 64, generator=g)
    logits = torch.logit(target + 0.1)  # nearly uniform error, well under 1.2 x any mean
    keep = clip_keep_mask(logits, target, window=34, tau=1.2)
    assert keep.all()
    loss = clipped_bce(logits, target, window=34)
    full = F.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(loss, full, atol=1e-5, rtol=1e-5)


def test_high_gradient_pixels_dropped_over_the_whole_image() -> None:
    logits, target, spikes = _spiky()
    keep = clip_keep_mask(logits, target, window=34, tau=1.2)
    for y, x in spikes:  # incl. the bottom-right corner, in a partial window
        assert not keep[0, 0, y, x], (y, x)
    assert int(keep.sum()) == 64 * 64 - len(spikes)
    # the loss is the mean BCE over exactly the kept pixels
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    expected = bce[keep].mean()
    torch.testing.assert_close(clipped_bce(logits, target, window=34), expected)


def test_window_mean_keeps_a_uniformly_hard_bottom_right_window() -> None:
    target = torch.full((1, 1, 64, 64), 0.5)
    logits = torch.full_like(target, math.log(0.45 / 0.55))
    logits[..., 34:, 34:] = math.log(0.2 / 0.8)  # a whole partial window with 6x the error
    keep = clip_keep_mask(logits, target, window=34, tau=1.2)
    assert keep.all()  # judged against its own window mean, not only the image mean
    logits[..., 50, 50] = -10.0  # but a spike inside it still goes
    keep = clip_keep_mask(logits, target, window=34, tau=1.2)
    assert not keep[0, 0, 50, 50] and int(keep.sum()) == 64 * 64 - 1


def test_faithful_windows_ignore_everything_outside_the_top_left() -> None:
    logits, target, spikes = _spiky()
    keep = clip_keep_mask(logits, target, window=34, tau=1.0, top_left_only=True)
    assert not keep[..., 34:, :].any() and not keep[..., :, 34:].any()
    assert not keep[0, 0, 2, 3]  # the top-left spike is clipped
    assert int(keep[..., :34, :34].sum()) == 34 * 34 - 1
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    torch.testing.assert_close(
        clipped_bce(logits, target, window=34, tau=1.0, top_left_only=True), bce[keep].mean()
    )


# ---- the method -------------------------------------------------------------------------------
def test_registered_and_validated() -> None:
    assert "weaktr_refinery" in list_methods()
    with pytest.raises(ValueError, match="map must be one of"):
        create_method("weaktr_refinery[map=mask]", "tiny")
    with pytest.raises(ValueError, match="decoder_size"):
        create_method("weaktr_refinery[decoder_size=huge]", "tiny")
    paper = create_method("weaktr_refinery", "paper").config
    assert (paper.vit, paper.img_size, paper.lr, paper.decoder_lr) == ("tiny", 224, 1e-4, 5e-2)


def test_pretrained_errors_are_clear(tmp_path) -> None:
    from methods.common.backbones import PretrainedWeightsError

    missing = tmp_path / "nope.pth"
    with pytest.raises(PretrainedWeightsError, match="nope.pth"):
        build_vit("tiny", str(missing), num_classes=2, img_size=64)
    with pytest.raises(ValueError, match="pretrained=False"):
        build_vit("tiny", True, num_classes=2, img_size=64, depth=2)


@pytest.mark.parametrize("option", MAP_OPTIONS)
def test_each_map_option_yields_valid_maps(option: str, shared_ctx: CachingContext) -> None:
    data = _imageset()
    method = create_method(f"weaktr_refinery[map={option}]", "tiny")
    shared_ctx.computed.clear()
    method.fit(data, shared_ctx)
    assert ("decoder" in shared_ctx.computed) == (option != "finecam")
    batch = data.subset(slice(0, 5))
    cams = method.localize(batch, shared_ctx)
    maps = method.refine(batch, cams, shared_ctx)
    for m in (cams, maps):
        assert m.shape == (5, 1, 64, 64) and m.dtype == np.float32
        assert np.isfinite(m).all() and m.min() >= 0.0 and m.max() <= 1.0
        assert m.std() > 1e-4
    if option == "finecam":
        np.testing.assert_array_equal(maps, cams)
    else:
        assert not np.allclose(maps, cams)


def test_faithful_differs_from_default(shared_ctx: CachingContext) -> None:
    data = _imageset()
    batch = data.subset(slice(0, 6))
    default = create_method("weaktr_refinery", "tiny")
    faithful = create_method("weaktr_refinery[faithful=true]", "tiny")
    shared_ctx.cache.pop("decoder", None)
    default.fit(data, shared_ctx)
    decoder_default = {k: v.clone() for k, v in default.decoder.state_dict().items()}
    shared_ctx.cache.pop("decoder", None)
    faithful.fit(data, shared_ctx)  # same classifier (cached), different decoder targets
    diff = [
        k
        for k, v in faithful.decoder.state_dict().items()
        if v.is_floating_point() and not torch.allclose(v, decoder_default[k])
    ]
    assert diff
    a = default.refine(batch, default.localize(batch, shared_ctx), shared_ctx)
    b = faithful.refine(batch, faithful.localize(batch, shared_ctx), shared_ctx)
    assert b.min() >= 0.0 and b.max() <= 1.0
    assert not np.allclose(a, b)


def test_budget_stops_training(tmp_path) -> None:
    data = _imageset(n=24)
    ctx = CachingContext(max_steps=2, seed=0, workdir=tmp_path)
    method = create_method("weaktr_refinery[epochs=3,decoder_epochs=3]", "tiny")
    method.fit(data, ctx)  # 3 epochs x 3 steps each would be 9 + 9 calls
    assert ctx.steps == 4  # one refused call per stage, then each loop stops
    assert method.localize(data.subset(slice(0, 2)), ctx).shape == (2, 1, 64, 64)


def test_bad_labels_are_rejected(shared_ctx: CachingContext) -> None:
    data = _imageset(n=4)
    data.labels = np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        create_method("weaktr_refinery", "tiny").fit(data, shared_ctx)


def test_map_options_compute_the_documented_maps(shared_ctx: CachingContext) -> None:
    data = _imageset()
    batch = data.subset(slice(0, 4))
    loss_m = create_method("weaktr_refinery[map=loss]", "tiny")
    loss_m.fit(data, shared_ctx)
    dec_m = create_method("weaktr_refinery[map=decoder]", "tiny")
    dec_m.fit(data, shared_ctx)
    x = to_tensor(batch.images)
    with torch.no_grad():
        out = vit_forward_with_attention(loss_m.vit, x)
        target = fine_cam(out, loss_m.vit.head.weight, torch.from_numpy(batch.labels), (64, 64))
        logits = loss_m.decoder(out.token_map())
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        flat = bce.flatten(1)
        lo, hi = flat.min(1).values[:, None, None, None], flat.max(1).values[:, None, None, None]
        expected_loss = ((bce - lo) / (hi + 1e-6)).numpy()
        dec_logits = dec_m.decoder(out.token_map())
    cams = loss_m.localize(batch, shared_ctx)
    np.testing.assert_allclose(cams, target.numpy(), atol=1e-5)
    np.testing.assert_allclose(loss_m.refine(batch, cams, shared_ctx), expected_loss, atol=1e-5)
    np.testing.assert_allclose(
        dec_m.refine(batch, cams, shared_ctx), torch.sigmoid(dec_logits).numpy(), atol=1e-5
    )


def test_faithful_uses_predicted_class_and_top_left_windows(shared_ctx, monkeypatch) -> None:
    import methods.weaktr_refinery as wk

    calls = []
    real = wk.clipped_bce

    def spy(logits, target, window, tau=1.2, top_left_only=False):
        calls.append((window, tau, top_left_only, float(target.max())))
        return real(logits, target, window, tau, top_left_only)

    monkeypatch.setattr(wk, "clipped_bce", spy)
    data = _imageset()
    batch = data.subset(slice(0, 6))
    relabelled = data.subset(slice(0, 6))
    relabelled.labels = 1 - relabelled.labels
    for faithful in (False, True):
        calls.clear()
        shared_ctx.cache.pop("decoder", None)
        method = create_method(f"weaktr_refinery[faithful={faithful}]", "tiny")
        method.fit(data, shared_ctx)
        assert {c[:3] for c in calls} == {(34, 1.0 if faithful else 1.2, faithful)}
        same = np.allclose(
            method.localize(batch, shared_ctx), method.localize(relabelled, shared_ctx)
        )
        assert same == faithful  # the faithful map ignores the label (predicted class)


def test_faithful_decoder_target_is_unclamped() -> None:
    model = _tiny_vit(num_classes=2)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 0])
    targets = {}
    for faithful in (False, True):
        method = create_method(f"weaktr_refinery[faithful={faithful}]", "tiny")
        method.vit = model
        with torch.no_grad():
            targets[faithful] = method._finecam(vit_forward_with_attention(model, x), labels)
    assert targets[False].min() >= 0.0 and targets[False].max() <= 1.0
    assert targets[True].max() > 1.0 or targets[True].min() < 0.0


def test_numeric_overrides_from_specs_are_numbers() -> None:
    method = create_method("weaktr_refinery[lr=5e-4,epochs=3]", "tiny")  # YAML: "5e-4" is a str
    assert method.config.lr == 5e-4 and isinstance(method.config.lr, float)
    # rejected when the method is created (methods.base checks types against the Config)
    with pytest.raises((TypeError, ValueError), match="'lr' expects float, got 'fast'"):
        create_method("weaktr_refinery[lr=fast]", "tiny")
    with pytest.raises((TypeError, ValueError), match="'epochs' expects int"):
        create_method("weaktr_refinery[epochs=1.5]", "tiny")


# ---- the multi-label form --------------------------------------------------------------------
def _multilabel_imageset(n: int = 8, size: int = 64, seed: int = 0) -> ImageSet:
    """Discs (class 0), squares (class 1) and bars (class 2); one or two of them per image."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(n, size, size, 3), dtype=np.uint8)
    tags = np.zeros((n, 3), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    colours = [(220, 180, 90), (90, 200, 220), (200, 90, 200)]
    for i in range(n):
        for c in rng.choice(3, size=1 + i % 2, replace=False):
            tags[i, c] = 1
            cy, cx, r = rng.integers(14, 50), rng.integers(14, 50), rng.integers(6, 12)
            inside = [
                (yy - cy) ** 2 + (xx - cx) ** 2 < r * r,
                (abs(yy - cy) < r) & (abs(xx - cx) < r),
                (abs(yy - cy) < r // 3) & (abs(xx - cx) < r),
            ][c]
            images[i][inside] = colours[c]
    return ImageSet(images=images, labels=tags, num_classes=3, names=[f"m{i}" for i in range(n)])


@pytest.mark.parametrize("clamp", [True, False])
def test_finecam_of_every_class_is_each_class_finecam(clamp: bool) -> None:
    model = _tiny_vit(num_classes=3)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = vit_forward_with_attention(model, x)
        every = fine_cam(out, model.head.weight, None, (64, 64), clamp=clamp)
        roundtrip = fine_cam(out, model.head.weight, None, (64, 64), clamp, (128, 128))
        assert every.shape == (2, 3, 64, 64)
        for c in range(3):
            one = torch.full((2,), c)
            torch.testing.assert_close(
                every[:, c : c + 1], fine_cam(out, model.head.weight, one, (64, 64), clamp=clamp)
            )
            torch.testing.assert_close(
                roundtrip[:, c : c + 1],
                fine_cam(out, model.head.weight, one, (64, 64), clamp, (128, 128)),
            )


@pytest.fixture(scope="module")
def multilabel_ctx(tmp_path_factory) -> CachingContext:
    return CachingContext(
        cache_stages=("classifier",), seed=0, workdir=tmp_path_factory.mktemp("weaktr_ml")
    )


def test_multilabel_trains_on_tags_and_tagged_maps(multilabel_ctx, monkeypatch) -> None:
    import methods.weaktr_refinery as wk

    data = _multilabel_imageset()
    soft_margin, decoder_maps = [], []
    real_loss, real_bce = wk.multilabel_loss, wk.clipped_bce

    def loss_spy(logits, tags):
        soft_margin.append(tags.clone())
        return real_loss(logits, tags)

    def bce_spy(logits, target, *args, **kwargs):
        decoder_maps.append(tuple(target.shape))
        return real_bce(logits, target, *args, **kwargs)

    monkeypatch.setattr(wk, "multilabel_loss", loss_spy)
    monkeypatch.setattr(wk, "clipped_bce", bce_spy)
    multilabel_ctx.cache.clear()
    method = create_method("weaktr_refinery", "tiny")
    method.fit(data, multilabel_ctx)
    # the classifier learns the multi-hot tags with the multi-label soft margin
    seen = torch.cat(soft_margin).numpy()
    assert seen.shape[1] == 3 and seen.sum(axis=1).max() == 2
    assert {tuple(r) for r in seen} <= {tuple(r) for r in data.tags()}
    # the decoder has one output per class; one clipped-BCE map per (image, tagged class)
    assert method.decoder.layers[-1].out_channels == 3
    assert sum(s[0] for s in decoder_maps) == int(data.tags().sum())  # one epoch, every image
    assert {s[1] for s in decoder_maps} == {1}


@pytest.mark.parametrize("option", MAP_OPTIONS)
def test_multilabel_untagged_classes_are_never_mapped(option: str, multilabel_ctx) -> None:
    data = _multilabel_imageset()
    method = create_method(f"weaktr_refinery[map={option}]", "tiny")
    method.fit(data, multilabel_ctx)
    cams = method.localize(data, multilabel_ctx)
    maps = method.refine(data, cams, multilabel_ctx)
    untagged = np.broadcast_to(data.tags()[:, :, None, None] == 0, maps.shape)
    for m in (cams, maps):
        assert m.shape == (8, 3, 64, 64) and m.dtype == np.float32
        assert m.min() >= 0.0 and m.max() <= 1.0
        assert np.all(m[untagged] == 0)
        assert all(m[i, c].std() > 1e-4 for i, c in zip(*np.nonzero(data.tags())))
    with pytest.raises(ValueError, match=r"maps must be \(N=8, 3, h, w\)"):
        method.refine(data, cams[:, :1], multilabel_ctx)


def test_multilabel_tags_are_checked(multilabel_ctx) -> None:
    data = _multilabel_imageset(n=4)
    data.labels = data.labels * 2
    with pytest.raises(ValueError, match="tags must be"):
        create_method("weaktr_refinery", "tiny").fit(data, multilabel_ctx)


def test_patch_loss_adds_the_head_on_the_mean_patch_token() -> None:
    """patch_loss = w: class-token CE + w x CE of head(mean pre-LN patch token), from scratch."""
    model = _tiny_vit()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 2, 1])
    with torch.no_grad():
        tokens = model.patch_embed(x)
        tokens = model.norm_pre(model._pos_embed(tokens))
        for blk in model.blocks:
            tokens = blk(tokens)
        cls_ce = F.cross_entropy(model.head(model.norm(tokens)[:, 0]), y)
        patch_ce = F.cross_entropy(model.head(tokens[:, 1:].mean(dim=1)), y)
        plain = classifier_loss(model, x, y)
        both = classifier_loss(model, x, y, patch_loss=0.5)
    torch.testing.assert_close(plain, cls_ce)
    torch.testing.assert_close(both, cls_ce + 0.5 * patch_ce)


def test_patch_loss_is_a_training_option() -> None:
    plain = create_method("weaktr_refinery", "tiny")
    patch = create_method("weaktr_refinery[patch_loss=1]", "tiny")
    assert patch.fit_identity() != plain.fit_identity()  # a new classifier, not a reused one
    with pytest.raises(ValueError, match="patch_loss"):
        create_method("weaktr_refinery[patch_loss=-1]", "tiny")
