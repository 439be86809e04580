"""Multi-class runs (issue 17): synthetic-voc through the whole pipeline, scored by one evaluator.

A tiny ``synthetic_voc`` run of the multi-label methods and the references: rows per stage in
the ``multiclass`` convention, the background threshold chosen on validation, methods without a
multi-label form recorded as ``unsupported``, and the segmenter's mIoU recomputed from its
stored predictions by an independent numpy loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import methods  # noqa: F401  (registers every method)
from benchmark.config import RunConfig
from benchmark.runner import Runner, prepare_data
from benchmark.store import read_results
from methods.base import Context, ImageSet, create_method, get_method, list_methods
from reports.multiclass import multiclass_text, per_class_table

METHODS = ["cam", "all_foreground", "centre_prior", "supervised", "box_prior"]


def _cfg(out: Path, methods_: list[str], **kw) -> RunConfig:
    base = dict(
        methods=methods_,
        dataset="synthetic_voc",
        preset="tiny",
        out=str(out),
        device="cpu",
        segmenter_epochs=1,
        report=False,
    )
    return RunConfig(**{**base, **kw}).validate()


@pytest.fixture(scope="module")
def voc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("voc")
    cfg = _cfg(out, METHODS)
    torch.set_num_threads(1)
    rows = Runner(cfg).run_all()
    return out, cfg, rows


def test_rows_are_multiclass_and_complete(voc_run):
    out, cfg, rows = voc_run
    bundle = prepare_data(cfg)
    assert bundle.multiclass and len(bundle.class_names) == bundle.dataset.num_classes
    status = rows.groupby("method_id")["status"].agg(set)
    assert status["box_prior"] == {"unsupported"}  # no multi-label form yet: said, not failed
    for m in ("cam", "all_foreground", "centre_prior", "supervised"):
        assert status[m] == {"done"}, rows[rows["method_id"] == m]["reason"].tolist()
    quality = rows[rows["aggregation"] == "dataset"]
    assert set(quality["convention"]) == {"multiclass"}
    assert set(zip(quality["stage"], quality["split"])) == {
        ("pseudo", "train"),
        ("maps", "test"),
        ("segmenter", "test"),
    }
    per_class = quality[quality["metric"].str.startswith("iou:")]
    expected = {f"iou:{c}" for c in ["background", *bundle.class_names]}
    assert set(per_class["metric"]) == expected


def test_background_threshold_is_chosen_on_validation(voc_run):
    out, _, rows = voc_run
    cam = rows[(rows["method_id"] == "cam") & (rows["stage"] == "pseudo")]
    assert set(cam["threshold_source"]) == {"val_sweep"}
    curves = list((out / "results" / "curves").glob("*.parquet"))
    assert curves, "the validation mIoU curve of the background threshold was not stored"
    refs = rows[(rows["method_id"] == "supervised") & (rows["stage"] == "pseudo")]
    assert set(refs["threshold_source"]) == {"method"}


def test_supervised_pseudo_labels_are_the_gt(voc_run):
    _, _, rows = voc_run
    sel = rows[(rows["method_id"] == "supervised") & (rows["stage"] == "pseudo")]
    miou = sel[sel["metric"] == "miou"]["value"].item()
    assert 0.9 < miou <= 1.0  # the working-resolution GT, nearest-upsampled: not exactly 1


def _miou_by_hand(preds: np.ndarray, gts: list[np.ndarray], k: int) -> float:
    """mIoU of one dataset-level confusion matrix, classes with a non-zero union."""
    inter, union = np.zeros(k), np.zeros(k)
    for pred, gt in zip(preds, gts):
        t = torch.from_numpy(pred.astype(np.float32))[None, None]
        up = F.interpolate(t, size=gt.shape, mode="nearest")[0, 0].numpy().astype(int)
        valid = gt != 255
        for c in range(k):
            p, g = (up == c) & valid, (gt == c) & valid
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    present = union > 0
    return float((inter[present] / union[present]).mean())


def test_segmenter_miou_recomputed_from_stored_predictions(voc_run):
    out, cfg, rows = voc_run
    bundle = prepare_data(cfg)
    k = bundle.dataset.num_classes + 1
    gts = [np.asarray(m) for m in bundle.orig_masks("test", None)]
    for method_id in ("cam", "centre_prior"):
        (path,) = (out / "runs" / method_id).glob("*/preds/*-test-labels.npy")
        preds = np.load(path)
        sel = rows[(rows["method_id"] == method_id) & (rows["stage"] == "segmenter")]
        stored = sel[sel["metric"] == "miou"]["value"].item()
        assert stored == pytest.approx(_miou_by_hand(preds, gts, k), abs=1e-9)


def test_report_tables(voc_run):
    out, _, _ = voc_run
    rows = read_results(out)
    text = multiclass_text(rows)
    assert "mIoU" in text and "Not run on this multi-class dataset" in text and "box_prior" in text
    table = per_class_table(rows)
    assert {"cam", "supervised"} <= set(table.index) and "background" in table.columns


# ---- the multi-label contract of every method that declares it --------------------------------
MULTILABEL = [m for m in list_methods() if get_method(m).multilabel]


@pytest.mark.parametrize("name", MULTILABEL)
def test_multilabel_maps_cover_the_tagged_classes_only(name):
    rng = np.random.default_rng(0)
    n, c, s = 6, 4, 32
    tags = np.zeros((n, c), dtype=np.uint8)
    for i in range(n):
        tags[i, rng.choice(c, size=1 + i % 2, replace=False)] = 1
    masks = np.stack(  # GT masks agree with the tags (background, tagged classes, ignore)
        [rng.choice([0, 255, *(np.flatnonzero(t) + 1)], size=(s, s)) for t in tags]
    ).astype(np.uint8)
    data = ImageSet(
        images=rng.integers(0, 255, size=(n, s, s, 3), dtype=np.uint8),
        labels=tags,
        num_classes=c,
        names=[f"im{i}" for i in range(n)],
        masks=masks,
    )
    method = create_method(name, preset="tiny")
    ctx = Context(max_epochs=1)
    method.fit(data, ctx)
    maps = method.refine(data, method.localize(data, ctx), ctx)
    assert maps.shape[:2] == (n, c) and maps.dtype == np.float32
    assert np.all((maps >= 0) & (maps <= 1))
    untagged = np.broadcast_to(tags[:, :, None, None] == 0, maps.shape)
    assert np.all(maps[untagged] == 0), "a class the image is not tagged with has a map"


def test_literature_protocol_is_flagged_and_tuned_on_train_gt(voc_run):
    """``threshold_on=train_gt`` (SEAM's --curve): the pseudo masks' best background threshold
    on their own GT; the rows say so in method_id and threshold_source."""
    from benchmark.evaluate import BackgroundCurve
    from benchmark.multiclass import BACKGROUND_GRID

    out, cfg, rows = voc_run
    lit = Runner(_cfg(out, ["cam"], threshold_on="train_gt")).run_all()
    assert set(lit["method_id"]) == {"cam [tuned on train GT]"}
    pseudo = lit[(lit["stage"] == "pseudo") & (lit["metric"] == "miou")]
    assert set(pseudo["threshold_source"]) == {"train_gt"}
    bundle = prepare_data(cfg)
    (maps_path,) = (out / "runs" / "cam").glob("*/maps/train.npy")
    maps = np.load(maps_path)
    curve = BackgroundCurve(bundle.dataset.num_classes + 1, thresholds=BACKGROUND_GRID)
    tags = np.asarray(bundle.cache.labels)[bundle.index["train"]]
    for scores, tag, gt in zip(maps, tags, bundle.orig_masks("train", None)):
        curve.add(scores.astype(np.float32), tag, gt)
    assert pseudo["threshold"].item() == pytest.approx(curve.best()[0])
    ours = rows[(rows["method_id"] == "cam") & (rows["stage"] == "pseudo")]
    assert pseudo["value"].item() >= ours[ours["metric"] == "miou"]["value"].item() - 1e-9


def test_cli_checks_a_voc_layout_and_refuses_a_bad_threshold_protocol(voc_run, capsys):
    from benchmark.cli import main

    out, _, _ = voc_run
    root = next((out / "data").glob("synthetic-voc-*"))
    assert main(["datasets", "check", "--dataset", "synthetic-voc", "--preset", "tiny",
                 "--root", str(root)]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "labels from" in text and "train_aug" in text and "disagreements" in text
    assert main(["run", "--threshold-on", "test", "--out", str(out / "x")]) == 2
    assert "--threshold-on" in capsys.readouterr().err


def test_report_has_mixed_supervision_and_background_curves(voc_run, tmp_path):
    """The multi-class report: segmenter mIoU by gt_ratio (two ratios run), the validation
    background-threshold curves (stored as ``multiclass``), cost; the gt_ratio objective reads
    the mIoU row."""
    import dataclasses
    import shutil

    from benchmark.sweeps.objectives import _segmenter_iou
    from reports.data import read_curves
    from reports.report import write_report

    src, cfg, _ = voc_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    half = dataclasses.replace(cfg, out=str(out), methods=["centre_prior"], gt_ratio=0.5)
    mixed = Runner(half.validate()).run_all()
    seg = mixed[(mixed["stage"] == "segmenter") & (mixed["metric"] == "miou")]
    assert _segmenter_iou(mixed.to_dict("records"), "pet") == seg["value"].item()
    curves = read_curves(out)
    assert set(curves["convention"]) == {"multiclass"} and curves["miou"].notna().all()
    text = write_report(out).read_text()
    assert "## Mixed supervision (segmenter test mIoU by share of GT masks, %)" in text
    mixed_csv = (out / "report" / "tables" / "mixed.csv").read_text()
    assert "centre_prior" in mixed_csv and "r0.5_mean" in mixed_csv
    assert "## Background-threshold sweeps (validation)" in text and "## Cost" in text
    assert text.count("mIoU 95 % CI") == 3  # segmenter, pseudo masks, maps
    assert (out / "report" / "figures" / "miou_vs_background.png").is_file()
    assert (out / "report" / "figures" / "miou_vs_gt_ratio.png").is_file()


def test_per_image_class_counts_give_the_rows_miou_and_a_bootstrap_interval(voc_run):
    """Per-image counts are stored for every multi-class stage; summed they give the rows'
    mIoU; the bootstrap interval brackets it and equals a plain per-resample loop."""
    from reports.data import read_per_image_tagged
    from reports.stats import bootstrap_miou_ci

    out, _, rows = voc_run
    per_image = read_per_image_tagged(out)
    mine = per_image[per_image["convention"] == "multiclass"]
    assert set(zip(mine["stage"], mine["split"])) == {
        ("pseudo", "train"),
        ("maps", "test"),
        ("segmenter", "test"),
    }
    for method_id in ("cam", "centre_prior"):
        sel = mine[(mine["method_id"] == method_id) & (mine["stage"] == "segmenter")]
        stored = rows[
            (rows["method_id"] == method_id)
            & (rows["stage"] == "segmenter")
            & (rows["metric"] == "miou")
        ]["value"].item()
        est, low, high = bootstrap_miou_ci(sel, n_resamples=200)
        assert est == pytest.approx(stored, abs=1e-12)
        assert low <= est <= high and low < high


def test_bootstrap_miou_equals_a_per_resample_loop():
    import pandas as pd

    from reports.stats import bootstrap_miou_ci

    rng = np.random.default_rng(3)
    classes, n_img, seeds = ["background", "a", "b"], 6, [11, 12]
    records = []
    for s in seeds:
        for i in range(n_img):
            row = {"seed": s, "name": f"im{i}"}
            for c in classes:
                row[f"tp:{c}"], row[f"fp:{c}"], row[f"fn:{c}"] = rng.integers(0, 20, 3)
            row["tp:b"] = row["fp:b"] = row["fn:b"] = 0 if i % 2 else row["tp:b"]  # often absent
            records.append(row)
    frame = pd.DataFrame(records)
    est, low, high = bootstrap_miou_ci(frame, n_resamples=300, seed=5)
    weights = np.random.default_rng(5).multinomial(n_img, [1 / n_img] * n_img, size=300)
    boot = []
    for w in weights:
        per_seed = []
        for s in seeds:
            sub = frame[frame["seed"] == s].set_index("name").loc[[f"im{i}" for i in range(n_img)]]
            ious = []
            for c in classes:
                tp, fp, fn = (
                    float((w * sub[f"{k}:{c}"].to_numpy()).sum()) for k in ("tp", "fp", "fn")
                )
                if tp + fp + fn > 0:
                    ious.append(tp / (tp + fp + fn))
            per_seed.append(np.mean(ious))
        boot.append(np.mean(per_seed))
    assert (low, high) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])), abs=1e-12)
    assert low <= est <= high
