"""Reliability under faults (issue 9), on the ``tiny`` preset.

Faults are injected deterministically with the test-only hook of :mod:`benchmark.faults`
(``WSSS_FAULT=ACTION@POINT[:PATTERN][#N]``): SIGKILL of a run process during training, while a
map file is half written, between a map file and its completion marker, and while the result
rows are written; two run processes on one folder at once; truncated and altered cache files; a
NaN loss; out of memory; a full disk (the last through ``python -m benchmark``'s ``main``).

Run processes are forked from the test process (``multiprocessing`` "fork": no interpreter
start-up, which costs more than a tiny run); ``tests/test_runner.py`` also kills a real
``python -m benchmark run`` subprocess. Every test compares with one uninterrupted reference run
(computed once, with one torch thread like the run processes, so results are bitwise equal).
"""

from __future__ import annotations

import errno
import io
import logging
import multiprocessing as mp
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark import cache as bcache
from benchmark import faults, store
from benchmark.cli import main
from benchmark.config import RunConfig
from benchmark.runner import RunContext, Runner
from benchmark.store import read_results

METHODS = ["cam", "all_foreground"]
QUALITY = ["method_id", "seed", "stage", "split", "convention", "aggregation", "metric"]


def _cfg(out: Path, methods: list[str] | None = None, **kw) -> RunConfig:
    values = dict(
        methods=methods or METHODS,
        preset="tiny",
        out=str(out),
        device="cpu",
        segmenter_epochs=1,
        report=False,
    )
    values.update(kw)
    return RunConfig(**values).validate()


def _cli_args(out: Path, methods: list[str] | None = None) -> list[str]:
    """``run`` arguments equal to :func:`_cfg` (same run keys, same results)."""
    return [
        "run",
        "--methods",
        *(methods or METHODS),
        "--preset",
        "tiny",
        "--device",
        "cpu",
        "--segmenter-epochs",
        "1",
        "--no-report",
        "--out",
        str(out),
    ]


def _child(out: str, fault: str | None, results: Any) -> None:
    """A forked ``run`` process (the imports are already done: no interpreter start-up)."""
    if fault:
        os.environ[faults.ENV] = fault
    else:
        os.environ.pop(faults.ENV, None)
    faults.reset()
    torch.set_num_threads(1)
    rows = Runner(_cfg(Path(out))).run_all()
    results.put((sorted(set(rows["status"])), _reused(rows, "cam").get("fit:classifier")))


def _run_processes(outs: list[Path], fault: str | None = None) -> list[tuple[int, Any]]:
    """Run one forked ``run`` process per folder, all at once; (exit code, result) of each.

    The exit code is -9 for a process killed by SIGKILL (then its result is None).
    """
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(str(out), fault, results)) for out in outs]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
        if proc.is_alive():
            proc.kill()
            proc.join()
    codes = [proc.exitcode for proc in procs]
    found = [results.get(timeout=5) for code in codes if code == 0]
    return [(code, found.pop() if code == 0 else None) for code in codes]


def _quality(rows: pd.DataFrame) -> pd.DataFrame:
    q = rows[rows["aggregation"] != "cost"][QUALITY + ["value", "threshold", "status"]]
    return q.sort_values(QUALITY).reset_index(drop=True)


def _reused(rows: pd.DataFrame, method: str) -> dict[str, bool]:
    cost = rows[(rows["aggregation"] == "cost") & (rows["method_id"] == method)]
    return cost.groupby("stage")["reused"].first().astype(bool).to_dict()


def _assert_cache_sound(out: Path) -> None:
    """Every stored output has an intact marker; no marker points at a bad file; no temp left."""
    outputs = [
        *(out / "stages").glob("*/*/*"),  # fitted stages shared by inference variants (if any)
        *(out / "runs").glob("*/*/stages/*"),
        *(out / "runs").glob("*/*/maps/*"),
        *(out / "runs").glob("*/*/preds/*"),
    ]
    assert outputs
    for path in outputs:
        if path.name.startswith(".") or path.name.endswith(".done.json"):
            continue
        assert bcache.read_marker(path) is not None, f"{path} is not marked complete"
    for folder in ("runs", "stages"):
        assert not list((out / folder).rglob(".*.tmp")), "a temporary file was left behind"


@pytest.fixture(scope="module", autouse=True)
def _stable_code_version():
    """Run keys hash the source files as they are on disk; pin them so that an edit of the code
    base while this module runs (other sessions work in the same tree) cannot change them."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("benchmark.runner.code_version", lambda method_cls: "pinned-by-test")
        yield


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread in every run (identical floating point in all of them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    faults.reset()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    """An uninterrupted run of cam + all_foreground (the folder is copied, never changed)."""
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = Runner(_cfg(out)).run_all()
    finally:
        torch.set_num_threads(threads)
    assert set(rows["status"]) == {"done"}
    return out, _quality(read_results(out))


def _copy(reference: tuple[Path, pd.DataFrame], dest: Path, parts: tuple[str, ...] = ()) -> Path:
    """Copy the reference folder (or only some of its parts) to ``dest``."""
    if not parts:
        shutil.copytree(reference[0], dest, symlinks=True)
    for part in parts:  # generated data and image cache: content-addressed, safe to share
        shutil.copytree(reference[0] / part, dest / part, symlinks=True)
    return dest


# ---- SIGKILL -------------------------------------------------------------------------------------
KILLS = {
    # fault spec: (the stages of cam the resumed run must reuse, the ones it must recompute)
    "during_classifier_training": ("kill@step:classifier", (), ("fit:classifier",)),
    "during_segmenter_training": (
        "kill@step:segmenter-*",
        ("fit:classifier", "maps_train", "maps_val", "maps_test"),
        ("segmenter",),
    ),
    "while_writing_a_map_file": (
        "kill@write:*/cam/*/maps/val.npy",
        ("fit:classifier", "maps_train"),
        ("maps_val", "maps_test", "segmenter"),
    ),
    "between_map_file_and_marker": (
        "kill@marker:*/cam/*/maps/val.npy",
        ("fit:classifier", "maps_train"),
        ("maps_val", "maps_test", "segmenter"),
    ),
    "while_appending_results": (
        "kill@write:*/results/rows/all_foreground-*",
        ("fit:classifier", "maps_train", "maps_val", "maps_test", "segmenter"),
        (),
    ),
}


@pytest.mark.parametrize("case", list(KILLS))
def test_sigkill_then_resume_equals_uninterrupted_run(case, reference, tmp_path):
    fault, reused, recomputed = KILLS[case]
    out = _copy(reference, tmp_path / "out", ("data", "cache"))
    [(code, _)] = _run_processes([out], fault)
    assert code == -9, f"the run was not killed (exit code {code})"

    stored = read_results(out)
    if case == "while_appending_results":
        # cam's rows were complete before the kill; all_foreground's half-written file is not read
        assert set(stored["method_id"]) == {"cam"}
        assert list((out / "results" / "rows").glob(".all_foreground-*.tmp"))
    else:
        assert stored.empty
    if case == "while_writing_a_map_file":
        maps = next((out / "runs" / "cam").glob("*/maps"))
        partial = list(maps.glob(".val.npy.*.tmp"))
        assert partial and not (maps / "val.npy").exists()  # only a hidden partial temp file
    if case == "between_map_file_and_marker":
        val = next((out / "runs" / "cam").glob("*/maps/val.npy"))
        assert val.is_file() and bcache.read_marker(val) is None  # complete bytes, not "done"

    rows = Runner(_cfg(out)).run_all()  # the resumed run
    assert set(rows["status"]) == {"done"}
    flags = _reused(rows, "cam")
    for stage in reused:
        assert flags[stage], f"{stage} was recomputed although it was complete"
    for stage in recomputed:
        assert not flags[stage], f"{stage} was reused although it was not complete"
    pd.testing.assert_frame_equal(_quality(read_results(out)), reference[1])
    _assert_cache_sound(out)


def test_two_runs_on_one_folder_at_once(reference, tmp_path):
    """Both finish; no row lost or duplicated; every cache entry intact; each stage computed once.

    Integrity comes from atomic renames (a file appears whole or not at all, and is trusted only
    through its size + SHA-256 marker). File locks (``filelock``, one per output, released by the
    OS if a process dies) make the second process wait for a stage in flight and reuse it, so it
    never replaces a file the first one is reading; the test checks that each internal stage was
    computed by exactly one process.
    """
    out = _copy(reference, tmp_path / "out", ("data", "cache"))
    results = _run_processes([out, out])
    assert [code for code, _ in results] == [0, 0]
    assert [status for _, (status, _) in results] == [["done"], ["done"]]
    stored = read_results(out)
    quality = _quality(stored)
    assert not quality.duplicated(QUALITY).any()
    pd.testing.assert_frame_equal(quality, reference[1])
    _assert_cache_sound(out)
    reused = sorted(flag for _, (_, flag) in results)
    assert reused == [False, True], "the classifier was not computed exactly once"


# ---- damaged files -----------------------------------------------------------------------------
def test_truncated_and_altered_cache_files_are_recomputed(reference, tmp_path, caplog):
    out = _copy(reference, tmp_path / "out")
    run = next((out / "runs" / "cam").iterdir())
    val = run / "maps" / "val.npy"
    val.write_bytes(val.read_bytes()[:-100])  # truncated
    [classifier] = out.rglob("classifier.pt")  # runs/cam/KEY/stages or stages/cam/FIT_KEY
    raw = bytearray(classifier.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # altered, same size
    classifier.write_bytes(bytes(raw))
    seg = next(run.glob("stages/segmenter-*-train.pt"))
    seg.unlink()  # an output gone although its marker says done

    with caplog.at_level(logging.WARNING, logger="benchmark.cache"):
        rows = Runner(_cfg(out, ["cam"])).run_all()
    text = caplog.text
    assert str(val) in text and "truncated" in text
    assert str(classifier) in text and "checksum" in text
    assert str(seg) in text and "missing" in text
    flags = _reused(rows, "cam")
    assert not flags["fit:classifier"] and not flags["maps_val"] and not flags["segmenter"]
    assert flags["maps_train"] and flags["maps_test"]
    ref = reference[1]
    pd.testing.assert_frame_equal(
        _quality(rows), ref[ref["method_id"] == "cam"].reset_index(drop=True)
    )
    _assert_cache_sound(out)


# ---- NaN loss ---------------------------------------------------------------------------------
def test_nan_loss_is_an_error_and_others_go_on(reference, tmp_path, monkeypatch):
    from methods.cam import CAMNet

    out = _copy(reference, tmp_path / "out")
    for folder in (out / "runs" / "cam", out / "stages" / "cam"):  # cam must train again
        shutil.rmtree(folder, ignore_errors=True)
    forward = CAMNet.forward

    def diverged(self, x):
        logits, feats = forward(self, x)
        return logits * float("nan"), feats

    monkeypatch.setattr(CAMNet, "forward", diverged)
    rows = Runner(_cfg(out)).run_all()
    status = rows.groupby("method_id")["status"].first()
    assert status["cam"] == "error" and status["all_foreground"] == "done"
    reason = rows[rows["method_id"] == "cam"]["reason"].iloc[0]
    assert "cam classifier: training loss became nan" in reason, reason
    assert not list(out.rglob("classifier.pt*")), "NaN weights were cached"
    monkeypatch.undo()
    again = Runner(_cfg(out, ["cam"])).run_all()  # nothing bad was cached: it now succeeds
    assert set(again["status"]) == {"done"}
    ref = reference[1]
    pd.testing.assert_frame_equal(
        _quality(again), ref[ref["method_id"] == "cam"].reset_index(drop=True)
    )


def test_stage_with_nan_weights_is_never_cached(tmp_path):
    """The guard for every method: a stage result holding NaN or inf raises and is not saved."""
    ctx = RunContext(stage_dir=tmp_path)
    with pytest.raises(FloatingPointError, match="stage affinity: training diverged"):
        ctx.stage("affinity", lambda: {"w": torch.tensor([1.0, float("inf")])})
    assert ctx.failed == "affinity"
    assert not list(tmp_path.glob("affinity.pt*"))


# ---- out of memory -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("method", "fault", "extra", "needles"),
    [
        (
            "cam[batch_size=8]",
            "oom@step:classifier",
            {},
            ("during fit (stage classifier)", "batch_size=8", "--methods 'cam[batch_size=4]'"),
        ),
        (
            "cam",
            "oom@step:segmenter-*",
            {"segmenter_batch_size": 4},
            ("during segmenter", "segmenter batch_size=4", "--segmenter-batch-size 2"),
        ),
    ],
)
def test_out_of_memory_names_the_batch_size(
    method, fault, extra, needles, reference, tmp_path, monkeypatch
):
    out = _copy(reference, tmp_path / "out")
    monkeypatch.setenv(faults.ENV, fault)
    rows = Runner(_cfg(out, [method, "all_foreground"], **extra)).run_all()
    status = rows.groupby("method_id")["status"].first()
    assert status[method] == "error" and status["all_foreground"] == "done"
    reason = rows[rows["method_id"] == method]["reason"].iloc[0]
    assert reason.startswith("out of memory on cpu"), reason
    for needle in needles:
        assert needle in reason, (needle, reason)
    # nothing else lost: the reference's stages and rows are intact, completed stages reused
    _assert_cache_sound(out)
    if extra:  # the segmenter ran out of memory: the method's own stages were kept and reused
        monkeypatch.delenv(faults.ENV)
        again = Runner(_cfg(out, [method], **extra)).run_all()
        assert set(again["status"]) == {"done"}
        flags = _reused(again, method)
        assert flags["fit:classifier"] and flags["maps_val"] and not flags["segmenter"]


# ---- disk full ---------------------------------------------------------------------------------
def test_disk_full_is_a_clear_error_and_earlier_results_stay(
    reference, tmp_path, monkeypatch, capsys
):
    out = _copy(reference, tmp_path / "out")
    before = {p: p.read_bytes() for p in (out / "results" / "rows").glob("*.parquet")}
    monkeypatch.setenv(faults.ENV, "enospc@write:*/centre_prior/*/maps/train.npy")
    code = main(_cli_args(out, ["centre_prior"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: disk full") and "centre_prior" in err[-1]
    assert "train.npy" in err[-1] and "Traceback" not in "\n".join(err)
    # earlier results intact: the same row files, byte for byte, and every marker valid
    after = {p: p.read_bytes() for p in (out / "results" / "rows").glob("*.parquet")}
    assert after == before
    pd.testing.assert_frame_equal(_quality(read_results(out)), reference[1])
    _assert_cache_sound(out)
    assert not list((out / "runs" / "centre_prior").rglob("train.npy*"))


def test_disk_full_error_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv(faults.ENV, "enospc@write:*big.npy")
    with pytest.raises(bcache.DiskFullError, match="disk full .* while writing .*big.npy"):
        bcache.save_array(tmp_path / "big.npy", np.zeros(1000, np.float32))
    assert list(tmp_path.iterdir()) == []  # no temporary file, no marker


def test_fault_spec_is_checked():
    assert faults.parse("kill@step:segmenter-*#3") == ("kill", "step", "segmenter-*", 3)
    with pytest.raises(ValueError, match="ACTION@POINT"):
        faults.parse("explode@step")


def test_failed_result_write_leaves_no_partial_file_under_a_readable_name(tmp_path, monkeypatch):
    """Curves (and the qualitative arrays) are globbed by the reports: no half file may match."""

    real = pd.DataFrame.to_parquet

    def half_then_disk_full(self, target, *args, **kwargs):
        buf = io.BytesIO()
        real(self, buf, *args, **kwargs)
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(target, "write"):
            target.write(data)
        else:
            Path(target).write_bytes(data)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_parquet", half_then_disk_full)
    curves = tmp_path / "results" / "curves"
    with pytest.raises(OSError):
        store.write_curve(tmp_path, "k", pd.DataFrame({"threshold": [0.5], "iou": [0.7]}))
    assert not list(curves.glob("*.parquet")), "a half-written curve file can be read"
