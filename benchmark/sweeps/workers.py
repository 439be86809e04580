"""Running trials: in this process, as workers joining a stored study, through submitit.

``python -m benchmark worker --storage URL --study NAME`` joins any study (:func:`run_worker`);
``--launcher slurm`` submits such workers with submitit (``--launcher local``: the same code
path on this machine, submitit's local executor). :func:`start_study` is what ``python -m
benchmark sweep gt-ratio|hparams`` runs, with the sweep specs :func:`gt_ratio_spec` and
:func:`hparams_spec` build.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmark.config import ConfigError, RunConfig, mask_url
from benchmark.runner import expand_methods, prepare_data
from benchmark.supervision import GT_RULES
from benchmark.sweeps.objectives import make_objective
from benchmark.sweeps.storage import (
    SweepSpec,
    create_study,
    export_trials,
    load_study,
    open_storage,
    study_slug,
)
from methods import create_method
from methods.base import Method

logger = logging.getLogger(__name__)

LAUNCHERS = ("none", "local", "slurm")


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
