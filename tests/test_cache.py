"""The image cache: values, keys, reuse, rebuilds, atomic marker, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets import CONVENTIONS, DatasetError, ImageCache, OxfordPet, build_cache, trimap_to_mask
from datasets.cache import MANIFEST, read_epoch_cache, read_epoch_pil
from datasets.synthetic import generate_synthetic

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford-pet-sample"


@pytest.fixture()
def small_copy(tmp_path) -> Path:
    return generate_synthetic(tmp_path / "data", n_images=8, size=40, n_classes=2, seed=2)


def test_values_equal_pil_resize(tiny_dataset, tmp_path):
    names = [r.name for r in tiny_dataset.records[:6]][::-1]  # any order is kept
    cache = build_cache(tiny_dataset, names, 32, tmp_path)
    assert cache.names == tuple(names) and len(cache) == 6
    assert cache.images.shape == (6, 32, 32, 3) and cache.images.dtype == np.uint8
    assert isinstance(cache.images, np.memmap)
    for i, name in enumerate(names):
        record = tiny_dataset.record(name)
        rgb, trimap = tiny_dataset.load_image(record), tiny_dataset.load_trimap(record)
        expected = Image.fromarray(rgb).resize((32, 32), Image.Resampling.BILINEAR)
        np.testing.assert_array_equal(cache.images[i], np.asarray(expected))
        nearest = Image.fromarray(trimap).resize((32, 32), Image.Resampling.NEAREST)
        np.testing.assert_array_equal(cache.trimaps[i], np.asarray(nearest))
        np.testing.assert_array_equal(cache.orig_trimap(i), trimap)
        assert tuple(cache.orig_sizes[i]) == trimap.shape
        assert cache.labels[i] == record.label and cache.index(name) == i
    np.testing.assert_array_equal(read_epoch_pil(tiny_dataset, names, 32), cache.images)
    assert read_epoch_cache(cache) == float(np.asarray(cache.images, dtype=np.uint64).sum())
    with pytest.raises(KeyError, match="not requested"):
        cache.index("synth_z_1")


def test_real_sample_images(tmp_path):
    if not (SAMPLE / "images").is_dir():
        pytest.skip(f"real Oxford-IIIT Pet sample not found at {SAMPLE} (expected beside the repo)")
    ds = OxfordPet(SAMPLE)
    names = ["Abyssinian_5", "Bengal_194"]  # PNG RGBA bytes under .jpg, and a plain JPEG
    cache = build_cache(ds, names, 48, tmp_path)
    for i, name in enumerate(names):
        rgb = ds.load_image(ds.record(name))
        np.testing.assert_array_equal(
            cache.images[i], np.asarray(Image.fromarray(rgb).resize((48, 48), Image.BILINEAR))
        )
        assert tuple(cache.orig_sizes[i]) == rgb.shape[:2]


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_masks_by_convention(tiny_cache, convention):
    masks = tiny_cache.masks(convention)
    assert masks.shape == tiny_cache.trimaps.shape and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks, trimap_to_mask(np.asarray(tiny_cache.trimaps), convention))
    assert tiny_cache.masks(convention) is masks  # computed once
    np.testing.assert_array_equal(
        tiny_cache.orig_mask(0, convention), trimap_to_mask(tiny_cache.orig_trimap(0), convention)
    )
    assert set(np.unique(masks)) <= {0, 1, 255}


def test_reuse_and_key_changes(small_copy, tmp_path):
    ds = OxfordPet(small_copy)
    names = [r.name for r in ds.records]
    root = tmp_path / "cache"
    first = build_cache(ds, names, 24, root)
    stamp = (first.folder / MANIFEST).stat().st_mtime_ns
    again = build_cache(OxfordPet(small_copy), names, 24, root)
    assert again.folder == first.folder
    assert (again.folder / MANIFEST).stat().st_mtime_ns == stamp  # not rebuilt
    assert build_cache(ds, names, 16, root).folder != first.folder  # size
    assert build_cache(ds, names[::-1], 24, root).folder != first.folder  # order
    assert build_cache(ds, names[:-1], 24, root).folder != first.folder  # names
    species = OxfordPet(small_copy, label="species")
    assert build_cache(species, names, 24, root).folder != first.folder  # labels


def test_rebuild_when_a_file_changes(small_copy, tmp_path):
    ds = OxfordPet(small_copy)
    names = [r.name for r in ds.records]
    old = build_cache(ds, names, 24, tmp_path / "cache")
    record = ds.records[0]
    image = np.asarray(Image.open(record.image_path)).copy()
    image[:4, :4] = 255 - image[:4, :4]
    Image.fromarray(image).save(record.image_path, quality=95)
    changed = OxfordPet(small_copy)
    new = build_cache(changed, names, 24, tmp_path / "cache")
    assert new.folder != old.folder
    expected = Image.fromarray(changed.load_image(record)).resize((24, 24), Image.BILINEAR)
    np.testing.assert_array_equal(new.images[0], np.asarray(expected))


def test_folder_without_marker_is_rebuilt(small_copy, tmp_path):
    ds = OxfordPet(small_copy)
    names = [r.name for r in ds.records]
    cache = build_cache(ds, names, 24, tmp_path)
    folder = cache.folder
    expected = np.array(cache.images)
    del cache
    (folder / MANIFEST).unlink()  # as if the build had been interrupted
    (folder / "images.npy").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="not a complete image cache"):
        ImageCache.open(folder)
    rebuilt = build_cache(ds, names, 24, tmp_path)
    assert rebuilt.folder == folder
    np.testing.assert_array_equal(rebuilt.images, expected)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["count"] == len(names) and manifest["size"] == 24
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_undecodable_image_is_left_out_not_crashing(small_copy, tmp_path):
    ds = OxfordPet(small_copy, verify="header")
    names = [r.name for r in ds.records]
    bad = ds.records[1]
    data = bad.image_path.read_bytes()
    bad.image_path.write_bytes(data[: len(data) // 2])  # truncated after validation
    cache = build_cache(ds, names, 24, tmp_path)
    assert len(cache) == len(names) - 1 and bad.name not in cache.names
    assert cache.excluded[0]["name"] == bad.name and "cannot decode" in cache.excluded[0]["reason"]
    with pytest.raises(KeyError, match="left out at build"):
        cache.index(bad.name)
    for i, name in enumerate(cache.names):  # every remaining row is consistent
        record = ds.record(name)
        np.testing.assert_array_equal(cache.orig_trimap(i), ds.load_trimap(record))
        assert cache.labels[i] == record.label
        expected = Image.fromarray(ds.load_image(record)).resize((24, 24), Image.BILINEAR)
        np.testing.assert_array_equal(cache.images[i], np.asarray(expected))


def test_bad_arguments(tiny_dataset, tmp_path):
    names = [r.name for r in tiny_dataset.records[:2]]
    with pytest.raises(ValueError, match="duplicate"):
        build_cache(tiny_dataset, names + names[:1], 16, tmp_path)
    with pytest.raises(KeyError, match="no usable image"):
        build_cache(tiny_dataset, ["nope_1"], 16, tmp_path)
