"""The four scoring defects of issue 16, each pinned by tests that failed before its fix.

1. GT-replaced pseudo masks (``supervised``, the ``gt_ratio`` share) are scored as the
   working-resolution ``pet`` mask the segmenter trains on, not as the GT against itself.
2. Every convention scores the one prediction ``pet map >= t`` (no tie counted on both sides).
3. Each row carries the threshold its prediction was made with (segmenter rows: 0.5).
4. A method whose masks are pet everywhere is flagged "= all_foreground" and never ranked.

The runner tests share one tiny run (centre prior and supervised, a fixed threshold of 0 and
half the train images replaced by GT), checked against values computed here independently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from benchmark.config import RunConfig
from benchmark.evaluate import Evaluator, ThresholdSweep
from benchmark.runner import Runner, gt_subset, prepare_data, sweep_counts
from benchmark.store import write_rows
from datasets import CONVENTIONS, trimap_to_mask
from reports.data import load
from reports.report import build_report, main_summary
from reports.tables import all_foreground_seeds, flag_all_foreground, format_table, summarize

COUNTS = ["tp", "fp", "fn", "tn"]


def _cfg(out: Path, **kw) -> RunConfig:
    base = dict(
        methods=["centre_prior", "supervised"],
        preset="tiny",
        out=str(out),
        device="cpu",
        segmenter_epochs=1,
        report=False,
        threshold=0.0,
        gt_ratio=0.5,
    )
    return RunConfig(**{**base, **kw}).validate()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run; returns (rows, per-image frame, bundle, config)."""
    out = tmp_path_factory.mktemp("defects")
    cfg = _cfg(out)
    rows = Runner(cfg).run_all()
    per_image = pd.concat(
        [pd.read_parquet(p) for p in sorted((out / "results" / "per_image").glob("*.parquet"))],
        ignore_index=True,
    )
    # a run at a fixed threshold is labelled so in method_id (never averaged with a swept run)
    for frame in (rows, per_image):
        assert set(frame["method_id"]) == {f"{m} [threshold=0.0]" for m in cfg.methods}
        frame["method_id"] = frame["method_id"].str.removesuffix(" [threshold=0.0]")
    return rows, per_image, prepare_data(cfg), cfg


def _counts(pet: np.ndarray, trimap: np.ndarray, convention: str) -> list[int]:
    """TP, FP, FN, TN of a pet prediction under a convention, computed directly."""
    gt = trimap_to_mask(trimap, convention)
    pos = ~pet if convention == "weaktr_refinery" else pet
    scored = gt != 255
    return [
        int((pos & (gt == 1) & scored).sum()),
        int((pos & (gt == 0) & scored).sum()),
        int((~pos & (gt == 1) & scored).sum()),
        int((~pos & (gt == 0) & scored).sum()),
    ]


def _upsampled_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Pet pixels of a working-resolution mask, upsampled bilinearly to ``shape``, >= 0.5."""
    x = torch.from_numpy((mask == 1).astype(np.float32))[None, None]
    return F.interpolate(x, size=shape, mode="bilinear", align_corners=False)[0, 0].numpy() >= 0.5


# ---- 1. circular pseudo-mask scores --------------------------------------------------------------
def test_gt_replaced_pseudo_masks_are_scored_as_the_segmenter_sees_them(run):
    rows, per_image, b, cfg = run
    train = b.index["train"]
    work = np.asarray(b.cache.masks("pet"))[train]  # what the segmenter trains on
    replaced = set(gt_subset(len(train), cfg.gt_ratio, f"{b.split.sha256}|{cfg.base_seed}"))
    assert 0 < len(replaced) < len(train)
    got = per_image[(per_image["stage"] == "pseudo") & (per_image["split"] == "train")]
    got = got.set_index(["method_id", "convention", "name"])[COUNTS]
    differs = 0
    for k, i in enumerate(train):
        trimap = np.asarray(b.cache.orig_trimap(int(i)))
        pet = _upsampled_mask(work[k], trimap.shape)
        for method in ("supervised", "centre_prior"):
            if method == "centre_prior" and k not in replaced:
                continue  # its own map, at threshold 0: pet everywhere (checked below)
            for convention in CONVENTIONS:
                expected = _counts(pet, trimap, convention)
                actual = got.loc[(method, convention, b.cache.names[i])].tolist()
                assert actual == expected, (method, convention, b.cache.names[i])
                differs += expected[1] + expected[2] > 0  # FP or FN: not the GT itself
    assert differs > 0
    pseudo = rows[(rows["stage"] == "pseudo") & (rows["aggregation"] == "dataset")]
    iou = pseudo[pseudo["metric"] == "iou"].set_index(["method_id", "convention"])["value"]
    # the border is ignored in the mask the segmenter sees: it is not pet there
    assert iou[("supervised", "pet_with_border")] < 0.9
    assert 0.95 < iou[("supervised", "pet")] < 1.0
    assert 0.95 < iou[("supervised", "weaktr_refinery")] < 1.0


# ---- 2. one prediction for every convention ------------------------------------------------------
def test_every_convention_scores_the_one_pet_prediction(run):
    rows, per_image, *_ = run
    wide = per_image.set_index(["method_id", "stage", "split", "name", "convention"])[COUNTS]
    pet, weaktr = wide.xs("pet", level="convention"), wide.xs("weaktr_refinery", level="convention")
    # pet pixels: predicted pet = TP under `pet` = TN under `weaktr_refinery`, and so on
    np.testing.assert_array_equal(pet["tp"], weaktr.loc[pet.index, "tn"])
    np.testing.assert_array_equal(pet["fn"], weaktr.loc[pet.index, "fp"])
    # at threshold 0 the centre prior's exact zeros are pet: no background predicted anywhere
    maps = rows[(rows["method_id"] == "centre_prior") & (rows["stage"] == "maps")]
    maps = maps[maps["aggregation"] == "dataset"].set_index(["convention", "metric"])["value"]
    assert maps[("pet", "recall")] == 1.0
    assert maps[("weaktr_refinery", "iou")] == 0.0
    assert maps[("weaktr_refinery", "recall")] == 0.0


def test_weaktr_sweep_counts_are_the_complement_of_the_pet_prediction():
    rng = np.random.default_rng(0)
    # map values on the threshold grid: a tie at every threshold
    maps = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=(6, 1, 12, 12)).astype(np.float16)
    trimaps = rng.integers(1, 4, size=(6, 12, 12)).astype(np.uint8)
    gts = [trimap_to_mask(t, "weaktr_refinery") for t in trimaps]
    counts = sweep_counts(maps, iter(gts), "weaktr_refinery", n_bins=4)
    for j, t in enumerate(counts.thresholds):
        ev = Evaluator()
        for k, (soft, gt) in enumerate(zip(maps, gts)):
            pet = soft[0].astype(np.float32) >= np.float32(t)
            ev.add(~pet, gt, name=str(k))  # weaktr's positive side: not pet
        cm = ev.confusion
        got = (counts.tp[j], counts.fp[j], counts.fn[j], counts.tn[j])
        assert got == (cm[1, 1], cm[0, 1], cm[1, 0], cm[0, 0]), t
    # t = 0: every pixel is pet, so the background side (weaktr's positive) is never predicted
    assert counts.tp[0] == 0 and counts.fp[0] == 0


def test_inverted_counts_swap_the_sides_exactly():
    sweep = ThresholdSweep(n_bins=4)
    sweep.add(np.array([[0.0, 0.25], [0.5, 1.0]], np.float32), np.array([[1, 0], [1, 0]], np.uint8))
    c, inv = sweep.counts(), sweep.counts().inverted()
    np.testing.assert_array_equal(inv.tp, c.fn)
    np.testing.assert_array_equal(inv.fp, c.tn)
    np.testing.assert_array_equal(inv.fn, c.tp)
    np.testing.assert_array_equal(inv.tn, c.fp)


# ---- 3. the threshold column ---------------------------------------------------------------------
def test_each_row_carries_the_threshold_of_its_prediction(run):
    rows, *_ = run
    quality = rows[rows["aggregation"].isin(["dataset", "image_mean"])]
    assert quality.loc[quality["metric"] == "pxap", "threshold"].isna().all()  # threshold-free
    quality = quality[quality["metric"] != "pxap"]
    by_stage = quality.groupby("stage")["threshold"].unique()
    assert by_stage["segmenter"].tolist() == [0.5]  # the segmenter's probability threshold
    assert by_stage["pseudo"].tolist() == [0.0] and by_stage["maps"].tolist() == [0.0]
    source = quality.groupby("stage")["threshold_source"].unique()
    assert source["segmenter"].tolist() == ["segmenter"]
    assert source["pseudo"].tolist() == ["fixed"]
    cost = rows[rows["aggregation"] == "cost"]
    assert cost["threshold"].isna().all()  # a cost has no prediction


def test_report_reads_the_pseudo_threshold_from_the_pseudo_rows(run):
    rows, *_ = run
    assert (summarize(rows, "segmenter", "test")["threshold"] == 0.5).all()
    assert (summarize(rows, "pseudo", "train")["threshold"] == 0.0).all()
    assert (main_summary(rows)["pseudo_threshold"] == 0.0).all()


# ---- 4. degenerate results -----------------------------------------------------------------------
def _rows(method_id: str, kind: str, seed: int, preds: str, gts: list[np.ndarray]) -> list[dict]:
    """Rows of one run scored by the real evaluator.

    ``preds``: ``all_pet``, ``good`` or ``poor`` for both stages, or ``pseudo/segmenter``.
    """
    rows = []
    pseudo_pred, _, seg_pred = preds.partition("/")
    for stage, split, pred in (
        ("pseudo", "train", pseudo_pred),
        ("segmenter", "test", seg_pred or pseudo_pred),
    ):
        ev = Evaluator()
        rng = np.random.default_rng(seed)
        for k, gt in enumerate(gts):
            if pred == "all_pet":
                p = np.ones(gt.shape, bool)
            else:
                flip = rng.random(gt.shape) < (0.05 if pred == "good" else 0.3)
                p = (gt == 1) ^ flip
            ev.add(p, gt, name=f"img{k}")
        for metric, value in ev.dataset_metrics().items():
            rows.append(
                {
                    "method_id": method_id,
                    "method": method_id,
                    "kind": kind,
                    "seed": seed,
                    "status": "done",
                    "threshold": 0.0 if pseudo_pred == "all_pet" else 0.4,
                    "stage": stage,
                    "split": split,
                    "convention": "pet",
                    "aggregation": "dataset",
                    "gt_ratio": 0.0,
                    "metric": metric,
                    "value": value,
                }
            )
    return rows


@pytest.fixture()
def degenerate_rows() -> pd.DataFrame:
    rng = np.random.default_rng(1)
    # pets cover most of each image here, so "everything is pet" beats a poor method
    gts = [np.where(rng.random((16, 16)) < 0.8, 1, 0).astype(np.uint8) for _ in range(5)]
    for gt in gts:
        gt[0, :3] = 255  # an ignored border
    rows = []
    for seed in (0, 1):
        rows += _rows("flat", "method", seed, "all_pet", gts)
        rows += _rows("poor", "method", seed, "poor", gts)
        rows += _rows("half", "method", seed, "all_pet" if seed == 0 else "poor", gts)
        rows += _rows("lost", "method", seed, "all_pet/poor", gts)  # its segmenter is not
    rows += _rows("all_foreground", "reference", 0, "all_pet", gts)
    rows += _rows("supervised", "reference", 0, "good", gts)
    return pd.DataFrame(rows)


def test_all_foreground_results_are_detected_exactly(degenerate_rows):
    found = all_foreground_seeds(degenerate_rows, "segmenter", "test")
    assert found.get("flat") == 2 and found.get("half") == 1 and found.get("all_foreground") == 1
    assert found.get("lost") == 2  # pseudo masks pet everywhere, whatever its segmenter does
    assert found.get("poor", 0) == 0 and found.get("supervised", 0) == 0


def test_tables_flag_all_foreground_and_never_rank_it(degenerate_rows):
    summary = summarize(degenerate_rows, "segmenter", "test")
    assert summary.loc["flat", "iou_mean"] > summary.loc["poor", "iou_mean"]  # it would win
    flagged = flag_all_foreground(summary, degenerate_rows, "segmenter", "test")
    md = format_table(flagged)
    lines = {line.split(" | ")[0][2:]: line for line in md.splitlines()[2:]}
    assert "(= all_foreground)" in lines["flat"] and "**" not in lines["flat"]
    assert "(= all_foreground in 1/2 seeds)" in lines["half"]
    assert "(pseudo masks = all_foreground)" in lines["lost"] and "**" not in lines["lost"]
    assert lines["poor"].count("**") >= 2  # the best real method is bold
    assert "all_foreground)" not in lines["all_foreground"]  # a reference is what it is
    methods = [m for m in flagged.index if flagged.loc[m, "kind"] == "method"]
    assert set(methods[-2:]) == {"flat", "lost"}  # below the ranked methods
    tex = format_table(flagged, style="latex")
    assert "(= all\\_foreground)" in tex


def test_report_reading_names_the_method_that_learned_nothing(degenerate_rows, tmp_path):
    out = tmp_path / "run"
    for (method_id, seed), frame in degenerate_rows.groupby(["method_id", "seed"]):
        extra = {"run_key": f"{method_id}-{seed}", "date": "2024-01-01T00:00:00"}
        write_rows(out, f"{method_id}-{seed}", [{**r, **extra} for r in frame.to_dict("records")])
    text = build_report(load(out), out / "report").read_text()
    reading = text.split("## Reading")[1].split("##")[0]
    # flat has the highest mean, yet is not ranked; half is ranked, with its flat seed named
    assert "`half` has the best test IoU" in reading and "runner-up `poor`" in reading
    assert "`flat` learned nothing measurable: its test predictions are pet" in reading
    assert "`lost` learned nothing measurable: its pseudo masks are pet" in reading
    assert "exactly those of the `all_foreground` reference" in reading
    assert "`half` scores exactly as `all_foreground` in 1 of its 2 seeds" in reading
    main = text.split("## Segmenter on test")[1].split("##")[0]
    assert "(= all_foreground)" in main and "pseudo thr." in main


def test_runner_rows_of_an_all_pet_prediction_are_detected(run):
    rows, *_ = run
    found = all_foreground_seeds(rows, "maps", "test")
    # maps at the fixed threshold 0 are pet everywhere, for both
    assert found.get("centre_prior") == 1 and found.get("supervised") == 1
    # half of the pseudo masks on train are GT: not all pet
    found = all_foreground_seeds(rows[rows["stage"] == "pseudo"], "pseudo", "train")
    assert found.get("centre_prior", 0) == 0 and found.get("supervised", 0) == 0
