"""CAM: the formula by hand, hooks that never leak, test-time augmentation that flips back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from methods.base import Context, ImageSet
from methods.cam import CAM, CAMNet
from methods.common.cam import FeatureHook, cam_from_features, normalize_cams, tta_maps
from methods.common.data import seeded


def _tiny_net(num_classes: int = 3) -> CAMNet:
    with seeded(0):
        net = CAMNet("resnet18", num_classes, pretrained=False, output_stride=16)
        nn.init.normal_(net.fc.weight)  # well-spread weights: some CAM values > 0, some < 0
    return net.eval()


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_cam_from_features_matches_loops():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 2, 2, generator=g)  # (N, K, h, w)
    weight = torch.randn(4, 3, generator=g)  # (C, K)
    labels = torch.tensor([3, 1])
    cams = cam_from_features(feats, weight, labels)
    assert cams.shape == (2, 1, 2, 2)
    for n in range(2):
        for i in range(2):
            for j in range(2):
                expected = sum(
                    weight[labels[n], k].item() * feats[n, k, i, j].item() for k in range(3)
                )
                assert cams[n, 0, i, j].item() == pytest.approx(expected, abs=1e-6)


def test_localize_equals_hand_computation_on_2x2_map():
    """32 px input at output stride 16 gives a 2x2 feature map; compare localize to loops."""
    net = _tiny_net()
    method = CAM(CAM.make_config("tiny"), preset="tiny")
    method.model = net
    images = _images(2, 32)
    labels = np.array([2, 0])
    batch = ImageSet(images=images, labels=labels, num_classes=3, names=["a", "b"])
    maps = method.localize(batch, Context())
    assert maps.shape == (2, 1, 32, 32) and maps.dtype == np.float32

    from methods.common.data import to_tensor

    with torch.no_grad():
        x = to_tensor(images)
        feats = net.backbone(x)[-1]  # (2, 512, 2, 2)
        logits, _ = net(x)
    assert feats.shape[-2:] == (2, 2)
    w = net.fc.weight.detach()
    signs: set[float] = set()
    for n in range(2):
        hand = torch.zeros(2, 2)
        for i in range(2):
            for j in range(2):
                hand[i, j] = sum(w[labels[n], k] * feats[n, k, i, j] for k in range(feats.shape[1]))
        # GAP then linear == the spatial mean of the CAM (the identity CAM rests on)
        assert hand.mean().item() == pytest.approx(logits[n, labels[n]].item(), rel=1e-4, abs=1e-5)
        signs.update(torch.sign(hand).flatten().tolist())
        norm = hand.clamp(min=0) / (hand.clamp(min=0).max() + 1e-5)
        up = F.interpolate(norm[None, None], size=(32, 32), mode="bilinear", align_corners=False)
        np.testing.assert_allclose(maps[n, 0], up[0, 0].numpy(), atol=1e-4)
    assert signs >= {-1.0, 1.0}, "the data should exercise the ReLU (values of both signs)"


def test_feature_hook_captures_and_is_removed():
    layer = nn.Linear(2, 2)
    with FeatureHook(layer) as hook:
        out = layer(torch.ones(1, 2))
        assert len(layer._forward_hooks) == 1
    assert torch.equal(hook.output, out)
    assert len(layer._forward_hooks) == 0


def test_feature_hook_removed_when_forward_raises():
    class Boom(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    module = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureHook(module):
            assert len(module._forward_hooks) == 1
            module(torch.ones(1))
    assert len(module._forward_hooks) == 0


def test_tta_flips_maps_back():
    # a left-right asymmetric input: a ramp rising to the right in channel 0
    ramp = torch.linspace(-0.5, 1.0, 16).expand(1, 1, 8, 16)
    images = torch.cat([ramp, torch.zeros(1, 2, 8, 16)], dim=1)  # (1, 3, 8, 16)
    calls = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape)
        return x[:, :1]

    out = tta_maps(fn, images, scales=(1.0,), flip=True)
    assert len(calls) == 2  # original + flipped
    np.testing.assert_allclose(out.numpy(), normalize_cams(ramp).numpy(), atol=1e-4)
    assert out[0, 0, :, -1].min() > 0.99 and out[0, 0, :, 0].max() == 0.0  # right is hot

    # had the flipped pass not been flipped back, the sum would be a symmetric map
    wrong = normalize_cams(F.relu(ramp) + torch.flip(F.relu(ramp), dims=(-1,)))
    assert not torch.allclose(out, wrong, atol=1e-3)


def test_tta_multiscale_returns_input_size():
    images = torch.rand(2, 3, 12, 20)
    sizes = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        sizes.append(tuple(x.shape[-2:]))
        return F.avg_pool2d(x[:, :2], 2)  # a coarser map with 2 channels

    out = tta_maps(fn, images, scales=(0.5, 1.0, 2.0), flip=True)
    assert out.shape == (2, 2, 12, 20)
    assert sizes == [(6, 10), (6, 10), (12, 20), (12, 20), (24, 40), (24, 40)]
    peak = out.flatten(2).amax(2)
    assert torch.allclose(peak, torch.ones_like(peak), atol=1e-4)


def test_localize_with_tta_differs_and_stays_in_range():
    net = _tiny_net()
    images = _images(2, 32, seed=1)
    batch = ImageSet(images=images, labels=np.array([0, 1]), num_classes=3, names=["a", "b"])
    plain = CAM(CAM.make_config("tiny"), preset="tiny")
    plain.model = net
    tta = CAM(CAM.make_config("tiny", tta=True, tta_scales=(1.0, 2.0)), preset="tiny")
    tta.model = net
    a, b = plain.localize(batch, Context()), tta.localize(batch, Context())
    assert b.shape == a.shape == (2, 1, 32, 32)
    assert 0.0 <= b.min() and b.max() <= 1.0
    assert not np.allclose(a, b, atol=1e-3)


def test_fit_uses_the_stage_result_without_training():
    """A cached classifier stage is loaded as is: no training step, identical maps."""
    net = _tiny_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}

    class Cached(Context):
        def should_continue(self) -> bool:
            raise AssertionError("training ran although the stage was cached")

        def stage(self, name, compute):  # noqa: ANN001, ANN201
            assert name == "classifier"
            return state

    images = _images(4, 32, seed=2)
    train = ImageSet(
        images=images, labels=np.array([0, 1, 2, 0]), num_classes=3, names=list("abcd")
    )
    method = CAM(CAM.make_config("tiny"), preset="tiny")
    method.fit(train, Cached())
    ref = CAM(CAM.make_config("tiny"), preset="tiny")
    ref.model = net
    np.testing.assert_array_equal(method.localize(train, Context()), ref.localize(train, Context()))


def test_localize_before_fit_is_a_clear_error():
    batch = ImageSet(images=_images(1, 32), labels=np.array([0]), num_classes=3, names=["a"])
    with pytest.raises(RuntimeError, match="before fit"):
        CAM(CAM.make_config("tiny"), preset="tiny").localize(batch, Context())


def test_training_learns_a_separable_task():
    """Two classes told apart by colour: the trained classifier's CAM is not the random one."""
    rng = np.random.default_rng(0)
    n, size = 16, 32
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, (n, size, size, 3), dtype=np.uint8)
    images[labels == 0, 8:24, 8:24, 0] = 250  # class 0: a red square
    images[labels == 1, 8:24, 8:24, 2] = 250  # class 1: a blue square
    train = ImageSet(images=images, labels=labels, num_classes=2, names=[str(i) for i in range(n)])
    method = CAM(CAM.make_config("tiny", epochs=5, batch_size=8), preset="tiny")
    method.fit(train, Context(seed=0))
    from methods.common.data import to_tensor

    with torch.no_grad():
        logits, _ = method.model(to_tensor(images))
    accuracy = (logits.argmax(1).numpy() == labels).mean()
    assert accuracy >= 0.9
