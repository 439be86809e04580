"""Uncertainty from per-image values: bootstrap intervals and paired tests against the best.

Both use the per-image confusion counts and scores the runner stores beside the rows (one
evaluator, no recomputation of predictions):

- 95 % bootstrap confidence interval of the dataset-level IoU, resampling test images with
  replacement (percentile method, a fixed seeded Generator, vectorised over resamples). With
  several seeds, each resample draws one set of images for every seed and the statistic is the
  mean over seeds of the dataset-level IoU, i.e. exactly the number the main table shows.
- Paired test between each method and the best one: the Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``, two-sided) on per-image IoU averaged over seeds, matched by image
  name. No correction for multiple comparisons is applied.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from datasets.conventions import get_convention
from reports.tables import is_all_foreground

logger = logging.getLogger(__name__)

N_RESAMPLES = 2000
LEVEL = 0.95
ALPHA = 0.05
BOOTSTRAP_SEED = 0


def select(
    per_image: pd.DataFrame, stage: str = "segmenter", split: str = "test", convention: str = "pet"
) -> pd.DataFrame:
    """The per-image rows of one stage, split and convention."""
    if per_image.empty:
        return per_image
    keep = (
        (per_image["stage"] == stage)
        & (per_image["split"] == split)
        & (per_image["convention"] == convention)
    )
    return per_image[keep]


def _counts(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, I) tp, fp, fn of the images present under every seed, in a fixed image order."""
    wide = frame.pivot_table(index="seed", columns="name", values=["tp", "fp", "fn"], aggfunc="sum")
    wide = wide.dropna(axis=1)
    return tuple(wide[k].to_numpy(dtype=np.float64) for k in ("tp", "fp", "fn"))  # type: ignore[return-value]


def _iou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / np.where(denom > 0, denom, 1.0), np.nan)


def bootstrap_iou_ci(
    frame: pd.DataFrame,
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of the dataset-level IoU over images, for one method.

    Args:
        frame: per-image rows of one method (columns ``seed``, ``name``, ``tp``, ``fp``, ``fn``).
        n_resamples: bootstrap resamples.
        level: confidence level.
        seed: seed of the Generator (fixed, so reports are reproducible).

    Returns:
        ``(estimate, low, high)``: the mean over seeds of the dataset-level IoU and the bounds;
        NaN when there is no image.
    """
    tp, fp, fn = _counts(frame)  # (S, I)
    n_images = tp.shape[1] if tp.ndim == 2 else 0
    if n_images == 0:
        return (np.nan, np.nan, np.nan)
    estimate = float(np.nanmean(_iou(tp.sum(1), fp.sum(1), fn.sum(1))))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_resamples)
    weights = weights.astype(np.float64)  # (B, I): how often each image is drawn
    boot = _iou(weights @ tp.T, weights @ fp.T, weights @ fn.T)  # (B, S)
    boot = np.nanmean(boot, axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(boot, [tail, 100 - tail])
    return (estimate, float(low), float(high))


def _class_counts(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(S, I, K) per-class tp, fp, fn of the images present under every seed (multi-class)."""
    classes = [c[3:] for c in frame.columns if c.startswith("tp:")]
    seeds = sorted(frame["seed"].unique())
    by_seed = [frame[frame["seed"] == s].drop_duplicates("name", keep="last") for s in seeds]
    names = sorted(set.intersection(*(set(f["name"]) for f in by_seed))) if by_seed else []
    out = []
    for kind in ("tp", "fp", "fn"):
        cols = [f"{kind}:{c}" for c in classes]
        out.append(
            np.stack([f.set_index("name").loc[names, cols].to_numpy(np.float64) for f in by_seed])
            if names
            else np.zeros((len(seeds), 0, len(classes)))
        )
    return out[0], out[1], out[2]


def _miou(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Mean IoU over the last axis, over the classes with a non-zero union (NaN if none)."""
    iou = _iou(tp, fp, fn)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices: no class present
        return np.nanmean(iou, axis=-1)


def bootstrap_miou_ci(
    frame: pd.DataFrame,
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """Percentile bootstrap interval of the dataset-level mIoU over images (multi-class).

    As :func:`bootstrap_iou_ci`, on the per-image ``tp:<class>``, ``fp:<class>``, ``fn:<class>``
    counts of ``benchmark.multiclass``: each resample sums the drawn images' counts per class
    (one dataset-level confusion), takes the mIoU over the classes with a non-zero union and
    averages it over the seeds; the estimate is the mIoU the tables show.

    Returns:
        ``(estimate, low, high)``; NaN when there is no image.
    """
    tp, fp, fn = _class_counts(frame)  # (S, I, K)
    n_images = tp.shape[1]
    if n_images == 0:
        return (np.nan, np.nan, np.nan)
    estimate = float(np.nanmean(_miou(tp.sum(1), fp.sum(1), fn.sum(1))))
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_images, np.full(n_images, 1.0 / n_images), size=n_resamples)
    weights = weights.astype(np.float64)  # (B, I)
    boot = _miou(*(np.einsum("bi,sik->bsk", weights, a) for a in (tp, fp, fn)))  # (B, S)
    boot = np.nanmean(boot, axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(boot, [tail, 100 - tail])
    return (estimate, float(low), float(high))


def paired_test(frame: pd.DataFrame, a: str, b: str, metric: str = "iou") -> tuple[float, int]:
    """Two-sided Wilcoxon signed-rank test of per-image ``metric`` between methods a and b.

    Per-image values are averaged over seeds and matched by image name; images where either
    value is undefined (NaN) are left out.

    Returns:
        ``(p_value, n_pairs)``; p is 1 when every difference is zero, NaN without pairs.
    """
    means = frame[frame["method_id"].isin([a, b])].groupby(["name", "method_id"])[metric].mean()
    wide = means.unstack("method_id")
    if a not in wide or b not in wide:
        return (np.nan, 0)
    pairs = wide[[a, b]].dropna()
    n = len(pairs)
    if n == 0:
        return (np.nan, 0)
    diff = pairs[a].to_numpy() - pairs[b].to_numpy()
    if np.allclose(diff, 0.0):
        return (1.0, n)
    return (float(stats.wilcoxon(pairs[a], pairs[b]).pvalue), n)


@dataclass(frozen=True)
class Significance:
    """Bootstrap intervals and paired tests of every method of a table.

    Attributes:
        table: indexed by method_id: ``iou_est``, ``iou_ci_low``, ``iou_ci_high``, ``p_vs_best``,
            ``n_pairs``, ``n_images``.
        best: the method_id every other one is tested against (None without methods).
    """

    table: pd.DataFrame
    best: str | None

    def marks(self, alpha: float = ALPHA) -> dict[str, str]:
        """method_id -> ``dagger`` for those not significantly different from the best."""
        if self.table.empty or self.best is None:
            return {}
        p = self.table["p_vs_best"]
        return {m: "dagger" for m in p.index if m != self.best and p[m] >= alpha}

    def ci_text(self, method_id: str) -> str:
        """The interval of a method in percent, ``[61.2, 65.0]``, or empty."""
        if method_id not in self.table.index:
            return ""
        low, high = self.table.loc[method_id, ["iou_ci_low", "iou_ci_high"]]
        return "" if np.isnan(low) else f"[{100 * low:.1f}, {100 * high:.1f}]"


def significance(per_image: pd.DataFrame, summary: pd.DataFrame) -> Significance:
    """Intervals for every method of ``summary`` and tests against its best method.

    Args:
        per_image: per-image rows of one stage/split/convention (see :func:`select`).
        summary: the table's summary (``kind`` and ``iou_mean`` per method_id); the best is
            the method (kind ``method``) of highest ``iou_mean`` that does not equal
            all_foreground (see :func:`reports.tables.flag_all_foreground`).

    Returns:
        A :class:`Significance`; empty when there are no per-image rows.
    """
    if per_image.empty or summary.empty or "iou_mean" not in summary:
        return Significance(pd.DataFrame(), None)
    methods = summary[
        (summary["kind"] == "method") & summary["iou_mean"].notna() & ~is_all_foreground(summary)
    ]
    best = str(methods["iou_mean"].idxmax()) if len(methods) else None
    records = []
    for method_id in summary.index:
        own = per_image[per_image["method_id"] == method_id]
        if own.empty:
            continue
        est, low, high = bootstrap_iou_ci(own)
        p, n = (np.nan, 0) if best in (None, method_id) else paired_test(per_image, method_id, best)
        records.append(
            {
                "method_id": method_id,
                "iou_est": est,
                "iou_ci_low": low,
                "iou_ci_high": high,
                "p_vs_best": p,
                "n_pairs": n,
                "n_images": own["name"].nunique(),
            }
        )
    table = pd.DataFrame(records).set_index("method_id") if records else pd.DataFrame()
    return Significance(table, best)


def all_background_iou(per_image: pd.DataFrame, split: str = "test") -> dict[str, float]:
    """The dataset-level IoU an all-background prediction scores under each convention.

    It is 0 where the positive class is the pet, and the background share of the scored pixels
    where the positive class is the background (``weaktr_refinery``). Computed from the GT
    counts of one run (tp + fn = GT positives, tp + fp + fn + tn = scored pixels).
    """
    out: dict[str, float] = {}
    if per_image.empty:
        return out
    sel = per_image[(per_image["split"] == split) & (per_image["stage"] == "segmenter")]
    for convention, frame in sel.groupby("convention"):
        first = frame[frame["run_key"] == frame["run_key"].iloc[0]] if "run_key" in frame else frame
        first = first[first["seed"] == first["seed"].iloc[0]]
        positives = float((first["tp"] + first["fn"]).sum())
        total = float(first[["tp", "fp", "fn", "tn"]].to_numpy().sum())
        share = positives / total if total else np.nan
        # an all-background prediction scores only where the positive class is the background
        positive_is_background = get_convention(str(convention)).positive_is_background
        out[str(convention)] = share if positive_is_background else 0.0
    return out
