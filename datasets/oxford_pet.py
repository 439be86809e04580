"""The Oxford-IIIT Pet dataset (Parkhi et al., CVPR 2012), read from its own layout.

Layout (the release's two archives extracted into one root)::

    <root>/images/*.jpg                 RGB photos (a few hold PNG/GIF bytes: decoded by content)
    <root>/annotations/trimaps/*.png    1 = pet, 2 = background, 3 = border
    <root>/annotations/list.txt         name, class id 1..37, species 1 cat / 2 dog, breed id
    <root>/annotations/trainval.txt     the official split (same columns)
    <root>/annotations/test.txt
    <root>/annotations/xmls/*.xml       head boxes (PASCAL VOC format, trainval only; optional)

``#`` header lines in the lists are skipped (the full release has six, some copies none).
``list.txt`` may be absent when ``trainval.txt`` and ``test.txt`` are present.

Labels. ``label="breed"`` (default) or ``label="species"``. Breed labels are **compacted** to
the breeds present among the usable images, in class-id order: on the full release this is
simply ``class id - 1`` (37 classes); on a subset (the 3-breed sample, a synthetic set) the
labels are 0..k-1 and ``label_ids[i]`` gives the release's class id (1..37) of label ``i``.
``Record.breed`` always keeps the release's 0-based class id (``class id - 1``). Species labels
are always ``0 = cat, 1 = dog`` (``num_classes = 2``). Class names come from the image-name
prefix (``american_bulldog_12`` -> ``american_bulldog``).

Validation. Every image is checked once, at construction: header and (with the default
``verify="full"``) a full decode (JPEGs in draft mode, which still reads every byte, so
truncation is caught), and every trimap's pixels. An unusable image becomes an
:class:`Exclusion` with a human-readable reason; nothing raises except an unusable root
(:class:`~datasets.DatasetError`). With full verification the image cache never meets an
undecodable file; ``verify="header"`` skips the full decode for very large sets, and the cache
builder then records any failure instead of crashing (see :mod:`datasets.cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets.conventions import DatasetError
from datasets.imaging import decode_image, file_sha256, read_trimap
from datasets.registry import register_dataset

logger = logging.getLogger(__name__)

#: Where the data comes from.
OXFORD_PET_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/"
#: Class ids of the release are 1..MAX_CLASS_ID.
MAX_CLASS_ID = 37
#: Accepted values of the ``label`` parameter.
LABEL_KINDS = ("breed", "species")
#: File name endings accepted in images/ (content is still sniffed, never trusted).
IMAGE_EXTENSIONS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}

LAYOUT_HELP = f"""Expected layout:
  <root>/images/*.jpg
  <root>/annotations/trimaps/*.png
  <root>/annotations/list.txt  (or annotations/trainval.txt + annotations/test.txt)
  <root>/annotations/xmls/*.xml  (optional head boxes)
Get the data from {OXFORD_PET_URL} (images.tar.gz and annotations.tar.gz, both extracted
into <root>), and pass root=<root> or set WSSS_BENCH_DATA so that <root> is
$WSSS_BENCH_DATA/oxford-pet."""


def data_home() -> Path:
    """Base folder for datasets: ``$WSSS_BENCH_DATA``, else ``~/.cache/wsss-bench``."""
    env = os.environ.get("WSSS_BENCH_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wsss-bench"


@dataclass(frozen=True)
class Record:
    """One usable image.

    Attributes:
        name: image name without extension (``Abyssinian_101``).
        image_path: the image file.
        trimap_path: its trimap file.
        label: 0-based class index under the dataset's ``label_kind``.
        breed: the release's 0-based class id (class id 1..37 minus one).
        species: 0 = cat, 1 = dog.
        official_split: ``"trainval"``, ``"test"``, or ``None`` if in neither list.
    """

    name: str
    image_path: Path
    trimap_path: Path
    label: int
    breed: int
    species: int
    official_split: str | None


@dataclass(frozen=True)
class Exclusion:
    """One unusable file (or list entry) and why.

    Attributes:
        name: image name without extension.
        file: the offending file, relative to the dataset root.
        reason: human-readable reasons, joined by ``"; "``.
    """

    name: str
    file: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """JSON-able form."""
        return {"name": self.name, "file": self.file, "reason": self.reason}


@dataclass(frozen=True)
class _ListEntry:
    class_id: int
    species: int
    breed_id: int
    source: str


def _find_dataset_below(root: Path) -> Path | None:
    """A child (or grandchild) of ``root`` that looks like the dataset root, for hints."""
    if not root.is_dir():
        return None
    for child in sorted(root.iterdir()):
        for candidate in (child, *(sorted(child.iterdir()) if child.is_dir() else ())):
            if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
                return candidate
    return None


@register_dataset
class OxfordPet:
    """Oxford-IIIT Pet from its release layout, with validation and exclusion reasons.

    Args:
        root: dataset root; default ``$WSSS_BENCH_DATA/oxford-pet`` (or
            ``~/.cache/wsss-bench/oxford-pet``).
        label: ``"breed"`` or ``"species"``.
        verify: ``"full"`` (decode every image once) or ``"header"`` (headers only).

    Raises:
        DatasetError: the root is missing or mis-laid, or no image is usable.
        ValueError: unknown ``label`` or ``verify``.
    """

    name = "oxford_pet"

    def __init__(
        self, root: str | Path | None = None, *, label: str = "breed", verify: str = "full"
    ) -> None:
        if label not in LABEL_KINDS:
            raise ValueError(f"unknown label kind {label!r}; valid: {', '.join(LABEL_KINDS)}")
        if verify not in ("full", "header"):
            raise ValueError(f"unknown verify mode {verify!r}; valid: full, header")
        self.root = Path(root).expanduser() if root is not None else data_home() / "oxford-pet"
        self.label_kind = label
        self.params: dict[str, Any] = {"label": label}
        self._verify = verify
        self._hashes: dict[Path, tuple[int, int, str]] = {}
        self._head_boxes: dict[str, tuple[int, int, int, int] | None] = {}
        self._check_layout()
        self._scan()

    # ------------------------------------------------------------------ layout and lists

    def _rel(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def _check_layout(self) -> None:
        root, ann = self.root, self.root / "annotations"
        if not root.exists():
            what = f"dataset root {root} does not exist"
        elif not root.is_dir():
            what = f"dataset root {root} is not a folder"
        else:
            missing = [
                rel
                for rel, ok in (
                    ("images/", (root / "images").is_dir()),
                    ("annotations/trimaps/", (ann / "trimaps").is_dir()),
                    (
                        "annotations/list.txt (or trainval.txt + test.txt)",
                        (ann / "list.txt").is_file()
                        or ((ann / "trainval.txt").is_file() and (ann / "test.txt").is_file()),
                    ),
                )
                if not ok
            ]
            if not missing:
                return
            what = f"{root} is not an Oxford-IIIT Pet root: missing {', '.join(missing)}"
        hint = ""
        below = _find_dataset_below(root)
        if below is not None:
            hint = f"\nHint: {below} looks like the dataset root; pass root={below}."
        raise DatasetError(f"{self.name}: {what}.\n{LAYOUT_HELP}{hint}")

    def _parse_list(
        self, path: Path, problems: dict[str, list[tuple[str, str]]]
    ) -> dict[str, _ListEntry]:
        rel = self._rel(path)
        try:
            # utf-8-sig: a byte-order mark (Windows editors) is not part of the first name
            text = path.read_text(encoding="utf-8-sig", errors="replace")
        except OSError as error:
            raise DatasetError(f"{path}: cannot read list file: {error}") from error
        entries: dict[str, _ListEntry] = {}
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            name, where = parts[0], f"{rel} line {lineno}"
            if len(parts) != 4:
                problems[name].append(
                    (
                        rel,
                        f"{where}: expected 4 columns (name, class id, species, breed id), "
                        f"got {len(parts)}",
                    )
                )
                continue
            try:
                class_id, species, breed_id = (int(p) for p in parts[1:])
            except ValueError:
                problems[name].append((rel, f"{where}: non-integer id in {line!r}"))
                continue
            if not 1 <= class_id <= MAX_CLASS_ID:
                problems[name].append(
                    (rel, f"{where}: unknown class id {class_id} (expected 1..{MAX_CLASS_ID})")
                )
                continue
            if species not in (1, 2):
                problems[name].append(
                    (rel, f"{where}: unknown species {species} (expected 1 = cat, 2 = dog)")
                )
                continue
            if breed_id < 1:
                problems[name].append((rel, f"{where}: breed id {breed_id} is not positive"))
                continue
            entry = _ListEntry(class_id, species, breed_id, rel)
            previous = entries.get(name)
            if previous is not None and (previous.class_id, previous.species) != (
                class_id,
                species,
            ):
                problems[name].append((rel, f"{where}: listed again with different ids"))
                continue
            entries[name] = entry
        return entries

    def _read_lists(
        self, problems: dict[str, list[tuple[str, str]]]
    ) -> tuple[dict[str, _ListEntry], dict[str, str], str]:
        """Entries by name, official split by name, and the description of the listing."""
        ann = self.root / "annotations"
        split_of: dict[str, str] = {}
        split_entries: dict[str, _ListEntry] = {}
        for split in ("trainval", "test"):
            path = ann / f"{split}.txt"
            if not path.is_file():
                continue
            for name, entry in self._parse_list(path, problems).items():
                if name in split_of and split_of[name] != split:
                    problems[name].append(
                        (entry.source, "listed in both annotations/trainval.txt and test.txt")
                    )
                    continue
                split_of[name] = split
                split_entries[name] = entry
        main = ann / "list.txt"
        if not main.is_file():
            return split_entries, split_of, "annotations/trainval.txt or test.txt"
        entries = self._parse_list(main, problems)
        for name, entry in split_entries.items():
            listed = entries.get(name)
            if listed is None:
                entries[name] = entry
            elif listed.class_id != entry.class_id:
                problems[name].append(
                    (
                        entry.source,
                        f"class id {listed.class_id} in annotations/list.txt but "
                        f"{entry.class_id} in {entry.source}",
                    )
                )
        return entries, split_of, "annotations/list.txt"

    # ------------------------------------------------------------------ validation

    def _outside_root(self, path: Path, folder: Path) -> str | None:
        """Why ``path`` is refused if a link takes it outside the dataset, else ``None``.

        A file may be a link within the dataset root, or within its own folder's target (a
        whole ``images/`` folder linked to another disk is fine); a link to anywhere else
        (``images/x.jpg -> /home/me/private.jpg``) is excluded and logged, never read.
        """
        if not path.is_symlink():
            return None
        target = path.resolve()
        allowed = (self.root.resolve(), folder.resolve())
        if any(target.is_relative_to(base) for base in allowed):
            return None
        logger.warning(
            "%s: a link to %s, outside the dataset root %s; excluded, not read",
            self._rel(path),
            target,
            self.root,
        )
        return f"{self._rel(path)} is a link to {target}, outside the dataset root; not read"

    def _check_image(self, path: Path) -> tuple[list[str], list[str], tuple[int, int] | None]:
        """Problems, notes and (H, W) of one image file."""
        if path.stat().st_size == 0:
            return ["zero-byte image file"], [], None
        notes: list[str] = []
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            return ["not a decodable image (no known image format in its bytes)"], [], None
        except Image.DecompressionBombError as error:
            return [f"image too large to decode safely ({error})"], [], None
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            return [f"unreadable image header ({error})"], [], None
        with image:
            fmt, (width, height) = image.format, image.size
            expected = IMAGE_EXTENSIONS.get(path.suffix.lower())
            if fmt != expected:
                notes.append(f"{fmt} bytes under a {path.suffix} name")
            if self._verify == "full":
                try:
                    if fmt == "JPEG":
                        image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                    image.load()
                except Image.DecompressionBombError as error:
                    return [f"image too large to decode safely ({error})"], notes, None
                except (OSError, SyntaxError, ValueError, EOFError) as error:
                    kind = "truncated" if "truncated" in str(error) else "corrupt"
                    return [f"{kind} image data ({error})"], notes, None
        return [], notes, (height, width)

    def _check_trimap(self, path: Path, size: tuple[int, int] | None) -> list[str]:
        rel = self._rel(path)
        if not path.is_file():
            return [f"missing trimap {rel}"]
        if path.stat().st_size == 0:
            return [f"trimap {rel} is a zero-byte file"]
        try:
            values = read_trimap(path)
        except UnidentifiedImageError:
            return [f"trimap {rel} is not a decodable image"]
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            return [f"unreadable trimap {rel} ({error})"]
        reasons = []
        if size is not None and values.shape != size:
            reasons.append(
                f"trimap size {values.shape[1]}x{values.shape[0]} != image size "
                f"{size[1]}x{size[0]} (W x H)"
            )
        counts = np.bincount(values.ravel(), minlength=256)
        outside = [int(v) for v in np.flatnonzero(counts) if v not in (1, 2, 3)]
        if outside:
            shown = ", ".join(map(str, outside[:8])) + (", ..." if len(outside) > 8 else "")
            reasons.append(f"trimap values outside {{1, 2, 3}}: {shown}")
        if counts[1] == 0:
            if counts[2] > 0 and counts[3] == 0 and not outside:
                reasons.append("trimap is all background")
            else:
                reasons.append("trimap has no pet pixel (value 1)")
        return reasons

    def _scan(self) -> None:
        problems: dict[str, list[tuple[str, str]]] = defaultdict(list)
        entries, split_of, listing = self._read_lists(problems)
        images_dir = self.root / "images"
        trimaps_dir = self.root / "annotations" / "trimaps"
        files = sorted(
            p for p in images_dir.iterdir() if p.is_file() and not p.name.startswith(".")
        )
        self.image_file_names: tuple[str, ...] = tuple(p.name for p in files)
        exclusions: list[Exclusion] = []
        by_name: dict[str, Path] = {}
        for path in files:
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                exclusions.append(
                    Exclusion(
                        path.stem,
                        self._rel(path),
                        f"unexpected file type {path.suffix or '(no extension)'} in images/ "
                        "(expected .jpg)",
                    )
                )
            elif path.stem in by_name:
                exclusions.append(
                    Exclusion(
                        path.stem,
                        self._rel(path),
                        f"duplicate image name: {self._rel(by_name[path.stem])} is used",
                    )
                )
            else:
                by_name[path.stem] = path

        usable: list[tuple[str, Path, Path, _ListEntry]] = []
        self._sizes: dict[str, tuple[int, int]] = {}
        for name, path in by_name.items():
            reasons: list[tuple[str, str]] = []
            line_problems = problems.pop(name, [])
            if name not in entries and not line_problems:
                reasons.append((self._rel(path), f"not in {listing}"))
            reasons.extend(line_problems)
            trimap_path = trimaps_dir / f"{name}.png"
            outside = self._outside_root(path, images_dir)
            if outside:
                reasons.append((self._rel(path), outside))
                image_problems, notes, size = [], [], None
            else:
                image_problems, notes, size = self._check_image(path)
            reasons.extend((self._rel(path), reason) for reason in image_problems)
            outside = self._outside_root(trimap_path, trimaps_dir)
            if outside:
                trimap_problems = [outside]
            else:
                trimap_problems = self._check_trimap(trimap_path, size)
            if reasons:
                text = "; ".join([r for _, r in reasons] + notes + trimap_problems)
                exclusions.append(Exclusion(name, reasons[0][0], text))
            elif trimap_problems:
                text = "; ".join(notes + trimap_problems)
                exclusions.append(Exclusion(name, self._rel(trimap_path), text))
            else:
                if notes:
                    logger.info("%s: %s (decoded by content)", self._rel(path), "; ".join(notes))
                usable.append((name, path, trimap_path, entries[name]))
                assert size is not None
                self._sizes[name] = size
        for name in sorted(set(entries) - set(by_name)):
            exclusions.append(
                Exclusion(
                    name,
                    f"images/{name}.jpg",
                    f"listed in {entries[name].source} but images/{name}.jpg is missing",
                )
            )
        for name, found in sorted(problems.items()):
            if found and name not in entries:
                exclusions.append(Exclusion(name, found[0][0], "; ".join(r for _, r in found)))

        if not usable:
            shown = "\n".join(f"  {e.file}: {e.reason}" for e in exclusions[:10])
            raise DatasetError(
                f"{self.name}: no usable image under {self.root} "
                f"({len(files)} files in images/, {len(exclusions)} excluded)"
                + (f":\n{shown}" if shown else ".")
                + f"\n{LAYOUT_HELP}"
            )
        self._build_records(usable, split_of)
        self.exclusions: list[Exclusion] = sorted(exclusions, key=lambda e: (e.name, e.file))
        if self.exclusions:
            logger.warning(
                "%s: %d of %d image files usable, %d exclusions (see .exclusions or check()); "
                "first: %s: %s",
                self.root,
                len(self.records),
                len(files),
                len(self.exclusions),
                self.exclusions[0].file,
                self.exclusions[0].reason,
            )

    def _build_records(
        self, usable: list[tuple[str, Path, Path, _ListEntry]], split_of: dict[str, str]
    ) -> None:
        if self.label_kind == "breed":
            ids = sorted({entry.class_id for *_, entry in usable})
            prefixes: dict[int, Counter[str]] = defaultdict(Counter)
            for name, *_, entry in usable:
                prefixes[entry.class_id][name.rsplit("_", 1)[0]] += 1
            names = [prefixes[i].most_common(1)[0][0] for i in ids]
        else:
            ids, names = [1, 2], ["cat", "dog"]
        index = {class_id: i for i, class_id in enumerate(ids)}
        #: The release's id (class id 1..37, or species 1..2) of each label index.
        self.label_ids: list[int] = ids
        self.class_names: list[str] = names
        self.num_classes: int = len(names)
        records = []
        for name, path, trimap_path, entry in sorted(usable, key=lambda u: u[0]):
            key = entry.class_id if self.label_kind == "breed" else entry.species
            records.append(
                Record(
                    name=name,
                    image_path=path,
                    trimap_path=trimap_path,
                    label=index[key],
                    breed=entry.class_id - 1,
                    species=entry.species - 1,
                    official_split=split_of.get(name),
                )
            )
        self.records: list[Record] = records
        self._by_name = {r.name: r for r in records}

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, label={self.label_kind!r}, "
            f"usable={len(self.records)}, excluded={len(self.exclusions)})"
        )

    def record(self, name: str) -> Record:
        """The usable record called ``name``.

        Raises:
            KeyError: no usable image of that name (the message says if it was excluded).
        """
        try:
            return self._by_name[name]
        except KeyError:
            why = [e.reason for e in self.exclusions if e.name == name]
            detail = f"excluded: {why[0]}" if why else "not in the dataset"
            raise KeyError(f"{self.name}: no usable image {name!r} ({detail})") from None

    def image_size(self, record: Record) -> tuple[int, int]:
        """(H, W) of the record's image, read from its header at construction."""
        return self._sizes[record.name]

    def load_image(self, record: Record) -> np.ndarray:
        """Decode the record's image to (H, W, 3) uint8 RGB (see :func:`datasets.imaging.to_rgb`).

        Raises:
            DatasetError: the file cannot be decoded (it changed since validation, or the
                dataset was built with ``verify="header"``).
        """
        try:
            return decode_image(record.image_path)
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise DatasetError(f"{record.image_path}: cannot decode image ({error})") from error

    def load_trimap(self, record: Record) -> np.ndarray:
        """The record's trimap as an (H, W) uint8 array of raw values 1/2/3.

        Raises:
            DatasetError: the file cannot be read.
        """
        try:
            return read_trimap(record.trimap_path)
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise DatasetError(f"{record.trimap_path}: cannot read trimap ({error})") from error

    def head_box(self, record: Record) -> tuple[int, int, int, int] | None:
        """The head box ``(xmin, ymin, xmax, ymax)`` from annotations/xmls, or None if absent."""
        if record.name not in self._head_boxes:
            path = self.root / "annotations" / "xmls" / f"{record.name}.xml"
            box = None
            if path.is_file():
                try:
                    node = ET.parse(path).getroot().find("object/bndbox")
                    if node is not None:
                        box = tuple(
                            int(float(node.findtext(tag, "")))
                            for tag in ("xmin", "ymin", "xmax", "ymax")
                        )
                except (ET.ParseError, ValueError, OSError) as error:
                    logger.warning("%s: unreadable head box (%s); ignored", path, error)
            self._head_boxes[record.name] = box  # type: ignore[assignment]
        return self._head_boxes[record.name]

    # ------------------------------------------------------------------ identity

    def _file_hash(self, path: Path) -> str:
        stat = path.stat()
        cached = self._hashes.get(path)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = file_sha256(path)
        self._hashes[path] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest

    def fingerprint(self) -> str:
        """SHA-256 over name, params, classes and every record's name, label and file hashes.

        File hashes are cached in memory (keyed by path, size and mtime).
        """
        digest = hashlib.sha256()
        header = {
            "dataset": self.name,
            "params": self.params,
            "class_names": self.class_names,
            "label_ids": self.label_ids,
        }
        digest.update(json.dumps(header, sort_keys=True).encode())
        for r in self.records:
            line = (
                f"{r.name}\t{r.label}\t{self._file_hash(r.image_path)}\t"
                f"{self._file_hash(r.trimap_path)}\n"
            )
            digest.update(line.encode())
        return digest.hexdigest()

    def check(self) -> dict[str, Any]:
        """A JSON-able summary: counts, exclusions with reasons, classes and official splits."""
        splits = Counter(r.official_split or "unassigned" for r in self.records)
        summary_splits = {"trainval": splits.get("trainval", 0), "test": splits.get("test", 0)}
        if splits.get("unassigned"):
            summary_splits["unassigned"] = splits["unassigned"]
        return {
            "dataset": self.name,
            "root": str(self.root),
            "image_files": len(self.image_file_names),
            "usable": len(self.records),
            "excluded": [e.to_dict() for e in self.exclusions],
            "num_classes": self.num_classes,
            "classes": list(self.class_names),
            "splits": summary_splits,
        }
