"""Tables (Markdown, LaTeX, CSV) and report.md from stored result rows."""

from reports.report import main_table_text, write_report
from reports.tables import cost_table, format_table, summarize

__all__ = ["cost_table", "format_table", "main_table_text", "summarize", "write_report"]
