"""Optuna sweeps: the threshold, the gt_ratio grid and method hyperparameters, on many workers.

Three kinds of study; Optuna stays inside this module (methods only expose
:meth:`methods.base.Method.search_space`).

``threshold`` (one study per method x dataset x repetition)
    The objective is the validation IoU at threshold ``t`` of the method's cached maps (the
    runner's fit and map stages, reused from the cache). The validation maps are swept once with
    the one-pass histogram (:func:`benchmark.runner.sweep_counts`, ``n_bins=1000``: 1,001
    thresholds); a trial looks its ``t`` up in those counts, so it costs microseconds.
    :func:`search_threshold` orders the trials: the coarse grid (every 0.01) first, then the fine
    neighbours of the 3 best coarse thresholds, then TPE (seeded) until ``n_trials``. The
    chosen ``t`` is the best evaluated one (ties: the lowest, as :meth:`SweepCounts.best`); its
    test IoU is read from the test maps' counts. ``python -m benchmark run`` chooses its
    threshold with the same function (:func:`benchmark.runner.choose_threshold`), at the run's
    0.01 grid where the coarse grid is the whole grid, so ``run`` evaluates every threshold.
    The study is optimised in memory and its trials are then copied into the storage (the file
    or database write per trial would cost more than the trial). Measured on this 2-core machine
    under load: 200 trials in 0.13-0.26 s per (method, seed) (about 1,000 trials/s), the copy into
    the journal file 0.75-0.8 s (one fsync per trial); the chosen threshold equalled the
    exhaustive best over 1,001 thresholds for every tiny method/seed and 60 random noisy curves.

``gt_ratio`` (one grid study: method x repetition x ratio, Optuna's ``GridSampler``)
    Ratio ``r`` replaces the pseudo masks of a fixed, seeded, nested subset of ``round(r * n)``
    train images by their GT masks (:func:`benchmark.runner.gt_subset`); each trial trains the
    shared segmenter (fit and maps are cached and shared by every ratio). The trial's value is the
    segmenter's test IoU (a grid optimises nothing; the value is the table's number). Option
    ``gt_rule="weaktr_batch"``: the WeakTR-Refinery repository's rule, :class:`PerBatchGTMasks`:
    in every training batch of ``b`` images, ``max(1, int(r * b))`` images (redrawn each batch)
    use their GT mask. With its batch of 8, ``int(0.1 * 8) = 0`` and ``int(0.2 * 8) = 1`` both
    give one GT image per batch, and the same seed draws the same images: that is why its 10 %
    and 20 % rows are identical. Here ``r = 0`` means no GT at all under both rules. Rows of this
    rule carry ``gt_rule`` and a ``method_id`` suffixed ``|gt=weaktr_batch``, so tables keep the
    two rules apart.

``hparams`` (one study per method, TPE with a seeded sampler)
    The search space is the method's ``search_space(trial)``. The objective is the validation
    IoU of the method's maps at their validation-chosen threshold. Methods cannot report a
    validation IoU per epoch (the contract forbids them to compute metrics and has no per-epoch
    hook), so pruning happens once per trial: the value is reported after the map stage and a
    ``MedianPruner`` stops a trial below the median of earlier trials *before* the shared
    segmenter is trained (a pruned trial writes one ``status="pruned"`` row).

Every trial writes ordinary result rows through :mod:`benchmark.store`, with the columns
``study``, ``trial`` and ``sweep``, so reports need no special case. Each study's trials are
exported to ``OUT/studies/<study>.csv`` (read by :func:`reports.figures.optuna_figures`).

Storage: by default Optuna's journal file ``OUT/studies/optuna.journal`` (safe for several local
processes; SQLite is not safe with parallel writers). ``--storage URL`` takes any SQLAlchemy URL
(``postgresql://user:password@host/db``); ``journal:PATH`` names another journal file. Storage
URLs are logged with the password masked (:func:`mask_url`). A study's user attribute ``wsss``
holds everything a worker needs to rebuild its objective (kind, run config with the output
folder, methods, repetitions, ratios, rule, trial count), so ``python -m benchmark worker
--storage URL --study NAME`` joins any study. ``--launcher slurm`` submits such workers with
submitit (``--launcher local``: the same code path on this machine, submitit's local executor).

Duplicates: with several workers, Optuna's ``GridSampler`` gives a grid point whose trial is
still running to a worker that finds no unvisited point (and retried or enqueued trials can repeat
points). A trial whose grid point already has an earlier complete or running trial is a
*duplicate*: it does not compute, it waits for the earlier trial (up to ``DUPLICATE_WAIT_S``) and
returns its value, and is marked with the user attribute ``duplicate_of`` (column ``duplicate``
in the CSV export). If the earlier trial failed or never finishes, the duplicate computes the
point itself. Result rows of a grid point are written under one key per (study, grid point), so
even two trials that computed the same point at once leave one set of rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from benchmark.config import ConfigError, RunConfig, mask_url, redact
from benchmark.evaluate import METRICS, SweepCounts
from benchmark.store import read_results, write_rows

logger = logging.getLogger(__name__)

KINDS = ("threshold", "gt_ratio", "hparams")
GT_RULES = ("subset", "weaktr_batch")
LAUNCHERS = ("none", "local", "slurm")
THRESHOLD_BINS = 1000  # 1,001 thresholds i / 1000 for the threshold sweep
COARSE_STEP = 0.01  # the coarse grid search_threshold evaluates first
FINE_PEAKS = 3  # coarse thresholds whose fine neighbourhoods are evaluated next
DEFAULT_THRESHOLD_TRIALS = 200
DUPLICATE_WAIT_S = 900.0  # how long a duplicate waits for the earlier trial of its grid point
JOURNAL_NAME = "optuna.journal"
ATTR = "wsss"  # the study user attribute holding the SweepSpec


# ---- storage ------------------------------------------------------------------------------------
def default_storage_url(out: str | Path) -> str:
    """The journal file of a run folder, as a storage URL (``journal:<absolute path>``)."""
    return f"journal:{(Path(out) / 'studies' / JOURNAL_NAME).resolve()}"


def open_storage(url: str | None, out: str | Path) -> tuple[Any, str]:
    """An Optuna storage from a URL; ``None`` is the run folder's journal file.

    Args:
        url: ``None``, ``journal:PATH``, a path ending in ``.journal``/``.log``, or an
            SQLAlchemy URL (``postgresql://...``, ``sqlite:///...``).
        out: the run folder (for the default journal).

    Returns:
        ``(storage, url)``: the storage object and the URL that names it for workers.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend

    url = url or default_storage_url(out)
    path: Path | None = None
    if url.startswith("journal:"):
        path = Path(url[len("journal:") :])
    elif "://" not in url and Path(url).suffix in (".journal", ".log"):
        path = Path(url)
    if path is not None:
        path = path.resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("Optuna storage: journal file %s", path)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path))), f"journal:{path}"
    if "://" not in url:
        raise ConfigError(f"--storage: {url!r} is neither journal:PATH nor an SQLAlchemy URL")
    logger.info("Optuna storage: %s", mask_url(url))
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # a worker that dies leaves a RUNNING trial; after the grace period it is failed
            # and retried once (its grid point or parameters, on another worker)
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=60,
                grace_period=180,
                heartbeat_stale_trial_callback=retry,
            )
    except Exception as exc:  # noqa: BLE001 - a driver's message may quote parts of the URL
        reason = redact(f"{type(exc).__name__}: {exc}".splitlines()[0], url)[:300]
        raise ConfigError(f"--storage: cannot open {mask_url(url)}: {reason}") from None
    return storage, url


# ---- what a study is -----------------------------------------------------------------------------
@dataclass
class SweepSpec:
    """Everything a worker needs to rebuild a study's objective (stored as a user attribute).

    Attributes:
        kind: ``threshold`` | ``gt_ratio`` | ``hparams``.
        config: the RunConfig fields (``out`` absolute).
        methods: method specs (the grid's methods, or the one method of the study).
        repetitions: repetition indices.
        ratios: the gt_ratio grid (``gt_ratio`` studies).
        gt_rule: ``subset`` | ``weaktr_batch``.
        n_trials: trials of the study (``None``: until the grid is exhausted).
        n_bins: threshold grid resolution (``threshold`` studies).
        sampler_seed: seed of the sampler (workers add their index).
    """

    kind: str
    config: dict[str, Any]
    methods: list[str]
    repetitions: list[int] = field(default_factory=lambda: [0])
    ratios: list[float] = field(default_factory=list)
    gt_rule: str = "subset"
    n_trials: int | None = None
    n_bins: int = THRESHOLD_BINS
    sampler_seed: int = 0

    def run_config(self, out: str | Path | None = None) -> RunConfig:
        """The RunConfig of the study (``out`` overrides the stored output folder)."""
        values = dict(self.config)
        if out is not None:
            values["out"] = str(out)
        return RunConfig(**values).validate()

    def grid(self) -> dict[str, list[Any]] | None:
        """The grid of a ``gt_ratio`` study; ``None`` for the others."""
        if self.kind != "gt_ratio":
            return None
        return {"method": self.methods, "repetition": self.repetitions, "gt_ratio": self.ratios}

    def to_json(self) -> str:
        """The spec as JSON (the study's user attribute)."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str) -> SweepSpec:
        """Parse :meth:`to_json`."""
        return cls(**json.loads(text))


def make_sampler(spec: SweepSpec, worker_index: int = 0) -> Any:
    """GridSampler for grid studies, a seeded TPESampler otherwise.

    Every worker of a grid study must use the SAME seed: GridSampler numbers the grid points in
    a seeded shuffle, and a trial records only that number (``grid_id``), so workers with
    different seeds would evaluate different points under one number and lose some (measured:
    one of five points lost with seeds 0 and 1). TPE workers add their index to the seed so
    that their random start-up proposals differ.
    """
    import optuna

    grid = spec.grid()
    if grid is not None:
        return optuna.samplers.GridSampler(grid, seed=spec.sampler_seed)
    return optuna.samplers.TPESampler(seed=spec.sampler_seed + worker_index)


def make_pruner(spec: SweepSpec) -> Any:
    """A MedianPruner for ``hparams`` studies (one report per trial, see the module doc)."""
    import optuna

    if spec.kind == "hparams":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def create_study(spec: SweepSpec, storage: Any, name: str) -> Any:
    """Create (or resume) a study holding ``spec``.

    Raises:
        ConfigError: a study of that name exists with a different kind or grid.
    """
    import optuna

    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    stored = study.user_attrs.get(ATTR)
    if stored is not None:
        old = SweepSpec.from_json(stored)
        if (old.kind, old.grid(), old.methods) != (spec.kind, spec.grid(), spec.methods):
            raise ConfigError(
                f"--study: study {name!r} exists with another sweep ({old.kind}, grid "
                f"{old.grid()}); choose another --study name"
            )
        logger.info("resuming study %s (%d trials so far)", name, len(study.trials))
    study.set_user_attr(ATTR, spec.to_json())
    return study


def load_study(storage: Any, name: str, worker_index: int = 0) -> tuple[Any, SweepSpec]:
    """Load a study made by :func:`create_study` with its sampler and pruner.

    Raises:
        ConfigError: no such study, or it was not made by this harness.
    """
    import optuna

    try:
        plain = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = optuna.study.get_all_study_names(storage)
        raise ConfigError(f"--study: no study {name!r} in the storage; found {names}") from None
    if ATTR not in plain.user_attrs:
        raise ConfigError(f"--study: study {name!r} was not created by `benchmark sweep`")
    spec = SweepSpec.from_json(plain.user_attrs[ATTR])
    study = optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(spec, worker_index),
        pruner=make_pruner(spec),
    )
    return study, spec


def study_slug(name: str) -> str:
    """A file-name-safe form of a study name."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "study"


def export_trials(study: Any, out: str | Path) -> Path:
    """Write the study's trials to ``OUT/studies/<study>.csv`` (with ``duplicate``) atomically."""
    from benchmark.cache import atomic_write_bytes

    frame = study.trials_dataframe()
    if not frame.empty:
        frame.insert(0, "study", study.study_name)
        frame["direction"] = "maximize"
        dup = frame.get("user_attrs_duplicate_of")
        frame["duplicate"] = dup.notna() if dup is not None else False
        params = [c for c in frame.columns if c.startswith("params_")]
        done = frame["state"].astype(str).eq("COMPLETE")
        if params and done.any():  # two complete trials of one point without the user attr
            again = frame[done].duplicated(subset=params, keep="first")
            frame.loc[again[again].index, "duplicate"] = True
    path = Path(out) / "studies" / f"{study_slug(study.study_name)}.csv"
    atomic_write_bytes(path, frame.to_csv(index=False).encode())
    return path


# ---- the threshold -------------------------------------------------------------------------------
@dataclass
class ThresholdResult:
    """The outcome of :func:`search_threshold`.

    Attributes:
        threshold: the chosen threshold (best evaluated value; ties: lowest threshold).
        value: the metric at it.
        trial: the number of the trial that evaluated it first.
        n_trials: trials evaluated.
        seconds: wall time of the search (the counts excluded).
        trials: the trials with the grid threshold each one evaluated (``params["threshold"]``
            on the grid; user attributes ``phase`` and, for TPE trials, ``proposed``), ready for
            ``Study.add_trials``.
        study: the in-memory Optuna study (continuous ``threshold``: TPE's proposals).
    """

    threshold: float
    value: float
    trial: int
    n_trials: int
    seconds: float
    trials: list[Any]
    study: Any


def search_threshold(
    counts: SweepCounts,
    n_trials: int | None = None,
    metric: str = "iou",
    seed: int = 0,
    coarse_step: float = COARSE_STEP,
) -> ThresholdResult:
    """Choose a threshold with an in-memory Optuna study on precomputed sweep counts.

    Trials, in order: every threshold of the coarse grid (multiples of ``coarse_step``); the fine
    thresholds within one coarse step of the ``FINE_PEAKS`` best coarse thresholds; then TPE
    (seeded) until ``n_trials``.
    TPE works on a continuous ``threshold`` (3x cheaper per proposal than a stepped one) and each
    proposal is evaluated at the nearest grid threshold, which :attr:`ThresholdResult.trials`
    record. With ``n_trials=None`` the TPE phase is skipped. When the counts' grid is not finer
    than ``coarse_step`` every threshold is evaluated, which is exactly :meth:`SweepCounts.best`.

    Args:
        counts: one-pass sweep counts of the validation maps.
        n_trials: total trials (at least the coarse grid and the neighbours are evaluated).
        metric: the objective, one of :data:`benchmark.evaluate.METRICS`.
        seed: TPE seed.
        coarse_step: spacing of the first phase.

    Returns:
        The chosen threshold, the evaluated trials and the study.

    Raises:
        ValueError: the metric is undefined (NaN) at every threshold.
    """
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    started = time.perf_counter()
    values = counts.metric(metric)
    if np.all(np.isnan(values)):
        raise ValueError(f"{metric} is undefined (NaN) at every threshold")
    n_bins = len(counts.thresholds) - 1
    grid_dist = FloatDistribution(0.0, 1.0, step=1.0 / n_bins)
    cont = FloatDistribution(0.0, 1.0)
    step = max(1, int(round(coarse_step * n_bins)))
    evaluated: list[tuple[int, str, float | None]] = []  # (grid index, phase, proposal)

    def trial_at(i: int, dist: FloatDistribution, attrs: dict[str, Any] | None = None) -> Any:
        """A finished trial at grid index ``i`` (FAIL where the metric is undefined)."""
        v = values[i]
        state, value = (TrialState.FAIL, None) if np.isnan(v) else (TrialState.COMPLETE, float(v))
        return create_trial(
            params={"threshold": i / n_bins},
            distributions={"threshold": dist},
            value=value,
            state=state,
            user_attrs=attrs,
        )

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)
        )
        seen: set[int] = set()

        def add(indices: Sequence[int], phase: str) -> None:
            trials = []
            for i in indices:
                if i in seen:
                    continue
                seen.add(i)
                evaluated.append((i, phase, None))
                trials.append(trial_at(i, cont))
            study.add_trials(trials)

        coarse = list(range(0, n_bins + 1, step))
        if coarse[-1] != n_bins:
            coarse.append(n_bins)
        add(coarse, "coarse")
        # near-ties between distant peaks are common on small validation sets: refine around
        # the best FINE_PEAKS coarse thresholds, best first
        coarse_vals = np.where(np.isnan(values[coarse]), -np.inf, values[coarse])
        for k in np.argsort(-coarse_vals, kind="stable")[:FINE_PEAKS]:
            c = coarse[int(k)]
            add([i for i in range(c - step + 1, c + step) if 0 <= i <= n_bins], "fine")
        for _ in range(max(0, (n_trials or 0) - len(study.trials))):
            trial = study.ask({"threshold": cont})
            proposed = float(trial.params["threshold"])
            i = int(round(proposed * n_bins))
            seen.add(i)
            evaluated.append((i, "tpe", proposed))
            done = trial_at(i, cont)
            study.tell(trial, done.value, state=done.state)
    finally:
        optuna.logging.set_verbosity(verbosity)
    best = _best_index(values, sorted(seen))
    if np.isnan(values[best]):
        raise ValueError(f"{metric} is undefined (NaN) at every evaluated threshold")
    first = next(n for n, (i, _, _) in enumerate(evaluated) if i == best)
    trials = []
    for i, phase, proposed in evaluated:
        attrs: dict[str, Any] = {"phase": phase}
        if proposed is not None:
            attrs["proposed"] = proposed
        trials.append(trial_at(i, grid_dist, attrs))
    return ThresholdResult(
        threshold=float(counts.thresholds[best]),
        value=float(values[best]),
        trial=first,
        n_trials=len(evaluated),
        seconds=time.perf_counter() - started,
        trials=trials,
        study=study,
    )


def _best_index(values: np.ndarray, indices: Sequence[int]) -> int:
    """The index of the largest non-NaN value among ``indices`` (ties: the lowest index)."""
    idx = np.asarray(sorted(indices), dtype=np.int64)
    vals = values[idx]
    vals = np.where(np.isnan(vals), -np.inf, vals)
    return int(idx[int(np.argmax(vals))])


def sweep_threshold(
    cfg: RunConfig,
    n_trials: int = DEFAULT_THRESHOLD_TRIALS,
    n_bins: int = THRESHOLD_BINS,
    storage_url: str | None = None,
    study_prefix: str | None = None,
    sampler_seed: int = 0,
    runner: Any | None = None,
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
    from benchmark.runner import Runner, sweep_counts

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
            summary.append({"study": name, "method_id": run.method.identity(), "error": reason})
            continue
        b, conv = runner.bundle, cfg.convention
        t0 = time.perf_counter()
        val = sweep_counts(maps["val"], b.orig_masks("val", conv), conv, n_bins)
        count_s = time.perf_counter() - t0
        result = search_threshold(val, n_trials, seed=sampler_seed)
        exhaustive_t, exhaustive_v = val.best("iou")
        test = sweep_counts(maps["test"], b.orig_masks("test", conv), conv, n_bins)
        at_test = test.at(result.threshold)
        at_val = val.at(result.threshold)
        info = {
            "study": name,
            "method_id": run.method.identity(),
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
        sweep_spec = SweepSpec(
            kind="threshold",
            config={**cfg.to_dict(), "out": str(Path(cfg.out).resolve())},
            methods=[spec.method_spec],
            repetitions=[spec.repetition],
            n_trials=n_trials,
            n_bins=n_bins,
            sampler_seed=sampler_seed,
        )
        t1 = time.perf_counter()
        study = create_study(sweep_spec, storage, name)
        if not study.trials:  # copy the evaluated trials (resumed studies keep theirs)
            study.add_trials(result.trials)
        for key in ("threshold", "val_iou", "test_iou", "exhaustive_threshold", "match"):
            study.set_user_attr(key, info[key])
        info["persist_s"] = time.perf_counter() - t1
        common = {
            **run.base,
            "status": "done",
            "reason": "",
            "convention": conv,
            "threshold_source": "optuna",
            "study": name,
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
        for part, at in (("val", at_val), ("test", at_test)):
            rows += [
                {
                    **common,
                    "stage": "threshold_sweep",
                    "split": part,
                    "aggregation": "dataset",
                    "metric": m,
                    "value": float(at[m]),
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
        write_rows(Path(cfg.out), study_slug(name), rows)
        curve = pd.DataFrame({"threshold": val.thresholds, **{m: val.metric(m) for m in METRICS}})
        curve.insert(0, "method_id", run.method.identity())
        curve.insert(1, "seed", run.seed)
        curve.insert(2, "convention", conv)
        from benchmark.cache import atomic_write_bytes

        curve_path = Path(cfg.out) / "results" / "sweep_curves" / f"{study_slug(name)}.parquet"
        atomic_write_bytes(curve_path, curve.to_parquet(index=False))
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
        summary.append(info)
    logger.info("threshold studies stored in %s", mask_url(url))
    return pd.DataFrame(summary)


# ---- the WeakTR-Refinery per-batch rule ----------------------------------------------------------
def n_gt_per_batch(ratio: float, batch: int) -> int:
    """GT images per batch under the WeakTR-Refinery rule: ``max(1, int(ratio * batch))``.

    ``ratio = 0`` gives 0 (no GT); the result never exceeds ``batch``.
    """
    if ratio <= 0 or batch <= 0:
        return 0
    return min(batch, max(1, int(ratio * batch)))


class PerBatchGTMasks:
    """Pseudo masks whose batches get ``max(1, int(r * b))`` GT masks, redrawn every batch.

    The WeakTR-Refinery repository's mixed supervision: the training loop indexes this object
    with each batch's indices (``masks[idx]``, as :func:`train_segmenter` does); each call draws
    (seeded) which images of the batch use their GT mask. :attr:`draws` records the count per
    batch.

    Args:
        pseudo: (N, H, W) uint8 pseudo masks.
        gt: (N, H, W) uint8 GT masks (0, 1, 255).
        ratio: the GT ratio ``r``.
        seed: seed of the draws.
    """

    def __init__(self, pseudo: np.ndarray, gt: np.ndarray, ratio: float, seed: int) -> None:
        if pseudo.shape != gt.shape:
            raise ValueError(f"pseudo masks {pseudo.shape} and GT {gt.shape} differ")
        self.pseudo, self.gt, self.ratio = pseudo, gt, float(ratio)
        self.shape, self.dtype = pseudo.shape, pseudo.dtype
        self.rng = np.random.default_rng(seed)
        self.draws: list[int] = []

    def __len__(self) -> int:
        return len(self.pseudo)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(len(self))[index]
        idx = np.atleast_1d(np.asarray(index, dtype=np.int64))
        out = np.array(self.pseudo[idx])  # (b, H, W) copy
        k = n_gt_per_batch(self.ratio, len(idx))
        if k:
            pick = np.sort(self.rng.choice(len(idx), size=k, replace=False))
            out[pick] = np.asarray(self.gt)[idx[pick]]
        self.draws.append(k)
        return out if np.ndim(index) else out[0]


def gt_rule_masks(
    rule: str, pseudo: np.ndarray, gt: np.ndarray, ratio: float, seed: int
) -> np.ndarray | PerBatchGTMasks:
    """The masks the segmenter trains on under a GT rule (``subset``: ``pseudo`` as it is).

    Raises:
        ValueError: unknown rule.
    """
    if rule == "subset":
        return pseudo
    if rule == "weaktr_batch":
        return PerBatchGTMasks(pseudo, gt, ratio, seed)
    raise ValueError(f"unknown gt rule {rule!r}; valid: {', '.join(GT_RULES)}")


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
        self.bundle: Any = None


class GtRatioObjective(_Objective):
    """Train the shared segmenter for one (method, repetition, gt_ratio) grid point."""

    def __call__(self, trial: Any) -> float:
        """Run the trial; returns the segmenter's test IoU (dataset level, run convention)."""
        from benchmark.runner import Runner, RunSpec
        from methods import create_method

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
            identity = create_method(params["method"], preset=cfg.preset).identity()
            extra["method_id"] = f"{identity}|gt={s.gt_rule}"
        key = point_key(self.study_name, params)
        trial.set_user_attr("rows_key", key)
        rows = runner.run_one(RunSpec(params["method"], int(params["repetition"])), extra, key)
        return _segmenter_iou(rows, cfg.convention)


def _segmenter_iou(rows: list[dict[str, Any]], convention: str) -> float:
    for r in rows:
        if r.get("status") == "error":
            raise RuntimeError(f"the run failed: {r.get('reason')}")
    for r in rows:
        if (r["stage"], r["split"], r["convention"], r["aggregation"], r["metric"]) == (
            "segmenter",
            "test",
            convention,
            "dataset",
            "iou",
        ):
            return float(r["value"])
    raise RuntimeError("the run wrote no segmenter test IoU row")


def format_spec(name: str, params: dict[str, Any]) -> str:
    """``name[k=v,...]`` with values that parse back exactly (floats as ``repr``)."""
    if not params:
        return name
    inner = ",".join(f"{k}={_spec_value(v)}" for k, v in sorted(params.items()))
    return f"{name}[{inner}]"


def _spec_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(_spec_value(v) for v in value) + ")"
    return str(value)


class HparamsObjective(_Objective):
    """Fit one configuration of a method; the value is its maps' validation IoU."""

    def __call__(self, trial: Any) -> float:
        """Fit, sweep the validation threshold, report (prune), then train the segmenter."""
        import optuna

        from benchmark.runner import Runner, RunSpec, sweep_counts
        from methods import create_method
        from methods.base import parse_spec

        cfg, base_spec = self.cfg, self.spec.methods[0]
        name, overrides = parse_spec(base_spec)
        space = create_method(base_spec, preset=cfg.preset).search_space(trial)
        method_spec = format_spec(name, {**overrides, **space})
        repetition = self.spec.repetitions[0]
        runner = Runner(cfg, bundle=self.bundle)
        self.bundle = runner.bundle
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


# ---- running trials: in this process, as a worker, through submitit ------------------------------
def run_trials(
    study: Any, spec: SweepSpec, out: str | Path | None = None, n_trials: int | None = None
) -> int:
    """Run trials of ``study`` in this process until it is done; returns how many ran here.

    A grid study stops when every point is evaluated; a TPE study when ``spec.n_trials`` trials
    are complete or pruned (counted over every worker), or after ``n_trials`` trials here.
    """
    import optuna

    state = optuna.trial.TrialState
    if spec.kind == "threshold":
        logger.info(
            "study %s is a threshold study: `sweep threshold` runs all its trials in one process "
            "(each costs microseconds); nothing for a worker to do",
            study.study_name,
        )
        return 0
    queued = study.get_trials(deepcopy=False, states=(state.WAITING,))
    grid = isinstance(study.sampler, optuna.samplers.GridSampler)
    if grid and not queued and study.sampler.is_exhausted(study):
        logger.info("study %s: every grid point is evaluated; nothing to do", study.study_name)
        return 0
    callbacks = []
    if spec.n_trials:
        # failed trials do not count towards n_trials: cap this worker so that a method that
        # always fails cannot loop forever
        n_trials = n_trials or 2 * spec.n_trials
        callbacks.append(
            optuna.study.MaxTrialsCallback(spec.n_trials, states=(state.COMPLETE, state.PRUNED))
        )
        done = len(study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED)))
        if done >= spec.n_trials:
            return 0
    objective = make_objective(spec, study.study_name, out)
    before = {t.number for t in study.get_trials(deepcopy=False)}
    study.optimize(objective, n_trials=n_trials, callbacks=callbacks, catch=(Exception,))
    if grid and n_trials is None:  # safety net: a grid point with no trial at all is re-queued
        missing = missing_points(study, spec)
        if missing:
            logger.warning("study %s: %d grid points never ran; queueing them", study.study_name,
                           len(missing))  # fmt: skip
            for params in missing:  # one at a time: GridSampler stops the loop after each
                study.enqueue_trial(params, skip_if_exists=True)
                study.optimize(objective, n_trials=1, catch=(Exception,))
    mine = [t for t in study.get_trials(deepcopy=False) if t.number not in before]
    return len(mine)


def missing_points(study: Any, spec: SweepSpec) -> list[dict[str, Any]]:
    """Grid points of a grid study that no trial (in any state but WAITING) has evaluated."""
    import itertools

    grid = spec.grid() or {}
    names = sorted(grid)
    have = {
        tuple(t.params.get(n) for n in names)
        for t in study.get_trials(deepcopy=False)
        if t.state.name != "WAITING" and t.params
    }
    return [
        dict(zip(names, point))
        for point in itertools.product(*(grid[n] for n in names))
        if point not in have
    ]


def run_worker(
    storage_url: str,
    study_name: str,
    worker_index: int = 0,
    out: str | None = None,
    n_trials: int | None = None,
) -> int:
    """A worker: join a stored study and run its trials (``python -m benchmark worker``).

    Returns:
        The number of trials this worker ran (a rough count: trials created while it ran).
    """
    storage, _ = open_storage(storage_url, out or ".")
    study, spec = load_study(storage, study_name, worker_index)
    logger.info("worker %d joins study %s (%s)", worker_index, study_name, spec.kind)
    n = run_trials(study, spec, out, n_trials)
    export_trials(study, out or spec.config["out"])
    return n


def _submitit_worker(storage_url: str, study_name: str, worker_index: int, out: str | None) -> int:
    """The function submitit runs in each job (logging set up there, then :func:`run_worker`)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("optuna").setLevel(logging.WARNING)
    return run_worker(storage_url, study_name, worker_index, out)


def launch_workers(
    storage_url: str,
    study_name: str,
    workers: int,
    launcher: str,
    folder: str | Path,
    out: str | None = None,
    slurm: dict[str, Any] | None = None,
    wait: bool = True,
) -> list[Any]:
    """Submit ``workers`` worker jobs with submitit (``slurm``, or ``local`` subprocesses).

    Args:
        storage_url: the study's storage (passed to each job; the job folder is user-only).
        study_name: the study.
        workers: number of jobs.
        launcher: ``slurm`` or ``local`` (submitit's local executor: the same code path).
        folder: submitit's job folder (logs, pickled calls).
        out: output-folder override for the workers.
        slurm: executor parameters (``timeout_min``, ``slurm_partition``, ``gpus_per_node``...).
        wait: wait for the jobs and return their results (else the jobs).

    Returns:
        Each job's trial count (``wait``) or the submitit jobs.
    """
    import submitit

    if launcher not in ("local", "slurm"):
        raise ConfigError(f"--launcher: {launcher!r} is not one of local, slurm")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)  # the pickled calls hold the storage URL
    executor = submitit.AutoExecutor(folder=folder, cluster=launcher)
    params = {"timeout_min": 60, **(slurm or {})}
    executor.update_parameters(name=f"wsss-{study_slug(study_name)}", **params)
    jobs = [
        executor.submit(_submitit_worker, storage_url, study_name, i, out) for i in range(workers)
    ]
    logger.info(
        "submitted %d %s workers for study %s (storage %s)",
        workers,
        launcher,
        study_name,
        mask_url(storage_url),
    )
    if not wait:
        return jobs
    return [job.result() for job in jobs]


# ---- the sweeps the CLI starts -------------------------------------------------------------------
def start_study(
    spec: SweepSpec,
    study_name: str,
    storage_url: str | None = None,
    launcher: str = "none",
    workers: int = 1,
    slurm: dict[str, Any] | None = None,
) -> tuple[Any, str]:
    """Create (or resume) a study, then run it here or through submitted workers.

    Returns:
        ``(study, storage_url)`` once the trials are done.
    """
    from benchmark.runner import prepare_data

    cfg = spec.run_config()
    storage, url = open_storage(storage_url, cfg.out)
    study = create_study(spec, storage, study_name)
    prepare_data(cfg)  # data and image cache once, before workers read them
    if launcher == "none":
        run_trials(study, spec)
    else:
        folder = Path(cfg.out) / "studies" / "submitit"
        counts = launch_workers(url, study_name, workers, launcher, folder, slurm=slurm)
        logger.info("workers ran %s trials", counts)
    export_trials(study, cfg.out)
    return study, url


def gt_ratio_spec(
    cfg: RunConfig, ratios: Sequence[float], gt_rule: str = "subset", sampler_seed: int = 0
) -> SweepSpec:
    """The SweepSpec of a gt_ratio grid over the config's methods and repetitions.

    Raises:
        ConfigError: a ratio outside [0, 1], no ratio, or an unknown rule.
    """
    from benchmark.runner import expand_methods

    if not ratios:
        raise ConfigError("--ratios: give at least one ratio")
    for r in ratios:
        if not 0.0 <= r <= 1.0 or math.isnan(r):
            raise ConfigError(f"--ratios: {r} is outside [0, 1]")
    if gt_rule not in GT_RULES:
        raise ConfigError(f"--gt-rule: {gt_rule!r} is not one of {', '.join(GT_RULES)}")
    return SweepSpec(
        kind="gt_ratio",
        config={**cfg.to_dict(), "out": str(Path(cfg.out).resolve())},
        methods=expand_methods(cfg.methods),
        repetitions=list(range(cfg.seeds)),
        ratios=sorted({float(r) for r in ratios}),
        gt_rule=gt_rule,
        sampler_seed=sampler_seed,
    )


def hparams_spec(
    cfg: RunConfig, method: str, n_trials: int, repetition: int = 0, sampler_seed: int = 0
) -> SweepSpec:
    """The SweepSpec of a TPE study over one method's ``search_space``.

    Raises:
        ConfigError: unknown method, no search space, or fewer than one trial.
    """
    from benchmark.runner import expand_methods
    from methods import create_method
    from methods.base import Method

    specs = expand_methods([method])
    if len(specs) != 1:
        raise ConfigError(f"--method: give one method, got {specs}")
    spec = specs[0]
    if n_trials < 1:
        raise ConfigError(f"--trials: must be >= 1, got {n_trials}")
    method_cls = type(create_method(spec, preset=cfg.preset))
    if method_cls.search_space is Method.search_space:
        raise ConfigError(f"--method: {spec} declares no search_space(trial); nothing to tune")
    return SweepSpec(
        kind="hparams",
        config={**cfg.to_dict(), "out": str(Path(cfg.out).resolve())},
        methods=[spec],
        repetitions=[repetition],
        n_trials=n_trials,
        sampler_seed=sampler_seed,
    )


def study_rows(out: str | Path, study: str) -> pd.DataFrame:
    """The stored result rows of one study."""
    rows = read_results(out)
    if rows.empty or "study" not in rows:
        return pd.DataFrame()
    return rows[rows["study"] == study]


def gt_ratio_table(rows: pd.DataFrame, convention: str = "pet") -> pd.DataFrame:
    """Segmenter test IoU and pseudo-mask IoU by method and gt_ratio (mean over repetitions)."""
    if rows.empty:
        return pd.DataFrame()
    sel = rows[
        (rows["convention"] == convention)
        & (rows["aggregation"] == "dataset")
        & (rows["metric"] == "iou")
        & (rows["stage"].isin(["segmenter", "pseudo"]))
    ]
    table = sel.pivot_table(
        index=["method_id", "gt_ratio"], columns="stage", values="value", aggfunc="mean"
    )
    return table.rename(columns={"segmenter": "segmenter_test_iou", "pseudo": "pseudo_train_iou"})
