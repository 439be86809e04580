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
builder then records any failure instead of crashing (see :mod:`datasets.cache`). The checks of
the layout, the lists, each image and each trimap live in :mod:`datasets.pet_checks`.
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

from datasets.conventions import DatasetError
from datasets.imaging import FileHashes, decode_image, read_trimap
from datasets.pet_checks import (
    IMAGE_EXTENSIONS,
    LAYOUT_HELP,
    MAX_CLASS_ID,
    OXFORD_PET_URL,
    ListEntry,
    Problems,
    check_image,
    check_layout,
    check_trimap,
    read_lists,
    relative,
)
from datasets.registry import register_dataset

logger = logging.getLogger(__name__)

__all__ = [  # the file checks live in datasets.pet_checks; their public names re-exported here
    "IMAGE_EXTENSIONS",
    "LABEL_KINDS",
    "LAYOUT_HELP",
    "MAX_CLASS_ID",
    "OXFORD_PET_URL",
    "Exclusion",
    "OxfordPet",
    "Record",
    "data_home",
]

#: Accepted values of the ``label`` parameter.
LABEL_KINDS = ("breed", "species")


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


class RecordAccess:
    """Access to a validated dataset's usable records (shared by the Pet and VOC loaders).

    The host sets ``name``, ``root``, ``records``, ``exclusions``, ``_by_name`` (name ->
    record) and ``_sizes`` (name -> (H, W)); ``repr_label`` names the attribute shown in
    ``repr`` and ``unknown_name`` the reason given for a name that was never listed.
    """

    name: str
    root: Path
    records: list[Any]
    exclusions: list[Exclusion]
    _by_name: dict[str, Any]
    _sizes: dict[str, tuple[int, int]]
    repr_label: tuple[str, str] = ("label", "label_kind")  # (shown as, attribute)
    unknown_name: str = "not in the dataset"

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        shown, attribute = self.repr_label
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, {shown}={getattr(self, attribute)!r}, "
            f"usable={len(self.records)}, excluded={len(self.exclusions)})"
        )

    def record(self, name: str) -> Any:
        """The usable record called ``name``.

        Raises:
            KeyError: no usable image of that name (the message says if it was excluded).
        """
        try:
            return self._by_name[name]
        except KeyError:
            why = [e.reason for e in self.exclusions if e.name == name]
            detail = f"excluded: {why[0]}" if why else self.unknown_name
            raise KeyError(f"{self.name}: no usable image {name!r} ({detail})") from None

    def image_size(self, record: Any) -> tuple[int, int]:
        """(H, W) of the record's image, read from its header at construction."""
        return self._sizes[record.name]


@register_dataset
class OxfordPet(RecordAccess):
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
        self._file_hash = FileHashes()  # fingerprint file hashes, cached
        self._head_boxes: dict[str, tuple[int, int, int, int] | None] = {}
        check_layout(self.name, self.root)
        self._scan()

    # ------------------------------------------------------------------ layout and lists

    def _rel(self, path: Path) -> str:
        return relative(path, self.root)

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

    def _scan(self) -> None:
        """Check every image file against the lists; set records, sizes and exclusions.

        Raises:
            DatasetError: no image is usable (the first exclusions are shown).
        """
        problems: Problems = defaultdict(list)
        entries, split_of, listing = read_lists(self.root, problems)
        files = sorted(
            p
            for p in (self.root / "images").iterdir()
            if p.is_file() and not p.name.startswith(".")
        )
        self.image_file_names: tuple[str, ...] = tuple(p.name for p in files)
        by_name, exclusions = self._index_images(files)
        usable: list[tuple[str, Path, Path, ListEntry]] = []
        self._sizes: dict[str, tuple[int, int]] = {}
        for name, path in by_name.items():
            line_problems = problems.pop(name, [])
            excluded, notes, size = self._check_pair(
                name, path, name in entries or bool(line_problems), line_problems, listing
            )
            if excluded is not None:
                exclusions.append(excluded)
                continue
            if notes:
                logger.info("%s: %s (decoded by content)", self._rel(path), "; ".join(notes))
            trimap_path = self.root / "annotations" / "trimaps" / f"{name}.png"
            usable.append((name, path, trimap_path, entries[name]))
            assert size is not None
            self._sizes[name] = size
        exclusions.extend(_unmatched(entries, by_name, problems))
        if not usable:
            raise self._no_usable_image(len(files), exclusions)
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

    def _index_images(self, files: list[Path]) -> tuple[dict[str, Path], list[Exclusion]]:
        """Image files by name, and the exclusions of unexpected types and duplicate names."""
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
        return by_name, exclusions

    def _check_pair(
        self,
        name: str,
        path: Path,
        listed: bool,
        line_problems: list[tuple[str, str]],
        listing: str,
    ) -> tuple[Exclusion | None, list[str], tuple[int, int] | None]:
        """Check one image and its trimap.

        Args:
            name: the image name.
            path: the image file.
            listed: whether the lists name it (with or without a faulty line).
            line_problems: (file, reason) of its faulty list lines.
            listing: the description of the listing, for "not in ..." messages.

        Returns:
            Its exclusion (None if usable), notes on its file, and its (H, W) if decoded.
        """
        images_dir = self.root / "images"
        trimaps_dir = self.root / "annotations" / "trimaps"
        reasons: list[tuple[str, str]] = []
        if not listed:
            reasons.append((self._rel(path), f"not in {listing}"))
        reasons.extend(line_problems)
        trimap_path = trimaps_dir / f"{name}.png"
        outside = self._outside_root(path, images_dir)
        if outside:
            reasons.append((self._rel(path), outside))
            image_problems, notes, size = [], [], None
        else:
            image_problems, notes, size = check_image(path, self._verify)
        reasons.extend((self._rel(path), reason) for reason in image_problems)
        outside = self._outside_root(trimap_path, trimaps_dir)
        if outside:
            trimap_problems = [outside]
        else:
            trimap_problems = check_trimap(trimap_path, self._rel(trimap_path), size)
        if reasons:
            text = "; ".join([r for _, r in reasons] + notes + trimap_problems)
            return Exclusion(name, reasons[0][0], text), notes, size
        if trimap_problems:
            text = "; ".join(notes + trimap_problems)
            return Exclusion(name, self._rel(trimap_path), text), notes, size
        return None, notes, size

    def _no_usable_image(self, n_files: int, exclusions: list[Exclusion]) -> DatasetError:
        """The error for a root without one usable image, showing the first exclusions."""
        shown = "\n".join(f"  {e.file}: {e.reason}" for e in exclusions[:10])
        return DatasetError(
            f"{self.name}: no usable image under {self.root} "
            f"({n_files} files in images/, {len(exclusions)} excluded)"
            + (f":\n{shown}" if shown else ".")
            + f"\n{LAYOUT_HELP}"
        )

    def _build_records(
        self, usable: list[tuple[str, Path, Path, ListEntry]], split_of: dict[str, str]
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


def _unmatched(
    entries: dict[str, ListEntry], by_name: dict[str, Path], problems: Problems
) -> list[Exclusion]:
    """Exclusions of listed names without an image, and of names known only by bad lines."""
    exclusions = []
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
    return exclusions
