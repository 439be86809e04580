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
byte-identical files (with the same Pillow / libjpeg build). The drawing itself (one image in
memory, :func:`render_example`) lives in :mod:`datasets.synthetic_render`.

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
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from PIL import Image

from datasets.conventions import DatasetError
from datasets.oxford_pet import OxfordPet, data_home
from datasets.registry import register_dataset
from datasets.synthetic_render import (
    FUR_PALETTE,
    GENERATOR_VERSION,
    PART_COLOURS,
    PART_SHAPES,
    SyntheticSample,
    class_name,
    class_part,
    render_example,
)

logger = logging.getLogger(__name__)

__all__ = [  # the drawing lives in datasets.synthetic_render; its public names re-exported here
    "FUR_PALETTE",
    "GENERATOR_VERSION",
    "MARKER",
    "MAX_CLASSES",
    "PART_COLOURS",
    "PART_SHAPES",
    "SYNTHETIC_PRESETS",
    "SyntheticPets",
    "SyntheticSample",
    "class_name",
    "class_part",
    "generate_synthetic",
    "render_example",
    "save_examples_figure",
    "synthetic_stats",
    "write_box_xml",
]

#: Completion marker, written last (inside the temp folder, before the atomic rename).
MARKER = "synthetic-complete.json"
#: Named parameter sets; ``SyntheticPets(preset=..., **overrides)`` starts from these.
SYNTHETIC_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_images=48, size=64, n_classes=3),
    "quick": dict(n_images=600, size=128, n_classes=4),
}
_OVERRIDABLE = ("n_images", "size", "n_classes", "trainval_fraction")
MAX_CLASSES = 26

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


def check_preset(
    what: str,
    presets: dict[str, dict[str, Any]],
    preset: str,
    overrides: dict[str, Any],
    overridable: tuple[str, ...],
) -> None:
    """Raise ValueError naming ``what`` for an unknown preset or override name."""
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r}; valid: {', '.join(presets)}")
    unknown = sorted(set(overrides) - set(overridable))
    if unknown:
        raise ValueError(f"unknown {what} parameter(s) {unknown}; valid: {overridable}")


def default_root(folder: str, preset: str, params: dict[str, Any]) -> Path:
    """``<data home>/<folder>/<preset>-<hash of params>``: one folder per generator setting."""
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return data_home() / folder / f"{preset}-{key}"


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
        check_preset("synthetic", SYNTHETIC_PRESETS, preset, overrides, _OVERRIDABLE)
        settings = {"trainval_fraction": 0.6, **SYNTHETIC_PRESETS[preset], **overrides}
        params = _params(seed=seed, **settings)
        root = default_root("synthetic", preset, params) if root is None else root
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
