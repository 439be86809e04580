"""RTC: the two views agree, prototypes contrast, the compensator acts, the seg head learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.base import Context, ImageSet
from methods.common.pamr import pamr
from methods.common.prototypes import (
    affinity_refine,
    class_prototypes,
    compensate,
    minmax_norm,
    prototype_contrast,
)
from methods.common.single_stage import (
    balanced_seg_loss,
    from_view,
    seg_pseudo_labels,
    to_view,
    view2_size,
)
from methods.rtc import RTC


def _ramp(h: int = 16, w: int = 24) -> torch.Tensor:
    """A left-right asymmetric smooth map (N=1, C=1)."""
    x = torch.linspace(0.0, 1.0, w).expand(1, 1, h, w)
    y = torch.linspace(0.0, 0.5, h).view(1, 1, h, 1)
    return (x + y).clone()


@pytest.mark.parametrize("flip", [False, True])
def test_views_map_back_to_the_original_geometry(flip):
    m = _ramp()
    size2 = view2_size((16, 24), 0.5)
    assert size2 == (8, 12)
    view = to_view(m, size2, flip)
    assert view.shape[-2:] == size2
    if flip:  # the flipped view is hot on the left, the original on the right
        assert view[0, 0, :, 0].mean() > view[0, 0, :, -1].mean()
    back = from_view(view, (16, 24), flip)
    assert m[0, 0, :, -1].mean() > m[0, 0, :, 0].mean()
    torch.testing.assert_close(back, m, atol=0.03, rtol=0)  # a smooth map survives the trip
    # an equivariant "network" (here the identity) on the transformed view agrees with the
    # transformed map of the original: what the siamese losses compare
    torch.testing.assert_close(to_view(m, size2, flip), view)


def test_prototype_contrast_lower_when_pixels_match_their_prototype():
    protos = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), dim=-1)
    labels = torch.tensor([[[0, 1], [1, 0]]])  # (1, 2, 2)
    matching = protos[labels].permute(0, 3, 1, 2)  # (1, 3, 2, 2): each pixel = its prototype
    wrong = protos[1 - labels].permute(0, 3, 1, 2)
    good = prototype_contrast(matching, protos, labels, temperature=0.1)
    bad = prototype_contrast(wrong, protos, labels, temperature=0.1)
    assert good < 0.01 < 10.0 < bad


def test_class_prototypes_pool_the_other_views_features_at_the_top_positions():
    scores = torch.zeros(1, 2, 2, 2)
    scores[0, 1, 0, 0], scores[0, 1, 1, 1] = 1.0, 0.5  # fg tops at (0,0) and (1,1)
    scores[0, 0] = 1.0 - scores[0, 1]
    feats = torch.zeros(1, 2, 2, 2)
    feats[0, 0, 0, 0] = 1.0  # (0,0) -> e0
    feats[0, 1, 1, 1] = 1.0  # (1,1) -> e1
    protos = class_prototypes(scores, feats, k=2)
    expected = F.normalize(torch.tensor([1.0, 0.5]), dim=0)  # score-weighted mean, normalised
    torch.testing.assert_close(protos.vectors[1], expected)
    assert set(protos.index[1].tolist()) == {0, 3}


def test_compensator_changes_the_cam_towards_similar_pixels():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 4, 4, generator=g)
    fg = torch.rand(2, 1, 4, 4, generator=g)
    scores = torch.cat([1 - fg, fg], dim=1)
    protos = class_prototypes(scores, feats, k=4)
    out = compensate(scores, feats, protos, channels=[1])
    torch.testing.assert_close(out[:, 0], scores[:, 0])  # background copied
    added = out[:, 1] - scores[:, 1]
    assert (added > 0).all() and not torch.allclose(out, scores)
    # pixels whose feature is one of the top features gain more than the average pixel
    top = protos.index[1]
    assert added.flatten()[top].mean() > added.mean()


def test_affinity_refine_with_identical_features_averages_the_map():
    maps = torch.rand(1, 2, 3, 3)
    feats = torch.ones(1, 4, 3, 3)
    out = affinity_refine(maps, feats)
    expected = maps.flatten(2).mean(-1)[:, :, None, None].expand_as(maps)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_pamr_keeps_probabilities_and_follows_edges():
    image = torch.zeros(1, 3, 16, 16)
    image[..., 8:] = 1.0  # a vertical edge
    fg = torch.zeros(1, 1, 16, 16)
    fg[..., 6:] = 1.0  # a mask that leaks 2 px past the edge into the left half
    probs = torch.cat([1 - fg, fg], dim=1)
    out = pamr(image, probs, num_iter=10, dilations=(1, 2))
    torch.testing.assert_close(out.sum(1), torch.ones(1, 16, 16))
    assert out[0, 1, :, 12:].min() > 0.99  # the right side stays foreground
    assert out[0, 1, :, 6:8].mean() < 0.9  # the leak is pulled back toward the left side


def test_seg_pseudo_labels_and_loss_ignore_the_unsure_band():
    images = torch.full((1, 3, 32, 32), 0.5)
    fg = torch.linspace(0, 1, 32).expand(1, 1, 32, 32).clone()  # certain bg left, fg right
    labels = seg_pseudo_labels(images, fg, bg_high=0.55, bg_low=0.2, iters=1, dilations=(1,))
    assert labels[0, :, 0].eq(0).all() and labels[0, :, -1].eq(1).all()
    assert labels.eq(255).any()  # an unsure band in between
    cols = labels[0, 0]
    assert cols[cols == 255].numel() > 0
    logits = torch.randn(1, 2, 32, 32)
    loss = balanced_seg_loss(logits, labels)
    changed = logits.clone()
    changed[:, :, labels[0] == 255] += 5.0  # ignored pixels do not count
    assert balanced_seg_loss(changed, labels) == pytest.approx(loss.item())
    only_fg = torch.ones_like(labels)  # an image without background weighs 0
    assert balanced_seg_loss(logits, only_fg).item() == 0.0


def _tiny(seed: int = 0) -> tuple[RTC, ImageSet]:
    rng = np.random.default_rng(seed)
    n, size = 8, 32
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, (n, size, size, 3), dtype=np.uint8)
    images[labels == 0, 8:24, 8:24, 0] = 250
    images[labels == 1, 8:24, 8:24, 2] = 250
    train = ImageSet(images=images, labels=labels, num_classes=2, names=[str(i) for i in range(n)])
    method = RTC(RTC.make_config("tiny", dropout=0.0, seg_start_epoch=1), preset="tiny")
    return method, train


def _batch(method: RTC, train: ImageSet) -> tuple:
    from methods.common.data import to_tensor

    model = method._build(train.num_classes, Context(), pretrained=False).train()
    x = to_tensor(train.images, "cpu", model.input_norm)
    return model, x, torch.as_tensor(train.labels)


def test_seg_head_trains_on_the_refined_cam(monkeypatch):
    import methods.rtc as rtc_mod

    method, train = _tiny()
    model, x, y = _batch(method, train)
    seen = {}
    original = rtc_mod.seg_pseudo_labels

    def spy(images, fg, *args):  # noqa: ANN001, ANN202
        seen["fg"], seen["images"] = fg, images
        seen["labels"] = original(images, fg, *args)
        return seen["labels"]

    monkeypatch.setattr(rtc_mod, "seg_pseudo_labels", spy)
    early = method.step_losses(model, x, y, epoch=0, ctx=Context())
    assert "seg" not in early and not seen  # before seg_start_epoch: no seg loss
    losses = method.step_losses(model, x, y, epoch=1, ctx=Context())
    assert "seg" in losses and losses["seg"].requires_grad
    with torch.no_grad():
        out = model(x, y)
    refined = F.interpolate(
        minmax_norm(out["cam_rv"])[:, 1:], size=(32, 32), mode="bilinear", align_corners=True
    )
    torch.testing.assert_close(seen["fg"], refined, atol=1e-5, rtol=0)
    assert 0.0 <= seen["images"].min() and seen["images"].max() <= 1.0  # de-normalised RGB
    assert set(torch.unique(seen["labels"]).tolist()) <= {0, 1, 255}


def test_loss_decreases_over_a_few_steps():
    _, train = _tiny()
    method = RTC(RTC.make_config("tiny", dropout=0.0, seg_start_epoch=1, lr=3e-4), preset="tiny")
    model, x, y = _batch(method, train)
    torch.manual_seed(0)
    opt = method._optimizer(model)
    totals = []
    for _ in range(8):
        loss = method.step_losses(model, x, y, epoch=1, ctx=Context())["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert np.isfinite(totals).all()
    assert np.mean(totals[-2:]) < totals[0]


def test_localize_before_fit_is_a_clear_error():
    method, train = _tiny()
    with pytest.raises(RuntimeError, match="before fit"):
        method.localize(train, Context())


def test_paper_preset_names_wide_resnet38():
    method = RTC(preset="paper")
    assert method.weight_sources() == {"wide_resnet38": True}
    with pytest.raises(ValueError, match="WideResNet-38"):
        method._build(2, Context(), pretrained=False)


# ---- the multi-label (PASCAL VOC) form ---------------------------------------------------------
def _tiny_voc(seed: int = 0) -> tuple[RTC, ImageSet]:
    """8 images, 4 classes, one or two tags each (class c: a bright square in colour c)."""
    rng = np.random.default_rng(seed)
    n, c, size = 8, 4, 32
    tags = np.zeros((n, c), dtype=np.uint8)
    images = rng.integers(0, 60, (n, size, size, 3), dtype=np.uint8)
    colours = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]
    for i in range(n):
        for j, k in enumerate(rng.choice(c, size=1 + i % 2, replace=False)):
            tags[i, k] = 1
            images[i, 4 + 12 * j : 16 + 12 * j, 4 : 16 + 8 * j] = colours[k]
    train = ImageSet(images=images, labels=tags, num_classes=c, names=[str(i) for i in range(n)])
    method = RTC(RTC.make_config("tiny", dropout=0.0, seg_start_epoch=1), preset="tiny")
    return method, train


def _voc_batch(method: RTC, train: ImageSet) -> tuple:
    from methods.common.data import to_tensor

    model = method._build(train.num_classes, Context(), False, multilabel=True).train()
    x = to_tensor(train.images, "cpu", model.input_norm)
    return model, x, torch.from_numpy(train.tags())


def test_multilabel_head_has_one_output_per_class_plus_background():
    method, train = _tiny_voc()
    model, x, tags = _voc_batch(method, train)
    c = train.num_classes
    assert model.seg_cls.out_channels == c + 1 and model.classifier.out_channels == c
    with torch.no_grad():
        out = model(x, tags, with_seg=True)
    assert out["logits"].shape == (8, c) and out["seg"].shape[1] == c + 1
    assert out["cam"].shape[1] == c and out["cam_rv"].shape[1] == c + 1  # [bg, classes]
    untagged = (tags == 0)[:, :, None, None].expand_as(out["cam"])
    assert out["cam"][untagged].eq(0).all()  # untagged classes: no CAM, no seed,
    assert out["cam_rv"][:, 1:][untagged].eq(0).all()  # and nothing refined
    # the background seed is 1 - the strongest tagged class, so the refined maps still sum
    # to (about) one per pixel: PCM averages seeds that do
    torch.testing.assert_close(out["cam_rv"].sum(1), torch.ones(8, 4, 4), atol=1e-3, rtol=0)
    binary = method._build(c, Context(), False).eval()
    assert binary.seg_cls.out_channels == 2  # single-label data: [bg, the label class]


def test_multilabel_losses_use_the_soft_margin_and_the_tags(monkeypatch):
    import methods.rtc as rtc_mod

    _, train = _tiny_voc()
    method = RTC(RTC.make_config("tiny", dropout=0.0, seg_start_epoch=1, lr=3e-4), preset="tiny")
    model, x, tags = _voc_batch(method, train)
    seen = []
    original = rtc_mod.multilabel_loss

    def spy(logits, y):  # noqa: ANN001, ANN202
        seen.append(y)
        return original(logits, y)

    monkeypatch.setattr(rtc_mod, "multilabel_loss", spy)
    torch.manual_seed(0)
    opt = method._optimizer(model)
    totals, cls = [], []
    for _ in range(6):
        losses = method.step_losses(model, x, tags, epoch=1, ctx=Context())
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        totals.append(losses["total"].item())
        cls.append(losses["cls"].item())
    assert len(seen) == 12 and all(torch.equal(y, tags) for y in seen)  # both views
    assert set(losses) >= {"cls", "er", "ecr", "nce", "struct", "seg"}
    assert np.isfinite(totals).all() and np.mean(totals[-2:]) < totals[0]
    assert cls[-1] < cls[0]


def test_multilabel_pseudo_labels_never_hold_an_untagged_class():
    images = torch.full((2, 3, 16, 16), 0.5)
    fg = torch.zeros(2, 3, 16, 16)
    fg[:, 0, :, :8] = 1.0  # class 0 on the left half
    fg[:, 2] = 1.0  # class 2 everywhere, but image 0 is not tagged with it
    tags = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    labels = seg_pseudo_labels(images, fg, 0.55, 0.2, 1, (1,), tags)
    assert set(labels[0].unique().tolist()) <= {0, 1, 255}  # 1 + class 0, never 3
    assert labels[0, :, :6].eq(1).all() and labels[0, :, 10:].eq(0).all()
    assert 3 in labels[1].unique().tolist()  # tagged there: class 2 wins


def test_every_tag_rule_of_the_seg_loss():
    logits = torch.randn(2, 4, 8, 8)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[:, :, :3] = 1  # class 0 (label 1) in both images
    labels[0, :, 5:] = 3  # class 2 (label 3) in image 0 only
    tags = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])  # both tagged with 0 and 2
    both = balanced_seg_loss(logits, labels, tags)
    first = balanced_seg_loss(logits[:1], labels[:1], tags[:1])
    assert first > 0 and both == pytest.approx(first.item() / 2)  # image 1 lacks class 2
    assert balanced_seg_loss(logits[1:], labels[1:], tags[1:]).item() == 0.0
    no_bg = torch.where(labels == 0, torch.full_like(labels, 255), labels)  # bg counts too
    assert balanced_seg_loss(logits[:1], no_bg[:1], tags[:1]).item() == 0.0


def test_multilabel_maps_are_zero_for_untagged_classes():
    method, train = _tiny_voc()
    model, _, tags = _voc_batch(method, train)
    method.model = model.eval()  # an untrained network: every class has some CAM
    ctx = Context()
    maps = method.localize(train, ctx)
    refined = method.refine(train, maps, ctx)
    untagged = np.broadcast_to(train.tags()[:, :, None, None] == 0, maps.shape)
    for m in (maps, refined):
        assert m.shape == (8, 4, 32, 32) and m.dtype == np.float32
        assert np.all((m >= 0) & (m <= 1)) and np.all(m[untagged] == 0)
        assert m[~untagged].max() > 0
    # the seg head's probabilities of background and the tagged classes sum to one
    np.testing.assert_allclose(refined.sum(1) <= 1 + 1e-5, True)
