"""Optuna storages and studies: storage URLs, the sweep spec a study holds, trials exports.

Storage: by default Optuna's journal file ``OUT/studies/optuna.journal`` (safe for several local
processes; SQLite is not safe with parallel writers). ``--storage URL`` takes any SQLAlchemy URL
(``postgresql://user:password@host/db``); ``journal:PATH`` names another journal file. Storage
URLs are logged with the password masked (:func:`benchmark.config.mask_url`). A study's user
attribute ``wsss`` (:data:`ATTR`) holds its :class:`SweepSpec`: everything a worker needs to
rebuild its objective.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.cache import atomic_write_bytes
from benchmark.config import ConfigError, RunConfig, mask_url, redact
from benchmark.store import read_results
from benchmark.threshold import THRESHOLD_BINS

logger = logging.getLogger(__name__)

KINDS = ("threshold", "gt_ratio", "hparams")
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


# ---- the rows of a study ------------------------------------------------------------------------
def study_rows(out: str | Path, study: str) -> pd.DataFrame:
    """The stored result rows of one study."""
    rows = read_results(out)
    if rows.empty or "study" not in rows:
        return pd.DataFrame()
    return rows[rows["study"] == study]


def gt_ratio_table(rows: pd.DataFrame, convention: str = "pet") -> pd.DataFrame:
    """Segmenter test IoU and pseudo-mask IoU by method and gt_ratio (mean over repetitions).

    On a multi-class dataset the values are the dataset-level mIoU (rows ``multiclass``).
    """
    if rows.empty:
        return pd.DataFrame()
    binary = (rows["convention"] == convention) & (rows["metric"] == "iou")
    multi = (rows["convention"] == "multiclass") & (rows["metric"] == "miou")
    sel = rows[
        (binary | multi)
        & (rows["aggregation"] == "dataset")
        & (rows["stage"].isin(["segmenter", "pseudo"]))
    ]
    table = sel.pivot_table(
        index=["method_id", "gt_ratio"], columns="stage", values="value", aggfunc="mean"
    )
    return table.rename(columns={"segmenter": "segmenter_test_iou", "pseudo": "pseudo_train_iou"})
