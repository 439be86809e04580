"""PASCAL VOC 2012 (Everingham et al., IJCV 2010) for multi-class WSSS, from the VOCdevkit layout.

Layout (``root`` = ``VOCdevkit/`` or ``VOCdevkit/VOC2012/``; see ``LAYOUT_HELP``):
``JPEGImages/*.jpg``; ``SegmentationClass/*.png`` (palette PNGs, index = class 0..20, 255 on
object boundaries); optional ``SegmentationClassAug/*.png`` (SBD, plain or palette);
``Annotations/*.xml``; ``ImageSets/Segmentation/{train,val}.txt`` (1,464 / 1,449) and
``train_aug.txt`` (10,582, where SEAM/IRNet keep it; ``trainaug.txt`` too); optional
``cls_labels.npy``. List lines are bare names or SEAM's ``/JPEGImages/x.jpg /Seg.../x.png``.

Image-level labels (multi-hot over the classes) come from one source, ``labels=``:
``"xml"`` (every object name of ``Annotations/<name>.xml``, difficult objects included, as
SEAM/IRNet's ``load_image_label_from_xml`` does), ``"masks"`` (classes present in the mask
other than 0 and 255: ``SegmentationClass``, else ``SegmentationClassAug``), ``"cls_labels"``
(a ``cls_labels.npy``, read safely: see :func:`datasets.voc_format.load_cls_labels`), or
``"auto"`` (cls_labels if the file exists, else xml if ``Annotations/`` exists, else masks).
:attr:`VOC2012.label_source` says which was used, and the loader logs it.

The standard protocol (:meth:`VOC2012.make_split`, :meth:`VOC2012.protocol_parts`):
classifiers train on ``train_aug`` with tags only; pseudo masks are scored on ``train``; the
segmenter is tested on ``val``. Validation (threshold choice) is a seeded fixed fraction of
the ``train`` images (which have GT masks), never taken from ``val``; those images leave the
scoring part, not the classifier's training set (the literature trains on them too).

Validation mirrors :class:`~datasets.oxford_pet.OxfordPet`: every listed image, mask and XML
is checked once at construction; an unusable image becomes an
:class:`~datasets.oxford_pet.Exclusion` whose reason names the file (``train``/``val`` images
need their ``SegmentationClass`` mask). Mask / XML / cls_labels disagreements are reported by
:meth:`VOC2012.check`, never silently fixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasets.conventions import IGNORE, DatasetError
from datasets.imaging import FileHashes, decode_image
from datasets.oxford_pet import Exclusion, RecordAccess, data_home
from datasets.registry import register_dataset
from datasets.splits import Split
from datasets.voc_format import (
    LAYOUT_HELP,
    SEGMENTATION_LISTS,
    VOC_CLASSES,
    ImageFindings,
    check_image,
    check_mask_file,
    find_voc_below,
    find_voc_root,
    format_summary,
    link_outside,
    load_cls_labels,
    parse_list,
    parse_xml,
    read_mask,
    rel_path,
    tag_disagreements,
    xml_tags,
)

logger = logging.getLogger(__name__)

#: Accepted values of the ``labels`` parameter.
LABEL_SOURCES = ("xml", "masks", "cls_labels", "auto")
#: List names, in protocol order.
LISTS = ("train_aug", "train", "val")
#: File names accepted for each list under ImageSets/Segmentation/ (first found is used).
LIST_FILES: dict[str, tuple[str, ...]] = {
    "train": ("train.txt",),
    "val": ("val.txt",),
    "train_aug": ("train_aug.txt", "trainaug.txt"),
}


@dataclass(frozen=True)
class VocRecord:
    """One usable image.

    Attributes:
        name: image name without extension (``2007_000032``).
        image_path: the JPEG.
        mask_path: its ``SegmentationClass`` mask, or None.
        aug_mask_path: its ``SegmentationClassAug`` mask, or None.
        xml_path: its ``Annotations`` XML, or None.
        labels: 0-based classes of its image-level tags (from the dataset's label source).
        lists: names of the lists (``train_aug``, ``train``, ``val``) holding it.
        label: the same tags as a multi-hot tuple over the dataset's classes (what the image
            cache stores as the image's label row).
    """

    name: str
    image_path: Path
    mask_path: Path | None
    aug_mask_path: Path | None
    xml_path: Path | None
    labels: tuple[int, ...]
    lists: tuple[str, ...]
    label: tuple[int, ...]

    @property
    def has_mask(self) -> bool:
        """True when a GT (or SBD) mask exists."""
        return self.mask_path is not None or self.aug_mask_path is not None


@register_dataset
class VOC2012(RecordAccess):
    """PASCAL VOC 2012 segmentation, multi-label tags, the WSSS protocol splits.

    Args:
        root: ``VOCdevkit/`` or ``VOCdevkit/VOC2012/``; default ``$WSSS_BENCH_DATA/VOCdevkit``.
        labels: label source, one of :data:`LABEL_SOURCES`.
        cls_labels: path of a ``cls_labels.npy``; default ``<VOC2012>/cls_labels.npy``.
        verify: ``"full"`` (decode every image once) or ``"header"`` (headers only; masks are
            always decoded).
        class_names: the object classes (default the 20 VOC names, in order); mask value
            ``i + 1`` is class ``i``. Synthetic sets in the VOC layout pass their own.

    Raises:
        DatasetError: missing or mis-laid root, unusable cls_labels.npy, no usable image.
        ValueError: unknown ``labels`` or ``verify``.
    """

    name = "voc2012"
    repr_label = ("labels", "label_source")  # RecordAccess.__repr__
    unknown_name = "not in any list"  # RecordAccess.record
    label_kind = "multilabel"

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        labels: str = "auto",
        cls_labels: str | Path | None = None,
        verify: str = "full",
        class_names: Sequence[str] = VOC_CLASSES,
    ) -> None:
        if labels not in LABEL_SOURCES:
            raise ValueError(f"unknown label source {labels!r}; valid: {', '.join(LABEL_SOURCES)}")
        if verify not in ("full", "header"):
            raise ValueError(f"unknown verify mode {verify!r}; valid: full, header")
        given = Path(root).expanduser() if root is not None else data_home() / "VOCdevkit"
        self.root = self._resolve_root(given)
        self.class_names: list[str] = list(class_names)
        self.num_classes: int = len(self.class_names)
        self._verify = verify
        self._file_hash = FileHashes()  # fingerprint file hashes, cached
        cls_path = Path(cls_labels) if cls_labels is not None else self.root / "cls_labels.npy"
        self.label_source: str = self._resolve_source(labels, cls_path)
        self.params: dict[str, Any] = {"labels": labels, "label_source": self.label_source}
        self.problems: list[Exclusion] = []
        self._cls_path = cls_path
        self._cls = self._load_cls_labels(cls_path)
        self._scan()
        logger.info(
            "%s: %d usable images, labels from %s%s",
            self.root,
            len(self.records),
            self.label_source,
            f" ({cls_path})" if self.label_source == "cls_labels" else "",
        )

    # ------------------------------------------------------------------ layout

    def _resolve_root(self, given: Path) -> Path:
        if given.is_dir():
            found = find_voc_root(given)
            if found is not None:
                return found
            what = f"{given} is not a VOCdevkit or VOC2012 folder"
        else:
            what = f"dataset root {given} does not exist or is not a folder"
        below = find_voc_below(given) if given.is_dir() else None
        hint = f"\nHint: {below} looks like VOC2012; pass root={below}." if below else ""
        raise DatasetError(f"{self.name}: {what}.\n{LAYOUT_HELP}{hint}")

    def _resolve_source(self, labels: str, cls_path: Path) -> str:
        if labels == "cls_labels" and not cls_path.is_file():
            raise DatasetError(f"{self.name}: labels='cls_labels' but {cls_path} does not exist")
        if labels == "xml" and not (self.root / "Annotations").is_dir():
            raise DatasetError(
                f"{self.name}: labels='xml' but {self.root / 'Annotations'} is absent"
            )
        if labels != "auto":
            return labels
        if cls_path.is_file():
            return "cls_labels"
        return "xml" if (self.root / "Annotations").is_dir() else "masks"

    def _load_cls_labels(self, path: Path) -> dict[str, np.ndarray] | None:
        """The cls_labels dict; a bad file is an error only when it is the label source."""
        if not path.is_file():
            return None
        try:
            return load_cls_labels(path, self.num_classes)
        except DatasetError as error:
            if self.label_source == "cls_labels":
                raise
            logger.warning("%s; not used (labels from %s)", error, self.label_source)
            return None

    def _rel(self, path: Path) -> str:
        return rel_path(path, self.root)

    def _read_lists(self) -> dict[str, list[str]]:
        folder = self.root / SEGMENTATION_LISTS
        lists: dict[str, list[str]] = {}
        self.list_files: dict[str, str] = {}
        for key in LISTS:
            for file_name in LIST_FILES[key]:
                if (folder / file_name).is_file():
                    lists[key] = parse_list(folder / file_name)
                    self.list_files[key] = f"{SEGMENTATION_LISTS}/{file_name}"
                    break
        missing = [f"{SEGMENTATION_LISTS}/{k}.txt" for k in ("train", "val") if k not in lists]
        if missing:
            raise DatasetError(
                f"{self.name}: {self.root} lacks {', '.join(missing)}.\n{LAYOUT_HELP}"
            )
        if "train_aug" not in lists:
            logger.warning(
                "%s: no %s/train_aug.txt; classifiers will train on train (1,464 in VOC) only",
                self.root,
                SEGMENTATION_LISTS,
            )
        return lists

    # ------------------------------------------------------------------ validation

    def _inspect(self, name: str, lists: tuple[str, ...]) -> ImageFindings:
        """Check every file of one listed image."""
        root = self.root
        found = ImageFindings(reasons=[])
        image = root / "JPEGImages" / f"{name}.jpg"
        rel = self._rel(image)
        if not image.is_file():
            found.missing.append("images")
            found.reasons.append((rel, f"listed in {', '.join(lists)} but {rel} is missing"))
        elif outside := link_outside(image, self.root):
            found.reasons.append((rel, outside))
        else:
            problems, found.size = check_image(image, self._verify)
            found.reasons.extend((rel, f"{rel}: {p}") for p in problems)
        mask = root / "SegmentationClass" / f"{name}.png"
        needs_gt = "train" in lists or "val" in lists
        if mask.is_file():
            problems, found.mask = check_mask_file(mask, self.root, found.size, self.num_classes)
            found.reasons.extend((self._rel(mask), p) for p in problems)
        elif needs_gt:
            found.missing.append("masks")
            found.reasons.append(
                (self._rel(mask), f"in {'/'.join(lists)} but GT mask {self._rel(mask)} is missing")
            )
        aug = root / "SegmentationClassAug" / f"{name}.png"
        if aug.is_file():
            problems, found.aug = check_mask_file(aug, self.root, found.size, self.num_classes)
            found.reasons.extend((self._rel(aug), p) for p in problems)
        self._inspect_tags(name, found)
        return found

    def _inspect_tags(self, name: str, found: ImageFindings) -> None:
        """XML tags, cls_labels tags, and the reasons the label source cannot give a label."""
        xml = self.root / "Annotations" / f"{name}.xml"
        xml_error = "missing"
        if xml.is_file():
            try:
                _, objects = parse_xml(xml)
                found.xml = xml_tags(objects, self.class_names)
            except (OSError, ValueError) as error:
                xml_error = f"unreadable ({error})"
                if self.label_source != "xml":
                    self.problems.append(Exclusion(name, self._rel(xml), xml_error))
        elif (self.root / "Annotations").is_dir():
            found.missing.append("xmls")
        if self._cls is not None and name in self._cls:
            found.cls = tuple(int(i) for i in np.flatnonzero(self._cls[name]))
        source = self.label_source
        tags = self._tags(found)
        if tags is not None:
            if not tags:
                found.reasons.append((self._source_file(name), f"no class tag from {source}"))
        elif source == "xml":
            found.reasons.append(
                (self._rel(xml), f"label source xml: {self._rel(xml)} {xml_error}")
            )
        elif source == "cls_labels":
            found.reasons.append(
                (self._rel(self._cls_path), f"{name} is not a key of {self._cls_path}")
            )
        elif not any(r[0].startswith("Segmentation") for r in found.reasons):
            found.reasons.append(
                (f"SegmentationClass/{name}.png", "label source masks: the image has no mask")
            )

    def _tags(self, found: ImageFindings) -> tuple[int, ...] | None:
        if self.label_source == "xml":
            return found.xml
        if self.label_source == "cls_labels":
            return found.cls
        return found.mask if found.mask is not None else found.aug

    def _source_file(self, name: str) -> str:
        if self.label_source == "xml":
            return f"Annotations/{name}.xml"
        if self.label_source == "cls_labels":
            return self._rel(self._cls_path)
        return f"SegmentationClass/{name}.png"

    def _scan(self) -> None:
        raw = self._read_lists()
        self.listed: dict[str, int] = {k: len(v) for k, v in raw.items()}
        overlap = sorted(set(raw.get("train_aug", ())) & set(raw["val"]))
        if overlap:
            logger.warning(
                "%s: %d val images are also in train_aug (a test-set leak); dropped from "
                "train_aug (first: %s)",
                self.root,
                len(overlap),
                overlap[0],
            )
            leaked = set(overlap)
            raw["train_aug"] = [n for n in raw["train_aug"] if n not in leaked]
        self.train_aug_val_overlap: list[str] = overlap
        membership: dict[str, list[str]] = {}
        for key, names in raw.items():
            for name in names:
                membership.setdefault(name, []).append(key)
        records, exclusions = [], []
        self._sizes: dict[str, tuple[int, int]] = {}
        self._found: dict[str, ImageFindings] = {}
        for name in sorted(membership):
            lists = tuple(membership[name])
            if "train" in lists and "val" in lists:
                where = self.list_files["val"]
                exclusions.append(Exclusion(name, where, "listed in both train.txt and val.txt"))
                continue
            found = self._inspect(name, lists)
            self._found[name] = found
            if found.reasons:
                text = "; ".join(r for _, r in found.reasons)
                exclusions.append(Exclusion(name, found.reasons[0][0], text))
                continue
            records.append(self._record(name, lists, found))
            assert found.size is not None
            self._sizes[name] = found.size
        self._finish(records, exclusions)

    def _record(self, name: str, lists: tuple[str, ...], found: ImageFindings) -> VocRecord:
        root = self.root
        xml = root / "Annotations" / f"{name}.xml"
        tags = self._tags(found)
        assert tags is not None
        return VocRecord(
            name=name,
            image_path=root / "JPEGImages" / f"{name}.jpg",
            mask_path=(
                root / "SegmentationClass" / f"{name}.png" if found.mask is not None else None
            ),
            aug_mask_path=(
                root / "SegmentationClassAug" / f"{name}.png" if found.aug is not None else None
            ),
            xml_path=xml if found.xml is not None else None,
            labels=tags,
            lists=tuple(k for k in LISTS if k in lists),
            label=tuple(int(k in tags) for k in range(self.num_classes)),
        )

    def _finish(self, records: list[VocRecord], exclusions: list[Exclusion]) -> None:
        self.exclusions: list[Exclusion] = sorted(exclusions, key=lambda e: (e.name, e.file))
        if not records:
            shown = "".join(f"\n  {e.file}: {e.reason}" for e in self.exclusions[:10])
            raise DatasetError(
                f"{self.name}: no usable image under {self.root} ({len(self.exclusions)} "
                f"excluded){':' if shown else '.'}{shown}\n{LAYOUT_HELP}"
            )
        self.records: list[VocRecord] = records
        self._by_name = {r.name: r for r in records}
        self.lists: dict[str, tuple[str, ...]] = {
            key: tuple(r.name for r in records if key in r.lists) for key in self.listed
        }
        jpegs = self.root / "JPEGImages"
        self.image_file_names: tuple[str, ...] = tuple(
            sorted(p.name for p in jpegs.iterdir() if p.suffix.lower() == ".jpg")
        )
        if self.exclusions:
            first = self.exclusions[0]
            logger.warning(
                "%s: %d usable, %d exclusions (see .exclusions or check()); first: %s: %s",
                self.root,
                len(records),
                len(self.exclusions),
                first.file,
                first.reason,
            )

    # ------------------------------------------------------------------ access

    def load_image(self, record: VocRecord) -> np.ndarray:
        """Decode the record's image to (H, W, 3) uint8 RGB.

        Raises:
            DatasetError: the file cannot be decoded.
        """
        try:
            return decode_image(record.image_path)
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise DatasetError(f"{record.image_path}: cannot decode image ({error})") from error

    def load_mask(self, record: VocRecord) -> np.ndarray:
        """The record's class mask, (H, W) uint8: 0 background, 1..C classes, 255 void.

        ``SegmentationClass`` when present (palette indices, never colours), else
        ``SegmentationClassAug``.

        Raises:
            DatasetError: the image has no mask, or the file cannot be read.
        """
        path = record.mask_path or record.aug_mask_path
        if path is None:
            raise DatasetError(f"{self.name}: {record.name} has no mask (tags only)")
        try:
            return read_mask(path, self.num_classes)
        except (OSError, SyntaxError, ValueError, EOFError) as error:
            raise DatasetError(f"{path}: cannot read mask ({error})") from error

    def load_trimap(self, record: VocRecord) -> np.ndarray:
        """What the image cache reads: :meth:`load_mask`, or all 255 for a tag-only image."""
        if not record.has_mask:
            return np.full(self.image_size(record), IGNORE, dtype=np.uint8)
        return self.load_mask(record)

    def label_matrix(self, names: Sequence[str]) -> np.ndarray:
        """(N, C) uint8 multi-hot image-level labels of ``names`` (from :attr:`label_source`)."""
        out = np.zeros((len(names), self.num_classes), dtype=np.uint8)
        for i, name in enumerate(names):
            out[i, list(self.record(name).labels)] = 1
        return out

    # ------------------------------------------------------------------ protocol

    def make_split(
        self, scheme: str = "official", val_fraction: float = 0.1, seed: int = 0
    ) -> Split:
        """The WSSS protocol split of this dataset as a :class:`~datasets.splits.Split`.

        ``train`` = classifier training (train_aug, plus any train image it lacks, minus the
        validation carve; tags only for the method); ``val`` = a seeded ``val_fraction`` of the
        usable ``train`` list (GT masks; at least one image when there are two or more, never
        all); ``test`` = the usable ``val`` list. The pseudo-mask scoring part is derived:
        :meth:`protocol_parts`.

        Raises:
            ValueError: a scheme other than ``"official"``, or val_fraction outside [0, 1).
        """
        if scheme != "official":
            raise ValueError(f"{self.name}: unknown split scheme {scheme!r}; valid: official")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        pool = sorted(self.lists["train"])
        n_val = int(math.floor(val_fraction * len(pool) + 0.5))
        n_val = min(max(n_val, 1), len(pool) - 1) if val_fraction > 0 and len(pool) >= 2 else 0
        order = np.random.default_rng(seed).permutation(len(pool))
        val = sorted(pool[i] for i in order[:n_val])
        held = set(val)
        classifier = set(self.lists.get("train_aug", ())) | set(pool)
        split = Split(
            scheme=scheme,
            seed=int(seed),
            val_fraction=float(val_fraction),
            train=tuple(sorted(classifier - held)),
            val=tuple(val),
            test=tuple(sorted(self.lists["val"])),
            dataset=self.name,
        )
        logger.info("split of %s: %s, sha256 %s", self.name, split.counts(), split.sha256[:12])
        return split

    def protocol_parts(self, split: Split) -> dict[str, tuple[str, ...]]:
        """The named parts of the WSSS protocol for a split made by :meth:`make_split`.

        Returns:
            ``classifier_train`` (tags only), ``pseudo_mask_score`` (the train-list images of
            ``split.train``: pseudo masks scored on their GT), ``threshold_val`` (``split.val``),
            ``segmenter_train`` (= classifier_train, trained on pseudo masks) and
            ``segmenter_test`` (``split.test``).
        """
        train_list = set(self.lists["train"])
        return {
            "classifier_train": split.train,
            "pseudo_mask_score": tuple(n for n in split.train if n in train_list),
            "threshold_val": split.val,
            "segmenter_train": split.train,
            "segmenter_test": split.test,
        }

    # ------------------------------------------------------------------ identity and report

    def fingerprint(self) -> str:
        """SHA-256 over name, params, classes and every record's name, lists, tags and files."""
        digest = hashlib.sha256()
        header = {"dataset": self.name, "params": self.params, "class_names": self.class_names}
        digest.update(json.dumps(header, sort_keys=True).encode())
        for r in self.records:
            files = [r.image_path, r.mask_path, r.aug_mask_path]
            hashes = "\t".join(self._file_hash(p) if p else "-" for p in files)
            line = f"{r.name}\t{','.join(r.lists)}\t{','.join(map(str, r.labels))}\t{hashes}\n"
            digest.update(line.encode())
        return digest.hexdigest()

    def disagreements(self) -> list[dict[str, Any]]:
        """Images whose mask, XML and cls_labels tags differ (see :func:`tag_disagreements`)."""
        return tag_disagreements(self._found, self.class_names)

    def missing(self) -> dict[str, list[str]]:
        """Names of listed images whose image, GT mask (train/val lists) or XML is missing."""
        out: dict[str, list[str]] = {"images": [], "masks": [], "xmls": []}
        for name, found in sorted(self._found.items()):
            for kind in found.missing:
                out[kind].append(name)
        return out

    def check(self) -> dict[str, Any]:
        """A JSON-able report: counts per list, exclusions, missing files, disagreements."""
        return {
            "dataset": self.name,
            "root": str(self.root),
            "image_files": len(self.image_file_names),
            "usable": len(self.records),
            "excluded": [e.to_dict() for e in self.exclusions],
            "num_classes": self.num_classes,
            "classes": list(self.class_names),
            "splits": {k: len(v) for k, v in self.lists.items()},
            "lists": {
                k: {"file": self.list_files[k], "listed": self.listed[k], "usable": len(v)}
                for k, v in self.lists.items()
            },
            "label_source": self.label_source,
            "missing": self.missing(),
            "disagreements": self.disagreements(),
            "train_aug_val_overlap": list(self.train_aug_val_overlap),
            "problems": [p.to_dict() for p in self.problems],
        }

    def summary(self) -> str:
        """:meth:`check` as readable lines (for ``datasets check``)."""
        return format_summary(self.check())
