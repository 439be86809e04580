"""Multi-object synthetic images in the PASCAL VOC layout, read by the very same VOC loader.

The multi-class analogue of :mod:`datasets.synthetic`, reusing its rendering (cluttered
backgrounds, the class-agnostic pet body with fur textures shared by all classes, the small
class-specific mark, the fur-textured distractors):

- Each image holds **1-3 objects of different categories** (``n_classes`` categories, default
  6). An object's category is decided only by its mark (shape + colour, ``class_part(k)``);
  bodies and fur are shared, so image-level tags must be localised from the marks outward.
- **Occlusion**: objects are drawn in order, later ones over earlier ones, and the class mask
  is updated accordingly. About half of the objects after the first are placed next to an
  earlier one so that overlaps are common; a placement is rejected when it would hide more
  than half of an earlier object or 40 % of its mark (the tag must stay visible).
- A **255 band** (1 px each side) along every boundary between two values of the class map
  (object / background and object / object), as in VOC's ``SegmentationClass``.
- Tags, XML objects and ``cls_labels.npy`` entries are exactly the classes present in the
  final mask, so all three label sources agree.

Files (``<root>/VOCdevkit/VOC2012/``): ``JPEGImages/*.jpg`` (quality 95), palette
``SegmentationClass/*.png`` for the ``train`` and ``val`` lists, plain
``SegmentationClassAug/*.png`` for every ``train_aug`` image (SBD-like), ``Annotations/*.xml``,
``ImageSets/Segmentation/{train,val,train_aug}.txt`` and a SEAM-style ``cls_labels.npy``.
``train_share`` / ``val_share`` of the images (seeded) form ``train`` / ``val``; the rest is
``train_aug`` only (tags for classifiers, like SBD). Generated once into a temporary sibling
and renamed into place after the completion marker (:data:`MARKER`) is written; deterministic
by seed (byte-identical files with the same Pillow / libjpeg build).

Presets: ``tiny`` (48 images, 64 px, 6 categories; seconds, used by tests) and ``quick`` (600
images, 128 px, 6 categories), the sizes of :data:`datasets.synthetic.SYNTHETIC_PRESETS`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image
from scipy import ndimage

from datasets.conventions import DatasetError
from datasets.registry import register_dataset
from datasets.synthetic import MAX_CLASSES, check_preset, default_root
from datasets.synthetic_render import (
    PART_COLOURS,
    _background,
    _ellipse,
    _fur_texture,
    _part_shape,
    _pet_primitives,
    _union,
    _window,
    class_name,
    class_part,
)
from datasets.voc import VOC2012
from datasets.voc_fixture import (
    FixtureObject,
    boundary_band,
    bounding_box,
    write_cls_labels,
    write_list,
    write_palette_mask,
    write_plain_mask,
    write_xml,
)
from datasets.voc_format import SEGMENTATION_LISTS, mask_classes

logger = logging.getLogger(__name__)

#: Bumped whenever the generator's output changes (part of the default folder name).
GENERATOR_VERSION = 1
#: Completion marker, written last (inside the temp folder, before the atomic rename).
MARKER = "synthetic-voc-complete.json"
SYNTHETIC_VOC_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_images=48, size=64, n_classes=6),
    "quick": dict(n_images=600, size=128, n_classes=6),
}
_OVERRIDABLE = ("n_images", "size", "n_classes", "max_objects", "train_share", "val_share")
MAX_OBJECTS = 3


@dataclass
class VocSample:
    """One rendered multi-object image (before encoding).

    Attributes:
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) uint8: 0 background, k + 1 for category k, 255 on boundaries.
        classes: 0-based categories present (the image-level tags), sorted.
        objects: one per visible object, in drawing order (class name and visible box).
        occluded: True when a later object hid part of an earlier one.
    """

    image: np.ndarray
    mask: np.ndarray
    classes: tuple[int, ...]
    objects: list[FixtureObject]
    occluded: bool


@dataclass
class _Object:
    """A placed object: its category, full and visible pixels, full and visible mark."""

    k: int
    full: np.ndarray
    visible: np.ndarray
    mark: np.ndarray
    mark_visible: np.ndarray


class _Body:
    """A pet body in its own frame, scaled and oriented, ready to be placed at (cx, cy)."""

    def __init__(self, rng: np.random.Generator, fraction: float, h: int, w: int) -> None:
        self.prims, (self.hx, self.hy, self.r_head) = _pet_primitives(rng)
        step = 0.05
        gy, gx = np.mgrid[-2.2:2.2:step, -2.2:2.8:step]
        coarse = _union(gx, gy, self.prims)
        self.area_units = float(coarse.sum()) * step**2
        gx, gy = gx[coarse], gy[coarse]
        self.scale = math.sqrt(fraction * h * w / self.area_units)  # pixels per pet unit
        self.flip = 1.0 if rng.random() < 0.5 else -1.0
        theta = rng.uniform(-0.6, 0.6) if rng.random() < 0.75 else rng.uniform(-math.pi, math.pi)
        self.cos, self.sin = math.cos(theta), math.sin(theta)
        self.ox, self.oy = self._offset(gx, gy)
        self.hox, self.hoy = self._offset(self.hx, self.hy)
        self.radius = math.sqrt(fraction * h * w / math.pi)

    def _offset(self, gx: Any, gy: Any) -> tuple[Any, Any]:
        """Pixel offsets of pet-frame points from the body centre."""
        c, s, f, k = self.cos, self.sin, self.flip, self.scale
        return k * (c * f * gx - s * gy), k * (s * f * gx + c * gy)

    def frame(self, x: np.ndarray, y: np.ndarray, cx: float, cy: float) -> tuple[Any, ...]:
        """Window slices, pet-frame coordinates of the window, and the body mask there."""
        h, w = x.shape
        win = _window(
            h,
            w,
            cx + self.ox.min() - 2,
            cx + self.ox.max() + 2,
            cy + self.oy.min() - 2,
            cy + self.oy.max() + 2,
        )
        dx, dy = x[win] - cx, y[win] - cy
        px = self.flip * (self.cos * dx + self.sin * dy) / self.scale
        py = (-self.sin * dx + self.cos * dy) / self.scale
        return win, px, py, _union(px, py, self.prims)

    def in_view(self, cx: float, cy: float, h: int, w: int) -> float:
        """Fraction of the body inside the frame, or -1 when the head is not inside."""
        margin = self.r_head * self.scale + 1.0
        hx, hy = cx + self.hox, cy + self.hoy
        if not (margin <= hx <= w - margin and margin <= hy <= h - margin):
            return -1.0
        xs, ys = cx + self.ox, cy + self.oy
        return float(np.mean((xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)))


def _candidate(
    rng: np.random.Generator, body: _Body, placed: list[_Object], near: bool, h: int, w: int
) -> tuple[float, float]:
    """A body centre: uniform, or (``near``) about one body radius from an earlier object."""
    if not near:
        return rng.uniform(0, w), rng.uniform(0, h)
    anchor = placed[int(rng.integers(len(placed)))]
    ys, xs = np.nonzero(anchor.visible)
    angle, dist = rng.uniform(0, 2 * math.pi), body.radius * rng.uniform(0.6, 1.4)
    return xs.mean() + 0.5 + dist * math.cos(angle), ys.mean() + 0.5 + dist * math.sin(angle)


def _place(
    rng: np.random.Generator, body: _Body, placed: list[_Object], x: np.ndarray, y: np.ndarray
) -> tuple[float, float, np.ndarray] | None:
    """A position where the body is mostly in view and hides little of the earlier objects."""
    h, w = x.shape
    near = bool(placed) and rng.random() < 0.5
    for _attempt in range(60):
        cx, cy = _candidate(rng, body, placed, near, h, w)
        if body.in_view(cx, cy, h, w) < 0.7:
            continue
        win, _, _, pet_win = body.frame(x, y, cx, cy)
        full = np.zeros((h, w), bool)
        full[win] = pet_win
        if all(
            (p.visible & ~full).sum() >= 0.5 * p.full.sum()
            and (p.mark_visible & ~full).sum() >= 0.6 * p.mark.sum()
            for p in placed
        ):
            return cx, cy, full
    return None


def _draw_object(
    rng: np.random.Generator,
    image: np.ndarray,
    k: int,
    body: _Body,
    at: tuple[float, float],
    x: np.ndarray,
    y: np.ndarray,
) -> np.ndarray:
    """Paint the body's fur and its class mark at ``at``; return the full-frame mark mask."""
    win, px, py, pet_win = body.frame(x, y, *at)
    image[win][pet_win] = _fur_texture(rng, px * body.scale, py * body.scale)[pet_win]
    shape, colour = class_part(k)
    r_head = body.r_head
    r_mark = math.sqrt(rng.uniform(0.08, 0.14) * body.area_units / math.pi)
    r_mark = min(max(r_mark, 2.2 / body.scale), 0.8 * r_head)
    off = rng.uniform(0, 0.3 * r_head, 2)
    phi = rng.uniform(0, 2 * math.pi)
    mu, mv = px - (body.hx + off[0] - 0.1 * r_head), py - (body.hy + off[1] - 0.1 * r_head)
    u = (mu * math.cos(phi) + mv * math.sin(phi)) / r_mark
    v = (-mu * math.sin(phi) + mv * math.cos(phi)) / r_mark
    mark_win = _part_shape(shape, u, v) & pet_win
    rgb = np.array(PART_COLOURS[colour], np.float32)
    image[win][mark_win] = rgb + rng.normal(0, 5, (int(mark_win.sum()), 3))
    mark = np.zeros(x.shape, bool)
    mark[win] = mark_win
    return mark


def _distractors(rng: np.random.Generator, image: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """Fur-textured blobs with no pet shape and no mark (so fur does not mean object)."""
    h, w = x.shape
    for _ in range(int(rng.integers(0, 3))):
        r = math.sqrt(rng.uniform(0.01, 0.05) * h * w / math.pi)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        win = _window(h, w, cx - 2 * r, cx + 2 * r, cy - 2 * r, cy + 2 * r)
        blob = _ellipse(x[win], y[win], cx, cy, r * rng.uniform(0.7, 1.5), r * rng.uniform(0.5, 1))
        if blob.any():
            image[win][blob] = _fur_texture(rng, x[win], y[win])[blob]


def render_voc_example(
    index: int, *, size: int, n_classes: int, seed: int, max_objects: int = MAX_OBJECTS
) -> VocSample:
    """Render multi-object image ``index`` (deterministic in ``seed`` and ``index``).

    Args:
        index: image index.
        size: nominal side in pixels (about half of the images vary each side by +- 25 %).
        n_classes: number of categories.
        seed: dataset seed.
        max_objects: at most this many objects (1..3, and at most ``n_classes``).

    Returns:
        The rendered :class:`VocSample`.
    """
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION, 1012])
    if rng.random() < 0.5:
        h = w = size
    else:
        h, w = (max(16, round(size * rng.uniform(0.75, 1.25))) for _ in range(2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    image = _background(rng, x, y)
    _distractors(rng, image, x, y)
    n_objects = int(rng.integers(1, min(max_objects, n_classes) + 1))
    categories = rng.choice(n_classes, size=n_objects, replace=False).tolist()
    placed: list[_Object] = []
    occluded = False
    for k in categories:
        body = _Body(rng, rng.uniform(0.06, 0.3) / math.sqrt(n_objects), h, w)
        found = _place(rng, body, placed, x, y)
        if found is None:
            continue
        cx, cy, full = found
        mark = _draw_object(rng, image, int(k), body, (cx, cy), x, y)
        for p in placed:
            hidden = p.visible & full
            occluded |= bool(hidden.any())
            p.visible &= ~full
            p.mark_visible &= ~full
        placed.append(_Object(int(k), full, full.copy(), mark, mark.copy()))
    labels = np.zeros((h, w), np.uint8)
    for p in placed:
        labels[p.visible] = p.k + 1
    phi = rng.uniform(0, 2 * math.pi)  # lighting, slight blur, sensor noise (as the pets)
    ramp = (x * math.cos(phi) + y * math.sin(phi)) / max(h, w)
    image *= (1.0 + rng.uniform(0.0, 0.25) * (ramp - ramp.mean()))[..., None]
    image = ndimage.gaussian_filter(image, sigma=(0.5, 0.5, 0))
    image += rng.normal(0, 3.0, image.shape)
    mask = boundary_band(labels)
    classes = mask_classes(mask)
    objects = [
        FixtureObject(class_name(p.k), bounding_box(p.visible), truncated=_touches_frame(p))
        for p in placed
        if p.k in classes
    ]
    image_u8 = np.clip(np.round(image), 0, 255).astype(np.uint8)
    return VocSample(image_u8, mask, classes, objects, occluded)


def _touches_frame(obj: _Object) -> bool:
    v = obj.visible
    return bool(v[0].any() or v[-1].any() or v[:, 0].any() or v[:, -1].any())


# ---------------------------------------------------------------------- files


def _params(**settings: Any) -> dict[str, Any]:
    return {
        "n_images": int(settings["n_images"]),
        "size": int(settings["size"]),
        "n_classes": int(settings["n_classes"]),
        "max_objects": int(settings.get("max_objects", MAX_OBJECTS)),
        "train_share": float(settings.get("train_share", 0.25)),
        "val_share": float(settings.get("val_share", 0.25)),
        "seed": int(settings["seed"]),
        "generator_version": GENERATOR_VERSION,
    }


def _assign_lists(params: dict[str, Any]) -> dict[int, str]:
    """Image index -> ``"train"``, ``"val"`` or ``"aug"`` (train_aug only), seeded."""
    n = params["n_images"]
    order = np.random.default_rng([params["seed"], 2**31 - 1, GENERATOR_VERSION]).permutation(n)
    n_train = max(1, int(math.floor(params["train_share"] * n + 0.5)))
    n_val = max(1, int(math.floor(params["val_share"] * n + 0.5)))
    return {
        int(i): "train" if j < n_train else "val" if j < n_train + n_val else "aug"
        for j, i in enumerate(order)
    }


def _write_files(folder: Path, params: dict[str, Any]) -> None:
    voc = folder / "VOCdevkit" / "VOC2012"
    subs = ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations")
    for sub in (*subs, SEGMENTATION_LISTS):
        (voc / sub).mkdir(parents=True)
    part = _assign_lists(params)
    lists: dict[str, list[str]] = {"train": [], "val": [], "train_aug": []}
    tags: dict[str, tuple[int, ...]] = {}
    n_occluded = 0
    for index in range(params["n_images"]):
        name = f"synth_{index + 1:06d}"
        s = render_voc_example(
            index,
            size=params["size"],
            n_classes=params["n_classes"],
            seed=params["seed"],
            max_objects=params["max_objects"],
        )
        n_occluded += s.occluded
        Image.fromarray(s.image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        if part[index] in ("train", "val"):
            lists[part[index]].append(name)
            write_palette_mask(voc / "SegmentationClass" / f"{name}.png", s.mask)
        if part[index] in ("train", "aug"):
            lists["train_aug"].append(name)
            write_plain_mask(voc / "SegmentationClassAug" / f"{name}.png", s.mask)
        write_xml(voc / "Annotations" / f"{name}.xml", name, s.mask.shape, s.objects)
        tags[name] = s.classes
    for key, names in lists.items():
        write_list(voc / SEGMENTATION_LISTS / f"{key}.txt", names, seam_format=key == "train_aug")
    keyed = {n: tags[n] for n in lists["train_aug"] + lists["val"]}
    write_cls_labels(voc / "cls_labels.npy", keyed, params["n_classes"])
    counts = {k: len(v) for k, v in lists.items()} | {"occluded": n_occluded}
    (folder / MARKER).write_text(json.dumps({"params": params, "counts": counts}, sort_keys=True))


def _read_marker(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def generate_synthetic_voc(root: str | Path, **settings: Any) -> Path:
    """Write a synthetic multi-object dataset in the VOC layout (atomically); return ``root``.

    If ``root`` already holds a complete dataset with the same parameters, nothing is done.

    Args:
        root: the folder to create (it will hold ``VOCdevkit/VOC2012`` and the marker).
        **settings: ``n_images``, ``size``, ``n_classes``, ``seed`` (required), and optionally
            ``max_objects`` (1..3), ``train_share``, ``val_share``.

    Returns:
        ``root`` as a Path.

    Raises:
        DatasetError: ``root`` holds something else.
        ValueError: parameters out of range.
    """
    params = _params(**settings)
    if not 1 <= params["n_classes"] <= MAX_CLASSES:
        raise ValueError(f"n_classes must be in 1..{MAX_CLASSES}, got {params['n_classes']}")
    if not 1 <= params["max_objects"] <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}, got {params['max_objects']}")
    shares = params["train_share"] + params["val_share"]
    if params["size"] < 32 or params["n_images"] < 3 or not 0 < shares < 1:
        raise ValueError(f"need size >= 32, n_images >= 3, 0 < train+val share < 1: {params}")
    root = Path(root).expanduser()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        marker = _read_marker(root)
        if marker is not None:
            if marker.get("params") == params:
                return root
            raise DatasetError(
                f"{root} already holds a synthetic VOC dataset with other parameters "
                f"({marker.get('params')}); choose another root or delete it"
            )
        if root.exists():
            if not (root.is_dir() and not any(root.iterdir())):
                raise DatasetError(
                    f"{root} exists without a completion marker ({MARKER}); refusing to "
                    "overwrite it: delete it or choose another root"
                )
            root.rmdir()
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _write_files(tmp, params)
            os.rename(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    logger.info("generated synthetic VOC dataset %s (%s)", root, params)
    return root


@register_dataset
class SyntheticVOC(VOC2012):
    """Synthetic multi-object images in the VOC layout, generated on first use.

    Args:
        root: dataset folder; default ``$WSSS_BENCH_DATA/synthetic-voc/<preset>-<hash>``.
        preset: a key of :data:`SYNTHETIC_VOC_PRESETS`.
        seed: generator seed.
        labels: label source, as for :class:`~datasets.voc.VOC2012` (all three agree here).
        verify: passed to :class:`~datasets.voc.VOC2012`.
        **overrides: any of ``n_images``, ``size``, ``n_classes``, ``max_objects``,
            ``train_share``, ``val_share``.

    Raises:
        ValueError: unknown preset or override.
    """

    name = "synthetic_voc"

    def __init__(
        self,
        root: str | Path | None = None,
        preset: str = "quick",
        seed: int = 0,
        *,
        labels: str = "auto",
        verify: str = "full",
        **overrides: Any,
    ) -> None:
        check_preset("synthetic-voc", SYNTHETIC_VOC_PRESETS, preset, overrides, _OVERRIDABLE)
        params = _params(seed=seed, **{**SYNTHETIC_VOC_PRESETS[preset], **overrides})
        root = default_root("synthetic-voc", preset, params) if root is None else root
        settings = {k: v for k, v in params.items() if k != "generator_version"}
        generate_synthetic_voc(root, **settings)
        names = [class_name(k) for k in range(params["n_classes"])]
        super().__init__(root, labels=labels, verify=verify, class_names=names)
        self.preset = preset
        self.params = {"preset": preset, **params, **self.params}
