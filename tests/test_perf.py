"""Smoke test of ``python -m benchmark perf``: it runs at tiny sizes and reports ratios.

No timing assertions: only that every entry ran (or says why it could not) and that the
reported ratio is the one computed from the reported times.
"""

from __future__ import annotations

import json

import pytest

from benchmark import perf


def test_perf_smoke_json_reports_every_entry(capsys):
    assert perf.main(["--smoke", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["smoke"] is True
    assert result["device"]["cpu"]
    assert result["device"]["torch_threads"] >= 1
    entries = {e["name"]: e for e in result["entries"]}
    assert list(entries) == perf.list_entries()
    assert {"threshold_sweep", "confusion_matrix", "image_cache"} <= set(entries)
    # entries that depend only on benchmark.evaluate must run here
    for name in ("threshold_sweep", "confusion_matrix", "confusion_matrix_4class"):
        assert entries[name]["status"] == "ok", entries[name]["status"]
    for e in entries.values():
        if e["status"] != "ok":
            assert e["status"].startswith("unavailable: "), e["status"]
            continue
        assert e["ours_s"] > 0 and e["baseline_s"] > 0
        assert e["ratio"] == pytest.approx(e["baseline_s"] / e["ours_s"])
        assert e["met"] is (None if e["target"] is None else e["ratio"] >= e["target"])
        assert e["note"] and e["throughput"]
        for comp in e["comparisons"]:
            assert comp["ratio"] == pytest.approx(comp["baseline_s"] / e["ours_s"])
            target = comp["target"]
            assert comp["met"] is (None if target is None else comp["ratio"] >= target)
        for check in e["checks"]:
            assert check["what"] and check["value"] and check["met"] in (True, False, None)


def test_perf_table_prints_device_and_ratio(capsys):
    assert perf.main(["--smoke", "--only", "threshold_sweep"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("device: ") and "torch threads" in out
    header = next(line for line in out.splitlines() if line.startswith("entry"))
    assert "ours" in header and "baseline" in header and "ratio" in header
    row = next(line for line in out.splitlines() if line.startswith("threshold_sweep"))
    assert "x " in row  # a ratio such as "23.4x"


def test_unknown_entry_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        perf.main(["--smoke", "--only", "nope"])
    assert info.value.code == 2
    assert "threshold_sweep" in capsys.readouterr().err  # lists the valid names


def test_unavailable_and_failing_entries_are_reported(monkeypatch, capsys):
    def missing(smoke):
        raise perf.Unavailable("needs a GPU")

    def broken(smoke):
        raise RuntimeError("boom")

    monkeypatch.setitem(perf.PERF_ENTRIES, "missing", missing)
    monkeypatch.setitem(perf.PERF_ENTRIES, "broken", broken)
    result = perf.run_perf(smoke=True, only=["missing", "broken"])
    status = {e["name"]: e["status"] for e in result["entries"]}
    assert status == {"missing": "unavailable: needs a GPU", "broken": "error: RuntimeError: boom"}
    assert perf.main(["--smoke", "--only", "missing"]) == 0
    assert perf.main(["--smoke", "--only", "broken"]) == 1
    assert "error: RuntimeError: boom" in capsys.readouterr().out


NEW_ENTRIES = {
    # name -> keys its row must carry besides the common ones
    "cam_extraction": {"max_abs_diff"},
    "finecam": {"max_abs_diff"},
    "dense_crf": {"workers"},
    "random_walk": {"grids", "crossover_side"},
    "scale": {"wall_ratio", "peak_mem_ratio", "runs"},
}


@pytest.mark.parametrize("name", sorted(NEW_ENTRIES))
def test_new_entries_run_in_smoke_mode(name):
    result = perf.run_perf(smoke=True, only=[name])
    (row,) = result["entries"]
    if name == "cam_extraction" and row["status"].startswith("unavailable"):
        assert "install wsss-bench[bench]" in row["status"]
        pytest.importorskip("torchcam")  # only acceptable without the bench extras
        pytest.importorskip("pytorch_grad_cam")
    assert row["status"] == "ok", row["status"]
    assert NEW_ENTRIES[name] <= set(row), sorted(row)
    assert row["ours_s"] > 0 and row["baseline_s"] > 0 and row["target"] is not None
    assert row["ratio"] == pytest.approx(row["baseline_s"] / row["ours_s"])
    if name == "cam_extraction":
        assert {c["baseline"] for c in row["comparisons"]} == {
            "torchcam CAM",
            "GradCAM",
            "GradCAM, channels_last model + input (info: its best case)",
            "bare forward in channels_last (info)",
        }
        assert max(row["max_abs_diff"].values()) < 1e-5
    if name == "finecam":
        assert row["max_abs_diff"] < 1e-4
    if name == "random_walk":
        sides = [g["side"] for g in row["grids"]]
        assert len(sides) >= 2 and sides == sorted(sides)
        for g in row["grids"]:
            assert g["auto"] in ("dense", "sparse") and g["dense_s"] > 0 and g["sparse_s"] > 0
    if name == "scale":
        small, large = row["runs"]
        assert large["n"] == 4 * small["n"]
        assert small["peak_mb"] > 0 and large["peak_mb"] > 0
        assert row["peak_mem_ratio"] == pytest.approx(large["peak_mb"] / small["peak_mb"])


def test_comparison_and_check_rows_in_table(monkeypatch, capsys):
    def entry(smoke):
        return {
            "ours_s": 1.0,
            "baseline_s": 2.0,
            "target": 1.5,
            "note": "n",
            "throughput": "t",
            "comparisons": [{"baseline": "other lib", "baseline_s": 0.5, "target": 1.0}],
            "checks": [{"what": "memory", "value": "1.1x", "target": "<= 1.2x", "met": True}],
        }

    monkeypatch.setitem(perf.PERF_ENTRIES, "fake", entry)
    result = perf.run_perf(smoke=True, only=["fake"])
    (row,) = result["entries"]
    assert row["met"] is True
    assert row["comparisons"][0]["ratio"] == pytest.approx(0.5)
    assert row["comparisons"][0]["met"] is False
    out = perf.format_table(result)
    assert "vs other lib" in out and "0.50x" in out and "check: memory" in out


def test_auto_walk_mode_follows_the_limits(monkeypatch):
    import torch

    from methods.common import random_walk as rw

    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert rw.auto_walk_mode(rw.DENSE_MAX_NODES["cpu"]) == "dense"
    assert rw.auto_walk_mode(rw.DENSE_MAX_NODES["cpu"] + 1) == "sparse"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert rw.auto_walk_mode(rw.DENSE_MAX_NODES_MULTITHREAD_CPU) == "dense"
    assert rw.auto_walk_mode(rw.DENSE_MAX_NODES_MULTITHREAD_CPU + 1) == "sparse"
    assert rw.auto_walk_mode(rw.DENSE_MAX_NODES["cuda"], "cuda") == "dense"
    assert rw.auto_walk_mode(rw.DENSE_MAX_NODES["cuda"] + 1, "cuda") == "sparse"


def test_stages_entry_times_every_stage_of_every_method_in_both_settings():
    from benchmark.perf import stages

    result = perf.run_perf(smoke=True, only=["stages"])
    (row,) = result["entries"]
    assert row["status"] == "ok", row["status"]
    fast, plain = row["stages"]["fast"], row["stages"]["plain"]
    assert [r["what"] for r in fast] == [r["what"] for r in plain]
    whats = [r["what"] for r in fast]
    from methods.base import Method, get_method

    for name in (*stages.stage_methods(), "segmenter"):
        assert f"{name}/maps" in whats
        if name != "segmenter" and get_method(name).fit is Method.fit:
            continue  # nothing to train (box_prior draws its maps from the boxes)
        assert any(w.startswith(f"{name}/") and w.endswith("(train)") for w in whats), whats
    assert "cam_affinitynet/affinity (train)" in whats  # a method's second stage is timed too
    for r in fast + plain:
        assert r["seconds"] > 0 and r["ips"] > 0
    assert row["ours_s"] == pytest.approx(sum(r["seconds"] for r in fast))
    assert row["baseline_s"] == pytest.approx(sum(r["seconds"] for r in plain))
    assert len(row["checks"]) == len(fast) and row["met"] is None


def test_stages_options_come_from_the_command_line(monkeypatch):
    seen = {}

    def entry(options):
        seen["opts"] = options
        return {"ours_s": 1.0, "baseline_s": 1.0, "target": None, "note": "n", "throughput": "t"}

    monkeypatch.setitem(perf.PERF_ENTRIES, "stages", entry)
    assert (
        perf.main(["--smoke", "--only", "stages", "--preset", "tiny", "--stage-images", "5"]) == 0
    )
    assert seen["opts"].preset == "tiny" and seen["opts"].stage_images == 5
    assert seen["opts"].device == "cpu" and seen["opts"].amp is True and seen["opts"].smoke


def test_stages_entry_times_every_registered_method(monkeypatch):
    from dataclasses import dataclass

    from benchmark.perf import stages
    from methods.base import _REGISTRY, Method

    @dataclass(frozen=True)
    class NewConfig:
        pass

    class NewMethod(Method):
        name = "perf_new_method"
        Config = NewConfig

    class NewReference(NewMethod):
        name = "perf_new_reference"
        kind = "reference"

    import methods  # noqa: F401  (the registry is complete)

    before = stages.stage_methods()
    assert "cam" in before and "centre_prior" not in before  # references are not timed
    monkeypatch.setitem(_REGISTRY, NewMethod.name, NewMethod)
    monkeypatch.setitem(_REGISTRY, NewReference.name, NewReference)
    assert stages.stage_methods() == sorted([*before, NewMethod.name])


def test_entries_keep_the_table_order():
    assert perf.list_entries() == [
        "threshold_sweep",
        "confusion_matrix",
        "confusion_matrix_4class",
        "image_cache",
        "cam_extraction",
        "finecam",
        "dense_crf",
        "random_walk",
        "scale",
        "stages",
    ]


def test_harness_imports_no_entry():
    import ast
    import inspect

    from benchmark.perf import harness

    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(harness))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
    assert not [m for m in imported if m.startswith("benchmark.perf")], imported


def test_best_pair_interleaves_and_repeats_the_faster_one():
    """Ours and the baseline alternate; the faster is called about slow/fast times per round,
    so both get similar timed seconds; each one's best call is returned."""
    import time

    from benchmark.perf.harness import best_pair

    calls: list[str] = []

    def fast() -> None:
        calls.append("f")
        time.sleep(0.001)

    def slow() -> None:
        calls.append("s")
        time.sleep(0.008)

    ours_s, base_s = best_pair(fast, slow, rounds=3, min_total=0.0)
    assert 0.001 <= ours_s < 0.008 <= base_s
    rounds = "".join(calls[4:]).split("s")  # after the warm-up and the first timed pair
    assert calls[:4] == ["f", "s", "f", "s"] and len(rounds) >= 4
    assert all(2 <= len(r) <= 8 for r in rounds[:3])  # several fast calls between slow ones
