"""Tables (Markdown, LaTeX, CSV), figures and report.md from stored result rows."""

from reports.report import build_report, main_table_text, write_report
from reports.tables import (
    conventions_table,
    cost_table,
    format_table,
    mixed_table,
    summarize,
    with_failures,
)

__all__ = [
    "build_report",
    "conventions_table",
    "cost_table",
    "format_table",
    "main_table_text",
    "mixed_table",
    "summarize",
    "with_failures",
    "write_report",
]
