"""Untrusted files (issue 9): caches, checkpoints, configs and results are data, never code.

A "payload" in these tests is a pickle whose loading would create a sentinel folder
(``os.mkdir``): each test checks that the file is refused or read as plain data and that the
sentinel never appears.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark import cache as bcache
from benchmark.cli import main
from benchmark.config import ConfigError, load_yaml, mask_url
from benchmark.runner import RunContext, compute_maps
from benchmark.store import read_results, write_rows
from methods.base import ImageSet, Method

REPO = Path(__file__).resolve().parents[1]
CODE = [
    p for d in ("benchmark", "methods", "datasets", "reports") for p in (REPO / d).rglob("*.py")
]


class Payload:
    """Unpickling this object calls ``os.mkdir(sentinel)``."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.mkdir, (self.sentinel,))


# ---- the code base: every loader is a safe one ------------------------------------------------
def test_every_torch_load_is_weights_only():
    calls = []
    for path in CODE:
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            args = text[match.end() : text.find(")", match.end())]
            calls.append(path)
            assert "weights_only=True" in args, f"{path}: torch.load without weights_only=True"
    assert calls, "the stage cache's torch.load was not found"


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (
            r"^\s*import pickle|^\s*from pickle|\bpickle\.loads?\(|\bdill\b|\bcloudpickle\b",
            "pickle",
        ),
        (r"allow_pickle\s*=\s*True", "np.load(allow_pickle=True)"),
        (r"\byaml\.load\(|\byaml\.unsafe_load|\bLoader\s*=\s*yaml\.(Unsafe|Full)?Loader", "yaml"),
        (r"(?<![\w.])(eval|exec)\(", "eval/exec"),
        (r"\bread_pickle\(|\bjoblib\.load\(|\bshelve\.open\(", "pickle-based readers"),
    ],
)
def test_no_unsafe_loader_in_the_code_base(pattern, why):
    hits = [
        f"{path.relative_to(REPO)}:{n}"
        for path in CODE
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(pattern, line) and "noqa: untrusted-ok" not in line
    ]
    assert not hits, f"{why} in {hits}"


# ---- caches -------------------------------------------------------------------------------------
def _payload_bytes(sentinel: Path, kind: str) -> bytes:
    if kind == "raw_pickle":
        return pickle.dumps({"weight": Payload(sentinel)})
    buf = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "evil": Payload(sentinel)}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["raw_pickle", "torch_save"])
def test_malicious_stage_cache_is_refused_not_executed(kind, tmp_path, caplog):
    """An attacker can write a marker too: the checksum matches, the loader still refuses."""
    sentinel = tmp_path / "pwned"
    stages = tmp_path / "stages"
    bcache.write_with_marker(stages / "classifier.pt", _payload_bytes(sentinel, kind))
    assert bcache.read_marker(stages / "classifier.pt") is not None  # looks complete
    ctx = RunContext(stage_dir=stages)
    with caplog.at_level(logging.WARNING):
        out = ctx.stage("classifier", lambda: {"weight": torch.ones(2)})
    assert not sentinel.exists(), "the pickle was executed"
    assert torch.equal(out["weight"], torch.ones(2))  # recomputed
    assert "cannot load cached stage" in caplog.text and "classifier.pt" in caplog.text
    assert ctx.costs["classifier"]["reused"] is False
    assert torch.equal(bcache.load_tensors(stages / "classifier.pt")["weight"], torch.ones(2))


class _Ones(Method):
    name = "ones_for_test"

    def localize(self, batch, ctx):
        return np.ones((len(batch), 1, 4, 4), np.float32)


def test_malicious_map_file_is_refused_not_executed(tmp_path, caplog):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "maps" / "val.npy"
    buf = io.BytesIO()
    np.save(buf, np.array([Payload(sentinel)], dtype=object), allow_pickle=True)
    bcache.write_with_marker(path, buf.getvalue())
    images = ImageSet(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(2, np.int64), 1, ["a", "b"])
    with caplog.at_level(logging.WARNING):
        maps, cost = compute_maps(_Ones(config=object()), images, RunContext(), path, force=False)
    assert not sentinel.exists()
    assert "cannot load cached maps" in caplog.text and cost["reused"] is False
    assert maps.shape == (2, 1, 4, 4) and float(maps.min()) == 1.0


def test_malicious_image_cache_is_refused(tmp_path):
    from datasets import DatasetError
    from datasets.cache import ImageCache

    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"size": 4}')
    np.save(folder / "images.npy", np.array([Payload(tmp_path / "pwned")]), allow_pickle=True)
    with pytest.raises(DatasetError):
        ImageCache.open(folder)
    assert not (tmp_path / "pwned").exists()


def test_malicious_pretrained_weights_file_is_refused(tmp_path):
    from methods.common.backbones import create_resnet

    weights = tmp_path / "resnet18.pth"
    weights.write_bytes(_payload_bytes(tmp_path / "pwned", "torch_save"))
    with pytest.raises(Exception, match="resnet18.pth"):
        create_resnet("resnet18", pretrained=str(weights), output_stride=16)
    assert not (tmp_path / "pwned").exists()


# ---- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object:benchmark.config.RunConfig {}",
        "!!python/object/apply:os.mkdir ['{sentinel}']",
        "!!python/object/new:os.mkdir ['{sentinel}']",
        "!!python/name:os.system",
    ],
)
def test_yaml_python_tags_are_refused(tag, tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    config = tmp_path / "run.yaml"
    config.write_text(f"methods: {tag.replace('{sentinel}', str(sentinel))}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(config)
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not sentinel.exists()


def test_method_spec_yaml_tags_are_refused(tmp_path, capsys):
    sentinel = tmp_path / "pwned"
    spec = f"cam[epochs=!!python/object/apply:os.mkdir ['{sentinel}']]"
    assert main(["run", "--methods", spec, "--out", str(tmp_path / "out")]) == 2
    assert "--methods" in capsys.readouterr().err
    assert not sentinel.exists()


# ---- results ----------------------------------------------------------------------------------
def test_result_files_are_parsed_not_executed(tmp_path, caplog):
    sentinel = tmp_path / "pwned"
    code = f"__import__('os').mkdir({str(sentinel)!r})"
    write_rows(tmp_path, "good", [{"method_id": code, "metric": "iou", "value": 0.5}])
    rows = tmp_path / "results" / "rows"
    (rows / "evil.parquet").write_bytes(pickle.dumps(Payload(sentinel)))  # a pickle, not parquet
    (rows / "empty.parquet").write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        frame = read_results(tmp_path)
    assert not sentinel.exists()
    assert frame["method_id"].tolist() == [code]  # the text is data
    assert "evil.parquet" in caplog.text and "empty.parquet" in caplog.text


def test_qualitative_npz_with_objects_is_refused(tmp_path):
    from reports.figures import load_qualitative

    folder = tmp_path / "results" / "qualitative"
    folder.mkdir(parents=True)
    np.savez(folder / "evil.npz", method_id=np.array([Payload(tmp_path / "pwned")]))
    images, _, outputs = load_qualitative(tmp_path)
    assert not (tmp_path / "pwned").exists() and not outputs and not images


def test_results_frame_round_trip_keeps_types(tmp_path):
    """Rows come back as plain columns (no object that could carry code)."""
    write_rows(tmp_path, "r", [{"method_id": "cam", "value": 0.25, "reused": True}])
    frame = read_results(tmp_path)
    assert frame.dtypes.to_dict() == {
        "method_id": pd.Series(["x"]).dtype,
        "value": np.dtype("float64"),
        "reused": np.dtype("bool"),
    }


# ---- storage URLs -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "postgresql://bench:s3cr%40t@db.example.org:5432/optuna",
            "postgresql://bench:***@db.example.org:5432/optuna",
        ),
        (
            "mysql+pymysql://root:hunter2@localhost/optuna",
            "mysql+pymysql://root:***@localhost/optuna",
        ),
        ("postgresql://bench@db/optuna", "postgresql://bench@db/optuna"),
        (
            "postgresql://db/optuna?user=bench&password=hunter2&sslmode=require",
            "postgresql://db/optuna?user=bench&password=***&sslmode=require",
        ),
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("sqlite:///runs/optuna.db", "sqlite:///runs/optuna.db"),
        ("sqlite:///runs/o.db?password=x%40y", "sqlite:///runs/o.db?password=***"),
        ("runs/sweep/journal.log", "runs/sweep/journal.log"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked
    assert "hunter2" not in mask_url(url) and "s3cr" not in mask_url(url)


def _code_outside_strings(line: str) -> str:
    """A line's code with plain string literals removed and f-strings reduced to their fields."""
    line = re.sub(
        r"""[fF](["'])(.*?)\1""", lambda m: " ".join(re.findall(r"\{([^}]*)\}", m[2])), line
    )
    return re.sub(r"""(["'])(?:\\.|(?!\1).)*\1""", "", line)


def test_password_never_reaches_logs_or_reports():
    """Wherever the code logs or prints a storage URL variable it goes through mask_url.

    A line-level check of every ``logger.*(``, ``print(`` and ``write_text(`` call: a variable
    called ``*url*`` or ``*storage*`` among its arguments (or in an f-string field) needs
    ``mask_url`` on the same line.
    """
    leaks = []
    for path in CODE:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not re.search(r"\b(logger\.\w+|print|write_text)\(", line):
                continue
            code = _code_outside_strings(line)
            if (
                re.search(r"\b\w*(url|storage)\w*\b", code, re.IGNORECASE)
                and "mask_url" not in code
            ):
                leaks.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not leaks, f"a storage URL is logged without mask_url: {leaks}"


def test_leak_check_sees_a_leak():
    assert "url" in _code_outside_strings('logger.info("storage %s", url)')
    assert "url" in _code_outside_strings('print(f"storage: {url}")')
    assert "url" not in _code_outside_strings('logger.info("storage url: %s", path)')


# ---- YAML alias bombs and long values (issue 15 item 7) -----------------------------------------
def _alias_bomb(depth: int) -> str:
    """A "billion laughs" list under the valid key ``methods``: 9 ** depth strings once expanded.

    At depth 6 the old ``--methods`` error printed 3.9 MB on one line (depth 9: ~2.7 GB).
    """
    lines = ["methods:", '  - &x0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, depth + 1):
        lines.append(f"  - &x{i} [" + ", ".join([f"*x{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    "text",
    [
        _alias_bomb(6),
        "methods: &m [cam]\nseeds: 1\n",  # an anchor alone
        "seeds: &n 1\nbase_seed: *n\n",  # an alias of a scalar
    ],
)
def test_yaml_anchors_and_aliases_are_refused(text, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match="anchors and aliases"):
        load_yaml(config)
    assert (
        main(["run", "--preset", "tiny", "--config", str(config), "--out", str(tmp_path / "out")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) < 400, err[:500]
    assert not (tmp_path / "out").exists()


def test_method_spec_aliases_are_refused(tmp_path, capsys):
    spec = "cam[tta_scales=[&a [1.0, 1.0], *a, *a]]"
    assert main(["run", "--preset", "tiny", "--methods", spec, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--methods" in err and "anchors and aliases" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--methods", "cam[epochs=" + "9" * 100_000 + "x]"],
        ["--methods", "n" * 100_000],
        ["--device", "d" * 100_000],
        ["--dataset", "q" * 100_000],
    ],
)
def test_long_values_are_cut_in_error_messages(args, tmp_path, capsys):
    assert main(["run", "--preset", "tiny", *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and len(err) <= 2100, len(err)


def test_long_yaml_values_are_cut_in_error_messages(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("methods: [" + ", ".join(["[lol, lol, lol]"] * 2_000) + "]\n")
    assert (
        main(["run", "--preset", "tiny", "--config", str(config), "--out", str(tmp_path / "out")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert "--methods: expected a list of method names" in err
    assert len(err) < 400 and "characters)" in err, err[:500]


# ---- images outside the dataset root (issue 15 item 9) -----------------------------------------
def test_links_out_of_the_dataset_root_are_excluded_not_read(tmp_path, caplog):
    """A dataset whose images/x.jpg links to a private file: excluded with a reason, never read.

    A link inside the root, and a whole images/ folder linked to another disk, stay usable.
    """
    import shutil

    from datasets.oxford_pet import OxfordPet
    from datasets.synthetic import generate_synthetic

    root = generate_synthetic(tmp_path / "pets", n_images=12, size=40, n_classes=3, seed=0)
    names = sorted(p.stem for p in (root / "images").glob("*.jpg"))
    private = tmp_path / "home" / "private.jpg"
    private.parent.mkdir()
    shutil.move(root / "images" / f"{names[0]}.jpg", private)
    (root / "images" / f"{names[0]}.jpg").symlink_to(private)
    trimap = root / "annotations" / "trimaps" / f"{names[1]}.png"
    shutil.move(trimap, tmp_path / "home" / "t.png")
    trimap.symlink_to(tmp_path / "home" / "t.png")
    spare = root / "spare"  # a link that stays inside the root is fine
    spare.mkdir()
    shutil.move(root / "images" / f"{names[2]}.jpg", spare / "x.jpg")
    (root / "images" / f"{names[2]}.jpg").symlink_to(spare / "x.jpg")
    with caplog.at_level(logging.WARNING, logger="datasets.oxford_pet"):
        ds = OxfordPet(root)
    reasons = {e.name: (e.file, e.reason) for e in ds.exclusions}
    assert set(reasons) == {names[0], names[1]}
    assert reasons[names[0]][0] == f"images/{names[0]}.jpg"
    assert f"a link to {private}, outside the dataset root" in reasons[names[0]][1]
    assert reasons[names[1]][0] == f"annotations/trimaps/{names[1]}.png"
    assert "outside the dataset root" in reasons[names[1]][1]
    assert str(private) in caplog.text  # the warning names the file and its target
    assert sorted(r.name for r in ds.records) == sorted(set(names) - {names[0], names[1]})
    moved = tmp_path / "big-disk" / "images"  # the whole folder on another disk: allowed
    shutil.move(root / "images", moved)
    (root / "images").symlink_to(moved, target_is_directory=True)
    assert {e.name for e in OxfordPet(root).exclusions} == {names[0], names[1]}
