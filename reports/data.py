"""Everything a report reads from a results folder, loaded once (no recomputation).

Layout under ``OUT`` (written by ``benchmark.runner`` through ``benchmark.store``):

- ``results/rows/<key>.parquet``: tidy rows (:func:`benchmark.store.read_results`).
- ``results/per_image/<key>.parquet``: per-image counts and scores. The runner's per-image
  rows carry no ``gt_ratio`` column, so it is taken from the rows file of the same ``<key>``.
- ``results/curves/<run_key>.parquet``: validation IoU-vs-threshold curves.
- ``results/qualitative/*.npz``: optional arrays for the qualitative grid (see
  :func:`reports.figures.load_qualitative`).
- ``studies/``: optional Optuna studies (see :func:`reports.figures.load_trials`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmark.store import PER_IMAGE, ROWS, latest_runs, read_results, unique_per_image

logger = logging.getLogger(__name__)

STUDY_DIRS = ("studies", "optuna", "sweeps")


@dataclass
class ReportData:
    """The stored results of one output folder.

    Attributes:
        out: the output folder.
        rows: tidy result rows.
        per_image: per-image rows with a ``gt_ratio`` column (NaN where unknown).
        curves: validation curves (``method_id``, ``seed``, ``threshold``, metric columns).
        studies: paths of Optuna study files found under the folder.
    """

    out: Path
    rows: pd.DataFrame
    per_image: pd.DataFrame = field(default_factory=pd.DataFrame)
    curves: pd.DataFrame = field(default_factory=pd.DataFrame)
    studies: list[Path] = field(default_factory=list)


def _read(path: Path, columns: list[str] | None = None) -> pd.DataFrame | None:
    try:
        return pd.read_parquet(path, columns=columns)
    except Exception as exc:  # noqa: BLE001 - a bad file must not hide the others
        logger.warning("skipping unreadable result file %s: %s", path, exc)
        return None


def read_per_image_tagged(out: Path) -> pd.DataFrame:
    """Per-image rows with the ``gt_ratio`` of the run that wrote them."""
    results = Path(out) / "results"
    frames = []
    for path in sorted((results / PER_IMAGE).glob("*.parquet")):
        frame = _read(path)
        if frame is None:
            continue
        ratio = float("nan")
        rows_path = results / ROWS / path.name
        if "gt_ratio" not in frame and rows_path.is_file():
            tag = _read(rows_path, ["gt_ratio"])
            if tag is not None and len(tag):
                ratio = float(tag["gt_ratio"].iloc[0])
        if "gt_ratio" not in frame:
            frame["gt_ratio"] = ratio
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def read_curves(out: Path) -> pd.DataFrame:
    """Every stored validation curve."""
    frames = [_read(p) for p in sorted((Path(out) / "results" / "curves").glob("*.parquet"))]
    frames = [f for f in frames if f is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def find_studies(out: Path) -> list[Path]:
    """Optuna study files under ``out``: exported trials (CSV/parquet), else storages.

    ``sweep`` writes both a storage (journal) and one CSV export per study; the exports are
    preferred, so that each study is plotted once. A folder with no export falls back to its
    storages (SQLite, journal).
    """
    found: list[Path] = []
    for name in STUDY_DIRS:
        folder = Path(out) / name
        if folder.is_dir():
            exports = sorted(folder.rglob("*.csv")) + sorted(folder.rglob("*.parquet"))
            if exports:
                found.extend(exports)
                continue
            for pattern in ("*.db", "*.sqlite", "*.sqlite3", "*.log", "*.journal"):
                found.extend(sorted(folder.rglob(pattern)))
    return found


def load(out: str | Path) -> ReportData:
    """Load rows, per-image values, curves and study paths of an output folder."""
    out = Path(out)
    rows = latest_runs(read_results(out))
    per_image, curves = read_per_image_tagged(out), read_curves(out)
    if "run_key" in rows:  # values of superseded runs are dropped with their rows
        keys = set(rows["run_key"])
        if "run_key" in per_image:
            per_image = unique_per_image(per_image[per_image["run_key"].isin(keys)])
        if "run_key" in curves:
            curves = curves[curves["run_key"].isin(keys)]
    return ReportData(
        out=out, rows=rows, per_image=per_image, curves=curves, studies=find_studies(out)
    )
