"""Perf entry ``stages``: images/s of every training stage and of map extraction, per method.

For each registered method of kind ``method`` (:func:`stage_methods`: the references aside,
every method, so a new one is timed without touching this module) and the shared segmenter, it
fits on the same synthetic images with every training stage capped at one epoch (the runner's
``max_epochs``), then extracts the maps, twice: with the fast settings the runner uses (bf16
autocast on CUDA when ``--amp``; conv nets in channels_last) and with plain fp32 NCHW. Every
stage is timed where the method asks the context for it (:meth:`methods.base.Context.stage`),
so the numbers are the methods' own code paths, not a re-implementation. The entry's ratio is
plain / fast over all stages; the per-stage throughputs are its check rows.

Device, preset, images per stage and autocast come from the run's
:class:`~benchmark.perf.harness.PerfOptions` (``perf --device/--preset/--stage-images/--no-amp``).
On this machine the entry runs on the CPU at the ``quick`` preset (autocast is a no-op on the
CPU, so the ratio there is what channels_last alone buys). On a GPU machine:
``python -m benchmark perf --only stages --device cuda --preset paper --stage-images 512``;
the ``paper`` preset is run with ``pretrained=false`` where a method has that field (timing
does not depend on the weights, and the GPU machines cannot download them).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.perf.harness import PerfOptions, register_entry

logger = logging.getLogger(__name__)


def stage_methods() -> list[str]:
    """The methods timed, in table order (sorted names): every registered kind ``method``."""
    import methods  # noqa: F401  (registers every method)
    from methods.base import list_methods

    return list_methods(kind="method")


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timing_context(device: Any, amp: bool, channels_last: bool, workdir: Path) -> Any:
    """A method Context that times each stage and records the epochs it ran.

    Args:
        device: the torch device.
        amp: bf16 autocast on CUDA.
        channels_last: conv nets in channels_last.
        workdir: the method's scratch folder.

    Returns:
        A :class:`methods.base.Context` whose ``records`` list gets one
        ``{"stage", "seconds", "epochs"}`` dict per stage, every stage capped at one epoch.
    """
    import torch

    from methods.base import Context

    @dataclass
    class TimingContext(Context):
        records: list[dict[str, Any]] = field(default_factory=list)
        _epochs: list[int] = field(default_factory=list)

        def epochs(self, wanted: int) -> int:
            n = super().epochs(wanted)
            self._epochs.append(n)
            return n

        def stage(
            self, name: str, compute: Callable[[], dict[str, torch.Tensor]]
        ) -> dict[str, torch.Tensor]:
            self._epochs = []
            _sync(self.device)
            t0 = time.perf_counter()
            out = compute()
            _sync(self.device)
            seconds = time.perf_counter() - t0
            self.records.append(
                {"stage": name, "seconds": seconds, "epochs": sum(self._epochs) or 1}
            )
            return out

    return TimingContext(
        device=torch.device(device),
        seed=0,
        workdir=workdir,
        max_epochs=1,
        amp=amp,
        channels_last=channels_last,
    )


def _time_method(
    name: str, preset: str, train: Any, masks: np.ndarray, ctx: Any
) -> list[dict[str, Any]]:
    """Fit ``name`` (one epoch per stage) and extract its maps; one record per stage."""
    from methods.base import create_method, get_method
    from methods.common.segmenter import (
        SEGMENTER_PRESETS,
        SegmenterConfig,
        build_segmenter,
        predict_segmenter,
        train_segmenter,
    )

    n = len(train)
    if name == "segmenter":
        config = SegmenterConfig(**{**SEGMENTER_PRESETS[preset], "pretrained_backbone": False})
        ctx.stage("train", lambda: train_segmenter(np.asarray(train.images), masks, config, ctx))
        model = build_segmenter(config)
        t0 = time.perf_counter()
        predict_segmenter(model, np.asarray(train.images), ctx)
        _sync(ctx.device)
        seconds = time.perf_counter() - t0
    else:
        offline = preset == "paper" and any(
            f.name == "pretrained" for f in fields(get_method(name).Config)
        )
        spec = f"{name}[pretrained=false]" if offline else name
        method = create_method(spec, preset=preset)
        if method.supervision == "box":  # timing only: one centred box per image
            side = train.images.shape[1]
            box = np.array([side / 4, side / 4, 3 * side / 4, 3 * side / 4], np.float32)
            train = dataclasses.replace(train, boxes=np.tile(box, (n, 1)))
        method.fit(train, ctx)
        _sync(ctx.device)
        t0 = time.perf_counter()
        maps = method.localize(train, ctx)
        method.refine(train, maps, ctx)
        _sync(ctx.device)
        seconds = time.perf_counter() - t0
    records = [
        {**r, "ips": n * r["epochs"] / r["seconds"], "what": f"{name}/{r['stage']} (train)"}
        for r in ctx.records
    ]
    records.append(
        {"stage": "maps", "seconds": seconds, "ips": n / seconds, "what": f"{name}/maps"}
    )
    return records


def _synthetic_train(n: int, size: int, root: Path) -> tuple[Any, np.ndarray]:
    """``n`` synthetic images (cached, memory-mapped) as an ImageSet, and their pet masks."""
    import datasets
    from datasets.conventions import trimap_to_mask
    from methods.base import ImageSet

    ds = datasets.create_dataset(
        "synthetic", root=root / "synth", preset="quick", n_images=n, size=size
    )
    names = [r.name for r in ds.records]
    cache = datasets.build_cache(ds, names, size, root / "cache")
    train = ImageSet(cache.images, np.asarray(cache.labels), ds.num_classes, list(cache.names))
    masks = trimap_to_mask(np.asarray(cache.trimaps), "pet")
    return train, masks


@register_entry("stages")
def _stages(opts: PerfOptions) -> dict[str, Any]:
    import torch

    from benchmark.config import PRESET_IMAGE_SIZE

    smoke = opts.smoke
    preset = "tiny" if smoke else opts.preset
    n = opts.stage_images or (16 if smoke else 24)
    size = PRESET_IMAGE_SIZE[preset]
    device = torch.device(opts.device)
    names = (*stage_methods(), "segmenter")
    settings = {"fast": (opts.amp, True), "plain": (False, False)}
    results: dict[str, list[dict[str, Any]]] = {setting: [] for setting in settings}
    with tempfile.TemporaryDirectory(prefix="wsss-perf-stages-") as tmp:
        train, masks = _synthetic_train(n, size, Path(tmp))
        warm = min(n, 8 if smoke else 12)  # first-use costs (kernels, primitives) paid before
        for name in names:
            # a warm-up on a batch of images in each setting first (first-use costs: kernels,
            # oneDNN/cuDNN primitives of each memory format), then the timed runs
            for rounds, subset in (("warm-up", slice(0, warm)), ("timed", slice(None))):
                part = train.subset(subset)
                for setting, (amp, channels_last) in settings.items():
                    work = Path(tmp) / rounds / setting / name
                    work.mkdir(parents=True)
                    ctx = timing_context(device, amp, channels_last, work)
                    rows = _time_method(name, preset, part, masks[subset], ctx)
                    if rounds == "timed":
                        results[setting] += rows
    fast, plain = results["fast"], results["plain"]
    checks = [
        {
            "what": f"img/s {f['what']}",
            "value": f"{f['ips']:,.1f} vs {p['ips']:,.1f} fp32 NCHW "
            f"({p['seconds'] / f['seconds']:.2f}x)",
            "target": "-",
            "met": None,
        }
        for f, p in zip(fast, plain, strict=True)
    ]
    fast_s, plain_s = sum(r["seconds"] for r in fast), sum(r["seconds"] for r in plain)
    amp_on = opts.amp and device.type == "cuda"
    return {
        "ours_s": fast_s,
        "baseline_s": plain_s,
        "target": None,
        "throughput": f"{n} images x {len(fast)} stages",
        "checks": checks,
        "stages": {"fast": fast, "plain": plain},
        "note": f"preset {preset} at {size} px on {device} ({n} synthetic images, every training "
        "stage capped at 1 epoch, random init); ours: channels_last conv nets"
        f"{' + bf16 autocast' if amp_on else ' (autocast is CUDA-only: off here)'}; "
        f"baseline: fp32 NCHW; per-stage img/s = images x epochs / stage wall time, after a "
        f"warm-up run of every method on {warm} images in both settings",
    }
