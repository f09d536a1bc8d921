"""``synthtrial graders dataset``: a grader training set and its held-out sets, rendered by ``generate``.

Three splits, each a normal run directory under ``OUT`` (``synthtrial verify`` passes on each):

* ``train``: ``--images`` images of one built-in portrait (``--train-portrait``), rendered at ``--seed``;
* ``test_seed``: the same portrait at a new seed (new identity variants, new lesion courses);
* ``test_portrait``: the other built-in portrait (train on one, test on the other) at a third seed.

``--train-portrait both`` puts both portraits (patients alternating) in ``train`` and ``test_seed`` and
renders no ``test_portrait`` (the set for final weights, once the cross-portrait test has been made).

Choices, stated once:

* **Patients and identities.** Every patient is a new identity variant of the split's portrait
  (:func:`synthtrial.face.faces.identity_for`: variant 0 is the portrait as it is; the others are mirror
  images on odd variants, each with its own geometry, framing, lighting gradient, exposure and colour
  temperature). The portrait is handed to ``generate`` as a one-image ``--faces`` folder
  (``OUT/portraits/<name>/<name>.png``, its pixels exactly the built-in portrait's; ``both``: a folder of the
  two), so a split's patients cycle through that portrait's variants only. The skin stays the portrait's own:
  skin tone and light are what the graders' augmentation (:mod:`synthtrial.graders.augment`) takes away as a
  cue.
* **Visits.** A patient has :data:`VISITS_PER_PATIENT` visits (the last patient of a split fewer), one every
  :data:`VISIT_DAYS` days, each photographed frontal, left and right (so ``--images`` is a multiple of 3).
  Seven days between visits is longer than a papule or pustule lasts and shorter than most marks, so
  lesions resolve between visits and leave marks (and sometimes scars) beside the new ones.
* **Severity, stratified.** Every visit's severity is drawn so that the four Hayashi (ACNE04) levels are
  equally frequent: the visits of a split are dealt the levels 0, 1, 2, 3 in turn, shuffled (seeded), and each
  visit's severity is uniform in its level's interval of the severity scale (:data:`LEVEL_SEVERITY`; the
  scale's count knots sit on the level boundaries, :mod:`synthtrial.trial.scale`). Uniform severity over
  0-3 would give levels 0 and 3 half the share of 1 and 2; stratified, IGA grades 0-4 come out at about
  9 / 19 / 22 / 21 / 28 % (the 3-class view 28 / 22 / 50 %). A patient's severity jumps from visit to
  visit (the lesion course interpolates between visits), which makes many lesions resolve into marks.
* **Seeds.** ``train`` is rendered at ``--seed``; ``test_seed`` and ``test_portrait`` at seeds derived from it
  (:func:`synthtrial.util.seeding.derive_seed`, recorded in ``dataset.json``). The same options give the same
  bytes, whatever ``--workers``.
* **Resume.** ``OUT/dataset.json`` is written first with the recipe (``"complete": false``) and last with the
  counts; running the same command again finishes or heals every split (``generate``'s resume), and one with
  another recipe is refused before anything is written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.version import __version__
from synthtrial.face.faces import BUILTIN_FACES
from synthtrial.run import rundir
from synthtrial.run.rundir import RunError
from synthtrial.trial import scale
from synthtrial.trial.protocol import VIEWS
from synthtrial.util.atomic import write_bytes_atomic, write_text_atomic
from synthtrial.util.progress import ProgressCallback
from synthtrial.util.seeding import derive_seed, derived_rng

DATASET_FILE = "dataset.json"
PORTRAITS = "portraits"
PROTOCOLS = "protocols"
SPLITS = ("train", "test_seed", "test_portrait")
#: ``--train-portrait`` value for a set of both built-in portraits (no ``test_portrait`` split)
BOTH = "both"
#: Visits per patient and days between two visits (see the module docstring).
VISITS_PER_PATIENT = 8
VISIT_DAYS = 7
#: The severity interval of each Hayashi level (the count knots of the scale sit on the level boundaries).
LEVEL_SEVERITY = ((0.0, 0.5), (0.5, 1.5), (1.5, 2.5), (2.5, 3.0))
#: Largest split a command may ask for (about 20 hours of rendering at 512 px on two cores).
MAX_IMAGES = 300_000
TREATMENT = "none"


@dataclass(frozen=True)
class Recipe:
    """What decides a data set's bytes (``--workers`` does not); checked when built."""

    images: int = 3000                  # train split
    test_images: int | None = None      # each held-out split; None: a fifth of ``images`` (a multiple of 3)
    size: int = 512
    seed: int = 0
    train_portrait: str = "astronaut"
    visits_per_patient: int = VISITS_PER_PATIENT

    def __post_init__(self) -> None:
        if self.train_portrait not in (*BUILTIN_FACES, BOTH):
            raise RunError(f"--train-portrait must be one of {', '.join((*BUILTIN_FACES, BOTH))}, "
                           f"got '{self.train_portrait}'")
        if self.test_images is None:
            object.__setattr__(self, "test_images", max(len(VIEWS), len(VIEWS) * round(self.images / 15)))
        for option, value in (("--images", self.images), ("--test-images", self.test_images)):
            if not len(VIEWS) <= value <= MAX_IMAGES or value % len(VIEWS):
                raise RunError(f"{option} must be a multiple of {len(VIEWS)} (frontal, left and right of every "
                               f"visit) between {len(VIEWS)} and {MAX_IMAGES}, got {value}")
        if not 1 <= self.visits_per_patient <= 100:
            raise RunError(f"--visits must be between 1 and 100, got {self.visits_per_patient}")
        if self.seed < 0:
            raise RunError(f"--seed must be >= 0, got {self.seed}")
        if not 128 <= self.size <= 4096:
            raise RunError(f"--size must be between 128 and 4096 pixels, got {self.size}")


@dataclass(frozen=True)
class Split:
    name: str
    portrait: str
    seed: int
    images: int


def splits(recipe: Recipe) -> list[Split]:
    """The splits of a recipe (three; two with ``both`` portraits): name, portrait, render seed, images."""
    def seed_of(name: str) -> int:
        return recipe.seed if name == "train" else derive_seed("dataset", recipe.seed, name, bits=32)

    trained = recipe.train_portrait
    plan = [Split("train", trained, seed_of("train"), recipe.images),
            Split("test_seed", trained, seed_of("test_seed"), recipe.test_images)]
    if trained != BOTH:
        other = next(p for p in BUILTIN_FACES if p != trained)
        plan.append(Split("test_portrait", other, seed_of("test_portrait"), recipe.test_images))
    return plan


def visit_severities(visits: int, rng: np.random.Generator) -> np.ndarray:
    """``visits`` severities with the Hayashi levels dealt in turn (equal shares), shuffled, each uniform in
    its level's interval."""
    levels = rng.permutation(np.arange(visits) % len(LEVEL_SEVERITY))
    bounds = np.asarray(LEVEL_SEVERITY)[levels]
    return bounds[:, 0] + rng.random(visits) * (bounds[:, 1] - bounds[:, 0])


def protocol_frame(split: Split, recipe: Recipe) -> pd.DataFrame:
    """The native-form protocol of a split: patients ``P0001``..., visits every :data:`VISIT_DAYS` days, the
    three views of each visit, stratified severities (see the module docstring)."""
    visits = split.images // len(VIEWS)
    severity = visit_severities(visits, derived_rng("dataset", "severity", split.seed, split.name))
    rows = []
    for k, sev in enumerate(severity):
        patient, visit = divmod(k, recipe.visits_per_patient)
        for view in VIEWS:
            rows.append({"patient_id": f"P{patient + 1:04d}", "day": visit * VISIT_DAYS, "treatment": TREATMENT,
                         "severity": round(float(sev), 4), "view": view})
    return pd.DataFrame(rows, columns=["patient_id", "day", "treatment", "severity", "view"])


# ----------------------------------------------------------------------------------------- the command

def build_dataset(out: str | os.PathLike[str], recipe: Recipe, *, workers: int = 1, progress: bool = True,
                  on_progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Render the three splits of ``recipe`` under ``out`` and return what ``OUT/dataset.json`` says.

    ``on_progress(done, total, status)`` counts the images of all splits (status: the split being rendered).
    """
    from synthtrial.run.generation import MAX_WORKERS, generate

    if not 1 <= workers <= MAX_WORKERS:
        raise RunError(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}")
    out = Path(out)
    plan = splits(recipe)
    described = _recipe_record(recipe, plan)
    protocols = {s.name: protocol_frame(s, recipe).to_csv(index=False, lineterminator="\n") for s in plan}
    _check_out(out, described, protocols)
    total = sum(s.images for s in plan)
    with rundir.locked(out, option="--out"):
        _write_record(out, {**described, "complete": False})
        done = 0
        for split in plan:
            faces = _write_portrait(out, split.portrait)
            protocol = out / PROTOCOLS / f"{split.name}.csv"
            write_text_atomic(protocol, protocols[split.name])

            def report(n: int, _total: int, _status: str, start: int = done, name: str = split.name) -> None:
                if on_progress is not None:
                    on_progress(start + n, total, name)

            generate(protocol, out / split.name, faces_dir=faces, seed=split.seed, size=recipe.size,
                     workers=workers, progress=progress, on_progress=report)
            done += split.images
        record = {**described, "complete": True,
                  "splits": {s.name: {**described["splits"][s.name], **split_summary(out / s.name)} for s in plan}}
        _write_record(out, record)
    return record


def split_summary(run: str | os.PathLike[str]) -> dict[str, Any]:
    """What a rendered split holds: images, patients, identity variants, views and histograms of the Hayashi
    level, the IGA grade and its 3-class view, and how many images show marks and scars."""
    manifest = rundir.read_manifest(run, ("image", "patient_id", "view", "identity", "lesion_count",
                                          "acne04_level", "iga", "n_mark", "n_scar"))
    iga = manifest["iga"].to_numpy(np.int64)
    identities = {(json.loads(v)["base"], json.loads(v)["variant"]) for v in manifest["identity"]}
    return {
        "images": int(len(manifest)), "patients": int(manifest["patient_id"].nunique()),
        "identity_variants": len(identities),
        "views": {v: int((manifest["view"] == v).sum()) for v in VIEWS},
        "level": np.bincount(manifest["acne04_level"].to_numpy(np.int64), minlength=4).tolist(),
        "iga": np.bincount(iga, minlength=len(scale.IGA_NAMES)).tolist(),
        "iga_group": np.bincount(scale.iga_group(iga), minlength=len(scale.IGA_GROUP_NAMES)).tolist(),
        "lesions_mean": round(float(manifest["lesion_count"].mean()), 2),
        "images_with_marks": int((manifest["n_mark"] > 0).sum()),
        "images_with_scars": int((manifest["n_scar"] > 0).sum()),
        "marks": int(manifest["n_mark"].sum()), "scars": int(manifest["n_scar"].sum()),
    }


def read_dataset(out: str | os.PathLike[str]) -> dict[str, Any]:
    """``OUT/dataset.json``."""
    return rundir.read_json(Path(out) / DATASET_FILE, what="a data set's record (a JSON object)")


# --------------------------------------------------------------------------------------------- helpers

def _recipe_record(recipe: Recipe, plan: list[Split]) -> dict[str, Any]:
    return {
        "synthtrial_version": __version__,
        "recipe": asdict(recipe),
        "visit_days": VISIT_DAYS, "level_severity": [list(b) for b in LEVEL_SEVERITY], "views": list(VIEWS),
        "splits": {s.name: {"run": s.name, "portrait": s.portrait, "seed": s.seed, "planned_images": s.images,
                            "planned_patients": math.ceil(s.images // len(VIEWS) / recipe.visits_per_patient)}
                   for s in plan},
    }


def _check_out(out: Path, described: dict[str, Any], protocols: dict[str, str]) -> None:
    """Refuse, before any write, an ``--out`` that holds something else or a data set of another recipe (its
    ``dataset.json``, or, where that was lost, a split's protocol that differs from the one planned)."""
    from synthtrial.util.atomic import check_writable

    if out.exists() and not out.is_dir():
        raise RunError(f"{out} exists and is not a folder (option --out)")
    keys = ("recipe", "visit_days", "level_severity", "views")
    if (out / DATASET_FILE).exists():
        found = read_dataset(out)
        if {k: found.get(k) for k in keys} != {k: described[k] for k in keys}:
            raise RunError(f"{out} holds a data set of another recipe ({DATASET_FILE}: "
                           f"{json.dumps(found.get('recipe'), sort_keys=True)}); choose another --out or delete it")
    elif out.is_dir():
        ours = {DATASET_FILE, PORTRAITS, PROTOCOLS, rundir.LOCK, *SPLITS}
        other = sorted(p.name for p in out.iterdir() if p.name not in ours)
        if other:
            raise RunError(f"{out} is not empty and holds no {DATASET_FILE} ({other[0]}); choose another --out")
    for name, text in protocols.items():
        path = out / PROTOCOLS / f"{name}.csv"
        if path.is_file() and path.read_text() != text:
            raise RunError(f"{out} holds a data set of another recipe ({path} differs); choose another --out or "
                           "delete it")
    check_writable(out / DATASET_FILE)


def _write_record(out: Path, record: dict[str, Any]) -> None:
    write_text_atomic(out / DATASET_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _write_portrait(out: Path, name: str) -> Path:
    """``OUT/portraits/<name>/`` holding the built-in portrait ``name`` (``both``: each of them) as
    ``<portrait>.png``, its exact pixels."""
    from synthtrial.face.faces import builtin_face
    from synthtrial.run.rendering import png_bytes

    folder = out / PORTRAITS / name
    for portrait in BUILTIN_FACES if name == BOTH else (name,):
        path = folder / f"{portrait}.png"
        data = png_bytes(builtin_face(portrait).image)
        if not path.is_file() or path.read_bytes() != data:
            write_bytes_atomic(path, data)
    return folder
