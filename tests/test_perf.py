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
        assert e["met"] is (e["ratio"] >= e["target"])
        assert e["note"] and e["throughput"]


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
