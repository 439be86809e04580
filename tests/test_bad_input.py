"""Bad input (issue 9): broken dataset files and invalid options or config files.

Dataset cases start from a small generated synthetic dataset (Oxford-IIIT Pet layout), copied
into ``tmp_path`` and broken one way at a time: every bad file is excluded with a reason (in
``dataset.exclusions``, ``datasets check`` and the run's data manifest), the rest stays usable,
and nothing raises from inside PIL or torch. CLI and YAML cases: one line naming the option, exit
code 2, before any work starts.
"""

from __future__ import annotations

import json
import shutil
import struct
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
    ],
)
def test_bad_option_is_one_line_exit_2(args, needles, capsys, tmp_path):
    err = _one_line_error(capsys, ["run", "--out", str(tmp_path / "out"), *args])
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
    ],
)
def test_bad_yaml_is_one_line_exit_2(text, needles, capsys, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    err = _one_line_error(capsys, ["run", "--out", str(tmp_path / "out"), "--config", str(config)])
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "out").exists()
