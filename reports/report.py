"""report.md and tables/ from stored rows alone (no recomputation)."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from benchmark.cache import atomic_write_text
from benchmark.store import read_results
from reports.tables import METRIC_ORDER, cost_table, failed_runs, format_table, summarize

logger = logging.getLogger(__name__)


def main_table_text(rows: pd.DataFrame, convention: str = "pet") -> str:
    """The main table (segmenter on test, dataset-level) as Markdown, for the terminal."""
    summary = summarize(rows, "segmenter", "test", convention)
    pseudo = summarize(rows, "pseudo", "train", convention)
    text = "Segmenter on test (" + convention + ", dataset-level, %):\n"
    text += format_table(summary)
    text += "\nPseudo masks on train (" + convention + ", dataset-level, %):\n"
    text += format_table(pseudo, extra={"threshold": "thr."})
    bad = failed_runs(rows)
    if not bad.empty:
        text += "\nFailed runs:\n" + bad.to_string(index=False) + "\n"
    return text


def _setup(rows: pd.DataFrame) -> str:
    first = rows.iloc[0]
    keys = [
        ("dataset", "dataset"),
        ("split", "split_scheme"),
        ("split SHA-256", "split_sha256"),
        ("preset", "preset"),
        ("image size", "image_size"),
        ("segmenter", "segmenter"),
        ("segmenter epochs", "segmenter_epochs"),
        ("budget (min per run)", "budget_minutes"),
        ("gt_ratio", "gt_ratio"),
        ("device", "device"),
        ("torch", "v_torch"),
        ("timm", "v_timm"),
        ("git commit", "v_git_commit"),
    ]
    lines = ["| setting | value |", "|---|---|"]
    for label, col in keys:
        if col in rows:
            values = sorted({str(v) for v in rows[col].dropna().unique()})
            lines.append(f"| {label} | {', '.join(values) if values else first.get(col)} |")
    return "\n".join(lines) + "\n"


def _reading(summary: pd.DataFrame) -> str:
    if summary.empty or "iou_mean" not in summary:
        return "No successful run to read.\n"
    methods = summary[summary["kind"] == "method"].sort_values("iou_mean", ascending=False)
    refs = summary[summary["kind"] == "reference"]
    if methods.empty:
        return "Only references ran.\n"
    best = methods.iloc[0]
    text = f"Best method by test IoU: `{methods.index[0]}` ({100 * best['iou_mean']:.1f})."
    if len(methods) > 1:
        gap = 100 * (best["iou_mean"] - methods.iloc[1]["iou_mean"])
        text += f" It leads `{methods.index[1]}` by {gap:.1f} points."
    for ref in ("centre_prior", "supervised"):
        if ref in refs.index:
            text += f" `{ref}` scores {100 * refs.loc[ref, 'iou_mean']:.1f}."
    if "centre_prior" in refs.index:
        losers = methods[methods["iou_mean"] < refs.loc["centre_prior", "iou_mean"]]
        if len(losers):
            text += (
                " Methods below the centre prior (they learned less than a fixed ellipse): "
                + ", ".join(f"`{m}`" for m in losers.index)
                + "."
            )
    return text + " Significance tests are not computed yet.\n"


def write_report(out: Path, report_dir: Path | None = None) -> Path:
    """Write report.md and tables/ (Markdown, LaTeX, CSV) under ``out/report``."""
    rows = read_results(out)
    report_dir = report_dir or Path(out) / "report"
    tables = report_dir / "tables"
    tables.mkdir(parents=True, exist_ok=True)
    if rows.empty:
        atomic_write_text(report_dir / "report.md", "# wsss-bench report\n\nNo results yet.\n")
        return report_dir / "report.md"
    convention = "pet"
    parts = ["# wsss-bench report\n", "## Setup\n", _setup(rows)]
    sections = [
        (
            "main",
            "Segmenter on test (primary: dataset-level IoU of the pet class)",
            summarize(rows, "segmenter", "test", convention),
            None,
        ),
        (
            "pseudo",
            "Pseudo masks on train (threshold chosen on validation)",
            summarize(rows, "pseudo", "train", convention),
            {"threshold": "thr."},
        ),
        (
            "maps_test",
            "Method maps on test at the validation threshold",
            summarize(rows, "maps", "test", convention),
            None,
        ),
        (
            "main_image_mean",
            "Segmenter on test, mean of per-image scores",
            summarize(rows, "segmenter", "test", convention, "image_mean"),
            None,
        ),
    ]
    for name, title, summary, extra in sections:
        md = format_table(summary, extra=extra)
        atomic_write_text(tables / f"{name}.md", md)
        atomic_write_text(tables / f"{name}.tex", format_table(summary, style="latex", extra=extra))
        if not summary.empty:
            summary.to_csv(tables / f"{name}.csv")
        parts += [f"## {title}\n", md]
        if name == "main":
            parts += ["### Reading\n", _reading(summary)]
    conv_rows = []
    for conv in ("pet", "pet_with_border", "weaktr_refinery"):
        s = summarize(rows, "segmenter", "test", conv, metrics=("iou",))
        if not s.empty:
            conv_rows.append(s["iou_mean"].rename(conv))
    if conv_rows:
        conv = (100 * pd.concat(conv_rows, axis=1)).round(1)
        conv.to_csv(tables / "conventions.csv")
        parts += [
            "## Conventions (segmenter test IoU, %)\n",
            "`weaktr_refinery` counts background + border as the positive class, as that "
            "repository's published table does.\n",
            conv.to_markdown() + "\n" if _has_tabulate() else conv.to_string() + "\n",
        ]
    cost = cost_table(rows)
    if not cost.empty:
        cost.to_csv(tables / "cost.csv")
        parts += [
            "## Cost (wall seconds per stage)\n",
            cost.to_markdown() + "\n" if _has_tabulate() else cost.to_string() + "\n",
        ]
    bad = failed_runs(rows)
    if not bad.empty:
        parts += ["## Failed runs\n", bad.to_string(index=False) + "\n"]
    path = report_dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    logger.info("report written to %s", path)
    return path


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


__all__ = ["METRIC_ORDER", "main_table_text", "write_report"]
