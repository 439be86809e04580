"""``python -m benchmark perf [--json] [--smoke] [--only NAME ...]``: the perf command.

Imports the harness and every entry module (in table order: the evaluation path, the methods'
hot paths, the stages), reads the command line into one :class:`PerfOptions` and hands it to
every entry through :func:`~benchmark.perf.harness.run_perf`; nothing is set from outside.
"""

from __future__ import annotations

import argparse
import json
import logging

from benchmark.perf.harness import PERF_ENTRIES, PerfOptions, format_table, run_perf

# The entry modules register themselves when imported, in this order: the table's order.
# isort: split
import benchmark.perf.evaluation  # noqa: F401

# isort: split
import benchmark.perf.entries  # noqa: F401

# isort: split
import benchmark.perf.scale  # noqa: F401

# isort: split
import benchmark.perf.stages  # noqa: F401

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The ``perf`` command line (entry names listed in ``--only``'s help)."""
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
    parser.add_argument(
        "--stage-images", type=int, help="images per stage (default 24; 16 with --smoke)"
    )
    parser.add_argument(
        "--no-amp", dest="amp", action="store_false", help="stages: no bf16 autocast on CUDA"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmark perf [--json] [--smoke] [--only NAME ...]``.

    Args:
        argv: Arguments after ``perf`` (default: ``sys.argv[1:]``).

    Returns:
        0 when every entry ran or was unavailable, 1 when an entry failed.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    options = PerfOptions(
        smoke=args.smoke,
        device=args.device,
        preset=args.preset,
        stage_images=args.stage_images,
        amp=args.amp,
    )
    if args.only:
        unknown = [n for n in args.only if n not in PERF_ENTRIES]
        if unknown:
            parser.error(f"unknown entries {unknown}; valid: {', '.join(PERF_ENTRIES)}")
    result = run_perf(only=args.only, options=options)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
    return 1 if any(e["status"].startswith("error") for e in result["entries"]) else 0
