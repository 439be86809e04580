"""The objectives of the three kinds of study: threshold, gt_ratio grid points, hparams.

``threshold`` studies are optimised in memory (:func:`benchmark.threshold.search_threshold` on
one-pass sweep counts of the cached validation maps) and their trials then copied into the
storage (:func:`sweep_threshold`). ``gt_ratio`` and ``hparams`` studies run one trial per call
of their objective (:class:`GtRatioObjective`, :class:`HparamsObjective`), on any worker. Every
objective computes through the runner's public pipeline (:class:`benchmark.runner.Runner`:
``open_run``, ``fit_and_maps``, ``run_one``) and writes ordinary result rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.config import ConfigError, RunConfig, mask_url
from benchmark.evaluate import METRICS, SweepCounts
from benchmark.identity import run_label
from benchmark.multiclass import MULTICLASS
from benchmark.runner import DataBundle, OpenRun, Runner, RunSpec
from benchmark.store import check_row_schema, write_curve, write_rows
from benchmark.sweeps.storage import (
    SweepSpec,
    create_study,
    export_trials,
    open_storage,
    study_slug,
)
from benchmark.threshold import (
    COARSE_STEP,
    THRESHOLD_BINS,
    ThresholdResult,
    search_threshold,
    sweep_counts,
)
from methods import create_method
from methods.base import format_spec, parse_spec

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD_TRIALS = 200
DUPLICATE_WAIT_S = 900.0  # how long a duplicate waits for the earlier trial of its grid point


# ---- the threshold -------------------------------------------------------------------------------
def sweep_threshold(
    cfg: RunConfig,
    n_trials: int = DEFAULT_THRESHOLD_TRIALS,
    n_bins: int = THRESHOLD_BINS,
    storage_url: str | None = None,
    study_prefix: str | None = None,
    sampler_seed: int = 0,
    runner: Runner | None = None,
) -> pd.DataFrame:
    """``sweep threshold``: one study per (method, repetition); rows, CSV exports, a summary.

    Args:
        cfg: the run configuration (methods, seeds, dataset, preset, out, convention).
        n_trials: trials per study.
        n_bins: the threshold grid (``1000``: 1,001 thresholds).
        storage_url: the Optuna storage (``None``: the run folder's journal).
        study_prefix: study names are ``<prefix>-<method>-rep<r>`` (default
            ``threshold-<dataset>-<preset>``).
        sampler_seed: TPE seed.
        runner: a Runner to reuse (tests).

    Returns:
        One summary row per study: chosen threshold, validation and test IoU, the exhaustive
        best over all ``n_bins + 1`` thresholds, trials and seconds.
    """
    runner = runner or Runner(cfg)
    storage, url = open_storage(storage_url, cfg.out)
    prefix = study_prefix or f"threshold-{cfg.dataset}-{cfg.preset}"
    summary = []
    for spec in runner.specs():
        run = runner.open_run(spec)
        name = f"{prefix}-{run.method.identity()}-rep{spec.repetition}"
        try:
            maps, _ = runner.fit_and_maps(run.method, run.ctx, run.run_dir)
        except Exception as exc:  # noqa: BLE001 - one failing method never stops the others
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            logger.error("threshold study %s: the method failed: %s", name, reason)
            summary.append({"study": name, "method_id": run.base["method_id"], "error": reason})
            continue
        study = ThresholdStudy(cfg, runner, run, spec, name, n_trials, n_bins, sampler_seed)
        summary.append(study.execute(maps, storage))
    logger.info("threshold studies stored in %s", mask_url(url))
    return pd.DataFrame(summary)


@dataclasses.dataclass
class ThresholdStudy:
    """One threshold study of :func:`sweep_threshold`: search, persist, rows, curve, export."""

    cfg: RunConfig
    runner: Runner
    run: OpenRun
    spec: RunSpec
    name: str
    n_trials: int
    n_bins: int
    sampler_seed: int

    def execute(self, maps: dict[str, Any], storage: Any) -> dict[str, Any]:
        """Search the threshold on the validation maps, store everything; the summary row."""
        cfg, run, spec, name, n_bins = self.cfg, self.run, self.spec, self.name, self.n_bins
        b, conv = self.runner.bundle, cfg.convention
        t0 = time.perf_counter()
        val = sweep_counts(maps["val"], b.orig_masks("val", conv), conv, n_bins)
        count_s = time.perf_counter() - t0
        result = search_threshold(val, self.n_trials, seed=self.sampler_seed)
        exhaustive_t, exhaustive_v = val.best("iou")
        test = sweep_counts(maps["test"], b.orig_masks("test", conv), conv, n_bins)
        at_test = test.at(result.threshold)
        at_val = val.at(result.threshold)
        info = {
            "study": name,
            "method_id": run.base["method_id"],
            "repetition": spec.repetition,
            "threshold": result.threshold,
            "val_iou": result.value,
            "test_iou": at_test["iou"],
            "exhaustive_threshold": exhaustive_t,
            "exhaustive_val_iou": exhaustive_v,
            "match": abs(result.threshold - exhaustive_t) <= COARSE_STEP + 1e-9,
            "exact": result.threshold == exhaustive_t,
            "iou_gap": exhaustive_v - result.value,
            "trials": result.n_trials,
            "search_s": result.seconds,
            "counts_s": count_s,
            "fixed_threshold": run.method.fixed_threshold,
        }
        t1 = time.perf_counter()
        study = self._persist(storage, result, info)
        info["persist_s"] = time.perf_counter() - t1
        rows = self._rows(result, {"val": at_val, "test": at_test}, count_s)
        check_row_schema(rows)
        write_rows(Path(cfg.out), study_slug(name), rows)
        self._write_curve(val)
        export_trials(study, cfg.out)
        logger.info(
            "threshold study %s: t=%.3f (val IoU %.4f, test IoU %.4f; exhaustive over %d: "
            "t=%.3f, %.4f) in %d trials, %.3f s search + %.3f s counts",
            name,
            result.threshold,
            result.value,
            at_test["iou"],
            n_bins + 1,
            exhaustive_t,
            exhaustive_v,
            result.n_trials,
            result.seconds,
            count_s,
        )
        return info

    def _persist(self, storage: Any, result: ThresholdResult, info: dict[str, Any]) -> Any:
        """Create (or resume) the stored study and copy the evaluated trials into it."""
        cfg = self.cfg
        sweep_spec = SweepSpec(
            kind="threshold",
            config={**cfg.to_dict(), "out": str(Path(cfg.out).resolve())},
            methods=[self.spec.method_spec],
            repetitions=[self.spec.repetition],
            n_trials=self.n_trials,
            n_bins=self.n_bins,
            sampler_seed=self.sampler_seed,
        )
        study = create_study(sweep_spec, storage, self.name)
        if not study.trials:  # copy the evaluated trials (resumed studies keep theirs)
            study.add_trials(result.trials)
        for key in ("threshold", "val_iou", "test_iou", "exhaustive_threshold", "match"):
            study.set_user_attr(key, info[key])
        return study

    def _rows(
        self, result: ThresholdResult, at: dict[str, dict[str, float]], count_s: float
    ) -> list[dict[str, Any]]:
        """The study's rows: one per trial, the metrics at the chosen threshold, its cost."""
        common = {
            **self.run.base,
            "status": "done",
            "reason": "",
            "convention": self.cfg.convention,
            "threshold_source": "optuna",
            "study": self.name,
            "sweep": "threshold",
            "n_gt_replaced": 0,
        }
        rows = [
            {
                **common,
                "stage": "threshold_sweep",
                "split": "val",
                "aggregation": "trial",
                "metric": "iou",
                "value": float(t.value),
                "threshold": float(t.params["threshold"]),
                "trial": number,
            }
            for number, t in enumerate(result.trials)
            if t.value is not None
        ]
        for part in ("val", "test"):
            rows += [
                {
                    **common,
                    "stage": "threshold_sweep",
                    "split": part,
                    "aggregation": "dataset",
                    "metric": m,
                    "value": float(at[part][m]),
                    "threshold": result.threshold,
                    "trial": result.trial,
                }
                for m in METRICS
            ]
        rows.append(
            {
                **common,
                "stage": "threshold_sweep",
                "split": "",
                "convention": "",
                "aggregation": "cost",
                "metric": "wall_s",
                "value": count_s + result.seconds,
                "threshold": result.threshold,
                "trial": result.trial,
            }
        )
        return rows

    def _write_curve(self, val: SweepCounts) -> None:
        """The validation IoU-vs-threshold curve of the study (``results/sweep_curves``)."""
        curve = pd.DataFrame({"threshold": val.thresholds, **{m: val.metric(m) for m in METRICS}})
        curve.insert(0, "method_id", self.run.base["method_id"])
        curve.insert(1, "seed", self.run.seed)
        curve.insert(2, "convention", self.cfg.convention)
        write_curve(Path(self.cfg.out), study_slug(self.name), curve, folder="sweep_curves")


# ---- objectives of persistent studies ------------------------------------------------------------
def point_key(study: str, params: dict[str, Any]) -> str:
    """The result-file key of one grid point of a study (unique per study and point)."""
    text = json.dumps(params, sort_keys=True, default=str)
    digest = hashlib.sha256(f"{study}|{text}".encode()).hexdigest()[:12]
    return f"{study_slug(study)}-{digest}"


def _same_point(trial: Any, other: Any) -> bool:
    """Whether two trials are on the same grid point (by grid id, else by complete params)."""
    a, b = trial.system_attrs.get("grid_id"), other.system_attrs.get("grid_id")
    if a is not None and a == b:
        return True
    return bool(other.params) and other.params == trial.params


def resolve_duplicate(trial: Any, wait_s: float = DUPLICATE_WAIT_S) -> float | None:
    """The value of an earlier trial of this trial's grid point, or ``None`` to compute it.

    An earlier complete trial gives its value at once; an earlier running one is waited for (up
    to ``wait_s``). The trial is then marked with the user attribute ``duplicate_of``.
    """
    import optuna

    state = optuna.trial.TrialState
    deadline = time.monotonic() + wait_s
    logged = False
    while True:
        trials = trial.study.get_trials(deepcopy=False)
        me = next(t for t in trials if t.number == trial.number)
        earlier = [
            t
            for t in trials
            if t.number < trial.number
            and t.state in (state.COMPLETE, state.RUNNING)
            and _same_point(me, t)
        ]
        done = [t for t in earlier if t.state == state.COMPLETE]
        if done:
            trial.set_user_attr("duplicate_of", done[0].number)
            logger.warning(
                "trial %d repeats grid point %s of trial %d: duplicate, not recomputed",
                trial.number,
                trial.params,
                done[0].number,
            )
            return float(done[0].value)
        if not earlier or time.monotonic() > deadline:
            return None
        if not logged:
            logger.info(
                "trial %d: grid point %s is running as trial %d; waiting for it",
                trial.number,
                trial.params,
                earlier[0].number,
            )
            logged = True
        time.sleep(0.5)


class _Objective:
    """What every trial objective holds: the sweep spec, its study and the run config."""

    def __init__(self, spec: SweepSpec, study_name: str, out: str | Path | None = None) -> None:
        self.spec = spec
        self.study_name = study_name
        self.cfg = spec.run_config(out)
        self.bundle: DataBundle | None = None


class GtRatioObjective(_Objective):
    """Train the shared segmenter for one (method, repetition, gt_ratio) grid point."""

    def __call__(self, trial: Any) -> float:
        """Run the trial; returns the segmenter's test IoU (dataset level, run convention)."""
        s = self.spec
        params = {
            "method": trial.suggest_categorical("method", s.methods),
            "repetition": trial.suggest_categorical("repetition", s.repetitions),
            "gt_ratio": trial.suggest_categorical("gt_ratio", s.ratios),
        }
        value = resolve_duplicate(trial)
        if value is not None:
            return value
        cfg = dataclasses.replace(self.cfg, gt_ratio=float(params["gt_ratio"]))
        runner = Runner(cfg, bundle=self.bundle, gt_rule=s.gt_rule)
        self.bundle = runner.bundle
        extra: dict[str, Any] = {
            "study": self.study_name,
            "trial": trial.number,
            "sweep": "gt_ratio",
            "gt_rule": s.gt_rule,
        }
        if s.gt_rule != "subset":
            identity = run_label(create_method(params["method"], preset=cfg.preset), cfg)
            extra["method_id"] = f"{identity}|gt={s.gt_rule}"
        key = point_key(self.study_name, params)
        trial.set_user_attr("rows_key", key)
        rows = runner.run_one(RunSpec(params["method"], int(params["repetition"])), extra, key)
        return _segmenter_iou(rows, cfg.convention)


def _segmenter_iou(rows: list[dict[str, Any]], convention: str) -> float:
    """The segmenter's dataset-level test IoU (binary) or mIoU (a multi-class dataset)."""
    for r in rows:
        if r.get("status") == "error":
            raise RuntimeError(f"the run failed: {r.get('reason')}")
    wanted = {(convention, "iou"), (MULTICLASS, "miou")}
    for r in rows:
        if (r["stage"], r["split"], r["aggregation"]) == ("segmenter", "test", "dataset") and (
            r["convention"],
            r["metric"],
        ) in wanted:
            return float(r["value"])
    raise RuntimeError("the run wrote no segmenter test IoU (or mIoU) row")


class HparamsObjective(_Objective):
    """Fit one configuration of a method; the value is its maps' validation IoU."""

    def __call__(self, trial: Any) -> float:
        """Fit, sweep the validation threshold, report (prune), then train the segmenter."""
        import optuna

        cfg, base_spec = self.cfg, self.spec.methods[0]
        name, overrides = parse_spec(base_spec)
        space = create_method(base_spec, preset=cfg.preset).search_space(trial)
        method_spec = format_spec(name, {**overrides, **space})
        repetition = self.spec.repetitions[0]
        runner = Runner(cfg, bundle=self.bundle)
        self.bundle = runner.bundle
        if runner.bundle.multiclass:
            raise ValueError(
                f"the hparams sweep scores binary maps; {cfg.dataset} is multi-class (use "
                "`run` with method specs, or the gt_ratio sweep, which scores mIoU there)"
            )
        extra = {"study": self.study_name, "trial": trial.number, "sweep": "hparams"}
        key = f"{study_slug(self.study_name)}-t{trial.number:05d}"
        trial.set_user_attr("method_spec", method_spec)
        run = runner.open_run(RunSpec(method_spec, repetition))
        try:
            maps, _ = runner.fit_and_maps(run.method, run.ctx, run.run_dir)
            conv = cfg.convention
            counts = sweep_counts(maps["val"], runner.bundle.orig_masks("val", conv), conv)
            chosen = search_threshold(counts)
        except Exception as exc:
            _status_row(cfg, {**run.base, **extra}, key, "error", f"{type(exc).__name__}: {exc}")
            raise
        trial.set_user_attr("threshold", chosen.threshold)
        trial.report(chosen.value, step=0)
        if trial.should_prune():
            reason = f"pruned by MedianPruner after the map stage (val IoU {chosen.value:.4f})"
            _status_row(cfg, {**run.base, **extra}, key, "pruned", reason, chosen.value)
            raise optuna.TrialPruned(reason)
        rows = runner.run_one(RunSpec(method_spec, repetition), extra, key)
        if any(r.get("status") == "error" for r in rows):
            raise RuntimeError(f"the run failed: {rows[0].get('reason')}")
        return chosen.value


def _status_row(
    cfg: RunConfig,
    base: dict[str, Any],
    key: str,
    status: str,
    reason: str,
    value: float = float("nan"),
) -> None:
    """One ``stage="run"`` row recording a pruned or failed trial."""
    row = {
        **base,
        "status": status,
        "reason": reason.splitlines()[0][:500] if reason else "",
        "stage": "run",
        "split": "val",
        "convention": cfg.convention,
        "aggregation": "",
        "metric": "val_iou",
        "value": float(value),
        "threshold": float("nan"),
    }
    check_row_schema([row])
    write_rows(Path(cfg.out), key, [row])


def make_objective(
    spec: SweepSpec, study_name: str, out: str | Path | None = None
) -> Callable[[Any], float]:
    """The objective of a stored study (``gt_ratio`` or ``hparams``)."""
    if spec.kind == "gt_ratio":
        return GtRatioObjective(spec, study_name, out)
    if spec.kind == "hparams":
        return HparamsObjective(spec, study_name, out)
    raise ConfigError(f"no trial objective for {spec.kind!r} studies")
