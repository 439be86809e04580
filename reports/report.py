"""report.md, tables/ and figures/ from stored rows alone (no recomputation).

``write_report(out)`` reads ``OUT/results`` (rows, per-image values, curves, optional studies
and qualitative arrays) and writes under ``OUT/report``:

- ``report.md``: setup, an automatic reading, the tables, the figures (relative links);
- ``tables/<name>.{md,tex,csv}``: main, pseudo, mixed, conventions, cost, and more;
- ``figures/<name>.{png,pdf}``: bars with confidence intervals, IoU-vs-threshold curves,
  IoU-vs-gt_ratio lines, quality vs compute, Optuna plots and qualitative grids where data exist.

The main tables use the smallest gt_ratio present (pure weak supervision when 0 ran); the
mixed-supervision table and figure show every ratio.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.store import atomic_write_text
from datasets.conventions import get_convention
from reports import figures, multiclass, stats
from reports.data import ReportData, load
from reports.tables import (
    ALL_FOREGROUND,
    MAP_METRICS,
    METRIC_ORDER,
    at_ratio,
    conventions_table,
    cost_table,
    failed_runs,
    flag_all_foreground,
    format_table,
    frame_table,
    is_all_foreground,
    present_metrics,
    primary_ratio,
    pseudo_thresholds,
    summarize,
    with_failures,
)
from reports.writer import ReportWriter, cost_section, mixed_section

logger = logging.getLogger(__name__)

CONVENTION = "pet"
UPPER_BOUND = "supervised"  # the fully supervised reference: a ceiling, not a baseline to beat
CI_COLUMN = {"iou_ci": "IoU 95 % CI"}
PXAP_NOTE = (
    "PxAP: pixel average precision (Choe et al., CVPR 2020), the area under the pixel "
    "precision-recall curve of the maps over all thresholds: a score of the maps that needs no "
    "threshold."
)
#: What a method's maps are where its own network segments (its refine step).
OWN_NETWORK_NOTE = (
    " A method whose maps come from its own segmentation network (weaktr: its Phase-2 "
    "segmenter; rtc: its segmentation head; weaktr_refinery: its decoder) is scored here on "
    "that network's own test predictions; the main table scores the shared segmenter trained "
    "on its pseudo masks."
)
#: The main table's pseudo-label threshold column (read from the pseudo rows).
PSEUDO_THRESHOLD_COLUMN = {"pseudo_threshold": "pseudo thr."}


def main_table_text(rows: pd.DataFrame, convention: str = "pet") -> str:
    """The main table (segmenter on test, dataset-level) as Markdown, for the terminal."""
    rows = at_ratio(rows, primary_ratio(rows))
    if multiclass.has_multiclass(rows):  # a multi-class dataset: mIoU tables instead
        return multiclass.multiclass_text(rows)
    summary = with_failures(summarize(rows, "segmenter", "test", convention), rows)
    summary = flag_all_foreground(summary, rows, "segmenter", "test")
    pseudo = summarize(rows, "pseudo", "train", convention)
    pseudo = flag_all_foreground(pseudo, rows, "pseudo", "train")
    text = "Segmenter on test (" + convention + ", dataset-level, %):\n"
    text += format_table(summary)
    text += "\nPseudo masks on train (" + convention + ", dataset-level, %):\n"
    text += format_table(pseudo, extra={"threshold": "thr."})
    bad = failed_runs(rows)
    if not bad.empty:
        text += "\nFailed runs:\n" + bad.to_string(index=False) + "\n"
    return text


def write_report(out: Path, report_dir: Path | None = None) -> Path:
    """Write report.md, tables/ and figures/ under ``out/report`` (or ``report_dir``).

    Args:
        out: the run folder (holding ``results/``).
        report_dir: where to write; default ``out/report``.

    Returns:
        The path of report.md.
    """
    data = load(out)
    return build_report(data, Path(report_dir) if report_dir else Path(out) / "report")


def build_report(data: ReportData, report_dir: Path) -> Path:
    """Write the report of already loaded results (see :func:`write_report`)."""
    w = ReportWriter(report_dir)
    w.tables.mkdir(parents=True, exist_ok=True)
    w.figures.mkdir(parents=True, exist_ok=True)
    path = report_dir / "report.md"
    if data.rows.empty:
        atomic_write_text(path, "# wsss-bench report\n\nNo results yet.\n")
        return path
    ratio = primary_ratio(data.rows)
    rows = at_ratio(data.rows, ratio)
    if multiclass.has_multiclass(rows):
        return multiclass.write_multiclass_report(w, data, rows, path)
    per_image = _per_image_at(data.per_image, ratio)
    main = main_summary(rows)
    sig = stats.significance(stats.select(per_image, "segmenter", "test", CONVENTION), main)
    cost = cost_table(rows)
    palette = figures.method_palette([str(m) for m in main.index])

    w.parts.append("# wsss-bench report\n")
    w.section("Setup", _setup(data.rows, per_image))
    w.section("Reading", _reading(main, sig, cost))
    _main_sections(w, rows, main, sig, ratio, palette, per_image)
    mixed_section(w, data.rows, palette, "iou", CONVENTION)
    _conventions_section(w, rows, per_image)
    _cost_section(w, main, cost, palette)
    _curves_section(w, data, rows, palette)
    _extra_sections(w, data)
    bad = failed_runs(data.rows)
    if not bad.empty:
        w.section(
            "Failed runs",
            "These runs are listed as failed in the tables above; their traceback files are "
            "named below.\n",
            frame_table(bad.set_index("method_id"), index_label="method_id"),
        )
    atomic_write_text(path, "\n".join(w.parts))
    logger.info("report written to %s", path)
    return path


def main_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """The main table's summary: segmenter on test, with its failures, flags and thresholds.

    Failed runs are listed (:func:`with_failures`), methods that equal all_foreground flagged
    (:func:`flag_all_foreground`), and each method's pseudo-label threshold is read from its
    pseudo rows (segmenter rows carry the segmenter's own threshold).
    """
    main = with_failures(summarize(rows, "segmenter", "test", CONVENTION), rows)
    main = flag_all_foreground(main, rows, "segmenter", "test")
    if main.empty:
        return main
    return main.assign(pseudo_threshold=pseudo_thresholds(rows).reindex(main.index))


def _per_image_at(per_image: pd.DataFrame, ratio: float | None) -> pd.DataFrame:
    if per_image.empty or ratio is None or "gt_ratio" not in per_image:
        return per_image
    values = per_image["gt_ratio"].astype(float)
    return per_image[values.isna() | np.isclose(values, ratio)]


# ---- sections ------------------------------------------------------------------------------------
def _main_sections(
    w: ReportWriter,
    rows: pd.DataFrame,
    main: pd.DataFrame,
    sig: stats.Significance,
    ratio: float | None,
    palette: dict,
    per_image: pd.DataFrame,
) -> None:
    marks = sig.marks()
    main = main.assign(iou_ci=[sig.ci_text(str(m)) for m in main.index])
    csv = main.join(sig.table, how="left") if not sig.table.empty else main
    extra = {**PSEUDO_THRESHOLD_COLUMN, **CI_COLUMN}
    md = format_table(main, extra=extra, marks=marks)
    tex = format_table(main, style="latex", extra=extra, marks=marks)
    where = f" at gt_ratio {ratio:g}" if ratio is not None else ""
    w.section(
        f"Segmenter on test{where} (primary: dataset-level IoU of the pet class, %)",
        w.table("main", md, tex, csv),
        _footnote(sig, marks),
    )
    if not sig.table.empty:
        bars = main[main["iou_mean"].notna()] if "iou_mean" in main else main.iloc[:0]
        table = pd.DataFrame(
            {
                "kind": bars["kind"],
                "value": bars["iou_mean"],
                "low": sig.table["iou_ci_low"].reindex(bars.index),
                "high": sig.table["iou_ci_high"].reindex(bars.index),
            }
        )
        paths = figures.bar_with_ci(table, w.figures / "main_iou", palette=palette)
        w.parts.append(
            w.figure(paths, "Test IoU per method; whiskers: 95 % bootstrap CI over test images.")
        )
    pseudo = with_failures(summarize(rows, "pseudo", "train", CONVENTION), rows)
    pseudo = flag_all_foreground(pseudo, rows, "pseudo", "train")
    psig = stats.significance(stats.select(per_image, "pseudo", "train", CONVENTION), pseudo)
    pseudo = pseudo.assign(iou_ci=[psig.ci_text(str(m)) for m in pseudo.index])
    extra = {"threshold": "thr.", **CI_COLUMN}
    w.section(
        "Pseudo masks on train (threshold chosen on validation; CI: 95 % bootstrap over train "
        "images)",
        w.table(
            "pseudo",
            format_table(pseudo, extra=extra),
            format_table(pseudo, style="latex", extra=extra),
            pseudo,
        ),
    )
    maps = summarize(rows, "maps", "test", CONVENTION, metrics=MAP_METRICS)
    map_metrics = present_metrics(maps, MAP_METRICS)
    for name, title, summary, metrics in (
        (
            "maps_test",
            "Method maps on test at the validation threshold",
            flag_all_foreground(maps, rows, "maps", "test"),
            map_metrics,
        ),
        (
            "main_image_mean",
            "Segmenter on test, mean of per-image scores",
            flag_all_foreground(
                summarize(rows, "segmenter", "test", CONVENTION, "image_mean"),
                rows,
                "segmenter",
                "test",
            ),
            METRIC_ORDER,
        ),
    ):
        md, tex = format_table(summary, metrics), format_table(summary, metrics, style="latex")
        note = PXAP_NOTE if "pxap" in metrics else ""
        note += OWN_NETWORK_NOTE if name == "maps_test" else ""
        w.section(title, w.table(name, md, tex, summary), note)


def _footnote(sig: stats.Significance, marks: dict[str, str]) -> str:
    text = (
        "Mean ± std over seeds; best method per column in **bold** (references excluded). "
        "CI: 95 % percentile bootstrap over test images "
        f"({stats.N_RESAMPLES} resamples, seed {stats.BOOTSTRAP_SEED})."
    )
    if sig.best is None or sig.table.empty:
        return text + " No per-image values were stored, so no interval or test.\n"
    n = int(sig.table["n_images"].max())
    text += (
        f" † not significantly different from the best method `{sig.best}` at "
        f"{stats.ALPHA} (two-sided Wilcoxon signed-rank test on per-image IoU, averaged over "
        f"seeds and matched by image, n = {n} images; no multiple-comparison correction)."
    )
    if not marks:
        text += " Every other row differs significantly from the best."
    return text + "\n"


def _conventions_section(w: ReportWriter, rows: pd.DataFrame, per_image: pd.DataFrame) -> None:
    background = stats.all_background_iou(per_image)
    summary, convs = conventions_table(rows, background)
    if summary.empty:
        return
    summary = flag_all_foreground(summary, rows, "segmenter", "test")
    md = format_table(summary, metrics=tuple(convs), labels={c: f"`{c}`" for c in convs})
    tex = format_table(summary, metrics=tuple(convs), style="latex", labels={})
    text = "; ".join(f"`{c}`: {get_convention(c).description}" for c in convs) + (
        " (`pet` is ours; `weaktr_refinery` is how that repository's published table counts)."
    )
    for c in convs:
        share = background.get(c)
        if get_convention(c).positive_is_background and share is not None and np.isfinite(share):
            text += (
                f" An all-background prediction already scores {100 * share:.1f} IoU under "
                f"`{c}` (0 where the pet is positive): numbers on that convention are not "
                "comparable to pet IoU."
            )
    w.section("Conventions (segmenter test IoU, %)", w.table("conventions", md, tex, summary), text)


def _cost_section(w: ReportWriter, main: pd.DataFrame, cost: pd.DataFrame, palette: dict) -> None:
    if cost.empty:
        return
    cost_section(w, cost)
    if "iou_mean" not in main:
        return
    points = pd.DataFrame(
        {
            "kind": main["kind"],
            "iou": main["iou_mean"],
            "wall_s": cost["total"].reindex(main.index),
        },
        index=main.index,
    ).dropna()
    if points.empty:
        return
    paths = figures.cost_scatter(points, w.figures / "quality_vs_compute", palette=palette)
    w.parts.append(w.figure(paths, "Test IoU against wall time per run (log scale)."))


def _curves_section(w: ReportWriter, data: ReportData, rows: pd.DataFrame, palette: dict) -> None:
    curves = data.curves
    if curves.empty or "iou" not in curves:
        return
    chosen = summarize(rows, "pseudo", "train", CONVENTION, metrics=("iou",))
    thresholds = chosen["threshold"].to_dict() if "threshold" in chosen else {}
    paths = figures.threshold_curves(
        curves, w.figures / "iou_vs_threshold", chosen=thresholds, palette=palette
    )
    w.section(
        "Threshold sweeps (validation)",
        w.figure(paths, "Validation IoU against the threshold; dots: the chosen thresholds."),
    )


def _extra_sections(w: ReportWriter, data: ReportData) -> None:
    study_paths: list[Path] = []
    for source in data.studies:
        try:
            study_paths += figures.optuna_figures(source, w.figures)
        except Exception as exc:  # noqa: BLE001 - a broken study must not stop the report
            logger.warning("cannot plot Optuna study %s: %s", source, exc)
    if study_paths:
        pngs = [p for p in study_paths if p.suffix == ".png"]
        texts = [w.figure([p, p.with_suffix(".pdf")], _study_caption(p)) for p in pngs]
        w.section("Optuna sweeps", *texts)
    images, gt, outputs = figures.load_qualitative(data.out)
    if outputs:
        paths = figures.qualitative_grid(images, gt, outputs, w.figures / "qualitative")
        w.section(
            "Qualitative examples (test)",
            w.figure(paths, "Image, map, pseudo mask, segmenter prediction and GT per method."),
        )


def _study_caption(path: Path) -> str:
    study, _, kind = path.stem.removeprefix("optuna_").rpartition("_")
    what = "optimisation history" if kind == "history" else "objective against each parameter"
    return f"Optuna study `{study}`: {what}."


# ---- setup and reading ---------------------------------------------------------------------------
SETUP_KEYS = (
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
    ("python", "v_python"),
    ("torch", "v_torch"),
    ("torchvision", "v_torchvision"),
    ("timm", "v_timm"),
    ("numpy", "v_numpy"),
    ("pandas", "v_pandas"),
    ("optuna", "v_optuna"),
    ("git commit", "v_git_commit"),
)


def _setup(rows: pd.DataFrame, per_image: pd.DataFrame) -> str:
    lines = ["| setting | value |", "|---|---|"]
    for label, col in SETUP_KEYS:
        if col not in rows:
            continue
        values = sorted({_plain(v) for v in rows[col].tolist()})
        lines.append(f"| {label} | {', '.join(values)} |")
    methods = sorted(rows["method_id"].dropna().unique())
    lines.append(f"| methods | {', '.join(f'`{m}`' for m in methods)} |")
    if "seed" in rows:
        lines.append(f"| seeds per method | {rows.groupby('method_id')['seed'].nunique().max()} |")
    test = stats.select(per_image, "segmenter", "test", CONVENTION)
    if not test.empty:
        lines.append(f"| test images | {test['name'].nunique()} |")
    return "\n".join(lines) + "\n"


def _plain(value: object) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "none"
    return str(value)


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _reading(main: pd.DataFrame, sig: stats.Significance, cost: pd.DataFrame) -> str:
    if main.empty or "iou_mean" not in main:
        return "No successful run to read.\n"
    scored = main[main["iou_mean"].notna()]
    methods = scored[(scored["kind"] == "method") & ~is_all_foreground(scored)]
    methods = methods.sort_values("iou_mean", ascending=False)
    refs = scored[scored["kind"] == "reference"]
    nothing = _all_foreground_text(scored[scored["kind"] == "method"])
    if methods.empty:
        return (nothing.strip() or "Only references ran successfully: nothing to compare.") + "\n"
    win = str(methods.index[0])
    iou = 100 * methods["iou_mean"].iloc[0]
    ci = sig.ci_text(win)
    text = f"`{win}` has the best test IoU: {iou:.1f}" + (f" (95 % CI {ci})." if ci else ".")
    if len(methods) > 1:
        second = str(methods.index[1])
        gap = iou - 100 * methods["iou_mean"].iloc[1]
        text += f" It leads the runner-up `{second}` by {gap:.1f} points" + _p_text(sig, second)
    trivial = refs[[str(m).split("[")[0] != UPPER_BOUND for m in refs.index]]
    if len(trivial):
        ref = str(trivial["iou_mean"].idxmax())
        gap = iou - 100 * trivial.loc[ref, "iou_mean"]
        text += f" Over the best trivial reference `{ref}` the margin is {gap:+.1f} points"
        text += _p_text(sig, ref)
    upper = [m for m in refs.index if str(m).split("[")[0] == UPPER_BOUND]
    if upper:
        sup = 100 * refs.loc[upper[0], "iou_mean"]
        text += f" The fully supervised reference scores {sup:.1f} ({sup - iou:+.1f} points)."
    if "centre_prior" in refs.index:
        losers = methods[methods["iou_mean"] < refs.loc["centre_prior", "iou_mean"]]
        if len(losers):
            names = ", ".join(f"`{m}`" for m in losers.index)
            text += f" Below the centre prior (learned less than a fixed ellipse): {names}."
    if "total" in cost and win in cost.index:
        text += f" `{win}` took {_seconds(float(cost.loc[win, 'total']))} of wall time per run"
        if len(methods) > 1 and str(methods.index[1]) in cost.index:
            other = float(cost.loc[str(methods.index[1]), "total"])
            text += f" (`{methods.index[1]}`: {_seconds(other)})"
        text += "."
    return text + nothing + "\n"


def _all_foreground_text(methods: pd.DataFrame) -> str:
    """One sentence per method that equals all_foreground in some seed (empty if none)."""
    text = ""
    flat = is_all_foreground(methods)
    for method_id, row in methods.iterrows():
        k = row.get("n_all_foreground", 0)
        if not k or not np.isfinite(k):
            continue
        if flat[method_id]:
            thr = row.get("pseudo_threshold", np.nan)
            at = f" (pseudo-label threshold {thr:.2f})" if np.isfinite(thr) else ""
            own = row.get("n_pet_everywhere", 0) >= row["n_seeds"]
            what = "test predictions" if own else "pseudo masks"
            text += (
                f" `{method_id}` learned nothing measurable: its {what} are pet everywhere{at}, "
                f"exactly those of the `{ALL_FOREGROUND}` reference; it is not ranked."
            )
        else:
            text += (
                f" `{method_id}` scores exactly as `{ALL_FOREGROUND}` in {int(k)} of its "
                f"{int(row['n_seeds'])} seeds (masks pet everywhere): its mean includes results "
                "that learned nothing measurable."
            )
    return text


def _p_text(sig: stats.Significance, method_id: str) -> str:
    if sig.table.empty or method_id not in sig.table.index:
        return " (no per-image values, so no paired test)."
    p = sig.table.loc[method_id, "p_vs_best"]
    if not np.isfinite(p):
        return " (no matched images, so no paired test)."
    verdict = "significant" if p < stats.ALPHA else "not significant"
    n = int(sig.table.loc[method_id, "n_pairs"])
    return f"; Wilcoxon p = {p:.2g} on {n} images, {verdict} at {stats.ALPHA}."


__all__ = ["METRIC_ORDER", "build_report", "main_table_text", "write_report"]
