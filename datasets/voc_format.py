"""PASCAL VOC 2012 file formats: class names, the colour map, masks, XMLs, cls_labels.npy.

Shared by the loader (:mod:`datasets.voc`), the fixture writer (:mod:`datasets.voc_fixture`)
and the synthetic VOC generator (:mod:`datasets.synthetic_voc`).

- **Masks** (``SegmentationClass/*.png``): palette PNGs (mode ``P``) whose *indices* are the
  classes, 0 = background, 1..20 = :data:`VOC_CLASSES`, 255 = the "void" band drawn along
  object boundaries (and over hard regions). SBD masks (``SegmentationClassAug/*.png``) are
  the same values as plain grey PNGs (mode ``L``) or palettes. A mask saved as RGB colours
  (some converted copies) is decoded back through the colour map; a colour outside it is an
  error.
- **XMLs** (``Annotations/*.xml``): one ``<object>`` per instance with its ``<name>``,
  ``<difficult>`` flag and box. Image-level tags from an XML are the set of object names,
  **difficult objects included**, as SEAM and IRNet do (their ``load_image_label_from_xml``
  takes every ``<name>`` element whose text is a class name; the person-layout ``<part>``
  names ``head``/``hand``/``foot`` are not class names and are skipped there and here).
- **cls_labels.npy** as SEAM/IRNet/RTC ship it: a pickled ``dict`` (name -> 20 floats,
  multi-hot) saved with ``np.save``; SEAM keys are names (``"2007_000032"``), IRNet keys
  integer-encoded names (``2007000032``). The file is **untrusted**: it is read with a
  restricted unpickler that builds only numpy arrays, dtypes and scalars (anything else,
  e.g. a payload calling ``os.system``, is refused before it runs), then checked to be a dict
  of the right shapes and values (:func:`load_cls_labels`).
"""

from __future__ import annotations

import logging
import pickle  # only via _ArrayUnpickler, numpy data only; noqa: untrusted-ok
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format
from PIL import Image, UnidentifiedImageError

from datasets.conventions import IGNORE, DatasetError
from datasets.imaging import open_image

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

logger = logging.getLogger(__name__)

#: The 20 PASCAL VOC classes in the standard order (mask value i + 1 is class i).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def voc_colormap(n: int = 256) -> np.ndarray:
    """The VOC devkit colour map (``labelcolormap.m``): (n, 3) uint8, 255 -> (224, 224, 192)."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


#: The colour map as a flat list, as ``Image.putpalette`` takes it.
VOC_PALETTE: list[int] = voc_colormap().ravel().tolist()


# ---------------------------------------------------------------------- layout and lists

SEGMENTATION_LISTS = "ImageSets/Segmentation"
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/"
LAYOUT_HELP = f"""Expected layout (root = VOCdevkit/ or VOCdevkit/VOC2012/):
  VOC2012/JPEGImages/*.jpg
  VOC2012/SegmentationClass/*.png          (palette PNGs, 255 on boundaries)
  VOC2012/ImageSets/Segmentation/train.txt and val.txt
  VOC2012/Annotations/*.xml                (image-level tags; optional with labels=masks)
  VOC2012/SegmentationClassAug/*.png       (optional, SBD)
  VOC2012/ImageSets/Segmentation/train_aug.txt  (optional, 10,582 names as in SEAM/IRNet)
  VOC2012/cls_labels.npy                   (optional, as SEAM/IRNet ship it)
Get VOCtrainval_11-May-2012.tar from {VOC_URL} (and SegmentationClassAug + train_aug.txt
from SBD as SEAM/IRNet describe), then pass root=<.../VOCdevkit> or set WSSS_BENCH_DATA so
that the root is $WSSS_BENCH_DATA/VOCdevkit."""


def find_voc_root(root: Path) -> Path | None:
    """The ``VOC2012`` folder at ``root``, ``root/VOC2012`` or ``root/VOCdevkit/VOC2012``."""
    for candidate in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / SEGMENTATION_LISTS).is_dir():
            return candidate
    return None


def find_voc_below(root: Path, depth: int = 3) -> Path | None:
    """A folder up to ``depth`` levels below ``root`` that looks like VOC2012, for hints."""
    if depth < 0 or not root.is_dir():
        return None
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        if find_voc_root(child) is not None:
            return find_voc_root(child)
        found = find_voc_below(child, depth - 1)
        if found is not None:
            return found
    return None


def parse_list(path: Path) -> list[str]:
    """Image names of a list file: first token of each line, stem of a path; order kept."""
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as error:
        raise DatasetError(f"{path}: cannot read list file: {error}") from error
    names: dict[str, None] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0]
        names[Path(token).stem if ("/" in token or "." in token) else token] = None
    return list(names)


def check_image(path: Path, verify: str) -> tuple[list[str], tuple[int, int] | None]:
    """Problems and (H, W) of one image file."""
    if path.stat().st_size == 0:
        return ["zero-byte image file"], None
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        return ["not a decodable image"], None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
        return [f"unreadable image header ({error})"], None
    with image:
        width, height = image.size
        if verify == "full":
            try:
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
            except (OSError, SyntaxError, ValueError, EOFError) as error:
                kind = "truncated" if "truncated" in str(error) else "corrupt"
                return [f"{kind} image data ({error})"], None
            except Image.DecompressionBombError as error:
                return [f"image too large to decode safely ({error})"], None
    return [], (height, width)


def format_summary(info: dict[str, Any]) -> str:
    """Readable lines of a VOC-layout ``check()`` report."""
    lines = [
        f"dataset      {info['dataset']}  ({info['root']})",
        f"labels from  {info['label_source']}",
        f"usable       {info['usable']} ({info['image_files']} files in JPEGImages/)",
    ]
    for key, entry in info["lists"].items():
        lines.append(f"  {key:10s} {entry['usable']} usable of {entry['listed']} listed")
    for kind, names in info["missing"].items():
        if names:
            lines.append(f"missing {kind}: {len(names)}: {', '.join(names[:10])}")
    lines.append(f"disagreements (mask / xml / cls_labels): {len(info['disagreements'])}")
    lines += [f"  - {d}" for d in info["disagreements"][:20]]
    lines.append(f"excluded     {len(info['excluded'])}")
    lines += [f"  - {e['name']} ({e['file']}): {e['reason']}" for e in info["excluded"]]
    lines += [f"  problem: {p['file']}: {p['reason']}" for p in info["problems"]]
    return "\n".join(lines)


@dataclass
class ImageFindings:
    """What a scan learnt about one listed image (usable or not).

    Attributes:
        reasons: (file, reason) pairs that make it unusable.
        missing: kinds of missing files (``images``, ``masks``, ``xmls``).
        size: (H, W) of the image, when readable.
        mask: 0-based classes of its SegmentationClass mask, when readable.
        aug: the same for its SegmentationClassAug mask.
        xml: 0-based classes named by its XML, when readable.
        cls: 0-based classes of its cls_labels.npy entry, when present.
    """

    reasons: list[tuple[str, str]]
    missing: list[str] = field(default_factory=list)
    size: tuple[int, int] | None = None
    mask: tuple[int, ...] | None = None
    aug: tuple[int, ...] | None = None
    xml: tuple[int, ...] | None = None
    cls: tuple[int, ...] | None = None


def tag_disagreements(
    findings: dict[str, ImageFindings], class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Images whose mask classes, XML tags and cls_labels tags (where present) differ.

    Returns:
        One dict per image, by name: ``name`` and the class names from each available source
        (``mask``: SegmentationClass, else SegmentationClassAug; ``xml``; ``cls_labels``).
    """
    out = []
    for name, found in sorted(findings.items()):
        mask = found.mask if found.mask is not None else found.aug
        sources = {"mask": mask, "xml": found.xml, "cls_labels": found.cls}
        present = {k: v for k, v in sources.items() if v is not None}
        if len(set(present.values())) > 1:
            named = {k: [class_names[i] for i in v] for k, v in present.items()}
            out.append({"name": name, **named})
    return out


# ---------------------------------------------------------------------- masks


def mask_array(image: Image.Image, num_classes: int) -> np.ndarray:
    """The class indices of a decoded mask image as an (H, W) uint8 array.

    Args:
        image: a loaded PIL image: palette (``P``: its indices), grey (``L``, ``I``,
            ``I;16``: its values) or RGB(A) colours of the VOC colour map.
        num_classes: number of object classes (values 1..num_classes are valid).

    Returns:
        (H, W) uint8: 0 background, 1..num_classes, 255 void.

    Raises:
        ValueError: a colour outside the VOC colour map, or values outside
            ``{0..num_classes, 255}``.
    """
    mode = image.mode
    if mode in ("RGB", "RGBA"):
        rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
        values = _colours_to_indices(rgb, num_classes)
    elif mode in ("P", "L"):
        values = np.array(image, dtype=np.uint8)  # a writable copy
    elif mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        wide = np.asarray(image)
        if wide.size and (wide.min() < 0 or wide.max() > 255):
            raise ValueError(f"mask values span {wide.min()}..{wide.max()}, beyond 0..255")
        values = wide.astype(np.uint8)
    else:
        raise ValueError(f"mask image mode {mode} is not a label map (expected P or L)")
    counts = np.bincount(values.ravel(), minlength=256)
    bad = [int(v) for v in np.flatnonzero(counts) if v > num_classes and v != IGNORE]
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
        raise ValueError(f"mask values outside 0..{num_classes} and 255: {shown}")
    return values


def _colours_to_indices(rgb: np.ndarray, num_classes: int) -> np.ndarray:
    cmap = voc_colormap().astype(np.int64)
    valid = [*range(num_classes + 1), IGNORE]
    keys = (cmap[valid, 0] << 16) | (cmap[valid, 1] << 8) | cmap[valid, 2]
    wide = rgb.astype(np.int64)
    pixels = (wide[..., 0] << 16) | (wide[..., 1] << 8) | wide[..., 2]
    lookup = dict(zip(keys.tolist(), valid))
    unique, inverse = np.unique(pixels, return_inverse=True)
    unknown = [u for u in unique.tolist() if u not in lookup]
    if unknown:
        shown = ", ".join(f"#{u:06x}" for u in unknown[:5])
        raise ValueError(f"RGB mask with colours outside the VOC colour map: {shown}")
    table = np.array([lookup[u] for u in unique.tolist()], dtype=np.uint8)
    return table[inverse].reshape(rgb.shape[:2])


def read_mask(path: Path, num_classes: int = len(VOC_CLASSES)) -> np.ndarray:
    """Read a VOC class mask file (see :func:`mask_array`).

    Raises:
        OSError, ValueError, SyntaxError, PIL.UnidentifiedImageError: unreadable or invalid.
    """
    with open_image(path) as image:
        try:
            image.load()
        except Image.DecompressionBombError as error:
            raise ValueError(f"image too large to decode safely ({error})") from error
        return mask_array(image, num_classes)


def mask_classes(mask: np.ndarray) -> tuple[int, ...]:
    """0-based classes present in a mask (values other than 0 and 255, minus one)."""
    counts = np.bincount(np.asarray(mask, dtype=np.uint8).ravel(), minlength=256)
    return tuple(int(v) - 1 for v in np.flatnonzero(counts) if 0 < v < IGNORE)


def rel_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or as given when it is not below it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def link_outside(path: Path, root: Path) -> str | None:
    """Why ``path`` is refused when it is a link out of ``root`` (and of its folder), else None."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.is_relative_to(root.resolve()) or target.is_relative_to(path.parent.resolve()):
        return None
    logger.warning("%s: a link to %s, outside the dataset root; not read", path, target)
    return f"{rel_path(path, root)} is a link to {target}, outside the dataset root; not read"


def check_mask_file(
    path: Path, root: Path, size: tuple[int, int] | None, num_classes: int
) -> tuple[list[str], tuple[int, ...] | None]:
    """Problems (naming the file) and 0-based classes of one mask file of a dataset at ``root``."""
    rel = rel_path(path, root)
    outside = link_outside(path, root)
    if outside:
        return [outside], None
    if path.stat().st_size == 0:
        return [f"mask {rel} is a zero-byte file"], None
    try:
        values = read_mask(path, num_classes)
    except UnidentifiedImageError:
        return [f"mask {rel} is not a decodable image"], None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return [f"unreadable mask {rel} ({error})"], None
    if size is not None and values.shape != size:
        return [
            f"mask {rel} size {values.shape[1]}x{values.shape[0]} != image size "
            f"{size[1]}x{size[0]} (W x H)"
        ], None
    return [], mask_classes(values)


# ---------------------------------------------------------------------- XML


@dataclass(frozen=True)
class XmlObject:
    """One ``<object>`` of a VOC annotation.

    Attributes:
        name: the class name as written.
        difficult: the ``<difficult>`` flag.
        box: ``(xmin, ymin, xmax, ymax)`` in pixels (1-based, inclusive, as in VOC), or None.
    """

    name: str
    difficult: bool
    box: tuple[int, int, int, int] | None


def parse_xml(path: Path) -> tuple[tuple[int, int] | None, list[XmlObject]]:
    """The ``(H, W)`` from ``<size>`` (None if absent) and the objects of a VOC XML.

    Raises:
        ValueError: not well-formed XML, no ``<annotation>`` root, or an object without a name.
        OSError: unreadable file.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"not well-formed XML ({error})") from error
    if root.tag != "annotation":
        raise ValueError(f"root element <{root.tag}>, expected <annotation>")
    size = None
    node = root.find("size")
    if node is not None:
        try:
            size = (int(node.findtext("height", "")), int(node.findtext("width", "")))
        except ValueError:
            size = None
    objects = []
    for obj in root.findall("object"):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise ValueError("an <object> without a <name>")
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        box = None
        bnd = obj.find("bndbox")
        if bnd is not None:
            try:
                box = tuple(
                    int(float(bnd.findtext(t, ""))) for t in ("xmin", "ymin", "xmax", "ymax")
                )
            except ValueError:
                box = None
        objects.append(XmlObject(name, difficult, box))  # type: ignore[arg-type]
    return size, objects


def xml_tags(objects: Sequence[XmlObject], class_names: Sequence[str]) -> tuple[int, ...]:
    """0-based class indices named by the objects (difficult included), sorted, unique.

    Raises:
        ValueError: an object name that is not a class name.
    """
    index = {n: i for i, n in enumerate(class_names)}
    unknown = sorted({o.name for o in objects if o.name not in index})
    if unknown:
        raise ValueError(f"unknown object class name(s) {unknown}")
    return tuple(sorted({index[o.name] for o in objects}))


# ---------------------------------------------------------------------- cls_labels.npy


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dtypes and scalars inside plain containers; nothing else."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        **{
            (module, name): getattr(_multiarray, name)
            for module in ("numpy.core.multiarray", "numpy._core.multiarray")
            for name in ("_reconstruct", "scalar")
        },
    }

    def find_class(self, module: str, name: str) -> Any:
        """Resolve only the allow-listed numpy globals."""
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused global {module}.{name} (not numpy data)")
        return found


def _read_object_npy(path: Path) -> Any:
    """The object of a 0-d object ``.npy`` file, through the restricted unpickler."""
    with open(path, "rb") as handle:
        version = npy_format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(handle)
        else:
            shape, _, dtype = npy_format.read_array_header_2_0(handle)
        if dtype != np.dtype(object):
            raise ValueError(f"a {dtype} array of shape {shape}, not a pickled dict")
        array = _ArrayUnpickler(handle).load()
    if not isinstance(array, np.ndarray) or array.shape != ():
        raise ValueError(f"holds {type(array).__name__} {getattr(array, 'shape', '')}, not a dict")
    return array.item()


def decode_int_name(key: int) -> str:
    """IRNet's integer-encoded image name back to the VOC name: 2007000032 -> 2007_000032."""
    s = str(int(key))
    return f"{s[:4]}_{s[4:]}"


def load_cls_labels(path: str | Path, num_classes: int = len(VOC_CLASSES)) -> dict[str, np.ndarray]:
    """Read a SEAM/IRNet/RTC ``cls_labels.npy`` safely and check it.

    Args:
        path: the file.
        num_classes: expected vector length (20 for VOC).

    Returns:
        name -> (num_classes,) uint8 multi-hot, names as in the VOC lists (integer keys of
        IRNet are decoded with :func:`decode_int_name`).

    Raises:
        DatasetError: unreadable file, refused content, not a dict, or an entry that is not a
            ``num_classes``-vector of 0/1 (the message names the file and the first bad key).
    """
    path = Path(path)
    try:
        content = _read_object_npy(path)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, TypeError) as error:
        raise DatasetError(
            f"{path}: not a cls_labels.npy (a pickled dict name -> {num_classes} floats, as "
            f"SEAM/IRNet ship it): {error}"
        ) from error
    if not isinstance(content, dict):
        raise DatasetError(
            f"{path}: holds a {type(content).__name__}, expected a dict name -> "
            f"{num_classes}-vector"
        )
    labels: dict[str, np.ndarray] = {}
    for key, value in content.items():
        if isinstance(key, str):
            name = key
        elif isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            name = decode_int_name(int(key))
        else:
            raise DatasetError(f"{path}: key {key!r} is neither an image name nor an integer")
        vector = np.asarray(value) if isinstance(value, (np.ndarray, list, tuple)) else None
        if vector is None or vector.shape != (num_classes,) or vector.dtype == object:
            shape = getattr(vector, "shape", type(value).__name__)
            raise DatasetError(
                f"{path}: entry {key!r} is {shape}, expected a ({num_classes},) multi-hot vector"
            )
        if not np.isin(vector, (0, 1)).all():
            raise DatasetError(f"{path}: entry {key!r} has values other than 0 and 1")
        labels[name] = vector.astype(np.uint8)
    return labels
