"""``run --jobs N``: at most N runs at once (local jobs started as earlier ones end).

Unit tests with a stand-in executor (no subprocess): the window never holds more than N live
jobs, every spec is run once, each local job gets CPUs / N torch threads, and the options are
checked before any work. The real local executor under ``--jobs 2`` is run by
``tests/test_slurm.py::test_local_launcher_rows_equal_in_process`` (marked ``cluster``).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("submitit")

from benchmark import launch  # noqa: E402
from benchmark.cli import _launch_options, build_parser, main  # noqa: E402
from benchmark.config import RunConfig  # noqa: E402

TINY = ["--preset", "tiny", "--device", "cpu", "--no-report"]


class _Job:
    """A job that reports done on its third look."""

    def __init__(self, executor: _Executor, spec: Any) -> None:
        self.executor, self.spec, self.looks = executor, spec, 0
        self.job_id = str(len(executor.jobs))
        self.paths = SimpleNamespace(stderr=Path(f"/nowhere/{self.job_id}.err"))

    def done(self) -> bool:
        self.looks += 1
        return self.looks >= 3

    def result(self) -> list[dict[str, Any]]:
        return [{"method": self.spec.method_spec, "repetition": self.spec.repetition}]


class _Executor:
    """Records what is submitted and how many submitted jobs were not done at that moment."""

    def __init__(self) -> None:
        self.jobs: list[_Job] = []
        self.live_at_submit: list[int] = []
        self.params: dict[str, Any] = {}
        self.fn: Any = None

    def update_parameters(self, **params: Any) -> None:
        self.params.update(params)

    def submit(self, fn: Any, spec: Any) -> _Job:
        self.fn = fn
        self.live_at_submit.append(sum(j.looks < 3 for j in self.jobs))
        job = _Job(self, spec)
        self.jobs.append(job)
        return job

    def map_array(self, fn: Any, specs: list[Any]) -> list[_Job]:
        return [self.submit(fn, spec) for spec in specs]


def _options(*argv: str) -> launch.LaunchOptions:
    return _launch_options(build_parser().parse_args(["run", *argv]))


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_local_window_runs_every_spec_once_at_most_n_at_a_time(jobs, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "POLL_S", 0.0)
    cfg = RunConfig(methods=["all_foreground", "centre_prior"], seeds=3, preset="tiny",
                    device="cpu", out=str(tmp_path), report=False).validate()  # fmt: skip
    options = launch.LaunchOptions("local", jobs=jobs).validate()
    executor = _Executor()
    started = launch.submit(cfg, options, executor=executor)
    assert len(started.jobs) == jobs < len(started.specs) == 6
    rows = launch.wait(cfg, started)
    assert len(executor.jobs) == 6 and max(executor.live_at_submit) < jobs
    got = sorted(zip(rows["method"], rows["repetition"]))
    assert got == sorted((s.method_spec, s.repetition) for s in started.specs)
    assert len(set(got)) == 6
    cpus = len(os.sched_getaffinity(0))
    assert executor.fn.threads == max(1, cpus // jobs)
    record = next((tmp_path / "launch").glob("*.json")).read_text()
    assert record.count('"job_id"') == 6  # the record lists the jobs started later too


def test_without_jobs_every_job_is_submitted_at_once(tmp_path):
    cfg = RunConfig(methods=["all_foreground"], seeds=3, preset="tiny", device="cpu",
                    out=str(tmp_path), report=False).validate()  # fmt: skip
    executor = _Executor()
    started = launch.submit(cfg, launch.LaunchOptions("local").validate(), executor=executor)
    assert len(started.jobs) == 3 and started.start_next is None
    assert executor.fn.threads is None


def test_jobs_picks_the_local_launcher_and_sets_slurm_parallelism(tmp_path):
    assert _options("--jobs", "2").launcher == "local"
    assert _options("--jobs", "1").launcher == "none"
    assert _options().launcher == "none" and _options().jobs is None
    cfg = RunConfig(preset="tiny", out=str(tmp_path)).validate()
    slurm = _options("--launcher", "slurm", "--jobs", "4")
    assert slurm.executor_parameters(cfg)["slurm_array_parallelism"] == 4
    assert slurm.job_threads() is None  # Slurm jobs use the CPUs Slurm gives them


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--jobs", "0"], "--jobs: must be a positive integer"),
        (["--launcher", "none", "--jobs", "2"], "--jobs: only with --launcher local or slurm"),
        (["--jobs", "2", "--no-wait"], "--no-wait: not with --jobs on --launcher local"),
    ],
)
def test_bad_jobs_options_are_one_line_before_any_work(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["run", "--methods", "cam", *TINY, "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
