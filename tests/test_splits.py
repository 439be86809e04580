"""Seeded splits: schemes, stratification, disjointness, hashes, save/load."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from datasets import SPLIT_SCHEMES, DatasetError, OxfordPet, Split, make_split
from datasets.splits import weaktr_refinery_test_files

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "oxford-pet-sample"


@pytest.fixture(scope="module")
def sample() -> OxfordPet:
    if not (SAMPLE / "images").is_dir():
        pytest.skip(f"real Oxford-IIIT Pet sample not found at {SAMPLE} (expected beside the repo)")
    return OxfordPet(SAMPLE)


def _assert_disjoint_and_usable(split: Split, dataset) -> None:
    train, val, test = set(split.train), set(split.val), set(split.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train) == len(split.train) and len(val) == len(split.val)
    usable = {r.name for r in dataset.records}
    assert train | val | test <= usable
    assert list(split.train) == sorted(split.train)


def test_official_split_on_the_sample(sample):
    split = make_split(sample, "official", val_fraction=0.1, seed=0)
    _assert_disjoint_and_usable(split, sample)
    official_test = {r.name for r in sample.records if r.official_split == "test"}
    official_trainval = {r.name for r in sample.records if r.official_split == "trainval"}
    assert set(split.test) == official_test and len(official_test) == 60
    assert set(split.train) | set(split.val) == official_trainval
    labels = Counter(sample.record(n).label for n in split.val)
    assert labels == {0: 2, 1: 2, 2: 2}  # 10 % of 20 per breed, stratified
    assert "Abyssinian_34" not in set(split.train) | set(split.val) | set(split.test)
    assert split.dataset == "oxford_pet" and split.scheme == "official"


def test_same_inputs_same_hash_and_seed_changes_val(sample):
    a = make_split(sample, "official", val_fraction=0.1, seed=0)
    b = make_split(OxfordPet(SAMPLE), "official", val_fraction=0.1, seed=0)
    assert a == b and a.sha256 == b.sha256 and len(a.sha256) == 64
    c = make_split(sample, "official", val_fraction=0.1, seed=1)
    assert c.val != a.val and c.test == a.test and c.sha256 != a.sha256
    assert make_split(sample, "official", val_fraction=0.2).sha256 != a.sha256


def test_weaktr_split_reproduces_the_original_permutation(tiny_dataset):
    split = make_split(tiny_dataset, "weaktr_refinery", val_fraction=0.1, seed=0)
    _assert_disjoint_and_usable(split, tiny_dataset)
    files = sorted(f for f in tiny_dataset.image_file_names if f.endswith(".jpg"))
    # The original script: set_seed(42) seeds torch's global generator, then torch.randperm.
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(42)
        order = torch.randperm(len(files)).tolist()
    finally:
        torch.random.set_rng_state(state)
    expected_test = {files[i][: -len(".jpg")] for i in order[: int(len(files) * 0.2)]}
    assert set(split.test) == expected_test
    assert len(split.test) == int(0.2 * len(tiny_dataset))
    assert len(split.train) + len(split.val) + len(split.test) == len(tiny_dataset)
    # The 80/20 part ignores `seed`; only the val carve uses it.
    other = make_split(tiny_dataset, "weaktr_refinery", val_fraction=0.1, seed=3)
    assert other.test == split.test and other.val != split.val


def test_weaktr_split_drops_unusable_images(sample):
    split = make_split(sample, "weaktr_refinery")
    _assert_disjoint_and_usable(split, sample)
    test_files = weaktr_refinery_test_files(sample.image_file_names)
    assert len(test_files) == int(0.2 * 121)  # drawn over every .jpg, as the original
    assert set(split.test) == {f[:-4] for f in test_files} - {"Abyssinian_34"}


def test_val_fraction_zero_and_bad_arguments(tiny_dataset):
    split = make_split(tiny_dataset, "official", val_fraction=0.0)
    assert split.val == () and len(split.train) > 0
    with pytest.raises(ValueError, match="official, weaktr_refinery"):
        make_split(tiny_dataset, "random")
    with pytest.raises(ValueError, match="val_fraction"):
        make_split(tiny_dataset, val_fraction=1.0)
    assert SPLIT_SCHEMES == ("official", "weaktr_refinery")


def test_save_load_roundtrip_and_tamper_detection(tiny_dataset, tmp_path):
    split = make_split(tiny_dataset, "official", val_fraction=0.2, seed=4)
    path = split.save(tmp_path / "splits" / "split.json")
    payload = json.loads(path.read_text())
    assert payload["sha256"] == split.sha256
    assert Split.load(path) == split
    payload["test"] = payload["test"][:-1] + payload["train"][:1]  # move an image
    path.write_text(json.dumps(payload))
    with pytest.raises(DatasetError, match="altered"):
        Split.load(path)
    path.write_text("{not json")
    with pytest.raises(DatasetError, match="not a readable split file"):
        Split.load(path)
