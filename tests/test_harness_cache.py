from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from benchmark import cache as bcache
from benchmark.store import read_results, write_rows


def test_marker_written_last_and_detects_truncation(tmp_path, caplog):
    path = tmp_path / "x.npy"
    bcache.save_array(path, np.arange(100, dtype=np.float32))
    assert bcache.read_marker(path) is not None
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # truncated on disk
    with caplog.at_level(logging.WARNING):
        assert bcache.read_marker(path) is None
    assert "x.npy" in caplog.text and "truncated" in caplog.text


def test_altered_file_detected(tmp_path, caplog):
    path = tmp_path / "s.pt"
    bcache.save_tensors(path, {"w": torch.ones(3)})
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING):
        assert bcache.read_marker(path) is None
    assert "checksum" in caplog.text


def test_output_without_marker_is_not_done(tmp_path):
    path = tmp_path / "y.npy"
    np.save(path, np.zeros(3))
    assert bcache.read_marker(path) is None


def test_cached_tensors_computes_once(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"a": torch.arange(4)}

    first, reused1 = bcache.cached_tensors(tmp_path / "t.pt", compute)
    second, reused2 = bcache.cached_tensors(tmp_path / "t.pt", compute)
    assert (reused1, reused2) == (False, True)
    assert len(calls) == 1 and torch.equal(first["a"], second["a"])
    bcache.cached_tensors(tmp_path / "t.pt", compute, force=True)
    assert len(calls) == 2


class Evil:
    """A class that plain pickle would instantiate on load."""


def test_load_tensors_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path)
    try:
        bcache.load_tensors(path)
    except Exception as exc:  # weights_only=True refuses arbitrary classes
        assert "weights_only" in str(exc) or "Unsupported" in str(exc) or "global" in str(exc)
    else:
        raise AssertionError("a pickled object was loaded")


def test_atomic_write_leaves_no_temp_on_failure(tmp_path, monkeypatch):
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    try:
        bcache.atomic_write_bytes(tmp_path / "f.bin", b"abc")
    except OSError:
        pass
    assert list(tmp_path.iterdir()) == []


def test_store_rows_round_trip(tmp_path):
    write_rows(tmp_path, "run-a", [{"method_id": "cam", "metric": "iou", "value": 0.5}])
    write_rows(tmp_path, "run-b", [{"method_id": "cam", "metric": "iou", "value": 0.7}])
    write_rows(tmp_path, "run-a", [{"method_id": "cam", "metric": "iou", "value": 0.6}])
    rows = read_results(tmp_path)
    assert isinstance(rows, pd.DataFrame)
    assert sorted(rows["value"]) == [0.6, 0.7]


def test_stable_hash_is_order_independent():
    assert bcache.stable_hash({"a": 1, "b": 2}) == bcache.stable_hash({"b": 2, "a": 1})
    assert bcache.stable_hash({"a": 1}) != bcache.stable_hash({"a": 2})
