"""Choosing the threshold of soft maps: one-pass sweep counts and the threshold search.

The validation maps of a split are swept once (:func:`sweep_counts`: TP/FP/FN/TN at every grid
threshold ``i / n_bins``); :func:`search_threshold` then evaluates trials on those counts, so a
trial costs microseconds. ``python -m benchmark run`` chooses its threshold with
:func:`choose_threshold` at the :data:`SWEEP_BINS` grid (every threshold evaluated), ``sweep
threshold`` with :func:`search_threshold` at :data:`THRESHOLD_BINS` (coarse grid, fine
neighbours of the best coarse thresholds, then TPE). Thresholds are always pet-map thresholds
(``pet map >= t``), under every convention. :func:`map_pxap` scores the maps without a
threshold (pixel average precision) from the same kind of sweep.

This module sits in the lowest layer of ``benchmark``: the runner and the sweeps import it, it
imports neither.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from benchmark.evaluate import METRICS, SweepCounts, ThresholdSweep
from datasets.conventions import CONVENTIONS, get_convention

logger = logging.getLogger(__name__)

SWEEP_BINS = 100  # threshold grid resolution of the validation sweep (0.01)
THRESHOLD_BINS = 1000  # 1,001 thresholds i / 1000 for the threshold sweep
COARSE_STEP = 0.01  # the coarse grid search_threshold evaluates first
FINE_PEAKS = 3  # coarse thresholds whose fine neighbourhoods are evaluated next
#: PxAP's precision-recall curve: 1,001 thresholds (wsolevaluation's default 0.001 interval)
PXAP_BINS = THRESHOLD_BINS
#: The split parts whose maps get a PxAP row: validation (threshold choice), test, train.
PXAP_PARTS = ("val", "test", "train")


def sweep_counts(
    maps: np.ndarray, masks: Iterator[np.ndarray], convention: str, n_bins: int = SWEEP_BINS
) -> SweepCounts:
    """TP/FP/FN/TN of a split's maps at every grid threshold ``i / n_bins`` (one pass).

    The prediction is ``pet map >= t`` under every convention, so thresholds are always pet-map
    thresholds; where the convention's positive class is the background side
    (``weaktr_refinery``) the counts are those of the complement ``pet map < t``.
    """
    sweep = ThresholdSweep(n_bins=n_bins)
    pairs = [(soft[0].astype(np.float32), gt) for soft, gt in zip(maps, masks)]
    sweep.add_many([p[0] for p in pairs], [p[1] for p in pairs])  # one batched, threaded pass
    counts = sweep.counts()
    return counts.inverted() if get_convention(convention).positive_is_background else counts


def map_pxap(
    maps: np.ndarray, masks: Iterator[np.ndarray], convention: str, n_bins: int = PXAP_BINS
) -> float:
    """Pixel average precision of a split's pet maps under a convention (threshold-free).

    One one-pass sweep (:func:`sweep_counts`) at ``n_bins`` and
    :meth:`benchmark.evaluate.SweepCounts.pxap`: the area under the split's pixel
    precision-recall curve (Choe et al., CVPR 2020). Where the convention's positive class is
    the background side, the curve is that of the complement prediction ``pet map < t``.

    Args:
        maps: (N, 1, h, w) pet maps in [0, 1].
        masks: per image, its (H, W) GT mask under ``convention``.
        convention: the scoring convention.
        n_bins: threshold grid resolution.

    Returns:
        PxAP in [0, 1]; NaN when the split has no positive pixel.
    """
    return sweep_counts(maps, masks, convention, n_bins).pxap()


def pxap_rows(
    maps: Mapping[str, np.ndarray],
    masks: Callable[[str, str], Iterable[np.ndarray]],
    common: Mapping[str, Any],
    n_bins: int = PXAP_BINS,
) -> list[dict[str, Any]]:
    """Result rows of the threshold-free PxAP of a run's maps, per split part and convention.

    One row per part of :data:`PXAP_PARTS` present in ``maps`` and per convention of
    :data:`datasets.conventions.CONVENTIONS`: stage ``maps``, aggregation ``dataset`` (the
    pixels of the whole part pooled), metric ``pxap``, no threshold (NaN, as a cost row).

    Args:
        maps: split part -> its (N, 1, h, w) pet maps in [0, 1].
        masks: ``masks(part, convention)`` -> the part's original-resolution GT masks, in the
            order of the maps (``DataBundle.orig_masks``).
        common: the columns every row of the run shares.
        n_bins: threshold grid resolution of the precision-recall curve.

    Returns:
        The rows, ready to extend a run's quality rows.
    """
    return [
        {
            **common,
            "threshold": float("nan"),  # threshold-free
            "threshold_source": "",
            "stage": "maps",
            "split": part,
            "convention": convention,
            "aggregation": "dataset",
            "metric": "pxap",
            "value": map_pxap(maps[part], iter(masks(part, convention)), convention, n_bins),
        }
        for part in PXAP_PARTS
        if part in maps
        for convention in CONVENTIONS
    ]


def choose_threshold(
    maps: np.ndarray, masks: Iterator[np.ndarray], convention: str
) -> tuple[float, pd.DataFrame]:
    """The threshold of best validation IoU and the validation curve.

    The same code path as ``python -m benchmark sweep threshold``: one-pass sweep counts, then
    :func:`search_threshold` (an in-memory Optuna study; at ``SWEEP_BINS`` its coarse grid is the
    whole grid, so every threshold is evaluated and ties go to the lowest).
    """
    counts = sweep_counts(maps, masks, convention)
    best_t = search_threshold(counts).threshold
    curve = pd.DataFrame({"threshold": counts.thresholds, **{m: counts.metric(m) for m in METRICS}})
    return float(best_t), curve


@dataclass
class ThresholdResult:
    """The outcome of :func:`search_threshold`.

    Attributes:
        threshold: the chosen threshold (best evaluated value; ties: lowest threshold).
        value: the metric at it.
        trial: the number of the trial that evaluated it first.
        n_trials: trials evaluated.
        seconds: wall time of the search (the counts excluded).
        trials: the trials with the grid threshold each one evaluated (``params["threshold"]``
            on the grid; user attributes ``phase`` and, for TPE trials, ``proposed``), ready for
            ``Study.add_trials``.
        study: the in-memory Optuna study (continuous ``threshold``: TPE's proposals).
    """

    threshold: float
    value: float
    trial: int
    n_trials: int
    seconds: float
    trials: list[Any]
    study: Any


def search_threshold(
    counts: SweepCounts,
    n_trials: int | None = None,
    metric: str = "iou",
    seed: int = 0,
    coarse_step: float = COARSE_STEP,
) -> ThresholdResult:
    """Choose a threshold with an in-memory Optuna study on precomputed sweep counts.

    Trials, in order: every threshold of the coarse grid (multiples of ``coarse_step``); the fine
    thresholds within one coarse step of the ``FINE_PEAKS`` best coarse thresholds; then TPE
    (seeded) until ``n_trials``.
    TPE works on a continuous ``threshold`` (3x cheaper per proposal than a stepped one) and each
    proposal is evaluated at the nearest grid threshold, which :attr:`ThresholdResult.trials`
    record. With ``n_trials=None`` the TPE phase is skipped. When the counts' grid is not finer
    than ``coarse_step`` every threshold is evaluated, which is exactly :meth:`SweepCounts.best`.

    Args:
        counts: one-pass sweep counts of the validation maps.
        n_trials: total trials (at least the coarse grid and the neighbours are evaluated).
        metric: the objective, one of :data:`benchmark.evaluate.METRICS`.
        seed: TPE seed.
        coarse_step: spacing of the first phase.

    Returns:
        The chosen threshold, the evaluated trials and the study.

    Raises:
        ValueError: the metric is undefined (NaN) at every threshold.
    """
    started = time.perf_counter()
    values = counts.metric(metric)
    if np.all(np.isnan(values)):
        raise ValueError(f"{metric} is undefined (NaN) at every threshold")
    n_bins = len(counts.thresholds) - 1
    study, evaluated = _run_search(values, n_bins, n_trials, seed, coarse_step)
    best = _best_index(values, sorted({i for i, _, _ in evaluated}))
    if np.isnan(values[best]):
        raise ValueError(f"{metric} is undefined (NaN) at every evaluated threshold")
    first = next(n for n, (i, _, _) in enumerate(evaluated) if i == best)
    trials = _grid_trials(values, n_bins, evaluated)
    return ThresholdResult(
        threshold=float(counts.thresholds[best]),
        value=float(values[best]),
        trial=first,
        n_trials=len(evaluated),
        seconds=time.perf_counter() - started,
        trials=trials,
        study=study,
    )


def _trial_at(values: np.ndarray, n_bins: int, i: int, dist: Any, attrs: Any = None) -> Any:
    """A finished trial at grid index ``i`` (FAIL where the metric is undefined)."""
    from optuna.trial import TrialState, create_trial

    v = values[i]
    state, value = (TrialState.FAIL, None) if np.isnan(v) else (TrialState.COMPLETE, float(v))
    return create_trial(
        params={"threshold": i / n_bins},
        distributions={"threshold": dist},
        value=value,
        state=state,
        user_attrs=attrs,
    )


def _run_search(
    values: np.ndarray, n_bins: int, n_trials: int | None, seed: int, coarse_step: float
) -> tuple[Any, list[tuple[int, str, float | None]]]:
    """The in-memory study of :func:`search_threshold` and its (grid index, phase, proposal)s."""
    import optuna
    from optuna.distributions import FloatDistribution

    cont = FloatDistribution(0.0, 1.0)
    step = max(1, int(round(coarse_step * n_bins)))
    evaluated: list[tuple[int, str, float | None]] = []
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed)
        )
        seen: set[int] = set()

        def add(indices: Sequence[int], phase: str) -> None:
            trials = []
            for i in indices:
                if i in seen:
                    continue
                seen.add(i)
                evaluated.append((i, phase, None))
                trials.append(_trial_at(values, n_bins, i, cont))
            study.add_trials(trials)

        coarse = list(range(0, n_bins + 1, step))
        if coarse[-1] != n_bins:
            coarse.append(n_bins)
        add(coarse, "coarse")
        # near-ties between distant peaks are common on small validation sets: refine around
        # the best FINE_PEAKS coarse thresholds, best first
        coarse_vals = np.where(np.isnan(values[coarse]), -np.inf, values[coarse])
        for k in np.argsort(-coarse_vals, kind="stable")[:FINE_PEAKS]:
            c = coarse[int(k)]
            add([i for i in range(c - step + 1, c + step) if 0 <= i <= n_bins], "fine")
        for _ in range(max(0, (n_trials or 0) - len(study.trials))):
            trial = study.ask({"threshold": cont})
            proposed = float(trial.params["threshold"])
            i = int(round(proposed * n_bins))
            seen.add(i)
            evaluated.append((i, "tpe", proposed))
            done = _trial_at(values, n_bins, i, cont)
            study.tell(trial, done.value, state=done.state)
    finally:
        optuna.logging.set_verbosity(verbosity)
    return study, evaluated


def _grid_trials(
    values: np.ndarray, n_bins: int, evaluated: list[tuple[int, str, float | None]]
) -> list[Any]:
    """The evaluated trials on the stepped grid distribution, with ``phase`` and ``proposed``."""
    from optuna.distributions import FloatDistribution

    grid_dist = FloatDistribution(0.0, 1.0, step=1.0 / n_bins)
    trials = []
    for i, phase, proposed in evaluated:
        attrs: dict[str, Any] = {"phase": phase}
        if proposed is not None:
            attrs["proposed"] = proposed
        trials.append(_trial_at(values, n_bins, i, grid_dist, attrs))
    return trials


def _best_index(values: np.ndarray, indices: Sequence[int]) -> int:
    """The index of the largest non-NaN value among ``indices`` (ties: the lowest index)."""
    idx = np.asarray(sorted(indices), dtype=np.int64)
    vals = values[idx]
    vals = np.where(np.isnan(vals), -np.inf, vals)
    return int(idx[int(np.argmax(vals))])
