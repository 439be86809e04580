"""Synthetic "pets" in the Oxford-IIIT Pet layout, built to pose the real WSSS problem.

Why the design matters: a benchmark of weakly-supervised segmentation shows nothing if the
image-level label can be read off the whole object. Here it cannot:

- Every pet has a **class-agnostic body**: torso ellipse, round head with ears and snout, four
  legs and a tail, under a random pose (mirror, rotation, scale, position). Its colours and
  texture (solid, stripes, spots, mottled) come from a fur pool **shared by all classes**.
- A **small class-specific mark** on the head (a shape + colour pair per class, about 8-14 % of
  the pet's area, clipped to the pet) alone decides the class. A classifier therefore needs
  only the mark, and a plain CAM lights up the mark and misses the body; methods that expand
  a seed to the whole object (affinity, CCAM, decoders) have room to do better.
- **Cluttered backgrounds** (smooth noise, stripes, gradients, random blobs) and
  **distractors**: blobs with the same fur textures as pets but no mark and no pet shape, so
  that "fur colour" does not equal "pet".
- Varied **scale** (pet about 6-35 % of the image before truncation), **position** (uniform;
  only the head is kept inside the frame so the mark stays visible) and so **truncation** at
  the borders, so a centred-ellipse prior is not trivially strong. About half of the images are
  non-square, each side ``size`` +- 25 %, to exercise resizing.
- Trimaps like the real ones: 1 = pet, 2 = background, 3 = a band of about 2-3 px along the
  pet's outline (1 px outside and 1 px inside; not along the image frame).

Files follow the release layout (``images/*.jpg`` at JPEG quality 95,
``annotations/trimaps/*.png``, ``annotations/list.txt`` with ``#`` header lines like the
release, ``trainval.txt``, ``test.txt``) so :class:`~datasets.oxford_pet.OxfordPet` reads them
with the very same loader. A dataset folder is generated in a temporary sibling folder and
renamed into place after its completion marker (:data:`MARKER`) is written, so a folder with
a marker is always complete. Everything is deterministic by seed: the same parameters give
byte-identical files (with the same Pillow / libjpeg build).

Presets: ``tiny`` (48 images, 64 px, 3 classes; seconds, used by tests) and ``quick`` (600
images, 128 px, 4 classes; a CPU benchmark in minutes, generated in a few seconds).
"""

from __future__ import annotations

import hashlib
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
from datasets.oxford_pet import OxfordPet, data_home
from datasets.registry import register_dataset

logger = logging.getLogger(__name__)

#: Bumped whenever the generator's output changes (part of the default folder name and params).
#: Version 2: larger marks (3-5 % -> 8-14 % of the pet) and smaller pets (8-50 % -> 6-35 % of the
#: image): with version 1 a centred ellipse beat every CAM method on ``quick`` (pseudo-mask IoU
#: 0.36 vs 0.26), because a 3-5 % mark is a fraction of one stride-16 cell at 128 px while large
#: pets cover the centre.
GENERATOR_VERSION = 2
#: Completion marker, written last (inside the temp folder, before the atomic rename).
MARKER = "synthetic-complete.json"
#: Named parameter sets; ``SyntheticPets(preset=..., **overrides)`` starts from these.
SYNTHETIC_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_images=48, size=64, n_classes=3),
    "quick": dict(n_images=600, size=128, n_classes=4),
}
_OVERRIDABLE = ("n_images", "size", "n_classes", "trainval_fraction")
MAX_CLASSES = 26

#: Class-specific mark shapes and colours (class k: shape k % 6, colour (k + k // 6) % 6).
PART_SHAPES = ("disc", "square", "triangle", "plus", "ring", "bar")
PART_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 25, 30),
    "blue": (30, 70, 230),
    "green": (30, 190, 60),
    "yellow": (245, 220, 25),
    "magenta": (215, 40, 205),
    "cyan": (25, 215, 225),
}
#: Fur colours shared by every class (and by the distractors and part of the background).
FUR_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 80, 45),
    (160, 110, 60),
    (200, 150, 95),
    (90, 60, 40),
    (60, 55, 50),
    (30, 28, 26),
    (140, 135, 125),
    (200, 195, 185),
    (235, 230, 220),
    (205, 120, 50),
    (175, 160, 120),
)
_TEXTURES = ("solid", "stripes", "spots", "mottled")


def class_name(k: int) -> str:
    """Name of synthetic class ``k`` (``synth_a``, ``synth_b``, ...)."""
    return f"synth_{chr(ord('a') + k)}"


def class_part(k: int) -> tuple[str, str]:
    """(shape, colour name) of the mark of class ``k``; distinct for k < 36."""
    return PART_SHAPES[k % 6], list(PART_COLOURS)[(k + k // 6) % 6]


@dataclass
class SyntheticSample:
    """One rendered image with its annotations (before JPEG encoding).

    Attributes:
        image: (H, W, 3) uint8 RGB.
        trimap: (H, W) uint8 with 1 pet, 2 background, 3 border band.
        pet_mask: (H, W) bool, the whole pet (mark included).
        part_mask: (H, W) bool, the class-specific mark.
        label: class index 0..n_classes-1.
        head_box: (xmin, ymin, xmax, ymax) pixel box of the head (ears and snout included):
            the pet pixels within 1.6 head radii of the head centre, as Oxford Pet's XML boxes.
    """

    image: np.ndarray
    trimap: np.ndarray
    pet_mask: np.ndarray
    part_mask: np.ndarray
    label: int
    head_box: tuple[int, int, int, int] = (0, 0, 0, 0)


# ---------------------------------------------------------------------- drawing helpers


def _ellipse(
    px: np.ndarray, py: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0
) -> np.ndarray:
    dx, dy = px - cx, py - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = dx * c + dy * s, -dx * s + dy * c
    return (u / ax) ** 2 + (v / ay) ** 2 <= 1.0


def _smooth_noise(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Smooth noise in [0, 1]: Gaussian-filtered white noise at low resolution, upsampled."""
    step = max(1, int(sigma // 2))
    small = rng.standard_normal((h // step + 2, w // step + 2)).astype(np.float32)
    small = ndimage.gaussian_filter(small, sigma / step, mode="wrap")
    field = ndimage.zoom(small, step, order=1)[:h, :w]
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def _random_colour(rng: np.random.Generator, fur_probability: float = 0.4) -> np.ndarray:
    """A background colour: a fur colour, or a random hue of limited saturation.

    Random colours keep a channel spread <= 0.5 * 255, well below the class marks' (>= 160),
    so that the mark stays the one cue for the class while the background varies in hue.
    """
    if rng.random() < fur_probability:
        base = np.array(FUR_PALETTE[rng.integers(len(FUR_PALETTE))], dtype=np.float32)
        return np.clip(base + rng.normal(0, 12, 3), 0, 255)
    colour = rng.uniform(0, 255, 3)
    grey = colour.mean()
    return (grey + rng.uniform(0.15, 0.5) * (colour - grey)).astype(np.float32)


def _fur_texture(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """A texture from the pool shared by all classes, on pixel coordinates (u, v)."""
    h, w = u.shape
    i, j = rng.choice(len(FUR_PALETTE), size=2, replace=False)
    c1 = np.array(FUR_PALETTE[i], np.float32) + rng.normal(0, 10, 3).astype(np.float32)
    c2 = np.array(FUR_PALETTE[j], np.float32) + rng.normal(0, 10, 3).astype(np.float32)
    kind = _TEXTURES[rng.integers(len(_TEXTURES))]
    if kind == "solid":
        t = 0.15 * _smooth_noise(rng, h, w, 3.0)
    elif kind == "stripes":
        period, phi = rng.uniform(4.0, 10.0), rng.uniform(0, math.pi)
        wave = np.sin(2 * math.pi * (u * math.cos(phi) + v * math.sin(phi)) / period)
        t = 0.7 * (wave > rng.uniform(-0.3, 0.3))
    elif kind == "spots":
        t = 0.9 * (_smooth_noise(rng, h, w, rng.uniform(1.5, 3.0)) > rng.uniform(0.6, 0.7))
    else:
        t = _smooth_noise(rng, h, w, rng.uniform(3.0, 6.0))
    t = np.asarray(t, np.float32)[..., None]
    return c1 * (1 - t) + c2 * t


def _background(rng: np.random.Generator, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    h, w = x.shape
    c1, c2 = _random_colour(rng), _random_colour(rng)
    kind = rng.integers(3)
    if kind == 0:
        t = _smooth_noise(rng, h, w, rng.uniform(3.0, 10.0))
    elif kind == 1:
        period, phi = rng.uniform(6.0, 26.0), rng.uniform(0, math.pi)
        t = 0.5 + 0.5 * np.sin(2 * math.pi * (x * math.cos(phi) + y * math.sin(phi)) / period)
    else:
        phi = rng.uniform(0, 2 * math.pi)
        ramp = x * math.cos(phi) + y * math.sin(phi)
        t = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    image = c1 * (1 - t[..., None]) + c2 * t[..., None]
    image += 25.0 * (_smooth_noise(rng, h, w, 1.0)[..., None] - 0.5)
    for _ in range(rng.integers(3, 9)):  # clutter blobs of any colour
        r = rng.uniform(0.03, 0.15) * min(h, w)
        ax, cx, cy = r * rng.uniform(0.5, 2.0), rng.uniform(0, w), rng.uniform(0, h)
        win = _window(h, w, cx - ax, cx + ax, cy - ax, cy + ax)
        blob = _ellipse(x[win], y[win], cx, cy, ax, r, rng.uniform(0, math.pi))
        image[win][blob] = _random_colour(rng) + rng.normal(0, 6, (int(blob.sum()), 3))
    return image


def _part_shape(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The mark in its local frame, unit scale (area about pi)."""
    if shape == "disc":
        return u**2 + v**2 <= 1.0
    if shape == "square":
        return np.maximum(abs(u), abs(v)) <= 0.886
    if shape == "triangle":
        inside = np.ones(u.shape, bool)
        for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            inside &= u * math.cos(a) + v * math.sin(a) <= 0.778
        return inside
    if shape == "plus":
        return ((abs(u) <= 0.36) & (abs(v) <= 1.15)) | ((abs(v) <= 0.36) & (abs(u) <= 1.15))
    if shape == "ring":
        r2 = u**2 + v**2
        return (r2 <= 1.2**2) & (r2 >= 0.62**2)
    if shape == "bar":
        return (abs(u) <= 1.55) & (abs(v) <= 0.5)
    raise ValueError(f"unknown part shape {shape!r}")


def _pet_primitives(rng: np.random.Generator) -> tuple[list[tuple[float, ...]], tuple[float, ...]]:
    """Body ellipses (cx, cy, ax, ay, angle) in the pet frame (torso semi-axis 1) and the head."""
    b = rng.uniform(0.45, 0.62)
    r_head = rng.uniform(0.42, 0.55)
    hx, hy = 0.92 + 0.25 * r_head, -0.55 * b - 0.2 * r_head
    prims: list[tuple[float, ...]] = [(0.0, 0.0, 1.0, b, rng.uniform(-0.12, 0.12))]
    prims.append((hx, hy, r_head, r_head, 0.0))
    prims.append((hx + 0.75 * r_head, hy + 0.2 * r_head, 0.45 * r_head, 0.3 * r_head, 0.2))
    for sign in (-1, 1):  # ears
        a = -math.pi / 2 + sign * rng.uniform(0.45, 0.75)
        prims.append(
            (
                hx + 0.85 * r_head * math.cos(a),
                hy + 0.85 * r_head * math.sin(a),
                0.33 * r_head,
                0.18 * r_head,
                a,
            )
        )
    length = rng.uniform(0.5, 0.85)
    for x0 in (-0.68, -0.45, 0.45, 0.68):  # legs
        tilt = rng.uniform(-0.3, 0.3)
        cx, cy = x0 + 0.5 * length * math.sin(tilt), 0.55 * b + 0.5 * length * math.cos(tilt)
        prims.append((cx, cy, 0.09, 0.5 * length, -tilt))
    a = math.pi + rng.uniform(0.3, 1.2)  # tail, backwards and up
    tail = rng.uniform(0.35, 0.6)
    prims.append((-0.95 + tail * math.cos(a), -0.1 * b + tail * math.sin(a), tail, 0.07, a))
    return prims, (hx, hy, r_head)


def _union(px: np.ndarray, py: np.ndarray, prims: list[tuple[float, ...]]) -> np.ndarray:
    mask = np.zeros(px.shape, bool)
    for prim in prims:
        mask |= _ellipse(px, py, *prim)
    return mask


def _window(h: int, w: int, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
    """Row and column slices of the pixels whose centres may lie in [x0, x1] x [y0, y1]."""
    rows = slice(max(0, math.floor(y0)), min(h, math.ceil(y1) + 1))
    cols = slice(max(0, math.floor(x0)), min(w, math.ceil(x1) + 1))
    return rows, cols


def render_example(index: int, *, size: int, n_classes: int, seed: int) -> SyntheticSample:
    """Render synthetic image ``index`` (deterministic in ``seed`` and ``index``).

    Args:
        index: image index; its class is ``index % n_classes``.
        size: nominal side in pixels (about half of the images vary each side by +- 25 %).
        n_classes: number of classes (1..26).
        seed: dataset seed.

    Returns:
        The rendered :class:`SyntheticSample`.
    """
    rng = np.random.default_rng([seed, index, GENERATOR_VERSION])
    label = index % n_classes
    if rng.random() < 0.5:
        h = w = size
    else:
        h, w = (max(16, round(size * rng.uniform(0.75, 1.25))) for _ in range(2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    image = _background(rng, x, y)

    for _ in range(rng.integers(1, 5)):  # distractors: fur textures, no pet shape, no mark
        r = math.sqrt(rng.uniform(0.015, 0.08) * h * w / math.pi)
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        win = _window(h, w, cx - 3 * r, cx + 3 * r, cy - 3 * r, cy + 3 * r)
        xs, ys = x[win], y[win]
        blob = np.zeros(xs.shape, bool)
        for _ in range(rng.integers(1, 4)):
            blob |= _ellipse(
                xs,
                ys,
                cx + rng.normal(0, 0.5 * r),
                cy + rng.normal(0, 0.5 * r),
                r * rng.uniform(0.6, 1.6),
                r * rng.uniform(0.4, 1.0),
                rng.uniform(0, math.pi),
            )
        if blob.any():
            image[win][blob] = _fur_texture(rng, xs, ys)[blob]

    # The pet: its union on a coarse pet-frame grid gives its area (in pet units) and the
    # points used to place it.
    prims, (hx, hy, r_head) = _pet_primitives(rng)
    step = 0.05
    gy, gx = np.mgrid[-2.2:2.2:step, -2.2:2.8:step]
    coarse = _union(gx, gy, prims)
    area_units = float(coarse.sum()) * step**2
    gx, gy = gx[coarse], gy[coarse]
    fraction = rng.uniform(0.06, 0.35)
    scale = math.sqrt(fraction * h * w / area_units)  # pixels per pet unit
    flip = 1.0 if rng.random() < 0.5 else -1.0
    theta = rng.uniform(-0.6, 0.6) if rng.random() < 0.75 else rng.uniform(-math.pi, math.pi)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    # Pet-frame offsets (pixels) of the coarse points and of the head centre.
    ox, oy = scale * (cos_t * flip * gx - sin_t * gy), scale * (sin_t * flip * gx + cos_t * gy)
    hox = scale * (cos_t * flip * hx - sin_t * hy)
    hoy = scale * (sin_t * flip * hx + cos_t * hy)
    margin = r_head * scale + 1.0
    # Most pets wholly (or nearly) in view, some truncated: uniform positions, accepted when the
    # head is inside and enough of the body is.
    required = 1.0 if rng.random() < 0.6 else 0.6
    best = (-1.0, w / 2 - hox + 0.0, h / 2 - hoy + 0.0)
    for _attempt in range(80):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        if not (margin <= cx + hox <= w - margin and margin <= cy + hoy <= h - margin):
            continue
        inside = float(np.mean((cx + ox >= 0) & (cx + ox < w) & (cy + oy >= 0) & (cy + oy < h)))
        if inside > best[0]:
            best = (inside, cx, cy)
        if inside >= required:
            break
    _, cx, cy = best
    win = _window(h, w, cx + ox.min() - 2, cx + ox.max() + 2, cy + oy.min() - 2, cy + oy.max() + 2)
    dx, dy = x[win] - cx, y[win] - cy
    px = flip * (cos_t * dx + sin_t * dy) / scale  # pet-frame coordinates of the window
    py = (-sin_t * dx + cos_t * dy) / scale
    pet_win = _union(px, py, prims)
    image[win][pet_win] = _fur_texture(rng, px * scale, py * scale)[pet_win]

    # The class mark on the head: 8-14 % of the pet's area, at least ~2.2 px in radius.
    shape, colour = class_part(label)
    r_mark = math.sqrt(rng.uniform(0.08, 0.14) * area_units / math.pi)
    r_mark = min(max(r_mark, 2.2 / scale), 0.8 * r_head)
    off = rng.uniform(0, 0.3 * r_head, 2)
    phi = rng.uniform(0, 2 * math.pi)
    mu, mv = px - (hx + off[0] - 0.1 * r_head), py - (hy + off[1] - 0.1 * r_head)
    u = (mu * math.cos(phi) + mv * math.sin(phi)) / r_mark
    v = (-mu * math.sin(phi) + mv * math.cos(phi)) / r_mark
    part_win = _part_shape(shape, u, v) & pet_win
    rgb = np.array(PART_COLOURS[colour], np.float32)
    image[win][part_win] = rgb + rng.normal(0, 5, (int(part_win.sum()), 3))
    pet = np.zeros((h, w), bool)
    pet[win] = pet_win
    part = np.zeros((h, w), bool)
    part[win] = part_win

    # Lighting, slight blur (anti-aliasing) and sensor noise.
    phi = rng.uniform(0, 2 * math.pi)
    ramp = (x * math.cos(phi) + y * math.sin(phi)) / max(h, w)
    image *= (1.0 + rng.uniform(0.0, 0.25) * (ramp - ramp.mean()))[..., None]
    image = ndimage.gaussian_filter(image, sigma=(0.5, 0.5, 0))
    image += rng.normal(0, 3.0, image.shape)
    image_u8 = np.clip(np.round(image), 0, 255).astype(np.uint8)

    cross = ndimage.generate_binary_structure(2, 1)
    outer = ndimage.binary_dilation(pet, cross)
    inner = ndimage.binary_erosion(pet, cross, border_value=1)
    trimap = np.full((h, w), 2, np.uint8)
    trimap[pet] = 1
    trimap[outer & ~inner] = 3
    near_head = (x - (cx + hox)) ** 2 + (y - (cy + hoy)) ** 2 <= (1.6 * r_head * scale) ** 2
    return SyntheticSample(image_u8, trimap, pet, part, label, _box_of(pet & near_head))


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(xmin, ymin, xmax, ymax) of a mask's pixels (inclusive, as VOC boxes)."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return (0, 0, 0, 0)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


# ---------------------------------------------------------------------- files


def _params(n_images: int, size: int, n_classes: int, seed: int, trainval_fraction: float) -> dict:
    return {
        "n_images": int(n_images),
        "size": int(size),
        "n_classes": int(n_classes),
        "seed": int(seed),
        "trainval_fraction": float(trainval_fraction),
        "generator_version": GENERATOR_VERSION,
    }


def _read_marker(root: Path) -> dict | None:
    marker = root / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _write_files(folder: Path, params: dict[str, Any]) -> None:
    n_images, size, n_classes, seed = (params[k] for k in ("n_images", "size", "n_classes", "seed"))
    images, trimaps = folder / "images", folder / "annotations" / "trimaps"
    images.mkdir(parents=True)
    trimaps.mkdir(parents=True)
    per_class: dict[int, list[int]] = {k: [] for k in range(n_classes)}
    for index in range(n_images):
        per_class[index % n_classes].append(index)
    split_rng = np.random.default_rng([seed, 2**31 - 1, GENERATOR_VERSION])
    rows: list[tuple[str, int, int, int, str]] = []
    for k, indices in per_class.items():
        n_trainval = int(math.floor(params["trainval_fraction"] * len(indices) + 0.5))
        trainval = set(split_rng.permutation(len(indices))[:n_trainval].tolist())
        for j, index in enumerate(indices):
            name = f"{class_name(k)}_{j + 1}"
            sample = render_example(index, size=size, n_classes=n_classes, seed=seed)
            Image.fromarray(sample.image).save(images / f"{name}.jpg", quality=95)
            Image.fromarray(sample.trimap).save(trimaps / f"{name}.png")
            split = "trainval" if j in trainval else "test"
            if split == "trainval":  # the release has head boxes for trainval only
                write_box_xml(folder / "annotations" / "xmls", name, sample)
            rows.append((name, k + 1, 1 + k % 2, k // 2 + 1, split))
    rows.sort(key=lambda r: (r[1], int(r[0].rsplit("_", 1)[1])))
    header = (
        "#Image CLASS-ID SPECIES BREED ID\n"
        f"#ID: 1:{n_classes} Class ids\n"
        "#SPECIES: 1:Cat 2:Dog\n"
        "#BREED ID: per species, 1..n\n"
        "#Synthetic data from wsss-bench datasets.synthetic\n"
        f"#params: {json.dumps(params, sort_keys=True)}\n"
    )
    ann = folder / "annotations"
    (ann / "list.txt").write_text(header + "".join(f"{r[0]} {r[1]} {r[2]} {r[3]}\n" for r in rows))
    for split in ("trainval", "test"):
        lines = [f"{r[0]} {r[1]} {r[2]} {r[3]}\n" for r in rows if r[4] == split]
        (ann / f"{split}.txt").write_text("".join(lines))
    counts = {"images": n_images, "trainval": sum(r[4] == "trainval" for r in rows)}
    (folder / MARKER).write_text(json.dumps({"params": params, "counts": counts}, sort_keys=True))


def write_box_xml(folder: Path, name: str, sample: SyntheticSample) -> None:
    """Write the head box of ``sample`` as ``<folder>/<name>.xml`` in Oxford Pet's VOC format."""
    folder.mkdir(parents=True, exist_ok=True)
    h, w = sample.trimap.shape
    x0, y0, x1, y1 = sample.head_box
    text = (
        f"<annotation><filename>{name}.jpg</filename><size><width>{w}</width>"
        f"<height>{h}</height><depth>3</depth></size><object><name>pet</name><bndbox>"
        f"<xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax>"
        "</bndbox><difficult>0</difficult></object></annotation>\n"
    )
    tmp = folder / f".{name}.xml.tmp"
    tmp.write_text(text)
    os.replace(tmp, folder / f"{name}.xml")


def _add_missing_boxes(root: Path, params: dict[str, Any]) -> None:
    """Write the head boxes of a dataset generated before boxes existed (same images)."""
    folder = root / "annotations" / "xmls"
    if folder.is_dir():
        return
    n, size, k, seed = (params[key] for key in ("n_images", "size", "n_classes", "seed"))
    for line in (root / "annotations" / "trainval.txt").read_text().splitlines():
        name = line.split()[0]
        label, j = int(line.split()[1]) - 1, int(name.rsplit("_", 1)[1]) - 1
        index = label + j * k  # image index of the j-th image of class `label`
        write_box_xml(folder, name, render_example(index, size=size, n_classes=k, seed=seed))
    logger.info("added head boxes to %s (%d images)", root, n)


def generate_synthetic(
    root: str | Path,
    *,
    n_images: int,
    size: int,
    n_classes: int,
    seed: int,
    trainval_fraction: float = 0.6,
) -> Path:
    """Write a synthetic dataset in the Oxford-IIIT Pet layout (atomically) and return its root.

    If ``root`` already holds a complete dataset with the same parameters, nothing is done.

    Args:
        root: the dataset folder to create.
        n_images: number of images (classes are balanced: image i has class i % n_classes).
        size: nominal image side in pixels (>= 16).
        n_classes: number of classes, 1..26.
        seed: generator seed; the same parameters give byte-identical files.
        trainval_fraction: fraction of each class in trainval.txt (the rest in test.txt).

    Returns:
        ``root`` as a Path.

    Raises:
        DatasetError: ``root`` holds something else (another synthetic dataset, or files
            without a completion marker).
        ValueError: parameters out of range.
    """
    if not 1 <= n_classes <= MAX_CLASSES:
        raise ValueError(f"n_classes must be in 1..{MAX_CLASSES}, got {n_classes}")
    if size < 16 or n_images < n_classes:
        raise ValueError(f"need size >= 16 and n_images >= n_classes, got {size}, {n_images}")
    if not 0.0 < trainval_fraction < 1.0:
        raise ValueError(f"trainval_fraction must be in (0, 1), got {trainval_fraction}")
    root = Path(root).expanduser()
    params = _params(n_images, size, n_classes, seed, trainval_fraction)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        marker = _read_marker(root)
        if marker is not None:
            if marker.get("params") == params:
                _add_missing_boxes(root, params)
                return root
            raise DatasetError(
                f"{root} already holds a synthetic dataset with other parameters "
                f"({marker.get('params')}); choose another root or delete it"
            )
        if root.exists():
            if root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            else:
                raise DatasetError(
                    f"{root} exists without a completion marker ({MARKER}); refusing to "
                    "overwrite it: delete it or choose another root"
                )
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _write_files(tmp, params)
            os.rename(tmp, root)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    logger.info("generated synthetic dataset %s (%s)", root, params)
    return root


@register_dataset
class SyntheticPets(OxfordPet):
    """Synthetic pets, generated on first use, then read with the Oxford-IIIT Pet loader.

    Args:
        root: dataset folder; default ``$WSSS_BENCH_DATA/synthetic/<preset>-<hash>`` (or
            ``~/.cache/wsss-bench/synthetic/...``), the hash covering every parameter.
        preset: a key of :data:`SYNTHETIC_PRESETS`.
        seed: generator seed.
        label: ``"breed"`` (the synthetic classes) or ``"species"``.
        verify: passed to :class:`~datasets.oxford_pet.OxfordPet`.
        **overrides: any of ``n_images``, ``size``, ``n_classes``, ``trainval_fraction``.

    Raises:
        ValueError: unknown preset or override.
    """

    name = "synthetic"

    def __init__(
        self,
        root: str | Path | None = None,
        preset: str = "quick",
        seed: int = 0,
        *,
        label: str = "breed",
        verify: str = "full",
        **overrides: Any,
    ) -> None:
        if preset not in SYNTHETIC_PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(SYNTHETIC_PRESETS)}")
        unknown = sorted(set(overrides) - set(_OVERRIDABLE))
        if unknown:
            raise ValueError(f"unknown synthetic parameter(s) {unknown}; valid: {_OVERRIDABLE}")
        settings = {"trainval_fraction": 0.6, **SYNTHETIC_PRESETS[preset], **overrides}
        params = _params(seed=seed, **settings)
        if root is None:
            key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
            root = data_home() / "synthetic" / f"{preset}-{key}"
        generate_synthetic(root, **{k: v for k, v in params.items() if k != "generator_version"})
        super().__init__(root, label=label, verify=verify)
        self.preset = preset
        self.params = {"preset": preset, **params, "label": label}


# ---------------------------------------------------------------------- inspection


def synthetic_stats(
    n_images: int = 200, *, size: int = 128, n_classes: int = 4, seed: int = 0
) -> dict[str, float]:
    """Sanity statistics of the generator, rendered in memory.

    Returns:
        ``pet_fraction_mean`` / ``_min`` / ``_max`` (pet pixels / image pixels),
        ``off_centre_rate`` (pet centroid farther than 15 % of the image diagonal from the
        centre), ``truncated_rate`` (pet touches the frame), ``part_fraction_mean`` (mark
        pixels / pet pixels), ``border_fraction_mean`` (band pixels / pet pixels),
        ``non_square_rate``, and ``centre_prior_iou``: the dataset-level pet IoU of a centred
        ellipse covering the mean pet fraction (border ignored), the floor a method must beat.
    """
    fractions, off, truncated, part, border, non_square = [], [], [], [], [], []
    inter = union = 0
    samples = [
        render_example(i, size=size, n_classes=n_classes, seed=seed) for i in range(n_images)
    ]
    mean_fraction = float(np.mean([s.pet_mask.mean() for s in samples]))
    for s in samples:
        h, w = s.pet_mask.shape
        ys, xs = np.nonzero(s.pet_mask)
        fractions.append(s.pet_mask.mean())
        off.append(
            math.hypot(ys.mean() + 0.5 - h / 2, xs.mean() + 0.5 - w / 2) > 0.15 * math.hypot(h, w)
        )
        truncated.append(
            bool(
                s.pet_mask[0].any()
                or s.pet_mask[-1].any()
                or s.pet_mask[:, 0].any()
                or s.pet_mask[:, -1].any()
            )
        )
        part.append(s.part_mask.sum() / s.pet_mask.sum())
        border.append((s.trimap == 3).sum() / s.pet_mask.sum())
        non_square.append(h != w)
        # Centred ellipse with the image's aspect covering mean_fraction of the image.
        y, x = np.mgrid[0:h, 0:w] + 0.5
        k = math.sqrt(mean_fraction / (math.pi / 4))
        prior = ((x - w / 2) / (k * w / 2)) ** 2 + ((y - h / 2) / (k * h / 2)) ** 2 <= 1
        valid = s.trimap != 3
        gt = s.trimap == 1
        inter += int((prior & gt & valid).sum())
        union += int(((prior | gt) & valid).sum())
    return {
        "n_images": float(n_images),
        "pet_fraction_mean": float(np.mean(fractions)),
        "pet_fraction_min": float(np.min(fractions)),
        "pet_fraction_max": float(np.max(fractions)),
        "off_centre_rate": float(np.mean(off)),
        "truncated_rate": float(np.mean(truncated)),
        "part_fraction_mean": float(np.mean(part)),
        "border_fraction_mean": float(np.mean(border)),
        "non_square_rate": float(np.mean(non_square)),
        "centre_prior_iou": inter / max(union, 1),
    }


def save_examples_figure(
    path: str | Path, *, n: int = 6, size: int = 128, n_classes: int = 4, seed: int = 0
) -> Path:
    """Save a figure of ``n`` generated images, their trimaps and their class marks.

    Args:
        path: output image file (PNG recommended).
        n: number of examples (columns).
        size: nominal image size.
        n_classes: number of classes.
        seed: generator seed (the figure shows images 0..n-1 of that dataset).

    Returns:
        The written path.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmap = ListedColormap(["#000000", "#f2c14e", "#3d5a80", "#e0fbfc"])  # -, pet, bg, border
    fig, axes = plt.subplots(3, n, figsize=(2.0 * n, 6.4), squeeze=False)
    for i in range(n):
        s = render_example(i, size=size, n_classes=n_classes, seed=seed)
        shape, colour = class_part(s.label)
        axes[0, i].imshow(s.image)
        axes[0, i].set_title(f"{class_name(s.label)}\n{colour} {shape}", fontsize=9)
        axes[1, i].imshow(s.trimap, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
        axes[1, i].set_title(f"pet {100 * s.pet_mask.mean():.0f} % of image", fontsize=9)
        overlay = (s.image * 0.35).astype(np.uint8)
        overlay[s.part_mask] = s.image[s.part_mask]
        axes[2, i].imshow(overlay)
        axes[2, i].set_title(
            f"mark {100 * s.part_mask.sum() / s.pet_mask.sum():.1f} % of pet", fontsize=9
        )
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("image")
    axes[1, 0].set_ylabel("trimap\n(pet / bg / border)")
    axes[2, 0].set_ylabel("class mark\n(decides the label)")
    fig.suptitle(
        "Synthetic pets: class-agnostic body, shared fur textures, a small class mark, "
        "cluttered background with fur-textured distractors",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
