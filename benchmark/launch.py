"""Fan a ``run`` out as cluster jobs: one submitit job per (method, repetition), as a job array.

``python -m benchmark run ... --launcher slurm`` (or ``local``) runs every :class:`RunSpec` of
the run as one job of a submitit job array (:meth:`submitit.Executor.map_array`): ``slurm``
submits it with ``sbatch``, ``local`` runs the very same code path as subprocesses of this
machine (submitit's local executor; every job at once, or ``--jobs N`` at a time). Each job runs
:meth:`benchmark.runner.Runner.run_one` and stores its rows itself, exactly as the in-process
loop does, so a launched run's rows equal an in-process run's (the job columns ``launcher``,
``job_id`` and ``job_log`` aside). Launcher options never reach :class:`RunConfig`: they change
no run key and no row value.

Shared stages:
    The dataset (or the synthetic data), its split and the image cache are made here, in the
    submitting process, before the fan-out (:func:`benchmark.runner.prepare_data`); the jobs
    reopen them. A fit shared by several runs (``cam`` inside ``cam_affinitynet``, or the
    variants of a method that differ only in inference options, see
    :meth:`methods.base.Context.as_method` and :meth:`Runner.locate_fit`) lives in one stage
    folder, and every stage is computed under a file lock in that folder
    (``.NAME.pt.lock``, :func:`benchmark.cache.computing`: ``flock``, released when a job dies,
    NFS-safe enough for one cluster). We chose that lock over ordering the jobs in waves or
    Slurm dependencies: the jobs stay one flat array that runs at full width, a job that needs
    a fit another job is computing waits for it and then reuses it (so a shared fit is never
    computed twice at once), and a resubmission or a concurrent in-process run on the same
    folder is covered by the same rule. The cost: the waiting job holds its slot (and GPU)
    meanwhile.

At most N at once (``--jobs N``):
    ``slurm`` sets the array's parallelism (``#SBATCH --array=...%N``). ``local`` starts the
    first N jobs and each further one when a running job ends (so ``--no-wait`` is refused
    with it), and gives each job ``CPUs / N`` torch threads (unless ``OMP_NUM_THREADS`` is
    set). What it buys depends on the machine: on this project's 2-vCPU VM it buys little,
    because a one-thread job runs about 1.5x slower beside another than a two-thread process
    does alone (``run --methods all --seeds 1``, synthetic quick: 24.2 min with ``--jobs 2``
    against 26.4 min in process; the jobs' own wall times summed to 2,431 s against 1,586 s).
    Its use is a machine with more cores than one torch process keeps busy. A one-thread job
    does its floating point in another order than a two-thread process, and training
    amplifies that: in that run every pseudo-mask IoU was within 0.4 points of the in-process
    run's (cam 30.53 against 30.33) and every segmenter within 0.8 but rtc's (32.0 against
    34.8), all inside the seed-to-seed spread; a one-thread in-process run
    (``OMP_NUM_THREADS=1``) gives the same rows as the jobs.
    ``python -m benchmark run ... --jobs N`` (N > 1) without ``--launcher`` means ``local``.

Waiting and the report:
    The submitting process waits for every job, then returns the rows of this launch (the CLI
    prints the table and writes the report). ``--no-wait`` returns right after the submission;
    ``python -m benchmark report --out OUT`` builds the report later.

Faults:
    A job that is cancelled (``scancel``: SIGTERM, which submitit ignores, then SIGKILL after
    Slurm's ``KillWait``) or killed loses only the stage in flight: stages are written
    atomically with a completion marker, so running the same command again resumes from the
    completed stages. A job that times out or is preempted with submitit's signal (USR2) is
    checkpointed and requeued by submitit (:meth:`RunJob.checkpoint`: the same call again, which
    resumes the same way); a job preempted by plain SIGTERM is requeued by Slurm where the job is
    requeueable (``--sbatch-extra requeue``). A job that ends without storing its rows
    (killed, cancelled, crashed outside the runner) gets an ``error`` row written here, with its
    job id and log path in ``reason``, under a file of its own (:func:`error_rows_key`) that
    never replaces a run's completed rows and that the job removes when a later try of the same
    run stores its rows. A method that raises inside a job is recorded by the runner itself
    (status ``error``, its traceback file), with the job columns.

Logs, pickled calls and results of the jobs: ``OUT/launch/submitit/``. Nothing secret is passed
to a job: its arguments are the run config (which holds no credential) and the run spec.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark import cache as bcache
from benchmark.config import ConfigError, RunConfig, show
from benchmark.runner import Runner, RunSpec, prepare_data
from benchmark.store import (
    RUN_IDENTITY,
    now_iso,
    provenance,
    read_results,
    rows_path,
    write_rows,
)

logger = logging.getLogger(__name__)

LAUNCHERS = ("none", "local", "slurm")
#: submitit's folder (logs, pickled calls and results), relative to the run's ``--out``.
JOB_FOLDER = Path("launch") / "submitit"
#: Job time limit (minutes) when neither ``--timeout-min`` nor ``--budget-minutes`` is given.
DEFAULT_TIMEOUT_MIN = 120
#: Minutes added to ``--budget-minutes`` for the default time limit (segmenter, evaluation).
TIMEOUT_MARGIN_MIN = 30
#: Seconds between two looks at the jobs' states while waiting.
POLL_S = 2.0
#: ``--sbatch-extra`` keys that submitit sets itself (changing them breaks its logs or array).
RESERVED_SBATCH = ("array", "error", "output", "open-mode", "wrap")
_SBATCH_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class LaunchOptions:
    """How a run is launched (never part of a run's identity, key or rows).

    Attributes:
        launcher: ``none`` (in-process loop), ``local`` (submitit local executor) or ``slurm``.
        partition: Slurm partition (``--slurm-partition``).
        timeout_min: job time limit in minutes (``None``: :func:`default_timeout`).
        gpus_per_job: GPUs per job (``None``: none requested).
        cpus_per_job: CPUs per job (``None``: the cluster's default).
        mem_gb: memory per job in GB (``None``: the cluster's default).
        account: Slurm account (``--slurm-account``).
        sbatch_extra: extra ``#SBATCH`` flags, ``key -> value`` (``True``: a bare flag).
        wait: wait for the jobs (``False``: ``--no-wait``).
        jobs: at most this many jobs at once (``None``: every job at once; see the module).
    """

    launcher: str = "none"
    partition: str | None = None
    timeout_min: int | None = None
    gpus_per_job: int | None = None
    cpus_per_job: int | None = None
    mem_gb: float | None = None
    account: str | None = None
    sbatch_extra: dict[str, str | bool] = field(default_factory=dict)
    wait: bool = True
    jobs: int | None = None

    def validate(self) -> LaunchOptions:
        """Check every value; raise ConfigError naming the first bad option (one line)."""
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher: {show(self.launcher)} is not one of {LAUNCHERS}")
        _positive_int("--jobs", self.jobs)
        given = [name for name, value in self._cluster_values().items() if value is not None]
        if not self.wait:
            given.append("--no-wait")
        if self.launcher == "none" and given:
            raise ConfigError(f"{given[0]}: only with --launcher local or slurm")
        if self.launcher == "local" and self.jobs and not self.wait:
            raise ConfigError("--no-wait: not with --jobs on --launcher local (this process "
                              "starts each job when an earlier one ends)")  # fmt: skip
        _positive_int("--timeout-min", self.timeout_min)
        _positive_int("--gpus-per-job", self.gpus_per_job)
        _positive_int("--cpus-per-job", self.cpus_per_job)
        if self.mem_gb is not None:
            value = self.mem_gb
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"--mem-gb: expected a number, got {show(value)}")
            if not math.isfinite(value) or value <= 0:
                raise ConfigError(f"--mem-gb: must be a positive number of GB, got {value}")
        for name, text in (
            ("--slurm-partition", self.partition),
            ("--slurm-account", self.account),
        ):
            if text is not None and (not text or not re.fullmatch(r"[\w.,+-]+", text)):
                raise ConfigError(f"{name}: expected a Slurm name, got {show(text)}")
        return self

    def _cluster_values(self) -> dict[str, Any]:
        return {
            "--slurm-partition": self.partition,
            "--timeout-min": self.timeout_min,
            "--gpus-per-job": self.gpus_per_job,
            "--cpus-per-job": self.cpus_per_job,
            "--mem-gb": self.mem_gb,
            "--slurm-account": self.account,
            "--sbatch-extra": self.sbatch_extra or None,
            "--jobs": self.jobs if self.jobs != 1 else None,
        }

    def job_threads(self) -> int | None:
        """Torch threads of each local job under ``--jobs N``: this machine's CPUs / N."""
        if self.launcher != "local" or not self.jobs:
            return None
        return max(1, len(os.sched_getaffinity(0)) // self.jobs)

    def executor_parameters(self, cfg: RunConfig) -> dict[str, Any]:
        """The submitit parameters (``slurm_*`` ones are ignored by the local executor)."""
        params: dict[str, Any] = {
            "name": f"wsss-{cfg.dataset}-{cfg.preset}",
            "timeout_min": self.timeout_min or default_timeout(cfg),
        }
        optional = {
            "gpus_per_node": self.gpus_per_job,
            "cpus_per_task": self.cpus_per_job,
            "mem_gb": self.mem_gb,
            "slurm_partition": self.partition,
            "slurm_account": self.account,
            "slurm_additional_parameters": dict(self.sbatch_extra) or None,
            "slurm_array_parallelism": self.jobs,
        }
        params.update({k: v for k, v in optional.items() if v is not None})
        return params


def _positive_int(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}: expected an integer, got {show(value)}")
    if value < 1:
        raise ConfigError(f"{name}: must be a positive integer, got {value}")


def parse_sbatch_extra(items: Sequence[str] | None) -> dict[str, str | bool]:
    """``--sbatch-extra KEY=VALUE`` items (``KEY`` alone: a bare flag) as a dict.

    Raises:
        ConfigError: a malformed key, a control character in a value, a key given twice, or a
            key submitit sets itself (:data:`RESERVED_SBATCH`).
    """
    out: dict[str, str | bool] = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        key = key.strip().lstrip("-")
        if not _SBATCH_KEY.match(key):
            raise ConfigError(
                f"--sbatch-extra: expected KEY=VALUE (e.g. qos=high), got {show(item)}"
            )
        norm = key.replace("_", "-")
        if norm in RESERVED_SBATCH:
            raise ConfigError(f"--sbatch-extra: {key!r} is set by submitit itself; leave it out")
        if any(ord(ch) < 32 for ch in value):
            raise ConfigError(f"--sbatch-extra: control character in the value of {key!r}")
        if norm in out:
            raise ConfigError(f"--sbatch-extra: {key!r} is given twice")
        out[norm] = value if sep else True
    return out


def default_timeout(cfg: RunConfig) -> int:
    """The job time limit: the run's budget plus a margin, at least :data:`DEFAULT_TIMEOUT_MIN`."""
    if cfg.budget_minutes is None:
        return DEFAULT_TIMEOUT_MIN
    return max(DEFAULT_TIMEOUT_MIN, math.ceil(cfg.budget_minutes + TIMEOUT_MARGIN_MIN))


def error_rows_key(cfg: RunConfig, spec: RunSpec) -> str:
    """The rows-file key of the launcher's error row of ``spec`` (one file per run of a config).

    Keyed by what defines the run's result (not ``out``, ``force`` or ``report``), so that the
    same command submitted again finds, and its successful job removes, an earlier try's row.
    Options left at their defaults are left out, so a config field added later (with a
    default) does not change the key.
    """
    defaults = {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(RunConfig)
    }
    identity = {
        k: v
        for k, v in cfg.to_dict().items()
        if k not in ("out", "force", "report") and v != defaults.get(k, dataclasses.MISSING)
    }
    digest = bcache.stable_hash({"config": identity, "method": spec.method_spec}, 12)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.method_spec)[:40]
    return f"launch-{name}-r{spec.repetition}-{digest}"


# ---- what a job runs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class RunJob:
    """The callable every job of the array runs: one RunSpec of a run config.

    Pickled by submitit; it holds the run config as a plain dict (no credential in it).

    Attributes:
        config: :meth:`RunConfig.to_dict` of the run.
        launcher: ``local`` or ``slurm`` (stored in the rows).
        threads: torch threads of the job (``None``: Slurm's CPUs or torch's default).
    """

    config: dict[str, Any]
    launcher: str
    threads: int | None = None

    def __call__(self, spec: RunSpec) -> list[dict[str, Any]]:
        """Run ``spec`` (cached stages reused), store its rows and return them."""
        import submitit

        _job_logging()
        _job_threads(self.threads)
        cfg = RunConfig(**self.config).validate()
        env = submitit.JobEnvironment()
        extra = {"launcher": self.launcher, "job_id": env.job_id, "job_log": str(env.paths.stderr)}
        logger.info("job %s: %s repetition %d", env.job_id, spec.method_spec, spec.repetition)
        runner = Runner(cfg, prepare_data(cfg))
        rows = runner.run_one(spec, extra=extra)
        clear_error_rows(cfg, spec)  # an earlier try's launcher error row is now stale
        return rows

    def checkpoint(self, spec: RunSpec) -> Any:
        """On timeout or preemption (USR2): requeue the same call; completed stages are reused."""
        import submitit

        logger.warning("requeued: %s repetition %d resumes from its stages", spec.method_spec,
                       spec.repetition)  # fmt: skip
        return submitit.helpers.DelayedSubmission(self, spec)


def _job_logging() -> None:
    """INFO logging to the job's stderr log."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("PIL", "matplotlib", "fontTools", "optuna", "timm", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _job_threads(threads: int | None = None) -> None:
    """Use ``threads``, else the CPUs Slurm gave the job (unless OMP_NUM_THREADS is set)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if threads is None and cpus and cpus.isdigit():
        threads = int(cpus)
    if threads and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(threads)


def clear_error_rows(cfg: RunConfig, spec: RunSpec) -> None:
    """Remove the launcher's error row of ``spec`` (a later try stored the run's own rows)."""
    path = rows_path(cfg.out, error_rows_key(cfg, spec))
    try:
        path.unlink()
        logger.info("removed %s: this try stored the run's rows", path)
    except FileNotFoundError:
        pass


# ---- submitting and waiting ---------------------------------------------------------------------
@dataclass
class Launch:
    """A submitted run: its jobs and, once waited for, its rows.

    Attributes:
        specs: the run specs, in job order.
        jobs: the submitit jobs (one per spec).
        folder: submitit's folder (logs).
        rows: every row of this launch (``None`` until waited for).
        failed: ids of the jobs that ended without a result.
        start_next: submits the next spec's job (``--jobs`` on ``local``: the specs after the
            first N are started by :func:`wait`); ``None``: every job is submitted.
    """

    specs: list[RunSpec]
    jobs: list[Any]
    folder: Path
    rows: pd.DataFrame | None = None
    failed: list[str] = field(default_factory=list)
    start_next: Callable[[], Any] | None = None

    @property
    def job_ids(self) -> list[str]:
        """The jobs' ids (Slurm: ``ARRAY_INDEX``; local: process ids)."""
        return [str(job.job_id) for job in self.jobs]


def submit(cfg: RunConfig, options: LaunchOptions, executor: Any = None) -> Launch:
    """Prepare the shared data here, then submit one job per (method, repetition).

    Under ``--jobs N`` on ``local`` only the first N are submitted here; :func:`wait` starts
    each further one when a job ends.

    Args:
        cfg: the validated run config.
        options: the validated launch options (``launcher`` local or slurm).
        executor: the submitit executor (``None``: submitit's, for ``options.launcher``).

    Returns:
        The :class:`Launch` (jobs submitted, not waited for).
    """
    import submitit

    bundle = prepare_data(cfg)  # data, split and image cache once, before the fan-out
    # the submitting node may have no GPU: it only lists the specs (the device is the jobs')
    specs = Runner(dataclasses.replace(cfg, device="cpu"), bundle).specs()
    folder = Path(cfg.out) / JOB_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    executor = executor or submitit.AutoExecutor(folder=folder, cluster=options.launcher)
    executor.update_parameters(**options.executor_parameters(cfg))
    job = RunJob(cfg.to_dict(), options.launcher, options.job_threads())
    window = options.jobs if options.launcher == "local" and options.jobs else len(specs)
    jobs = executor.map_array(job, specs[:window]) if specs else []
    logger.info("submitted %d of %d %s jobs: %s", len(jobs), len(specs), options.launcher,
                _id_range(jobs))  # fmt: skip
    launch = Launch(specs, jobs, folder)
    record = _write_record(cfg, options, launch)
    if len(jobs) < len(specs):

        def start_next() -> Any:
            nxt = executor.submit(job, specs[len(launch.jobs)])
            launch.jobs.append(nxt)
            _write_record(cfg, options, launch, record)
            return nxt

        launch.start_next = start_next
    return launch


def _id_range(jobs: Sequence[Any]) -> str:
    ids = [str(j.job_id) for j in jobs]
    return ", ".join(ids) if len(ids) <= 4 else f"{ids[0]} ... {ids[-1]}"


def _write_record(
    cfg: RunConfig, options: LaunchOptions, launch: Launch, path: Path | None = None
) -> Path:
    """``OUT/launch/<date>-<first job>.json``: what was submitted (for ``--no-wait``).

    ``path``: rewrite that record (a job started later under ``--jobs``).
    """
    record = {
        "date": now_iso(),
        "launcher": options.launcher,
        "jobs": [
            {
                "job_id": str(j.job_id),
                "method": s.method_spec,
                "repetition": s.repetition,
                "log": str(j.paths.stderr),
            }
            for j, s in zip(launch.jobs, launch.specs)
        ],
        "report": report_command(cfg),
    }
    first = re.sub(r"[^\w.-]", "_", launch.job_ids[0]) if launch.jobs else "none"
    path = path or Path(cfg.out) / "launch" / f"{now_iso().replace(':', '')}-{first}.json"
    bcache.atomic_write_text(path, json.dumps(record, indent=1))
    return path


def report_command(cfg: RunConfig) -> str:
    """The command that builds the report from the stored rows."""
    return f"python -m benchmark report --out {cfg.out}"


def wait(cfg: RunConfig, launch: Launch) -> pd.DataFrame:
    """Wait for every job; store an error row for each job that ended without its rows.

    Returns:
        The rows of every job (those the jobs returned, and the error rows written here).
    """
    frames: list[pd.DataFrame] = []
    dead: list[tuple[Any, RunSpec, BaseException]] = []
    pending = dict(enumerate(launch.jobs))
    try:
        while pending:
            for i, job in list(pending.items()):
                if not job.done():
                    continue
                del pending[i]
                spec = launch.specs[i]
                try:
                    frames.append(pd.DataFrame(job.result()))
                    logger.info("job %s (%s r%d) done", job.job_id, spec.method_spec,
                                spec.repetition)  # fmt: skip
                except Exception as exc:  # noqa: BLE001 - a dead job is a row, not a crash
                    logger.error("job %s (%s r%d) failed: %s", job.job_id, spec.method_spec,
                                 spec.repetition, _why(job, exc))  # fmt: skip
                    dead.append((job, spec, exc))
                if launch.start_next is not None and len(launch.jobs) < len(launch.specs):
                    index = len(launch.jobs)
                    pending[index] = launch.start_next()
            if pending:
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        ids = ", ".join(str(j.job_id) for j in pending.values())
        logger.warning("stopped waiting; jobs %s go on. Report later: %s", ids,
                       report_command(cfg))  # fmt: skip
        if len(launch.jobs) < len(launch.specs):
            logger.warning(
                "%d runs were not started: the same command again runs them (and "
                "reuses every completed stage)",
                len(launch.specs) - len(launch.jobs),
            )
        raise
    launch.failed = [str(job.job_id) for job, _, _ in dead]
    frames.extend(pd.DataFrame(rows) for rows in _dead_job_rows(cfg, dead))
    launch.rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return launch.rows


def _dead_job_rows(
    cfg: RunConfig, dead: list[tuple[Any, RunSpec, BaseException]]
) -> list[list[dict[str, Any]]]:
    """Error rows of the dead jobs that stored no rows (written; the stored ones read back)."""
    if not dead:
        return []
    stored = read_results(cfg.out)
    runner = Runner(dataclasses.replace(cfg, device="cpu"), prepare_data(cfg))
    out = []
    for job, spec, exc in dead:
        mine = stored[stored["job_id"] == str(job.job_id)] if "job_id" in stored else stored[:0]
        if len(mine):  # the runner stored the run's rows before the job died
            out.append(mine.to_dict("records"))
            continue
        rows = [error_row(cfg, runner, spec, job, exc)]
        write_rows(Path(cfg.out), error_rows_key(cfg, spec), rows)
        out.append(rows)
    return out


def error_row(
    cfg: RunConfig, runner: Runner, spec: RunSpec, job: Any, exc: BaseException
) -> dict[str, Any]:
    """The ``error`` row of a job that ended without storing its rows.

    Shaped like the runner's error row, with every identity column; the data, split and
    segmenter ones are left empty (None) on purpose, so that it never supersedes (in
    :func:`benchmark.store.latest_runs`) completed rows an earlier run of the same experiment
    stored.

    Args:
        cfg: the run config.
        runner: a runner of ``cfg`` (for the run's seed).
        spec: the job's run spec.
        job: the submitit job.
        exc: what ``job.result()`` raised.
    """
    from methods import create_method

    method = create_method(spec.method_spec, preset=cfg.preset)
    seed, _ = runner.locate_fit(method, spec.repetition)
    log = str(job.paths.stderr)
    launcher = "slurm" if "Slurm" in type(job).__name__ else "local"
    reason = (
        f"{launcher} job {job.job_id} ended without storing its rows ({_why(job, exc)}); "
        f"log: {log}; completed stages are kept: run the same command again to resume"
    )
    row = {
        "method": method.name,
        "method_id": method.identity(),
        "kind": method.kind,
        "preset": cfg.preset,
        "params": json.dumps(method.params(), sort_keys=True, default=str),
        "dataset": cfg.dataset,
        "split_scheme": cfg.split,
        "repetition": spec.repetition,
        "seed": seed,
        "gt_ratio": cfg.gt_ratio,
        "budget_minutes": cfg.budget_minutes,
        "date": now_iso(),
        **{f"v_{k}": v for k, v in provenance().items()},
        "run_key": error_rows_key(cfg, spec),
        "status": "error",
        "reason": reason[:1000],
        "traceback": log,
        "stage": "run",
        "split": "",
        "convention": cfg.convention,
        "aggregation": "",
        "metric": "status",
        "value": float("nan"),
        "threshold": float("nan"),
        "launcher": launcher,
        "job_id": str(job.job_id),
        "job_log": log,
    }
    return {**{c: None for c in RUN_IDENTITY}, **row}  # every identity column, unknown: None


def _why(job: Any, exc: BaseException) -> str:
    """Why a job has no result: its exception's last ``...Error: ...`` line, or its state."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if "has not produced any output" not in " ".join(lines[:2]):  # it raised: the error line
        errors = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit)\b", ln)]
        return (errors[-1] if errors else lines[0] if lines else type(exc).__name__)[:300]
    try:
        state = str(job.state)
    except Exception:  # noqa: BLE001 - the scheduler may not answer any more
        state = "UNKNOWN"
    if state in ("FINISHED", "UNKNOWN", "NO PROCESS AND NO RESULT"):  # local: the process died
        return "killed, no result"
    return f"state {state}"


def launch_run(cfg: RunConfig, options: LaunchOptions) -> Launch:
    """Submit a run as jobs and, unless ``options.wait`` is off, wait for them.

    Args:
        cfg: the validated run config.
        options: the validated launch options.

    Returns:
        The :class:`Launch` (with ``rows`` once waited for).
    """
    launch = submit(cfg, options)
    if options.wait:
        wait(cfg, launch)
    return launch
