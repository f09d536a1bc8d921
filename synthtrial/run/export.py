"""Export a run directory as a training set: COCO detection JSON, the ACNE04 label layout, or a
Hugging Face ``imagefolder``.

:func:`export_run` reads the run-directory contract (``manifest.parquet``, ``lesions.parquet``,
``config.json``, ``images/...`` and the optional ``masks/<patient_id>/<image stem>.png`` label maps)
and writes one export per format. Every export is built in a temp folder beside its target and
renamed into place at the end, so a failure leaves nothing half-written; the same run written to the same
place always gives the same bytes.

One rule for what already exists where an export goes (:data:`REPLACE_RULE`, the CLI's ``--force`` help):
an earlier export is replaced only with ``force``, whether the place was named (``--out``) or is the
default ``RUN/exports/<format>``; anything else there is never replaced.

COCO's ``file_name`` is relative to the folder the JSON is written to (or to ``image_root``), so the JSON
loads where it lies: a loader's image root is the JSON's folder (``info.image_root`` says the same).

Bad input raises :class:`~synthtrial.util.errors.SynthtrialError` with one line naming the run, the file,
the row (manifest and lesion rows count from 1) and the column.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import inspect
import io
import json
import math
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.trial import scale
from synthtrial.util.atomic import temp_prefix, write_text_atomic
from synthtrial.run import rundir
from synthtrial.run.remote import on_storage
from synthtrial.run.coco_masks import mask_shapes
from synthtrial.util.errors import SynthtrialError, one_line
from synthtrial.util.progress import progress_bar
from synthtrial.trial.protocol import PATIENT_ID_PATTERN

#: The formats :func:`export_run` writes.
EXPORT_FORMATS = ("coco", "acne04", "imagefolder")
#: Lesion types in COCO category order; category ids are 1 + the index here, fixed for every run.
CATEGORIES = scale.ALL_LESION_TYPES
CATEGORY_IDS = {name: i + 1 for i, name in enumerate(CATEGORIES)}
#: JPEG quality of the ACNE04 export (fixed, so the bytes are reproducible).
JPEG_QUALITY = 95
#: The one rule for an existing export (stated here once; ``synthtrial export --force`` shows it).
REPLACE_RULE = ("an earlier export (the folder, or the COCO JSON file named by --out) is replaced only with --force, "
                "at --out and at the default RUN/exports/<format> alike; anything else there is never replaced")
#: Lesion columns a COCO annotation carries in its ``attributes``, where the run's lesion table has them.
ATTRIBUTES = ("stage", "visible", "contrast", "signal")
#: Columns of the imagefolder ``metadata.csv`` after ``file_name``.
METADATA_COLUMNS = ("patient_id", "day", "date", "treatment", "view", "severity", "acne04_level", "iga",
                    "lesion_count", "n_open_comedo", "n_closed_comedo", "n_papule", "n_pustule", "n_nodule",
                    "n_mark", "n_scar", "identity")

RUN_FILES = ("manifest.parquet", "lesions.parquet", "config.json")
_MANIFEST_COLUMNS = {
    "coco": ("image", "patient_id", "day", "severity", "acne04_level", "iga"),
    "acne04": ("image", "patient_id", "acne04_level", "lesion_count"),
    "imagefolder": ("image",) + METADATA_COLUMNS,
}
_ACNE04_LABEL = re.compile(r"NNEW_(trainval|test)_\d+\.txt")
_MAX_SHOWN = 120

#: Help text per format (first line: a summary; the rest: what is written), for ``synthtrial export --help``.
FORMAT_HELP = {
    "coco": """COCO detection JSON for lesion detectors (MMDetection, Detectron2, torchvision).

    Writes RUN/exports/coco/annotations.json (or --out: a folder, or a file name ending in .json).
    images: file_name relative to the JSON's folder (or to --image-root), width, height, patient_id, day, severity,
    acne04_level, iga. annotations: bbox (x, y, w, h) from the lesion's x0, y0, x1, y1; area from the
    lesion's mask where the run has one, else w*h; segmentation polygons traced from the mask; iscrowd 0;
    lesion_id; attributes: stage (the lesion's phase: onset, active, resolving, or residual for marks and
    scars), visible (true/false), contrast (CIE76 delta E to the surrounding skin) and signal (CIE76 delta E
    to the same pixels without the lesion), null when unknown, where the run has them. categories, fixed
    ids: 1 open_comedo, 2 closed_comedo, 3 papule, 4 pustule, 5 nodule, 6 mark, 7 scar (supercategory acne).
    --visible-only keeps the visible lesions only, --active-only the active lesion types only (no marks or
    scars); info.lesions says which. Point the loader's image root at the JSON's folder (info.image_root: the
    root relative to it, "." by default).
    """,
    "acne04": """The ACNE04 / LDL label layout (Wu et al. 2019), for grade + count models.

    Writes RUN/exports/acne04/ (or --out): JPEGImages/<image stem>.jpg (JPEG quality 95) and
    NNEW_trainval_K.txt / NNEW_test_K.txt for K = 0 .. folds-1, one line 'filename grade count' per image
    (grade = ACNE04 level, count = lesion count: the simulated active lesions; with --visible-only the visible
    ones, visible_count, and the ACNE04 level of that count). Folds split by patient: all images of a patient are on the
    same side of every fold. Patients are shuffled with --seed and dealt round-robin; fold K's test set is
    the patients dealt to fold K. Needs at least as many patients as folds.
    """,
    "imagefolder": """A Hugging Face datasets imagefolder: load_dataset("imagefolder", data_dir=OUT).

    Writes RUN/exports/imagefolder/ (or --out) with train/<patient_id>/<image file> (copies; hard links with --link where the
    file system allows, else copies) and train/metadata.csv: file_name (relative to train/), then
    patient_id, day, date, treatment, view, severity, acne04_level, iga, lesion_count, n_open_comedo,
    n_closed_comedo, n_papule, n_pustule, n_nodule, n_mark, n_scar, identity.
    """,
}
FORMAT_HELP = {name: inspect.cleandoc(text) for name, text in FORMAT_HELP.items()}


@on_storage("run_dir", what="exporting")
def export_run(run_dir: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str] | None = None, *,
               folds: int = 5, seed: int = 0, force: bool = False, link: bool = False,
               progress: bool = False, visible_only: bool = False, active_only: bool = False,
               image_root: str | os.PathLike[str] | None = None) -> Path:
    """Convert the run directory ``run_dir`` to the training-set format ``fmt`` (one of :data:`EXPORT_FORMATS`).

    ``out`` is the export's folder (default ``RUN/exports/<fmt>``); for ``coco`` it may also be a file name
    ending in ``.json``. One rule for what exists there (:data:`REPLACE_RULE`), whether ``out`` was given or
    not: an earlier export (of the same format, or a COCO file) is replaced only with ``force``; any other
    existing, non-empty folder is refused even then. An ``out`` inside the run
    directory is refused unless it lies under ``RUN/exports/`` (an export never overwrites the run's own
    files). ``folds`` and ``seed`` set the ACNE04 patient folds. ``link`` hard-links the imagefolder's images
    instead of copying them (no extra space; but editing an exported image then edits the run). ``visible_only``
    (coco, acne04) exports the visible lesions only (ACNE04: the visible counts); ``active_only`` (coco) leaves
    marks and scars out. COCO's ``file_name`` is relative to the JSON's folder, or to the existing folder
    ``image_root`` (coco only). Every image is checked against the manifest's sha256 first. Returns the COCO JSON file for ``coco`` and the export
    folder otherwise. See :data:`FORMAT_HELP` for each format.
    """
    if fmt not in EXPORT_FORMATS:
        raise SynthtrialError(f"unknown export format {rundir.show(fmt)}; choose one of: {', '.join(EXPORT_FORMATS)}")
    for flag, name, formats in ((visible_only, "--visible-only", ("coco", "acne04")),
                                (active_only, "--active-only", ("coco",))):
        if flag and fmt not in formats:
            raise SynthtrialError(f"{name} applies to --format {' or '.join(formats)}, not {fmt}")
    if image_root is not None and fmt != "coco":
        raise SynthtrialError(f"--image-root applies to --format coco, not {fmt}")
    if image_root is not None and not Path(image_root).is_dir():
        raise SynthtrialError(f"{image_root}: no such folder (option --image-root)")
    if fmt == "acne04":
        folds = _check_int_option(folds, "folds", minimum=2)
        seed = _check_int_option(seed, "seed", minimum=0)
    run = Path(run_dir)
    target = run / "exports" / fmt if out is None else Path(out)
    rundir.check_run_dir(run)
    resolved, run_root = target.resolve(), run.resolve()
    if resolved == run_root or run_root.is_relative_to(resolved):
        raise SynthtrialError(f"{target}: would replace the run directory {run}; choose another --out")
    if resolved.is_relative_to(run_root) and not resolved.is_relative_to(run_root / "exports"):
        raise SynthtrialError(f"{target}: lies inside the run directory {run} (outside its exports/ folder) and "
                              "could overwrite the run's own files; choose another --out")
    if out is None and not resolved.is_relative_to(run_root):
        raise SynthtrialError(f"{target}: the default export folder resolves outside the run directory (to "
                              f"{resolved}, through a link); name where to write with --out")
    coco_file = fmt == "coco" and out is not None and target.suffix.lower() == ".json" and not target.is_dir()
    if coco_file and (target.exists() or target.is_symlink()):
        if not target.is_file() or target.is_symlink():
            raise SynthtrialError(f"{target}: exists and is not a plain file; choose another --out")
        if not force:
            raise SynthtrialError(f"{target}: already exists; pass --force to replace it (option --out)")
    elif not coco_file:
        _check_folder(target, fmt, force=force)
    run_info = _read_run(run, fmt, progress=progress, visible_only=visible_only, active_only=active_only)
    run_info.progress, run_info.link = progress, link
    if fmt == "coco":
        json_folder = target.parent if coco_file else target
        run_info.image_prefix = _relative(run, Path(image_root) if image_root is not None else json_folder)
        run_info.image_root = "." if image_root is None else _relative(Path(image_root), json_folder)
        if coco_file:
            return write_text_atomic(target, _coco_json(run_info))
        with _building(target) as tmp:
            write_text_atomic(tmp / "annotations.json", _coco_json(run_info))
        return target / "annotations.json"
    if fmt == "acne04":
        names, labels = _plan_acne04(run_info, folds=folds, seed=seed)
        with _building(target) as tmp:
            _write_acne04(run_info, tmp, names, labels)
        return target
    with _building(target) as tmp:
        _write_imagefolder(run_info, tmp)
    return target


# ------------------------------------------------------------------------------------- reading the run

class _Run:
    """The validated pieces of a run directory that an export needs."""

    def __init__(self, root: Path, manifest: pd.DataFrame, lesions: pd.DataFrame | None,
                 config_bytes: bytes, images: list[str]) -> None:
        self.root = root
        self.manifest = manifest      # sorted by image path, index 0..n-1
        self.lesions = lesions        # coco only
        self.config_bytes = config_bytes
        self.images = images          # checked relative POSIX paths, same order as manifest
        self.progress = False         # draw progress bars
        self.link = False             # imagefolder: hard-link images instead of copying them
        self.lesion_filter = "all"    # coco: which lesions (all, visible, active, visible active); acne04: counts
        self.image_prefix = "."       # coco: the run directory relative to the image root (file_name's prefix)
        self.image_root = "."         # coco: the image root relative to the JSON's folder (info.image_root)


def _read_run(run: Path, fmt: str, *, progress: bool = True, visible_only: bool = False,
              active_only: bool = False) -> _Run:
    """The run through :mod:`synthtrial.run.rundir`'s validated readers (a table that resolves outside the run
    is refused), and every image, and for COCO every mask, checked against the manifest's sha256 and
    mask_sha256 (a truncated, edited, deleted or foreign file is refused, not exported). With ``visible_only``
    or ``active_only``, COCO keeps those lesions only."""
    rundir.check_run_dir(run)
    rundir.read_config(run)
    config_bytes = rundir.run_file(run, rundir.CONFIG).read_bytes()
    wanted = _MANIFEST_COLUMNS[fmt] + (("visible_count",) if visible_only and fmt == "acne04" else ())
    manifest = rundir.read_manifest(run, wanted)
    manifest = manifest.assign(_row=np.arange(1, len(manifest) + 1))
    if fmt == "coco":
        manifest = manifest.assign(_mask=[_mask_of(run, rec) for rec in manifest.to_dict(orient="records")])
    checks = [("image", "sha256"), ("_mask", "mask_sha256")]
    checks = [(c, d) for c, d in checks if c in manifest.columns and d in manifest.columns]
    with progress_bar("checking images", len(manifest), unit="images", enabled=progress) as update:
        for i, rec in enumerate(manifest.to_dict(orient="records")):
            for column, digest_column in checks:
                if not rundir.is_missing(rec[column]) and not rundir.is_missing(rec[digest_column]):
                    rundir.check_sha256(run, rec[column], rec[digest_column], i + 1, digest_column)
            update(i + 1, len(manifest), "")
    manifest = manifest.sort_values("image", kind="stable").reset_index(drop=True)
    images = manifest["image"].tolist()
    lesions = None
    if fmt == "coco":
        lesions = rundir.read_lesions(run, set(images))
        lesions = _chosen_lesions(run, lesions, visible_only=visible_only, active_only=active_only)
    run_info = _Run(run, manifest, lesions, config_bytes, images)
    run_info.lesion_filter = " ".join([*(["visible"] if visible_only else []), *(["active"] if active_only else [])]) \
        or "all"
    return run_info


def _chosen_lesions(run: Path, lesions: pd.DataFrame, *, visible_only: bool, active_only: bool) -> pd.DataFrame:
    """The lesion columns COCO needs (with the :data:`ATTRIBUTES` the run has), the visible and/or active
    lesions only where asked; ``visible`` must then be a column of true/false values."""
    path = run / rundir.LESIONS
    if visible_only and "visible" not in lesions.columns:
        raise SynthtrialError(f"{path}: has no column 'visible' (the visibility measurement), which --visible-only "
                              "needs; re-run `synthtrial generate` with this version to add it")
    if "visible" in lesions.columns:
        bad = [i for i, v in enumerate(lesions["visible"].tolist()) if not isinstance(v, (bool, np.bool_))]
        if bad:
            raise SynthtrialError(f"{path}: row {bad[0] + 1}, column 'visible': "
                                  f"{rundir.show(lesions['visible'].iloc[bad[0]])} is not true or false")
    keep = np.ones(len(lesions), bool)
    if visible_only:
        keep &= lesions["visible"].to_numpy(bool)
    if active_only:
        keep &= lesions["type"].isin(scale.LESION_TYPES).to_numpy()
    columns = ["image", "lesion_id", "type", "x0", "y0", "x1", "y1", "_row",
               *(c for c in ATTRIBUTES if c in lesions.columns)]
    return lesions.loc[keep, columns]


def _mask_of(run: Path, rec: dict[str, Any]) -> str | None:
    """The image's lesion mask (relative path; the manifest's ``mask`` column, else ``masks/<patient>/<image
    stem>.png``), checked to lie inside the run; None when the run has none for it. A mask the manifest lists
    with a sha256 must exist."""
    where = f"{run / rundir.MANIFEST}: row {rec['_row']}, column 'mask'"
    listed = rec.get("mask")
    if isinstance(listed, str) and listed:
        rel = rundir.checked_image_path(run, listed, where, must_exist=False)
        if not rundir.is_missing(rec.get("mask_sha256")) or (run / rel).is_file():
            return rel
        return None
    rel = f"{rundir.MASKS}/{rec['patient_id']}/{PurePosixPath(rec['image']).stem}.png"
    if not ((run / rel).exists() or (run / rel).is_symlink()):
        return None
    return rundir.checked_image_path(run, rel, f"{run / rundir.MANIFEST}: row {rec['_row']}, the mask of column "
                                     "'image'", must_exist=False)


# ------------------------------------------------------------------------------------------------ coco

def _coco_json(run: _Run) -> str:
    manifest, lesions = run.manifest, run.lesions
    assert lesions is not None
    by_image = {image: frame.sort_values("lesion_id", kind="stable")
                for image, frame in lesions.groupby("image", sort=False)}
    manifest_path = run.root / "manifest.parquet"
    images_out: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    with _progress("COCO", len(manifest), run.progress) as advance:
        for image_id, rec in enumerate(manifest.to_dict(orient="records"), start=1):
            row = int(rec["_row"])
            rel = rec["image"]
            width, height = _image_size(run.root, rel, rec, manifest_path)
            images_out.append({
                "id": image_id,
                "file_name": posixpath.normpath(posixpath.join(run.image_prefix, rel)),
                "width": width,
                "height": height,
                "patient_id": rec["patient_id"],
                "day": rundir.as_int(rec["day"], manifest_path, row, "day"),
                "severity": rundir.as_float(rec["severity"], manifest_path, row, "severity"),
                "acne04_level": rundir.as_int(rec["acne04_level"], manifest_path, row, "acne04_level"),
                "iga": rundir.as_int(rec["iga"], manifest_path, row, "iga"),
            })
            frame = by_image.get(rel)
            if frame is None:
                advance()
                continue
            shapes = {} if rundir.is_missing(rec["_mask"]) else \
                mask_shapes(run.root / rec["_mask"], width, height, frame["lesion_id"].tolist())
            for les in frame.to_dict(orient="records"):
                x0, y0 = float(les["x0"]), float(les["y0"])
                w, h = float(les["x1"]) - x0, float(les["y1"]) - y0
                ann: dict[str, Any] = {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY_IDS[les["type"]],
                    "bbox": [x0, y0, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "lesion_id": int(les["lesion_id"]),
                }
                attributes = _attributes(les)
                if attributes:
                    ann["attributes"] = attributes
                shape = shapes.get(int(les["lesion_id"]))
                if shape is not None:
                    ann["area"] = float(shape[0])
                    ann["segmentation"] = shape[1]
                annotations.append(ann)
            advance()
    info = {
        "description": "synthtrial simulated acne trial: facial images with exact lesion ground truth",
        "contributor": "synthtrial",
        "version": _version(),
        "url": "",
        "config_sha256": hashlib.sha256(run.config_bytes).hexdigest(),
        "lesions": run.lesion_filter,
        "image_root": run.image_root,
    }
    categories = [{"id": CATEGORY_IDS[name], "name": name, "supercategory": "acne"} for name in CATEGORIES]
    doc = {"info": info, "licenses": [], "images": images_out, "annotations": annotations,
           "categories": categories}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False) + "\n"


def _relative(path: Path, start: Path) -> str:
    """``path`` relative to the folder ``start`` (both resolved, so ``..`` steps hold on disk), POSIX style."""
    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def _attributes(les: dict[str, Any]) -> dict[str, Any]:
    """An annotation's ``attributes``: stage, visible, contrast and signal, where the lesion table has them."""
    out: dict[str, Any] = {}
    if "stage" in les:
        out["stage"] = None if rundir.is_missing(les["stage"]) else str(les["stage"])
    if "visible" in les:
        out["visible"] = bool(les["visible"])
    for measure in ("contrast", "signal"):
        if measure in les:
            out[measure] = None if rundir.is_missing(les[measure]) else float(les[measure])
    return out


def _image_size(root: Path, rel: str, rec: dict[str, Any], manifest_path: Path) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    path = root.joinpath(*PurePosixPath(rel).parts)
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, UnidentifiedImageError) as exc:
        raise SynthtrialError(f"{path}: cannot be read as an image ({one_line(exc)})") from None
    for column, actual in (("width", width), ("height", height)):
        stated = rec.get(column)
        if not rundir.is_missing(stated) and rundir.as_int(stated, manifest_path, rec["_row"], column) != actual:
            raise SynthtrialError(f"{manifest_path}: row {rec['_row']}, column '{column}': {rundir.show(stated)} but "
                                  f"{rel} is {width}x{height}")
    return int(width), int(height)


# ---------------------------------------------------------------------------------------------- acne04

def _plan_acne04(run: _Run, *, folds: int, seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """Check the run for the ACNE04 layout; return JPEG name -> image path and label file -> text."""
    manifest = run.manifest
    manifest_path = run.root / "manifest.parquet"
    patients = sorted(set(manifest["patient_id"].tolist()))
    if len(patients) < folds:
        n = len(patients)
        hint = f"use --folds {n} or fewer" if n >= 2 else "a split by patient needs at least 2 patients"
        raise SynthtrialError(f"{run.root}: {n} patient{'s' if n != 1 else ''} cannot be split into {folds} folds "
                              f"by patient; {hint}")
    fold_of = acne04_folds(patients, folds=folds, seed=seed)
    names: dict[str, str] = {}
    lines: list[tuple[str, str]] = []  # (patient, line)
    for rec in manifest.to_dict(orient="records"):
        row, image = int(rec["_row"]), rec["image"]
        name = PurePosixPath(image).stem + ".jpg"
        if any(ch.isspace() for ch in name):
            raise SynthtrialError(f"{manifest_path}: row {row}, column 'image': {rundir.show(image)} has white space "
                                  "in its name, which the ACNE04 label lines ('filename grade count') cannot hold")
        if name in names:
            raise SynthtrialError(f"{manifest_path}: row {row}, column 'image': {rundir.show(image)} and "
                                  f"{rundir.show(names[name])} both become JPEGImages/{name}")
        names[name] = image
        if run.lesion_filter == "visible":
            count = rundir.as_int(rec["visible_count"], manifest_path, row, "visible_count")
            grade = int(scale.acne04_level_from_count(count))
        else:
            grade = rundir.as_int(rec["acne04_level"], manifest_path, row, "acne04_level")
            count = rundir.as_int(rec["lesion_count"], manifest_path, row, "lesion_count")
        lines.append((rec["patient_id"], f"{name} {grade} {count}\n"))
    labels = {}
    for k in range(folds):
        labels[f"NNEW_trainval_{k}.txt"] = "".join(line for patient, line in lines if fold_of[patient] != k)
        labels[f"NNEW_test_{k}.txt"] = "".join(line for patient, line in lines if fold_of[patient] == k)
    return names, labels


def _write_acne04(run: _Run, dest: Path, names: dict[str, str], labels: dict[str, str]) -> None:
    from PIL import Image, UnidentifiedImageError

    jpegs = dest / "JPEGImages"
    jpegs.mkdir()
    with _progress("ACNE04 JPEG", len(names), run.progress) as advance:
        for name, image in names.items():
            src = run.root.joinpath(*PurePosixPath(image).parts)
            try:
                with Image.open(src) as im:
                    rgb = im.convert("RGB")
            except (OSError, UnidentifiedImageError) as exc:
                raise SynthtrialError(f"{src}: cannot be read as an image ({one_line(exc)})") from None
            rgb.save(jpegs / name, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False)
            advance()
    for name, text in labels.items():
        write_text_atomic(dest / name, text)


def acne04_folds(patients: list[str], *, folds: int = 5, seed: int = 0) -> dict[str, int]:
    """Deal patients to folds: sort, shuffle with ``seed``, then round-robin; returns patient -> fold (0-based)."""
    ordered = sorted(set(patients))
    order = np.random.default_rng(seed).permutation(len(ordered))
    return {ordered[int(j)]: i % folds for i, j in enumerate(order)}


# ----------------------------------------------------------------------------------------- imagefolder

def _write_imagefolder(run: _Run, dest: Path) -> None:
    manifest = run.manifest
    manifest_path = run.root / "manifest.parquet"
    train = dest / "train"
    train.mkdir()
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("file_name",) + METADATA_COLUMNS)
    int_columns = {"day", "acne04_level", "iga", "lesion_count", "n_open_comedo", "n_closed_comedo", "n_papule",
                   "n_pustule", "n_nodule", "n_mark", "n_scar"}
    with _progress("imagefolder", len(manifest), run.progress) as advance:
        for rec in manifest.to_dict(orient="records"):
            row = int(rec["_row"])
            src = run.root.joinpath(*PurePosixPath(rec["image"]).parts)
            file_name = f"{rec['patient_id']}/{src.name}"
            dst = train / rec["patient_id"] / src.name
            if dst.exists():
                raise SynthtrialError(f"{manifest_path}: row {row}, column 'image': {rundir.show(rec['image'])} would "
                                      f"overwrite train/{file_name}, already exported from another row")
            dst.parent.mkdir(exist_ok=True)
            if run.link:
                _link_or_copy(src, dst)
            else:
                shutil.copyfile(src, dst)
            cells: list[str] = [file_name]
            for column in METADATA_COLUMNS:
                value = rec[column]
                if column in int_columns:
                    cells.append(str(rundir.as_int(value, manifest_path, row, column)))
                elif column == "severity":
                    number = rundir.as_float(value, manifest_path, row, column)
                    cells.append("" if number is None else repr(number))
                elif column == "date":
                    cells.append(_date_text(value, manifest_path, row))
                else:
                    cells.append("" if rundir.is_missing(value) else str(value))
            writer.writerow(cells)
            advance()
    write_text_atomic(train / "metadata.csv", buffer.getvalue())


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link (``--link``: no copy, but editing the export edits the run), or copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _date_text(value: Any, path: Path, row: int) -> str:
    if rundir.is_missing(value):
        return ""
    try:
        return pd.Timestamp(value).strftime("%Y-%m-%d")
    except (ValueError, TypeError):
        raise SynthtrialError(f"{path}: row {row}, column 'date': {rundir.show(value)} is not a date") from None


# -------------------------------------------------------------------------------------- writing safely

def _check_folder(target: Path, fmt: str, *, force: bool) -> None:
    """Refuse an existing export folder that is not an earlier export of ``fmt``, or that is
    an earlier export while ``force`` is not given (one rule, for the default path and ``--out`` alike)."""
    if not (target.exists() or target.is_symlink()):
        return
    if not target.is_dir() or target.is_symlink():
        raise SynthtrialError(f"{target}: exists and is not a plain folder (a file or a link); choose another --out")
    held = sorted(p.name for p in target.iterdir())
    strangers = [name for name in held if not _belongs_to_export(name, fmt)]
    if strangers:
        raise SynthtrialError(f"{target}: exists and is not a synthtrial {fmt} export "
                              f"(it holds {rundir.show(strangers[0])}); choose another --out or remove it")
    if held and not force:
        raise SynthtrialError(f"{target}: holds an earlier {fmt} export; pass --force to replace it (option --out)")


@contextlib.contextmanager
def _building(target: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside ``target``; on success it replaces ``target``, on failure it is removed.
    (:func:`export_run` checked ``target`` first.)"""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".old", dir=target.parent))
            os.replace(target, old / "export")
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / "export", target)
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _belongs_to_export(name: str, fmt: str) -> bool:
    if fmt == "coco":
        return name == "annotations.json"
    if fmt == "acne04":
        return name == "JPEGImages" or bool(_ACNE04_LABEL.fullmatch(name))
    return name == "train"


@contextlib.contextmanager
def _progress(label: str, total: int, enabled: bool) -> Iterator[Callable[[], None]]:
    """The shared progress bar (:mod:`synthtrial.util.progress`), advanced one item at a time."""
    done = 0
    with progress_bar(f"export {label}", total, enabled=enabled) as update:
        def advance() -> None:
            nonlocal done
            done += 1
            update(done, total, "")

        yield advance


# --------------------------------------------------------------------------------------------- helpers

def _check_int_option(value: Any, name: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise SynthtrialError(f"--{name} must be a whole number >= {minimum}, got {rundir.show(value)}")
    return int(value)


def _version() -> str:
    from synthtrial.version import __version__

    return __version__
