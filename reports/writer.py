"""The report writer: collects report.md parts and writes its table and figure files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from benchmark.store import atomic_write_text
from reports.figures import ratio_lines
from reports.tables import METRIC_LABEL, format_table, frame_table, mixed_table


@dataclass
class ReportWriter:
    """Collects report.md parts and writes table and figure files."""

    report_dir: Path
    parts: list[str] = field(default_factory=list)

    @property
    def tables(self) -> Path:
        """The folder of the table files (Markdown, LaTeX, CSV)."""
        return self.report_dir / "tables"

    @property
    def figures(self) -> Path:
        """The folder of the figure files (PNG, PDF)."""
        return self.report_dir / "figures"

    def section(self, title: str, *texts: str) -> None:
        """Append a ``##`` section with its (non-empty) texts."""
        self.parts.append(f"## {title}\n")
        self.parts.extend(t if t.endswith("\n") else t + "\n" for t in texts if t)

    def table(self, name: str, markdown: str, latex: str, frame: pd.DataFrame) -> str:
        """Write a table as ``tables/<name>.md``, ``.tex`` and ``.csv``; its Markdown + links."""
        atomic_write_text(self.tables / f"{name}.md", markdown)
        atomic_write_text(self.tables / f"{name}.tex", latex)
        if not frame.empty:
            atomic_write_text(self.tables / f"{name}.csv", frame.to_csv())
        return (
            markdown
            + f"\n[Markdown](tables/{name}.md) · [LaTeX](tables/{name}.tex)"
            + (f" · [CSV](tables/{name}.csv)\n" if not frame.empty else "\n")
        )

    def figure(self, paths: list[Path], caption: str) -> str:
        """Markdown showing the PNG of a saved figure, its caption and a link to the PDF."""
        png = [p for p in paths if p.suffix == ".png"]
        pdf = [p for p in paths if p.suffix == ".pdf"]
        if not png:
            return ""
        rel = png[0].relative_to(self.report_dir).as_posix()
        text = f"![{caption}]({rel})\n\n*{caption}*"
        if pdf:
            text += f" ([PDF]({pdf[0].relative_to(self.report_dir).as_posix()}))"
        return text + "\n"


def mixed_section(
    w: ReportWriter, rows: pd.DataFrame, palette: dict, metric: str, convention: str
) -> None:
    """The mixed-supervision section: segmenter test ``metric`` by share of GT masks.

    A table and a line figure from several ``--gt-ratio`` runs, or a sentence saying that only
    one gt_ratio was run.
    """
    summary, keys = mixed_table(rows, metric, convention)
    if summary.empty:
        ratios = sorted(rows["gt_ratio"].dropna().unique()) if "gt_ratio" in rows else []
        only = f" ({ratios[0]:g})" if ratios else ""
        w.section(
            "Mixed supervision",
            f"Only one gt_ratio{only} was run, so there is no mixed-supervision table; run "
            "with several `--gt-ratio` values to fill it.\n",
        )
        return
    name = METRIC_LABEL.get(metric, metric)
    labels = {k: f"gt {k[1:]}" for k in keys}
    md = format_table(summary, metrics=tuple(keys), labels=labels)
    tex = format_table(summary, metrics=tuple(keys), style="latex", labels=labels)
    w.section(
        f"Mixed supervision (segmenter test {name} by share of GT masks, %)",
        w.table("mixed", md, tex, summary),
    )
    sel = rows[
        rows["status"].isin(["done", "budget"])
        & (rows["stage"] == "segmenter")
        & (rows["split"] == "test")
        & (rows["convention"] == convention)
        & (rows["aggregation"] == "dataset")
        & (rows["metric"] == metric)
    ]
    points = sel[["method_id", "gt_ratio", "seed", "value"]]
    paths = ratio_lines(points, w.figures / f"{metric}_vs_gt_ratio", metric, palette)
    w.parts.append(w.figure(paths, f"Test {name} against the share of GT masks; band: std."))


def cost_section(w: ReportWriter, cost: pd.DataFrame) -> None:
    """The cost table (wall seconds per stage, device seconds, peak memory), if any."""
    if cost.empty:
        return
    w.section(
        "Cost (wall seconds per stage, mean over seeds; device seconds; peak memory in MB)",
        w.table(
            "cost",
            frame_table(cost, index_label="method_id"),
            frame_table(cost, style="latex", index_label="method_id"),
            cost,
        ),
    )
