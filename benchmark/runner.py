"""The runner: methods x datasets x seeds, equal budgets, cached stages, tidy result rows.

For each run (dataset, method, repetition) the runner:

1. fits the method on the train images and image-level labels (budgeted; its internal stages
   are cached through :class:`RunContext.stage`),
2. computes soft maps for train / val / test (stored as float16 memory-mapped .npy files),
3. chooses the threshold on the validation maps with the one-pass sweep (or uses a fixed one),
4. makes pseudo masks for the train images (a seeded, nested ``gt_ratio`` share replaced by GT),
5. trains the shared segmenter on them (same recipe and epochs for every method),
6. evaluates pseudo masks (train GT), maps (val, test GT) and the segmenter (test GT) with the one
   evaluator, under every trimap convention, and writes tidy rows.

Every stage output is content-addressed and written atomically with a completion marker, so a
re-run skips finished stages and a killed run loses at most the stage in flight. A failing method
is recorded with status ``error`` (reason and traceback file) and never stops the others.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import io
import logging
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

import datasets
from benchmark import cache as bcache
from benchmark import faults
from benchmark.accounting import measure
from benchmark.config import ConfigError, RunConfig
from benchmark.evaluate import METRICS, Evaluator, threshold_map
from benchmark.store import (
    check_writable,
    now_iso,
    provenance,
    write_curve,
    write_per_image,
    write_rows,
)
from benchmark.supervision import gt_rule_masks
from benchmark.supervision import gt_subset as gt_subset
from benchmark.threshold import SWEEP_BINS as SWEEP_BINS
from benchmark.threshold import choose_threshold
from benchmark.threshold import sweep_counts as sweep_counts
from datasets.conventions import CONVENTIONS, positive_prediction
from methods import create_method, list_methods
from methods.base import (
    Context,
    ImageSet,
    Method,
    parse_spec,
    seed_everything,
    split_top_level,
)
from methods.common.segmenter import (
    SEGMENTER_PRESETS,
    SegmenterConfig,
    build_segmenter,
    predict_segmenter,
    train_segmenter,
)

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: Version of what the runner stores per stage (maps dtype and range, stage files); bump it when
#: that changes, so that old caches are not reused.
STAGE_FORMAT = 1
#: Test images saved per run for the report's qualitative grid.
QUALITATIVE_IMAGES = 6
#: The segmenter's pet probability threshold: its test predictions are ``prob >= 0.5``.
SEGMENTER_THRESHOLD = 0.5
#: A 0/1 mask scored as a map (the GT masks a segmenter trains on) is thresholded here.
MASK_THRESHOLD = 0.5
MAP_BATCH = 64  # images per localize() call


def progress(iterable: Any, **kwargs: Any) -> Any:
    """A tqdm bar on a terminal, the bare iterable otherwise (logs and CI stay clean)."""
    if not sys.stderr.isatty() or os.environ.get("CI"):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, **kwargs)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; other names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: CUDA was requested but torch sees no CUDA device")
    return device


def expand_methods(specs: list[str]) -> list[str]:
    """Expand ``all``, names, globs and ``name[k=v]`` specs to a de-duplicated list."""
    out: list[str] = []
    known = list_methods()
    for spec in specs:
        for part in split_top_level(spec):
            if part == "all":
                matched = known
            elif "[" in part:
                try:
                    name, _ = parse_spec(part)
                except Exception as exc:  # noqa: BLE001 - a ValueError or a YAML error
                    raise ConfigError(f"--methods: {exc}".splitlines()[0]) from None
                if name not in known:
                    raise ConfigError(
                        f"--methods: unknown method {name!r}; valid: {', '.join(known)}"
                    )
                matched = [part]
            elif any(ch in part for ch in "*?"):
                matched = fnmatch.filter(known, part)
                if not matched:
                    raise ConfigError(f"--methods: {part!r} matches no method of {known}")
            elif part in known:
                matched = [part]
            else:
                raise ConfigError(f"--methods: unknown method {part!r}; valid: {', '.join(known)}")
            out.extend(m for m in matched if m not in out)
    return out


def check_methods(specs: list[str], preset: str) -> list[str]:
    """Expand method specs and build each one's config, so that a bad spec fails before any work.

    Raises:
        ConfigError: an unknown method or parameter, a value of the wrong type or an
            unparsable spec (one line naming ``--methods``).
    """
    import yaml

    from methods.common.weights import PretrainedWeightsError, check_offline

    expanded = expand_methods(specs)
    for spec in expanded:
        try:
            method = create_method(spec, preset=preset)
            for arch, source in method.weight_sources().items():
                check_offline(arch, source)
        except (ValueError, TypeError, KeyError, yaml.YAMLError, PretrainedWeightsError) as exc:
            text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ConfigError(f"--methods: {spec!r}: {text}".splitlines()[0]) from None
    return expanded


def derive_seed(base: int, dataset: str, method: str, repetition: int) -> int:
    """A per-run seed from (base seed, dataset, method, repetition)."""
    text = f"{base}|{dataset}|{method}|{repetition}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % (2**31 - 1)


@functools.cache
def code_version(method_cls: type[Method]) -> str:
    """Hash of the source that determines a method's outputs, plus :data:`STAGE_FORMAT`.

    Covered: the method's module and every ``methods.*`` module it imports (``cam_affinitynet``
    builds on ``cam``), ``methods/common`` and ``methods/base.py``. Not covered, on
    purpose: the runner, the evaluator, reports and the dataset loaders, so that editing them
    does not throw away hours of cached training. The data a method sees is keyed separately
    (dataset fingerprint, split hash, image size); a runner change that alters what a stage
    stores must bump :data:`STAGE_FORMAT`.

    Computed once per process (cached): the hash describes the code this process imported, so
    editing ``methods/`` while a long run goes on does not give its later runs keys of code
    they are not running.
    """
    files = _method_sources(Path(sys.modules[method_cls.__module__].__file__ or ""))
    files.extend(sorted((REPO / "methods" / "common").glob("*.py")))
    files.append(REPO / "methods" / "base.py")
    h = hashlib.sha256(f"stage-format-{STAGE_FORMAT}".encode())
    for f in files:
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def _method_sources(module: Path) -> list[Path]:
    """``module`` and the method modules it imports (``from methods.cam import ...``), sorted."""
    seen, todo = set(), [module]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        for name in _METHOD_IMPORT.findall(path.read_text(encoding="utf-8")):
            if name not in ("base", "common"):
                todo.append(REPO / "methods" / f"{name}.py")
    return sorted(seen)


_METHOD_IMPORT = re.compile(r"^\s*(?:from|import)\s+methods\.(\w+)", re.MULTILINE)


# ---- the context the runner gives methods ------------------------------------------------------
@dataclass
class RunContext(Context):
    """A Context that caches internal stages, enforces the budget and records stage costs."""

    stage_dir: Path = field(default_factory=lambda: Path("."))
    budget_s: float | None = None
    force: bool = False
    started: float = field(default_factory=time.perf_counter)
    costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    prefix: str = ""
    phase: str = ""  # the runner's step in flight (fit, maps_val, segmenter, ...), for errors
    active: str = ""  # the internal stage being computed
    failed: str = ""  # the innermost stage whose computation raised
    #: (seed, stage folder) a method has in its own run; set by the runner (see as_method)
    locate: Callable[[Method], tuple[int, Path]] | None = None

    @contextlib.contextmanager
    def as_method(self, method: Method) -> Iterator[None]:
        """Use ``method``'s own seed and stage folder inside the block (shared inner fits)."""
        if self.locate is None:
            yield
            return
        saved = self.seed, self.stage_dir
        self.seed, self.stage_dir = self.locate(method)
        logger.info("%s: fitted as in its own run (seed %d)", method.name, self.seed)
        try:
            yield
        finally:
            self.seed, self.stage_dir = saved

    def should_continue(self) -> bool:
        """False once the run's wall-clock budget is spent (then the run's status is budget)."""
        faults.point("step", self.active)  # test-only; see benchmark.faults
        if self.budget_s is not None and time.perf_counter() - self.started > self.budget_s:
            if not self.budget_hit:
                logger.info("budget of %.0f s spent: stopping training", self.budget_s)
            self.budget_hit = True
            return False
        return True

    def stage(
        self,
        name: str,
        compute: Callable[[], dict[str, torch.Tensor]],
        check: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Reuse the cached stage ``name`` when complete and intact, else compute and save it.

        Another process computing the same stage is waited for (see
        :func:`benchmark.cache.computing`). A result with NaN or inf values (a diverged
        training) raises FloatingPointError and is never cached.

        Args:
            name: the stage name (the file is ``<prefix><name>.pt`` in the stage folder).
            compute: computes the stage's tensors (a dict) when no usable cached copy exists.
            check: says why loaded tensors do not fit (e.g. a state dict that does not load
                into the model), or None; a cached copy that does not fit is recomputed.
        """
        path = self.stage_dir / f"{self.prefix}{name}.pt"
        with bcache.computing(path):
            info = None if self.force else bcache.read_marker(path)
            tensors = None if info is None else _load_stage(path, check)
            if info is not None and tensors is not None:
                meta = info["meta"]
                self.budget_hit = self.budget_hit or bool(meta.get("budget_hit"))
                self.costs[name] = {**meta.get("cost", {}), "reused": True}
                logger.info("stage %s: reused %s", name, path)
                return tensors
            bcache.invalidate(path)
            before, outer = self.budget_hit, self.active
            self.budget_hit, self.active = False, f"{self.prefix}{name}"
            try:
                with measure(self.device) as cost:
                    tensors = compute()
                _check_finite(name, tensors)
            except BaseException:
                self.failed = self.failed or self.active
                raise
            finally:
                self.active = outer
            hit = self.budget_hit
            self.budget_hit = before or hit
            bcache.save_tensors(path, tensors, {"cost": cost.to_dict(), "budget_hit": hit})
            self.costs[name] = {**cost.to_dict(), "reused": False}
            return tensors


def _load_stage(
    path: Path, check: Callable[[dict[str, Any]], str | None] | None
) -> dict[str, Any] | None:
    """The tensors of a cached stage whose marker was checked; None (warned) if unusable."""
    try:
        tensors = bcache.load_tensors(path)
    except Exception as exc:  # noqa: BLE001 - any unloadable file is recomputed
        logger.warning("cannot load cached stage %s (%s); recomputing", path, exc)
        return None
    problem = "not a dict of tensors" if not isinstance(tensors, dict) else None
    if problem is None and check is not None:
        problem = check(tensors)
    if problem is not None:
        logger.warning(
            "cached stage %s does not fit the run: %s (corrupt or replaced?); recomputing",
            path,
            problem,
        )
        return None
    return tensors


def _check_finite(stage: str, tensors: dict[str, Any]) -> None:
    """Raise FloatingPointError if a floating tensor of a stage result holds NaN or inf."""
    bad = [
        key
        for key, value in tensors.items()
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()
    ]
    if bad:
        shown = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise FloatingPointError(
            f"stage {stage}: training diverged: NaN or inf in {shown} (the loss became NaN or "
            "inf; try a lower learning rate); not cached"
        )


# ---- data shared by every run -------------------------------------------------------------------
@dataclass
class DataBundle:
    """The dataset, its split, the image cache and the ImageSets of each split."""

    dataset: Any
    split: Any
    cache: Any
    index: dict[str, np.ndarray]
    size: int

    def imageset(self, part: str, masks: bool = False) -> ImageSet:
        """The ImageSet of a split part (masks in the ``pet`` convention only when asked)."""
        idx = self.index[part]
        contiguous = len(idx) and np.all(np.diff(idx) == 1)
        sel: Any = slice(int(idx[0]), int(idx[-1]) + 1) if contiguous else idx
        return ImageSet(
            images=self.cache.images[sel],
            labels=np.asarray(self.cache.labels)[sel],
            num_classes=self.dataset.num_classes,
            names=[self.cache.names[i] for i in idx],
            masks=np.asarray(self.cache.masks("pet"))[sel] if masks else None,
        )

    def orig_masks(self, part: str, convention: str) -> Iterator[np.ndarray]:
        """Original-resolution GT masks of a split part under a convention."""
        for i in self.index[part]:
            yield self.cache.orig_mask(int(i), convention)


def prepare_data(cfg: RunConfig) -> DataBundle:
    """Load (or generate) the dataset, make and save the split, build the image cache."""
    out = Path(cfg.out)
    params: dict[str, Any] = {}
    if cfg.dataset == "synthetic":
        params["preset"] = "tiny" if cfg.preset == "tiny" else "quick"
        if cfg.data_root is None:
            params["root"] = out / "data" / f"synthetic-{params['preset']}"
    if cfg.data_root is not None:
        params["root"] = Path(cfg.data_root)
    dataset = datasets.create_dataset(cfg.dataset, **params)
    for exc in dataset.exclusions:
        logger.warning("excluded %s (%s): %s", exc.name, exc.file, exc.reason)
    split = datasets.make_split(
        dataset, scheme=cfg.split, val_fraction=cfg.val_fraction, seed=cfg.base_seed
    )
    split.save(out / "splits" / f"{cfg.dataset}-{cfg.split}-{split.sha256[:12]}.json")
    names = list(split.train) + list(split.val) + list(split.test)
    try:
        cache = datasets.build_cache(dataset, names, cfg.size, out / "cache")
    except OSError as exc:
        if not bcache.is_disk_full(exc):
            raise
        what = f"building the image cache {exc.filename or out / 'cache'}"
        raise bcache.disk_full_error(exc, what, out / "cache") from exc
    position = {n: i for i, n in enumerate(cache.names)}
    for reason in getattr(cache, "excluded", []) or []:
        logger.warning("left out of the image cache: %s", reason)
    write_manifest(out / "data" / f"{cfg.dataset}-manifest.json", dataset, cache)
    index = {
        part: np.array([position[n] for n in getattr(split, part) if n in position], dtype=np.int64)
        for part in ("train", "val", "test")
    }
    return DataBundle(dataset=dataset, split=split, cache=cache, index=index, size=cfg.size)


def write_manifest(path: Path, dataset: Any, cache: Any) -> None:
    """Write the data manifest: counts, classes and every excluded file with its reason.

    ``excluded`` comes from the dataset's validation, ``cache_excluded`` from the image cache
    (files that changed after validation). Written atomically; read it with ``json.load``.
    """
    info: dict[str, Any] = dataset.check() if hasattr(dataset, "check") else {}
    info["cache_excluded"] = list(getattr(cache, "excluded", []) or [])
    info["cached_images"] = len(cache.names)
    bcache.atomic_write_text(path, _json(info))


# ---- helpers of one run -------------------------------------------------------------------------
def compute_maps(
    method: Method,
    images: ImageSet,
    ctx: Context,
    path: Path,
    force: bool,
    like: tuple[int, ...] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Maps (N, C, h, w) of a split, float16 memory-mapped, cached with a marker.

    A cached file is reused only if it holds float16 values in [0, 1] of shape (N, C, h, w)
    with N the number of images of the split (and ``(C, h, w) == like`` when given: the shape
    of the method's maps of another split); otherwise it is reported and recomputed.
    """
    with bcache.computing(path):  # a concurrent run on the same folder waits, then reuses
        return _compute_maps(method, images, ctx, path, force, like)


def _compute_maps(
    method: Method,
    images: ImageSet,
    ctx: Context,
    path: Path,
    force: bool,
    like: tuple[int, ...] | None,
) -> tuple[np.ndarray, dict[str, Any]]:
    info = None if force else bcache.read_marker(path)
    if info is not None:
        shape = (len(images), *(like or (None, None, None)))
        array = bcache.load_checked_array(path, shape, np.float16, "maps", unit_range=True)
        if array is not None:
            return array, {**info["meta"].get("cost", {}), "reused": True}
    bcache.invalidate(path)
    chunks = []
    with measure(ctx.device) as cost:
        for batch in progress(images.batches(MAP_BATCH), desc=f"maps {path.stem}", unit="batch"):
            maps = method.localize(batch, ctx)
            maps = method.refine(batch, maps, ctx)
            maps = np.asarray(maps, dtype=np.float32)
            if maps.ndim != 4 or maps.shape[0] != len(batch):
                raise ValueError(f"{method.name}: localize returned shape {maps.shape}")
            if not np.isfinite(maps).all():
                raise FloatingPointError(f"{method.name}: maps contain NaN or inf")
            chunks.append(np.clip(maps, 0.0, 1.0).astype(np.float16))
    array = np.concatenate(chunks) if chunks else np.zeros((0, 1, 1, 1), np.float16)
    bcache.save_array(path, array, {"cost": cost.to_dict()})
    return bcache.load_array(path), {**cost.to_dict(), "reused": False}


def orig_gts(bundle: DataBundle, part: str) -> Iterator[tuple[np.ndarray, ...]]:
    """Per image of a split part, its original-resolution GT under each of :data:`CONVENTIONS`."""
    return zip(*(bundle.orig_masks(part, c) for c in CONVENTIONS))


def evaluate_maps(
    maps: np.ndarray,
    gts: Iterator[tuple[np.ndarray, ...]],
    names: list[str],
    threshold: float,
    used: Mapping[int, np.ndarray] | None = None,
) -> dict[str, Evaluator]:
    """Score soft pet maps at a threshold under every convention (original-resolution GT).

    Each image's prediction is made once (:func:`benchmark.evaluate.threshold_map`: the pet map
    upsampled to the GT's size, ``>= threshold``); each convention scores it or its complement
    (:func:`datasets.conventions.positive_prediction`), so a pixel on the threshold is pet under
    every convention.

    Images in ``used`` (the gt_ratio share; every image of a method whose pseudo masks are the
    GT) are scored by the mask the segmenter really trains on: the working-resolution ``pet``
    mask, its pet pixels (1) as a 0/1 map (the ignored border, 255, is not pet), upsampled and
    thresholded at :data:`MASK_THRESHOLD` as a method's map would be. Scoring the
    original-resolution GT instead would score the GT against itself (100 everywhere).

    Args:
        maps: (N, 1, h, w) pet maps in [0, 1].
        gts: per image, its GT masks in the order of :data:`CONVENTIONS` (see :func:`orig_gts`).
        names: image names.
        threshold: the threshold of the maps.
        used: image index -> the (S, S) uint8 {0, 1, 255} mask that replaces its pseudo mask.

    Returns:
        convention -> its :class:`Evaluator`.
    """
    evaluators = {c: Evaluator() for c in CONVENTIONS}
    for i, (soft, masks) in enumerate(zip(maps, gts)):
        if used is not None and i in used:
            pet = threshold_map((used[i] == 1).astype(np.float32), masks[0].shape, MASK_THRESHOLD)
        else:
            pet = threshold_map(soft[0].astype(np.float32), masks[0].shape, threshold, names[i])
        for convention, gt in zip(CONVENTIONS, masks):
            evaluators[convention].add(positive_prediction(pet, convention), gt, name=names[i])
    return evaluators


def pseudo_masks(
    maps: np.ndarray,
    threshold: float,
    gt_masks: np.ndarray,
    replaced: np.ndarray,
    from_gt: bool,
) -> np.ndarray:
    """Pet pseudo masks (N, S, S) uint8 {0, 1, 255} at the working resolution.

    A pixel is pet where the pet map (upsampled to S) is ``>= threshold``, under every
    convention (the threshold is a pet-map threshold, see :func:`benchmark.threshold.sweep_counts`).
    """
    if from_gt:
        return np.asarray(gt_masks).copy()
    soft = maps[:, 0].astype(np.float32)
    if soft.shape[1:] != gt_masks.shape[1:]:
        t = torch.from_numpy(soft)[:, None]
        t = torch.nn.functional.interpolate(
            t, size=gt_masks.shape[1:], mode="bilinear", align_corners=False
        )
        soft = t[:, 0].numpy()
    out = (soft >= np.float32(threshold)).astype(np.uint8)
    if len(replaced):
        out[replaced] = np.asarray(gt_masks)[replaced]
    return out


# ---- one run ----------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """One (dataset, method, repetition) to run."""

    method_spec: str
    repetition: int


@dataclass
class OpenRun:
    """One run's method, seed, base row, keys, folders and context (see Runner.open_run)."""

    method: Method
    seed: int
    base: dict[str, Any]
    run_key: str
    run_dir: Path
    seg_key: str
    ctx: RunContext


class Runner:
    """Runs every RunSpec of a RunConfig on a prepared DataBundle."""

    def __init__(
        self, cfg: RunConfig, bundle: DataBundle | None = None, gt_rule: str = "subset"
    ) -> None:
        self.cfg = cfg
        check_writable(cfg.out)  # fail before any work when no row could be stored
        # how gt_ratio is applied: "subset" (a fixed nested subset) or "weaktr_batch"
        # (WeakTR-Refinery's per-batch draw; see benchmark.supervision.PerBatchGTMasks)
        self.gt_rule = gt_rule
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.bundle = bundle or prepare_data(cfg)
        seg_values = dict(SEGMENTER_PRESETS.get(cfg.preset, {}))
        if cfg.segmenter is not None and cfg.segmenter != seg_values.get("arch", "lraspp"):
            seg_values["arch"] = cfg.segmenter
            if cfg.segmenter == "lraspp" and seg_values.get("pretrained_backbone") == "offline":
                # torchvision's ImageNet MobileNetV3 is not installable offline
                logger.warning("--segmenter lraspp on %s: random-init backbone", cfg.preset)
                seg_values["pretrained_backbone"] = False
        if cfg.segmenter_epochs is not None:
            seg_values["epochs"] = cfg.segmenter_epochs
        if cfg.segmenter_batch_size is not None:
            seg_values["batch_size"] = cfg.segmenter_batch_size
        self.segmenter_config = SegmenterConfig(**seg_values)

    def specs(self) -> list[RunSpec]:
        """Methods x repetitions."""
        methods = expand_methods(self.cfg.methods)
        return [RunSpec(m, r) for m in methods for r in range(self.cfg.seeds)]

    def run_all(self) -> pd.DataFrame:
        """Run every spec; a failing one is recorded and the others go on."""
        frames = []
        for spec in progress(self.specs(), desc="runs", unit="run"):
            frames.append(pd.DataFrame(self.run_one(spec)))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    # .. keys ..................................................................................
    def _base_row(self, method: Method, spec: RunSpec, seed: int) -> dict[str, Any]:
        b, cfg = self.bundle, self.cfg
        return {
            "method": method.name,
            "method_id": method.identity(),
            "kind": method.kind,
            "preset": cfg.preset,
            "params": _json(method.params()),
            "dataset": cfg.dataset,
            "data_fingerprint": b.dataset.fingerprint()[:16],
            "split_scheme": cfg.split,
            "split_sha256": b.split.sha256,
            "repetition": spec.repetition,
            "seed": seed,
            "gt_ratio": cfg.gt_ratio,
            "image_size": b.size,
            "segmenter": self.segmenter_config.arch,
            "segmenter_epochs": self.segmenter_config.epochs,
            "budget_minutes": cfg.budget_minutes,
            "device": str(self.device),
            "date": now_iso(),
            **{f"v_{k}": v for k, v in provenance().items()},
        }

    def _key_parts(self, method: Method, seed: int) -> dict[str, Any]:
        """What, besides the method's parameters, keys a run's cached results."""
        cfg, b = self.cfg, self.bundle
        return {
            "data": b.dataset.fingerprint(),
            "split": b.split.sha256,
            "size": b.size,
            "seed": seed,
            "code": code_version(type(method)),
            "budget": cfg.budget_minutes,
            "max_epochs": cfg.max_epochs,
            "device": self.device.type,
            "amp": cfg.amp,
            "channels_last": cfg.channels_last,
        }

    def locate_fit(self, method: Method, repetition: int) -> tuple[int, Path]:
        """The seed and the stage folder of ``method``'s fit in repetition ``repetition``.

        Variants differing only in inference options share both (same fit identity), and so
        does a method fitted inside another (``cam`` inside ``cam_affinitynet``, see
        :meth:`methods.base.Context.as_method`).
        """
        cfg = self.cfg
        seed = derive_seed(cfg.base_seed, cfg.dataset, method.fit_identity(), repetition)
        fit_key = bcache.stable_hash(
            {**self._key_parts(method, seed), "method": method.fit_cache_key()}
        )
        return seed, self.out / "stages" / method.name / fit_key

    def open_run(self, spec: RunSpec) -> OpenRun:
        """The method, seed, base row, keys, folders and context of a run (computes nothing)."""
        cfg = self.cfg
        method = create_method(spec.method_spec, preset=cfg.preset)
        seed, fit_dir = self.locate_fit(method, spec.repetition)
        base = self._base_row(method, spec, seed)
        run_key = bcache.stable_hash(
            {**self._key_parts(method, seed), "method": method.cache_key()}
        )
        run_dir = self.out / "runs" / method.name / run_key
        (run_dir / "work").mkdir(parents=True, exist_ok=True)
        seg_key = bcache.stable_hash(
            {
                "seg": self.segmenter_config.__dict__,
                "gt_ratio": cfg.gt_ratio,
                "threshold": cfg.threshold,
                "convention": cfg.convention,
                **({"gt_rule": self.gt_rule} if self.gt_rule != "subset" else {}),
            },
            10,
        )
        ctx = RunContext(
            device=self.device,
            seed=seed,
            workdir=run_dir / "work",
            max_epochs=cfg.max_epochs,
            amp=cfg.amp,
            channels_last=cfg.channels_last,
            progress=sys.stderr.isatty(),
            stage_dir=fit_dir,
            budget_s=None if cfg.budget_minutes is None else cfg.budget_minutes * 60.0,
            force=cfg.force,
            locate=functools.partial(self.locate_fit, repetition=spec.repetition),
        )
        base["run_key"] = run_key
        return OpenRun(method, seed, base, run_key, run_dir, seg_key, ctx)

    def run_one(
        self, spec: RunSpec, extra: dict[str, Any] | None = None, rows_key: str | None = None
    ) -> list[dict[str, Any]]:
        """Run one method repetition; returns (and stores) its rows, whatever happens.

        Args:
            spec: the method spec and repetition.
            extra: columns added to every row (sweeps: ``study``, ``trial``, ...).
            rows_key: the result file's key (default: method, run key and segmenter key).
        """
        cfg, run = self.cfg, self.open_run(spec)
        method, ctx, run_dir, seg_key = run.method, run.ctx, run.run_dir, run.seg_key
        base = {**run.base, **(extra or {})}
        rows_key = rows_key or f"{method.name}-{run.run_key}-{seg_key}"
        logger.info("run %s (seed %d) -> %s", method.identity(), run.seed, run_dir)
        try:
            rows = self._execute(method, ctx, run_dir, base, seg_key)
        except (KeyboardInterrupt, bcache.DiskFullError):
            raise  # a full disk stops every run: nothing more can be stored (earlier rows kept)
        except Exception as exc:  # noqa: BLE001 - one failing method never stops the others
            tb = run_dir / "error.txt"
            bcache.atomic_write_text(tb, traceback.format_exc())
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
                reason = self._oom_reason(method, ctx, exc)
            logger.error("%s failed: %s (traceback: %s)", method.identity(), reason, tb)
            rows = [
                {
                    **base,
                    "status": "error",
                    "reason": reason,
                    "traceback": str(tb),
                    "stage": "run",
                    "split": "",
                    "convention": cfg.convention,
                    "aggregation": "",
                    "metric": "status",
                    "value": float("nan"),
                    "threshold": float("nan"),
                }
            ]
        self._store(rows_key, rows)
        return rows

    def _store(self, rows_key: str, rows: list[dict[str, Any]]) -> None:
        """Store a run's rows (a failure never replaces completed rows: see ``write_rows``).

        Raises:
            OutputError: the rows cannot be written (the message names the file; rows stored
                before are kept and every completed stage is reused by the next run).
        """
        try:
            write_rows(self.out, rows_key, rows)
        except bcache.OutputError:
            raise
        except OSError as exc:
            raise bcache.OutputError(
                exc.errno,
                f"cannot store result rows {exc.filename or self.out / 'results'} "
                f"({exc.strerror or exc}); earlier rows and completed stages are kept: fix it "
                "and run again",
            ) from exc

    def _oom_reason(self, method: Method, ctx: RunContext, exc: BaseException) -> str:
        """One line: where memory ran out, at which batch size, and the option to lower it."""
        where = ctx.phase or "run"
        if ctx.failed and where == "fit":
            where = f"fit (stage {ctx.failed})"
        if ctx.phase.startswith("segmenter"):
            size = self.segmenter_config.batch_size
            sizes = f"segmenter batch_size={size}"
            hint = f"--segmenter-batch-size {max(1, size // 2)}"
        else:
            params = method.params()
            fields = [k for k in sorted(params) if k.endswith("batch_size")]
            sizes = ", ".join(f"{k}={params[k]}" for k in fields) or "no batch-size parameter"
            infer = ctx.phase.startswith("maps")
            pick = [k for k in fields if k.startswith("infer") == infer] or fields
            hint = (
                f"--methods '{method.name}[{pick[0]}={max(1, int(params[pick[0]]) // 2)}]'"
                if pick
                else "a smaller --image-size"
            )
        detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        return (
            f"out of memory on {self.device} during {where} of {method.identity()} with "
            f"{sizes}: lower it, e.g. {hint} (or --image-size); completed stages are kept "
            f"and reused [{type(exc).__name__}: {detail}]"
        )

    def fit_and_maps(
        self, method: Method, ctx: RunContext, run_dir: Path
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
        """Fit the method (cached stages) and compute its train/val/test maps (cached).

        Returns:
            ``(maps, stage_costs)``: maps (N, C, h, w) per split part, costs per stage.
        """
        cfg, b = self.cfg, self.bundle
        seed_everything(ctx.seed)
        train = b.imageset("train", masks=method.uses_masks)

        ctx.phase = "fit"
        with measure(self.device) as fit_cost:
            method.fit(train, ctx)
        # internal stages carry their original cost when reused; "fit" is this call's cost
        stage_costs: dict[str, dict[str, Any]] = {f"fit:{k}": v for k, v in ctx.costs.items()}
        fit_reused = bool(ctx.costs) and all(c.get("reused") for c in ctx.costs.values())
        stage_costs["fit"] = {**fit_cost.to_dict(), "reused": fit_reused}

        maps: dict[str, np.ndarray] = {}
        for part in ("train", "val", "test"):
            images = b.imageset(part, masks=method.uses_masks)
            ctx.phase = f"maps_{part}"
            # every split's maps share the (C, h, w) of the train maps
            like = maps["train"].shape[1:] if maps and len(images) else None
            maps[part], stage_costs[f"maps_{part}"] = compute_maps(
                method, images, ctx, run_dir / "maps" / f"{part}.npy", cfg.force, like
            )
        return maps, stage_costs

    def _execute(
        self, method: Method, ctx: RunContext, run_dir: Path, base: dict[str, Any], seg_key: str
    ) -> list[dict[str, Any]]:
        cfg, b = self.cfg, self.bundle
        maps, stage_costs = self.fit_and_maps(method, ctx, run_dir)

        # threshold: fixed (method or option) or chosen on validation, never on test
        curve = None
        if cfg.threshold is not None:
            threshold, source = cfg.threshold, "fixed"
        elif method.fixed_threshold is not None:
            threshold, source = method.fixed_threshold, "method"
        else:
            threshold, curve = choose_threshold(
                maps["val"], b.orig_masks("val", cfg.convention), cfg.convention
            )
            source = "val_sweep"

        n_train = len(b.index["train"])
        replaced = gt_subset(n_train, cfg.gt_ratio, f"{b.split.sha256}|{cfg.base_seed}")
        if self.gt_rule != "subset":
            replaced = replaced[:0]  # GT is drawn per batch instead (train_masks below)
        pet_train = np.asarray(b.cache.masks("pet"))[b.index["train"]]
        pseudo = pseudo_masks(
            maps["train"],
            threshold,
            pet_train,
            replaced,
            getattr(method, "pseudo_from_gt", False),
        )
        train_masks: Any = pseudo
        if self.gt_rule != "subset":
            train_masks = gt_rule_masks(self.gt_rule, pseudo, pet_train, cfg.gt_ratio, ctx.seed)

        # the shared segmenter, identical for every method
        seg_ctx = RunContext(
            device=self.device,
            seed=ctx.seed,
            workdir=ctx.workdir,
            amp=ctx.amp,
            channels_last=ctx.channels_last,
            progress=ctx.progress,
            stage_dir=run_dir / "stages",
            force=cfg.force,
            prefix=f"segmenter-{seg_key}-",
        )
        images_train = b.imageset("train")
        seg_config = self.segmenter_config
        ctx.phase = "segmenter"
        state = seg_ctx.stage(
            "train",
            lambda: train_segmenter(
                np.asarray(images_train.images), train_masks, seg_config, seg_ctx
            ),
            check=functools.partial(_segmenter_problem, seg_config),
        )
        stage_costs["segmenter"] = seg_ctx.costs["train"]
        model = build_segmenter(seg_config)
        model.load_state_dict(state)
        model.to(self.device).eval()
        test = b.imageset("test")
        pred_path = run_dir / "preds" / f"segmenter-{seg_key}-test.npy"
        ctx.phase = "segmenter_predict"
        with bcache.computing(pred_path):
            preds = None if cfg.force else self._cached_preds(pred_path, len(test))
            if preds is None:
                bcache.invalidate(pred_path)
                with measure(self.device) as pred_cost:
                    preds = predict_segmenter(model, np.asarray(test.images), seg_ctx)
                meta = {"cost": pred_cost.to_dict()}
                bcache.save_array(pred_path, preds.astype(np.float16), meta)
                preds = bcache.load_array(pred_path)  # score what is stored, fresh or reused
                stage_costs["segmenter_predict"] = {**pred_cost.to_dict(), "reused": False}
        ctx.phase = "evaluate"

        status = "budget" if ctx.budget_hit else "done"
        reason = "cut by its budget; partial result kept" if ctx.budget_hit else ""
        common = {
            **base,
            "status": status,
            "reason": reason,
            "threshold": threshold,
            "threshold_source": source,
            "n_gt_replaced": len(replaced),
        }
        names = {p: [b.cache.names[i] for i in b.index[p]] for p in ("train", "val", "test")}
        rep = set(int(i) for i in replaced)
        if getattr(method, "pseudo_from_gt", False):
            rep = set(range(n_train))
        used = {i: pseudo[i] for i in rep}  # the masks the segmenter trains on instead
        scored = {  # (stage, split) -> (evaluators by convention, threshold, its source)
            ("pseudo", "train"): (
                evaluate_maps(maps["train"], orig_gts(b, "train"), names["train"], threshold, used),
                threshold,
                source,
            ),
            ("maps", "test"): (
                evaluate_maps(maps["test"], orig_gts(b, "test"), names["test"], threshold),
                threshold,
                source,
            ),
            ("segmenter", "test"): (
                evaluate_maps(preds, orig_gts(b, "test"), names["test"], SEGMENTER_THRESHOLD),
                SEGMENTER_THRESHOLD,
                "segmenter",
            ),
        }
        rows, per_image = quality_rows(scored, common)
        for stage, cost in stage_costs.items():
            for metric, value in cost.items():
                if metric == "reused":
                    continue
                rows.append(
                    {
                        **common,
                        "threshold": float("nan"),  # a cost has no prediction
                        "threshold_source": "",
                        "stage": stage,
                        "split": "",
                        "convention": "",
                        "aggregation": "cost",
                        "metric": metric,
                        "value": float(value),
                        "reused": bool(cost.get("reused", False)),
                    }
                )
        frame = pd.concat(per_image, ignore_index=True)
        frame.insert(0, "method_id", base["method_id"])
        frame.insert(1, "seed", base["seed"])
        frame.insert(2, "run_key", base["run_key"])
        frame.insert(3, "gt_ratio", float(cfg.gt_ratio))
        write_per_image(self.out, f"{method.name}-{base['run_key']}-{seg_key}", frame)
        if curve is not None:
            curve.insert(0, "method_id", base["method_id"])
            curve.insert(1, "seed", base["seed"])
            curve.insert(2, "convention", cfg.convention)
            curve.insert(3, "run_key", base["run_key"])
            write_curve(self.out, f"{base['run_key']}-{cfg.convention}", curve)
        self._save_qualitative(base, seg_key, maps["test"], preds, threshold)
        return rows

    def _cached_preds(self, path: Path, n_test: int) -> np.ndarray | None:
        """The stored segmenter predictions (n_test, 1, S, S) if complete and intact, else None."""
        if bcache.read_marker(path) is None:
            return None
        shape = (n_test, 1, self.bundle.size, self.bundle.size)
        return bcache.load_checked_array(path, shape, np.float16, "predictions", unit_range=True)

    def _save_qualitative(
        self,
        base: dict[str, Any],
        seg_key: str,
        maps: np.ndarray,
        preds: np.ndarray,
        threshold: float,
    ) -> None:
        """Arrays of a few test images for the report's qualitative grid (pet convention).

        The images are the same for every method (a permutation seeded by the split hash); see
        :func:`reports.figures.load_qualitative` for the format.
        """
        b = self.bundle
        test = b.index["test"]
        if len(test) == 0:
            return
        seed = int(b.split.sha256[:8], 16)
        pick = np.sort(np.random.default_rng(seed).permutation(len(test))[:QUALITATIVE_IMAGES])
        rows = test[pick]
        pet_map = np.asarray(maps[pick, 0], dtype=np.float32)
        seg = np.asarray(preds[pick, 0], dtype=np.float32)
        arrays = {
            "method_id": np.array(base["method_id"]),
            "names": np.array([b.cache.names[i] for i in rows]),
            "image": np.asarray(b.cache.images)[rows],
            "gt": np.asarray(b.cache.masks("pet"))[rows],
            "map": pet_map.astype(np.float16),
            "pseudo": (pet_map >= threshold).astype(np.uint8),
            "prediction": (seg >= SEGMENTER_THRESHOLD).astype(np.uint8),
        }
        path = self.out / "results" / "qualitative" / f"{base['run_key']}-{seg_key}.npz"
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        bcache.atomic_write_bytes(path, buf.getvalue())  # a partial file never ends in .npz


def _segmenter_problem(config: SegmenterConfig, state: dict[str, Any]) -> str | None:
    """Why a cached segmenter state does not load into the segmenter ``config`` builds, or None."""
    with torch.random.fork_rng(devices=[]):  # building the model must not move the seeds
        model = build_segmenter(config)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, KeyError) as exc:
        return str(exc).splitlines()[0][:300]
    return None


def quality_rows(
    scored: Mapping[tuple[str, str], tuple[dict[str, Evaluator], float, str]],
    common: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[pd.DataFrame]]:
    """Tidy quality rows and per-image frames of the scored stages, convention by convention.

    Each row carries the threshold its prediction was made with: the pseudo-label threshold on
    ``pseudo`` and ``maps`` rows, :data:`SEGMENTER_THRESHOLD` on ``segmenter`` rows.

    Args:
        scored: (stage, split) -> (evaluators by convention, threshold, threshold source).
        common: the columns every row of the run shares.

    Returns:
        ``(rows, per_image)``: rows per convention, stage, aggregation and metric; one
        per-image frame per convention and stage.
    """
    rows: list[dict[str, Any]] = []
    per_image: list[pd.DataFrame] = []
    for convention in CONVENTIONS:
        for (stage, part), (evaluators, threshold, source) in scored.items():
            ev = evaluators[convention]
            head = {**common, "threshold": threshold, "threshold_source": source}
            head.update(stage=stage, split=part, convention=convention)
            for aggregation, values in (
                ("dataset", ev.dataset_metrics()),
                ("image_mean", ev.mean_image_metrics()),
            ):
                rows.extend(
                    {**head, "aggregation": aggregation, "metric": m, "value": float(values[m])}
                    for m in (*METRICS, "miou")
                    if m in values
                )
            frame = ev.per_image()
            frame.insert(0, "convention", convention)
            frame.insert(0, "split", part)
            frame.insert(0, "stage", stage)
            per_image.append(frame)
    return rows, per_image


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=str)


def run(cfg: RunConfig) -> pd.DataFrame:
    """Run everything a RunConfig asks for; returns all rows of this invocation."""
    runner = Runner(cfg)
    return runner.run_all()
