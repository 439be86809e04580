"""Shared building blocks: data helpers, backbones (offline errors), CAM normalisation, CRF."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.common.backbones import PretrainedWeightsError, create_resnet, create_vit
from methods.common.cam import normalize_cams
from methods.common.crf import crf_labels, dense_crf
from methods.common.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    apply_hflip,
    autocast,
    flip_flags,
    hflip_random,
    minibatches,
    place,
    seeded,
    to_tensor,
)

# ---- data ----------------------------------------------------------------------------------


def test_to_tensor_normalises_channels_first():
    images = np.zeros((2, 4, 5, 3), np.uint8)
    images[..., 0] = 255
    x = to_tensor(images)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert x[0, 0, 0, 0].item() == pytest.approx((1.0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0])
    assert x[0, 2, 0, 0].item() == pytest.approx((0.0 - IMAGENET_MEAN[2]) / IMAGENET_STD[2])


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 4, 4, 3), np.float32),
        np.zeros((4, 4, 3), np.uint8),
        np.zeros((1, 4, 4, 1), np.uint8),
    ],
)
def test_to_tensor_rejects_bad_input(bad):
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(bad)


def test_minibatches_cover_everything_once_and_are_seeded():
    a = list(minibatches(10, 4, torch.Generator().manual_seed(1)))
    b = list(minibatches(10, 4, torch.Generator().manual_seed(1)))
    c = list(minibatches(10, 4, torch.Generator().manual_seed(2)))
    assert [len(i) for i in a] == [4, 4, 2]
    assert sorted(np.concatenate(a).tolist()) == list(range(10))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert [len(i) for i in minibatches(10, 4, None, drop_last=True)] == [4, 4]
    assert np.concatenate(list(minibatches(5, 2, shuffle=False))).tolist() == [0, 1, 2, 3, 4]


def test_hflip_flips_exactly_the_flagged_items_of_images_and_masks_alike():
    x = torch.arange(4 * 2 * 3, dtype=torch.float32).view(4, 1, 2, 3)
    m = x[:, 0].long()
    flags = torch.tensor([True, False, True, False])
    fx, fm = apply_hflip(x, flags), apply_hflip(m, flags)
    assert torch.equal(fx[0], torch.flip(x[0], dims=(-1,)))
    assert torch.equal(fx[1], x[1])
    assert torch.equal(fm, fx[:, 0].long())  # the mask followed its image
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(hflip_random(x, g1), apply_hflip(x, flip_flags(4, g2)))
    many = flip_flags(2000, torch.Generator().manual_seed(0)).float().mean().item()
    assert 0.45 < many < 0.55


def test_seeded_is_reproducible_and_restores_global_state():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    with seeded(7):
        a = torch.rand(3)
    after = torch.rand(1)
    with seeded(7):
        b = torch.rand(3)
    assert torch.equal(a, b)
    assert torch.equal(before, after)  # the global stream continued as if untouched


def test_autocast_is_a_no_op_on_cpu():
    with autocast("cpu", amp=True):
        y = torch.ones(2, 2) @ torch.ones(2, 2)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("channels_last", [True, False])
def test_place_memory_format_same_outputs_and_portable_state(channels_last):
    from types import SimpleNamespace

    with seeded(0):
        ref = create_resnet("resnet18", pretrained=False, output_stride=16).eval()
    with seeded(0):
        net = create_resnet("resnet18", pretrained=False, output_stride=16).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    placed = place(net, SimpleNamespace(device=torch.device("cpu"), channels_last=channels_last))
    conv = placed.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert conv.is_contiguous() != channels_last  # a 7x7x3 kernel is one or the other
    with torch.no_grad():
        got, want = placed(x)[-1], ref(x)[-1]
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    back = create_resnet("resnet18", pretrained=False, output_stride=16).eval()
    back.load_state_dict(placed.state_dict())  # a channels_last state loads into NCHW weights
    with torch.no_grad():
        torch.testing.assert_close(back(x)[-1], want, atol=1e-5, rtol=1e-4)


# ---- CAM normalisation --------------------------------------------------------------------


def test_normalize_cams_relu_and_max():
    cams = torch.tensor([[[[-1.0, 2.0], [4.0, 0.0]]], [[[-3.0, -1.0], [-2.0, -0.5]]]])
    out = normalize_cams(cams)
    assert out[0, 0, 1, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert out[0, 0, 0, 1].item() == pytest.approx(0.5, abs=1e-5)
    assert out[0, 0, 0, 0].item() == 0.0
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # all negative -> zero, no NaN
    with pytest.raises(ValueError):
        normalize_cams(torch.zeros(2, 2))


# ---- backbones ------------------------------------------------------------------------------


def test_create_resnet_output_stride_16():
    net = create_resnet("resnet18", pretrained=False, output_stride=16)
    feats = net(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == net.channels == [64, 128, 256, 512]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 4]


def test_pretrained_file_missing_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(PretrainedWeightsError) as info:
        create_resnet("resnet18", pretrained=str(missing))
    assert str(missing) in str(info.value)
    assert "pretrained=False" in str(info.value)


def test_pretrained_file_is_loaded(tmp_path):
    import timm

    with seeded(3):
        source = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    net = create_resnet("resnet10t", pretrained=str(path))
    assert torch.equal(net.layer4[0].conv1.weight, source.layer4[0].conv1.weight)
    fresh = create_resnet("resnet10t", pretrained=False)
    assert not torch.equal(fresh.layer4[0].conv1.weight, source.layer4[0].conv1.weight)


def test_pretrained_offline_is_a_clear_error(monkeypatch):
    from timm.models import _builder

    attempts = []

    def offline(*args, **kwargs):
        attempts.append(args)
        raise OSError("network unreachable (simulated)")

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(_builder, fn, offline)
    with pytest.raises(PretrainedWeightsError) as info:
        create_resnet("resnet18", pretrained=True)
    message = str(info.value)
    assert attempts, "the simulated download was never reached"
    assert "resnet18" in message and "pretrained=False" in message and "internet" in message
    with pytest.raises(PretrainedWeightsError):
        create_vit("deit_tiny_patch16_224", pretrained=True, num_classes=3, img_size=64)


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="unknown timm model"):
        create_resnet("resnet_does_not_exist")


# ---- CRF ------------------------------------------------------------------------------------


def _two_tone(h: int = 40, w: int = 40) -> tuple[np.ndarray, np.ndarray]:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (30, 40, 50)
    img[:, w // 2 :] = (220, 180, 60)
    lab = np.zeros((h, w), np.uint8)
    lab[:, w // 2 :] = 1
    return img, lab


def test_crf_rejects_normalised_float_input():
    img, lab = _two_tone()
    normalised = to_tensor(img[None])[0].permute(1, 2, 0).numpy()  # (H, W, 3) float
    probs = np.stack([1 - lab, lab]).astype(np.float32)
    with pytest.raises(TypeError, match="uint8"):
        dense_crf(normalised, probs)
    with pytest.raises(TypeError, match="uint8"):
        crf_labels(torch.from_numpy(img), lab)
    with pytest.raises(ValueError, match="RGB"):
        crf_labels(img[..., 0], lab)


def test_crf_keeps_a_clean_map_clean():
    img, lab = _two_tone()
    assert np.array_equal(crf_labels(img, lab), lab)
    p = (lab * 0.9 + 0.05).astype(np.float32)
    q = dense_crf(img, np.stack([1 - p, p]))
    assert q.shape == (2, 40, 40) and q.dtype == np.float32
    assert np.allclose(q.sum(0), 1.0, atol=1e-4)
    assert np.array_equal(q.argmax(0), lab)


def test_crf_reads_read_only_memory_mapped_images(tmp_path):
    # the runner's image cache is a read-only memory map; pydensecrf needs a writable buffer
    # (cam_affinitynet's paper preset crashed on it: "buffer source array is read-only")
    img, lab = _two_tone()
    np.save(tmp_path / "img.npy", img)
    ro = np.load(tmp_path / "img.npy", mmap_mode="r")
    assert not ro.flags.writeable
    assert np.array_equal(crf_labels(ro, lab), crf_labels(img, lab))
    p = (lab * 0.9 + 0.05).astype(np.float32)
    np.testing.assert_array_equal(
        dense_crf(ro, np.stack([1 - p, p])), dense_crf(img, np.stack([1 - p, p]))
    )


def test_crf_cleans_noise_and_fills_ignored_pixels():
    img, lab = _two_tone()
    noisy = lab.copy()
    idx = np.random.default_rng(0).choice(lab.size, 80, replace=False)
    noisy.flat[idx] ^= 1
    assert (noisy != lab).sum() == 80
    assert (crf_labels(img, noisy) != lab).sum() < 8
    holes = lab.copy()
    holes[:, 15:25] = 255
    assert np.array_equal(crf_labels(img, holes), lab)
    with pytest.raises(ValueError, match="labels must be"):
        crf_labels(img, lab * 3)


def test_stage_epochs_raises_epochs_only_below_min_steps():
    from methods.common.data import stage_epochs

    # the quick presets' min_steps equal their epochs on the 304 synthetic train images
    assert stage_epochs(4, 304, 32, min_steps=36, drop_last=True) == 4
    assert stage_epochs(6, 304, 16, min_steps=114, drop_last=True) == 6
    assert stage_epochs(6, 304, 32, min_steps=60) == 6  # no drop_last: 10 steps an epoch
    # a 51-image set gets at least as many steps
    assert stage_epochs(4, 51, 32, min_steps=36, drop_last=True) == 36  # 1 step an epoch
    assert stage_epochs(6, 51, 16, min_steps=114, drop_last=True) == 38  # 3 steps an epoch
    assert stage_epochs(6, 51, 32, min_steps=60) == 30  # 2 steps an epoch
    assert stage_epochs(3, 10, 32, min_steps=0) == 3
    assert stage_epochs(3, 10, 32, min_steps=5, drop_last=True) == 5  # n <= batch: 1 step
