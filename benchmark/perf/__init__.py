"""``python -m benchmark perf``: time our hot paths against plain baselines, in one process.

The package, layered so that nothing imports upwards:

- :mod:`benchmark.perf.harness`: the entry registry, :class:`PerfOptions`, the timing helpers,
  :class:`Unavailable`, :func:`run_perf` and the table; it imports no entry.
- entry modules, each importing only the harness and registering itself:
  :mod:`~benchmark.perf.evaluation` (threshold sweep, confusion matrices, image cache),
  :mod:`~benchmark.perf.entries` (CAM, FineCAM, dense CRF, random walk),
  :mod:`~benchmark.perf.scale` (the whole pipeline at 1x and 4x images) and
  :mod:`~benchmark.perf.stages` (every method's training stages and maps);
- :mod:`benchmark.perf.cli`: imports the harness and the entries, reads the command line into
  one :class:`PerfOptions` and passes it to every entry.

Importing this package gives the harness's API with every entry registered, and :func:`main`.
"""

from __future__ import annotations

from benchmark.perf.cli import main
from benchmark.perf.harness import (
    PERF_ENTRIES,
    REPEATS,
    EntryFn,
    PerfOptions,
    Unavailable,
    best_time,
    best_times_interleaved,
    device_info,
    format_table,
    list_entries,
    register_entry,
    run_perf,
)

__all__ = [
    "PERF_ENTRIES",
    "REPEATS",
    "EntryFn",
    "PerfOptions",
    "Unavailable",
    "best_time",
    "best_times_interleaved",
    "device_info",
    "format_table",
    "list_entries",
    "main",
    "register_entry",
    "run_perf",
]
