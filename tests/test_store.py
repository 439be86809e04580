import pandas as pd

from benchmark.store import latest_runs


def _rows(run_key: str, seed: int, date: str, value: float) -> list[dict]:
    base = {"method_id": "cam", "dataset": "synthetic", "seed": seed, "gt_ratio": 0.0}
    return [{**base, "run_key": run_key, "date": date, "metric": m, "value": value} for m in "ab"]


def test_latest_runs_drops_superseded_runs_of_the_same_experiment():
    rows = pd.DataFrame(
        _rows("old", 1, "2026-11-22T10:00:00", 0.1)
        + _rows("new", 1, "2026-11-22T11:00:00", 0.2)  # same experiment, re-run later
        + _rows("other", 2, "2026-11-22T09:00:00", 0.3)  # another seed: kept
    )
    kept = latest_runs(rows)
    assert sorted(set(kept["run_key"])) == ["new", "other"]
    assert len(kept) == 4
    assert kept.loc[kept["seed"] == 1, "value"].tolist() == [0.2, 0.2]


def test_latest_runs_keeps_different_gt_ratios_and_handles_missing_columns():
    rows = pd.DataFrame(_rows("r0", 1, "2026-11-22T10:00:00", 0.1))
    other = pd.DataFrame(_rows("r1", 1, "2026-11-22T11:00:00", 0.2)).assign(gt_ratio=0.5)
    both = pd.concat([rows, other], ignore_index=True)
    assert set(latest_runs(both)["run_key"]) == {"r0", "r1"}
    assert latest_runs(rows.drop(columns="date")).equals(rows.drop(columns="date"))


def test_latest_runs_keeps_one_copy_of_a_run_stored_twice():
    row = {"method_id": "cam", "seed": 1, "gt_ratio": 0.0, "run_key": "k", "metric": "iou"}
    rows = pd.DataFrame(
        [
            {**row, "date": "2026-11-22T10:00:00", "value": 0.3},
            {**row, "date": "2026-11-22T11:00:00", "value": 0.3, "study": "s", "trial": 4},
            {**row, "gt_ratio": 0.5, "date": "2026-11-22T11:00:00", "value": 0.6, "trial": 5},
        ]
    )
    kept = latest_runs(rows)
    assert sorted(kept["gt_ratio"].tolist()) == [0.0, 0.5]
    assert kept.loc[kept["gt_ratio"] == 0.0, "trial"].tolist() == [4]
