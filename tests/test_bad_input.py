"""Bad input (issue 9): broken dataset files and invalid options or config files.

Dataset cases start from a small generated synthetic dataset (Oxford-IIIT Pet layout), copied
into ``tmp_path`` and broken one way at a time: every bad file is excluded with a reason (in
``dataset.exclusions``, ``datasets check`` and the run's data manifest), the rest stays usable,
and nothing raises from inside PIL or torch. CLI and YAML cases: one line naming the option, exit
code 2, before any work starts.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark.cli import main
from benchmark.config import RunConfig
from benchmark.runner import prepare_data
from datasets import build_cache
from datasets.oxford_pet import OxfordPet
from datasets.synthetic import generate_synthetic


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A small generated dataset (12 images, 3 classes), never modified."""
    root = tmp_path_factory.mktemp("bad-input") / "synthetic"
    return generate_synthetic(root, n_images=12, size=40, n_classes=3, seed=0)


@pytest.fixture()
def pets(source, tmp_path) -> Path:
    """A writable copy of the dataset."""
    return Path(shutil.copytree(source, tmp_path / "pets"))


def _names(root: Path) -> list[str]:
    return sorted(p.stem for p in (root / "images").glob("*.jpg"))


def _trimap(root: Path, name: str) -> Path:
    return root / "annotations" / "trimaps" / f"{name}.png"


def _edit_list(root: Path, name: str, line: str | None) -> None:
    """Replace ``name``'s line in annotations/list.txt (None: drop it)."""
    path = root / "annotations" / "list.txt"
    lines = [line if ln.split()[:1] == [name] else ln for ln in path.read_text().splitlines()]
    path.write_text("\n".join(ln for ln in lines if ln is not None) + "\n")


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's signature)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _resize_trimap(root: Path, name: str) -> None:
    trimap = np.asarray(Image.open(_trimap(root, name)))
    Image.fromarray(np.ones((trimap.shape[0] + 3, trimap.shape[1]), np.uint8)).save(
        _trimap(root, name)
    )


def _bad_values(root: Path, name: str) -> None:
    trimap = np.asarray(Image.open(_trimap(root, name))).copy()
    trimap[:3, :3] = 7
    trimap[-1, -1] = 0
    Image.fromarray(trimap).save(_trimap(root, name))


def _colour_trimap(root: Path, name: str) -> None:
    trimap = np.asarray(Image.open(_trimap(root, name)))
    rgb = np.stack([trimap, trimap, np.full_like(trimap, 2)], axis=2)
    Image.fromarray(rgb).save(_trimap(root, name))


# name -> (how to break image 0, expected fragment of its exclusion reason)
CASES: dict[str, tuple[Callable[[Path, str], None], str]] = {
    "truncated_jpeg": (
        lambda r, n: _truncate(r / "images" / f"{n}.jpg"),
        "image data (",  # "truncated image data (...)" or "corrupt image data (...)"
    ),
    "zero_byte_image": (
        lambda r, n: (r / "images" / f"{n}.jpg").write_bytes(b""),
        "zero-byte image file",
    ),
    "text_bytes_named_jpg": (
        lambda r, n: (r / "images" / f"{n}.jpg").write_text("<html>not an image</html>"),
        "not a decodable image",
    ),
    "decompression_bomb": (
        lambda r, n: _png_header_only(r / "images" / f"{n}.jpg", 40000, 40000),
        "too large to decode safely",
    ),
    "trimap_decompression_bomb": (  # DecompressionBombError is not an OSError (issue 15)
        lambda r, n: _png_header_only(_trimap(r, n), 40000, 40000),
        "too large to decode safely",
    ),
    "trimap_size_mismatch": (_resize_trimap, "trimap size"),
    "trimap_values_outside_123": (_bad_values, "trimap values outside {1, 2, 3}: 0, 7"),
    "missing_trimap": (lambda r, n: _trimap(r, n).unlink(), "missing trimap"),
    "zero_byte_trimap": (lambda r, n: _trimap(r, n).write_bytes(b""), "zero-byte file"),
    "truncated_trimap": (lambda r, n: _truncate(_trimap(r, n)), "trimap"),
    "colour_trimap": (_colour_trimap, "colour image"),
    "list_wrong_column_count": (
        lambda r, n: _edit_list(r, n, f"{n} 1 1"),
        "expected 4 columns (name, class id, species, breed id), got 3",
    ),
    "list_extra_column": (
        lambda r, n: _edit_list(r, n, f"{n} 1 1 1 extra"),
        "expected 4 columns",
    ),
    "list_unknown_class_id": (lambda r, n: _edit_list(r, n, f"{n} 99 1 1"), "unknown class id 99"),
    "list_non_integer_id": (lambda r, n: _edit_list(r, n, f"{n} one 1 1"), "non-integer id"),
    "list_unknown_species": (lambda r, n: _edit_list(r, n, f"{n} 1 5 1"), "unknown species 5"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_broken_file_is_excluded_with_a_reason(case, pets):
    break_it, fragment = CASES[case]
    names = _names(pets)
    victim = names[0]
    break_it(pets, victim)
    ds = OxfordPet(pets)  # never raises for one bad file
    reasons = {e.name: e.reason for e in ds.exclusions}
    assert fragment in reasons.get(victim, ""), (case, reasons)
    assert sorted(r.name for r in ds.records) == names[1:]
    excluded = {e["name"]: e for e in ds.check()["excluded"]}
    assert fragment in excluded[victim]["reason"] and excluded[victim]["file"]


def test_non_image_file_and_folder_in_images(pets):
    names = _names(pets)
    (pets / "images" / "README.txt").write_text("notes")
    (pets / "images" / "thumbs.db").write_bytes(b"\x00\x01")
    (pets / "images" / "subfolder.jpg").mkdir()  # a folder with an image name: ignored
    ds = OxfordPet(pets)
    reasons = {e.file: e.reason for e in ds.exclusions}
    assert "unexpected file type .txt" in reasons["images/README.txt"]
    assert "unexpected file type .db" in reasons["images/thumbs.db"]
    assert [r.name for r in ds.records] == names


def test_run_manifest_lists_every_exclusion(pets, tmp_path):
    names = _names(pets)
    (pets / "images" / f"{names[0]}.jpg").write_bytes(b"")
    _trimap(pets, names[1]).unlink()
    _edit_list(pets, names[2], f"{names[2]} 77 1 1")
    cfg = RunConfig(
        methods=["all_foreground"],
        dataset="oxford_pet",
        data_root=str(pets),
        preset="tiny",
        out=str(tmp_path / "out"),
        device="cpu",
        report=False,
    ).validate()
    bundle = prepare_data(cfg)
    manifest = json.loads((tmp_path / "out" / "data" / "oxford_pet-manifest.json").read_text())
    reasons = {e["name"]: e["reason"] for e in manifest["excluded"]}
    assert "zero-byte image file" in reasons[names[0]]
    assert "missing trimap" in reasons[names[1]]
    assert "unknown class id 77" in reasons[names[2]]
    assert manifest["usable"] == manifest["cached_images"] == len(names) - 3
    assert not set(names[:3]) & set(bundle.cache.names)


def test_file_broken_after_validation_is_left_out_of_the_cache(pets, tmp_path):
    """verify="header" defers the full decode: the cache builder records the failure instead."""
    names = _names(pets)
    _truncate(pets / "images" / f"{names[0]}.jpg")
    ds = OxfordPet(pets, verify="header")
    assert names[0] in [r.name for r in ds.records]  # the header still looks fine
    cache = build_cache(ds, names, 32, tmp_path / "cache")
    assert names[0] not in cache.names and len(cache.names) == len(names) - 1
    [excluded] = cache.excluded
    assert excluded["name"] == names[0] and "cannot decode image" in excluded["reason"]


def test_datasets_check_reports_without_traceback(pets, capsys):
    names = _names(pets)
    _truncate(pets / "images" / f"{names[0]}.jpg")
    assert main(["datasets", "check", "--root", str(pets), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in report["excluded"]] == [names[0]]


def test_unusable_dataset_is_one_clear_error(pets, tmp_path, capsys):
    for path in (pets / "images").glob("*.jpg"):
        path.write_bytes(b"")
    code = main(
        [
            "run",
            "--dataset",
            "oxford_pet",
            "--data-root",
            str(pets),
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: oxford_pet: no usable image") and "zero-byte" in err
    assert "Traceback" not in err


def test_missing_dataset_root_is_one_clear_error(tmp_path, capsys):
    code = main(
        [
            "run",
            "--dataset",
            "oxford_pet",
            "--data-root",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err.splitlines()[0] and "Traceback" not in err


# ---- CLI and YAML ---------------------------------------------------------------------------
def _one_line_error(capsys, argv: list[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--methods", "cam", "nope"], ("--methods", "'nope'", "valid:", "cam_affinitynet")),
        (["--methods", "nope*"], ("--methods", "matches no method")),
        (["--methods", "cam[bogus=1]"], ("--methods", "bogus", "valid:", "epochs")),
        (["--methods", "cam[epochs=abc]"], ("--methods", "'epochs' expects int", "'abc'")),
        (["--methods", "cam[lr=fast]"], ("--methods", "'lr' expects float")),
        (["--methods", "cam[epochs=2"], ("--methods", "cannot parse")),
        (["--seeds", "abc"], ("--seeds", "invalid int")),
        (["--seeds", "-2"], ("--seeds", ">= 1")),
        (["--budget-minutes", "0"], ("--budget-minutes",)),
        (["--gt-ratio", "-0.1"], ("--gt-ratio",)),
        (["--val-fraction", "0"], ("--val-fraction",)),
        (["--threshold", "2"], ("--threshold",)),
        (["--image-size", "8"], ("--image-size",)),
        (["--max-epochs", "0"], ("--max-epochs",)),
        (["--segmenter-batch-size", "0"], ("--segmenter-batch-size",)),
        (["--segmenter", "vgg"], ("--segmenter", "lraspp")),
        (["--dataset", "imagenet"], ("--dataset", "oxford_pet")),
        (["--split", "random"], ("--split",)),
        (["--device", "quantum"], ("--device",)),
        (["--config", "/nonexistent/run.yaml"], ("--config", "not found")),
        # issue 15: nan / inf pass every comparison; out-of-range method values; empty lists
        (["--val-fraction", "nan"], ("--val-fraction", "finite", "nan")),
        (["--gt-ratio", "nan"], ("--gt-ratio", "finite")),
        (["--threshold", "nan"], ("--threshold", "finite")),
        (["--budget-minutes", "inf"], ("--budget-minutes", "finite")),
        (["--methods", "cam[lr=.nan]"], ("--methods", "'lr' must be finite")),
        (["--methods", "cam[lr=nan]"], ("--methods", "'lr' must be finite")),
        (["--methods", "cam[lr=-1e-3]"], ("--methods", "'lr' must be in (0.0, inf)")),
        (["--methods", "cam[epochs=-5]"], ("--methods", "'epochs' must be in [1, inf)", "-5")),
        (["--methods", "cam[epochs=0]"], ("--methods", "'epochs'")),
        (["--methods", "cam[batch_size=0]"], ("--methods", "'batch_size'")),
        (["--methods", "cam[min_steps=-1]"], ("--methods", "'min_steps'")),
        (["--methods", "cam[tta_scales=(1.0,.inf)]"], ("--methods", "'tta_scales'", "finite")),
        (["--methods", "cam_affinitynet[fg_threshold=1.5]"], ("--methods", "'fg_threshold'")),
        (["--methods", "cam[epochs=1,epochs=2]"], ("--methods", "'epochs' is given twice")),
        (["--methods", ","], ("--methods", "no method")),
        (["--methods", " , ", ","], ("--methods", "no method")),
    ],
)
def test_bad_option_is_one_line_exit_2(args, needles, capsys, tmp_path):
    # tiny: should validation ever let a bad value through, the run started is a small one
    err = _one_line_error(
        capsys, ["run", "--preset", "tiny", "--out", str(tmp_path / "out"), *args]
    )
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()  # nothing started


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("seeds: []\n", ("--seeds", "expected an integer", "[]")),
        ("seeds: 2.5\n", ("--seeds", "expected an integer")),
        ("seeds: true\n", ("--seeds",)),
        ("methods: []\n", ("--methods", "empty")),
        ("methods: [cam, nope]\n", ("--methods", "'nope'", "valid:")),
        ("methods: 5\n", ("--methods", "list of method names")),
        ("budget_minutes: -1\n", ("--budget-minutes", "got -1")),
        ("gt-ratio: 1.5\n", ("--gt-ratio", "got 1.5")),
        ("gt_ratio: high\n", ("--gt-ratio", "expected a number")),
        ("dataset: 5\n", ("--dataset", "expected a non-empty text")),
        ("data_root: [a]\n", ("--data-root",)),
        ("force: 'no'\n", ("--force", "true or false")),
        ("report: 3\n", ("--report", "true or false")),
        ("bogus_key: 3\nseeds: 1\n", ("--config", "unknown key 'bogus_key'", "valid keys")),
        ("- cam\n- cnn\n", ("--config", "mapping")),
        ("seeds: [1, 2\n", ("--config", "not valid YAML")),
        ("seeds: 1\nseeds: 2\n", ("--config", "'seeds' is given twice", "line 2")),
        ("base_seed: 1\nbase-seed: 2\n", ("--config", "'base-seed' is given twice")),
        ("val_fraction: .nan\n", ("--val-fraction", "finite")),
        ("threshold: .inf\n", ("--threshold", "finite")),
        ("methods: ['cam[epochs=-5]']\n", ("--methods", "'epochs' must be in [1, inf)")),
        ("methods: [',']\n", ("--methods", "no method")),
    ],
)
def test_bad_yaml_is_one_line_exit_2(text, needles, capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    err = _one_line_error(
        capsys, ["run", "--preset", "tiny", "--out", str(tmp_path / "out"), "--config", str(config)]
    )
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()


# ---- issue 15: more bad input, each one line (or one exclusion) ------------------------------
def _run_args(pets: Path, out: Path, *extra: str) -> list[str]:
    """A fast real run on the small dataset (no segmenter epochs, no report)."""
    return ["run", "--dataset", "oxford_pet", "--data-root", str(pets), "--preset", "tiny",
            "--methods", "all_foreground", "--segmenter-epochs", "0", "--device", "cpu",
            "--no-report", "--out", str(out), *extra]  # fmt: skip


def test_decompression_bomb_trimap_in_check_and_run(pets, tmp_path, capsys):
    """A trimap whose header claims 40000 x 40000: excluded with a reason, no traceback."""
    victim = _names(pets)[0]
    _png_header_only(_trimap(pets, victim), 40000, 40000)
    assert main(["datasets", "check", "--root", str(pets)]) == 0
    printed = capsys.readouterr().out
    assert f"- {victim} (annotations/trimaps/{victim}.png)" in printed
    assert "too large to decode safely" in printed
    assert main(_run_args(pets, tmp_path / "out")) == 0
    manifest = json.loads((tmp_path / "out" / "data" / "oxford_pet-manifest.json").read_text())
    reasons = {e["name"]: e["reason"] for e in manifest["excluded"]}
    assert "too large to decode safely" in reasons[victim]
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("list_name", ["list.txt", "trainval.txt", "test.txt"])
def test_byte_order_mark_in_a_list_file(list_name, pets):
    """A UTF-8 BOM (Windows editors) before the first name: no exclusion, no phantom name."""
    before = OxfordPet(pets).check()
    path = pets / "annotations" / list_name
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    path.write_bytes(b"\xef\xbb\xbf" + ("\n".join(lines) + "\n").encode())
    ds = OxfordPet(pets)
    assert ds.exclusions == [], ds.exclusions
    assert ds.check() == before  # same usable images, same official splits


def test_binary_config_file_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_bytes(bytes(range(256)) * 8)  # not UTF-8 (UnicodeDecodeError before)
    err = _one_line_error(
        capsys, ["run", "--preset", "tiny", "--out", str(tmp_path / "out"), "--config", str(config)]
    )
    assert "--config" in err and "not a UTF-8 text file" in err
    config.write_bytes(b"seeds: 1\n" + b"#" * (2 << 20))  # far too big for a run config
    err = _one_line_error(
        capsys, ["run", "--preset", "tiny", "--out", str(tmp_path / "out"), "--config", str(config)]
    )
    assert "--config" in err and "bytes, not a run config" in err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file, not a folder")
    for out in (taken, taken / "below"):
        err = _one_line_error(capsys, ["run", "--preset", "tiny", "--out", str(out)])
        assert err.startswith("error: --out:") and str(taken) in err
    assert taken.read_text() == "a file, not a folder"


@pytest.fixture(params=["read_only_mount", "no_write_permission"])
def unwritable(request, tmp_path) -> Path:
    """A folder this process cannot write: a read-only bind mount (root) or mode 0555 (others).

    Root ignores file modes, so as root the mount variant runs and the other is skipped; as
    another user, the other way round (unless mounting is allowed).
    """
    folder = tmp_path / "locked"
    folder.mkdir()
    if request.param == "no_write_permission":
        if os.geteuid() == 0:
            pytest.skip("root writes through file modes; the read-only mount covers it")
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    mount = shutil.which("mount")
    if os.geteuid() != 0 or not mount:
        pytest.skip("a read-only bind mount needs root and mount(8)")
    ran = subprocess.run([mount, "--bind", str(folder), str(folder)], capture_output=True)
    if ran.returncode != 0:
        pytest.skip(f"bind mount not permitted here: {ran.stderr.decode().strip()}")
    try:
        ro = subprocess.run(
            [mount, "-o", "remount,bind,ro", str(folder)], capture_output=True, check=False
        )
        if ro.returncode != 0:
            pytest.skip(f"read-only remount not permitted: {ro.stderr.decode().strip()}")
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_out_on_a_read_only_location_is_one_line(unwritable, finished_run, capsys):
    for out in (unwritable, unwritable / "new" / "out"):
        err = _one_line_error(capsys, ["run", "--preset", "tiny", "--out", str(out)])
        assert err.startswith(f"error: --out: cannot write to {out}"), err
    err = _one_line_error(
        capsys, ["report", "--out", str(finished_run), "--report-dir", str(unwritable)]
    )
    assert err.startswith("error: --report-dir: cannot write to"), err


@pytest.fixture(scope="module")
def finished_run(source, tmp_path_factory) -> Path:
    """The output folder of a finished fast run (real rows, curves and costs); never modified."""
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main(_run_args(source, out)) == 0
    return out


def test_report_on_a_full_disk_is_one_line(finished_run, tmp_path, capsys, monkeypatch):
    """Figures go through the atomic writer: disk full is one line, exit 1, no partial file."""
    from benchmark import faults

    out = Path(shutil.copytree(finished_run, tmp_path / "run"))
    faults.reset()
    monkeypatch.setenv(faults.ENV, "enospc@write:*/figures/*.png")
    code = main(["report", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("error: disk full") and "/figures/" in err
    assert not list((out / "report").rglob("*.tmp")) and not list((out / "report").rglob("*.png"))
    monkeypatch.delenv(faults.ENV)
    assert main(["report", "--out", str(out)]) == 0  # free space, run again: complete
    assert list((out / "report" / "figures").glob("*.png"))


def test_report_without_results_is_an_error(tmp_path, capsys):
    err = _one_line_error(capsys, ["report", "--out", str(tmp_path / "typo")])
    assert "--out" in err and "not a folder" in err
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, ["report", "--out", str(tmp_path / "empty")])
    assert "no results" in err
    assert not (tmp_path / "empty" / "report").exists()


@pytest.mark.parametrize(("action", "code", "text"), [
    ("term", 143, "interrupted by SIGTERM; completed stages are kept, re-run the same command"),
    ("int", 130, "interrupted (Ctrl-C); completed stages are kept, re-run the same command"),
])  # fmt: skip
def test_signal_is_one_line(action, code, text, pets, tmp_path, capsys, monkeypatch):
    """A real SIGTERM / SIGINT sent while the run writes its data manifest."""
    import signal

    from benchmark import faults

    before = signal.getsignal(signal.SIGTERM)
    faults.reset()
    monkeypatch.setenv(faults.ENV, f"{action}@write:*-manifest.json")
    assert main(_run_args(pets, tmp_path / "out")) == code
    err = capsys.readouterr().err.strip()
    assert err.splitlines()[-1].startswith(text) and "Traceback" not in err, err
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is put back
    assert not list((tmp_path / "out").rglob("*.tmp"))  # the write in flight was cleaned up
    monkeypatch.delenv(faults.ENV)
    assert main(_run_args(pets, tmp_path / "out")) == 0  # the same command resumes


def test_sigterm_exit_status_of_the_process(pets, tmp_path):
    """``python -m benchmark`` itself exits 143 with one line (a scheduler's cancel)."""
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WSSS_FAULT": "term@write:*-manifest.json", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "benchmark", *_run_args(pets, tmp_path / "out")],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 143, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM") and "Traceback" not in done.stderr
