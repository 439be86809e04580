"""The Oxford-IIIT Pet loader, trimap conventions, registry and exclusion reasons."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets
from datasets import (
    CONVENTIONS,
    DatasetError,
    create_dataset,
    get_dataset,
    list_datasets,
    trimap_to_mask,
)
from datasets.imaging import decode_image, to_rgb
from datasets.oxford_pet import OxfordPet

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford-pet-sample"
needs_sample = pytest.mark.skipif(
    not (SAMPLE / "images").is_dir(),
    reason=f"real Oxford-IIIT Pet sample not found at {SAMPLE} (expected beside the repo)",
)

# A few real images: 2 trainval + 2 test of two breeds, and the PNG-bytes image.
SUBSET = ["Abyssinian_101", "Abyssinian_20", "Abyssinian_5", "american_bulldog_11", "Bengal_194"]


def _lines(path: Path, names: set[str]) -> list[str]:
    return [
        line
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#") and line.split()[0] in names
    ]


def make_copy(dest: Path, names: list[str], *, header: bool = False) -> Path:
    """Copy some sample images, trimaps and list lines into ``dest`` (writable files)."""
    (dest / "images").mkdir(parents=True)
    (dest / "annotations" / "trimaps").mkdir(parents=True)
    for name in names:
        shutil.copyfile(SAMPLE / "images" / f"{name}.jpg", dest / "images" / f"{name}.jpg")
        shutil.copyfile(
            SAMPLE / "annotations" / "trimaps" / f"{name}.png",
            dest / "annotations" / "trimaps" / f"{name}.png",
        )
    wanted = set(names)
    for list_name in ("list.txt", "trainval.txt", "test.txt"):
        lines = _lines(SAMPLE / "annotations" / list_name, wanted)
        if header and list_name == "list.txt":
            lines = ["#Image CLASS-ID SPECIES BREED ID", "#ID: 1:37 Class ids", *lines]
        (dest / "annotations" / list_name).write_text("\n".join(lines) + "\n")
    return dest


def test_import_resolves_to_this_repository():
    # HuggingFace's library is also called `datasets`: ours must win in this environment.
    assert Path(datasets.__file__).resolve().is_relative_to(REPO)
    assert hasattr(datasets, "make_split") and hasattr(datasets, "build_cache")


# ---------------------------------------------------------------- conventions


TRIMAP = np.array([[1, 2, 3], [3, 2, 1]], dtype=np.uint8)


@pytest.mark.parametrize(
    ("convention", "expected"),
    [
        ("pet", [[1, 0, 255], [255, 0, 1]]),
        ("pet_with_border", [[1, 0, 1], [1, 0, 1]]),
        ("weaktr_refinery", [[0, 1, 1], [1, 1, 0]]),
    ],
)
def test_trimap_conventions(convention, expected):
    mask = trimap_to_mask(TRIMAP, convention)
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, np.array(expected, dtype=np.uint8))
    # Other integer dtypes give the same result.
    np.testing.assert_array_equal(trimap_to_mask(TRIMAP.astype(np.int64), convention), mask)


def test_conventions_list_and_unknown_convention():
    assert CONVENTIONS == ("pet", "pet_with_border", "weaktr_refinery")
    with pytest.raises(ValueError, match="pet_with_border"):
        trimap_to_mask(TRIMAP, "border_is_pet")


def test_default_convention_is_pet():
    np.testing.assert_array_equal(trimap_to_mask(TRIMAP), trimap_to_mask(TRIMAP, "pet"))


# ---------------------------------------------------------------- registry


def test_registry_names_aliases_and_errors():
    assert {"oxford_pet", "synthetic"} <= set(list_datasets())
    assert get_dataset("oxford-pet") is OxfordPet
    assert get_dataset("Oxford_Pet") is OxfordPet
    with pytest.raises(KeyError, match="oxford_pet.*synthetic"):
        get_dataset("imagenet")


# ---------------------------------------------------------------- real sample


@pytest.fixture(scope="module")
def sample() -> OxfordPet:
    if not (SAMPLE / "images").is_dir():
        pytest.skip(f"real Oxford-IIIT Pet sample not found at {SAMPLE} (expected beside the repo)")
    return create_dataset("oxford-pet", root=SAMPLE)


@needs_sample
def test_sample_check_numbers(sample):
    report = sample.check()
    json.dumps(report)  # JSON-able
    assert report["dataset"] == "oxford_pet"
    assert report["image_files"] == 121
    assert report["usable"] == 120 == len(sample)
    assert report["num_classes"] == 3 == sample.num_classes
    assert sorted(report["classes"]) == sorted(["Abyssinian", "Bengal", "american_bulldog"])
    assert report["splits"] == {"trainval": 60, "test": 60}
    assert [e["name"] for e in report["excluded"]] == ["Abyssinian_34"]
    reason = report["excluded"][0]["reason"]
    for part in ("not in annotations/list.txt", "GIF bytes under a .jpg name", "all background"):
        assert part in reason
    assert report["excluded"][0]["file"] == "images/Abyssinian_34.jpg"


@needs_sample
def test_sample_records_and_labels(sample):
    names = [r.name for r in sample.records]
    assert names == sorted(names) and "Abyssinian_34" not in names
    labels = np.array([r.label for r in sample.records])
    assert labels.min() == 0 and labels.max() == sample.num_classes - 1
    assert np.bincount(labels).tolist() == [40, 40, 40]  # compacted: every label used
    bengal = sample.record("Bengal_194")
    assert sample.class_names[bengal.label] == "Bengal"
    assert sample.label_ids[bengal.label] == bengal.breed + 1 == 6  # release class id of Bengal
    assert bengal.species == 0 and sample.record("american_bulldog_11").species == 1
    assert sample.record("Abyssinian_101").official_split == "trainval"
    assert sample.record("Abyssinian_20").official_split == "test"
    with pytest.raises(KeyError, match="all background"):
        sample.record("Abyssinian_34")


@needs_sample
def test_sample_broken_files_decode_by_content(sample):
    record = sample.record("Abyssinian_5")  # PNG RGBA bytes under .jpg
    image = sample.load_image(record)
    assert image.shape == (*sample.image_size(record), 3) and image.dtype == np.uint8
    with Image.open(record.image_path) as raw:
        assert raw.format == "PNG" and raw.mode == "RGBA"
        np.testing.assert_array_equal(image, np.asarray(raw.convert("RGB")))  # alpha is 255
    assert sample.load_trimap(record).shape == image.shape[:2]
    gif = decode_image(SAMPLE / "images" / "Abyssinian_34.jpg")  # GIF bytes: still decodable
    assert gif.ndim == 3 and gif.shape[2] == 3


@needs_sample
def test_sample_head_boxes(sample):
    record = sample.record("Abyssinian_101")
    assert sample.head_box(record) == (54, 36, 319, 235)
    assert sample.head_box(sample.record("Abyssinian_20")) is None  # test images have no box


@needs_sample
def test_species_labels_and_fingerprint(sample):
    species = create_dataset("oxford_pet", root=SAMPLE, label="species")
    assert species.class_names == ["cat", "dog"] and species.num_classes == 2
    assert species.record("american_bulldog_11").label == 1
    again = OxfordPet(SAMPLE)
    assert again.fingerprint() == sample.fingerprint()
    assert species.fingerprint() != sample.fingerprint()
    with pytest.raises(ValueError, match="breed, species"):
        OxfordPet(SAMPLE, label="colour")


@needs_sample
@pytest.mark.parametrize("header", [False, True])
def test_list_with_and_without_header_lines(tmp_path, header):
    root = make_copy(tmp_path / "pets", SUBSET, header=header)
    ds = OxfordPet(root)
    assert [r.name for r in ds.records] == sorted(SUBSET)
    assert ds.exclusions == []
    assert ds.num_classes == 3 and ds.check()["splits"] == {"trainval": 2, "test": 3}


@needs_sample
def test_fingerprint_changes_with_file_content(tmp_path):
    root = make_copy(tmp_path / "pets", SUBSET)
    before = OxfordPet(root).fingerprint()
    trimap_path = root / "annotations" / "trimaps" / "Bengal_194.png"
    trimap = np.asarray(Image.open(trimap_path)).copy()
    trimap[0, 0] = 1 if trimap[0, 0] != 1 else 2
    Image.fromarray(trimap).save(trimap_path)
    assert OxfordPet(root).fingerprint() != before


def test_missing_root_gives_one_clear_error(tmp_path):
    with pytest.raises(DatasetError) as info:
        OxfordPet(tmp_path / "nowhere")
    message = str(info.value)
    for part in (
        "does not exist",
        "images/",
        "annotations/trimaps/",
        "annotations/list.txt",
        "trainval.txt",
        "https://www.robots.ox.ac.uk/~vgg/data/pets/",
    ):
        assert part in message


def test_mislaid_root_names_what_is_missing_and_hints(tmp_path):
    inner = tmp_path / "oxford-iiit-pet"
    (inner / "images").mkdir(parents=True)
    (inner / "annotations" / "trimaps").mkdir(parents=True)
    (inner / "annotations" / "list.txt").write_text("")
    with pytest.raises(DatasetError, match="missing images/") as info:
        OxfordPet(tmp_path)
    assert f"pass root={inner}" in str(info.value)


def test_to_rgb_modes():
    rgba = Image.fromarray(np.array([[[0, 0, 0, 0], [10, 20, 30, 255]]], dtype=np.uint8), "RGBA")
    np.testing.assert_array_equal(to_rgb(rgba), [[[255, 255, 255], [10, 20, 30]]])  # on white
    grey16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    np.testing.assert_array_equal(to_rgb(grey16)[..., 0], [[0, 255]])
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    np.testing.assert_array_equal(to_rgb(cmyk), np.full((2, 2, 3), 255))
    la = Image.fromarray(np.array([[[100, 255], [0, 0]]], dtype=np.uint8), "LA")
    np.testing.assert_array_equal(to_rgb(la), [[[100] * 3, [255] * 3]])


@needs_sample
def test_bad_files_are_excluded_with_reasons(tmp_path):
    root = make_copy(tmp_path / "pets", SUBSET + ["Abyssinian_104", "Abyssinian_11"])
    images, trimaps = root / "images", root / "annotations" / "trimaps"
    listed = (root / "annotations" / "list.txt").read_text()

    def add(name: str, line: str) -> None:
        nonlocal listed
        listed += line + "\n"
        shutil.copyfile(SAMPLE / "images" / "Bengal_194.jpg", images / f"{name}.jpg")
        shutil.copyfile(SAMPLE / "annotations/trimaps/Bengal_194.png", trimaps / f"{name}.png")

    (images / "Abyssinian_104.jpg").write_bytes(b"")  # zero-byte image
    data = (images / "Abyssinian_11.jpg").read_bytes()
    (images / "Abyssinian_11.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    add("Bengal_size", "Bengal_size 6 1 6")
    Image.new("L", (7, 5), 1).save(trimaps / "Bengal_size.png")  # trimap size mismatch
    add("Bengal_values", "Bengal_values 6 1 6")
    bad = np.asarray(Image.open(trimaps / "Bengal_values.png")).copy()
    bad[:4, :4] = 7
    Image.fromarray(bad).save(trimaps / "Bengal_values.png")  # values outside {1,2,3}
    add("Bengal_notrimap", "Bengal_notrimap 6 1 6")
    (trimaps / "Bengal_notrimap.png").unlink()  # missing trimap
    add("Bengal_text", "Bengal_text 6 1 6")
    (images / "Bengal_text.jpg").write_text("this is not an image")  # non-image bytes
    add("Bengal_unlisted", "")  # image not in list.txt
    listed = listed.rstrip("\n") + "\n"
    add("Bengal_cols", "Bengal_cols 6 1")  # wrong column count
    add("Bengal_classid", "Bengal_classid 40 1 6")  # unknown class id
    listed += "Bengal_ghost 6 1 6\n"  # listed, but no image file
    (images / "notes.txt").write_text("stray file")
    (root / "annotations" / "list.txt").write_text(listed)

    ds = OxfordPet(root)  # must not raise
    reasons = {e.name: e.reason for e in ds.exclusions}
    expected = {
        "Abyssinian_104": "zero-byte image file",
        "Abyssinian_11": "truncated image data",
        "Bengal_size": "trimap size 7x5 != image size",
        "Bengal_values": "trimap values outside {1, 2, 3}: 7",
        "Bengal_notrimap": "missing trimap annotations/trimaps/Bengal_notrimap.png",
        "Bengal_text": "not a decodable image",
        "Bengal_unlisted": "not in annotations/list.txt",
        "Bengal_cols": "expected 4 columns",
        "Bengal_classid": "unknown class id 40",
        "Bengal_ghost": "images/Bengal_ghost.jpg is missing",
        "notes": "unexpected file type .txt",
    }
    for name, fragment in expected.items():
        assert fragment in reasons.get(name, ""), (name, reasons.get(name))
    assert sorted(r.name for r in ds.records) == sorted(SUBSET)
    report = ds.check()
    assert report["usable"] == len(SUBSET)
    assert report["image_files"] == len(SUBSET) + 2 + 7 + 1
    assert {e["name"] for e in report["excluded"]} == set(expected)


@needs_sample
def test_header_only_verification_defers_truncation(tmp_path):
    root = make_copy(tmp_path / "pets", SUBSET)
    data = (root / "images" / "Bengal_194.jpg").read_bytes()
    (root / "images" / "Bengal_194.jpg").write_bytes(data[: len(data) // 2])
    assert "Bengal_194" not in [r.name for r in OxfordPet(root).records]
    lazy = OxfordPet(root, verify="header")
    record = lazy.record("Bengal_194")
    with pytest.raises(DatasetError, match="Bengal_194.jpg: cannot decode image"):
        lazy.load_image(record)


def test_no_usable_image_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations" / "trimaps").mkdir(parents=True)
    (tmp_path / "annotations" / "list.txt").write_text("cat_1 1 1 1\n")
    (tmp_path / "images" / "cat_1.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="(?s)no usable image.*zero-byte"):
        OxfordPet(tmp_path)
