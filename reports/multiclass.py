"""The report of multi-class runs (PASCAL VOC 2012, ``synthetic_voc``).

mIoU tables per stage, per-class IoU, mixed supervision (segmenter mIoU by ``gt_ratio``), the
validation background-threshold curves, cost and failed runs.

Multi-class rows carry ``convention = "multiclass"`` and, per (stage, split), the dataset-level
``miou`` (over the classes present), pixel ``accuracy``, class-mean ``precision`` / ``recall``
and ``iou:<class>`` for the background and every class (see ``benchmark.multiclass``). Nothing
here recomputes a metric; values are shown in percent, mean +- std over seeds. The binary Pet
tables are unchanged and never mix with these.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from benchmark.store import atomic_write_text
from reports.data import ReportData
from reports.figures import method_palette, threshold_curves
from reports.stats import bootstrap_miou_ci, select
from reports.tables import (
    cost_table,
    failed_runs,
    format_table,
    frame_table,
    summarize,
    with_failures,
)
from reports.writer import ReportWriter, cost_section, mixed_section

logger = logging.getLogger(__name__)

MULTICLASS = "multiclass"
METRICS = ("miou", "accuracy", "precision", "recall")
LABELS = {"miou": "mIoU", "accuracy": "pixel acc.", "precision": "Prec.", "recall": "Rec."}
#: (stage, split, title) of the multi-class tables, in report order.
TABLES = (
    ("segmenter", "test", "Segmenter on test"),
    ("pseudo", "train", "Pseudo masks on train"),
    ("maps", "test", "Maps on test, at the validation background threshold"),
)


def has_multiclass(rows: pd.DataFrame) -> bool:
    """Whether any row is a multi-class score."""
    return not rows.empty and "convention" in rows and (rows["convention"] == MULTICLASS).any()


def multiclass_summary(
    rows: pd.DataFrame, stage: str, split: str, per_image: pd.DataFrame | None = None
) -> pd.DataFrame:
    """mIoU, accuracy, precision and recall per method_id (mean, std over seeds).

    With the runs' per-image counts, a ``miou_ci`` column holds the 95 % bootstrap interval
    of the mIoU over images (:func:`reports.bootstrap_miou_ci`).
    """
    summary = summarize(rows, stage, split, MULTICLASS, metrics=METRICS)
    mine = rows[(rows["convention"] == MULTICLASS) & (rows["status"] != "unsupported")]
    summary = with_failures(summary, mine)
    if per_image is not None and not per_image.empty and "stage" in per_image:
        sel = select(per_image, stage, split, MULTICLASS)
        summary["miou_ci"] = [_ci_text(sel[sel["method_id"] == m]) for m in summary.index]
    return summary


def _ci_text(frame: pd.DataFrame) -> str:
    if frame.empty:
        return ""
    _, low, high = bootstrap_miou_ci(frame)
    return "" if pd.isna(low) else f"[{100 * low:.1f}, {100 * high:.1f}]"


def per_class_table(
    rows: pd.DataFrame, stage: str = "segmenter", split: str = "test"
) -> pd.DataFrame:
    """Per-class IoU (%) of each method_id, mean over seeds; classes in row order."""
    sel = rows[
        (rows["convention"] == MULTICLASS)
        & (rows["stage"] == stage)
        & (rows["split"] == split)
        & (rows["metric"].astype(str).str.startswith("iou:"))
        & (rows["status"].isin(("done", "budget")))
    ]
    if sel.empty:
        return pd.DataFrame()
    order = list(dict.fromkeys(sel["metric"].str[4:]))
    table = sel.assign(cls=sel["metric"].str[4:]).pivot_table(
        index="method_id", columns="cls", values="value", aggfunc="mean"
    )
    return (100 * table[order]).round(1)


def multiclass_text(rows: pd.DataFrame, per_image: pd.DataFrame | None = None) -> str:
    """The multi-class tables as Markdown (terminal and report; intervals with per_image)."""
    parts = []
    skipped = rows[(rows["convention"] == MULTICLASS) & (rows["status"] == "unsupported")]
    for stage, split, title in TABLES:
        summary = multiclass_summary(rows, stage, split, per_image)
        extra = {"threshold": "bg thr."} if stage != "segmenter" else {}
        if "miou_ci" in summary:
            extra["miou_ci"] = "mIoU 95 % CI"
        parts.append(f"{title} (multi-class, dataset-level, %):\n")
        parts.append(format_table(summary, metrics=METRICS, labels=LABELS, extra=extra))
    if not skipped.empty:
        names = ", ".join(sorted(skipped["method_id"].astype(str).unique()))
        parts.append(f"\nNot run on this multi-class dataset (no multi-label form yet): {names}\n")
    per_class = per_class_table(rows)
    if not per_class.empty:
        parts.append("\nSegmenter on test, IoU per class (%):\n")
        parts.append(frame_table(per_class, index_label="method_id"))
    return "\n".join(parts)


def write_multiclass_report(
    w: ReportWriter, data: ReportData, rows: pd.DataFrame, path: Path
) -> Path:
    """Write report.md of a multi-class dataset.

    Args:
        w: the report writer (its folder gets tables/ and figures/).
        data: everything loaded from the output folder (every gt_ratio, the curves).
        rows: the rows at the main table's gt_ratio.
        path: report.md's path.

    Returns:
        ``path``.
    """
    w.parts.append("# wsss-bench report (multi-class)\n")
    per_image = data.per_image
    if not per_image.empty and "gt_ratio" in per_image and rows["gt_ratio"].notna().any():
        ratio = float(rows["gt_ratio"].dropna().iloc[0])
        per_image = per_image[per_image["gt_ratio"].astype(float) == ratio]
    w.section(
        "Results",
        multiclass_text(rows, per_image),
        "95 % intervals: percentile bootstrap over the images (2,000 resamples; with several "
        "seeds each resample draws one set of images for all seeds), of the dataset-level mIoU.",
    )
    per_class = per_class_table(rows)
    if not per_class.empty:
        atomic_write_text(w.tables / "per_class_iou.csv", per_class.to_csv())
    ids = sorted(str(m) for m in data.rows["method_id"].dropna().unique())
    palette = method_palette(ids)
    mixed_section(w, data.rows, palette, "miou", MULTICLASS)
    _curves_section(w, data.curves, rows, palette)
    cost_section(w, cost_table(rows))
    bad = failed_runs(rows)
    if not bad.empty:
        w.section("Failed runs", frame_table(bad.set_index("method_id"), index_label="method_id"))
    atomic_write_text(path, "\n".join(w.parts))
    logger.info("report written to %s", path)
    return path


def _curves_section(
    w: ReportWriter, curves: pd.DataFrame, rows: pd.DataFrame, palette: dict
) -> None:
    """Validation mIoU against the background score ``t``, the chosen ``t`` marked."""
    if curves.empty or "miou" not in curves:
        return
    curves = curves.dropna(subset=["miou"])
    if curves.empty:
        return
    chosen = summarize(rows, "pseudo", "train", MULTICLASS, metrics=("miou",))
    thresholds = chosen["threshold"].to_dict() if "threshold" in chosen else {}
    paths = threshold_curves(
        curves,
        w.figures / "miou_vs_background",
        chosen=thresholds,
        metric="miou",
        palette=palette,
        xlabel="Background score t (argmax over [t, tagged maps])",
    )
    w.section(
        "Background-threshold sweeps (validation)",
        w.figure(
            paths,
            "Validation mIoU against the background score; dots: the chosen thresholds "
            "(a curve on the train GT is flagged [tuned on train GT] in its method id).",
        ),
    )
