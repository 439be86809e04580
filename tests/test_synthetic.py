"""The synthetic generator: determinism, layout, trimap band, class mark, difficulty."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from datasets import DatasetError, OxfordPet, SyntheticPets, create_dataset, generate_synthetic
from datasets.synthetic import (
    MARKER,
    PART_COLOURS,
    SYNTHETIC_PRESETS,
    class_part,
    render_example,
    save_examples_figure,
    synthetic_stats,
)

SMALL = dict(n_images=12, size=48, n_classes=3, seed=5)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_byte_identical_files(tmp_path):
    a = _tree_hashes(generate_synthetic(tmp_path / "a", **SMALL))
    b = _tree_hashes(generate_synthetic(tmp_path / "b", **SMALL))
    n_trainval = 6  # round(0.6 * 4) per class, 3 classes: their head-box XMLs
    assert len(a) == 2 * SMALL["n_images"] + n_trainval + 4  # + 3 lists, marker
    assert sum(k.startswith("annotations/xmls/") for k in a) == n_trainval
    assert a == b
    c = _tree_hashes(generate_synthetic(tmp_path / "c", **{**SMALL, "seed": 6}))
    differing = [k for k in a if k.startswith("images/") and a[k] != c.get(k)]
    assert len(differing) == SMALL["n_images"]


def test_layout_is_read_by_the_oxford_pet_loader(tmp_path):
    root = generate_synthetic(tmp_path / "s", **SMALL)
    list_txt = (root / "annotations" / "list.txt").read_text().splitlines()
    assert list_txt[0].startswith("#") and sum(line.startswith("#") for line in list_txt) == 6
    ds = OxfordPet(root)
    report = ds.check()
    assert report["image_files"] == report["usable"] == SMALL["n_images"]
    assert report["excluded"] == []
    assert report["classes"] == ["synth_a", "synth_b", "synth_c"]
    assert report["splits"] == {"trainval": 6, "test": 6}  # round(0.6 * 4) = 2 per class
    species = {r.name.rsplit("_", 1)[0]: r.species for r in ds.records}
    assert species == {"synth_a": 0, "synth_b": 1, "synth_c": 0}  # alternates
    assert json.loads((root / MARKER).read_text())["params"]["seed"] == SMALL["seed"]


def test_synthetic_dataset_class_uses_the_same_loader(tmp_path, monkeypatch):
    monkeypatch.setenv("WSSS_BENCH_DATA", str(tmp_path))
    ds = create_dataset("synthetic", preset="tiny", seed=1, n_images=9)
    assert isinstance(ds, SyntheticPets) and isinstance(ds, OxfordPet)
    assert ds.root.parent == tmp_path / "synthetic" and ds.root.name.startswith("tiny-")
    assert len(ds) == 9 and ds.num_classes == SYNTHETIC_PRESETS["tiny"]["n_classes"]
    assert ds.params["n_images"] == 9 and ds.params["seed"] == 1
    json.dumps(ds.params)
    again = SyntheticPets(preset="tiny", seed=1, n_images=9)  # reuses the folder
    assert again.root == ds.root and again.fingerprint() == ds.fingerprint()
    with pytest.raises(ValueError, match="unknown preset"):
        SyntheticPets(preset="huge")
    with pytest.raises(ValueError, match="colour"):
        SyntheticPets(preset="tiny", colour="red")


def test_generation_is_atomic_and_refuses_foreign_folders(tmp_path):
    root = generate_synthetic(tmp_path / "s", **SMALL)
    mtime = (root / MARKER).stat().st_mtime_ns
    assert generate_synthetic(root, **SMALL) == root  # complete: nothing rewritten
    assert (root / MARKER).stat().st_mtime_ns == mtime
    with pytest.raises(DatasetError, match="other parameters"):
        generate_synthetic(root, **{**SMALL, "seed": 9})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(DatasetError, match="without a completion marker"):
        generate_synthetic(foreign, **SMALL)
    assert (foreign / "keep.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no leftovers


def test_trimap_has_a_thin_border_band():
    for index in range(6):
        s = render_example(index, size=128, n_classes=4, seed=0)
        t = s.trimap
        assert set(np.unique(t)) == {1, 2, 3}
        band = t == 3
        # The band separates pet from background: no pet pixel touches a background pixel.
        touching = ndimage.binary_dilation(t == 1) & (t == 2)
        assert not touching.any()
        # It is thin (about 2 px): a 3x3 erosion removes (almost) all of it.
        survivors = ndimage.binary_erosion(band, np.ones((3, 3)))
        assert survivors.sum() <= 0.05 * band.sum()
        # It lies along the pet outline.
        assert (band <= ndimage.binary_dilation(s.pet_mask)).all()


def test_class_mark_present_small_and_in_the_jpeg(tmp_path):
    root = generate_synthetic(tmp_path / "s", n_images=8, size=96, n_classes=4, seed=3)
    ds = OxfordPet(root)
    for index in range(8):
        s = render_example(index, size=96, n_classes=4, seed=3)
        assert s.part_mask.any() and not (s.part_mask & ~s.pet_mask).any()
        assert 0.03 <= s.part_mask.sum() / s.pet_mask.sum() <= 0.25
        # The written JPEG shows the class colour where the mark is.
        name = f"synth_{'abcd'[s.label]}_{index // 4 + 1}"
        jpeg = ds.load_image(ds.record(name)).astype(float)
        np.testing.assert_array_equal(ds.load_trimap(ds.record(name)), s.trimap)
        core = ndimage.binary_erosion(s.part_mask)
        seen = jpeg[core if core.any() else s.part_mask].mean(axis=0)
        nearest = min(PART_COLOURS, key=lambda c: np.linalg.norm(seen - PART_COLOURS[c]))
        assert nearest == class_part(s.label)[1]
        assert np.linalg.norm(seen - PART_COLOURS[nearest]) < 80


def test_only_the_mark_decides_the_class():
    # Nearest-centroid on the body colour is near chance; on the mark colour it is perfect.
    n, k = 60, 3
    samples = [render_example(i, size=64, n_classes=k, seed=11) for i in range(n)]
    labels = np.array([s.label for s in samples])
    body = np.array([s.image[s.pet_mask & ~s.part_mask].mean(axis=0) for s in samples])
    mark = np.array([s.image[s.part_mask].mean(axis=0) for s in samples])

    def loo_accuracy(features: np.ndarray) -> float:
        hits = 0
        for i in range(n):
            rest = np.arange(n) != i
            centroids = [features[rest & (labels == c)].mean(axis=0) for c in range(k)]
            hits += int(
                np.argmin([np.linalg.norm(features[i] - c) for c in centroids]) == labels[i]
            )
        return hits / n

    assert loo_accuracy(mark) == 1.0
    assert loo_accuracy(body) < 0.6  # chance is 1/3


def test_pets_vary_in_size_position_and_image_shape():
    stats = synthetic_stats(40, size=64, n_classes=3, seed=0)
    assert 0.12 <= stats["pet_fraction_mean"] <= 0.4
    assert stats["pet_fraction_min"] < 0.15 and stats["pet_fraction_max"] > 0.3
    assert stats["off_centre_rate"] > 0.15
    assert 0.2 < stats["non_square_rate"] < 0.8
    assert 0.06 <= stats["part_fraction_mean"] <= 0.16
    assert stats["centre_prior_iou"] < 0.4


def test_examples_figure(tmp_path):
    path = save_examples_figure(tmp_path / "fig" / "examples.png", n=2, size=48)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 100
