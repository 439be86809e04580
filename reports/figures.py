"""Figures for papers (seaborn on matplotlib's Agg canvas), PNG at 200 dpi and PDF.

Every figure is one paper column wide (3.5 in = 700 px at 200 dpi) with a fixed theme (seaborn
``paper`` context, ``whitegrid`` style, colour-blind palette, one colour per method across
figures), legends outside the axes, long method names on the y axis of horizontal bars. Figures
are built as :class:`matplotlib.figure.Figure` objects (no pyplot, no global backend switch), so
rendering is headless and leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from benchmark.store import atomic_write_bytes

logger = logging.getLogger(__name__)

DPI = 200
COLUMN_IN = 3.5  # width of one paper column, inches
FORMATS = ("png", "pdf")
KIND_HATCH = {"method": "", "reference": "///"}


def theme_rc() -> dict[str, Any]:
    """The fixed rc parameters of every figure (seaborn paper/whitegrid plus a few sizes)."""
    rc: dict[str, Any] = {}
    rc.update(sns.axes_style("whitegrid"))
    rc.update(sns.plotting_context("paper", font_scale=0.9))
    rc.update(
        {
            "font.family": "DejaVu Sans",
            "axes.titlesize": 8,
            "axes.labelsize": 8,
            "legend.fontsize": 7,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "savefig.dpi": DPI,
            "pdf.fonttype": 42,  # TrueType in PDFs, editable and accepted by publishers
        }
    )
    return rc


@contextmanager
def paper_theme() -> Iterator[None]:
    """Apply :func:`theme_rc` for the duration of a block."""
    with matplotlib.rc_context(theme_rc()):
        yield


def new_figure(height_in: float, width_in: float = COLUMN_IN) -> Figure:
    """A constrained-layout figure of a fixed size, drawn on the Agg canvas."""
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Save ``stem.png`` (200 dpi) and ``stem.pdf``; the pixel size is exactly figsize x dpi.

    Each file is rendered in memory and written atomically (temporary file, fsync, rename), so
    a full disk leaves the previous figure or none, never a truncated one.

    Raises:
        benchmark.cache.DiskFullError: the disk is full (one line in the CLI, exit 1).
    """
    paths = []
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        meta = {"CreationDate": None} if fmt == "pdf" else {"Software": None}
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=DPI, metadata=meta)
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    logger.debug("figure written: %s", stem)
    return paths


def method_palette(method_ids: Sequence[str]) -> dict[str, Any]:
    """One colour-blind-safe colour per method, stable in the given order."""
    colours = sns.color_palette("colorblind", n_colors=max(len(method_ids), 1))
    return {m: colours[i % len(colours)] for i, m in enumerate(method_ids)}


def _legend_below(fig: Figure, ax: Any, n_items: int, title: str | None = None) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        fig.legend(
            handles,
            labels,
            loc="outside lower center",
            ncols=_legend_cols(labels),
            frameon=False,
            title=title,
        )


def _ordered(method_ids: pd.Series, palette: Mapping[str, Any] | None) -> list[str]:
    """Method ids present in the data, in the palette's (the main table's) order first."""
    present = list(dict.fromkeys(str(m) for m in method_ids))
    first = [m for m in (palette or {}) if m in present]
    return first + [m for m in present if m not in first]


#: Labels longer than this go in one legend column (two would not fit a paper column).
_LONG_LABEL = 22


def _legend_cols(labels: Sequence[Any]) -> int:
    """Two legend columns, or one when a label is too long for half a paper column."""
    if not labels:
        return 1
    return 1 if max(len(str(label)) for label in labels) > _LONG_LABEL else min(2, len(labels))


def _legend_height(labels: Sequence[Any]) -> float:
    """Inches the legend below the axes needs for these labels."""
    return 0.2 + 0.16 * math.ceil(len(labels) / _legend_cols(labels))


# ---- bar chart of the main metric ----------------------------------------------------------------
def bar_with_ci(
    table: pd.DataFrame,
    stem: Path,
    label: str = "Test IoU (%)",
    palette: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Horizontal bars of a metric per method with asymmetric confidence-interval whiskers.

    Args:
        table: indexed by method_id, in display order, with ``kind``, ``value`` and optionally
            ``low`` / ``high`` (fractions); references are hatched.
        stem: output path without suffix.
        label: the x-axis title.
        palette: method_id -> colour.

    Returns:
        The written files.
    """
    table = table[table["value"].notna()]
    n = len(table)
    palette = palette or method_palette(list(table.index))
    with paper_theme():
        fig = new_figure(0.7 + 0.22 * max(n, 1))
        ax = fig.add_subplot()
        y = np.arange(n)
        values = 100 * table["value"].to_numpy(dtype=float)
        bars = ax.barh(
            y, values, color=[palette.get(m, "0.5") for m in table.index], edgecolor="0.2"
        )
        for bar, kind in zip(bars, table["kind"]):
            bar.set_hatch(KIND_HATCH.get(kind, ""))
        if {"low", "high"} <= set(table.columns):
            low = 100 * table["low"].to_numpy(dtype=float)
            high = 100 * table["high"].to_numpy(dtype=float)
            # clipped: when seeds disagree a lot, the mean over seeds can leave the pooled CI
            err = np.maximum(np.vstack([values - low, high - values]), 0.0)
            ok = np.isfinite(err).all(axis=0)
            ax.errorbar(
                values[ok], y[ok], xerr=err[:, ok], fmt="none", ecolor="0.1", capsize=2, lw=0.8
            )
        ax.set_yticks(y, [str(m) for m in table.index])
        ax.invert_yaxis()
        ax.set_xlabel(label)
        ax.set_xlim(0, 100)
        ax.grid(axis="y", visible=False)
        return save_figure(fig, stem)


# ---- curves --------------------------------------------------------------------------------------
def threshold_curves(
    curves: pd.DataFrame,
    stem: Path,
    chosen: Mapping[str, float] | None = None,
    metric: str = "iou",
    palette: Mapping[str, Any] | None = None,
    xlabel: str = "Threshold on the method's map",
) -> list[Path]:
    """Validation ``metric`` against the threshold, one line per method (band: std over seeds).

    Args:
        curves: ``method_id``, ``seed``, ``threshold`` and ``metric`` columns.
        stem: output path without suffix.
        chosen: method_id -> the threshold the runner chose, marked with a dot.
        metric: the curve's metric column.
        palette: method_id -> colour.
        xlabel: the x axis title.

    Returns:
        The written files.
    """
    data = curves.assign(value=100 * curves[metric])
    with paper_theme():
        fig, ax, ids, palette = _method_lines(data, "threshold", palette, lw=1.2)
        for method_id, t in (chosen or {}).items():
            if method_id not in ids or not np.isfinite(t):
                continue
            mean = data[data["method_id"] == method_id].groupby("threshold")["value"].mean()
            if mean.empty:
                continue
            at = mean.index[np.argmin(np.abs(mean.index.to_numpy(dtype=float) - t))]
            ax.plot([at], [mean[at]], "o", ms=4, color=palette.get(method_id, "0.5"), mec="k")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"Validation {metric_label(metric)} (%)")
        ax.set_xlim(0, 1)
        _legend_below(fig, ax, len(ids))
        return save_figure(fig, stem)


def _method_lines(
    data: pd.DataFrame, x: str, palette: Mapping[str, Any] | None, **style: Any
) -> tuple[Figure, Any, list[str], Mapping[str, Any]]:
    """A figure with one line per method (``value`` vs ``x``, +- sd over seeds), legend room.

    Call inside :func:`paper_theme`. Returns the figure, its axes, the method ids in legend
    order and the palette used.
    """
    ids = _ordered(data["method_id"], palette)
    palette = palette or method_palette(ids)
    fig = new_figure(2.3 + _legend_height(ids))
    ax = fig.add_subplot()
    sns.lineplot(
        data=data,
        x=x,
        y="value",
        hue="method_id",
        hue_order=ids,
        palette={m: palette.get(m, "0.5") for m in ids},
        errorbar="sd",
        ax=ax,
        **style,
    )
    return fig, ax, ids, palette


def ratio_lines(
    points: pd.DataFrame,
    stem: Path,
    metric: str = "iou",
    palette: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Test ``metric`` against the share of GT masks (gt_ratio), one line per method.

    Args:
        points: ``method_id``, ``gt_ratio``, ``seed`` and ``value`` (fraction) columns.
        stem: output path without suffix.
        metric: the metric's name (for the axis title).
        palette: method_id -> colour.

    Returns:
        The written files.
    """
    data = points.assign(value=100 * points["value"])
    with paper_theme():
        fig, ax, ids, _ = _method_lines(data, "gt_ratio", palette, marker="o", ms=4)
        ax.set_xlabel("Share of train images with GT masks (gt_ratio)")
        ax.set_ylabel(f"Test {metric_label(metric)} (%)")
        _legend_below(fig, ax, len(ids))
        return save_figure(fig, stem)


def cost_scatter(
    points: pd.DataFrame, stem: Path, palette: Mapping[str, Any] | None = None
) -> list[Path]:
    """Test IoU against total wall seconds per run (log scale), one point per method.

    Methods are circles, references squares; the legend below names them (no labels in the
    axes, which would overlap when methods cost the same).

    Args:
        points: indexed by method_id with ``kind``, ``iou`` (fraction) and ``wall_s``.
        stem: output path without suffix.
        palette: method_id -> colour.

    Returns:
        The written files.
    """
    points = points[points["iou"].notna() & (points["wall_s"] > 0)]
    palette = palette or method_palette(list(points.index))
    with paper_theme():
        fig = new_figure(2.3 + _legend_height(list(points.index)))
        ax = fig.add_subplot()
        for method_id, row in points.iterrows():
            ax.scatter(
                row["wall_s"],
                100 * row["iou"],
                s=24,
                marker="o" if row["kind"] == "method" else "s",
                color=palette.get(method_id, "0.5"),
                edgecolor="0.2",
                linewidth=0.5,
                label=str(method_id),
            )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(_plain_number))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("Wall time per run (s, log scale)")
        ax.set_ylabel("Test IoU (%)")
        ax.margins(x=0.15, y=0.12)
        _legend_below(fig, ax, len(points))
        return save_figure(fig, stem)


def _plain_number(value: float, _pos: int) -> str:
    return f"{value:g}"


def metric_label(metric: str) -> str:
    """The display name of a metric (``IoU``)."""
    from reports.tables import METRIC_LABEL

    return METRIC_LABEL.get(metric, metric)


# ---- Optuna --------------------------------------------------------------------------------------
def load_trials(source: pd.DataFrame | str | Path) -> pd.DataFrame:
    """Trials of one or more Optuna studies as one frame.

    Args:
        source: a frame like ``optuna.Study.trials_dataframe()`` (``number``, ``value``,
            ``state``, ``params_*``; optional ``study`` and ``direction``), a CSV or parquet
            export of such a frame, an SQLite file or RDB URL, or a journal file (``.log``,
            ``.journal``); every study in a storage is read.

    Returns:
        Columns ``study``, ``direction``, ``number``, ``value``, ``state`` and ``params_*``.
    """
    if isinstance(source, pd.DataFrame):
        frame = source.copy()
    else:
        text = str(source)
        suffix = Path(text).suffix.lower()
        if suffix == ".csv":
            frame = pd.read_csv(text)
        elif suffix == ".parquet":
            frame = pd.read_parquet(text)
        else:
            frame = _trials_from_storage(text, suffix)
    if "study" not in frame:
        frame["study"] = "study" if isinstance(source, pd.DataFrame) else Path(str(source)).stem
    if "direction" not in frame:
        frame["direction"] = "maximize"
    if "state" not in frame:
        frame["state"] = "COMPLETE"
    return frame


def _trials_from_storage(text: str, suffix: str) -> pd.DataFrame:
    import optuna

    if suffix in (".log", ".journal"):
        from optuna.storages.journal import JournalFileBackend

        storage: Any = optuna.storages.JournalStorage(JournalFileBackend(text))
    else:
        storage = text if "://" in text else f"sqlite:///{Path(text).resolve()}"
    frames = []
    for name in optuna.study.get_all_study_names(storage=storage):
        study = optuna.load_study(study_name=name, storage=storage)
        if len(study.directions) != 1:
            logger.info("study %s is multi-objective; no history plot", name)
            continue
        frame = study.trials_dataframe()
        frame["study"] = name
        frame["direction"] = study.direction.name.lower()
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def optuna_figures(trials: pd.DataFrame | str | Path, fig_dir: Path) -> list[Path]:
    """Optimisation history and slice plots of every study in ``trials``.

    Args:
        trials: anything :func:`load_trials` accepts.
        fig_dir: the figures folder.

    Returns:
        The written files (none when there is no completed trial).
    """
    frame = load_trials(trials)
    if frame.empty or "value" not in frame:
        return []
    frame = frame[frame["state"].astype(str).str.upper().str.endswith("COMPLETE")]
    frame = frame[frame["value"].notna()]
    paths: list[Path] = []
    for study, part in frame.groupby("study"):
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(study)).strip("_") or "study"
        part = part.sort_values("number")
        paths += _history(part, fig_dir / f"optuna_{slug}_history")
        params = [c for c in part.columns if c.startswith("params_") and part[c].notna().any()]
        if params:
            paths += _slices(part, params, fig_dir / f"optuna_{slug}_slice")
    return paths


def _history(part: pd.DataFrame, stem: Path) -> list[Path]:
    maximize = str(part["direction"].iloc[0]).lower().startswith("max")
    best = part["value"].cummax() if maximize else part["value"].cummin()
    with paper_theme():
        fig = new_figure(2.4)
        ax = fig.add_subplot()
        ax.scatter(part["number"], part["value"], s=8, color="0.55", label="trial")
        ax.step(part["number"], best, where="post", color="C0", lw=1.2, label="best so far")
        ax.set_xlabel("Trial")
        ax.set_ylabel("Objective value")
        ax.set_title(str(part["study"].iloc[0]))
        _legend_below(fig, ax, 2)
        return save_figure(fig, stem)


def _slices(part: pd.DataFrame, params: list[str], stem: Path) -> list[Path]:
    params = params[:6]
    ncols = min(2, len(params))
    nrows = math.ceil(len(params) / ncols)
    with paper_theme():
        fig = new_figure(0.3 + 1.6 * nrows)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
        scatter = None
        for i, (ax, col) in enumerate(zip(axes, params)):
            values = part[col]
            if pd.api.types.is_numeric_dtype(values):
                scatter = ax.scatter(values, part["value"], s=8, c=part["number"], cmap="viridis")
            else:
                sns.stripplot(x=values.astype(str), y=part["value"], ax=ax, size=3, color="C0")
                ax.tick_params(axis="x", rotation=30)
            ax.set_xlabel(col.removeprefix("params_"))
            ax.set_ylabel("Objective value" if i % ncols == 0 else "")
        for ax in axes[len(params) :]:
            ax.set_visible(False)
        if scatter is not None:
            fig.colorbar(scatter, ax=list(axes[: len(params)]), label="Trial", shrink=0.8)
        return save_figure(fig, stem)


# ---- qualitative grid ----------------------------------------------------------------------------
QUALITATIVE_ROW_IN = 0.56  # row height: five square panels beside the row labels
PANELS = ("image", "map", "pseudo", "prediction", "gt")
PANEL_TITLE = {
    "image": "Image",
    "map": "Map",
    "pseudo": "Pseudo mask",
    "prediction": "Prediction",
    "gt": "GT",
}


def qualitative_grid(
    images: Mapping[str, np.ndarray],
    gt: Mapping[str, np.ndarray],
    outputs: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
    stem: Path,
    max_images: int = 3,
) -> list[Path]:
    """A grid with one row per (image, method): image, map, pseudo mask, prediction, GT.

    The same images are shown for every method (those present for all methods, by name).

    Args:
        images: image name -> (H, W, 3) uint8 image.
        gt: image name -> (H, W) uint8 mask (1 = positive, 0 = negative, 255 = ignored).
        outputs: method_id -> image name -> ``map`` ((h, w) float in [0, 1]), ``pseudo`` and
            ``prediction`` ((H, W) masks, or soft maps in [0, 1]). Missing panels stay blank.
        stem: output path without suffix.
        max_images: at most this many images.

    Returns:
        The written files (none when no image is common to every method).
    """
    methods = list(outputs)
    names = [n for n in images if n in gt and all(n in outputs[m] for m in methods)]
    names = names[:max_images]
    if not names or not methods:
        return []
    nrows = len(names) * len(methods)
    with paper_theme():
        fig = new_figure(0.3 + QUALITATIVE_ROW_IN * nrows)
        axes = fig.subplots(nrows, len(PANELS), squeeze=False)
        for i, (name, method_id) in enumerate((n, m) for n in names for m in methods):
            panels = {"image": images[name], "gt": gt[name], **outputs[method_id][name]}
            for j, panel in enumerate(PANELS):
                ax = axes[i, j]
                _show(ax, panel, panels.get(panel))
                if i == 0:
                    ax.set_title(PANEL_TITLE[panel], fontsize=6)
            axes[i, 0].set_ylabel(f"{method_id}\n{name}", fontsize=5, rotation=0, ha="right")
        return save_figure(fig, stem)


def _show(ax: Any, panel: str, array: np.ndarray | None) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if array is None:
        return
    array = np.asarray(array)
    if panel == "image":
        ax.imshow(array)
    elif panel == "map" or (np.issubdtype(array.dtype, np.floating) and array.max() <= 1.0):
        ax.imshow(array.astype(np.float32), cmap="viridis", vmin=0.0, vmax=1.0)
    else:
        cmap = matplotlib.colormaps["gray"].with_extremes(bad=(0.85, 0.35, 0.35))
        ax.imshow(np.ma.masked_equal(array, 255).astype(np.float32), cmap=cmap, vmin=0, vmax=1)


def load_qualitative(
    out: Path,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, dict[str, dict[str, Any]]]]:
    """Arrays for :func:`qualitative_grid` from ``OUT/results/qualitative/*.npz`` (if any).

    Each file holds one run: ``method_id`` (0-d str), ``names`` (K,), ``image`` (K, H, W, 3)
    uint8, ``gt`` (K, H, W) uint8 with 255 ignored, and any of ``map`` (K, h, w) float,
    ``pseudo`` (K, H, W) and ``prediction`` (K, H, W). The first seed of a method is used.

    Returns:
        ``(images, gt, outputs)``; empty dicts when the runner stored no such file.
    """
    images: dict[str, np.ndarray] = {}
    gts: dict[str, np.ndarray] = {}
    outputs: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted((Path(out) / "results" / "qualitative").glob("*.npz")):
        try:
            with np.load(path, allow_pickle=False) as data:
                method_id = str(data["method_id"])
                if method_id in outputs:
                    continue
                names = [str(n) for n in data["names"]]
                per_name: dict[str, dict[str, Any]] = {n: {} for n in names}
                for k, name in enumerate(names):
                    images.setdefault(name, data["image"][k])
                    gts.setdefault(name, data["gt"][k])
                    for panel in ("map", "pseudo", "prediction"):
                        if panel in data:
                            per_name[name][panel] = data[panel][k]
                outputs[method_id] = per_name
        except (OSError, KeyError, ValueError) as exc:
            logger.warning("skipping unreadable qualitative file %s: %s", path, exc)
    return images, gts, outputs
