"""Checks of an Oxford-IIIT Pet root: its layout, its list files, each image and each trimap.

Every check returns human-readable reasons (or raises :class:`~datasets.DatasetError` for an
unusable root); :class:`~datasets.oxford_pet.OxfordPet` turns them into exclusions. The
messages name the file (relative to the dataset root) and the line where one is at fault.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from datasets.conventions import DatasetError
from datasets.imaging import read_trimap

logger = logging.getLogger(__name__)

#: Where the data comes from.
OXFORD_PET_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/"
#: Class ids of the release are 1..MAX_CLASS_ID.
MAX_CLASS_ID = 37
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

#: Problems found in the lists, by image name: (file relative to the root, reason) pairs.
Problems = dict[str, list[tuple[str, str]]]


@dataclass(frozen=True)
class ListEntry:
    """One valid line of a list file.

    Attributes:
        class_id: the release's class id, 1..37.
        species: 1 = cat, 2 = dog.
        breed_id: the breed id within its species (1..n).
        source: the list file, relative to the dataset root.
    """

    class_id: int
    species: int
    breed_id: int
    source: str


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or the full path when it is not below it."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def find_dataset_below(root: Path) -> Path | None:
    """A child (or grandchild) of ``root`` that looks like the dataset root, for hints."""
    if not root.is_dir():
        return None
    for child in sorted(root.iterdir()):
        for candidate in (child, *(sorted(child.iterdir()) if child.is_dir() else ())):
            if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
                return candidate
    return None


def check_layout(dataset: str, root: Path) -> None:
    """Raise when ``root`` lacks the release's folders and lists.

    Args:
        dataset: the dataset's registry name, at the start of the message.
        root: the dataset root.

    Raises:
        DatasetError: what is missing, the expected layout and, where a folder below looks
            like the root, a hint naming it.
    """
    ann = root / "annotations"
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
    below = find_dataset_below(root)
    if below is not None:
        hint = f"\nHint: {below} looks like the dataset root; pass root={below}."
    raise DatasetError(f"{dataset}: {what}.\n{LAYOUT_HELP}{hint}")


def parse_list(path: Path, root: Path, problems: Problems) -> dict[str, ListEntry]:
    """The valid entries of one list file, by name; faulty lines go to ``problems``.

    ``#`` lines and blank lines are skipped; a name listed again with other ids keeps its
    first entry.

    Raises:
        DatasetError: the file cannot be read.
    """
    rel = relative(path, root)
    try:
        # utf-8-sig: a byte-order mark (Windows editors) is not part of the first name
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as error:
        raise DatasetError(f"{path}: cannot read list file: {error}") from error
    entries: dict[str, ListEntry] = {}
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
        entry = ListEntry(class_id, species, breed_id, rel)
        previous = entries.get(name)
        if previous is not None and (previous.class_id, previous.species) != (
            class_id,
            species,
        ):
            problems[name].append((rel, f"{where}: listed again with different ids"))
            continue
        entries[name] = entry
    return entries


def _read_split_lists(
    root: Path, problems: Problems
) -> tuple[dict[str, ListEntry], dict[str, str]]:
    """Entries and official split by name, from annotations/trainval.txt and test.txt."""
    split_of: dict[str, str] = {}
    split_entries: dict[str, ListEntry] = {}
    for split in ("trainval", "test"):
        path = root / "annotations" / f"{split}.txt"
        if not path.is_file():
            continue
        for name, entry in parse_list(path, root, problems).items():
            if name in split_of and split_of[name] != split:
                problems[name].append(
                    (entry.source, "listed in both annotations/trainval.txt and test.txt")
                )
                continue
            split_of[name] = split
            split_entries[name] = entry
    return split_entries, split_of


def read_lists(root: Path, problems: Problems) -> tuple[dict[str, ListEntry], dict[str, str], str]:
    """Entries by name, official split by name, and the description of the listing.

    ``annotations/list.txt`` is the listing when present (the split lists add the names it
    lacks, and a class id that disagrees with it is a problem); else the split lists are.
    """
    split_entries, split_of = _read_split_lists(root, problems)
    main = root / "annotations" / "list.txt"
    if not main.is_file():
        return split_entries, split_of, "annotations/trainval.txt or test.txt"
    entries = parse_list(main, root, problems)
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


def check_image(path: Path, verify: str) -> tuple[list[str], list[str], tuple[int, int] | None]:
    """Problems, notes and (H, W) of one image file.

    Args:
        path: the image file.
        verify: ``"full"`` (decode it; JPEGs in draft mode) or ``"header"``.
    """
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
        if verify == "full":
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


def check_trimap(path: Path, rel: str, size: tuple[int, int] | None) -> list[str]:
    """Why the trimap at ``path`` (``rel`` in messages) is unusable; [] if it is fine.

    Args:
        path: the trimap file.
        rel: its name in messages (relative to the dataset root).
        size: (H, W) of its image, or None when unknown.
    """
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
