"""Reports: golden tables, bold best, bootstrap intervals, paired tests, figures, report.md.

Everything is built from hand-made rows (no run, no GPU, no download).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmark.store import write_per_image, write_rows
from reports import figures, stats
from reports.report import write_report
from reports.tables import (
    MAP_METRICS,
    conventions_table,
    format_table,
    mixed_table,
    present_metrics,
    summarize,
    with_failures,
)

METRICS = ("iou", "dice", "accuracy", "precision", "recall")


def _tidy(method_id, kind, seed, values, stage="segmenter", split="test", **kw):
    base = {
        "method_id": method_id,
        "method": method_id.split("[")[0],
        "kind": kind,
        "seed": seed,
        "status": "done",
        "threshold": 0.5,
        "stage": stage,
        "split": split,
        "convention": "pet",
        "aggregation": "dataset",
        "gt_ratio": 0.0,
        **kw,
    }
    return [{**base, "metric": m, "value": v} for m, v in zip(METRICS, values)]


@pytest.fixture()
def golden_rows() -> pd.DataFrame:
    rows = []
    rows += _tidy("cam", "method", 0, (0.60, 0.75, 0.80, 0.70, 0.80))
    rows += _tidy("cam", "method", 1, (0.62, 0.76, 0.82, 0.72, 0.78))
    rows += _tidy("cam_aff[k=1]", "method", 0, (0.50, 0.66, 0.85, 0.75, 0.60))
    rows += _tidy("cam_aff[k=1]", "method", 1, (0.54, 0.70, 0.83, 0.73, 0.62))
    rows += _tidy("supervised", "reference", 0, (0.90, 0.95, 0.96, 0.94, 0.96))
    return pd.DataFrame(rows)


def _golden_summary(rows: pd.DataFrame) -> pd.DataFrame:
    summary = summarize(rows, "segmenter", "test")
    ci = {"cam": "[58.0, 64.0]", "cam_aff[k=1]": "[47.0, 57.0]", "supervised": "[88.0, 92.0]"}
    return summary.assign(iou_ci=[ci[m] for m in summary.index])


GOLDEN_MD = """\
| Method | IoU | Dice | Acc. | Prec. | Rec. | IoU 95 % CI |
|---|---|---|---|---|---|---|
| cam | **61.0 ± 1.4** | **75.5 ± 0.7** | 81.0 ± 1.4 | 71.0 ± 1.4 | **79.0 ± 1.4** | [58.0, 64.0] |
| cam_aff[k=1] | 52.0 ± 2.8† | 68.0 ± 2.8 | **84.0 ± 1.4** | **74.0 ± 1.4** | 61.0 ± 1.4 | [47.0, 57.0] |
| *references* | | | | | | |
| supervised | 90.0 | 95.0 | 96.0 | 94.0 | 96.0 | [88.0, 92.0] |
"""  # noqa: E501

GOLDEN_TEX = r"""\begin{tabular}{lrrrrrr}
\toprule
Method & IoU & Dice & Acc. & Prec. & Rec. & IoU 95 \% CI \\
\midrule
cam & \textbf{61.0 $\pm$ 1.4} & \textbf{75.5 $\pm$ 0.7} & 81.0 $\pm$ 1.4 & 71.0 $\pm$ 1.4 & \textbf{79.0 $\pm$ 1.4} & {[}58.0, 64.0{]} \\
cam\_aff{[}k=1{]} & 52.0 $\pm$ 2.8$^\dagger$ & 68.0 $\pm$ 2.8 & \textbf{84.0 $\pm$ 1.4} & \textbf{74.0 $\pm$ 1.4} & 61.0 $\pm$ 1.4 & {[}47.0, 57.0{]} \\
\midrule
supervised & 90.0 & 95.0 & 96.0 & 94.0 & 96.0 & {[}88.0, 92.0{]} \\
\bottomrule
\end{tabular}
"""  # noqa: E501


def test_golden_markdown_and_latex(golden_rows):
    summary = _golden_summary(golden_rows)
    extra = {"iou_ci": "IoU 95 % CI"}
    marks = {"cam_aff[k=1]": "dagger"}
    assert format_table(summary, extra=extra, marks=marks) == GOLDEN_MD
    assert format_table(summary, style="latex", extra=extra, marks=marks) == GOLDEN_TEX


def test_bold_marks_the_true_best_among_methods_only():
    rng = np.random.default_rng(3)
    rows = []
    for i in range(4):
        for seed in range(3):
            rows += _tidy(f"m{i}", "method", seed, rng.uniform(0.2, 0.8, 5))
    rows += _tidy("supervised", "reference", 0, (0.99,) * 5)  # higher, yet never bold
    summary = summarize(pd.DataFrame(rows), "segmenter", "test")
    lines = format_table(summary).splitlines()
    body = {line.split(" | ")[0][2:]: line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    for j, metric in enumerate(METRICS):
        bold = [m for m, cells in body.items() if cells and cells[j].startswith("**")]
        methods = summary[summary["kind"] == "method"]
        assert bold == [methods[f"{metric}_mean"].idxmax()], metric
    assert not any("**" in c for c in body["supervised"])


def test_failed_method_is_listed_not_dropped(golden_rows):
    error = {
        "method_id": "ccam",
        "method": "ccam",
        "kind": "method",
        "seed": 0,
        "status": "error",
        "reason": "RuntimeError: boom",
        "stage": "run",
        "split": "",
        "convention": "pet",
        "aggregation": "",
        "metric": "status",
        "value": np.nan,
        "gt_ratio": 0.0,
    }
    rows = pd.concat([golden_rows, pd.DataFrame([error])], ignore_index=True)
    summary = with_failures(summarize(rows, "segmenter", "test"), rows)
    text = format_table(summary)
    assert "| ccam (failed) | — | — | — | — | — |" in text
    assert text.index("ccam") < text.index("*references*")


def _per_image(method_id: str, seed: int, iou_level: float, n: int = 40, rng_seed: int = 0):
    rng = np.random.default_rng(rng_seed)
    positives = rng.integers(200, 800, n)
    tp = np.round(positives * np.clip(rng.normal(iou_level, 0.08, n), 0.05, 1.0)).astype(int)
    fn = positives - tp
    fp = rng.integers(0, 150, n)
    tn = 2000 - tp - fp - fn
    iou = tp / (tp + fp + fn)
    return pd.DataFrame(
        {
            "method_id": method_id,
            "seed": seed,
            "run_key": f"{method_id}-{seed}",
            "stage": "segmenter",
            "split": "test",
            "convention": "pet",
            "name": [f"img{i:03d}" for i in range(n)],
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "tn": tn,
            "iou": iou,
        }
    )


def test_bootstrap_ci_contains_the_table_mean_and_is_reproducible():
    frame = pd.concat([_per_image("cam", s, 0.6, rng_seed=s) for s in range(3)])
    est, low, high = stats.bootstrap_iou_ci(frame)
    per_seed = frame.groupby("seed")[["tp", "fp", "fn"]].sum()
    table_mean = (per_seed["tp"] / per_seed[["tp", "fp", "fn"]].sum(axis=1)).mean()
    assert est == pytest.approx(table_mean)
    assert low < table_mean < high
    assert high - low < 0.2
    assert stats.bootstrap_iou_ci(frame) == (est, low, high)


def test_paired_test_and_dagger_marks():
    good = _per_image("good", 0, 0.75, rng_seed=1)
    twin = good.assign(method_id="twin", iou=good["iou"] + 0.001 * np.sin(np.arange(40)))
    bad = _per_image("bad", 0, 0.35, rng_seed=2)
    per_image = pd.concat([good, twin, bad])
    assert stats.paired_test(per_image, "good", "good")[0] == 1.0
    assert stats.paired_test(per_image, "bad", "good")[0] < 0.001
    summary = pd.DataFrame(
        {"kind": ["method"] * 3, "iou_mean": [0.75, 0.749, 0.35]}, index=["good", "twin", "bad"]
    )
    sig = stats.significance(per_image, summary)
    assert sig.best == "good"
    assert sig.marks() == {"twin": "dagger"}
    assert sig.table.loc["bad", "n_pairs"] == 40


def _png_size(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        img.verify()
    with Image.open(path) as img:
        return img.size


def test_bar_figure_is_a_png_of_the_expected_size(tmp_path):
    table = pd.DataFrame(
        {
            "kind": ["method", "method", "reference"],
            "value": [0.61, 0.52, 0.9],
            "low": [0.58, 0.47, 0.88],
            "high": [0.64, 0.57, 0.92],
        },
        index=["cam", "a_long_method_name[k=1]", "supervised"],
    )
    paths = figures.bar_with_ci(table, tmp_path / "bar")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert _png_size(paths[0]) == (700, round((0.7 + 0.22 * 3) * 200))
    assert paths[1].read_bytes().startswith(b"%PDF")


def test_qualitative_grid_from_arrays(tmp_path):
    rng = np.random.default_rng(0)
    names = ["a", "b"]
    images = {n: rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for n in names}
    gt = {n: np.where(rng.random((32, 32)) > 0.9, 255, rng.random((32, 32)) > 0.5) for n in names}
    gt = {n: g.astype(np.uint8) for n, g in gt.items()}
    outputs = {
        m: {
            n: {
                "map": rng.random((8, 8)),
                "pseudo": (rng.random((32, 32)) > 0.5).astype(np.uint8),
                "prediction": (rng.random((32, 32)) > 0.5).astype(np.uint8),
            }
            for n in names
        }
        for m in ("cam", "ccam")
    }
    folder = tmp_path / "results" / "qualitative"
    folder.mkdir(parents=True)
    for m, per_name in outputs.items():  # the file format the runner is asked to write
        arrays = {k: np.stack([per_name[n][k] for n in names]) for k in figures.PANELS[1:4]}
        image, mask = np.stack([images[n] for n in names]), np.stack([gt[n] for n in names])
        np.savez(folder / f"{m}.npz", method_id=m, names=names, image=image, gt=mask, **arrays)
    loaded = figures.load_qualitative(tmp_path)
    assert list(loaded[2]) == ["cam", "ccam"]
    np.testing.assert_array_equal(loaded[2]["ccam"]["b"]["pseudo"], outputs["ccam"]["b"]["pseudo"])
    paths = figures.qualitative_grid(*loaded, tmp_path / "grid")
    assert _png_size(paths[0]) == (700, round((0.3 + 0.56 * 4) * 200))
    assert figures.qualitative_grid(images, gt, {"x": {}}, tmp_path / "none") == []


def test_optuna_figures_from_a_trials_frame(tmp_path):
    trials = pd.DataFrame(
        {
            "number": range(6),
            "value": [0.3, 0.5, 0.4, 0.6, 0.55, 0.58],
            "state": ["COMPLETE"] * 5 + ["PRUNED"],
            "params_threshold": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        }
    )
    paths = figures.optuna_figures(trials, tmp_path)
    assert {p.name for p in paths} == {
        "optuna_study_history.png",
        "optuna_study_history.pdf",
        "optuna_study_slice.png",
        "optuna_study_slice.pdf",
    }
    assert figures.optuna_figures(trials.iloc[:0], tmp_path / "empty") == []


def test_mixed_and_conventions_tables(golden_rows):
    assert mixed_table(golden_rows)[0].empty  # one gt_ratio: no table
    more = golden_rows.assign(gt_ratio=0.5, value=golden_rows["value"] + 0.05)
    summary, keys = mixed_table(pd.concat([golden_rows, more]))
    assert keys == ["r0", "r0.5"]
    assert summary.loc["cam", "r0.5_mean"] == pytest.approx(0.66)
    conv, found = conventions_table(golden_rows, {"pet": 0.0, "weaktr_refinery": 0.7})
    assert found == ["pet"]
    assert conv.loc["(all-background prediction)", "pet_mean"] == 0.0


def test_maps_table_shows_pxap_only_where_rows_carry_it(golden_rows):
    maps = golden_rows.assign(stage="maps")
    before = summarize(maps, "maps", "test", metrics=MAP_METRICS)
    assert present_metrics(before, MAP_METRICS) == METRICS  # stored before PxAP: no column
    assert format_table(before, present_metrics(before, MAP_METRICS)) == format_table(
        summarize(maps, "maps", "test")
    )
    pxap = maps[maps["metric"] == "iou"].assign(
        metric="pxap", value=lambda f: f["value"] + 0.1, threshold=float("nan")
    )
    summary = summarize(pd.concat([maps, pxap]), "maps", "test", metrics=MAP_METRICS)
    shown = present_metrics(summary, MAP_METRICS)
    assert shown == (*METRICS, "pxap")
    text = format_table(summary, shown)
    assert text.splitlines()[0] == "| Method | IoU | Dice | Acc. | Prec. | Rec. | PxAP |"
    assert "| **71.0 ± 1.4** |" in text.splitlines()[2]  # cam's PxAP, the best method
    assert summary.loc["cam", "threshold"] == 0.5  # a threshold-free row has no threshold


# ---- a whole results folder ----------------------------------------------------------------------
def _write_run(out, method_id, kind, seed, iou_level, status="done", pxap=None):
    key = f"{method_id}-{seed}"
    common = {
        "method": method_id,
        "method_id": method_id,
        "kind": kind,
        "preset": "tiny",
        "dataset": "synthetic",
        "split_scheme": "official",
        "split_sha256": "ab" * 32,
        "seed": seed,
        "gt_ratio": 0.0,
        "image_size": 64,
        "budget_minutes": None,
        "device": "cpu",
        "v_torch": "2.x",
        "run_key": key,
        "status": status,
        "reason": "",
        "threshold": 0.4,
    }
    if status == "error":
        row = {**common, "reason": "RuntimeError: boom", "traceback": "runs/x/error.txt"}
        row.update(stage="run", split="", convention="pet", aggregation="", metric="status")
        write_rows(out, key, [{**row, "value": float("nan")}])
        return
    frames, rows = [], []
    for conv_i, conv in enumerate(("pet", "pet_with_border", "weaktr_refinery")):
        frame = _per_image(method_id, seed, iou_level, n=30, rng_seed=seed + 10 * conv_i)
        frame["convention"] = conv
        frames.append(frame)
        tp, fp, fn, tn = (frame[k].sum() for k in ("tp", "fp", "fn", "tn"))
        values = {
            "iou": tp / (tp + fp + fn),
            "dice": 2 * tp / (2 * tp + fp + fn),
            "accuracy": (tp + tn) / (tp + fp + fn + tn),
            "precision": tp / (tp + fp),
            "recall": tp / (tp + fn),
        }
        for stage, split in (("segmenter", "test"), ("pseudo", "train")):
            for metric, value in values.items():
                rows.append(
                    {
                        **common,
                        "stage": stage,
                        "split": split,
                        "convention": conv,
                        "aggregation": "dataset",
                        "metric": metric,
                        "value": float(value),
                    }
                )
        if pxap is not None and conv == "pet":  # the maps on test, with their PxAP
            rows += [
                {**common, "stage": "maps", "split": "test", "convention": conv}
                | {"aggregation": "dataset", "metric": metric, "value": float(value)}
                for metric, value in (*values.items(), ("pxap", pxap))
            ]
    for stage, wall in (("fit", 2.0 * (1 + iou_level)), ("segmenter", 1.0)):
        for metric in ("wall_s", "device_s", "peak_host_mb", "peak_device_mb"):
            rows.append(
                {
                    **common,
                    "stage": stage,
                    "split": "",
                    "convention": "",
                    "aggregation": "cost",
                    "metric": metric,
                    "value": wall if metric.endswith("_s") else 100.0,
                }
            )
    write_rows(out, key, rows)
    write_per_image(out, key, pd.concat(frames, ignore_index=True))
    if kind == "method":
        t = np.linspace(0, 1, 21)
        curve = pd.DataFrame(
            {"method_id": method_id, "seed": seed, "threshold": t, "iou": iou_level * (1 - t**2)}
        )
        (out / "results" / "curves").mkdir(parents=True, exist_ok=True)
        curve.to_parquet(out / "results" / "curves" / f"{key}.parquet", index=False)


def test_report_builds_from_results_with_a_failed_run(tmp_path):
    out = tmp_path / "run"
    for seed in (0, 1):
        _write_run(out, "cam", "method", seed, 0.6)
        _write_run(out, "ccam", "method", seed, 0.45)
    _write_run(out, "centre_prior", "reference", 0, 0.3)
    _write_run(out, "weaktr", "method", 0, 0.0, status="error")
    path = write_report(out)
    text = path.read_text()
    assert path == out / "report" / "report.md"
    assert "| weaktr (failed) | — | — | — | — | — |" in text
    assert "## Failed runs" in text and "RuntimeError: boom" in text
    assert "`cam` has the best test IoU" in text and "Wilcoxon p = " in text
    assert "Only one gt_ratio (0) was run" in text
    assert "(all-background prediction)" in text
    assert "| split SHA-256 | " + "ab" * 32 + " |" in text
    for name in ("main_iou", "iou_vs_threshold", "quality_vs_compute"):
        assert f"](figures/{name}.png)" in text
        assert (out / "report" / "figures" / f"{name}.png").is_file()
    for name in ("main", "pseudo", "conventions", "cost"):
        for ext in ("md", "tex", "csv"):
            assert (out / "report" / "tables" / f"{name}.{ext}").is_file(), (name, ext)
    main = pd.read_csv(out / "report" / "tables" / "main.csv", index_col=0)
    assert main.loc["weaktr", "status"] == "error"
    assert (
        main.loc["cam", "iou_ci_low"]
        <= main.loc["cam", "iou_mean"]
        <= main.loc["cam", "iou_ci_high"]
    )


def test_report_maps_table_has_a_pxap_column(tmp_path):
    out = tmp_path / "run"
    _write_run(out, "cam", "method", 0, 0.6, pxap=0.7)
    _write_run(out, "ccam", "method", 0, 0.45, pxap=0.55)
    text = write_report(out).read_text()
    maps = text.split("## Method maps on test at the validation threshold")[1].split("## ")[0]
    assert "| Method | IoU | Dice | Acc. | Prec. | Rec. | PxAP |" in maps
    assert "| **70.0** |" in maps and "PxAP: pixel average precision" in maps
    table = pd.read_csv(out / "report" / "tables" / "maps_test.csv", index_col=0)
    assert table.loc["ccam", "pxap_mean"] == pytest.approx(0.55)


def test_report_of_an_empty_folder(tmp_path):
    path = write_report(tmp_path)
    assert "No results yet" in path.read_text()
