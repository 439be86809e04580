"""Drawing of one synthetic pet image: the body, its fur, the class mark, the clutter.

:func:`render_example` draws image ``index`` of a dataset in memory; :mod:`datasets.synthetic`
writes the images to files and documents the design (why the mark is small, why distractors
share the pets' fur). The drawing helpers are shared with :mod:`datasets.synthetic_voc`.
Everything is deterministic: one ``numpy`` generator per image, seeded by (seed, index,
:data:`GENERATOR_VERSION`), drawn from in a fixed order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: Bumped whenever the generator's output changes (part of the default folder name and params).
#: Version 2: larger marks (3-5 % -> 8-14 % of the pet) and smaller pets (8-50 % -> 6-35 % of the
#: image): with version 1 a centred ellipse beat every CAM method on ``quick`` (pseudo-mask IoU
#: 0.36 vs 0.26), because a 3-5 % mark is a fraction of one stride-16 cell at 128 px while large
#: pets cover the centre.
GENERATOR_VERSION = 2

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


# ---------------------------------------------------------------------- render_example's parts


@dataclass(frozen=True)
class _Pose:
    """Where and how a pet is drawn: its primitives, size, mirror and rotation.

    Attributes:
        prims: body ellipses (cx, cy, ax, ay, angle) in the pet frame (torso semi-axis 1).
        head: (hx, hy, r_head), the head centre and radius in the pet frame.
        area_units: the pet's area in pet units (squared torso semi-axes).
        scale: pixels per pet unit.
        flip: 1.0, or -1.0 for a mirrored pet.
        cos_t: cosine of the rotation.
        sin_t: sine of the rotation.
        ox: pixel offsets (x) of the coarse pet points from the pet's origin.
        oy: pixel offsets (y) of the coarse pet points from the pet's origin.
        hox: pixel offset (x) of the head centre.
        hoy: pixel offset (y) of the head centre.
    """

    prims: list[tuple[float, ...]]
    head: tuple[float, float, float]
    area_units: float
    scale: float
    flip: float
    cos_t: float
    sin_t: float
    ox: np.ndarray
    oy: np.ndarray
    hox: float
    hoy: float


def _canvas(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each (H, W) float32; about half of the images square."""
    if rng.random() < 0.5:
        h = w = size
    else:
        h, w = (max(16, round(size * rng.uniform(0.75, 1.25))) for _ in range(2))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    return x, y


def _draw_distractors(
    rng: np.random.Generator, image: np.ndarray, x: np.ndarray, y: np.ndarray
) -> None:
    """Draw 1-4 blobs with fur textures, no pet shape and no mark, into ``image`` in place."""
    h, w = x.shape
    for _ in range(rng.integers(1, 5)):
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


def _pose(rng: np.random.Generator, h: int, w: int) -> _Pose:
    """A random pet: its shape, a size of 6-35 % of the image, a mirror and a rotation.

    The pet's union on a coarse pet-frame grid gives its area (in pet units) and the points
    used to place it.
    """
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
    return _Pose(prims, (hx, hy, r_head), area_units, scale, flip, cos_t, sin_t, ox, oy, hox, hoy)


def _position(rng: np.random.Generator, pose: _Pose, h: int, w: int) -> tuple[float, float]:
    """The pet's origin (cx, cy) in pixels: the head always inside the frame.

    Most pets wholly (or nearly) in view, some truncated: uniform positions, accepted when the
    head is inside and enough of the body is.
    """
    ox, oy, hox, hoy = pose.ox, pose.oy, pose.hox, pose.hoy
    margin = pose.head[2] * pose.scale + 1.0
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
    return cx, cy


def _pet_window(
    pose: _Pose, x: np.ndarray, y: np.ndarray, cx: float, cy: float
) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """The pixel window around the pet and the pet-frame coordinates (px, py) of its pixels."""
    h, w = x.shape
    ox, oy = pose.ox, pose.oy
    win = _window(h, w, cx + ox.min() - 2, cx + ox.max() + 2, cy + oy.min() - 2, cy + oy.max() + 2)
    dx, dy = x[win] - cx, y[win] - cy
    px = pose.flip * (pose.cos_t * dx + pose.sin_t * dy) / pose.scale
    py = (-pose.sin_t * dx + pose.cos_t * dy) / pose.scale
    return win, px, py


def _mark(
    rng: np.random.Generator, pose: _Pose, label: int, px: np.ndarray, py: np.ndarray
) -> np.ndarray:
    """The class mark on the head, in the pet's window: 8-14 % of its area, >= ~2.2 px radius."""
    hx, hy, r_head = pose.head
    shape, _ = class_part(label)
    r_mark = math.sqrt(rng.uniform(0.08, 0.14) * pose.area_units / math.pi)
    r_mark = min(max(r_mark, 2.2 / pose.scale), 0.8 * r_head)
    off = rng.uniform(0, 0.3 * r_head, 2)
    phi = rng.uniform(0, 2 * math.pi)
    mu, mv = px - (hx + off[0] - 0.1 * r_head), py - (hy + off[1] - 0.1 * r_head)
    u = (mu * math.cos(phi) + mv * math.sin(phi)) / r_mark
    v = (-mu * math.sin(phi) + mv * math.cos(phi)) / r_mark
    return _part_shape(shape, u, v)


def _draw_pet(
    rng: np.random.Generator, image: np.ndarray, x: np.ndarray, y: np.ndarray, label: int
) -> tuple[np.ndarray, np.ndarray, _Pose, tuple[float, float]]:
    """Draw a pet with its class mark into ``image`` in place.

    Returns:
        The (H, W) pet and mark masks, the pet's pose and its origin (cx, cy) in pixels.
    """
    h, w = x.shape
    pose = _pose(rng, h, w)
    cx, cy = _position(rng, pose, h, w)
    win, px, py = _pet_window(pose, x, y, cx, cy)
    pet_win = _union(px, py, pose.prims)
    image[win][pet_win] = _fur_texture(rng, px * pose.scale, py * pose.scale)[pet_win]
    part_win = _mark(rng, pose, label, px, py) & pet_win
    rgb = np.array(PART_COLOURS[class_part(label)[1]], np.float32)
    image[win][part_win] = rgb + rng.normal(0, 5, (int(part_win.sum()), 3))
    pet = np.zeros((h, w), bool)
    pet[win] = pet_win
    part = np.zeros((h, w), bool)
    part[win] = part_win
    return pet, part, pose, (cx, cy)


def _finish(
    rng: np.random.Generator, image: np.ndarray, x: np.ndarray, y: np.ndarray
) -> np.ndarray:
    """Lighting, slight blur (anti-aliasing) and sensor noise; the (H, W, 3) uint8 image."""
    h, w = x.shape
    phi = rng.uniform(0, 2 * math.pi)
    ramp = (x * math.cos(phi) + y * math.sin(phi)) / max(h, w)
    image *= (1.0 + rng.uniform(0.0, 0.25) * (ramp - ramp.mean()))[..., None]
    image = ndimage.gaussian_filter(image, sigma=(0.5, 0.5, 0))
    image += rng.normal(0, 3.0, image.shape)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def _trimap(pet: np.ndarray) -> np.ndarray:
    """1 pet, 2 background, 3 a band 1 px outside and 1 px inside the outline (not the frame)."""
    cross = ndimage.generate_binary_structure(2, 1)
    outer = ndimage.binary_dilation(pet, cross)
    inner = ndimage.binary_erosion(pet, cross, border_value=1)
    trimap = np.full(pet.shape, 2, np.uint8)
    trimap[pet] = 1
    trimap[outer & ~inner] = 3
    return trimap


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
    x, y = _canvas(rng, size)
    image = _background(rng, x, y)
    _draw_distractors(rng, image, x, y)
    pet, part, pose, (cx, cy) = _draw_pet(rng, image, x, y, label)
    image_u8 = _finish(rng, image, x, y)
    r_head = pose.head[2]
    near_head = (x - (cx + pose.hox)) ** 2 + (y - (cy + pose.hoy)) ** 2 <= (
        1.6 * r_head * pose.scale
    ) ** 2
    return SyntheticSample(image_u8, _trimap(pet), pet, part, label, _box_of(pet & near_head))


def _box_of(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(xmin, ymin, xmax, ymax) of a mask's pixels (inclusive, as VOC boxes)."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return (0, 0, 0, 0)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
