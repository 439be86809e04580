"""The perf harness: entry registry, options, timing helpers, the run and its table.

Each entry runs OUR code and a BASELINE on the same inputs, in the same process: one warm-up
call each, then the two called in turn for 5 rounds, the faster one as many times per round as
fit in one call of the slower (``time.perf_counter``; :func:`best_pair`: each one's best call;
entries with their own schedule say so in their note). The ratio is
``baseline_s / ours_s`` (a speed-up; > 1 means ours is faster). Entries live in a small registry
(:func:`register_entry`), so new hot paths are one decorated function away. Results are
measurements of this machine (CPU model and torch threads are printed with them), never
hard-coded numbers; no test asserts on them.

An entry function takes the run's :class:`PerfOptions` (``options.smoke``: tiny sizes, for
tests) and returns a dict with at least ``ours_s``, ``baseline_s``, ``target`` (minimum ratio
we aim for, or None) and ``note``; the harness adds ``ratio``, ``met`` and ``status``. An entry
may also return:

- ``comparisons``: further baselines timed against the same ``ours_s``, each
  ``{"baseline": name, "baseline_s": seconds, "target": ratio or None}``; the harness adds
  their ``ratio`` and ``met``, and the table shows them as ``vs <name>`` rows;
- ``checks``: non-timing targets (a crossover, a memory ratio), each
  ``{"what": text, "value": text, "target": text, "met": bool or None}``, shown as rows too.

An entry whose dependencies are missing raises :class:`Unavailable` and is reported as
``unavailable: <reason>`` instead of failing the command.

This module imports no entry: the entry modules (:mod:`benchmark.perf.evaluation`,
:mod:`benchmark.perf.entries`, :mod:`benchmark.perf.stages`) import it and register
themselves, and :mod:`benchmark.perf.cli` imports them all.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

REPEATS = 3


@dataclass(frozen=True)
class PerfOptions:
    """What ``perf``'s command line tells every entry (most read only ``smoke``).

    Attributes:
        smoke: tiny sizes (seconds in total), for tests and quick checks.
        device: torch device of the ``stages`` entry (``cpu``, ``cuda``, ``cuda:N``).
        preset: method preset of the ``stages`` entry (``quick``; ``paper`` on a GPU).
        stage_images: images per stage of the ``stages`` entry (``None``: 24, 16 in smoke mode).
        amp: bf16 autocast in the ``stages`` entry's fast setting (only acts on CUDA).
    """

    smoke: bool = False
    device: str = "cpu"
    preset: str = "quick"
    stage_images: int | None = None
    amp: bool = True


EntryFn = Callable[[PerfOptions], dict[str, Any]]
PERF_ENTRIES: dict[str, EntryFn] = {}


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


def best_times_interleaved(
    fns: dict[str, Callable[[], Any]], rounds: int = 5, min_total: float = 0.0
) -> dict[str, float]:
    """Best wall time of each callable, calling them in turn (one warm-up round first).

    Interleaving makes slow drifts of a shared machine (other jobs starting and stopping) hit
    every contender alike, which matters when two timings are compared at the 5 % level.

    Args:
        fns: name -> zero-argument callable.
        rounds: timed rounds (each calls every function once).
        min_total: keep going (up to ``4 * rounds``) until every function has spent this many
            seconds in timed calls.

    Returns:
        name -> smallest ``time.perf_counter`` difference.
    """
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    spent = dict.fromkeys(fns, 0.0)
    done = 0
    while done < rounds or (min(spent.values()) < min_total and done < 4 * rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            best[name], spent[name] = min(best[name], dt), spent[name] + dt
        done += 1
    return best


def best_pair(
    ours: Callable[[], Any],
    baseline: Callable[[], Any],
    rounds: int = 5,
    min_total: float = 0.5,
) -> tuple[float, float]:
    """Best wall times of ``ours`` and ``baseline``, timed in turn (interleaved).

    On a shared 2-core machine two sequential best-of-3 timings moved ratios by 20-50 % between
    runs minutes apart; alternating the two lets a slow spell hit both. Each round calls the
    faster one as many times as fit in one call of the slower (at most 50), so both get about
    the same timed seconds and the fast one enough samples for its best to hold still. Rounds
    go on (up to 200) until each has spent ``min_total`` seconds, for millisecond-scale pairs.

    Returns:
        ``(ours_s, baseline_s)``: each one's best single call.
    """
    ours(), baseline()  # warm-up
    best = {"ours": math.inf, "baseline": math.inf}
    spent = {"ours": 0.0, "baseline": 0.0}

    def timed(name: str, fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        best[name], spent[name] = min(best[name], elapsed), spent[name] + elapsed
        return elapsed

    first_o, first_b = timed("ours", ours), timed("baseline", baseline)
    reps_o = max(1, min(50, int(first_b / max(first_o, 1e-9))))
    reps_b = max(1, min(50, int(first_o / max(first_b, 1e-9))))
    done = 0
    while done < rounds or (min(spent.values()) < min_total and done < 200):
        for _ in range(reps_o):
            timed("ours", ours)
        for _ in range(reps_b):
            timed("baseline", baseline)
        done += 1
    return best["ours"], best["baseline"]


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


def _run_entry(name: str, fn: EntryFn, options: PerfOptions) -> dict[str, Any]:
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
        "wall_s": None,
    }
    t0 = time.perf_counter()
    try:
        result = fn(options)
    except Unavailable as exc:
        row["status"] = f"unavailable: {exc}"
        logger.warning("perf entry %s unavailable: %s", name, exc)
        return row
    except Exception as exc:  # report and go on with the other entries
        row["status"] = f"error: {type(exc).__name__}: {exc}"
        logger.exception("perf entry %s failed", name)
        return row
    row.update(result)
    row["wall_s"] = time.perf_counter() - t0
    logger.info("perf: %s took %.1f s", name, row["wall_s"])
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


def run_perf(
    smoke: bool = False, only: list[str] | None = None, options: PerfOptions | None = None
) -> dict[str, Any]:
    """Run the registered perf entries, each given the same :class:`PerfOptions`.

    Args:
        smoke: Tiny sizes (seconds in total), for tests and quick checks (also on when
            ``options.smoke`` is).
        only: Entry names to run (default: all).
        options: What the entries are told (default: :class:`PerfOptions` ``()``).

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
    options = options or PerfOptions()
    if smoke and not options.smoke:
        options = dataclasses.replace(options, smoke=True)
    entries = []
    for name in names:
        logger.info("perf: running %s (smoke=%s)", name, options.smoke)
        entries.append(_run_entry(name, PERF_ENTRIES[name], options))
    return {
        "device": device_info(),
        "smoke": options.smoke,
        "repeats": REPEATS,
        "entries": entries,
    }


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
        "ratio = baseline time / our time; ours and the baseline timed in turn (5 rounds, the "
        "faster one repeated to match the slower), each one's best call, after one warm-up",
        "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    walls = [(e["name"], e.get("wall_s")) for e in result["entries"]]
    if any(w is not None for _, w in walls):
        total = sum(w for _, w in walls if w is not None)
        lines += [
            "",
            f"entry wall times (total {total:.0f} s): "
            + ", ".join(f"{name} {w:.0f} s" for name, w in walls if w is not None),
        ]
    if notes:
        lines += ["", "notes:", *notes]
    return "\n".join(lines)
