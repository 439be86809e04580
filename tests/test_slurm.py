"""``run --launcher local|slurm``: one submitit job per (method, seed) (issue 19).

The local-executor tests always run (subprocesses of this machine, submitit's local executor:
the same code path as Slurm). The Slurm tests submit real jobs with ``sbatch`` through
submitit's Slurm executor and need a cluster that answers ``sinfo`` and ``sacct`` (CI starts a
one-node cluster with ``.ci/slurm-up.sh``); without one they skip with the reason
(``WSSS_SLURM_SKIP_REASON``, set by ``.ci/run`` when the cluster could not be started, or what
``sinfo`` / ``sacct`` answered). Nothing is downloaded and no GPU is needed.

Rows are compared on their identity columns and values (run key, method, repetition, seed,
stage, split, convention, aggregation, metric, status, threshold, value), never on timings,
dates, devices or the job columns (``launcher``, ``job_id``, ``job_log``). Every run uses one
torch thread (the jobs get ``OMP_NUM_THREADS=1``), so floating point is identical everywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from benchmark import cache as bcache
from benchmark.cli import main
from benchmark.store import read_results

# integration tests: every job is a fresh process importing torch (seconds each); run by
# `tox -e tests -- -q -m cluster` (CI runs it after the unit suite), not by `tox -e tests`
pytestmark = pytest.mark.cluster

pytest.importorskip("submitit")

from test_sweeps import _check_grid, _grid_spec, postgres_url  # noqa: E402, F401 - shared fixture

REPO = Path(__file__).resolve().parents[1]
KEYS = ["method_id", "repetition", "seed", "gt_ratio", "stage", "split", "convention",
        "aggregation", "metric"]  # fmt: skip
VALUES = ["run_key", "status", "threshold", "value"]
TINY = ["--preset", "tiny", "--device", "cpu", "--no-report"]
#: Segmenter epochs of the scancel test: long enough to cancel the job mid-training.
LONG_SEGMENTER = "30"


def _values(rows: pd.DataFrame) -> pd.DataFrame:
    """Quality rows (no costs) on the identity columns and values, in a fixed order."""
    quality = rows[rows["aggregation"] != "cost"]
    return quality[KEYS + VALUES].sort_values(KEYS).reset_index(drop=True)


def _assert_same_rows(rows: pd.DataFrame, reference: pd.DataFrame) -> None:
    got, want = _values(rows), _values(reference)
    assert len(got) == len(want) and len(got) > 0, (len(got), len(want))
    if _methods_edited():  # run keys hash the method sources (see benchmark.runner.code_version)
        print("\nmethods/ was edited while this test ran: run keys not compared")
        got, want = got.drop(columns="run_key"), want.drop(columns="run_key")
    pd.testing.assert_frame_equal(got, want, check_exact=True)


_STARTED = time.time()


def _methods_edited() -> bool:
    """Whether a file of ``methods/`` changed since this module was imported (a shared tree)."""
    return any(p.stat().st_mtime > _STARTED for p in (REPO / "methods").rglob("*.py"))


def _one_thread_run(args: list[str]) -> pd.DataFrame:
    """``main(["run", *args])`` in this process with one torch thread; its stored rows."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", *args]) == 0
    finally:
        torch.set_num_threads(before)
    out = args[args.index("--out") + 1]
    return read_results(out)


@pytest.fixture(autouse=True)
def _job_env(monkeypatch):
    """Jobs inherit this environment: one thread each, no fault unless a test sets one."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("WSSS_FAULT", raising=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pd.DataFrame:
    """``run --methods all --preset tiny --seeds 2`` in process (the launchers must match it)."""
    out = tmp_path_factory.mktemp("inprocess") / "out"
    t0 = time.perf_counter()
    rows = _one_thread_run(["--methods", "all", "--seeds", "2", *TINY, "--out", str(out)])
    print(f"\nin-process tiny --methods all --seeds 2: {time.perf_counter() - t0:.1f} s")
    assert set(rows["status"]) == {"done"}
    return rows


def _slurm_problem() -> str | None:
    """Why no Slurm test can run here (None: a cluster answers sinfo and sacct)."""
    reason = os.environ.get("WSSS_SLURM_SKIP_REASON")
    if reason:
        return f"no Slurm cluster: {reason}"
    for tool in ("sinfo", "sbatch", "sacct", "scancel"):
        if not shutil.which(tool):
            return f"no Slurm cluster: {tool} not found (.ci/slurm-up.sh starts one as root)"
    try:
        info = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                              timeout=20)  # fmt: skip
        acct = subprocess.run(["sacct", "-n", "-X", "-o", "JobID"], capture_output=True,
                              text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"no Slurm cluster: {exc}"
    if info.returncode != 0:
        return f"no Slurm cluster: sinfo: {(info.stderr or info.stdout).strip()[:200]}"
    states = info.stdout.split()
    if not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"no usable Slurm node (sinfo states: {states})"
    if acct.returncode != 0:
        return f"sacct does not answer (submitit reads job states with it): {acct.stderr[:200]}"
    return None


@pytest.fixture(scope="module")
def slurm() -> None:
    """Skip (with the reason) unless a Slurm cluster answers."""
    problem = _slurm_problem()
    if problem:
        pytest.skip(problem)


def _launched(out: Path, launcher: str) -> pd.DataFrame:
    """The stored rows of a launched run, checked for their job columns."""
    rows = read_results(out)
    assert set(rows["launcher"]) == {launcher}
    assert rows["job_id"].astype(str).str.len().min() > 0
    assert all(Path(p).is_file() for p in rows["job_log"].unique())
    return rows


def _one_fit_per_repetition(rows: pd.DataFrame) -> None:
    """``cam`` and ``cam_affinitynet`` share one classifier per repetition, trained once."""
    cost = rows[(rows["aggregation"] == "cost") & (rows["stage"] == "fit:classifier")]
    cost = cost[cost["method"].isin(["cam", "cam_affinitynet"])]
    runs = cost.groupby(["repetition", "method"])["reused"].first().astype(bool)  # one per run
    trained = (~runs).groupby(level="repetition").sum()
    assert len(trained) == 2 and (trained == 1).all(), trained


# ---- (a) local executor == in process ----------------------------------------------------------
#: Methods of the local-executor comparison where Slurm runs the full acceptance test (b): a
#: shared fit (cam inside cam_affinitynet) and a reference; the full set otherwise. Either way
#: the suite runs one full launched ``--methods all --seeds 2`` (each job imports torch: seconds).
LOCAL_SUBSET = ["cam", "cam_affinitynet", "all_foreground"]


def test_local_launcher_rows_equal_in_process(reference, tmp_path, capsys):
    out = tmp_path / "out"
    methods = ["all"] if _slurm_problem() else LOCAL_SUBSET
    t0 = time.perf_counter()  # two jobs at a time, each further one started as one ends
    rc = main(["run", "--methods", *methods, "--seeds", "2", *TINY, "--out", str(out),
               "--launcher", "local", "--jobs", "2"])  # fmt: skip
    seconds = time.perf_counter() - t0
    assert rc == 0
    printed = capsys.readouterr().out
    rows = _launched(out, "local")
    want = reference if methods == ["all"] else reference[reference["method"].isin(methods)]
    _assert_same_rows(rows, want)
    _one_fit_per_repetition(rows)
    n_jobs = rows[["method_id", "repetition"]].drop_duplicates().shape[0]
    assert len(list((out / "launch" / "submitit").glob("*_0_log.err"))) == n_jobs
    assert "local jobs:" in printed and "Segmenter on test" in printed
    print(f"\n--launcher local --jobs 2, tiny --methods {' '.join(methods)} --seeds 2 "
          f"({n_jobs} jobs): "
          f"{seconds:.1f} s")  # fmt: skip


# ---- (b) real Slurm == in process --------------------------------------------------------------
def test_slurm_launcher_rows_equal_in_process(slurm, reference, tmp_path):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    rc = main(["run", "--methods", "all", "--seeds", "2", *TINY, "--out", str(out),
               "--launcher", "slurm", "--cpus-per-job", "1", "--timeout-min", "20"])  # fmt: skip
    seconds = time.perf_counter() - t0
    assert rc == 0
    rows = _launched(out, "slurm")
    _assert_same_rows(rows, reference)
    _one_fit_per_repetition(rows)
    ids = sorted(rows["job_id"].unique())
    array = {i.split("_")[0] for i in ids}
    assert len(array) == 1 and all("_" in i for i in ids), ids  # one job array
    states = _settled(array.pop())  # a job's result can be read before Slurm marks it done
    assert set(states.values()) == {"COMPLETED"} and len(states) == len(ids), states
    print(f"\n--launcher slurm, tiny --methods all --seeds 2 ({len(ids)} jobs): {seconds:.1f} s")


def _settled(job: str, timeout: float = 60) -> dict[str, str]:
    """``_sacct(job)`` once no job of it is pending, running or completing any more."""
    busy = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED")
    _wait_for(lambda: not any(s in busy for s in _sacct(job).values()), timeout, f"job {job}")
    return _sacct(job)


def _sacct(job: str) -> dict[str, str]:
    """Slurm's state of every job (array task) of ``job``."""
    cmd = ["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=True).stdout
    return dict(line.split("|", 1) for line in text.split() if "|" in line)


# ---- (c, d) a killed job, then the same command again -----------------------------------------
def test_killed_local_job_is_an_error_row_then_resumes(reference, tmp_path, monkeypatch, capsys):
    """The job process is SIGKILLed mid segmenter training: an error row with its job id and
    log; the same command again reuses the completed stages and gives the reference rows."""
    out = tmp_path / "out"
    cmd = ["run", "--methods", "cam", "--seeds", "1", *TINY, "--out", str(out),
           "--launcher", "local"]  # fmt: skip
    monkeypatch.setenv("WSSS_FAULT", "kill@step:segmenter-*")
    assert main(cmd) == 0
    monkeypatch.delenv("WSSS_FAULT")
    assert "failed jobs:" in capsys.readouterr().out
    failed = read_results(out)
    assert len(failed) == 1, failed
    row = failed.iloc[0]
    assert row["status"] == "error" and row["launcher"] == "local"
    assert f"job {row['job_id']} " in row["reason"] and row["job_log"] in row["reason"]
    assert Path(row["job_log"]).is_file() and "injecting kill" in Path(row["job_log"]).read_text()
    assert list(out.glob("stages/cam/*/classifier.pt"))  # the completed stages are kept
    assert main(["report", "--out", str(out)]) == 0  # the failed job is in the report
    assert str(row["job_id"]) in (out / "report" / "report.md").read_text()

    assert main(cmd) == 0  # the same command again: resumes
    rows = _launched(out, "local")
    assert set(rows["status"]) == {"done"}  # the launcher's error row is gone
    want = reference[(reference["method"] == "cam") & (reference["repetition"] == 0)]
    _assert_same_rows(rows, want)
    reused = rows[(rows["aggregation"] == "cost")].groupby("stage")["reused"].first()
    if not _methods_edited():  # an edit of methods/ changes the stage keys (code version)
        assert reused["fit:classifier"] and reused["maps_train"] and not reused["segmenter"]


def test_failing_method_in_a_job_is_an_error_row_with_its_job(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("WSSS_FAULT", "oom@step:classifier")
    rc = main(["run", "--methods", "cam", "all_foreground", "--seeds", "1", *TINY,
               "--out", str(out), "--launcher", "local"])  # fmt: skip
    assert rc == 0
    rows = read_results(out)
    bad = rows[rows["status"] == "error"]
    assert list(bad["method"]) == ["cam"] and "out of memory" in bad["reason"].iloc[0]
    assert bad["job_id"].iloc[0] and Path(bad["job_log"].iloc[0]).is_file()
    assert set(rows[rows["method"] == "all_foreground"]["status"]) == {"done"}


def test_scancel_mid_training_then_resubmit(slurm, tmp_path):
    """scancel a Slurm job while it trains the segmenter; the waiting submitter stores an error
    row with the Slurm job id and log; the same command again gives the uninterrupted rows."""
    ref_out, out = tmp_path / "reference", tmp_path / "out"
    args = ["--methods", "cam", "--seeds", "1", "--segmenter-epochs", LONG_SEGMENTER, *TINY]
    reference = _one_thread_run([*args, "--out", str(ref_out)])
    cmd = [sys.executable, "-m", "benchmark", "run", *args, "--out", str(out),
           "--launcher", "slurm", "--timeout-min", "20"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    events: list[tuple[str, float]] = [("submit", time.monotonic())]
    submitter = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        job = _wait_for(lambda: _job_of(out), 120, "the job record")
        events.append((f"job {job} submitted", time.monotonic()))
        _wait_for(lambda: _maps_done(out), 180, "the cam maps (fit and maps stages)")
        events.append(("fit + maps stored, segmenter training", time.monotonic()))
        subprocess.run(["scancel", job], check=True, timeout=30)
        events.append(("scancel", time.monotonic()))
        text = submitter.communicate(timeout=300)[0]
    finally:
        if submitter.poll() is None:
            submitter.kill()
    events.append(("submitter exits (job seen as cancelled)", time.monotonic()))
    assert submitter.returncode == 0, text
    failed = read_results(out)
    assert len(failed) == 1 and failed["status"].iloc[0] == "error", (failed, text)
    reason = failed["reason"].iloc[0]
    assert f"slurm job {job} " in reason and "CANCELLED" in reason, reason
    assert failed["job_log"].iloc[0] in reason and Path(failed["job_log"].iloc[0]).is_file()
    assert not list(out.glob("runs/cam/*/stages/segmenter-*-train.pt"))  # lost: the one in flight
    assert _settled(job.split("_")[0]).get(job, "").startswith("CANCELLED")

    t0 = time.monotonic()
    before = torch.get_num_threads()
    assert main(["run", *args, "--out", str(out), "--launcher", "slurm",
                 "--timeout-min", "20"]) == 0  # fmt: skip
    assert torch.get_num_threads() == before
    events.append(("resubmitted run done", time.monotonic()))
    rows = _launched(out, "slurm")
    assert set(rows["status"]) == {"done"}
    _assert_same_rows(rows, reference)
    reused = rows[(rows["aggregation"] == "cost")].groupby("stage")["reused"].first()
    if not _methods_edited():  # an edit of methods/ changes the stage keys (code version)
        assert reused["fit:classifier"] and reused["maps_test"] and not reused["segmenter"]
    start = events[0][1]
    print("\nscancel timeline: " + "; ".join(f"{t - start:5.1f} s {e}" for e, t in events))
    print(f"resubmission: {time.monotonic() - t0:.1f} s")


def _wait_for(probe, timeout: float, what: str):
    """Poll ``probe()`` until it returns something truthy (returned), or fail after ``timeout``."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = probe()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _job_of(out: Path) -> str | None:
    """The job id of the first job in the run's launch record, once written."""
    for path in sorted((out / "launch").glob("*.json")):
        try:
            return json.loads(path.read_text())["jobs"][0]["job_id"]
        except (OSError, ValueError, KeyError, IndexError):
            return None
    return None


def _maps_done(out: Path) -> bool:
    maps = list(out.glob("runs/cam/*/maps/test.npy"))
    return bool(maps) and bcache.read_marker(maps[0]) is not None


# ---- (e) option checks --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--launcher", "local", "--timeout-min", "0"], "--timeout-min: must be a positive"),
        (["--launcher", "slurm", "--cpus-per-job", "-2"], "--cpus-per-job: must be a positive"),
        (["--launcher", "slurm", "--gpus-per-job", "0"], "--gpus-per-job: must be a positive"),
        (["--launcher", "slurm", "--mem-gb", "0"], "--mem-gb: must be a positive"),
        (["--launcher", "slurm", "--mem-gb", "nan"], "--mem-gb: must be a positive"),
        (["--launcher", "slurm", "--slurm-partition", "a b"], "--slurm-partition: expected"),
        (["--launcher", "slurm", "--sbatch-extra", "=x"], "--sbatch-extra: expected KEY=VALUE"),
        (["--launcher", "slurm", "--sbatch-extra", "output=x"], "set by submitit itself"),
        (["--timeout-min", "10"], "--timeout-min: only with --launcher local or slurm"),
        (["--no-wait"], "--no-wait: only with --launcher local or slurm"),
        (["--launcher", "pbs"], "invalid choice: 'pbs'"),
        (["--launcher", "slurm", "--cpus-per-job", "two"], "invalid int value: 'two'"),
    ],
)
def test_launch_options_are_checked_before_any_work(extra, message, tmp_path, capsys):
    out = tmp_path / "out"
    try:
        rc = main(["run", "--methods", "cam", *TINY, "--out", str(out), *extra])
    except SystemExit as exc:  # argparse's own checks (choices, types)
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()  # nothing was made


def test_launch_options_reach_sbatch_and_stay_out_of_the_config(tmp_path):
    import submitit

    from benchmark.config import RunConfig
    from benchmark.launch import LaunchOptions, parse_sbatch_extra

    cfg = RunConfig(preset="tiny", out=str(tmp_path)).validate()
    options = LaunchOptions(
        "slurm", partition="gpu", gpus_per_job=1, cpus_per_job=8, mem_gb=32, account="lab",
        sbatch_extra=parse_sbatch_extra(["qos=high", "requeue"]), timeout_min=240,
    ).validate()  # fmt: skip
    executor = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    executor.update_parameters(**options.executor_parameters(cfg))
    script = executor._executor._make_submission_file_text("python job.py", "uid")
    for flag in ("--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=8", "--mem=32GB",
                 "--account=lab", "--qos=high", "--requeue", "--time=240"):  # fmt: skip
        assert f"#SBATCH {flag}\n" in script, (flag, script)
    assert not {"launcher", "timeout_min", "slurm_partition"} & set(cfg.to_dict())


# ---- sweep workers as Slurm jobs on PostgreSQL ----------------------------------------------
def test_gt_ratio_sweep_with_two_slurm_workers_on_postgresql(slurm, postgres_url, tmp_path):  # noqa: F811
    """A 4-point gt-ratio grid, 2 worker jobs through sbatch: every point once, no duplicate."""
    from benchmark import sweeps

    url, secret = postgres_url
    out = tmp_path / "out"
    t0 = time.perf_counter()
    spec = _grid_spec(out, [0.0, 0.5, 0.75, 1.0])
    slurm_params = {"timeout_min": 20, "cpus_per_task": 1}
    sweeps.start_study(spec, "pg-slurm", url, launcher="slurm", workers=2, slurm=slurm_params)
    _check_grid(out, "pg-slurm", 4)
    logs = sorted((out / "studies" / "submitit").glob("*_0_log.err"))
    assert len(logs) == 2, logs  # two Slurm jobs ran
    for log in logs:
        job = log.name.split("_")[0]
        assert _settled(job) == {job: "COMPLETED"}
        assert secret not in log.read_text()
    print(f"\n2 Slurm workers, 4-point gt-ratio grid: {time.perf_counter() - t0:.1f} s")
