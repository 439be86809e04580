"""The runner: methods x datasets x seeds, equal budgets, cached stages, tidy result rows.

For each run (dataset, method, repetition) the runner:

1. fits the method on the train images and image-level labels (budgeted; its internal stages
   are cached through :class:`benchmark.context.RunContext.stage`),
2. computes soft maps for train / val / test (stored as float16 memory-mapped .npy files),
3. chooses the threshold on the validation maps with the one-pass sweep (or uses a fixed one),
4. makes pseudo masks for the train images (a seeded, nested ``gt_ratio`` share replaced by GT),
5. trains the shared segmenter on them (same recipe and epochs for every method),
6. evaluates pseudo masks (train GT), maps (val, test GT) and the segmenter (test GT) with the one
   evaluator, under every trimap convention, and writes tidy rows.

Steps 2-6 are the named functions of :mod:`benchmark.stages`; the data every run shares is
:mod:`benchmark.bundle`, run identities and seeds :mod:`benchmark.identity`, the context methods
get :mod:`benchmark.context`. This module keys, orders and records runs.

Every stage output is content-addressed and written atomically with a completion marker, so a
re-run skips finished stages and a killed run loses at most the stage in flight. A failing method
is recorded with status ``error`` (reason and traceback file) and never stops the others.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmark import cache as bcache
from benchmark import multiclass, stages
from benchmark.accounting import measure
from benchmark.bundle import DataBundle as DataBundle
from benchmark.bundle import dump_json
from benchmark.bundle import prepare_data as prepare_data
from benchmark.config import ConfigError, RunConfig
from benchmark.context import RunContext as RunContext
from benchmark.context import progress
from benchmark.identity import REPO as REPO
from benchmark.identity import _method_sources as _method_sources
from benchmark.identity import check_methods as check_methods
from benchmark.identity import code_version, derive_seed, expand_methods, run_label
from benchmark.stages import compute_maps
from benchmark.store import check_row_schema, check_writable, now_iso, provenance, write_rows
from benchmark.supervision import gt_subset as gt_subset
from benchmark.threshold import SWEEP_BINS as SWEEP_BINS
from benchmark.threshold import pxap_rows
from benchmark.threshold import sweep_counts as sweep_counts
from methods import create_method
from methods.base import Method, seed_everything
from methods.common.segmenter import SEGMENTER_PRESETS, SegmenterConfig

logger = logging.getLogger(__name__)


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


# ---- one run ---------------------------------------------------------------------------------
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
            "method_id": run_label(method, cfg),
            "kind": method.kind,
            "supervision": method.supervision,
            "preset": cfg.preset,
            "params": dump_json(method.params()),
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
            # the regime options that change results (also in method_id, see run_label)
            "max_epochs": float("nan") if cfg.max_epochs is None else float(cfg.max_epochs),
            "amp": bool(cfg.amp),
            "fixed_threshold": float("nan") if cfg.threshold is None else float(cfg.threshold),
            "device": str(self.device),
            "date": now_iso(),
            **{f"v_{k}": v for k, v in provenance().items()},
        }

    def _key_parts(self, method: Method, seed: int) -> dict[str, Any]:
        """What, besides the method's parameters, keys a run's cached results."""
        cfg, b = self.cfg, self.bundle
        # the boxes (XML files) are not in the dataset's fingerprint: a box method's key has them
        boxes = {"boxes": self._boxes_digest()} if method.supervision == "box" else {}
        return {
            **boxes,
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

    def _boxes_digest(self) -> str:
        """sha256 of every image's boxes at the working resolution (-1 where none), once."""
        if getattr(self, "_boxes", None) is None:
            every = np.arange(len(self.bundle.cache.names))
            boxes = np.nan_to_num(self.bundle.boxes(every), nan=-1.0)
            self._boxes = bcache.stable_hash(boxes.round(3).tolist())
        return self._boxes

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
                **({"threshold_on": cfg.threshold_on} if cfg.threshold_on != "val" else {}),
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
        # the rows' run key: the maps' run and the segmenter settings (a fixed threshold, a
        # gt_ratio), so that two experiments on the same maps are two runs in the report
        base["run_key"] = bcache.stable_hash({"run": run_key, "seg": seg_key})
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
        run = self.open_run(spec)
        method, ctx, run_dir, seg_key = run.method, run.ctx, run.run_dir, run.seg_key
        base = {**run.base, **(extra or {})}
        rows_key = rows_key or f"{method.name}-{run.run_key}-{seg_key}"
        logger.info("run %s (seed %d) -> %s", method.identity(), run.seed, run_dir)
        unsupported = self._unsupported(method, base)
        try:
            rows = unsupported or self._execute(run, base)
        except (KeyboardInterrupt, bcache.DiskFullError):
            raise  # a full disk stops every run: nothing more can be stored (earlier rows kept)
        except Exception as exc:  # noqa: BLE001 - one failing method never stops the others
            tb = run_dir / "error.txt"
            bcache.atomic_write_text(tb, traceback.format_exc())
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
                reason = self._oom_reason(method, ctx, exc)
            logger.error("%s failed: %s (traceback: %s)", method.identity(), reason, tb)
            rows = [stages.status_row(base, "error", reason, self.convention, traceback=str(tb))]
        self._store(rows_key, rows)
        return rows

    def _store(self, rows_key: str, rows: list[dict[str, Any]]) -> None:
        """Store a run's rows (a failure never replaces completed rows: see ``write_rows``).

        Raises:
            OutputError: the rows cannot be written (the message names the file; rows stored
                before are kept and every completed stage is reused by the next run).
        """
        check_row_schema(rows)
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
        boxes = method.supervision == "box"
        train = b.imageset("train", masks=method.uses_masks, boxes=boxes)

        ctx.phase = "fit"
        with measure(self.device) as fit_cost:
            method.fit(train, ctx)
        # internal stages carry their original cost when reused; "fit" is this call's cost
        stage_costs: dict[str, dict[str, Any]] = {f"fit:{k}": v for k, v in ctx.costs.items()}
        fit_reused = bool(ctx.costs) and all(c.get("reused") for c in ctx.costs.values())
        stage_costs["fit"] = {**fit_cost.to_dict(), "reused": fit_reused}

        maps: dict[str, np.ndarray] = {}
        for part in ("train", "val", "test"):
            images = b.imageset(part, masks=method.uses_masks, boxes=boxes)
            ctx.phase = f"maps_{part}"
            # every split's maps share the (C, h, w) of the train maps
            like = maps["train"].shape[1:] if maps and len(images) else None
            maps[part], stage_costs[f"maps_{part}"] = compute_maps(
                method, images, ctx, run_dir / "maps" / f"{part}.npy", cfg.force, like
            )
        return maps, stage_costs

    def _execute(self, run: OpenRun, base: dict[str, Any]) -> list[dict[str, Any]]:
        """The stages of one run after :meth:`open_run` (see :mod:`benchmark.stages`); its rows."""
        cfg, b, ctx, method = self.cfg, self.bundle, run.ctx, run.method
        if b.multiclass:
            return self._execute_multiclass(run, base)
        maps, costs = self.fit_and_maps(method, ctx, run.run_dir)
        choice = stages.pick_threshold(cfg, method, b, maps)
        masks = stages.make_train_masks(
            cfg, b, method, maps["train"], choice.value, self.gt_rule, ctx.seed
        )
        preds, seg_costs = stages.segmenter_predictions(
            cfg, b, self.segmenter_config, ctx, run.run_dir, run.seg_key, masks.masks
        )
        ctx.phase = "evaluate"
        common = stages.common_columns(base, ctx.budget_hit, choice, len(masks.replaced))
        scored = stages.score_stages(b, maps, preds, choice, masks.used)
        rows, per_image = stages.quality_rows(scored, common)
        rows.extend(pxap_rows(maps, b.orig_masks, common))  # threshold-free score of the maps
        rows.extend(stages.cost_rows(common, {**costs, **seg_costs}))
        stages.write_run_outputs(self.out, cfg, base, run.seg_key, per_image, choice.curve)
        stages.save_qualitative(self.out, b, base, run.seg_key, maps["test"], preds, choice.value)
        return rows

    def _execute_multiclass(self, run: OpenRun, base: dict[str, Any]) -> list[dict[str, Any]]:
        """The stages of a run on a multi-class dataset (see :mod:`benchmark.multiclass`)."""
        cfg, b, ctx, method = self.cfg, self.bundle, run.ctx, run.method
        maps, costs = self.fit_and_maps(method, ctx, run.run_dir)
        choice = multiclass.pick_background(cfg, method, b, maps["val"], maps["train"])
        masks = multiclass.make_label_masks(cfg, b, method, maps["train"], choice.value)
        multiclass.check_labels(masks.pseudo, b.dataset.num_classes + 1)
        preds, seg_costs = multiclass.label_predictions(
            cfg, b, self.segmenter_config, ctx, run.run_dir, run.seg_key, masks.pseudo
        )
        ctx.phase = "evaluate"
        common = stages.common_columns(base, ctx.budget_hit, choice, len(masks.replaced))
        scored = multiclass.score_label_stages(b, maps, preds, choice, masks.used)
        rows = multiclass.label_rows(scored, common, b.class_names)
        rows.extend(stages.cost_rows(common, {**costs, **seg_costs}))
        per_image = multiclass.label_per_image(scored, b)
        stages.write_run_outputs(
            self.out, cfg, base, run.seg_key, per_image, choice.curve, multiclass.MULTICLASS
        )
        return rows

    def _unsupported(self, method: Method, base: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The one row of a method that cannot run on this dataset, or None if it can."""
        if not self.bundle.multiclass or method.multilabel:
            return None
        reason = f"{method.name} has no multi-label form yet (issue 17); not run"
        logger.warning("%s", reason)
        return [stages.status_row(base, "unsupported", reason, self.convention)]

    @property
    def convention(self) -> str:
        """The ``convention`` of this command's rows: the option, or ``multiclass``."""
        return multiclass.MULTICLASS if self.bundle.multiclass else self.cfg.convention


def run(cfg: RunConfig) -> pd.DataFrame:
    """Run everything a RunConfig asks for; returns all rows of this invocation."""
    runner = Runner(cfg)
    return runner.run_all()
