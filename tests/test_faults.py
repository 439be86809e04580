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


# ---- issue 15: damaged markers, wrong-shaped cache files, rows never replaced by a failure ----
def _cam_run(out: Path) -> Path:
    return next((out / "runs" / "cam").iterdir())


def _row_files(out: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in (out / "results" / "rows").glob("*.parquet")}


def _good_marker(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.with_name(path.name + ".done.json").read_text())


MALFORMED_MARKERS = {
    "list": lambda good: [],
    "null": lambda good: None,
    "string": lambda good: "done",
    "size_as_text": lambda good: {**good, "size": str(good["size"])},
    "size_as_bool": lambda good: {**good, "size": True},
    "sha256_missing": lambda good: {"size": good["size"], "meta": good["meta"]},
    "meta_list": lambda good: {**good, "meta": []},
    "cost_list": lambda good: {**good, "meta": {"cost": []}},
    "cost_text_value": lambda good: {**good, "meta": {"cost": {"wall_s": "fast"}}},
    "budget_hit_text": lambda good: {**good, "meta": {**good["meta"], "budget_hit": "no"}},
}


@pytest.mark.parametrize("case", list(MALFORMED_MARKERS))
def test_malformed_marker_is_a_missing_marker(case, tmp_path, caplog):
    """Item 2: a marker that is not the object write_with_marker writes is absent (warned)."""
    import json

    path = tmp_path / "val.npy"
    bcache.save_array(path, np.zeros((2, 1, 4, 4), np.float16), {"cost": {"wall_s": 1.0}})
    marker = path.with_name("val.npy.done.json")
    marker.write_text(json.dumps(MALFORMED_MARKERS[case](_good_marker(path))))
    with caplog.at_level(logging.WARNING, logger="benchmark.cache"):
        assert bcache.read_marker(path) is None
    assert str(marker) in caplog.text and "malformed" in caplog.text


@pytest.mark.parametrize("content", ["[]", "null"])
def test_malformed_map_marker_is_recomputed_and_rows_kept(content, reference, tmp_path, caplog):
    """Item 2: ``[]``/``null`` in a done marker of a finished folder: recomputed, nothing lost."""
    out = _copy(reference, tmp_path / "out")
    marker = _cam_run(out) / "maps" / "val.npy.done.json"
    marker.write_text(content)
    with caplog.at_level(logging.WARNING, logger="benchmark.cache"):
        rows = Runner(_cfg(out, ["cam"])).run_all()
    assert set(rows["status"]) == {"done"}, rows["reason"].iloc[0]
    assert str(marker) in caplog.text and "malformed" in caplog.text
    flags = _reused(rows, "cam")
    assert not flags["maps_val"] and flags["maps_train"] and flags["segmenter"]
    pd.testing.assert_frame_equal(_quality(read_results(out)), reference[1])
    _assert_cache_sound(out)


def test_a_failing_rerun_never_replaces_completed_rows(reference, tmp_path, monkeypatch, caplog):
    """Item 2: a failure of a run whose rows are stored keeps those rows; it is logged."""
    out = _copy(reference, tmp_path / "out")
    before = _row_files(out)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure on re-run")

    monkeypatch.setattr("benchmark.stages.choose_threshold", broken)
    with caplog.at_level(logging.WARNING):
        rows = Runner(_cfg(out, ["cam"])).run_all()
    assert list(rows["status"]) == ["error"]  # this invocation failed, and says so
    assert "simulated failure" in rows["reason"].iloc[0]
    assert (_cam_run(out) / "error.txt").is_file()
    assert "completed rows" in caplog.text
    assert _row_files(out) == before  # byte for byte
    pd.testing.assert_frame_equal(_quality(read_results(out)), reference[1])


def test_store_keeps_completed_rows_over_a_failure(tmp_path):
    """Item 2, store level: error rows replace error rows; only completed rows replace rows."""
    done = [{"method_id": "cam", "status": "done", "metric": "iou", "value": 0.5}]
    error = [{"method_id": "cam", "status": "error", "metric": "status", "value": np.nan}]
    store.write_rows(tmp_path, "k", error)
    store.write_rows(tmp_path, "k", error + error)
    assert len(read_results(tmp_path)) == 2
    store.write_rows(tmp_path, "k", done)
    store.write_rows(tmp_path, "k", error)  # kept: the completed row stays
    assert list(read_results(tmp_path)["status"]) == ["done"]
    budget = [{**done[0], "status": "budget", "value": 0.4}]
    store.write_rows(tmp_path, "k", budget)  # a completed result replaces one
    assert list(read_results(tmp_path)["value"]) == [0.4]


def test_predictions_of_wrong_shape_with_matching_marker_are_recomputed(
    reference, tmp_path, caplog
):
    """Items 2 and 3: a 3-row prediction file with a valid marker: recomputed, rows kept."""
    out = _copy(reference, tmp_path / "out")
    [preds] = (_cam_run(out) / "preds").glob("*.npy")
    meta = _good_marker(preds)["meta"]
    bcache.save_array(preds, np.full((3, 1, 64, 64), 0.5, np.float16), meta)  # marker matches
    with caplog.at_level(logging.WARNING, logger="benchmark.cache"):
        rows = Runner(_cfg(out, ["cam"])).run_all()
    assert set(rows["status"]) == {"done"}, rows["reason"].iloc[0]
    assert str(preds) in caplog.text and "does not fit" in caplog.text
    assert not _reused(rows, "cam")["segmenter_predict"]
    pd.testing.assert_frame_equal(_quality(read_results(out)), reference[1])
    _assert_cache_sound(out)


@pytest.mark.parametrize(
    "bad",
    [
        np.random.default_rng(0).random((2, 1, 8, 8)),  # the case: too few, float64
        np.full((99, 1, 8, 8), 0.5, np.float16),  # wrong number of images
        np.full((1, 1, 8, 8), 0.5, np.float16),  # (N, C, h, w) differing from train: set below
        np.full((1, 1, 8, 8), 7.0, np.float16),  # right shape, values outside [0, 1]: set below
    ],
    ids=["few_float64", "too_many", "other_size", "out_of_range"],
)
def test_maps_that_do_not_fit_the_split_are_recomputed(bad, request, reference, tmp_path, caplog):
    """Item 3: maps with a matching marker but the wrong shape, dtype or range: recomputed."""
    out = _copy(reference, tmp_path / "out")
    val = _cam_run(out) / "maps" / "val.npy"
    good = bcache.load_array(val)
    if request.node.callspec.id == "other_size":
        bad = np.full((len(good), 1, good.shape[2] + 1, good.shape[3]), 0.5, np.float16)
    if request.node.callspec.id == "out_of_range":
        bad = np.full(good.shape, 7.0, np.float16)
    del good
    bcache.save_array(val, bad, _good_marker(val)["meta"])  # a marker that matches the file
    with caplog.at_level(logging.WARNING, logger="benchmark.cache"):
        rows = Runner(_cfg(out, ["cam"])).run_all()
    assert set(rows["status"]) == {"done"}, rows["reason"].iloc[0]
    assert str(val) in caplog.text and "does not fit" in caplog.text
    assert not _reused(rows, "cam")["maps_val"]
    pd.testing.assert_frame_equal(_quality(read_results(out)), reference[1])  # threshold too
    _assert_cache_sound(out)


def test_segmenter_state_that_does_not_load_is_retrained(reference, tmp_path, caplog):
    """Item 3: a cached segmenter state with a valid marker that does not fit the model."""
    out = _copy(reference, tmp_path / "out")
    [state] = (_cam_run(out) / "stages").glob("segmenter-*-train.pt")
    bcache.save_tensors(state, {"weight": torch.zeros(2)}, _good_marker(state)["meta"])
    with caplog.at_level(logging.WARNING, logger="benchmark.runner"):
        rows = Runner(_cfg(out, ["cam"])).run_all()
    assert set(rows["status"]) == {"done"}, rows["reason"].iloc[0]
    assert str(state) in caplog.text and "does not fit" in caplog.text
    assert not _reused(rows, "cam")["segmenter"]
    pd.testing.assert_frame_equal(_quality(read_results(out)), reference[1])


CACHE_ARRAYS = {"images.npy": "images", "trimaps.npy": "trimaps", "orig_trimaps.npy": "_orig"}


@pytest.mark.parametrize("name", list(CACHE_ARRAYS))
def test_image_cache_byte_flip_is_detected_and_rebuilt(
    name, tiny_dataset, tmp_path, caplog, monkeypatch
):
    """Item 3: a flipped byte in the image cache is caught by its checksum and rebuilt."""
    import datasets
    from datasets import DatasetError, ImageCache
    from datasets import cache as dcache

    names = [r.name for r in tiny_dataset.records[:6]]
    cache = datasets.build_cache(tiny_dataset, names, 16, tmp_path)
    folder, expected = cache.folder, np.array(getattr(cache, CACHE_ARRAYS[name]))
    del cache
    path = folder / name
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x5A  # pixel data, same size
    path.write_bytes(bytes(raw))
    # as in a new process (a cache is verified once per process and file version)
    monkeypatch.setattr(dcache, "_verified", set(), raising=False)
    with pytest.raises(DatasetError, match=f"{name} does not match its checksum"):
        ImageCache.open(folder)
    with caplog.at_level(logging.WARNING, logger="datasets.cache"):
        rebuilt = datasets.build_cache(tiny_dataset, names, 16, tmp_path)
    assert str(path) in caplog.text and "checksum" in caplog.text
    assert rebuilt.folder == folder
    np.testing.assert_array_equal(getattr(rebuilt, CACHE_ARRAYS[name]), expected)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_image_cache_without_checksums_is_rebuilt(tiny_dataset, tmp_path, caplog):
    """Item 3: a cache built before checksums existed is rebuilt once, not trusted."""
    import json

    import datasets
    from datasets.cache import MANIFEST

    names = [r.name for r in tiny_dataset.records[:4]]
    folder = datasets.build_cache(tiny_dataset, names, 16, tmp_path).folder
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["checksums"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING, logger="datasets.cache"):
        rebuilt = datasets.build_cache(tiny_dataset, names, 16, tmp_path)
    assert "no checksums" in caplog.text
    assert "checksums" in rebuilt.manifest


# ---- issue 15: full disk while the image cache is built; unwritable result store ---------------
def test_disk_full_while_building_the_image_cache_is_one_line(
    reference, tmp_path, monkeypatch, capsys
):
    """Item 4: no SIGBUS: space is reserved before mapping, ENOSPC is one line, no temp left.

    A real full tmpfs (``mount -t tmpfs -o size=1m``) gave SIGBUS (exit 135) before; here
    ``posix_fallocate`` reports the full disk as a kernel would.
    """
    out = _copy(reference, tmp_path / "out", ("data",))  # no image cache yet

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full, raising=False)
    code = main(_cli_args(out, ["all_foreground"]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: disk full (No space left on device)"), err[-1]
    assert str(out / "cache") in err[-1] and "images.npy" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not [p.name for p in (out / "cache").iterdir() if not p.name.endswith(".lock")]
    assert not (out / "runs").exists()


def test_image_cache_files_are_preallocated(tiny_dataset, tmp_path, monkeypatch):
    """Item 4: every memory-mapped file gets its blocks reserved (the whole length)."""
    import datasets

    calls: list[int] = []
    real = os.posix_fallocate

    def spy(fd, offset, length):
        calls.append(length)
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", spy)
    names = [r.name for r in tiny_dataset.records[:3]]
    folder = datasets.build_cache(tiny_dataset, names, 16, tmp_path).folder
    mapped = ("images.npy", "trimaps.npy", "orig_trimaps.npy")
    assert sorted(calls) == sorted((folder / f).stat().st_size for f in mapped)


def test_unwritable_result_store_is_one_line_before_any_work(reference, tmp_path, capsys):
    """Item 5 (mine): ``results/rows`` that cannot be written: one line, exit 1, nothing run."""
    out = _copy(reference, tmp_path / "out", ("data", "cache"))
    (out / "results").mkdir()
    (out / "results" / "rows").write_text("not a folder")  # unwritable, even for root
    code = main(_cli_args(out))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: cannot store result rows in") and "rows" in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert not (out / "runs").exists()


def test_result_write_failing_mid_run_is_one_line_and_keeps_rows(
    reference, tmp_path, monkeypatch, capsys
):
    """Item 5 (mine): the store fails after the first method: one line; earlier rows stay."""
    out = _copy(reference, tmp_path / "out")
    before = _row_files(out)
    real = store._write_parquet

    def refuse(path, frame):
        if "rows" in path.parts and path.name.startswith("all_foreground"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path.parent))
        real(path, frame)

    monkeypatch.setattr(store, "_write_parquet", refuse)
    code = main(_cli_args(out))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: cannot store result rows") and "Permission" in err[-1]
    assert "Traceback" not in "\n".join(err)
    after = _row_files(out)  # cam's rows were stored again; all_foreground's old ones stay
    assert after.keys() == before.keys()
    unchanged = {p.name.split("-")[0]: after[p] == before[p] for p in after}
    assert unchanged == {"cam": False, "all_foreground": True}
    pd.testing.assert_frame_equal(_quality(read_results(out)), reference[1])
