"""End-to-end runner tests on the tiny preset: rows, cache reuse, failure isolation, resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmark.config import RunConfig
from benchmark.runner import Runner, expand_methods, gt_subset, prepare_data
from benchmark.store import read_results
from methods import list_methods

REPO = Path(__file__).resolve().parents[1]
QUALITY = ["method_id", "seed", "stage", "split", "convention", "aggregation", "metric"]


def _cfg(out: Path, methods: list[str], **kw) -> RunConfig:
    base = dict(
        methods=methods,
        preset="tiny",
        out=str(out),
        data_root=None,
        device="cpu",
        segmenter_epochs=1,
        report=False,
    )
    base.update(kw)
    return RunConfig(**base).validate()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(out, ["cam", "all_foreground", "supervised", "centre_prior"])
    rows = Runner(cfg).run_all()
    return out, cfg, rows


def _quality(rows: pd.DataFrame) -> pd.DataFrame:
    q = rows[rows["aggregation"] != "cost"][QUALITY + ["value", "threshold"]]
    return q.sort_values(QUALITY).reset_index(drop=True)


def test_rows_are_tidy_and_complete(tiny_run):
    out, cfg, rows = tiny_run
    assert set(rows["status"]) == {"done"}
    for col in (
        "split_sha256",
        "seed",
        "gt_ratio",
        "convention",
        "image_size",
        "device",
        "v_torch",
        "v_git_commit",
        "threshold",
        "date",
        "params",
    ):
        assert col in rows, col
    seg = rows[
        (rows.stage == "segmenter") & (rows.metric == "iou") & (rows.aggregation == "dataset")
    ]
    assert set(seg["convention"]) == {"pet", "pet_with_border", "weaktr_refinery"}
    assert rows["split_sha256"].nunique() == 1  # identical split for every method
    stored = read_results(out)
    assert len(stored) == len(rows)


def test_references_behave(tiny_run):
    _, _, rows = tiny_run
    sel = rows[
        (rows.stage == "pseudo") & (rows.convention == "pet") & (rows.aggregation == "dataset")
    ]
    val = sel.set_index(["method_id", "metric"])["value"]
    # supervised pseudo masks are the working-resolution GT masks the segmenter trains on,
    # scored at the original resolution: near 1, not the GT against itself (exactly checked in
    # tests/test_scoring_defects.py)
    assert 0.97 < val[("supervised", "iou")] < 1.0
    # all-foreground: recall 1, precision = pet share
    assert val[("all_foreground", "recall")] == pytest.approx(1.0)
    assert val[("all_foreground", "precision")] == pytest.approx(val[("all_foreground", "iou")])


def test_second_run_reuses_every_stage(tiny_run):
    out, cfg, rows = tiny_run
    t0 = time.perf_counter()
    again = Runner(cfg).run_all()
    assert time.perf_counter() - t0 < 60
    cost = again[again["aggregation"] == "cost"]
    inner = cost[cost["stage"].str.startswith(("fit:", "maps_", "segmenter"))]
    assert len(inner) and inner["reused"].all()
    pd.testing.assert_frame_equal(_quality(rows), _quality(again))


def test_failing_method_does_not_stop_others(tmp_path, monkeypatch):
    from methods.references import AllForeground

    def broken(self, batch, ctx):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(AllForeground, "localize", broken)
    rows = Runner(_cfg(tmp_path, ["all_foreground", "centre_prior"])).run_all()
    status = rows.groupby("method_id")["status"].first()
    assert status["all_foreground"] == "error" and status["centre_prior"] == "done"
    err = rows[rows.status == "error"].iloc[0]
    assert "simulated failure" in err["reason"] and Path(err["traceback"]).is_file()
    # failures are never cached as results: the next run computes it
    monkeypatch.undo()
    rows = Runner(_cfg(tmp_path, ["all_foreground"])).run_all()
    assert set(rows["status"]) == {"done"}


def test_budget_stops_training_and_is_recorded(tmp_path):
    rows = Runner(_cfg(tmp_path, ["cam[epochs=50]"], budget_minutes=0.02)).run_all()
    assert set(rows["status"]) == {"budget"}


def test_gt_subset_nested_and_seeded():
    a = gt_subset(100, 0.1, "k")
    b = gt_subset(100, 0.2, "k")
    assert len(a) == 10 and len(b) == 20 and set(a) <= set(b)
    assert np.array_equal(a, gt_subset(100, 0.1, "k"))
    assert not np.array_equal(b, gt_subset(100, 0.2, "other"))


def test_expand_methods():
    assert expand_methods(["all"]) == list_methods()
    assert expand_methods(["cam*"]) == [m for m in list_methods() if m.startswith("cam")]
    assert expand_methods(["cam[epochs=2],centre_prior"]) == ["cam[epochs=2]", "centre_prior"]


def test_excluded_file_reported_on_real_sample(sample_root, tmp_path):
    cfg = _cfg(tmp_path, ["all_foreground"], dataset="oxford_pet", data_root=str(sample_root))
    bundle = prepare_data(cfg)
    assert any(e.name == "Abyssinian_34" for e in bundle.dataset.exclusions)
    assert "Abyssinian_34" not in bundle.cache.names


def test_sigkill_mid_training_resumes_to_identical_rows(tmp_path):
    """Kill a run with SIGKILL during a training stage; the re-run equals an uninterrupted one."""
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    method = "cam[epochs=40]"
    args = [
        sys.executable,
        "-m",
        "benchmark",
        "run",
        "--methods",
        method,
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--segmenter-epochs",
        "1",
        "--no-report",
    ]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        args + ["--out", str(killed)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    work = None
    while time.time() < deadline:
        hits = list((killed / "runs").glob("cam/*/work"))
        if hits:
            work = hits[0]
            break
        time.sleep(0.05)
    assert work is not None, "the run never reached its training stage"
    time.sleep(1.0)  # inside the classifier's training loop
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_results(killed).empty  # nothing was recorded as a result
    subprocess.run(
        args + ["--out", str(killed)], cwd=REPO, env=env, check=True, capture_output=True
    )
    fresh = tmp_path / "fresh"
    subprocess.run(args + ["--out", str(fresh)], cwd=REPO, env=env, check=True, capture_output=True)
    a, b = _quality(read_results(killed)), _quality(read_results(fresh))
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)


def test_channels_last_reaches_the_method_and_the_cache_key(tmp_path):
    from benchmark.runner import RunSpec

    bundle = prepare_data(_cfg(tmp_path, ["cam"]))
    opened = {
        flag: Runner(_cfg(tmp_path, ["cam"], channels_last=flag), bundle=bundle).open_run(
            RunSpec("cam", 0)
        )
        for flag in (True, False)
    }
    assert opened[True].ctx.channels_last is True and opened[False].ctx.channels_last is False
    # a run in the other memory format is another experiment: its stages are not reused
    assert opened[True].run_key != opened[False].run_key
    assert opened[True].ctx.stage_dir != opened[False].ctx.stage_dir


def test_a_smoke_run_never_replaces_or_joins_the_full_run(tmp_path):
    """max_epochs, amp and a fixed threshold are in the rows, the run identity and method_id:
    a ``--max-epochs 1`` run of the same method in the same folder is a separate table entry."""
    from benchmark.store import latest_runs
    from reports.tables import summarize

    for extra in ({}, {"max_epochs": 1}, {"threshold": 0.25}):
        Runner(_cfg(tmp_path, ["all_foreground"], **extra)).run_all()
    rows = latest_runs(read_results(tmp_path))
    plain, smoke, fixed = (
        "all_foreground",
        "all_foreground [max_epochs=1]",
        "all_foreground [threshold=0.25]",
    )
    assert set(rows["method_id"]) == {plain, smoke, fixed}
    by_id = rows.groupby("method_id")
    assert set(by_id.get_group(smoke)["max_epochs"]) == {1.0}
    assert not by_id.get_group(smoke)["amp"].any()
    assert set(by_id.get_group(fixed)["fixed_threshold"]) == {0.25}
    assert by_id.get_group(plain)[["max_epochs", "fixed_threshold"]].isna().all().all()
    table = summarize(rows, "segmenter", "test")
    assert (table.loc[[plain, smoke, fixed], "n_seeds"] == 1).all()
