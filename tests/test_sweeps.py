"""Optuna sweeps: threshold search, gt-ratio grid, hparams, storages and workers.

The worker tests start real processes: two submitit local-executor jobs on one journal file, and
two ``python -m benchmark worker`` processes on a throwaway PostgreSQL server started here on
loopback (skipped, with the reason, when no server binaries are installed).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest

from benchmark import config, sweeps, threshold
from benchmark import runner as brunner
from benchmark.cli import main
from benchmark.config import RunConfig
from benchmark.evaluate import ThresholdSweep
from benchmark.store import read_results

REPO = Path(__file__).resolve().parents[1]
QUALITY = ["stage", "split", "convention", "aggregation", "metric"]


def _blob_counts(seed: int, n_bins: int = 1000, n_images: int = 6) -> object:
    """Sweep counts of noisy, smooth soft maps of random elliptic 'pets'."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 64.0
    maps, gts = [], []
    for _ in range(n_images):
        cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.3)
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
        gt = (d < 1.0).astype(np.uint8)
        soft = 1.0 / (1.0 + np.exp(4.0 * (d - rng.uniform(0.7, 1.3))))
        soft = np.clip(soft + rng.normal(0, 0.15, soft.shape), 0, 1).astype(np.float32)
        maps.append(soft)
        gts.append(gt)
    sweep = ThresholdSweep(n_bins=n_bins, threads=1)
    sweep.add_many(maps, gts)
    return sweep.counts()


def _cfg(out: Path, methods: list[str], **kw: object) -> RunConfig:
    values = dict(methods=methods, preset="tiny", device="cpu", out=str(out), report=False)
    values.update(kw)
    return RunConfig(**values).validate()


# ---- threshold ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_threshold_search_matches_exhaustive_1001_in_200_trials(seed):
    counts = _blob_counts(seed)
    assert len(counts.thresholds) == 1001
    result = sweeps.search_threshold(counts, n_trials=200, seed=seed)
    best_t, best_v = counts.best("iou")  # exhaustive over the 1,001 thresholds
    assert result.n_trials == 200
    assert result.threshold == pytest.approx(best_t, abs=1e-12), (result.threshold, best_t)
    assert result.value == pytest.approx(best_v, abs=1e-12)
    assert result.seconds < 2.0, f"200 trials took {result.seconds:.2f} s"
    values = [t.value for t in result.trials if t.value is not None]
    assert max(values) == pytest.approx(result.value) and len(result.trials) == 200
    grid = {round(t.params["threshold"] * 1000, 6) for t in result.trials}
    assert all(g == int(g) for g in grid)  # every trial evaluated a grid threshold
    assert {t.user_attrs["phase"] for t in result.trials} == {"coarse", "fine", "tpe"}


def test_threshold_near_tie_between_distant_peaks():
    """Two peaks 0.03 apart whose coarse values rank the wrong one first (seen on tiny CAM)."""
    from benchmark.evaluate import SweepCounts

    t = np.arange(1001) / 1000
    iou = 0.1 + 0.09389 * np.exp(-(((t - 0.432) / 0.02) ** 2))  # broad peak, best coarse: 0.43
    iou = np.maximum(iou, 0.1 + 0.09396 * np.exp(-(((t - 0.402) / 0.004) ** 2)))  # true best
    scale = 10**9
    tp = np.round(iou * scale).astype(np.int64)
    zeros = np.zeros_like(tp)
    counts = SweepCounts(t, tp, scale - tp, zeros, zeros, 1)
    coarse = counts.metric("iou")[::10]
    assert np.argmax(coarse) == 43  # the coarse grid alone would pick 0.43
    assert sweeps.search_threshold(counts).threshold == pytest.approx(0.402)  # no TPE needed
    result = sweeps.search_threshold(counts, n_trials=200)
    assert result.threshold == pytest.approx(0.402) == counts.best("iou")[0]


@pytest.mark.parametrize("seed", [0, 5])
def test_run_threshold_is_the_exhaustive_grid_best(seed):
    counts = _blob_counts(seed, n_bins=brunner.SWEEP_BINS)
    result = sweeps.search_threshold(counts)
    assert result.n_trials == brunner.SWEEP_BINS + 1  # every grid threshold, once
    assert result.threshold == counts.best("iou")[0]


def test_threshold_ties_go_to_the_lowest_threshold():
    sweep = ThresholdSweep(n_bins=100, threads=1)
    gt = np.zeros((8, 8), np.uint8)
    gt[2:6, 2:6] = 1
    sweep.add(gt.astype(np.float32), gt)  # a binary map: every t in (0, 1] is perfect
    counts = sweep.counts()
    assert sweeps.search_threshold(counts).threshold == pytest.approx(0.01)
    assert sweeps.search_threshold(counts, n_trials=150).threshold == pytest.approx(0.01)


def test_choose_threshold_goes_through_search_threshold(monkeypatch):
    calls = []
    real = threshold.search_threshold
    assert sweeps.search_threshold is real  # the one implementation, re-exported by sweeps

    def spy(counts, *a, **k):
        calls.append(len(counts.thresholds))
        return real(counts, *a, **k)

    monkeypatch.setattr(threshold, "search_threshold", spy)
    rng = np.random.default_rng(0)
    gts = [(rng.random((16, 16)) < 0.4).astype(np.uint8) for _ in range(3)]
    maps = np.stack([np.clip(g * 0.6 + rng.random(g.shape) * 0.5, 0, 1) for g in gts])[:, None]
    t, curve = threshold.choose_threshold(maps.astype(np.float16), iter(gts), "pet")
    assert calls == [brunner.SWEEP_BINS + 1]
    counts = brunner.sweep_counts(maps.astype(np.float16), iter(gts), "pet")
    assert t == counts.best("iou")[0] and len(curve) == brunner.SWEEP_BINS + 1


def test_sweep_threshold_cli_rows_csv_and_journal(tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(
        ["sweep", "threshold", "--preset", "tiny", "--methods", "centre_prior", "--out",
         str(out), "--device", "cpu", "--trials", "200"]
    )  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "centre_prior" in printed
    rows = read_results(out)
    sweep_rows = rows[rows["stage"] == "threshold_sweep"]
    study = "threshold-synthetic-tiny-centre_prior-rep0"
    assert set(sweep_rows["study"]) == {study}
    trials = sweep_rows[sweep_rows["aggregation"] == "trial"]
    assert trials["trial"].nunique() == len(trials) and 150 <= len(trials) <= 200
    chosen = sweep_rows[sweep_rows["aggregation"] == "dataset"]
    assert set(chosen["split"]) == {"val", "test"}
    assert chosen["threshold"].nunique() == 1
    csv = pd.read_csv(out / "studies" / f"{study}.csv")
    assert len(csv) == 200 and "params_threshold" in csv and "duplicate" in csv
    storage, _ = sweeps.open_storage(None, out)
    stored = optuna.load_study(study_name=study, storage=storage)
    assert len(stored.trials) == 200
    assert stored.user_attrs["match"] is True
    assert stored.best_params["threshold"] == pytest.approx(chosen["threshold"].iloc[0])


# ---- gt ratio ----------------------------------------------------------------------------------
def test_weaktr_batch_rule_gives_identical_10_and_20_percent_rows():
    assert [sweeps.n_gt_per_batch(r, 8) for r in (0, 0.1, 0.2, 0.3, 0.4, 1.0)] == [
        0, 1, 1, 2, 3, 8
    ]  # fmt: skip
    assert sweeps.n_gt_per_batch(0.1, 10) == 1 and sweeps.n_gt_per_batch(0.2, 10) == 2
    pseudo = np.zeros((40, 4, 4), np.uint8)
    gt = np.ones((40, 4, 4), np.uint8)
    drawn = {}
    for r in (0.1, 0.2, 0.3):
        masks = sweeps.PerBatchGTMasks(pseudo, gt, r, seed=3)
        order = np.random.default_rng(0).permutation(40)
        drawn[r] = [masks[np.sort(order[i : i + 8])] for i in range(0, 40, 8)]
        assert masks.draws == [sweeps.n_gt_per_batch(r, 8)] * 5
        assert all(int(b[:, 0, 0].sum()) == sweeps.n_gt_per_batch(r, 8) for b in drawn[r])
    assert all(np.array_equal(a, b) for a, b in zip(drawn[0.1], drawn[0.2]))
    assert not all(np.array_equal(a, b) for a, b in zip(drawn[0.2], drawn[0.3]))
    # the draws change from batch to batch
    positions = {tuple(np.flatnonzero(b[:, 0, 0])) for b in drawn[0.1]}
    assert len(positions) > 1


def test_segmenter_trains_on_per_batch_masks():
    from methods.base import Context
    from methods.common.segmenter import make_segmenter_config, train_segmenter

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
    pseudo = np.zeros((8, 32, 32), np.uint8)
    gt = np.ones((8, 32, 32), np.uint8)
    masks = sweeps.gt_rule_masks("weaktr_batch", pseudo, gt, 0.2, seed=1)
    cfg = make_segmenter_config("tiny", batch_size=4)
    state = train_segmenter(images, masks, cfg, Context(seed=0))
    assert state and masks.draws == [1, 1]
    with pytest.raises(ValueError, match="unknown gt rule"):
        sweeps.gt_rule_masks("nope", pseudo, gt, 0.2, seed=1)


def _check_grid(out: Path, study_name: str, n_points: int) -> pd.DataFrame:
    """Every grid point has one set of rows (no loss, no duplicate) and one owner trial."""
    rows = sweeps.study_rows(out, study_name)
    quality = rows[rows["aggregation"] != "cost"]
    assert quality["gt_ratio"].nunique() == n_points
    assert not quality.duplicated(subset=["method_id", "repetition", "gt_ratio", *QUALITY]).any()
    per_point = quality.groupby("gt_ratio").size()
    assert per_point.nunique() == 1, per_point  # the same number of rows at every point
    assert quality.groupby("gt_ratio")["trial"].nunique().eq(1).all()
    csv = pd.read_csv(out / "studies" / f"{sweeps.study_slug(study_name)}.csv")
    owners = csv[(csv["state"] == "COMPLETE") & ~csv["duplicate"]]
    assert len(owners) == n_points and owners["params_gt_ratio"].nunique() == n_points
    assert set(quality["trial"]) == set(owners["number"])
    print(  # shown with -s: the numbers behind "no lost and no duplicated rows"
        f"{study_name}: {len(csv)} trials ({int(csv['duplicate'].sum())} duplicates detected), "
        f"{len(quality)} quality rows = {n_points} points x {per_point.iloc[0]}, "
        f"{quality['trial'].nunique()} writing trials"
    )
    return rows


def test_gt_ratio_sweep_nested_subsets_and_duplicates(tmp_path, monkeypatch, caplog):
    out = tmp_path / "out"
    rc = main(
        ["sweep", "gt-ratio", "--preset", "tiny", "--methods", "centre_prior", "--ratios", "0",
         "0.5", "1.0", "--segmenter-epochs", "0", "--out", str(out), "--device", "cpu"]
    )  # fmt: skip
    assert rc == 0
    name = "gt_ratio-synthetic-tiny-subset"
    rows = _check_grid(out, name, 3)
    seg = rows[(rows["stage"] == "segmenter") & (rows["metric"] == "iou")]
    replaced = seg.groupby("gt_ratio")["n_gt_replaced"].first()
    n_train = replaced.loc[1.0]
    assert replaced.loc[0.0] == 0 and replaced.loc[0.5] == round(0.5 * n_train) and n_train > 4
    assert set(rows["sweep"]) == {"gt_ratio"} and set(rows["gt_rule"]) == {"subset"}
    # nested: the subset at a smaller ratio is inside the one at a larger ratio
    key = "abc|0"
    assert set(brunner.gt_subset(20, 0.2, key)) <= set(brunner.gt_subset(20, 0.4, key))

    # a repeated grid point is detected, not recomputed, and leaves the rows unchanged
    storage, _ = sweeps.open_storage(None, out)
    study, spec = sweeps.load_study(storage, name)
    study.enqueue_trial({"method": "centre_prior", "repetition": 0, "gt_ratio": 0.5})

    def boom(*a, **k):
        raise AssertionError("a duplicate must not be recomputed")

    monkeypatch.setattr(brunner.Runner, "run_one", boom)
    with caplog.at_level(logging.WARNING, logger="benchmark.sweeps"):
        sweeps.run_trials(study, spec, n_trials=1)
    last = study.trials[-1]
    assert last.state.name == "COMPLETE" and last.user_attrs["duplicate_of"] >= 0
    assert "duplicate" in caplog.text
    sweeps.export_trials(study, out)
    after = _check_grid(out, name, 3)
    assert len(after) == len(rows)


# ---- hparams -----------------------------------------------------------------------------------
def test_hparams_sweep_tpe_with_pruning(tmp_path):
    from dataclasses import dataclass

    from methods.base import _REGISTRY, Method, register_method

    @dataclass(frozen=True)
    class ToyConfig:
        sharp: float = 1.0  # how much of the GT the map shows (1: all)

    class Toy(Method):
        name = "sweep_toy"
        Config = ToyConfig
        presets = {"paper": {}, "quick": {}, "tiny": {}}
        uses_masks = True

        def localize(self, batch, ctx):
            gt = (np.asarray(batch.masks) == 1).astype(np.float32)[:, None]
            noise = np.random.default_rng(0).random(gt.shape).astype(np.float32)
            a = self.config.sharp
            return np.clip(a * gt + (1 - a) * noise, 0, 1)

        def search_space(self, trial):
            return {"sharp": trial.suggest_float("sharp", 0.0, 1.0)}

    register_method(Toy)
    try:
        cfg = _cfg(tmp_path / "out", ["sweep_toy"], segmenter_epochs=0)
        spec = sweeps.hparams_spec(cfg, "sweep_toy", n_trials=6, sampler_seed=1)
        study, _ = sweeps.start_study(spec, "hp")
    finally:
        _REGISTRY.pop("sweep_toy", None)
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") + states.count("PRUNED") == 6
    assert "PRUNED" in states  # the MedianPruner stopped a below-median trial
    rows = sweeps.study_rows(cfg.out, "hp")
    done = {t.number for t in study.trials if t.state.name == "COMPLETE"}
    seg = rows[(rows["stage"] == "segmenter") & (rows["metric"] == "iou")]
    assert set(seg["trial"]) == done
    pruned = rows[rows["status"] == "pruned"]
    assert set(pruned["trial"]) == {t.number for t in study.trials if t.state.name == "PRUNED"}
    assert study.best_params["sharp"] > 0.5
    assert (Path(cfg.out) / "studies" / "hp.csv").is_file()
    with pytest.raises(sweeps.ConfigError, match="no search_space"):
        sweeps.hparams_spec(cfg, "centre_prior", n_trials=3)


# ---- storage, workers --------------------------------------------------------------------------
def test_mask_url_hides_passwords():
    assert sweeps.mask_url is config.mask_url  # one implementation
    masked = sweeps.mask_url("postgresql://bench:s3cr3t@db.example:5432/optuna")
    assert "s3cr3t" not in masked and "db.example" in masked
    assert "s3cr3t" not in sweeps.mask_url("weird+x://u:s3cr3t@h/db")
    assert sweeps.mask_url("journal:/tmp/x.journal") == "journal:/tmp/x.journal"


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///{tmp}/p.db?password=hunter2",
        "sqlite:///{tmp}/q.db?mode=rw&password=hunter2",
    ],
)
def test_storage_log_never_shows_the_password(url, tmp_path, caplog):
    """The real logging path (open_storage), not the source text: issue 15, item 1."""
    caplog.set_level(logging.INFO, logger="benchmark.sweeps")
    try:
        sweeps.open_storage(url.format(tmp=tmp_path), tmp_path)
    except Exception:  # noqa: BLE001 - only what was logged matters here
        pass
    assert "Optuna storage" in caplog.text  # the logging line was reached
    assert "hunter2" not in caplog.text and "password=***" in caplog.text
    assert "ter2" not in config.mask_url("postgresql://root:hun@ter2@db/x")


# Passwords with a raw "@", a raw ":" and a literal "%40", each made of pieces of 6+ characters
# that appear nowhere else (so a leaked piece is found even in binary files).
PASSWORDS = ["Hunter7@Tw0sEcr", "C0lonPw:Zq9Secr", "PctEnc%40Kx7Secr"]


def _secret_forms(password: str) -> set[str]:
    """The password raw, percent-decoded and percent-encoded, and its pieces between @ : %40."""
    from urllib.parse import quote, unquote

    forms = {password, unquote(password), quote(password, safe=""), quote(unquote(password))}
    pieces = {p for f in forms for p in re.split(r"@|:|%40|%3A", f) if len(p) >= 6}
    return forms | pieces


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize(
    "template",
    [
        "postgresql://bench:{pw}@db.example.org:5432/optuna",
        "postgresql+psycopg://bench:{pw}@db.example.org/optuna?sslmode=require",
        "mysql+pymysql://root:{pw}@localhost/optuna?charset=utf8",
        "postgresql://db.example.org/optuna?user=bench&password={pw}&sslmode=require",
        "postgresql://bench@db.example.org/optuna?sslpassword={pw}",
        "postgresql://bench:{pw}@db.example.org/optuna?password={pw}",
        "sqlite:////tmp/x/p.db?password={pw}",
        "sqlite:////tmp/x/p.db?mode=rw&password={pw}&cache=shared",
    ],
)
def test_mask_url_hides_every_form_of_the_password(template, password):
    url = template.format(pw=password)
    masked = config.mask_url(url)
    leaked = [f for f in _secret_forms(password) if f in masked]
    assert not leaked, (url, masked, leaked)
    assert "***" in masked
    assert any(host in masked for host in ("db.example.org", "localhost", "/tmp/x/p.db"))
    assert config.mask_url(masked) == masked  # masking is idempotent
    redacted = config.redact(f"could not reach {url}", url)
    assert not [f for f in _secret_forms(password) if f in redacted], redacted


@pytest.mark.parametrize("password", ["Sl4shPw/Hx9Secr", "H4shPw#Qz8Secr", "Qu3stPw?Rx7Secr"])
def test_mask_url_password_with_slash_hash_or_question_mark(password):
    """Raw characters that end the userinfo for urllib (SQLAlchemy keeps them in the password)."""
    for url in (
        f"postgresql://bench:{password}@db.example.org:5432/optuna",
        f"mysql://root:{password}@localhost/optuna?charset=utf8",
    ):
        masked = config.mask_url(url)
        forms = _secret_forms(password) | {password[:7], password[-7:]}
        assert not [f for f in forms if f in masked], masked


def test_mask_url_keeps_what_is_not_secret():
    assert config.mask_url("postgresql://bench@db/optuna?sslmode=require") == (
        "postgresql://bench@db/optuna?sslmode=require"
    )
    assert config.mask_url("sqlite:////data/a@b/p.db") == "sqlite:////data/a@b/p.db"
    assert config.mask_url("journal:/tmp/a:b@c.journal") == "journal:/tmp/a:b@c.journal"
    assert config.mask_url("postgresql://bench@db/x?email=a@b.org") == (
        "postgresql://bench@db/x?email=a@b.org"
    )


def test_driver_error_messages_are_redacted(tmp_path, capsys):
    """A driver quoting the part of a raw-@ password it took for the host never shows it."""
    url = "postgresql://root:Hunter7@Tw0sEcr@127.0.0.1:1/optuna"
    message = "failed to resolve host 'Tw0sEcr@127.0.0.1': Name or service not known"
    assert "Tw0sEcr" not in config.redact(message, url)
    bad = f"sqlite://root:Hunter7@Tw0sEcr@//{tmp_path}/p.db"  # SQLAlchemy refuses it, quoting
    with pytest.raises(config.ConfigError, match="--storage: cannot open") as info:
        sweeps.open_storage(bad, tmp_path)
    assert not [f for f in _secret_forms("Hunter7@Tw0sEcr") if f in str(info.value)]
    code = main(["worker", "--storage", bad, "--study", "s", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Tw0sEcr" not in err


def test_unexpected_error_mid_sweep_is_a_redacted_traceback(tmp_path, capsys, monkeypatch):
    """An error raised after the storage is open never prints its password (exit 1)."""
    url = f"sqlite:///{tmp_path}/p.db?password=Hunter7@Tw0sEcr"

    def fail(storage, *args, **kwargs):
        raise RuntimeError(f"lost the connection to {storage} (Tw0sEcr@127.0.0.1)")

    monkeypatch.setattr(sweeps, "run_worker", fail)
    code = main(["worker", "--storage", url, "--study", "s", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "RuntimeError: lost the connection" in err and "Traceback" in err
    assert not [f for f in _secret_forms("Hunter7@Tw0sEcr") if f in err]
    assert "Tw0sEcr" not in err


def _files_holding(root: Path, forms: set[str]) -> list[str]:
    """Every file under ``root`` (text or binary) holding one of ``forms``, with the form."""
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        found += [f"{path}: {f}" for f in forms if f.encode() in data]
    return found


@pytest.fixture(scope="module")
def leak_out(tmp_path_factory) -> Path:
    """One output folder shared by the leak tests (data and maps are made once)."""
    return tmp_path_factory.mktemp("leak") / "out"


@pytest.mark.parametrize("password", PASSWORDS)
def test_sweep_and_worker_never_leak_the_password(password, leak_out, caplog, capfd):
    """Issue 15 item 1: every log line, all output and every file of a sweep and a worker."""
    caplog.set_level(logging.DEBUG)
    db = leak_out / "studies" / f"p{PASSWORDS.index(password)}.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{db}?password={password}"
    study = "threshold-synthetic-tiny-all_foreground-rep0"
    sweep = ["-vv", "sweep", "threshold", "--preset", "tiny", "--methods", "all_foreground",
             "--device", "cpu", "--trials", "20", "--out", str(leak_out)]  # fmt: skip
    assert main([*sweep, "--storage", url]) == 0
    worker = ["-vv", "worker", "--storage", url, "--study", study, "--out", str(leak_out)]
    assert main(worker) == 0
    out, err = capfd.readouterr()
    logged = "\n".join(
        f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    )  # every record, any level
    assert "Optuna storage: sqlite:///" in logged and "password=***" in logged  # lines reached
    assert "worker 0: 0 trials" in out and (leak_out / "studies" / f"{study}.csv").is_file()
    forms = _secret_forms(password)
    for name, text in (("log", logged), ("stdout", out), ("stderr", err)):
        leaked = [f for f in forms if f in text]
        assert not leaked, (name, leaked)
    assert not _files_holding(leak_out, forms)


def _grid_spec(out: Path, ratios: list[float]) -> sweeps.SweepSpec:
    cfg = _cfg(out, ["centre_prior"], segmenter_epochs=0)
    return sweeps.gt_ratio_spec(cfg, ratios)


def test_two_submitit_workers_on_one_journal(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    spec = _grid_spec(out, [0.0, 0.5, 0.75, 1.0])
    study, url = sweeps.start_study(spec, "journal-grid", launcher="local", workers=2)
    assert url.startswith("journal:") and Path(url[len("journal:") :]).is_file()
    rows = _check_grid(out, "journal-grid", 4)
    logs = list((out / "studies" / "submitit").glob("*_0_log.err"))
    assert len(logs) == 2  # two jobs ran
    numbers = {int(r) for r in rows["trial"].unique()}
    assert len(numbers) == 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on loopback, as the ``postgres`` user when we are root."""
    pytest.importorskip("psycopg", reason="psycopg (SQLAlchemy 2.1's default driver) is missing")
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    initdb = bins[-1] if bins else shutil.which("initdb")
    if not initdb:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql; .ci/run does it)")
    bindir = Path(initdb).parent
    prefix: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server")
        runuser = shutil.which("runuser")
        if not runuser:
            pytest.skip("running as root without runuser to drop to the 'postgres' user")
        prefix = [runuser, "-u", "postgres", "--"]
    root = Path(tempfile.mkdtemp(prefix="wsss-pg-"))
    secret = "s3cr3t-pw"
    (root / "pw").write_text(secret + "\n")
    if prefix:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pw", "postgres")
    port = _free_port()
    data = root / "data"

    def pg(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*prefix, *args], capture_output=True, text=True, timeout=60, cwd=root
        )

    init = pg(str(initdb), "-D", str(data), "-U", "bench", "--auth=scram-sha-256",
              f"--pwfile={root / 'pw'}", "-E", "UTF8")  # fmt: skip
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    start = pg(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"),
               "-w", "start")  # fmt: skip
    if start.returncode != 0:
        log = (root / "log").read_text() if (root / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-200:]} {log[-300:]}")
    try:
        yield f"postgresql://bench:{secret}@127.0.0.1:{port}/postgres", secret
    finally:
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_postgresql(tmp_path, postgres_url):
    url, secret = postgres_url
    out = tmp_path / "out"
    spec = _grid_spec(out, [0.0, 0.5, 0.75, 1.0])
    storage, _ = sweeps.open_storage(url, out)
    sweeps.create_study(spec, storage, "pg-grid")
    brunner.prepare_data(spec.run_config())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "benchmark", "worker", "--storage", url, "--study", "pg-grid"]
    procs = [
        subprocess.Popen(
            [*cmd, "--worker-index", str(i)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    t0 = time.time()
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all(secret not in o for o in outputs)  # the password is never logged
    ran = [int(o.strip().splitlines()[-1].split(": ")[1].split()[0]) for o in outputs]
    assert sum(ran) >= 4, (ran, outputs)
    study = optuna.load_study(study_name="pg-grid", storage=storage)
    sweeps.export_trials(study, out)
    _check_grid(out, "pg-grid", 4)
    logging.getLogger(__name__).info("postgres workers: %s trials in %.1f s", ran, time.time() - t0)
