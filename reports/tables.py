"""Tables from stored result rows: main (segmenter on test), pseudo masks, conventions, cost.

Every number comes from the rows written by the runner (which come from the one evaluator);
nothing here recomputes a metric. Values are shown in percent, mean +- std over seeds.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

METRIC_ORDER = ("iou", "dice", "accuracy", "precision", "recall")
METRIC_LABEL = {
    "iou": "IoU",
    "dice": "Dice",
    "accuracy": "Acc.",
    "precision": "Prec.",
    "recall": "Rec.",
    "miou": "mIoU",
}


def _ok(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["status"].isin(["done", "budget"])] if "status" in rows else rows


def summarize(
    rows: pd.DataFrame,
    stage: str,
    split: str,
    convention: str = "pet",
    aggregation: str = "dataset",
    metrics: tuple[str, ...] = METRIC_ORDER,
) -> pd.DataFrame:
    """Mean, std and count over seeds of each metric, one row per method_id.

    Returns:
        A frame indexed by method_id with columns ``kind``, ``n_seeds``, ``status`` and
        ``<metric>_mean`` / ``<metric>_std`` (fractions, not percent).
    """
    if rows.empty:
        return pd.DataFrame()
    sel = _ok(rows)
    sel = sel[
        (sel["stage"] == stage)
        & (sel["split"] == split)
        & (sel["convention"] == convention)
        & (sel["aggregation"] == aggregation)
        & (sel["metric"].isin(metrics))
    ]
    if sel.empty:
        return pd.DataFrame()
    grouped = sel.groupby(["method_id", "metric"])["value"]
    table = grouped.agg(["mean", "std"]).unstack("metric")
    table.columns = [f"{m}_{s}" for s, m in table.columns]
    info = sel.groupby("method_id").agg(
        kind=("kind", "first"),
        n_seeds=("seed", "nunique"),
        status=("status", lambda s: "budget" if (s == "budget").any() else "done"),
        threshold=("threshold", "mean"),
    )
    out = info.join(table)
    return out.sort_values(["kind", f"{metrics[0]}_mean"], ascending=[True, False])


def failed_runs(rows: pd.DataFrame) -> pd.DataFrame:
    """Runs that ended in error or were skipped, with their reasons."""
    if rows.empty or "status" not in rows:
        return pd.DataFrame()
    bad = rows[rows["status"].isin(["error", "skipped"])]
    cols = [c for c in ("method_id", "seed", "status", "reason", "traceback") if c in bad]
    return bad[cols].drop_duplicates().reset_index(drop=True)


def format_table(
    summary: pd.DataFrame,
    metrics: tuple[str, ...] = METRIC_ORDER,
    style: str = "markdown",
    extra: dict[str, str] | None = None,
) -> str:
    """Render a summary as Markdown or LaTeX: percent, mean +- std, best method in bold.

    The best value per column is searched among methods only (kind ``method``); references
    (supervised, centre prior, all-foreground) are listed below a separator.
    """
    if summary.empty:
        return "_no results_\n"
    best: dict[str, float] = {}
    methods_only = summary[summary["kind"] == "method"]
    for m in metrics:
        col = f"{m}_mean"
        if col in methods_only and methods_only[col].notna().any():
            best[m] = float(methods_only[col].max())
    header = ["Method", *(METRIC_LABEL.get(m, m) for m in metrics)]
    extra = extra or {}
    header += list(extra.values())
    lines: list[list[str]] = []
    for kind in ("method", "reference"):
        part = summary[summary["kind"] == kind]
        for method_id, row in part.iterrows():
            cells = [_escape(str(method_id), style)]
            for m in metrics:
                mean, std = row.get(f"{m}_mean", np.nan), row.get(f"{m}_std", np.nan)
                cell = _cell(mean, std, style)
                if kind == "method" and m in best and np.isclose(mean, best[m]):
                    cell = f"**{cell}**" if style == "markdown" else f"\\textbf{{{cell}}}"
                cells.append(cell)
            for col in extra:
                value = row.get(col, np.nan)
                cells.append(f"{value:.2f}" if isinstance(value, float) else str(value))
            if row.get("status") == "budget":
                cells[0] += " (budget)"
            lines.append(cells)
        if kind == "method" and len(part) and (summary["kind"] == "reference").any():
            lines.append(["---"])
    if style == "markdown":
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for cells in lines:
            if cells == ["---"]:
                out.append("| *references* |" + " |" * (len(header) - 1))
            else:
                out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out) + "\n"
    out = [
        "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        "\\toprule",
        " & ".join(header) + " \\\\",
        "\\midrule",
    ]
    for cells in lines:
        out.append("\\midrule" if cells == ["---"] else " & ".join(cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def _cell(mean: float, std: float, style: str) -> str:
    if mean is None or np.isnan(mean):
        return "n/a"
    pm = " ± " if style == "markdown" else " $\\pm$ "
    if std is None or np.isnan(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f}{pm}{100 * std:.1f}"


def _escape(text: str, style: str) -> str:
    if style == "latex":
        return text.replace("_", "\\_").replace("[", "{[}").replace("]", "{]}")
    return text.replace("|", "\\|")


def cost_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Wall seconds per stage and in total, peak memory, device: one row per method_id.

    Reused (cached) stages count with the cost they had when computed.
    """
    if rows.empty:
        return pd.DataFrame()
    sel = _ok(rows)
    sel = sel[sel["aggregation"] == "cost"]
    if sel.empty:
        return pd.DataFrame()
    wall = sel[sel["metric"] == "wall_s"]
    # "fit" includes its internal "fit:*" stages: count those once, through "fit"
    fit_inner = wall["stage"].str.startswith("fit:")
    per_stage = (
        wall[~fit_inner]
        .groupby(["method_id", "stage"])["value"]
        .mean()
        .unstack("stage")
        .fillna(0.0)
    )
    inner = wall[fit_inner].groupby(["method_id", "seed"])["value"].sum()
    if len(inner):
        per_stage["fit"] = np.maximum(
            per_stage.get("fit", 0.0), inner.groupby("method_id").mean().reindex(per_stage.index)
        ).fillna(per_stage.get("fit", 0.0))
    per_stage["total"] = per_stage.sum(axis=1)
    peak = sel[sel["metric"] == "peak_host_mb"].groupby("method_id")["value"].max()
    dev = sel[sel["metric"] == "peak_device_mb"].groupby("method_id")["value"].max()
    out = per_stage.round(1)
    out["peak_host_mb"] = peak.round(0)
    out["peak_device_mb"] = dev.round(0)
    out["device"] = sel.groupby("method_id")["device"].first()
    return out.sort_values("total")
