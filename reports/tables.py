"""Tables from stored result rows: main, pseudo masks, mixed supervision, conventions, cost.

Every number comes from the rows written by the runner (which come from the one evaluator);
nothing here recomputes a metric. Quality values are shown in percent, mean +- std over seeds.
Markdown and LaTeX (booktabs) are rendered by one small writer so that both carry the same
bold best values, significance marks and reference rule, byte for byte reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

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
    "pxap": "PxAP",
}
#: The maps tables: the metrics at the validation threshold, then the threshold-free pixel
#: average precision (rows with metric ``pxap``, from the one evaluator's sweep counts).
MAP_METRICS = (*METRIC_ORDER, "pxap")
OK_STATUS = ("done", "budget")
FAILED_STATUS = ("error", "skipped")
STAGE_ORDER = ("fit", "maps_train", "maps_val", "maps_test", "segmenter", "segmenter_predict")
RULE = ["---"]  # marks the line between methods and references in a cell grid
BOX_RULE = ["---box"]  # marks the box-supervised methods (listed apart, not ranked)
#: The trivial reference a degenerate method equals (see :func:`all_foreground_seeds`).
ALL_FOREGROUND = "all_foreground"


def _ok(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["status"].isin(OK_STATUS)] if "status" in rows else rows


def primary_ratio(rows: pd.DataFrame) -> float | None:
    """The gt_ratio the main tables use: the smallest one present (0 = pure weak supervision)."""
    if rows.empty or "gt_ratio" not in rows or rows["gt_ratio"].dropna().empty:
        return None
    return float(rows["gt_ratio"].dropna().min())


def at_ratio(rows: pd.DataFrame, ratio: float | None) -> pd.DataFrame:
    """The rows of one gt_ratio (all rows when ``ratio`` is None or no gt_ratio column)."""
    if ratio is None or "gt_ratio" not in rows:
        return rows
    return rows[np.isclose(rows["gt_ratio"].astype(float), ratio)]


def summarize(
    rows: pd.DataFrame,
    stage: str,
    split: str,
    convention: str = "pet",
    aggregation: str = "dataset",
    metrics: tuple[str, ...] = METRIC_ORDER,
) -> pd.DataFrame:
    """Mean, std and count over seeds of each metric, one row per method_id.

    Args:
        rows: tidy result rows (see ``benchmark.runner``).
        stage: ``segmenter``, ``pseudo`` or ``maps``.
        split: ``train``, ``val`` or ``test``.
        convention: the trimap convention of the scores.
        aggregation: ``dataset`` (one confusion matrix) or ``image_mean``.
        metrics: the metrics to keep; the first one orders the methods.

    Returns:
        A frame indexed by method_id with columns ``kind``, ``n_seeds``, ``status``,
        ``threshold`` and ``<metric>_mean`` / ``<metric>_std`` (fractions, not percent).
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
    if "supervision" not in sel:  # rows written before the column existed
        sel = sel.assign(supervision="image")
    info = sel.groupby("method_id").agg(
        kind=("kind", "first"),
        supervision=("supervision", "first"),
        n_seeds=("seed", "nunique"),
        status=("status", lambda s: "budget" if (s == "budget").any() else "done"),
        threshold=("threshold", "mean"),
    )
    out = info.join(table)
    return out.sort_values(["kind", f"{metrics[0]}_mean"], ascending=[True, False])


def present_metrics(summary: pd.DataFrame, metrics: Sequence[str]) -> tuple[str, ...]:
    """The metrics of ``metrics`` that a summary has a column for, in order.

    A metric without rows (e.g. ``pxap`` in results stored before it existed) gets no column
    rather than a column of ``n/a``; the first metric (the one that orders the methods) is
    always kept.
    """
    return tuple(m for i, m in enumerate(metrics) if i == 0 or f"{m}_mean" in summary)


def pseudo_thresholds(rows: pd.DataFrame) -> pd.Series:
    """The pseudo-label threshold of each method_id (mean over seeds), read from its pseudo rows.

    Segmenter rows carry the threshold of the segmenter's own prediction, not this one.
    """
    sel = _ok(rows) if not rows.empty else rows
    if sel.empty or "threshold" not in sel:
        return pd.Series(dtype=float)
    sel = sel[(sel["stage"] == "pseudo") & (sel["split"] == "train")]
    return sel.groupby("method_id")["threshold"].mean()


def all_foreground_runs(rows: pd.DataFrame, stage: str, split: str) -> pd.Series:
    """Per (method_id, seed): are its ``stage`` predictions on ``split`` pet on every pixel?

    Such predictions (e.g. at a validation threshold of 0.00) score exactly as the
    ``all_foreground`` reference. Read from the dataset-level ``pet`` rows: recall 1 means no
    pet pixel was missed (FN = 0), and accuracy equal to precision then means TN * FP = 0, i.e.
    no background pixel was predicted as background (TN = 0) unless nothing was wrong at all
    (FP = 0), which IoU < 1 excludes. The test is exact: with FN = TN = 0 accuracy and
    precision are the same division TP / (TP + FP).

    Returns:
        bool Series indexed by (method_id, seed); empty when no such rows exist.
    """
    sel = _ok(rows) if not rows.empty else rows
    if sel.empty or "seed" not in sel:
        return pd.Series(dtype=bool)
    sel = sel[
        (sel["stage"] == stage)
        & (sel["split"] == split)
        & (sel["convention"] == "pet")
        & (sel["aggregation"] == "dataset")
        & sel["metric"].isin(["iou", "accuracy", "precision", "recall"])
    ]
    if sel.empty:
        return _no_runs()
    wide = sel.pivot_table(
        index=["method_id", "seed"], columns="metric", values="value", aggfunc="first"
    )
    if not {"iou", "accuracy", "precision", "recall"} <= set(wide.columns):
        return _no_runs()
    return (wide["recall"] == 1.0) & (wide["accuracy"] == wide["precision"]) & (wide["iou"] < 1)


def _no_runs() -> pd.Series:
    """An empty (method_id, seed) -> bool series, aligned with :func:`all_foreground_runs`."""
    index = pd.MultiIndex.from_arrays([[], []], names=["method_id", "seed"])
    return pd.Series([], index=index, dtype=bool)


def all_foreground_seeds(rows: pd.DataFrame, stage: str, split: str) -> pd.Series:
    """Per method_id, how many of its seeds learned nothing measurable (as all_foreground).

    A seed counts when its pseudo masks on train, or its ``stage`` predictions on ``split``,
    are pet everywhere (see :func:`all_foreground_runs`).

    Returns:
        method_id -> number of such seeds (methods without any are absent or 0).
    """
    own = all_foreground_runs(rows, stage, split)
    pseudo = all_foreground_runs(rows, "pseudo", "train")
    both = pd.concat([own, pseudo], axis=1).fillna(False).astype(bool)
    if both.empty:
        return pd.Series(dtype=int)
    return both.any(axis=1).groupby(level="method_id").sum().astype(int)


def flag_all_foreground(
    summary: pd.DataFrame, rows: pd.DataFrame, stage: str, split: str
) -> pd.DataFrame:
    """Flag the methods of a summary that equal all_foreground.

    Adds ``n_all_foreground`` (seeds whose pseudo masks or ``stage`` predictions are pet
    everywhere, :func:`all_foreground_seeds`) and ``n_pet_everywhere`` (seeds whose ``stage``
    predictions are). Methods whose every seed is flagged are moved below the other methods
    (their order is kept otherwise); :func:`format_table` marks them and never makes them the
    best. References are never flagged (``all_foreground`` is one).
    """
    if summary.empty or "kind" not in summary:
        return summary
    method = summary["kind"] == "method"
    counts = all_foreground_seeds(rows, stage, split).reindex(summary.index).fillna(0)
    own = all_foreground_runs(rows, stage, split)
    own = own.groupby(level="method_id").sum() if len(own) else pd.Series(dtype=int)
    out = summary.assign(
        n_all_foreground=counts.astype(int).where(method, 0),
        n_pet_everywhere=own.reindex(summary.index).fillna(0).astype(int).where(method, 0),
    )
    return (
        out.assign(_flat=is_all_foreground(out))
        .sort_values(["kind", "_flat"], kind="stable")
        .drop(columns="_flat")
    )


def is_all_foreground(summary: pd.DataFrame) -> pd.Series:
    """Per row of a summary: every one of its seeds equals all_foreground (False if unknown)."""
    if "n_all_foreground" not in summary or "n_seeds" not in summary:
        return pd.Series(False, index=summary.index)
    n = summary["n_all_foreground"].fillna(0)
    return (n > 0) & (n >= summary["n_seeds"].fillna(0))


def failed_runs(rows: pd.DataFrame) -> pd.DataFrame:
    """Runs that ended in error or were skipped, with their reasons."""
    if rows.empty or "status" not in rows:
        return pd.DataFrame()
    bad = rows[rows["status"].isin(FAILED_STATUS)]
    names = ("method_id", "seed", "status", "reason", "traceback", "job_id", "job_log")
    cols = [c for c in names if c in bad]  # job_id / job_log: runs launched as jobs
    return bad[cols].drop_duplicates().reset_index(drop=True)


def with_failures(summary: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """Add the failed runs to a summary so that a table shows them instead of dropping them.

    A method whose every run failed gets a row with status ``error`` and no values; a method
    with some failed seeds keeps its values and gets ``n_failed`` > 0.

    Returns:
        The summary with an ``n_failed`` column (and possibly extra rows).
    """
    bad = failed_runs(rows)
    out = summary.copy()
    if out.empty and bad.empty:
        return out
    if "n_failed" not in out:
        out["n_failed"] = 0
    if bad.empty:
        return out
    counts = bad.groupby("method_id")["seed"].nunique()
    kinds = rows.drop_duplicates("method_id").set_index("method_id")["kind"]
    for method_id, n in counts.items():
        if method_id in out.index:
            out.loc[method_id, "n_failed"] = int(n)
        else:
            extra = {"kind": kinds.get(method_id, "method"), "n_seeds": 0, "status": "error"}
            out.loc[method_id, list(extra)] = list(extra.values())
            out.loc[method_id, "n_failed"] = int(n)
    out["n_failed"] = out["n_failed"].fillna(0).astype(int)
    return out


# ---- rendering ---------------------------------------------------------------------------------
def format_table(
    summary: pd.DataFrame,
    metrics: tuple[str, ...] = METRIC_ORDER,
    style: str = "markdown",
    extra: dict[str, str] | None = None,
    marks: Mapping[str, str] | None = None,
    labels: Mapping[str, str] | None = None,
) -> str:
    """Render a summary as Markdown or LaTeX: percent, mean +- std, best method in bold.

    The best value per column is searched among methods only (kind ``method``); references
    (supervised, centre prior, all-foreground) are listed below a rule. Failed runs (status
    ``error``, see :func:`with_failures`) are listed with a dash instead of values. A method
    that equals all_foreground (see :func:`flag_all_foreground`) is marked
    ``(= all_foreground)`` next to its first value and is never the best.

    Args:
        summary: a frame from :func:`summarize` (optionally through :func:`with_failures`).
        metrics: the ``<metric>_mean`` / ``<metric>_std`` columns to show, in order.
        style: ``markdown`` or ``latex``.
        extra: more columns shown as they are (floats with 2 decimals), column -> header.
        marks: method_id -> a mark (``dagger``) appended to its first metric cell.
        labels: header of each metric (default :data:`METRIC_LABEL`, else the name).

    Returns:
        The table text, ending with a newline.
    """
    if style not in ("markdown", "latex"):
        raise ValueError(f"unknown table style {style!r}; valid: markdown, latex")
    if summary.empty:
        return "_no results_\n" if style == "markdown" else "% no results\n"
    labels = {**METRIC_LABEL, **(labels or {})}
    extra = extra or {}
    header = ["Method", *(labels.get(m, m) for m in metrics), *extra.values()]
    best = _best_values(summary, metrics)
    lines: list[list[str]] = []
    box = _is_box(summary)
    groups = (
        ("method", summary[(summary["kind"] == "method") & ~box], None),
        ("box", summary[(summary["kind"] == "method") & box], BOX_RULE),
        ("reference", summary[summary["kind"] == "reference"], RULE),
    )
    for _, part, rule in groups:
        if rule is not None and len(part) and (lines or rule == BOX_RULE):
            lines.append(rule)  # the box group is always labelled
        for method_id, row in part.iterrows():
            lines.append(_row_cells(str(method_id), row, metrics, extra, best, marks, style))
    return render_grid(header, lines, style)


def _is_box(summary: pd.DataFrame) -> pd.Series:
    """Rows of box-supervised methods (listed apart, never ranked with image-level ones)."""
    if "supervision" not in summary:
        return pd.Series(False, index=summary.index)
    return summary["supervision"].fillna("image") == "box"


def _best_values(summary: pd.DataFrame, metrics: Sequence[str]) -> dict[str, float]:
    image_level = (summary["kind"] == "method") & ~_is_box(summary)
    methods_only = summary[image_level & ~is_all_foreground(summary)]
    best: dict[str, float] = {}
    for m in metrics:
        col = f"{m}_mean"
        if col in methods_only and methods_only[col].notna().any():
            best[m] = float(methods_only[col].max())
    return best


def _row_cells(
    method_id: str,
    row: pd.Series,
    metrics: Sequence[str],
    extra: Mapping[str, str],
    best: Mapping[str, float],
    marks: Mapping[str, str] | None,
    style: str,
) -> list[str]:
    failed = row.get("status") == "error"
    name = _escape(method_id, style)
    if failed:
        name += " (failed)"
    elif row.get("status") == "budget":
        name += " (budget)"
    n_failed = row.get("n_failed", 0)
    if not failed and isinstance(n_failed, (int, np.integer)) and n_failed > 0:
        name += f" ({n_failed} failed)"
    dash = "--" if style == "latex" else "—"
    cells = [name]
    for i, m in enumerate(metrics):
        mean, std = row.get(f"{m}_mean", np.nan), row.get(f"{m}_std", np.nan)
        if failed:
            cells.append(dash)
            continue
        cell = _cell(mean, std, style)
        flat = _all_foreground_note(row)
        if row.get("kind") == "method" and m in best and np.isclose(mean, best[m]) and not flat:
            cell = f"**{cell}**" if style == "markdown" else f"\\textbf{{{cell}}}"
        if i == 0 and marks and method_id in marks:
            cell += _mark(marks[method_id], style)
        if i == 0 and flat:
            cell += " " + _escape(flat, style)
        cells.append(cell)
    for col in extra:
        value = row.get(col, np.nan)
        if failed or value is None or (isinstance(value, float) and np.isnan(value)):
            cells.append(dash)
        else:
            cells.append(f"{value:.2f}" if isinstance(value, float) else _escape(str(value), style))
    return cells


MARK_SYMBOL = {"dagger": ("†", "$^\\dagger$")}


def _all_foreground_note(row: pd.Series) -> str:
    """The mark of a method that equals all_foreground (see :func:`flag_all_foreground`).

    ``(= all_foreground)`` where its own predictions are pet everywhere, ``(pseudo masks =
    all_foreground)`` where its pseudo masks are, ``(= all_foreground in k/n seeds)`` where only
    some seeds are; empty otherwise.
    """
    k, n = row.get("n_all_foreground", 0), row.get("n_seeds", 0)
    if not isinstance(k, (int, np.integer, float)) or not k or np.isnan(k):
        return ""
    if k < n:
        return f"(= {ALL_FOREGROUND} in {int(k)}/{int(n)} seeds)"
    if row.get("n_pet_everywhere", 0) >= n:
        return f"(= {ALL_FOREGROUND})"
    return f"(pseudo masks = {ALL_FOREGROUND})"


def _mark(mark: str, style: str) -> str:
    markdown, latex = MARK_SYMBOL.get(mark, (mark, mark))
    return markdown if style == "markdown" else latex


def render_grid(header: Sequence[str], lines: Sequence[Sequence[str]], style: str) -> str:
    """Render a header and rows of formatted cells as Markdown or booktabs LaTeX.

    A row equal to ``["---"]`` becomes the rule between methods and references.
    """
    if style == "markdown":
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        for cells in lines:
            if list(cells) == RULE:
                out.append("| *references* |" + " |" * (len(header) - 1))
            elif list(cells) == BOX_RULE:
                out.append("| *box-supervised (not ranked)* |" + " |" * (len(header) - 1))
            else:
                out.append("| " + " | ".join(cells) + " |")
        return "\n".join(out) + "\n"
    out = [
        "\\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
        "\\toprule",
        " & ".join(_escape_header(h) for h in header) + " \\\\",
        "\\midrule",
    ]
    for cells in lines:
        rule = list(cells) in (RULE, BOX_RULE)
        out.append("\\midrule" if rule else " & ".join(cells) + " \\\\")
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def frame_table(frame: pd.DataFrame, style: str = "markdown", index_label: str = "") -> str:
    """Render any small frame (index + columns, values as they are) in the same two styles."""
    if frame.empty:
        return "_no results_\n" if style == "markdown" else "% no results\n"
    header = [index_label or str(frame.index.name or ""), *map(str, frame.columns)]
    lines = []
    for idx, row in frame.iterrows():
        cells = [_escape(str(idx), style)]
        for value in row:
            text = "" if value is None or (isinstance(value, float) and np.isnan(value)) else value
            cells.append(_escape(f"{text:g}" if isinstance(text, float) else str(text), style))
        lines.append(cells)
    return render_grid(header, lines, style)


def _cell(mean: float, std: float, style: str) -> str:
    if mean is None or np.isnan(mean):
        return "n/a"
    pm = " ± " if style == "markdown" else " $\\pm$ "
    if std is None or np.isnan(std):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f}{pm}{100 * std:.1f}"


def _escape(text: str, style: str) -> str:
    if style == "latex":
        for a, b in (("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("[", "{[}"), ("]", "{]}")):
            text = text.replace(a, b)
        return text
    return text.replace("|", "\\|")


def _escape_header(text: str) -> str:
    return text.replace("_", "\\_").replace("%", "\\%").replace("&", "\\&")


# ---- the other tables --------------------------------------------------------------------------
def mixed_table(
    rows: pd.DataFrame, metric: str = "iou", convention: str = "pet"
) -> tuple[pd.DataFrame, list[str]]:
    """Segmenter test ``metric`` by gt_ratio, one row per method, as a summary frame.

    Returns:
        ``(summary, ratio_columns)``: a frame with ``kind`` and ``r<ratio>_mean`` /
        ``r<ratio>_std`` columns that :func:`format_table` renders with ``metrics`` set to
        ``ratio_columns``; empty when fewer than two gt_ratios exist.
    """
    if rows.empty or "gt_ratio" not in rows:
        return pd.DataFrame(), []
    sel = _ok(rows)
    sel = sel[
        (sel["stage"] == "segmenter")
        & (sel["split"] == "test")
        & (sel["convention"] == convention)
        & (sel["aggregation"] == "dataset")
        & (sel["metric"] == metric)
    ]
    ratios = sorted(sel["gt_ratio"].dropna().astype(float).unique())
    if len(ratios) < 2:
        return pd.DataFrame(), []
    stats = sel.groupby(["method_id", "gt_ratio"])["value"].agg(["mean", "std"])
    wide = stats.unstack("gt_ratio")
    keys = [ratio_key(r) for r in ratios]
    out = pd.DataFrame(index=wide.index)
    for r, key in zip(ratios, keys):
        out[f"{key}_mean"] = wide[("mean", r)]
        out[f"{key}_std"] = wide[("std", r)]
    out.insert(0, "kind", sel.groupby("method_id")["kind"].first())
    out = out.sort_values(["kind", f"{keys[-1]}_mean"], ascending=[True, False])
    return out, keys


def ratio_key(ratio: float) -> str:
    """Column key of a gt_ratio in :func:`mixed_table` (``r0.25``)."""
    return f"r{ratio:g}"


def conventions_table(
    rows: pd.DataFrame, background_iou: Mapping[str, float] | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Segmenter test IoU under every trimap convention side by side, one row per method.

    Args:
        rows: tidy result rows.
        background_iou: convention -> the IoU an all-background prediction scores there (from
            :func:`reports.stats.all_background_iou`); added as a reference row.

    Returns:
        ``(summary, conventions)`` for :func:`format_table` with ``metrics=conventions``.
    """
    parts, found = [], []
    for conv in ("pet", "pet_with_border", "weaktr_refinery"):
        s = summarize(rows, "segmenter", "test", conv, metrics=("iou",))
        if s.empty:
            continue
        found.append(conv)
        columns = {"iou_mean": f"{conv}_mean", "iou_std": f"{conv}_std"}
        parts.append(s[list(columns)].rename(columns=columns))
        kinds = s["kind"]
    if not parts:
        return pd.DataFrame(), []
    out = pd.concat(parts, axis=1)
    out.insert(0, "kind", kinds.reindex(out.index))
    out = out.sort_values(["kind", f"{found[0]}_mean"], ascending=[True, False])
    if background_iou:
        ref = {f"{c}_mean": background_iou.get(c, np.nan) for c in found}
        out.loc["(all-background prediction)", ["kind", *ref]] = ["reference", *ref.values()]
    return out, found


def cost_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Wall seconds per stage and in total, device seconds, peak memory, device per method.

    Reused (cached) stages count with the cost they had when computed. Values are means over
    seeds; ``device_s`` is the total device time of all stages (CUDA events on a GPU;
    equal to wall time on the CPU).
    """
    if rows.empty:
        return pd.DataFrame()
    sel = _ok(rows)
    sel = sel[sel["aggregation"] == "cost"]
    if sel.empty:
        return pd.DataFrame()
    per_stage = _stage_means(sel, "wall_s")
    order = [s for s in STAGE_ORDER if s in per_stage] + [
        s for s in per_stage if s not in STAGE_ORDER
    ]
    per_stage = per_stage[order]
    per_stage["total"] = per_stage.sum(axis=1)
    out = per_stage.round(1)
    device = _stage_means(sel, "device_s")
    if not device.empty:
        out["device_s"] = device.sum(axis=1).reindex(out.index).round(1)
    peak = sel[sel["metric"] == "peak_host_mb"].groupby("method_id")["value"].max()
    dev = sel[sel["metric"] == "peak_device_mb"].groupby("method_id")["value"].max()
    out["peak_host_mb"] = peak.round(0)
    out["peak_device_mb"] = dev.round(0)
    out["device"] = sel.groupby("method_id")["device"].first()
    return out.sort_values("total")


def _stage_means(sel: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean over seeds of ``metric`` per (method_id, stage), with "fit:*" counted once in fit."""
    values = sel[sel["metric"] == metric]
    if values.empty:
        return pd.DataFrame()
    fit_inner = values["stage"].str.startswith("fit:")
    per_stage = (
        values[~fit_inner]
        .groupby(["method_id", "stage"])["value"]
        .mean()
        .unstack("stage")
        .fillna(0.0)
    )
    inner = values[fit_inner].groupby(["method_id", "seed"])["value"].sum()
    if len(inner):
        per_stage["fit"] = np.maximum(
            per_stage.get("fit", 0.0), inner.groupby("method_id").mean().reindex(per_stage.index)
        ).fillna(per_stage.get("fit", 0.0))
    return per_stage
