"""WeakTr (hustvl): class tokens, learned attention fusion, patch refinement, multi-scale CAMs,
and the gradient-clipping decoder loss, on toy inputs (seconds)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.base import Context, create_method
from methods.common.attention_fusion import (
    AdaptiveAttentionFusion,
    fused_cams,
    multi_scale_cams,
    patch_attention_refine,
)
from methods.common.online_retraining import clip_pixel_loss, gradient_clipped_loss


def _tiny_net(num_classes: int = 3, spec: str = "weaktr"):
    method = create_method(spec, preset="tiny")
    torch.manual_seed(0)
    return method, method._new_cam_net(num_classes, pretrained=False)


def test_one_class_token_per_class_and_shapes():
    method, net = _tiny_net(num_classes=3)
    assert net.class_tokens.shape == (1, 3, 64)
    assert net.class_pos.shape == (1, 3, 64)
    out = net(torch.randn(2, 3, 64, 64))
    assert out.logits.shape == (2, 3)
    assert out.coarse.shape == (2, 3, 4, 4)
    assert out.attn.shape == (2, 2, 2, 3 + 16, 3 + 16)  # (B, L, H, T, T), T = C + P
    assert not out.attn.requires_grad
    torch.testing.assert_close(out.attn.sum(-1), torch.ones(2, 2, 2, 19))
    # multi-scale: another input size resamples the patch position embedding
    assert net(torch.randn(1, 3, 96, 80)).coarse.shape == (1, 3, 6, 5)


def test_fusion_weights_get_gradients_and_change_in_training():
    # K = 2 layers x 2 heads; reduction 1 keeps 4 hidden units (with 1, a ReLU can be dead)
    _, net = _tiny_net(num_classes=3, spec="weaktr[aaf_reduction=1]")
    fusion = [p for p in net.fusion.parameters()]
    assert fusion and all(p.requires_grad for p in fusion)
    y = torch.eye(3)[[0, 1, 2, 0]]
    out = net(torch.randn(4, 3, 64, 64))
    losses = net.losses(out, y)
    losses["attn"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion)
    # the fused-CAM loss trains the fusion only (attention and coarse CAM are detached)
    assert net.head.weight.grad is None and net.class_tokens.grad is None
    net.zero_grad()
    before = [p.detach().clone() for p in fusion]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        sum(net.losses(net(torch.randn(4, 3, 64, 64)), y).values()).backward()
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, fusion))


def test_fusion_is_the_weighted_mean_of_the_maps():
    fusion = AdaptiveAttentionFusion(channels=4, reduction=2, pool="max")
    attn = torch.rand(2, 4, 5, 5)
    w = fusion.weights(attn)  # (2, 4) in (0, 1)
    assert w.shape == (2, 4) and (w > 0).all() and (w < 1).all()
    expected = (attn * w[:, :, None, None]).mean(dim=1)
    torch.testing.assert_close(fusion(attn), expected)


def test_patch_attention_refinement_spreads_a_seed_over_the_object():
    # a 2x3 grid; the CAM fires on patch 0 only; patches 0, 1, 3 (the "object") attend to 0
    cam = torch.zeros(1, 1, 2, 3)
    cam[0, 0, 0, 0] = 1.0
    attn = torch.eye(6)
    for i in (1, 3):
        attn[i] = 0.0
        attn[i, 0] = 1.0
    refined = patch_attention_refine(cam, attn[None])
    expected = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(refined[0, 0], expected)
    # identity attention changes nothing; uniform attention gives every patch the mean
    torch.testing.assert_close(patch_attention_refine(cam, torch.eye(6)[None]), cam)
    uniform = patch_attention_refine(cam, torch.full((1, 6, 6), 1 / 6))
    torch.testing.assert_close(uniform, torch.full_like(cam, 1 / 6))


def test_fused_cams_cross_attention_times_coarse_then_refined():
    c, gh, gw = 2, 2, 2
    t = c + gh * gw
    attn = torch.rand(1, 1, 1, t, t)
    fusion = AdaptiveAttentionFusion(1, reduction=1)
    coarse = torch.randn(1, c, gh, gw)
    w = fusion.weights(attn.reshape(1, 1, t, t))[0, 0]
    fused = attn[0, 0, 0] * w
    plain = fused_cams(coarse, attn, fusion, refine=False)
    expected = fused[:c, c:].reshape(c, gh, gw) * coarse[0].clamp(min=0)
    torch.testing.assert_close(plain[0], expected)
    refined = fused_cams(coarse, attn, fusion, refine=True)
    torch.testing.assert_close(refined, patch_attention_refine(plain, fused[c:, c:][None]))


def test_multi_scale_sums_scales_and_flips_then_min_max():
    seen: list[tuple[int, int]] = []

    def raw(h: int, w: int) -> torch.Tensor:
        rows = torch.arange(h, dtype=torch.float32)[:, None] * (1 + torch.arange(w)) / w
        return (rows * h)[None, None]  # (1, 1, h, w): not symmetric, larger at larger scales

    def cam_fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape[-2:]))
        return raw(x.shape[-2] // 16, x.shape[-1] // 16).expand(x.shape[0], -1, -1, -1)

    images = torch.zeros(1, 3, 64, 64)
    maps = multi_scale_cams(cam_fn, images, scales=(1.0, 1.5), flip=True, stride=16)
    assert seen == [(64, 64), (64, 64), (96, 96), (96, 96)]  # 1.5 x 64 = 96, on the grid

    def up(m: torch.Tensor) -> torch.Tensor:
        return F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False)

    total = sum(up(raw(g, g)) + up(torch.flip(raw(g, g), dims=(-1,))) for g in (4, 6))
    expected = (total - total.min()) / (total.max() - total.min())
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=1e-5)
    assert maps.min() == 0.0 and maps.max() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(maps, torch.flip(maps, dims=(-1,)))  # flips mirrored back


def test_gradient_clipping_drops_the_gradient_of_outlier_pixels():
    loss = torch.full((1, 4, 4), 0.1)
    loss[0, 0, 0] = 3.0  # one pixel far above its window's mean: a probably wrong label
    loss.requires_grad_(True)
    clipped = clip_pixel_loss(loss, start_value=1.2, window=2)
    clipped.sum().backward()
    grad = loss.grad[0]
    assert grad[0, 0] == 0.0  # the outlier: no gradient
    assert (grad.flatten()[1:] == 1.0).all()  # the others: their full gradient
    window_mean = (3.0 + 3 * 0.1) / 4
    assert clipped[0, 0, 0].item() == pytest.approx(window_mean)  # its value: the level
    # while the mean loss is above the start value nothing is clipped
    high = torch.full((1, 4, 4), 2.0)
    high[0, 0, 0] = 9.0
    high.requires_grad_(True)
    clip_pixel_loss(high, start_value=1.2, window=2).sum().backward()
    assert (high.grad == 1.0).all()


def test_gradient_clipping_level_is_at_least_the_global_mean():
    loss = torch.zeros(2, 4, 4)
    loss[:, :2, :2] = 0.01  # a quiet window
    loss[:, 2:, 2:] = 1.0  # a noisy window
    loss[0, 0, 0] = 0.2
    clipped = clip_pixel_loss(loss, start_value=10.0, window=2)
    quiet = loss.mean(dim=0)[:2, :2].mean()  # windows pool the batch-averaged loss map
    assert quiet < 0.2 < loss.mean()  # above its window's mean, below the global mean
    assert clipped[0, 0, 0].item() == pytest.approx(0.2)  # so it is kept
    assert clipped[0, 3, 3].item() == pytest.approx(1.0)  # the noisy window's level is 1
    logits = torch.zeros(1, 3, 4, 4, requires_grad=True)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[0, 0, 0] = 255  # ignored: zero loss, no gradient
    gradient_clipped_loss(logits, target, start_value=1.2, window=2).backward()
    assert logits.grad[0, :, 0, 0].abs().sum() == 0


def test_cam_labels_threshold_and_classes(tiny_imageset):
    method = create_method("weaktr[crf=false,bg_threshold=0.5]", preset="tiny")
    train = tiny_imageset.subset(slice(0, 8))
    method.cam_net = method._new_cam_net(train.num_classes, pretrained=False).eval()
    method.segmenter = method._new_segmenter(train.num_classes, pretrained=False).eval()
    ctx = Context(seed=0)
    cams = method.localize(train, ctx)
    labels = method.cam_labels(train, ctx)
    fg = cams[:, 0] > 0.5
    expected = np.where(fg, np.asarray(train.labels)[:, None, None] + 1, 0)
    np.testing.assert_array_equal(labels, expected)
    refined = method.refine(train, cams, ctx)
    assert refined.shape == cams.shape and refined.min() >= 0 and refined.max() <= 1


def test_paper_preset_is_the_original_recipe():
    cfg = create_method("weaktr", preset="paper").config
    assert cfg.vit == "deit_small_patch16_224" and cfg.pretrained is True
    assert cfg.lr == pytest.approx(4e-4 * 64 / 512) and cfg.batch_size == 64
    assert cfg.scales == (1.0, 0.8, 1.2) and cfg.bg_threshold == 0.42
    assert (cfg.clip_start, cfg.clip_window) == (1.2, 120)
    sources = create_method("weaktr", preset="quick").weight_sources()
    assert sources == {"tf_efficientnet_lite0": "offline"}


def test_cam_label_crf_is_the_original_label_crf(tiny_imageset, monkeypatch):
    from methods.common.crf import crf_labels

    method = create_method("weaktr", preset="tiny")
    train = tiny_imageset.subset(slice(0, 4))
    fg = np.zeros((4, 1, 64, 64), np.float32)
    fg[:, :, 16:48, 20:44] = 1.0
    monkeypatch.setattr(method, "_cams", lambda batch, ctx: fg[: len(batch)])
    labels = method.cam_labels(train, Context())
    for i in range(4):
        expected = crf_labels(train.images[i], fg[i, 0].astype(np.uint8), n_labels=2)
        np.testing.assert_array_equal(labels[i], expected * (train.labels[i] + 1))


# ---- the multi-label form --------------------------------------------------------------------
def _multilabel_set(n: int = 4, size: int = 32, classes: int = 3):
    from methods.base import ImageSet

    rng = np.random.default_rng(0)
    tags = np.zeros((n, classes), np.uint8)
    tags[0, [0, 2]] = 1
    tags[1, 1] = 1
    tags[2, [0, 1, 2]] = 1  # image 3 has no tag at all: all background
    images = rng.integers(0, 255, size=(n, size, size, 3), dtype=np.uint8)
    return ImageSet(
        images=images, labels=tags, num_classes=classes, names=[f"v{i}" for i in range(n)]
    )


def _fake_cams(n: int, classes: int, size: int) -> np.ndarray:
    """Each class strongest in its own band of columns; every class, tagged or not, non-zero."""
    cams = np.full((n, classes, size, size), 0.1, np.float32)
    band = size // classes
    for c in range(classes):
        cams[:, c, :, c * band : (c + 1) * band] = 0.9
    cams[:, :, : size // 4] = 0.3  # the top rows: below t = 0.42, background
    return cams


def test_multilabel_cam_labels_argmax_over_present_classes(monkeypatch):
    import methods.weaktr as wt

    method = create_method("weaktr[crf=false]", preset="tiny")
    data = _multilabel_set()
    cams = _fake_cams(4, 3, 32)
    monkeypatch.setattr(method, "_cams", lambda batch, ctx: cams[: len(batch)])
    monkeypatch.setattr(wt, "dense_crf_many", lambda *a, **k: pytest.fail("crf=false ran a CRF"))
    labels = method.cam_labels(data, Context())
    for i, tags in enumerate(data.tags()):
        present = np.flatnonzero(tags)
        scores = np.concatenate([np.full((1, 32, 32), 0.42, np.float32), cams[i, present]])
        expected = np.concatenate([[0], present + 1])[scores.argmax(axis=0)]
        np.testing.assert_array_equal(labels[i], expected)
        assert set(np.unique(labels[i])) <= {0, *(present + 1)}  # untagged never labelled
    assert (labels[:, : 32 // 4] == 0).all() and (labels[3] == 0).all()
    assert set(np.unique(labels[2])) == {0, 1, 2, 3}


def test_multilabel_crf_has_one_label_per_present_class_plus_background(monkeypatch):
    import methods.weaktr as wt
    from methods.common.crf import crf_labels

    method = create_method("weaktr", preset="tiny")
    data = _multilabel_set()
    cams = _fake_cams(4, 3, 32)
    monkeypatch.setattr(method, "_cams", lambda batch, ctx: cams[: len(batch)])
    calls = []
    real = wt.dense_crf_many

    def spy(images, probs, *args, **kwargs):
        calls.append([p.shape[0] for p in probs])
        return real(images, probs, *args, **kwargs)

    monkeypatch.setattr(wt, "dense_crf_many", spy)
    labels = method.cam_labels(data, Context())
    assert calls == [[3, 2, 4]]  # 1 + present classes; the untagged image needs no CRF
    for i, tags in enumerate(data.tags()[:3]):
        present = np.flatnonzero(tags)
        scores = np.concatenate([np.full((1, 32, 32), 0.42, np.float32), cams[i, present]])
        crf = crf_labels(data.images[i], scores.argmax(axis=0), n_labels=1 + len(present))
        np.testing.assert_array_equal(labels[i], np.concatenate([[0], present + 1])[crf])
    assert (labels[3] == 0).all()


def test_multilabel_maps_refine_and_segmenter_classes():
    method = create_method("weaktr", preset="tiny")
    data = _multilabel_set(size=64)
    torch.manual_seed(0)
    method.cam_net = method._new_cam_net(3, pretrained=False).eval()
    method.segmenter = method._new_segmenter(3, pretrained=False).eval()
    assert method.segmenter.decoder.num_classes == 4  # C + 1: background and every class
    ctx = Context(seed=0)
    cams = method.localize(data, ctx)
    refined = method.refine(data, cams, ctx)
    tags = data.tags()
    untagged = np.broadcast_to(tags[:, :, None, None] == 0, cams.shape)
    for m in (cams, refined):
        assert m.shape == (4, 3, 64, 64) and m.min() >= 0 and m.max() <= 1
        assert np.all(m[untagged] == 0)
    # softmax over background and the present classes only
    with torch.no_grad():
        logits = method.segmenter(method._images(data.images, "cpu", "tiny", 64))
    for i in range(4):
        keep = np.concatenate([[0], np.flatnonzero(tags[i]) + 1])
        probs = logits[i, keep].softmax(dim=0)[1:].numpy()
        np.testing.assert_allclose(refined[i, keep[1:] - 1], probs, atol=1e-5)
    assert refined[3].max() == 0  # no tag: everything background
    assert (refined.sum(axis=1) <= 1 + 1e-5).all()


def test_multilabel_phase1_trains_on_multi_hot_tags(monkeypatch):
    from methods.common.attention_fusion import ClassTokenViT

    seen = []
    real = ClassTokenViT.losses

    def spy(self, out, targets):
        seen.append(targets.clone())
        return real(self, out, targets)

    monkeypatch.setattr(ClassTokenViT, "losses", spy)
    method = create_method("weaktr[crf=false]", preset="tiny")
    data = _multilabel_set(n=8, size=64)
    data.labels[3, 0] = 1
    method._train_cam_net(data, Context(seed=0, max_epochs=1))
    targets = torch.cat(seen).numpy()
    assert targets.dtype == np.float32 and targets.shape == (8, 3)
    assert sorted(map(tuple, targets)) == sorted(map(tuple, data.tags()))


def test_label_matrices_are_checked():
    data = _multilabel_set()
    data.labels = data.labels[:, :2]
    method = create_method("weaktr", preset="tiny")
    with pytest.raises(ValueError, match="tags must be"):
        method.fit(data, Context())
