"""Read and validate the ACNE04 data set (Wu et al., ICCV 2019) in its two common layouts.

* **labels** (the release): label files ``NNEW_trainval_{k}.txt`` / ``NNEW_test_{k}.txt`` (k = 0..4) with
  lines ``filename grade count`` (filenames ``levle{N}_{i}.jpg``, sic), in the root or in
  ``root/Classification``; images in ``JPEGImages/`` (beside the label files, in the root or in
  ``root/Classification``), beside the label files, or in the root; optional Pascal VOC boxes in
  ``Detection/VOC2007/Annotations/<stem>.xml`` (also ``VOC2007/Annotations``, ``Annotations``).
* **folders**: per-level folders ``acne0_*/`` .. ``acne3_*/`` (level = the digit) holding images only,
  as used by the anchor generator's fine-tuning.

Every rejection is a one-line :class:`Acne04Error` (a :class:`~synthtrial.util.errors.SynthtrialError`)
naming the file, and the line number for label files.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from synthtrial.trial import scale
from synthtrial.util.errors import SynthtrialError

LEVELS = (0, 1, 2, 3)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
#: ``NNEW_trainval_0.txt`` -> split ``trainval_0``.
LABEL_FILE_PATTERN = re.compile(r"NNEW_([A-Za-z]+)_(\d+)\.txt")
#: ``acne2_1024`` -> level 2 (a bare ``acne2`` is accepted too).
LEVEL_FOLDER_PATTERN = re.compile(r"acne(\d+)(?:_.*)?")
_SPLIT_ORDER = {"trainval": 0, "train": 1, "val": 2, "test": 3}
ACCEPTED_LAYOUTS = (
    "label files NNEW_<split>_<k>.txt (lines 'filename grade count') in the folder or its Classification/ "
    "subfolder, images in JPEGImages/; or per-level folders acne0_*/ .. acne3_*/ holding images"
)


class Acne04Error(SynthtrialError):
    """An ACNE04 file that cannot be used; names the file and, for label files, the line."""

    def __init__(self, message: str, *, file: str | Path | None = None, line: int | None = None) -> None:
        self.file = None if file is None else _printable(str(file))
        self.line = line
        self.reason = " ".join(str(message).split())
        super().__init__(": ".join(p for p in (
            self.file, None if line is None else f"line {line}", self.reason) if p))


def _printable(text: str) -> str:
    return text if text.isprintable() else ascii(text)[1:-1]


@dataclass(frozen=True)
class Acne04Item:
    """One ACNE04 image with what the data set says about it."""

    path: Path                 # the image
    level: int                 # 0..3 (grade)
    count: int | None          # lesion count when the labels give it
    boxes: np.ndarray | None   # (N, 4) float32 xmin, ymin, xmax, ymax when VOC XML exists
    split: str | None          # e.g. "trainval_0" / "test_0" (first label file naming it), else None


# ----------------------------------------------------------------------------------------- scanning

def scan_acne04(root: str | Path, *, check_images: bool = True) -> list[Acne04Item]:
    """Find and validate an ACNE04 copy under ``root``; items sorted by level, then filename.

    The labels layout wins when both are present. With ``check_images`` every image is opened with PIL
    and verified.
    """
    root = Path(root)
    if not root.exists():
        raise Acne04Error("no such folder", file=root)
    if not root.is_dir():
        raise Acne04Error("is not a folder", file=root)
    label_dir, label_files = _find_label_files(root)
    if label_files:
        items = _scan_labels(root, label_dir, label_files)
    else:
        level_dirs = _find_level_folders(root)
        if not level_dirs:
            raise Acne04Error(f"no ACNE04 layout found; accepted: {ACCEPTED_LAYOUTS}", file=root)
        items = _scan_folders(level_dirs)
    if check_images:
        for item in items:
            _verify_image(item.path)
    return sorted(items, key=lambda it: (it.level, it.path.name, str(it.path)))


def _find_label_files(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    for folder in (root, root / "Classification"):
        if not folder.is_dir():
            continue
        found = []
        for path in folder.iterdir():
            m = LABEL_FILE_PATTERN.fullmatch(path.name)
            if m and path.is_file():
                found.append((int(m.group(2)), _SPLIT_ORDER.get(m.group(1), 9), m.group(1), path))
        if found:
            found.sort()
            return folder, [(path, f"{kind}_{k}") for k, _, kind, path in found]
    return None, []


def _find_level_folders(root: Path) -> list[tuple[int, Path]]:
    out = []
    for path in sorted(root.iterdir()):
        m = LEVEL_FOLDER_PATTERN.fullmatch(path.name)
        if m and path.is_dir():
            level = int(m.group(1))
            if level not in LEVELS:
                raise Acne04Error(f"level folder for level {level}; ACNE04 levels are 0-3", file=path)
            out.append((level, path))
    return out


def _read_label_file(path: Path) -> list[tuple[int, str, int, int]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise Acne04Error("is not UTF-8 text", file=path) from None
    except OSError as exc:
        raise Acne04Error(f"cannot be read ({exc.strerror or exc})", file=path) from None
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise Acne04Error(f"expected 3 fields 'filename grade count', got {len(fields)}: {line.strip()!r}",
                              file=path, line=n)
        name, grade_s, count_s = fields
        if name in (".", "..") or "/" in name or "\\" in name:
            raise Acne04Error(f"filename {name!r} must be a plain file name", file=path, line=n)
        try:
            grade = int(grade_s)
        except ValueError:
            raise Acne04Error(f"grade {grade_s!r} is not an integer", file=path, line=n) from None
        try:
            count = int(count_s)
        except ValueError:
            raise Acne04Error(f"lesion count {count_s!r} is not an integer", file=path, line=n) from None
        if grade not in LEVELS:
            raise Acne04Error(f"grade {grade} is outside 0-3", file=path, line=n)
        if count < 0:
            raise Acne04Error(f"lesion count {count} is negative", file=path, line=n)
        rows.append((n, name, grade, count))
    if not rows:
        raise Acne04Error("holds no label lines ('filename grade count')", file=path)
    return rows


def _scan_labels(root: Path, label_dir: Path, label_files: list[tuple[Path, str]]) -> list[Acne04Item]:
    # name -> (grade, count, split, file, line) of its first occurrence
    labels: dict[str, tuple[int, int, str, Path, int]] = {}
    for path, split in label_files:
        for n, name, grade, count in _read_label_file(path):
            seen = labels.get(name)
            if seen is None:
                labels[name] = (grade, count, split, path, n)
            elif seen[:2] != (grade, count):
                raise Acne04Error(
                    f"{name} labelled grade {grade} count {count}, but {_printable(str(seen[3]))} line {seen[4]} "
                    f"labels it grade {seen[0]} count {seen[1]}", file=path, line=n)

    candidates = [label_dir / "JPEGImages", root / "JPEGImages", root / "Classification" / "JPEGImages",
                  label_dir, root]
    image_dirs = list(dict.fromkeys(d for d in candidates if d.is_dir()))
    image_dir = next((d for d in image_dirs if any((d / name).is_file() for name in labels)), None)
    if image_dir is None:
        name, (_, _, _, path, n) = next(iter(labels.items()))
        raise Acne04Error(f"labelled image {name} not found in any of: {', '.join(map(str, image_dirs))}",
                          file=path, line=n)

    xml_candidates = [root / "Detection" / "VOC2007" / "Annotations", root / "VOC2007" / "Annotations",
                      root / "Annotations", label_dir / "Annotations", image_dir.parent / "Annotations"]
    xml_dir = next((d for d in xml_candidates if d.is_dir()), None)

    items = []
    for name, (grade, count, split, path, n) in labels.items():
        image = image_dir / name
        if not image.is_file():
            raise Acne04Error(f"labelled image {image} is missing", file=path, line=n)
        boxes = None
        if xml_dir is not None:
            xml = xml_dir / f"{Path(name).stem}.xml"
            if xml.is_file():
                boxes = read_voc_boxes(xml)
                where = f"{_printable(str(path))} line {n}"
                if len(boxes) != count:
                    raise Acne04Error(f"has {len(boxes)} boxes but {where} gives lesion count {count} for {name}",
                                      file=xml)
                hayashi = int(scale.acne04_level_from_count(count))
                if hayashi != grade:
                    raise Acne04Error(
                        f"{len(boxes)} boxes make Hayashi level {hayashi} (<=5 -> 0, 6-20 -> 1, 21-50 -> 2, "
                        f">50 -> 3) but {where} grades {name} as {grade}", file=xml)
        items.append(Acne04Item(path=image, level=grade, count=count, boxes=boxes, split=split))
    return items


def read_voc_boxes(xml: str | Path) -> np.ndarray:
    """The ``(N, 4)`` float32 boxes (xmin, ymin, xmax, ymax) of a Pascal VOC annotation file."""
    xml = Path(xml)
    try:
        tree = ET.parse(xml)
    except ET.ParseError as exc:
        raise Acne04Error(f"malformed XML ({exc})", file=xml) from None
    except OSError as exc:
        raise Acne04Error(f"cannot be read ({exc.strerror or exc})", file=xml) from None
    if tree.getroot().tag != "annotation":
        raise Acne04Error(f"root element is <{tree.getroot().tag}>, not a Pascal VOC <annotation>", file=xml)
    boxes = []
    for k, obj in enumerate(tree.getroot().iter("object"), start=1):
        bnd = obj.find("bndbox")
        if bnd is None:
            raise Acne04Error(f"<object> {k} has no <bndbox>", file=xml)
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            el = bnd.find(tag)
            try:
                value = float((el.text or "").strip()) if el is not None else None
            except ValueError:
                value = None
            if value is None or not np.isfinite(value):
                raise Acne04Error(f"<object> {k} has no numeric <{tag}>", file=xml)
            coords.append(value)
        if coords[2] < coords[0] or coords[3] < coords[1]:
            raise Acne04Error(f"<object> {k} has xmax < xmin or ymax < ymin: {coords}", file=xml)
        boxes.append(coords)
    return np.asarray(boxes, dtype=np.float32).reshape(-1, 4)


def _scan_folders(level_dirs: list[tuple[int, Path]]) -> list[Acne04Item]:
    items = []
    for level, folder in level_dirs:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file():
                items.append(Acne04Item(path=path, level=level, count=None, boxes=None, split=None))
    if not items:
        raise Acne04Error(f"the level folders ({', '.join(p.name for _, p in level_dirs)}) hold no images "
                          f"({', '.join(sorted(IMAGE_SUFFIXES))})", file=level_dirs[0][1].parent)
    return items


def _verify_image(path: Path) -> None:
    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as exc:  # PIL raises many types for broken files
        raise Acne04Error(f"unreadable image ({type(exc).__name__}: {exc})", file=path) from None


# ------------------------------------------------------------------------------------------ summary

def summarize_acne04(items: Iterable[Acne04Item]) -> dict:
    """``{"images", "per_level" {0..3: n}, "boxes" (total, None without XML), "layout", "splits"}``.

    ``layout`` is "labels" when the items come from label files, "folders" otherwise (None when empty);
    ``splits`` lists the split names items were first seen in, in order of first appearance.
    """
    items = list(items)
    per_level = {level: 0 for level in LEVELS}
    boxes = None
    splits: dict[str, None] = {}
    for item in items:
        per_level[item.level] = per_level.get(item.level, 0) + 1
        if item.boxes is not None:
            boxes = (boxes or 0) + int(len(item.boxes))
        if item.split is not None:
            splits[item.split] = None
    layout = None if not items else ("labels" if splits else "folders")
    return {"images": len(items), "per_level": per_level, "boxes": boxes, "layout": layout,
            "splits": sorted(splits, key=_split_key)}


def _split_key(split: str):
    kind, _, k = split.rpartition("_")
    return (int(k) if k.isdigit() else 0, _SPLIT_ORDER.get(kind, 9), split)


# ------------------------------------------------------------------------------------------ dataset

class Acne04Dataset(torch.utils.data.Dataset):
    """ACNE04 images as tensors for fine-tuning or evaluation.

    ``root_or_items`` is a folder (scanned with :func:`scan_acne04`, images not verified up front) or a
    list of :class:`Acne04Item`. ``levels`` keeps only those grades. Images are EXIF-transposed, made RGB,
    resized so the shorter side is ``size`` (bicubic, antialiased) and centre-cropped to ``size`` x ``size``
    (``center_crop=False`` keeps the aspect ratio; ``size=None`` keeps the image as is).
    """

    def __init__(self, root_or_items: str | Path | Sequence[Acne04Item], *, levels: Sequence[int] | None = None,
                 size: int | None = 512, center_crop: bool = True) -> None:
        if isinstance(root_or_items, (str, Path)):
            items = scan_acne04(root_or_items, check_images=False)
            source = str(root_or_items)
        else:
            items = list(root_or_items)
            source = "the given items"
        if size is not None and (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1):
            raise SynthtrialError(f"ACNE04 image size must be a positive integer or None, got {size!r}")
        if levels is not None:
            levels = [int(v) for v in levels]
            bad = [v for v in levels if v not in LEVELS]
            if bad:
                raise SynthtrialError(f"ACNE04 levels must be in 0-3, got {bad}")
            items = [it for it in items if it.level in levels]
        if not items:
            raise SynthtrialError(f"no ACNE04 images in {_printable(source)}"
                                  + ("" if levels is None else f" at levels {sorted(set(levels))}"))
        self.items: list[Acne04Item] = items
        self.size = None if size is None else int(size)
        self.center_crop = center_crop

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        try:
            with Image.open(item.path) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")
        except Exception as exc:
            raise Acne04Error(f"unreadable image ({type(exc).__name__}: {exc})", file=item.path) from None
        if self.size is not None:
            im = _resize_shorter(im, self.size)
            if self.center_crop:
                w, h = im.size
                left, top = (w - self.size) // 2, (h - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
        arr = np.asarray(im, dtype=np.float32)
        pixels = torch.from_numpy(arr.transpose(2, 0, 1).copy()) / 127.5 - 1.0
        return {"pixel_values": pixels.clamp_(-1.0, 1.0), "level": int(item.level),
                "count": -1 if item.count is None else int(item.count), "path": str(item.path)}


def _resize_shorter(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    if min(w, h) == size:
        return im
    if w <= h:
        new = (size, max(size, round(h * size / w)))
    else:
        new = (max(size, round(w * size / h)), size)
    return im.resize(new, Image.Resampling.BICUBIC)  # PIL filters with a widened kernel when shrinking
