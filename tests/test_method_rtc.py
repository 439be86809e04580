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
