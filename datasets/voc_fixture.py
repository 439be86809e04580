"""Writers of the exact VOCdevkit layout, and a tiny generated VOCdevkit for tests.

The writers (:func:`write_palette_mask`, :func:`write_plain_mask`, :func:`write_xml`,
:func:`write_list`, :func:`write_cls_labels`, :func:`boundary_band`) are shared with the
synthetic VOC generator (:mod:`datasets.synthetic_voc`). Masks are real palette PNGs (PIL mode
``P`` with the VOC colour map, the indices being the classes), with a 255 band along every
object boundary; XMLs follow the VOC schema (``annotation/size``, ``object/name``,
``difficult``, ``bndbox``); ``train_aug.txt`` is written in SEAM's two-column form;
``cls_labels.npy`` is a pickled dict like SEAM's (string keys) or IRNet's (integer keys).

:func:`write_voc_fixture` draws a handful of images (coloured shapes on noise, no realism
needed) so that the loader, the label sources and the checks can be tested in milliseconds;
nothing is downloaded. ``disagree=True`` adds a class to one XML (and its cls_labels entry)
that its mask does not show, so that :meth:`datasets.voc.VOC2012.check` has one to report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image
from scipy import ndimage

from datasets.conventions import IGNORE
from datasets.voc_format import SEGMENTATION_LISTS, VOC_CLASSES, VOC_PALETTE

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------- writers


def boundary_band(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """Mark object boundaries with 255, as the VOC annotators did.

    Args:
        labels: (H, W) uint8 class map (0 background, 1..C objects; no 255 yet).
        width: band half-width in pixels: every pixel within ``width`` (4-connected steps) of
            a pixel of another value is set to 255, on both sides of each edge between two
            values (object / background and object / object). The image frame is not a
            boundary.

    Returns:
        (H, W) uint8 copy with the band set to :data:`~datasets.conventions.IGNORE`.
    """
    labels = np.asarray(labels, dtype=np.uint8)
    edge = np.zeros(labels.shape, dtype=bool)
    vertical = labels[1:, :] != labels[:-1, :]
    horizontal = labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= vertical
    edge[:-1, :] |= vertical
    edge[:, 1:] |= horizontal
    edge[:, :-1] |= horizontal
    if width > 1:
        cross = ndimage.generate_binary_structure(2, 1)
        edge = ndimage.binary_dilation(edge, cross, iterations=width - 1)
    out = labels.copy()
    out[edge] = IGNORE
    return out


def write_palette_mask(path: Path, mask: np.ndarray) -> None:
    """Save a class mask as a VOC palette PNG (mode ``P``, indices = classes)."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8))  # mode L
    image.putpalette(VOC_PALETTE)  # L + palette -> P, the indices unchanged
    image.save(path)


def write_plain_mask(path: Path, mask: np.ndarray) -> None:
    """Save a class mask as a plain grey PNG (mode ``L``), as SBD conversions do."""
    Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(path)


@dataclass(frozen=True)
class FixtureObject:
    """One object of an XML: class name, box (xmin, ymin, xmax, ymax; 1-based) and flags."""

    name: str
    box: tuple[int, int, int, int]
    difficult: bool = False
    truncated: bool = False


def write_xml(
    path: Path, name: str, size: tuple[int, int], objects: Sequence[FixtureObject]
) -> None:
    """Write a VOC annotation XML.

    Args:
        path: output file.
        name: image name (``<filename>`` is ``name.jpg``).
        size: (H, W) of the image.
        objects: its objects.
    """
    height, width = size
    parts = [
        "<annotation>",
        "\t<folder>VOC2012</folder>",
        f"\t<filename>{escape(name)}.jpg</filename>",
        "\t<source>",
        "\t\t<database>The VOC2007 Database</database>",
        "\t\t<annotation>PASCAL VOC2007</annotation>",
        "\t\t<image>flickr</image>",
        "\t</source>",
        "\t<size>",
        f"\t\t<width>{width}</width>",
        f"\t\t<height>{height}</height>",
        "\t\t<depth>3</depth>",
        "\t</size>",
        "\t<segmented>1</segmented>",
    ]
    for obj in objects:
        xmin, ymin, xmax, ymax = obj.box
        parts += [
            "\t<object>",
            f"\t\t<name>{escape(obj.name)}</name>",
            "\t\t<pose>Unspecified</pose>",
            f"\t\t<truncated>{int(obj.truncated)}</truncated>",
            f"\t\t<difficult>{int(obj.difficult)}</difficult>",
            "\t\t<bndbox>",
            f"\t\t\t<xmin>{xmin}</xmin>",
            f"\t\t\t<ymin>{ymin}</ymin>",
            f"\t\t\t<xmax>{xmax}</xmax>",
            f"\t\t\t<ymax>{ymax}</ymax>",
            "\t\t</bndbox>",
            "\t</object>",
        ]
    parts.append("</annotation>")
    path.write_text("\n".join(parts) + "\n")


def write_list(path: Path, names: Sequence[str], seam_format: bool = False) -> None:
    """Write a list: bare names, or SEAM's ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``."""
    if seam_format:
        lines = [f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in names]
    else:
        lines = [f"{n}\n" for n in names]
    path.write_text("".join(lines))


def write_cls_labels(
    path: Path, tags: dict[str, Sequence[int]], num_classes: int, int_keys: bool = False
) -> None:
    """Write a cls_labels.npy: a dict name -> float32 multi-hot, keys sorted.

    Args:
        path: output file.
        tags: name -> 0-based classes.
        num_classes: vector length.
        int_keys: IRNet's integer-encoded names (``2007_000032`` -> ``2007000032``) as keys.
    """
    content: dict[object, np.ndarray] = {}
    for name in sorted(tags):
        vector = np.zeros(num_classes, dtype=np.float32)
        vector[list(tags[name])] = 1.0
        content[int(name.replace("_", "")) if int_keys else name] = vector
    np.save(path, content)  # a 0-d object array, pickled, as SEAM's make_cls_labels does


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """VOC box (xmin, ymin, xmax, ymax), 1-based inclusive, of a non-empty bool mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1


# ---------------------------------------------------------------------- the fixture


@dataclass
class VocFixture:
    """What :func:`write_voc_fixture` wrote.

    Attributes:
        devkit: the ``VOCdevkit`` folder.
        voc_root: the ``VOCdevkit/VOC2012`` folder.
        lists: list name -> image names.
        tags: image name -> 0-based classes (what every label source should give).
        disagreeing: names whose XML (and cls_labels) name a class their mask lacks.
    """

    devkit: Path
    voc_root: Path
    lists: dict[str, list[str]]
    tags: dict[str, tuple[int, ...]]
    disagreeing: list[str] = field(default_factory=list)


def _draw_image(
    rng: np.random.Generator, size: tuple[int, int], classes: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, list[FixtureObject]]:
    """An image with one shape per class in its own column band, its mask and its objects."""
    h, w = size
    image = rng.integers(40, 90, (h, w, 3)).astype(np.uint8)
    labels = np.zeros((h, w), np.uint8)
    y, x = np.mgrid[0:h, 0:w]
    band = w // len(classes)
    objects = []
    for i, k in enumerate(classes):
        cx, cy = band * i + band / 2, h / 2 + rng.uniform(-h / 8, h / 8)
        ax, ay = band * rng.uniform(0.3, 0.42), h * rng.uniform(0.2, 0.35)
        inside = ((x + 0.5 - cx) / ax) ** 2 + ((y + 0.5 - cy) / ay) ** 2 <= 1.0
        labels[inside] = k + 1
        image[inside] = VOC_PALETTE[3 * (k + 1) : 3 * (k + 2)]
        objects.append(FixtureObject(VOC_CLASSES[k], bounding_box(inside), difficult=(i == 1)))
    return image, boundary_band(labels), objects


def write_voc_fixture(
    root: str | Path,
    *,
    n_train: int = 4,
    n_val: int = 3,
    n_aug: int = 5,
    size: tuple[int, int] = (40, 56),
    seed: int = 0,
    disagree: bool = False,
    cls_labels: str | None = "seam",
) -> VocFixture:
    """Write a tiny VOCdevkit under ``root`` (``root/VOCdevkit/VOC2012``).

    Images ``2007_000001``... : the first ``n_train`` in ``train.txt``, the next ``n_val`` in
    ``val.txt``, the last ``n_aug`` only in ``train_aug.txt`` (which also holds the train
    images, as the real one does). Each has 1-3 objects of distinct classes (the second object,
    if any, is ``difficult``); train and val images have ``SegmentationClass`` palette masks,
    every train_aug image a plain ``SegmentationClassAug`` mask; every image an XML.

    Args:
        root: parent folder (created).
        n_train: images in train.txt.
        n_val: images in val.txt.
        n_aug: extra train_aug images without a SegmentationClass mask.
        size: (H, W) of every image.
        seed: random seed.
        disagree: give the first train image an XML object (and cls_labels tag) not in its mask.
        cls_labels: ``"seam"`` (string keys), ``"irnet"`` (integer keys) or None (no file).

    Returns:
        A :class:`VocFixture`.
    """
    rng = np.random.default_rng(seed)
    devkit = Path(root) / "VOCdevkit"
    voc = devkit / "VOC2012"
    folders = ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "Annotations")
    for sub in (*folders, SEGMENTATION_LISTS):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    names = [f"2007_{i:06d}" for i in range(1, n_train + n_val + n_aug + 1)]
    lists = {
        "train": names[:n_train],
        "val": names[n_train : n_train + n_val],
        "train_aug": names[:n_train] + names[n_train + n_val :],
    }
    tags: dict[str, tuple[int, ...]] = {}
    disagreeing: list[str] = []
    for index, name in enumerate(names):
        classes = sorted(rng.choice(len(VOC_CLASSES), size=1 + index % 3, replace=False).tolist())
        image, mask, objects = _draw_image(rng, size, classes)
        Image.fromarray(image).save(voc / "JPEGImages" / f"{name}.jpg", quality=95)
        if name not in lists["train_aug"] or name in lists["train"]:
            write_palette_mask(voc / "SegmentationClass" / f"{name}.png", mask)
        if name in lists["train_aug"]:
            write_plain_mask(voc / "SegmentationClassAug" / f"{name}.png", mask)
        tags[name] = tuple(classes)
        if disagree and index == 0:
            extra = next(k for k in range(len(VOC_CLASSES)) if k not in classes)
            objects.append(FixtureObject(VOC_CLASSES[extra], (1, 1, 4, 4), difficult=True))
            tags[name] = tuple(sorted((*classes, extra)))
            disagreeing.append(name)
        write_xml(voc / "Annotations" / f"{name}.xml", name, size, objects)
    folder = voc / SEGMENTATION_LISTS
    write_list(folder / "train.txt", lists["train"])
    write_list(folder / "val.txt", lists["val"])
    write_list(folder / "train_aug.txt", lists["train_aug"], seam_format=True)
    if cls_labels is not None:
        keyed = {n: tags[n] for n in lists["train_aug"] + lists["val"]}
        write_cls_labels(voc / "cls_labels.npy", keyed, len(VOC_CLASSES), cls_labels == "irnet")
    return VocFixture(devkit, voc, lists, tags, disagreeing)
