"""Every registered method honours the contract (tiny preset, tiny synthetic data).

Each method is fitted three times per session (a counting run, a same-seed rerun and a
budget-cut run); the results are shared by the tests below through a module-scoped cache.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import numpy as np
import pytest
from torch import nn

import methods  # noqa: F401  (registers every method)
from methods.base import Context, ImageSet, Method, create_method, get_method, list_methods

METHODS = list_methods()
N_LOCALIZE = 6  # images passed to localize/refine


class RecordingContext(Context):
    """Counts should_continue calls and stage entries; returns False after ``limit`` calls."""

    def __init__(self, limit: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.limit = limit
        self.events: list[tuple[str, Any]] = []

    def should_continue(self) -> bool:
        calls = sum(1 for kind, _ in self.events if kind == "call")
        ok = self.limit is None or calls < self.limit
        self.events.append(("call", ok))
        if not ok:
            self.budget_hit = True
        return ok

    def stage(self, name, compute):  # noqa: ANN001, ANN201
        self.events.append(("stage", name))
        return compute()

    @property
    def calls(self) -> int:
        return sum(1 for kind, _ in self.events if kind == "call")


@pytest.fixture(scope="module")
def data(tiny_dataset, tiny_cache) -> dict[str, ImageSet]:
    """Train sets without and with masks, and a small batch to localize."""
    plain = ImageSet(
        images=np.asarray(tiny_cache.images),
        labels=np.asarray(tiny_cache.labels),
        num_classes=tiny_dataset.num_classes,
        names=list(tiny_cache.names),
    )
    with_masks = dataclasses.replace(plain, masks=np.asarray(tiny_cache.masks("pet")))
    s = plain.images.shape[1]
    boxes = np.tile(np.array([[s / 4, s / 5, 3 * s / 4, s / 2]], np.float32), (len(plain), 1))
    boxes[1] = np.nan  # an image without a box
    return {"plain": plain, "masks": with_masks, "boxes": dataclasses.replace(plain, boxes=boxes)}


def _train_set(cls: type[Method], data: dict[str, ImageSet]) -> ImageSet:
    if cls.supervision == "box":
        return data["boxes"]
    return data["masks"] if cls.uses_masks else data["plain"]


def _run(
    name: str, data: dict[str, ImageSet], ctx: Context
) -> tuple[Method, np.ndarray, np.ndarray]:
    method = create_method(name, preset="tiny")
    train = _train_set(type(method), data)
    method.fit(train, ctx)
    batch = train.subset(slice(0, N_LOCALIZE))
    maps = method.localize(batch, ctx)
    refined = method.refine(batch, maps, ctx)
    return method, maps, refined


_RESULTS: dict[tuple[str, str], Any] = {}


@pytest.fixture(scope="module")
def results(data, tmp_path_factory):
    """Lazily computed runs, keyed by (method, kind), shared across the tests of this module."""

    def get(name: str, kind: str) -> Any:
        key = (name, kind)
        if key not in _RESULTS:
            workdir = tmp_path_factory.mktemp(f"{name}-{kind}")
            if kind == "budget":
                ctx = RecordingContext(limit=1, seed=3, workdir=workdir)
            else:
                ctx = RecordingContext(limit=None, seed=3, workdir=workdir)
            method, maps, refined = _run(name, data, ctx)
            _RESULTS[key] = {"method": method, "maps": maps, "refined": refined, "ctx": ctx}
        return _RESULTS[key]

    yield get
    _RESULTS.clear()


def _check_maps(maps: np.ndarray, n: int, hw: tuple[int, int], what: str) -> None:
    assert isinstance(maps, np.ndarray), f"{what}: not a numpy array ({type(maps)})"
    assert maps.shape == (n, 1, *hw), f"{what}: shape {maps.shape}"
    assert maps.dtype == np.float32, f"{what}: dtype {maps.dtype}"
    assert np.isfinite(maps).all(), f"{what}: NaN or inf"
    assert maps.min() >= 0.0 and maps.max() <= 1.0, f"{what}: range [{maps.min()}, {maps.max()}]"


@pytest.mark.parametrize("name", METHODS)
def test_maps_shape_dtype_range(name, results, data):
    r = results(name, "full")
    hw = data["plain"].images.shape[1:3]
    _check_maps(r["maps"], N_LOCALIZE, hw, f"{name}.localize")
    _check_maps(r["refined"], N_LOCALIZE, hw, f"{name}.refine")


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_maps(name, results):
    a = results(name, "full")
    b = results(name, "rerun")
    assert a["method"] is not b["method"]
    np.testing.assert_array_equal(a["maps"], b["maps"])
    np.testing.assert_array_equal(a["refined"], b["refined"])


def _modules_of(obj: Any, seen: set[int] | None = None) -> list[nn.Module]:
    seen = set() if seen is None else seen
    found: list[nn.Module] = []
    values = vars(obj).values() if hasattr(obj, "__dict__") else []
    for v in values:
        items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
        for item in items:
            if isinstance(item, nn.Module) and id(item) not in seen:
                seen.add(id(item))
                found.append(item)
    return found


@pytest.mark.parametrize("name", METHODS)
def test_no_hooks_left(name, results):
    r = results(name, "full")
    for module in _modules_of(r["method"]):
        for sub in module.modules():
            assert not sub._forward_hooks, f"{name}: forward hook left on {type(sub).__name__}"
            assert not sub._forward_pre_hooks, f"{name}: pre-hook left on {type(sub).__name__}"
            assert not sub._backward_hooks, f"{name}: backward hook left on {type(sub).__name__}"
    from torch.nn.modules import module as module_mod

    assert not module_mod._global_forward_hooks, f"{name}: global forward hook left"


@pytest.mark.parametrize("name", METHODS)
def test_budget_stops_training(name, results, data):
    full = results(name, "full")["ctx"]
    if full.calls == 0:  # only what trains nothing may skip it (references, box_prior)
        trains = get_method(name).fit is not Method.fit
        assert get_method(name).kind == "reference" or not trains, (
            f"{name} never calls ctx.should_continue()"
        )
        return
    assert full.calls >= 2, f"{name}: tiny preset makes only {full.calls} step(s); cannot test"
    r = results(name, "budget")
    ctx = r["ctx"]
    events = ctx.events
    first_false = next(i for i, e in enumerate(events) if e == ("call", False))
    after = events[first_false + 1 :]
    extra_calls = sum(1 for kind, _ in after if kind == "call")
    later_stages = sum(1 for kind, _ in after if kind == "stage")
    # after the budget says no, each later stage may ask once (and stop); nothing else may
    assert extra_calls <= later_stages, (
        f"{name}: {extra_calls} should_continue calls after it returned False "
        f"(only {later_stages} later stages); training did not stop"
    )
    assert ctx.calls < full.calls
    hw = data["plain"].images.shape[1:3]
    _check_maps(r["maps"], N_LOCALIZE, hw, f"{name} (budget-cut).localize")


def _changed_value(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if value else 1
    if isinstance(value, float):
        return value * 2 if value else 0.5
    return None


@pytest.mark.parametrize("name", METHODS)
def test_identity_round_trip(name):
    method = create_method(name, preset="tiny")
    assert method.identity() == name
    tried = 0
    for f in dataclasses.fields(method.config):
        new = _changed_value(getattr(method.config, f.name))
        if new is None:
            continue
        try:
            changed = create_method(name, preset="tiny", **{f.name: new})
        except ValueError:  # the method's own validation rejects this value: try another field
            continue
        tried += 1
        ident = changed.identity()
        assert ident.startswith(f"{name}[{f.name}="), ident
        again = create_method(ident, preset="tiny")
        assert again.config == changed.config, f"{ident} does not round-trip"
        assert again.identity() == ident
    numeric = [
        f
        for f in dataclasses.fields(method.config)
        if _changed_value(getattr(method.config, f.name)) is not None
    ]
    assert tried or not numeric, f"{name}: no numeric field could be changed and round-tripped"


def test_unknown_name_lists_valid_ones():
    with pytest.raises(KeyError) as info:
        create_method("no_such_method", preset="tiny")
    message = str(info.value)
    assert "no_such_method" in message
    for name in METHODS:
        assert name in message


@pytest.mark.parametrize("name", METHODS)
def test_config_frozen_presets_and_comments(name):
    cls = get_method(name)
    assert dataclasses.is_dataclass(cls.Config)
    assert set(cls.presets) >= {"paper", "quick", "tiny"}
    assert cls.presets["paper"] == {}, "paper preset must be the Config defaults"
    cfg = cls.make_config("tiny")
    fields = dataclasses.fields(cfg)
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cfg, fields[0].name, getattr(cfg, fields[0].name))
    lines = inspect.getsource(cls.Config).splitlines()
    starts = [
        i for i, ln in enumerate(lines) if ln.strip().split(":")[0] in {f.name for f in fields}
    ]
    for i, j in zip(starts, starts[1:] + [len(lines)]):
        block = "\n".join(lines[max(0, i - 1) : j])  # a comment above, on, or in the field
        assert "#" in block, f"{name}.Config: field on line {lines[i].strip()!r} has no comment"
    assert len(starts) == len(fields)
    assert cls.kind in ("method", "reference")


# ---- the references' own behaviour ----------------------------------------------------------


def _masked_set(masks: np.ndarray) -> ImageSet:
    n, h, w = masks.shape
    return ImageSet(
        images=np.zeros((n, h, w, 3), np.uint8),
        labels=np.zeros(n, np.int64),
        num_classes=1,
        names=[str(i) for i in range(n)],
        masks=masks,
    )


def test_references_are_marked():
    for name in ("supervised", "all_foreground", "centre_prior"):
        assert get_method(name).kind == "reference"
        assert get_method(name).fixed_threshold == 0.5
    assert get_method("supervised").pseudo_from_gt is True
    assert get_method("supervised").uses_masks and get_method("centre_prior").uses_masks
    assert not get_method("all_foreground").uses_masks


def test_supervised_returns_the_mask_and_needs_it():
    masks = np.zeros((2, 4, 6), np.uint8)
    masks[0, 1:3, 2:5] = 1
    masks[1, 0, :] = 255
    batch = _masked_set(masks)
    method = create_method("supervised", preset="tiny")
    maps = method.localize(batch, Context())
    np.testing.assert_array_equal(maps[:, 0], (masks == 1).astype(np.float32))
    batch.masks = None
    with pytest.raises(ValueError, match="masks"):
        method.localize(batch, Context())


def test_all_foreground_is_all_ones():
    maps = create_method("all_foreground", preset="tiny").localize(
        _masked_set(np.zeros((3, 5, 7), np.uint8)), Context()
    )
    assert maps.shape == (3, 1, 5, 7) and (maps == 1.0).all()


@pytest.mark.parametrize("fraction", [0.1, 0.35, 0.9])
def test_centre_prior_covers_the_mean_fraction(fraction):
    h, w = 60, 90
    masks = np.zeros((2, h, w), np.uint8)
    # image 0: pet fraction `fraction` of labelled pixels; image 1: the same, with ignore pixels
    masks[0].flat[: round(fraction * h * w)] = 1
    masks[1, :10] = 255
    labelled = (h - 10) * w
    masks[1, 10:].flat[: round(fraction * labelled)] = 1
    method = create_method("centre_prior", preset="tiny")
    method.fit(_masked_set(masks), Context())
    assert method.fraction == pytest.approx(fraction, abs=1e-3)
    maps = method.localize(_masked_set(np.zeros((1, h, w), np.uint8)), Context())
    assert set(np.unique(maps)) <= {0.0, 1.0}
    assert maps.mean() == pytest.approx(fraction, abs=0.01)
    ellipse = maps[0, 0]
    assert ellipse[h // 2, w // 2] == 1.0  # centred
    np.testing.assert_array_equal(ellipse, ellipse[::-1, ::-1])  # symmetric about the centre
    if fraction < 0.5:
        assert ellipse[0].sum() == 0 and ellipse[:, 0].sum() == 0  # away from the border
        rows, cols = np.nonzero(ellipse)
        aspect = (cols.max() - cols.min() + 1) / (rows.max() - rows.min() + 1)
        assert aspect == pytest.approx(w / h, rel=0.15)  # the image's aspect


def test_centre_prior_errors():
    method = create_method("centre_prior", preset="tiny")
    with pytest.raises(RuntimeError, match="before fit"):
        method.localize(_masked_set(np.zeros((1, 4, 4), np.uint8)), Context())
    with pytest.raises(ValueError, match="entirely ignored"):
        method.fit(_masked_set(np.full((2, 4, 4), 255, np.uint8)), Context())


# ---- specs: one exact parse_spec / format_spec pair ------------------------------------------
SPEC_VALUES = [
    {"lr": 1.23456789e-4},
    {"lr": 1e-10},
    {"lr": 0.1},
    {"third": 1 / 3, "big": 123456789.0, "huge": 1e300, "neg": -0.5},
    {"n": 3, "zero": 0, "neg": -2},
    {"scales": (0.5, 1.0, 1.5, 2.0)},
    {"scales": (1e-10, 0.1, 1.23456789e-4)},
    {"dims": (64, 128, 256), "one": (7,), "empty": ()},
    {"flag": True, "other": False},
    {"depth": None},
    {"backbone": "resnet50", "pretrained": "offline", "file": "/w/o'brien/weights-v2.pth"},
    {"file": "/data/w,eights (v2)[1]{x}.pth"},
    {"a": "true", "b": "1", "c": "None", "d": "null", "e": "1e-4", "f": "", "g": "no"},
    {"a": 'say "hi" \\ there', "b": "a: b", "c": " padded ", "d": "tab\tnew\nline", "e": "#x"},
    {"a": "é ünïcode", "b": "@at", "c": "*star", "d": "0x1F", "e": "- dash"},
    {"mixed": (1, "a,b", None, True, 2.5, "None")},
]


def _typed(value: Any) -> Any:
    """``value`` with its type; ints and floats both as numbers (``1.0`` reads back as ``1``)."""
    if isinstance(value, tuple):
        return ("tuple", tuple(_typed(v) for v in value))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ("number", float(value))
    return (type(value).__name__, value)


@pytest.mark.parametrize("params", SPEC_VALUES, ids=lambda p: ",".join(p))
def test_format_spec_parses_back_exactly(params):
    from methods.base import format_spec, parse_spec

    spec = format_spec("m", params)
    name, parsed = parse_spec(spec)
    assert name == "m" and parsed == params, spec
    assert {k: _typed(v) for k, v in parsed.items()} == {k: _typed(v) for k, v in params.items()}
    assert format_spec(name, parsed) == spec


@pytest.mark.parametrize(
    ("value", "text"),
    [  # {:g} where it is exact (method ids as before), repr where {:g} loses digits
        (0.001, "0.001"),
        (1e-05, "1e-05"),
        (0.3, "0.3"),
        (5e-4, "0.0005"),
        (1.0, "1"),
        (1e6, "1e+06"),
        (1.23456789e-4, "0.000123456789"),
        (1 / 3, "0.3333333333333333"),
        (123456789.0, "123456789.0"),
        (np.float32(0.5), "0.5"),
        (np.float32(0.1), "0.10000000149011612"),
        ((0.5, 1.0), "(0.5,1)"),
        (True, "True"),
        (None, "None"),
        ("decoder", "decoder"),
        ("a,b", '"a,b"'),
        ("true", '"true"'),
    ],
)
def test_format_spec_text(value, text):
    from methods.base import format_spec

    assert format_spec("m", {"x": value}) == f"m[x={text}]"


def test_identity_keeps_every_digit_and_short_floats_as_before():
    method = create_method("cam[lr=1.23456789e-4]", preset="tiny")
    assert method.identity() == "cam[lr=0.000123456789]"  # {:g} made it 0.000123457
    assert create_method(method.identity(), preset="tiny").config == method.config
    assert create_method("cam[lr=1e-05]", preset="tiny").identity() == "cam[lr=1e-05]"
    assert create_method("cam[tta_scales=(0.5,1.0)]", preset="tiny").identity() == (
        "cam[tta_scales=(0.5,1)]"
    )
    assert create_method("cam_affinitynet[beta=4.0]", preset="tiny").identity() == (
        "cam_affinitynet[beta=4]"
    )
    deep = create_method("weaktr_refinery[vit_depth=None]", preset="tiny")
    assert deep.config.vit_depth is None and deep.identity() == "weaktr_refinery[vit_depth=None]"


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("a,b[k=1,j=2],c", ["a", "b[k=1,j=2]", "c"]),
        ("k=(1,2),j=[3,4],m={a: 1, b: 2}", ["k=(1,2)", "j=[3,4]", "m={a: 1, b: 2}"]),
        ("k=\"a,b\",j='c,d'", ['k="a,b"', "j='c,d'"]),
        ('k="a\\",b",j=1', ['k="a\\",b"', "j=1"]),
        ("k='it''s, ok',j=1", ["k='it''s, ok'", "j=1"]),
        ("path=/o'brien/x,j=1", ["path=/o'brien/x", "j=1"]),
        (" a , ,b ", ["a", "b"]),
        ("", []),
    ],
)
def test_split_top_level(text, parts):
    from methods.base import split_top_level

    assert split_top_level(text) == parts


def _imageset_for_check(**change):
    base = {
        "images": np.zeros((2, 8, 8, 3), np.uint8),
        "labels": np.array([0, 1]),
        "num_classes": 2,
        "names": ["a", "b"],
    }
    return ImageSet(**{**base, **change})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": np.zeros((2, 8, 8, 3), np.float32)}, r"train images must be uint8.*float32"),
        ({"images": np.zeros((2, 8, 8), np.uint8)}, r"train images must be uint8"),
        ({"labels": np.array([0])}, r"labels must be \(N,\) class indices.*shape \(1,\)"),
        ({"labels": np.array([0, 2])}, r"labels must lie in \[0, 2\), got \[0, 2\]"),
        ({"labels": np.array([-1, 0])}, r"labels must lie in \[0, 2\)"),
        ({"labels": np.array([[1, 0, 1], [0, 1, 0]])}, r"tags must be \(N, 2\) of 0 and 1"),
        ({"labels": np.array([[1, 2], [0, 1]])}, r"tags must be \(N, 2\) of 0 and 1"),
        ({"labels": np.array([0, 1]), "num_classes": 255}, r"at most 254 classes"),
    ],
)
def test_imageset_check_names_the_owner_and_what_is_wrong(change, message):
    data = _imageset_for_check(**change)
    with pytest.raises(ValueError, match=rf"^some_method: .*{message}"):
        data.check("some_method", "train")


@pytest.mark.parametrize("labels", [np.array([0, 1]), np.array([[1, 1], [0, 1]], np.uint8)])
def test_imageset_check_accepts_labels_and_tags(labels):
    _imageset_for_check(labels=labels).check("some_method", "train")  # no error
