"""``python -m benchmark perf``: time our hot paths against plain baselines, in one process.

Each entry runs OUR code and a BASELINE on the same inputs, in the same process: one warm-up
call each, then the best of at least 3 timed calls, more until 0.5 s were spent
(``time.perf_counter``; :func:`best_time`). The ratio is
``baseline_s / ours_s`` (a speed-up; > 1 means ours is faster). Entries live in a small registry
(:func:`register_entry`), so new hot paths are one decorated function away. Results are
measurements of this machine (CPU model and torch threads are printed with them), never
hard-coded numbers; no test asserts on them.

An entry function takes ``smoke`` (tiny sizes, for tests) and returns a dict with at least
``ours_s``, ``baseline_s``, ``target`` (minimum ratio we aim for, or None) and ``note``; the
harness adds ``ratio``, ``met`` and ``status``. An entry may also return:

- ``comparisons``: further baselines timed against the same ``ours_s``, each
  ``{"baseline": name, "baseline_s": seconds, "target": ratio or None}``; the harness adds
  their ``ratio`` and ``met``, and the table shows them as ``vs <name>`` rows;
- ``checks``: non-timing targets (a crossover, a memory ratio), each
  ``{"what": text, "value": text, "target": text, "met": bool or None}``, shown as rows too.

An entry whose dependencies are missing raises :class:`Unavailable` and is reported as
``unavailable: <reason>`` instead of failing the command. The entries beyond the evaluator's
live in :mod:`benchmark.perf_entries` (imported at the end of this module).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmark.evaluate import ThresholdSweep, confusion_matrix, sweep_naive

logger = logging.getLogger(__name__)

EntryFn = Callable[[bool], dict[str, Any]]
PERF_ENTRIES: dict[str, EntryFn] = {}
REPEATS = 3


class Unavailable(Exception):
    """An entry cannot run here (a package or API it needs is missing)."""


def register_entry(name: str) -> Callable[[EntryFn], EntryFn]:
    """Register a perf entry under ``name``.

    Args:
        name: Entry name shown in the table; must be unique.

    Returns:
        A decorator that registers and returns the function unchanged.

    Raises:
        ValueError: ``name`` is already registered.
    """

    def deco(fn: EntryFn) -> EntryFn:
        if name in PERF_ENTRIES:
            raise ValueError(f"perf entry {name!r} is already registered")
        PERF_ENTRIES[name] = fn
        return fn

    return deco


def list_entries() -> list[str]:
    """Names of the registered perf entries, in registration order."""
    return list(PERF_ENTRIES)


def best_time(fn: Callable[[], Any], repeats: int = REPEATS, min_total: float = 0.5) -> float:
    """Warm up once, then return the best wall-clock timing in seconds.

    Times at least ``repeats`` calls and goes on until ``min_total`` seconds were spent (at
    most 200 calls), so that millisecond-scale paths get enough samples for their best to be
    stable while slow baselines are not repeated needlessly.

    Args:
        fn: Zero-argument callable to time.
        repeats: Minimum number of timed calls.
        min_total: Keep timing until this many seconds were spent in timed calls.

    Returns:
        The smallest ``time.perf_counter`` difference.
    """
    fn()
    best, total, calls = math.inf, 0.0, 0
    while calls < repeats or (total < min_total and calls < 200):
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        best, total, calls = min(best, elapsed), total + elapsed, calls + 1
    return best


def device_info() -> dict[str, Any]:
    """CPU model, core count, torch threads and library versions of this process."""
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu or platform.processor() or platform.machine() or "unknown",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover - torch is a hard dependency
        info["torch_threads"] = None
    return info


def _random_sweep_data(
    n: int, size: int, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Random float32 maps (a tenth of the pixels exactly on the 0.01 grid) and {0,1,255} GT."""
    rng = np.random.default_rng(seed)
    maps, gts = [], []
    for _ in range(n):
        m = rng.random((size, size), dtype=np.float32)
        on_grid = rng.random((size, size)) < 0.1
        m[on_grid] = rng.integers(0, 101, int(on_grid.sum())) / np.float32(100)
        g = (rng.random((size, size)) < 0.4).astype(np.uint8)
        g[rng.random((size, size)) < 0.05] = 255
        maps.append(m)
        gts.append(g)
    return maps, gts


@register_entry("threshold_sweep")
def _threshold_sweep(smoke: bool) -> dict[str, Any]:
    n, size, n_bins = (10, 32, 100) if smoke else (200, 128, 100)
    maps, gts = _random_sweep_data(n, size)
    thresholds = np.arange(n_bins + 1) / n_bins

    def ours() -> Any:
        sweep = ThresholdSweep(n_bins)
        sweep.add_many(maps, gts)  # batched path: one bincount per ~65k pixels
        return sweep.counts()

    def baseline() -> Any:
        return sweep_naive(maps, gts, thresholds)

    a, b = ours(), baseline()
    same = all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("tp", "fp", "fn", "tn"))
    if not same:
        raise RuntimeError("one-pass sweep and naive loop disagree: refusing to time them")
    ours_s, base_s = best_time(ours), best_time(baseline)
    return {
        "ours_s": ours_s,
        "baseline_s": base_s,
        "target": 50.0,
        "throughput": f"{n / ours_s:,.0f} maps/s vs {n / base_s:,.0f} maps/s",
        "note": f"{n} maps {size}x{size}, {n_bins + 1} thresholds; ThresholdSweep.add_many vs "
        "sweep_naive (one confusion_matrix per threshold and image); counts identical",
    }


def _bool_sum_confusion(pred: np.ndarray, gt: np.ndarray, ignore: int = 255) -> np.ndarray:
    """Plain numpy baseline: binary confusion matrix from masked boolean sums, no validation."""
    valid = gt != ignore
    fg = (pred == 1) & valid
    pos = gt == 1
    tp = np.count_nonzero(fg & pos)
    fp = np.count_nonzero(fg) - tp
    fn = np.count_nonzero(pos) - tp
    tn = np.count_nonzero(valid) - tp - fp - fn
    return np.array([[tn, fp], [fn, tp]], dtype=np.int64)


def _histogram2d_confusion(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int = 255
) -> np.ndarray:
    """Plain numpy baseline: ``np.histogram2d`` of (GT, prediction) over non-ignored pixels."""
    valid = gt != ignore
    h, _, _ = np.histogram2d(
        gt[valid], pred[valid], bins=num_classes, range=[[0, num_classes], [0, num_classes]]
    )
    return h.astype(np.int64)


def _label_data(
    n: int, size: int, num_classes: int, seed: int = 1
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    preds, gts = [], []
    for _ in range(n):
        preds.append(rng.integers(0, num_classes, (size, size), dtype=np.uint8))
        g = rng.integers(0, num_classes, (size, size), dtype=np.uint8)
        g[rng.random((size, size)) < 0.05] = 255
        gts.append(g)
    return preds, gts


def _confusion_entry(
    smoke: bool, num_classes: int, baseline_fn: Callable[..., np.ndarray], target: float, what: str
) -> dict[str, Any]:
    n, size = (10, 64) if smoke else (200, 256)
    preds, gts = _label_data(n, size, num_classes)
    for p, g in zip(preds[:3], gts[:3]):
        if not np.array_equal(confusion_matrix(p, g, num_classes), baseline_fn(p, g)):
            raise RuntimeError("confusion_matrix and its baseline disagree: refusing to time them")

    def ours() -> None:
        for p, g in zip(preds, gts):
            confusion_matrix(p, g, num_classes)

    def baseline() -> None:
        for p, g in zip(preds, gts):
            baseline_fn(p, g)

    ours_s, base_s = best_time(ours), best_time(baseline)
    pixels = n * size * size
    return {
        "ours_s": ours_s,
        "baseline_s": base_s,
        "target": target,
        "throughput": f"{pixels / ours_s / 1e6:,.0f} Mpx/s vs {pixels / base_s / 1e6:,.0f} Mpx/s",
        "note": f"{n} x {size}x{size}, {num_classes} classes, 5% ignore; {what}",
    }


@register_entry("confusion_matrix")
def _confusion_binary(smoke: bool) -> dict[str, Any]:
    return _confusion_entry(
        smoke,
        2,
        _bool_sum_confusion,
        0.5,
        "baseline: masked boolean sums without input validation; ours also checks every GT "
        "value and the prediction range, target: at most 2x the bare baseline's time",
    )


@register_entry("confusion_matrix_4class")
def _confusion_multiclass(smoke: bool) -> dict[str, Any]:
    return _confusion_entry(
        smoke,
        4,
        lambda p, g: _histogram2d_confusion(p, g, 4),
        1.0,
        "baseline: np.histogram2d over non-ignored pixels; ours: one np.bincount with validation",
    )


@register_entry("image_cache")
def _image_cache(smoke: bool) -> dict[str, Any]:
    try:
        import datasets
        from datasets import cache as dcache
    except ImportError as exc:
        raise Unavailable(f"datasets.cache cannot be imported ({exc})") from exc
    missing = [
        f"{mod.__name__}.{attr}"
        for mod, attr in (
            (datasets, "create_dataset"),
            (datasets, "build_cache"),
            (dcache, "read_epoch_pil"),
            (dcache, "read_epoch_cache"),
        )
        if not hasattr(mod, attr)
    ]
    if missing:
        raise Unavailable(f"missing API: {', '.join(missing)}")
    preset, size = ("tiny", 128) if smoke else ("quick", 128)
    with tempfile.TemporaryDirectory(prefix="wsss-perf-") as tmp:
        ds = datasets.create_dataset("synthetic", root=Path(tmp) / "synth", preset=preset)
        names = [r.name for r in ds.records]
        cache = datasets.build_cache(ds, names, size, Path(tmp) / "cache")
        ours_s = best_time(lambda: dcache.read_epoch_cache(cache))
        base_s = best_time(lambda: dcache.read_epoch_pil(ds, names, size))
    n = len(names)
    return {
        "ours_s": ours_s,
        "baseline_s": base_s,
        "target": 5.0,
        "throughput": f"{n / ours_s:,.0f} img/s vs {n / base_s:,.0f} img/s",
        "note": f"one epoch of {n} synthetic '{preset}' images at {size} px: ImageCache "
        "(memory-mapped uint8, files in the OS page cache after the warm-up) vs PIL decode + "
        "resize",
    }


def _run_entry(name: str, fn: EntryFn, smoke: bool) -> dict[str, Any]:
    row: dict[str, Any] = {
        "name": name,
        "status": "ok",
        "ours_s": None,
        "baseline_s": None,
        "ratio": None,
        "target": None,
        "met": None,
        "throughput": "",
        "note": "",
        "comparisons": [],
        "checks": [],
    }
    try:
        result = fn(smoke)
    except Unavailable as exc:
        row["status"] = f"unavailable: {exc}"
        logger.warning("perf entry %s unavailable: %s", name, exc)
        return row
    except Exception as exc:  # report and go on with the other entries
        row["status"] = f"error: {type(exc).__name__}: {exc}"
        logger.exception("perf entry %s failed", name)
        return row
    row.update(result)
    ours_s, base_s = float(row["ours_s"]), float(row["baseline_s"])
    row["ratio"] = _ratio(base_s, ours_s)
    if row["target"] is not None:
        row["met"] = bool(row["ratio"] >= float(row["target"]))
    comparisons = []
    for comp in row.get("comparisons") or []:
        comp = dict(comp)
        comp["ratio"] = _ratio(float(comp["baseline_s"]), float(comp.get("ours_s", ours_s)))
        target = comp.get("target")
        comp["met"] = None if target is None else bool(comp["ratio"] >= float(target))
        comparisons.append(comp)
    row["comparisons"] = comparisons
    row["checks"] = [dict(c) for c in row.get("checks") or []]
    return row


def _ratio(baseline_s: float, ours_s: float) -> float:
    return baseline_s / ours_s if ours_s > 0 else math.inf


def run_perf(smoke: bool = False, only: list[str] | None = None) -> dict[str, Any]:
    """Run the registered perf entries.

    Args:
        smoke: Tiny sizes (seconds in total), for tests and quick checks.
        only: Entry names to run (default: all).

    Returns:
        ``{"device": device_info(), "smoke": smoke, "repeats": 3, "entries": [row, ...]}``;
        each row has ``name``, ``status`` (``ok``, ``unavailable: ...`` or ``error: ...``),
        ``ours_s``, ``baseline_s``, ``ratio`` (baseline / ours), ``target``, ``met``,
        ``throughput`` and ``note``.

    Raises:
        ValueError: An unknown entry name in ``only``.
    """
    names = list(PERF_ENTRIES) if only is None else list(only)
    unknown = [n for n in names if n not in PERF_ENTRIES]
    if unknown:
        raise ValueError(
            f"unknown perf entries {unknown}; valid: {', '.join(PERF_ENTRIES) or '(none)'}"
        )
    entries = []
    for name in names:
        logger.info("perf: running %s (smoke=%s)", name, smoke)
        entries.append(_run_entry(name, PERF_ENTRIES[name], smoke))
    return {"device": device_info(), "smoke": smoke, "repeats": REPEATS, "entries": entries}


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def _fmt_met(met: bool | None) -> str:
    return "-" if met is None else ("yes" if met else "NO")


def format_table(result: dict[str, Any]) -> str:
    """Render :func:`run_perf`'s result as a plain-text table with a device line.

    Args:
        result: The dict returned by :func:`run_perf`.

    Returns:
        The table as a string.
    """
    dev = result["device"]
    header = ("entry", "ours", "baseline", "ratio", "target", "met", "throughput (ours vs base)")
    rows = []
    notes = []
    for e in result["entries"]:
        if e["status"] != "ok":
            rows.append((e["name"], "-", "-", "-", "-", "-", e["status"]))
            continue
        rows.append(
            (
                e["name"],
                _fmt_time(e["ours_s"]),
                _fmt_time(e["baseline_s"]),
                f"{e['ratio']:.2f}x",
                "-" if e["target"] is None else f">= {e['target']:g}x",
                _fmt_met(e["met"]),
                e["throughput"],
            )
        )
        notes.append(f"  {e['name']}: {e['note']}")
        for comp in e.get("comparisons", []):
            rows.append(
                (
                    f"  vs {comp['baseline']}",
                    _fmt_time(comp.get("ours_s", e["ours_s"])),
                    _fmt_time(comp["baseline_s"]),
                    f"{comp['ratio']:.2f}x",
                    "-" if comp.get("target") is None else f">= {comp['target']:g}x",
                    _fmt_met(comp.get("met")),
                    comp.get("throughput", ""),
                )
            )
        for check in e.get("checks", []):
            rows.append(
                (
                    f"  check: {check['what']}",
                    "",
                    "",
                    str(check["value"]),
                    str(check.get("target") or "-"),
                    _fmt_met(check.get("met")),
                    "",
                )
            )
    ok_rows = [r for r in rows if r[1] != "-" or r[2] != "-"]
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header) - 1)]
    widths.append(max(len(str(r[-1])) for r in (header, *ok_rows)))  # statuses may overflow
    lines = [
        f"device: {dev['cpu']} ({dev['cpu_count']} cores), torch threads "
        f"{dev.get('torch_threads')}, numpy {dev['numpy']}"
        + ("  [smoke sizes]" if result.get("smoke") else ""),
        f"ratio = baseline time / our time; best of >= {result.get('repeats', REPEATS)} timed "
        "calls (more until 0.5 s) after one warm-up",
        "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmark perf [--json] [--smoke] [--only NAME ...]``.

    Args:
        argv: Arguments after ``perf`` (default: ``sys.argv[1:]``).

    Returns:
        0 when every entry ran or was unavailable, 1 when an entry failed.
    """
    parser = argparse.ArgumentParser(
        prog="python -m benchmark perf",
        description="Time our hot paths against plain baselines on this machine.",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help=f"entries to run: {', '.join(PERF_ENTRIES)}"
    )
    parser.add_argument("--device", default="cpu", help="device of the stages entry (cpu)")
    parser.add_argument(
        "--preset", default="quick", choices=("paper", "quick", "tiny"), help="stages preset"
    )
    parser.add_argument("--stage-images", type=int, help="images per stage (default 64)")
    parser.add_argument(
        "--no-amp", dest="amp", action="store_false", help="stages: no bf16 autocast on CUDA"
    )
    args = parser.parse_args(argv)
    perf_stages.OPTIONS = perf_stages.StageOptions(
        device=args.device, preset=args.preset, images=args.stage_images, amp=args.amp
    )
    if args.only:
        unknown = [n for n in args.only if n not in PERF_ENTRIES]
        if unknown:
            parser.error(f"unknown entries {unknown}; valid: {', '.join(PERF_ENTRIES)}")
    result = run_perf(smoke=args.smoke, only=args.only)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 1 if any(e["status"].startswith("error") for e in result["entries"]) else 0


# The entries beyond the evaluator's (CAM, FineCAM, CRF, random walk, scale, stages) register
# themselves.
from benchmark import perf_entries, perf_stages  # noqa: E402,F401

if __name__ == "__main__":  # ``python -m benchmark.perf``: use the registry the entries fill
    from benchmark.perf import main as _main

    raise SystemExit(_main())
