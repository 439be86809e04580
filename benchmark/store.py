"""The result store: tidy rows, one parquet file per run, read back with one function.

Each run writes its rows to ``<out>/results/rows/<run_key>.parquet`` and its per-image values to
``<out>/results/per_image/<run_key>.parquet``, atomically (temporary file + rename). Several
processes may therefore append at once without losing a row: they never write the same file
unless they computed the same run, in which case the last identical write wins. Files are parsed
as parquet (data, never code), so a results folder written by another user is safe to read.

Completed rows are never replaced by a failure: rows that hold no completed status (``done`` or
``budget``; e.g. one ``error`` row of a re-run that failed on a damaged cache file) are not
written over a stored file of the same run that does hold completed rows. Those rows were
computed by the identical run (same key: data, split, code, method and segmenter settings), so
they stay the run's result; the failure is logged (and the runner keeps its traceback).
"""

from __future__ import annotations

import io
import logging
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from benchmark.cache import OutputError, atomic_write_bytes
from benchmark.cache import atomic_write_text as atomic_write_text  # reports/ use it

logger = logging.getLogger(__name__)

ROWS = "rows"
PER_IMAGE = "per_image"
#: Statuses of a completed run (a budget-cut run keeps its partial result).
COMPLETED = ("done", "budget")


def _write_parquet(path: Path, frame: pd.DataFrame) -> None:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    atomic_write_bytes(path, buf.getvalue())


def write_curve(out: Path, name: str, frame: pd.DataFrame, folder: str = "curves") -> Path:
    """Write a validation IoU-vs-threshold curve to ``OUT/results/<folder>/<name>.parquet``.

    ``folder`` is ``curves`` for the runner's sweeps, ``sweep_curves`` for threshold studies.
    """
    path = Path(out) / "results" / folder / f"{name}.parquet"
    _write_parquet(path, frame)
    return path


def rows_path(out: str | Path, run_key: str) -> Path:
    """The file holding one run's result rows."""
    return Path(out) / "results" / ROWS / f"{run_key}.parquet"


def completed_rows(path: Path) -> int:
    """How many rows of a stored rows file have a completed status (0 if absent or unreadable)."""
    if not path.is_file():
        return 0
    try:
        status = pd.read_parquet(path, columns=["status"])["status"]
    except Exception:  # noqa: BLE001 - unreadable or without a status column: nothing to keep
        return 0
    return int(status.isin(COMPLETED).sum())


def write_rows(out: Path, run_key: str, rows: list[dict[str, Any]]) -> Path:
    """Write one run's result rows, replacing an earlier write of the same run.

    Rows without a completed status (a failure) never replace stored completed rows: those are
    kept, and a warning says so.
    """
    path = rows_path(out, run_key)
    frame = pd.DataFrame(rows)
    failed = "status" in frame and not frame["status"].isin(COMPLETED).any()
    kept = completed_rows(path) if failed else 0
    if kept:
        logger.warning(
            "%s: kept its %d completed rows; this failure is not stored over them", path, kept
        )
        return path
    _write_parquet(path, frame)
    return path


def check_writable(out: str | Path) -> None:
    """Check, before any work, that result rows can be stored under ``out``.

    Raises:
        OutputError: ``OUT/results/rows`` cannot be created or written (read-only mount, a file
            in its place, no permission); the message names the folder.
    """
    folder = Path(out) / "results" / ROWS
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        raise OutputError(
            exc.errno,
            f"cannot store result rows in {folder} ({exc.strerror or exc}); make it a writable "
            "folder and run again (nothing was computed)",
        ) from exc


def write_per_image(out: Path, run_key: str, frame: pd.DataFrame) -> Path:
    """Write one run's per-image values (for bootstrap intervals and paired tests)."""
    path = Path(out) / "results" / PER_IMAGE / f"{run_key}.parquet"
    _write_parquet(path, frame)
    return path


def _read_folder(folder: Path) -> pd.DataFrame:
    frames = []
    for path in sorted(folder.glob("*.parquet")):
        try:
            frames.append(pd.read_parquet(path))
        except Exception as exc:  # noqa: BLE001 - a bad file must not hide the others
            logger.warning("skipping unreadable result file %s: %s", path, exc)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def read_results(out: str | Path) -> pd.DataFrame:
    """Every stored result row under ``out`` as one tidy DataFrame."""
    return _read_folder(Path(out) / "results" / ROWS)


def read_per_image(out: str | Path) -> pd.DataFrame:
    """Every stored per-image value under ``out``."""
    return _read_folder(Path(out) / "results" / PER_IMAGE)


@lru_cache(maxsize=1)
def provenance() -> dict[str, str]:
    """Package versions, git commit and host facts shared by every row of this process."""
    import numpy
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "host": platform.node(),
    }
    for name in ("torchvision", "timm", "optuna", "pandas"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            info[name] = "absent"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
        ).stdout.strip()
        info["git_commit"] = (commit + ("-dirty" if dirty else "")) if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    return info


def now_iso() -> str:
    """The current UTC time, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


#: Columns that identify "the same experiment": a newer run with equal values (e.g. after a
#: code change altered the run key) supersedes the older one. ``study``/``trial`` do not count:
#: a sweep point equal to a plain run (e.g. gt_ratio 0 of a gt-ratio sweep) or a grid point
#: evaluated twice by two workers is the same experiment, counted once.
RUN_IDENTITY = (
    "method_id",
    "dataset",
    "data_fingerprint",
    "split_sha256",
    "preset",
    "image_size",
    "repetition",
    "seed",
    "gt_ratio",
    "segmenter",
    "segmenter_epochs",
    "budget_minutes",
    "max_epochs",
    "amp",
    "fixed_threshold",
)


def latest_runs(rows: pd.DataFrame) -> pd.DataFrame:
    """Keep, per experiment identity (:data:`RUN_IDENTITY`), only the rows of its newest run.

    An output folder accumulates runs: re-running after a code change writes rows under a new
    run key while the old rows stay on disk. Counting both would pass one seed off as two (a
    fake ``std`` of 0). Superseded runs are dropped here, with a log line saying how many.

    Args:
        rows: Result rows (columns ``run_key`` and ``date`` plus the identity columns present).

    Returns:
        The rows of the newest run key of each identity, in their original order.
    """
    if rows.empty or "run_key" not in rows or "date" not in rows:
        return rows
    keys = [c for c in RUN_IDENTITY if c in rows.columns]
    runs = rows[[*keys, "run_key", "date"]].astype({"date": str})
    newest = runs.groupby("run_key", sort=False).agg({**{k: "first" for k in keys}, "date": "max"})
    newest = newest.reset_index().sort_values("date")
    keep = set(newest.drop_duplicates(keys, keep="last")["run_key"])
    dropped = newest["run_key"].nunique() - len(keep)
    if dropped:
        logger.info(
            "ignoring %d superseded run(s) (a newer run of the same experiment exists)", dropped
        )
    kept = rows[rows["run_key"].isin(keep)]
    # the same run may be stored twice (a plain run and an equal sweep point share the run key):
    # keep one copy of each value, the newest
    what = [c for c in ("gt_ratio", *RESULT_COLUMNS) if c in kept.columns]
    order = kept.assign(_date=kept["date"].astype(str)).sort_values("_date", kind="stable")
    unique = order.drop_duplicates(["run_key", *what], keep="last").drop(columns="_date")
    return unique.sort_index()


#: Columns that locate one value within a run (besides ``run_key`` and ``gt_ratio``).
RESULT_COLUMNS = ("stage", "split", "convention", "aggregation", "metric")
#: The row schema: columns every row the harness stores carries (runs, sweep points, studies,
#: failures). The runner's base row supplies the identity; stages add the rest.
ROW_COLUMNS = (
    *RUN_IDENTITY,
    "method",
    "kind",
    "run_key",
    "date",
    "status",
    "reason",
    *RESULT_COLUMNS,
    "value",
    "threshold",
)


def check_row_schema(rows: list[dict[str, Any]]) -> None:
    """Raise ValueError naming the columns of :data:`ROW_COLUMNS` a row lacks (a harness bug)."""
    for row in rows:
        missing = [c for c in ROW_COLUMNS if c not in row]
        if missing:
            what = f"{row.get('stage', '?')}/{row.get('metric', '?')}"
            raise ValueError(f"result row {what} lacks the columns {', '.join(missing)}")


def unique_per_image(frame: pd.DataFrame) -> pd.DataFrame:
    """Per-image rows with one copy of each (run, gt_ratio, stage, split, convention, image)."""
    keys = [
        c
        for c in ("run_key", "gt_ratio", "stage", "split", "convention", "name")
        if c in frame.columns
    ]
    return frame.drop_duplicates(keys, keep="last") if keys else frame
