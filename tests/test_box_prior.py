"""Box supervision (issue 18): head boxes, the Gaussian box prior, its own table rows."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import methods  # noqa: F401  (registers every method)
from benchmark.config import RunConfig
from benchmark.runner import Runner, prepare_data
from datasets.oxford_pet import OxfordPet
from datasets.synthetic import generate_synthetic, render_example
from methods.base import Context, ImageSet, create_method
from methods.box_prior import gaussian_box_map
from reports.tables import format_table, summarize


def test_gaussian_is_one_at_the_centre_and_exp_minus_half_on_the_edges():
    box = np.array([10.0, 20.0, 30.0, 60.0], np.float32)  # centre (20, 40), half sides 10, 20
    m = gaussian_box_map(box, 80, 50, sigma_scale=1.0)
    y, x = np.mgrid[0:80, 0:50] + 0.5
    expected = np.exp(-(((x - 20) / 10) ** 2 + ((y - 40) / 20) ** 2) / 2)
    np.testing.assert_allclose(m, expected, rtol=1e-5)
    assert m.max() <= 1.0 and m[39, 19] == pytest.approx(1.0, abs=0.01)  # the centre pixel
    assert not gaussian_box_map(np.full(4, np.nan, np.float32), 8, 8, 1.0).any()


def test_box_prior_needs_boxes_and_draws_one_map_per_image():
    images = np.zeros((3, 16, 16, 3), np.uint8)
    boxes = np.array([[0, 0, 8, 8], [np.nan] * 4, [4, 4, 16, 16]], np.float32)
    batch = ImageSet(images, np.zeros(3, np.int64), 1, ["a", "b", "c"], boxes=boxes)
    method = create_method("box_prior", preset="tiny")
    maps = method.localize(batch, Context())
    assert maps.shape == (3, 1, 16, 16) and not maps[1].any()
    assert np.unravel_index(maps[0, 0].argmax(), (16, 16)) in {(3, 3), (3, 4), (4, 3), (4, 4)}
    with pytest.raises(ValueError, match="bounding boxes"):
        method.localize(ImageSet(images, np.zeros(3, np.int64), 1, list("abc")), Context())


def test_synthetic_head_boxes_trainval_only_and_rewritten_identically(tmp_path):
    root = generate_synthetic(tmp_path / "s", n_images=12, size=48, n_classes=2, seed=5)
    xmls = root / "annotations" / "xmls"
    trainval = [
        ln.split()[0]
        for ln in (root / "annotations" / "trainval.txt").read_text().split("\n")
        if ln
    ]
    assert sorted(p.stem for p in xmls.glob("*.xml")) == sorted(trainval)
    data = OxfordPet(root=root)  # the Oxford-IIIT Pet loader reads the generated files
    for record in data.records:
        box = data.head_box(record)
        if record.name not in trainval:
            assert box is None
            continue
        x0, y0, x1, y1 = box
        sample = render_example(_index(record.name, 2), size=48, n_classes=2, seed=5)
        head = sample.pet_mask[y0 : y1 + 1, x0 : x1 + 1]
        assert head.any() and head.mean() > 0.3  # the box holds pet pixels: the head
        assert x1 < sample.pet_mask.shape[1] and y1 < sample.pet_mask.shape[0]
    before = {p.name: p.read_bytes() for p in xmls.glob("*.xml")}
    shutil.rmtree(xmls)  # a folder generated before boxes existed
    generate_synthetic(root, n_images=12, size=48, n_classes=2, seed=5)
    assert {p.name: p.read_bytes() for p in xmls.glob("*.xml")} == before


def _index(name: str, n_classes: int) -> int:
    letter, j = name.split("_")[1], int(name.rsplit("_", 1)[1]) - 1
    return (ord(letter) - ord("a")) + j * n_classes


def test_real_sample_boxes_are_scaled_to_the_working_resolution(sample_root, tmp_path):
    cfg = RunConfig(
        dataset="oxford_pet", data_root=str(sample_root), preset="tiny", out=str(tmp_path)
    ).validate()
    bundle = prepare_data(cfg)
    pos = bundle.cache.names.index("Abyssinian_101")  # 450 x 313, box (54, 36, 319, 235)
    box = bundle.boxes(np.array([pos]))[0]
    s = bundle.size
    np.testing.assert_allclose(box, [54 * s / 450, 36 * s / 313, 320 * s / 450, 236 * s / 313])
    test = bundle.imageset("test", boxes=True)
    assert np.isnan(test.boxes).all()  # the release has boxes for trainval only


def test_box_supervised_rows_are_listed_apart_and_never_ranked(tmp_path):
    cfg = RunConfig(
        methods=["box_prior", "all_foreground"],
        preset="tiny",
        out=str(tmp_path),
        device="cpu",
        segmenter_epochs=1,
        report=False,
    ).validate()
    rows = Runner(cfg).run_all()
    assert set(rows.loc[rows["method_id"] == "box_prior", "supervision"]) == {"box"}
    assert set(rows.loc[rows["method_id"] == "all_foreground", "supervision"]) == {"none"}
    table = format_table(summarize(rows, "pseudo", "train"))
    lines = table.splitlines()
    box_rule = lines.index(next(ln for ln in lines if "box-supervised" in ln))
    assert "box_prior" in lines[box_rule + 1] and "**" not in lines[box_rule + 1]


def test_an_edited_box_file_changes_the_box_methods_key_only(tmp_path):
    """Boxes are not in the dataset fingerprint: a box method's run key holds their digest,
    so editing an XML never reuses box_prior's cached maps (and leaves cam's key alone)."""
    from benchmark.runner import RunSpec

    cfg = RunConfig(methods=["box_prior", "cam"], preset="tiny", out=str(tmp_path), device="cpu",
                    report=False).validate()  # fmt: skip

    def keys() -> dict[str, str]:
        runner = Runner(cfg)
        return {m: runner.open_run(RunSpec(m, 0)).base["run_key"] for m in ("box_prior", "cam")}

    before = keys()
    xml = sorted((tmp_path / "data").rglob("xmls/*.xml"))[0]
    text = xml.read_text()
    start = text.index("<xmin>") + len("<xmin>")
    end = text.index("</xmin>")
    xml.write_text(text[:start] + str(int(text[start:end]) + 3) + text[end:])
    after = keys()
    assert after["cam"] == before["cam"] and after["box_prior"] != before["box_prior"]
