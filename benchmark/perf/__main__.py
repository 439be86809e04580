"""``python -m benchmark.perf``: the same command as ``python -m benchmark perf``."""

from __future__ import annotations

import sys

from benchmark.perf.cli import main

if __name__ == "__main__":
    sys.exit(main())
