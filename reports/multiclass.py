"""Tables of multi-class runs (PASCAL VOC 2012, ``synthetic_voc``): mIoU and per-class IoU.

Multi-class rows carry ``convention = "multiclass"`` and, per (stage, split), the dataset-level
``miou`` (over the classes present), pixel ``accuracy``, class-mean ``precision`` / ``recall``
and ``iou:<class>`` for the background and every class (see ``benchmark.multiclass``). Nothing
here recomputes a metric; values are shown in percent, mean +- std over seeds. The binary Pet
tables are unchanged and never mix with these.
"""

from __future__ import annotations

import logging

import pandas as pd

from reports.tables import format_table, frame_table, summarize, with_failures

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


def multiclass_summary(rows: pd.DataFrame, stage: str, split: str) -> pd.DataFrame:
    """mIoU, accuracy, precision and recall per method_id (mean, std over seeds)."""
    summary = summarize(rows, stage, split, MULTICLASS, metrics=METRICS)
    mine = rows[(rows["convention"] == MULTICLASS) & (rows["status"] != "unsupported")]
    return with_failures(summary, mine)


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


def multiclass_text(rows: pd.DataFrame) -> str:
    """The multi-class tables as Markdown (terminal and report)."""
    parts = []
    skipped = rows[(rows["convention"] == MULTICLASS) & (rows["status"] == "unsupported")]
    for stage, split, title in TABLES:
        summary = multiclass_summary(rows, stage, split)
        extra = {"threshold": "bg thr."} if stage != "segmenter" else None
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
