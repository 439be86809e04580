"""PASCAL VOC 2012 loader, the VOC fixture writer and the synthetic multi-object VOC set."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import datasets
from datasets import DatasetError, Split, create_dataset, get_dataset, list_datasets
from datasets.synthetic_voc import MARKER, SyntheticVOC, generate_synthetic_voc, render_voc_example
from datasets.voc import VOC2012
from datasets.voc_fixture import boundary_band, write_voc_fixture
from datasets.voc_format import (
    VOC_CLASSES,
    load_cls_labels,
    mask_classes,
    read_mask,
    voc_colormap,
)


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return write_voc_fixture(tmp_path_factory.mktemp("voc"))


@pytest.fixture(scope="module")
def voc(fixture):
    return VOC2012(fixture.devkit)


def _expected(fixture, names):
    out = np.zeros((len(names), len(VOC_CLASSES)), np.uint8)
    for i, name in enumerate(names):
        out[i, list(fixture.tags[name])] = 1
    return out


def _copy(fixture, tmp_path) -> Path:
    shutil.copytree(fixture.devkit, tmp_path / "VOCdevkit")
    return tmp_path / "VOCdevkit"


# ---------------------------------------------------------------- loader on the fixture


def test_registry_knows_the_voc_datasets():
    assert {"voc2012", "synthetic_voc"} <= set(list_datasets())
    assert get_dataset("VOC2012") is VOC2012
    assert get_dataset("synthetic-voc") is SyntheticVOC


def test_counts_per_list_and_root_forms(fixture, voc):
    assert {k: len(v) for k, v in voc.lists.items()} == {"train_aug": 9, "train": 4, "val": 3}
    assert voc.listed == {"train_aug": 9, "train": 4, "val": 3}
    assert len(voc) == 12 and not voc.exclusions
    assert voc.lists["train"] == tuple(fixture.lists["train"])
    for root in (fixture.voc_root, fixture.devkit.parent):  # VOC2012/ itself, or above VOCdevkit
        assert VOC2012(root).root == fixture.voc_root
    info = voc.check()
    assert info["splits"] == {"train_aug": 9, "train": 4, "val": 3}
    assert info["classes"] == list(VOC_CLASSES) and info["num_classes"] == 20
    assert info["lists"]["train_aug"]["file"] == "ImageSets/Segmentation/train_aug.txt"
    assert "labels from  cls_labels" in voc.summary()


def test_three_label_sources_agree_and_the_source_is_said(fixture, caplog):
    names = [n for names in fixture.lists.values() for n in names]
    names = sorted(set(names))
    expected = _expected(fixture, names)
    for source in ("xml", "masks", "cls_labels"):
        with caplog.at_level(logging.INFO, logger="datasets.voc"):
            ds = VOC2012(fixture.devkit, labels=source)
        assert ds.label_source == source
        assert f"labels from {source}" in caplog.text
        np.testing.assert_array_equal(ds.label_matrix(names), expected)
        assert ds.label_matrix(names).shape == (12, 20)
        assert ds.check()["disagreements"] == []
    assert VOC2012(fixture.devkit).label_source == "cls_labels"  # auto: the file exists


def test_auto_without_cls_labels_uses_xml_and_irnet_keys_decode(tmp_path):
    plain = write_voc_fixture(tmp_path / "a", cls_labels=None)
    assert VOC2012(plain.devkit).label_source == "xml"
    irnet = write_voc_fixture(tmp_path / "b", cls_labels="irnet")
    ds = VOC2012(irnet.devkit, labels="cls_labels")
    names = [r.name for r in ds.records]
    np.testing.assert_array_equal(ds.label_matrix(names), _expected(irnet, names))


def test_difficult_objects_count_as_tags(fixture, voc):
    text = (fixture.voc_root / "Annotations" / "2007_000002.xml").read_text()
    assert "<difficult>1</difficult>" in text  # the fixture's second object is difficult
    assert len(VOC2012(fixture.devkit, labels="xml").record("2007_000002").labels) == 2


def test_disagreeing_mask_and_tags_are_reported(tmp_path):
    fx = write_voc_fixture(tmp_path, disagree=True)
    name = fx.disagreeing[0]
    ds = VOC2012(fx.devkit, labels="xml")
    found = ds.check()["disagreements"]
    assert [d["name"] for d in found] == [name]
    assert set(found[0]["xml"]) - set(found[0]["mask"])  # the XML names a class the mask lacks
    assert found[0]["cls_labels"] == found[0]["xml"]
    assert len(VOC2012(fx.devkit, labels="masks").record(name).labels) < len(ds.record(name).labels)
    assert "disagreements (mask / xml / cls_labels): 1" in ds.summary()


def test_palette_masks_keep_indices_and_the_255_band(fixture, voc):
    record = voc.record(fixture.lists["train"][2])  # three objects
    path = record.mask_path
    with Image.open(path) as image:
        assert image.mode == "P"
        palette = np.array(image.getpalette()[: 3 * 256]).reshape(-1, 3)
    np.testing.assert_array_equal(palette, voc_colormap())
    mask = voc.load_mask(record)
    assert (mask == 255).any()
    assert set(np.unique(mask)) <= {0, 255, *(k + 1 for k in record.labels)}
    assert mask_classes(mask) == record.labels
    # An RGB copy (colours of the colour map) decodes to the same indices.
    rgb = voc_colormap()[mask]
    Image.fromarray(rgb).save(path.parent / "rgb_copy.png")
    try:
        np.testing.assert_array_equal(read_mask(path.parent / "rgb_copy.png"), mask)
    finally:
        (path.parent / "rgb_copy.png").unlink()
    np.testing.assert_array_equal(
        voc.load_mask(voc.record("2007_000008")), voc.load_trimap(voc.record("2007_000008"))
    )


def test_missing_and_corrupt_files_are_excluded_with_the_file_named(fixture, tmp_path):
    devkit = _copy(fixture, tmp_path)
    voc = devkit / "VOC2012"
    val_name, train_name, aug_name = (
        fixture.lists["val"][0],
        fixture.lists["train"][1],
        "2007_000010",
    )
    (voc / "JPEGImages" / f"{val_name}.jpg").unlink()
    mask = voc / "SegmentationClass" / f"{train_name}.png"
    mask.write_bytes(mask.read_bytes()[:60])
    (voc / "Annotations" / f"{aug_name}.xml").write_text("<annotation><object>")
    (voc / "Annotations" / "2007_000011.xml").unlink()
    ds = VOC2012(devkit, labels="xml")
    excluded = {e.name: e for e in ds.exclusions}
    assert set(excluded) == {val_name, train_name, aug_name, "2007_000011"}
    assert excluded[val_name].file == f"JPEGImages/{val_name}.jpg"
    assert "is missing" in excluded[val_name].reason
    assert excluded[train_name].file == f"SegmentationClass/{train_name}.png"
    assert f"SegmentationClass/{train_name}.png" in excluded[train_name].reason
    assert excluded[aug_name].file == f"Annotations/{aug_name}.xml"
    assert "not well-formed" in excluded[aug_name].reason
    missing = ds.check()["missing"]
    assert missing == {"images": [val_name], "masks": [], "xmls": ["2007_000011"]}
    assert len(ds.lists["val"]) == 2
    # With cls_labels as the source the XMLs are not needed: reported, not excluded.
    ds = VOC2012(devkit, labels="cls_labels")
    assert {e.name for e in ds.exclusions} == {val_name, train_name}
    assert [p["file"] for p in ds.check()["problems"]] == [f"Annotations/{aug_name}.xml"]


def test_missing_gt_mask_of_a_train_image_is_excluded(fixture, tmp_path):
    devkit = _copy(fixture, tmp_path)
    name = fixture.lists["train"][0]
    (devkit / "VOC2012" / "SegmentationClass" / f"{name}.png").unlink()
    ds = VOC2012(devkit, labels="xml")
    assert [e.name for e in ds.exclusions] == [name]
    assert "GT mask SegmentationClass" in ds.exclusions[0].reason
    assert ds.check()["missing"]["masks"] == [name]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (np.zeros((3, 20), np.float32), "not a pickled dict"),
        (["2007_000001"], "not a dict"),
        ({"2007_000001": np.zeros(5, np.float32)}, r"\(5,\).*\(20,\) multi-hot"),
        ({"2007_000001": np.full(20, 0.5, np.float32)}, "other than 0 and 1"),
        ({3.5: np.zeros(20, np.float32)}, "neither an image name"),
        ({"2007_000001": "aeroplane"}, "multi-hot"),
    ],
)
def test_cls_labels_of_the_wrong_type_is_a_clear_error(fixture, tmp_path, content, needle):
    devkit = _copy(fixture, tmp_path)
    path = devkit / "VOC2012" / "cls_labels.npy"
    np.save(path, np.array(content, dtype=object) if isinstance(content, list) else content)
    with pytest.raises(DatasetError, match=needle) as error:
        VOC2012(devkit, labels="cls_labels")
    assert "cls_labels.npy" in str(error.value)
    assert VOC2012(devkit, labels="xml").label_source == "xml"  # not the source: only a warning


class _Payload:
    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.mkdir, (self.sentinel,))


def test_malicious_cls_labels_is_refused_not_executed(tmp_path):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "cls_labels.npy"
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(
            handle, {"descr": "|O", "fortran_order": False, "shape": ()}
        )
        pickle.dump({"2007_000001": _Payload(sentinel)}, handle)
    with pytest.raises(DatasetError, match="refused global"):
        load_cls_labels(path)
    assert not sentinel.exists()


def test_mislaid_root_is_one_error_naming_the_layout(tmp_path, fixture):
    with pytest.raises(DatasetError, match="Expected layout") as error:
        VOC2012(tmp_path / "nowhere")
    assert "JPEGImages" in str(error.value)
    deep = tmp_path / "data" / "extracted"
    deep.mkdir(parents=True)
    shutil.copytree(fixture.devkit, deep / "x" / "VOCdevkit")
    with pytest.raises(DatasetError, match="Hint: .*VOC2012"):
        VOC2012(tmp_path / "data")


def test_val_images_in_train_aug_are_dropped(fixture, tmp_path):
    devkit = _copy(fixture, tmp_path)
    lists = devkit / "VOC2012" / "ImageSets" / "Segmentation"
    leaked = fixture.lists["val"][0]
    with open(lists / "train_aug.txt", "a") as handle:
        handle.write(f"{leaked}\n")
    ds = VOC2012(devkit)
    assert leaked not in ds.lists["train_aug"]
    assert ds.check()["train_aug_val_overlap"] == [leaked]


def test_protocol_split(voc, fixture, tmp_path):
    split = voc.make_split(val_fraction=0.25, seed=3)
    assert isinstance(split, Split) and split.dataset == "voc2012"
    assert split.counts() == {"train": 8, "val": 1, "test": 3}
    assert set(split.val) <= set(fixture.lists["train"])
    assert split.test == tuple(fixture.lists["val"])
    assert not set(split.train) & set(split.val) and not set(split.train) & set(split.test)
    assert set(split.train) | set(split.val) == set(fixture.lists["train_aug"])
    parts = voc.protocol_parts(split)
    assert set(parts["pseudo_mask_score"]) == set(fixture.lists["train"]) - set(split.val)
    assert parts["classifier_train"] == split.train and parts["segmenter_test"] == split.test
    assert voc.make_split(val_fraction=0.25, seed=3).sha256 == split.sha256
    assert Split.load(split.save(tmp_path / "s.json")) == split
    with pytest.raises(ValueError, match="valid: official"):
        voc.make_split("weaktr_refinery")


def test_fingerprint_follows_files_and_label_source(fixture, tmp_path):
    devkit = _copy(fixture, tmp_path)
    before = VOC2012(devkit).fingerprint()
    assert VOC2012(devkit).fingerprint() == before
    assert VOC2012(devkit, labels="xml").fingerprint() != before
    mask = devkit / "VOC2012" / "SegmentationClass" / f"{fixture.lists['val'][0]}.png"
    values = read_mask(mask)
    values[0, 0] = 255 if values[0, 0] != 255 else 0
    Image.fromarray(values).save(mask)
    assert VOC2012(devkit).fingerprint() != before


def test_image_cache_holds_class_masks_and_multi_hot_labels(voc, tmp_path):
    names = [r.name for r in voc.records]
    cache = datasets.build_cache(voc, names, 32, tmp_path / "cache")
    assert cache.labels.shape == (12, 20)
    np.testing.assert_array_equal(cache.labels, voc.label_matrix(names))
    masks = cache.masks(None)
    assert masks.shape == (12, 32, 32)
    tag_only = cache.index("2007_000008")  # train_aug only, but with its SBD mask
    assert set(np.unique(masks[tag_only])) - {0, 255}
    first = cache.index(names[0])
    np.testing.assert_array_equal(cache.orig_mask(first, None), voc.load_mask(voc.records[0]))
    assert datasets.ImageCache.open(cache.folder).labels.shape == (12, 20)


def test_tag_only_images_cache_as_ignored(fixture, tmp_path):
    devkit = _copy(fixture, tmp_path)
    shutil.rmtree(devkit / "VOC2012" / "SegmentationClassAug")
    ds = VOC2012(devkit)
    record = ds.record("2007_000008")
    assert not record.has_mask
    assert (ds.load_trimap(record) == 255).all()
    with pytest.raises(DatasetError, match="no mask"):
        ds.load_mask(record)


# ---------------------------------------------------------------- synthetic VOC


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic-voc") / "tiny"
    return create_dataset("synthetic-voc", root=root, preset="tiny", seed=0)


def test_synthetic_voc_is_deterministic(tmp_path):
    settings = dict(n_images=8, size=48, n_classes=4, seed=5)
    a = generate_synthetic_voc(tmp_path / "a", **settings)
    b = generate_synthetic_voc(tmp_path / "b", **settings)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files) > 30
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    c = generate_synthetic_voc(tmp_path / "c", **{**settings, "seed": 6})
    jpg = "VOCdevkit/VOC2012/JPEGImages/synth_000001.jpg"
    assert (a / jpg).read_bytes() != (c / jpg).read_bytes()
    assert generate_synthetic_voc(tmp_path / "a", **settings) == a  # reused, not rewritten
    with pytest.raises(DatasetError, match="other parameters"):
        generate_synthetic_voc(tmp_path / "a", **{**settings, "seed": 6})


def test_synthetic_voc_objects_tags_and_masks(synthetic):
    assert synthetic.num_classes == 6 and synthetic.class_names[0] == "synth_a"
    counts = {len(r.labels) for r in synthetic.records}
    assert counts == {1, 2, 3}
    for record in synthetic.records:
        mask = synthetic.load_mask(record)
        assert mask_classes(mask) == record.labels  # every tag is present in the mask
        assert (mask == 255).any()
    assert synthetic.check()["disagreements"] == []
    assert not synthetic.exclusions


def test_synthetic_voc_occludes_and_bands_every_boundary(synthetic):
    marker = json.loads((synthetic.root.parents[1] / MARKER).read_text())
    assert 0 < marker["counts"]["occluded"] < 48
    for record in synthetic.records[:20]:
        mask = synthetic.load_mask(record).astype(int)
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            differ = a != b
            assert ((a[differ] == 255) | (b[differ] == 255)).all()  # no bare edge
    sample = next(
        s for i in range(40) if (s := render_voc_example(i, size=64, n_classes=6, seed=0)).occluded
    )
    assert len(sample.classes) >= 2


def test_synthetic_voc_is_read_by_the_voc_loader(synthetic):
    lists = {k: len(v) for k, v in synthetic.lists.items()}
    assert lists == {"train_aug": 36, "train": 12, "val": 12}
    names = [r.name for r in synthetic.records]
    by_source = [
        VOC2012(synthetic.root, labels=s, class_names=synthetic.class_names).label_matrix(names)
        for s in ("xml", "masks", "cls_labels")
    ]
    for matrix in by_source[1:]:
        np.testing.assert_array_equal(matrix, by_source[0])
    split = synthetic.make_split(val_fraction=0.2, seed=0)
    assert split.dataset == "synthetic_voc" and len(split.val) == 2
    assert synthetic.params["preset"] == "tiny" and synthetic.params["label_source"]


def test_boundary_band_marks_both_sides_of_every_edge():
    labels = np.zeros((6, 6), np.uint8)
    labels[1:5, 1:3] = 1
    labels[1:5, 3:5] = 2
    band = boundary_band(labels)
    assert band[2, 2] == 255 and band[2, 3] == 255  # object / object edge
    assert band[0, 1] == 255 and band[1, 1] == 255  # object / background edge
    assert band[0, 0] == 0  # away from every edge
