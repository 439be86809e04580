"""Optuna sweeps: the threshold, the gt_ratio grid and method hyperparameters, on many workers.

Three kinds of study; Optuna stays inside this package and :mod:`benchmark.threshold` (methods
only expose :meth:`methods.base.Method.search_space`). The package, layered above the
runner (it computes only through the runner's public pipeline; the runner never imports it):

- :mod:`benchmark.sweeps.storage`: storage URLs, the :class:`SweepSpec` a study holds, trials
  exports and a study's rows;
- :mod:`benchmark.sweeps.objectives`: the threshold studies and the gt_ratio and hparams trial
  objectives;
- :mod:`benchmark.sweeps.workers`: running trials here, as workers, through submitit.

Every public name stays importable from ``benchmark.sweeps``.

``threshold`` (one study per method x dataset x repetition)
    The objective is the validation IoU at threshold ``t`` of the method's cached maps (the
    runner's fit and map stages, reused from the cache). The validation maps are swept once with
    the one-pass histogram (:func:`benchmark.threshold.sweep_counts`, ``n_bins=1000``: 1,001
    thresholds); a trial looks its ``t`` up in those counts, so it costs microseconds.
    :func:`search_threshold` orders the trials: the coarse grid (every 0.01) first, then the fine
    neighbours of the 3 best coarse thresholds, then TPE (seeded) until ``n_trials``. The
    chosen ``t`` is the best evaluated one (ties: the lowest, as :meth:`SweepCounts.best`); its
    test IoU is read from the test maps' counts. ``python -m benchmark run`` chooses its
    threshold with the same function (:func:`benchmark.threshold.choose_threshold`), at the run's
    0.01 grid where the coarse grid is the whole grid, so ``run`` evaluates every threshold.
    The study is optimised in memory and its trials are then copied into the storage (the file
    or database write per trial would cost more than the trial). Measured on this 2-core machine
    under load: 200 trials in 0.13-0.26 s per (method, seed) (about 1,000 trials/s), the copy into
    the journal file 0.75-0.8 s (one fsync per trial); the chosen threshold equalled the
    exhaustive best over 1,001 thresholds for every tiny method/seed and 60 random noisy curves.

``gt_ratio`` (one grid study: method x repetition x ratio, Optuna's ``GridSampler``)
    Ratio ``r`` replaces the pseudo masks of a fixed, seeded, nested subset of ``round(r * n)``
    train images by their GT masks (:func:`benchmark.supervision.gt_subset`); each trial trains the
    shared segmenter (fit and maps are cached and shared by every ratio). The trial's value is the
    segmenter's test IoU (a grid optimises nothing; the value is the table's number). Option
    ``gt_rule="weaktr_batch"``: the WeakTR-Refinery repository's rule, :class:`PerBatchGTMasks`:
    in every training batch of ``b`` images, ``max(1, int(r * b))`` images (redrawn each batch)
    use their GT mask. With its batch of 8, ``int(0.1 * 8) = 0`` and ``int(0.2 * 8) = 1`` both
    give one GT image per batch, and the same seed draws the same images: that is why its 10 %
    and 20 % rows are identical. Here ``r = 0`` means no GT at all under both rules. Rows of this
    rule carry ``gt_rule`` and a ``method_id`` suffixed ``|gt=weaktr_batch``, so tables keep the
    two rules apart.

``hparams`` (one study per method, TPE with a seeded sampler)
    The search space is the method's ``search_space(trial)``. The objective is the validation
    IoU of the method's maps at their validation-chosen threshold. Methods cannot report a
    validation IoU per epoch (the contract forbids them to compute metrics and has no per-epoch
    hook), so pruning happens once per trial: the value is reported after the map stage and a
    ``MedianPruner`` stops a trial below the median of earlier trials *before* the shared
    segmenter is trained (a pruned trial writes one ``status="pruned"`` row).

Every trial writes ordinary result rows through :mod:`benchmark.store`, with the columns
``study``, ``trial`` and ``sweep``, so reports need no special case. Each study's trials are
exported to ``OUT/studies/<study>.csv`` (read by :func:`reports.figures.optuna_figures`).

Storage: by default Optuna's journal file ``OUT/studies/optuna.journal`` (safe for several local
processes; SQLite is not safe with parallel writers). ``--storage URL`` takes any SQLAlchemy URL
(``postgresql://user:password@host/db``); ``journal:PATH`` names another journal file. Storage
URLs are logged with the password masked (:func:`mask_url`). A study's user attribute ``wsss``
holds everything a worker needs to rebuild its objective (kind, run config with the output
folder, methods, repetitions, ratios, rule, trial count), so ``python -m benchmark worker
--storage URL --study NAME`` joins any study. ``--launcher slurm`` submits such workers with
submitit (``--launcher local``: the same code path on this machine, submitit's local executor).

Duplicates: with several workers, Optuna's ``GridSampler`` gives a grid point whose trial is
still running to a worker that finds no unvisited point (and retried or enqueued trials can repeat
points). A trial whose grid point already has an earlier complete or running trial is a
*duplicate*: it does not compute, it waits for the earlier trial (up to ``DUPLICATE_WAIT_S``) and
returns its value, and is marked with the user attribute ``duplicate_of`` (column ``duplicate``
in the CSV export). If the earlier trial failed or never finishes, the duplicate computes the
point itself. Result rows of a grid point are written under one key per (study, grid point), so
even two trials that computed the same point at once leave one set of rows.
"""

from benchmark.config import ConfigError, RunConfig, mask_url, redact
from benchmark.supervision import GT_RULES, PerBatchGTMasks, gt_rule_masks, n_gt_per_batch
from benchmark.sweeps.objectives import (
    DEFAULT_THRESHOLD_TRIALS,
    DUPLICATE_WAIT_S,
    GtRatioObjective,
    HparamsObjective,
    ThresholdStudy,
    format_spec,
    make_objective,
    point_key,
    resolve_duplicate,
    sweep_threshold,
)
from benchmark.sweeps.storage import (
    ATTR,
    JOURNAL_NAME,
    KINDS,
    SweepSpec,
    create_study,
    default_storage_url,
    export_trials,
    gt_ratio_table,
    load_study,
    make_pruner,
    make_sampler,
    open_storage,
    study_rows,
    study_slug,
)
from benchmark.sweeps.workers import (
    LAUNCHERS,
    gt_ratio_spec,
    hparams_spec,
    launch_workers,
    missing_points,
    run_trials,
    run_worker,
    start_study,
)
from benchmark.threshold import (
    COARSE_STEP,
    FINE_PEAKS,
    THRESHOLD_BINS,
    ThresholdResult,
    search_threshold,
)

__all__ = [
    "ATTR",
    "COARSE_STEP",
    "DEFAULT_THRESHOLD_TRIALS",
    "DUPLICATE_WAIT_S",
    "FINE_PEAKS",
    "GT_RULES",
    "JOURNAL_NAME",
    "KINDS",
    "LAUNCHERS",
    "THRESHOLD_BINS",
    "ConfigError",
    "GtRatioObjective",
    "HparamsObjective",
    "PerBatchGTMasks",
    "RunConfig",
    "SweepSpec",
    "ThresholdResult",
    "ThresholdStudy",
    "create_study",
    "default_storage_url",
    "export_trials",
    "format_spec",
    "gt_ratio_spec",
    "gt_ratio_table",
    "gt_rule_masks",
    "hparams_spec",
    "launch_workers",
    "load_study",
    "make_objective",
    "make_pruner",
    "make_sampler",
    "mask_url",
    "missing_points",
    "n_gt_per_batch",
    "open_storage",
    "point_key",
    "redact",
    "resolve_duplicate",
    "run_trials",
    "run_worker",
    "search_threshold",
    "start_study",
    "study_rows",
    "study_slug",
    "sweep_threshold",
]
