"""What the run browser shows, as JSON-ready data and the files it may serve: the one place that reads a run.

Choices, stated once:

* **Every servable URL is known in advance.** :meth:`RunView.site` maps each URL path (``index.html``,
  ``data/patient/P01.json``, ``run/images/P01/P01_d001_frontal.png``, ...) to a producer of its bytes, built
  from the validated manifest (:func:`synthtrial.run.rundir.read_manifest`: clean relative paths inside the run,
  valid patient ids). The server answers a request only by looking its path up in that map, so no file path is
  ever built from request input (no traversal is possible); ``--static`` writes the same map to a folder, so
  both modes serve the same URLs to the same JavaScript.
* **Masks travel as type maps.** The run's masks are 16-bit instance maps (lesion id + 1), which a browser
  cannot read exactly; each is sent as an 8-bit PNG whose pixel is the lesion's type index + 1
  (:data:`synthtrial.trial.scale.ALL_LESION_TYPES`; 0 = no lesion), which the page colours per type.
* **Stale grades are left out.** Grades and grader tables are shown only for images whose ``image_sha256``
  still matches the manifest (a re-rendered image's old grades describe other pixels).
* **Trajectories are per day**: the mean over a day's views, as ``analyze`` averages them. Series: the truth
  from the manifest (severity, lesion and visible counts, IGA), the analysis outcomes
  (``RUN/analysis/outcomes.parquet``: oracle, ...) when analysed, and every grader outcome (``grades.json``).
  Each carries a ``scale`` (severity, count, IGA, new lesions, or its own) so the page can plot like with like.
* **Grader accuracy** pairs each grader column with the truth it estimates by its name's suffix
  (:data:`TRUTH_FOR`): count vs lesion count, visible count vs visible count, severity vs the latent severity,
  level vs the ACNE04 level, expected grade vs IGA, inflammatory count vs papules + pustules + nodules.
* **Grad-CAM** maps are the PNG overlays ``synthtrial graders explain RUN --out DIR`` writes
  (``DIR/<patient>/<image stem>_<characteristic>.png``), read from ``RUN/gradcam`` or the folder given.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.analyze.pipeline import ANALYSIS, EFFECTS, OUTCOMES
from synthtrial.run import rundir
from synthtrial.run.rundir import DETECTIONS, TRACKS, RunError
from synthtrial.trial import scale

#: The lesion types in the order of the type maps' pixel values (value = index + 1), and their colours.
TYPES = tuple(scale.ALL_LESION_TYPES)
TYPE_COLORS = {"open_comedo": "#f2e14c", "closed_comedo": "#f5f5f5", "papule": "#ff4d4d", "pustule": "#ffb000",
               "nodule": "#c026d3", "mark": "#fda4af", "scar": "#a16207"}
#: The truth each grader column estimates, by the column's suffix after ``<grader>_``.
TRUTH_FOR = {"count": "lesion_count", "visible_count": "visible_count", "severity": "severity",
             "level": "acne04_level", "expected_grade": "iga", "inflammatory_count": "inflammatory_count"}
#: The manifest's truth series on a patient's trajectory.
TRUTH_SERIES = ("severity", "lesion_count", "visible_count", "iga")
#: Where ``synthtrial graders explain`` overlays are looked for when no folder is given.
GRADCAM_DIR = "gradcam"
#: Columns of ``effects.csv`` the run page shows (those present).
EFFECT_COLUMNS = ("outcome", "method", "role", "scope", "arm", "reference", "estimate", "ci_low", "ci_high", "p",
                  "n", "true_effect", "bias", "covered")
MANIFEST_NEEDS = ("image", "mask", "patient_id", "day", "view", "treatment", "severity", "lesion_count", "iga",
                  "sha256", "width", "height")
_CHARACTERISTIC = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: The pages: URL -> (nav label, title, its ``<main>`` fragment, its script). Each is ``layout.html`` (the shared
#: head, header and nav) filled in with :class:`string.Template`; the fragments are not served themselves.
PAGES = {"index.html": ("Patients", "patients", "index.main.html", "patient.js"),
         "run.html": ("Run", "run", "run.main.html", "run.js")}
LAYOUT = "layout.html"


def scale_of(name: str) -> str:
    """The scale a series is plotted on, from its name: severity, count, iga, new (new lesions) or itself."""
    base = name.removeprefix("grader_")
    if base == "oracle" or base.endswith("severity"):
        return "severity"
    if base.endswith("new_inflammatory") or base.endswith("_new"):
        return "new"
    if base.endswith("count"):
        return "count"
    if base == "iga" or base.endswith("expected_grade") or base.endswith("_level"):
        return "iga"
    return name


def _number(value: Any) -> float | None:
    """A JSON-safe number: None for NaN, None and non-finite values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _records(frame: pd.DataFrame, columns: tuple[str, ...], digits: int = 2) -> list[list[Any]]:
    """Rows of ``frame``'s ``columns`` as lists of JSON-safe values: text and booleans as they are, numbers
    rounded to ``digits`` decimals, None for a missing value (column-wise: a run's tables are long)."""
    def cell(v: Any) -> Any:
        if isinstance(v, (str, bool, np.bool_)):
            return v if isinstance(v, str) else bool(v)
        number = _number(v)
        return None if number is None else round(number, digits)

    values = []
    for column in columns:
        series = frame[column]
        if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
            numbers = np.round(series.to_numpy(dtype=np.float64, na_value=np.nan), digits)
            values.append([v if math.isfinite(v) else None for v in numbers.tolist()])
        else:
            values.append([cell(v) for v in series.tolist()])
    return [list(row) for row in zip(*values)]


def _by_image(frame: pd.DataFrame, columns: tuple[str, ...]) -> dict[str, list[list[Any]]]:
    """:func:`_records` of ``frame`` split by its ``image`` column."""
    records = _records(frame, columns)
    positions = frame.reset_index(drop=True).groupby("image", sort=False).indices
    return {image: [records[i] for i in index] for image, index in positions.items()}


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class RunView:
    """A run directory read once for the browser (:func:`load`)."""

    run: Path
    manifest: pd.DataFrame
    lesions: pd.DataFrame
    grades: pd.DataFrame | None
    graders: dict[str, Any]
    tables: dict[str, pd.DataFrame]
    outcomes: pd.DataFrame | None
    effects: pd.DataFrame | None
    gradcam: dict[str, dict[str, Path]] = field(default_factory=dict)

    # ------------------------------------------------------------------------------------ structure
    @cached_property
    def patients(self) -> list[str]:
        return list(dict.fromkeys(self.manifest["patient_id"]))

    def rows_of(self, patient: str) -> pd.DataFrame:
        """The manifest rows of a patient, by day and view; KeyError for an unknown patient."""
        if patient not in self.patients:
            raise KeyError(patient)
        rows = self.manifest[self.manifest["patient_id"] == patient]
        return rows.sort_values(["day", "view"], kind="stable")

    def summary(self) -> dict[str, Any]:
        """``data/index.json``: the run's name, patients (days, views), lesion types and overlay layers."""
        patients = []
        for pid in self.patients:
            rows = self.rows_of(pid)
            patients.append({"id": pid, "days": int(rows["day"].nunique()), "views": sorted(rows["view"].unique())})
        layers = [{"grader": name, "table": table} for name, entry in self.graders.items()
                  for table in entry.get("tables", []) if table in self.tables]
        return {"run": self.run.resolve().name, "images": len(self.manifest), "patients": patients,
                "types": [{"name": t, "color": TYPE_COLORS[t], "value": i + 1} for i, t in enumerate(TYPES)],
                "graders": sorted(self.graders), "layers": layers, "analysed": self.outcomes is not None,
                "gradcam": bool(self.gradcam)}

    # -------------------------------------------------------------------------------------- patient
    def patient(self, patient: str) -> dict[str, Any]:
        """``data/patient/<id>.json``: per day its date, treatment and views (image, type map, lesion boxes,
        each grader table's boxes, Grad-CAM overlays), and the trajectory series (one value per day)."""
        rows = self.rows_of(patient)
        images = set(rows["image"])
        lesions = self.lesions[self.lesions["image"].isin(images)]
        lesions = lesions.assign(type=[TYPES.index(t) + 1 for t in lesions["type"]])
        by_image = {"lesions": _by_image(lesions, ("x0", "y0", "x1", "y1", "type",
                                                   *(c for c in ("lesion_id", "visible") if c in lesions)))}
        for name, table in self.tables.items():
            found = table[table["image"].isin(images)]
            found = found.assign(cls=found["class"].astype(str))
            by_image[name] = _by_image(found, ("x0", "y0", "x1", "y1", "cls", "track_id" if name == TRACKS else "score",
                                               *(("counted",) if "counted" in found else ())))
        visits: dict[int, list[dict[str, Any]]] = {}
        columns = ["image", "patient_id", "view", "width", "height", "day", "treatment", *(["date"] if "date" in rows
                                                                                           else [])]
        for row in rows[columns].to_dict("records"):      # plain dicts: per-row pandas access is slow
            visits.setdefault(int(row["day"]), []).append(row)
        days = []
        for day in sorted(visits):
            first = visits[day][0]
            date = None if rundir.is_missing(first.get("date")) else str(pd.Timestamp(first["date"]).date())
            days.append({"day": day, "date": date, "treatment": str(first["treatment"]),
                         "views": {row["view"]: self._image_entry(row, by_image) for row in visits[day]}})
        return {"id": patient, "days": days, "series": self.series(rows)}

    def _image_entry(self, row: dict[str, Any], by_image: dict[str, dict[str, list[list[Any]]]]) -> dict[str, Any]:
        """One image of a patient's page: its URLs, size, lesion boxes and each grader table's boxes."""
        image, pid = row["image"], row["patient_id"]
        return {"image": f"run/{image}", "typemap": f"data/typemap/{pid}/{PurePosixPath(image).stem}.png",
                "width": int(row["width"]), "height": int(row["height"]),
                "lesions": by_image["lesions"].get(image, []),
                "boxes": {name: found.get(image, []) for name, found in by_image.items() if name != "lesions"},
                "gradcam": {c: f"gradcam/{pid}/{p.name}" for c, p in sorted(self.gradcam.get(image, {}).items())}}

    def series(self, rows: pd.DataFrame) -> list[dict[str, Any]]:
        """The trajectory of one patient's ``rows``: every series' mean per day (None where missing)."""
        frame = rows[["image", "day"]].copy()
        named: list[tuple[str, str]] = []
        for column in TRUTH_SERIES:
            if column in rows:
                frame[f"truth:{column}"] = pd.to_numeric(rows[column], errors="coerce")
                named.append((f"truth:{column}", "truth"))
        if self.outcomes is not None:
            keep = [c for c in self.outcomes.columns if c not in ("image", "patient_id", "day", "date", "block",
                                                                     "treatment", "view") and not c.startswith("grader_")
                    and c not in TRUTH_SERIES and pd.api.types.is_numeric_dtype(self.outcomes[c])]
            frame = frame.merge(self.outcomes[["image", *keep]].rename(columns=lambda c: c if c == "image" else
                                                                      f"analysis:{c}"), on="image", how="left")
            named += [(f"analysis:{c}", "analysis") for c in keep]
        if self.grades is not None:
            outcomes = [c for entry in self.graders.values() for c in entry.get("outcomes", []) if c in self.grades]
            frame = frame.merge(self.grades[["image", *outcomes]].rename(columns=lambda c: c if c == "image" else
                                                                        f"grader:{c}"), on="image", how="left")
            named += [(f"grader:{c}", "grader") for c in outcomes]
        daily = frame.drop(columns="image").groupby("day", sort=True).mean(numeric_only=True)
        return [{"name": name.split(":", 1)[1], "source": source, "scale": scale_of(name.split(":", 1)[1]),
                 "values": [_number(v) for v in daily[name].tolist()]} for name, source in named]

    # ------------------------------------------------------------------------------------ run level
    def run_page(self) -> dict[str, Any]:
        """``data/run.json``: grader accuracy against the truth, and the effects beside their truth."""
        effects = None
        if self.effects is not None:
            columns = tuple(c for c in EFFECT_COLUMNS if c in self.effects)
            effects = {"columns": list(columns), "rows": _records(self.effects, columns, digits=4)}
        return {"run": self.run.resolve().name, "accuracy": self.accuracy(), "effects": effects}

    def accuracy(self) -> list[dict[str, Any]]:
        """Per grader column with a known truth (:data:`TRUTH_FOR`): n, mean absolute error, bias, Pearson r
        and the (truth, grade, patient) points."""
        if self.grades is None:
            return []
        truth = self.manifest.copy()
        present = [f"n_{t}" for t in scale.INFLAMMATORY_TYPES if f"n_{t}" in truth]
        if len(present) == len(scale.INFLAMMATORY_TYPES):
            truth["inflammatory_count"] = truth[present].sum(axis=1)
        joined = truth.merge(self.grades, on="image", how="inner", suffixes=("", "_grade"))
        found = []
        for grader in sorted(self.graders):
            for column in self.graders[grader].get("columns", []):
                target = TRUTH_FOR.get(column.removeprefix(f"{grader}_"))
                if target is None or target not in joined or column not in joined:
                    continue
                pair = pd.DataFrame({"patient_id": joined["patient_id"],
                                     target: pd.to_numeric(joined[target], errors="coerce"),
                                     column: pd.to_numeric(joined[column], errors="coerce")}).dropna()
                if pair.empty:
                    continue
                t, g = pair[target].to_numpy(dtype=float), pair[column].to_numpy(dtype=float)
                r = float(np.corrcoef(t, g)[0, 1]) if len(t) > 1 and t.std() > 0 and g.std() > 0 else None
                found.append({"grader": grader, "column": column, "truth": target, "n": int(len(t)),
                              "mae": round(float(np.abs(g - t).mean()), 3), "bias": round(float((g - t).mean()), 3),
                              "r": None if r is None else round(r, 3),
                              "points": [[round(float(a), 3), round(float(b), 3), p]
                                         for a, b, p in zip(t, g, pair["patient_id"])]})
        return found

    # ---------------------------------------------------------------------------------------- files
    def typemap(self, image: str) -> bytes:
        """The type map of ``image`` (a manifest path): an 8-bit PNG, lesion type index + 1 per pixel."""
        row = self.manifest.loc[self.manifest["image"] == image].iloc[0]
        mask_rel = rundir.checked_image_path(self.run, row["mask"], f"{self.run / rundir.MANIFEST}: column 'mask'")
        from PIL import Image

        with Image.open(rundir.run_file(self.run, mask_rel)) as img:
            ids = np.asarray(img).astype(np.int64)
        lut = np.zeros(65536, np.uint8)
        lesions = self.lesions[self.lesions["image"] == image]
        lut[lesions["lesion_id"].to_numpy(dtype=np.int64) + 1] = [TYPES.index(t) + 1 for t in lesions["type"]]
        return png_bytes(lut[ids])

    def site(self) -> dict[str, tuple[str, Callable[[], bytes]]]:
        """Every URL path the browser may ask for -> (content type, producer of its bytes)."""
        def as_json(make: Callable[[], Any]) -> tuple[str, Callable[[], bytes]]:
            return "application/json", lambda: json.dumps(make(), separators=(",", ":")).encode("utf-8")

        site: dict[str, tuple[str, Callable[[], bytes]]] = {}
        for name, (kind, read) in assets().items():
            site[name if name in PAGES else f"assets/{name}"] = (kind, read)
        site["data/index.json"] = as_json(self.summary)
        site["data/run.json"] = as_json(self.run_page)
        for pid in self.patients:
            site[f"data/patient/{pid}.json"] = as_json(lambda pid=pid: self.patient(pid))
        for row in self.manifest.itertuples(index=False):
            path = self.run.joinpath(*PurePosixPath(row.image).parts)   # checked inside the run by load()
            site[f"run/{row.image}"] = ("image/png", path.read_bytes)
            site[f"data/typemap/{row.patient_id}/{PurePosixPath(row.image).stem}.png"] = (
                "image/png", lambda image=row.image: self.typemap(image))
            for file in self.gradcam.get(row.image, {}).values():
                site[f"gradcam/{row.patient_id}/{file.name}"] = ("image/png", file.read_bytes)
        return site


def assets() -> dict[str, tuple[str, Callable[[], bytes]]]:
    """The web app's files shipped in the package (``synthtrial/view/assets``): name -> (type, reader); the
    pages (:data:`PAGES`) are made from the layout and their fragments, which are not listed themselves."""
    kinds = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
             ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
    folder = resources.files("synthtrial.view") / "assets"
    parts = {LAYOUT, *(fragment for _, _, fragment, _ in PAGES.values())}
    files = {item.name: (kinds[Path(item.name).suffix], item.read_bytes) for item in folder.iterdir()
             if item.is_file() and Path(item.name).suffix in kinds and item.name not in parts}
    for name in PAGES:
        files[name] = (kinds[".html"], lambda name=name: page(name))
    return files


def page(name: str) -> bytes:
    """The HTML of page ``name`` (a key of :data:`PAGES`): the layout with its title, nav, main and script."""
    folder = resources.files("synthtrial.view") / "assets"
    _, title, fragment, script = PAGES[name]
    current = ' class="current"'
    nav = "".join(f'<a href="{url}"{current if url == name else ""}>{label}</a>' for url, (label, *_) in PAGES.items())
    layout = string.Template((folder / LAYOUT).read_text(encoding="utf-8"))
    return layout.substitute(title=title, nav=nav, main=(folder / fragment).read_text(encoding="utf-8"),
                             script=script).encode("utf-8")


# ------------------------------------------------------------------------------------------- loading

def load(run: str | os.PathLike[str], gradcam: str | os.PathLike[str] | None = None) -> RunView:
    """Read ``run`` for the browser: the validated manifest and lesions, grades and grader tables (fresh rows
    only), analysis outcomes and effects when analysed, and Grad-CAM overlays (``gradcam`` or RUN/gradcam)."""
    run = rundir.check_run_dir(run)
    manifest = rundir.read_manifest(run, MANIFEST_NEEDS)
    for i, value in enumerate(manifest["mask"].tolist()):
        rundir.checked_image_path(run, value, f"{run / rundir.MANIFEST}: row {i + 1}, column 'mask'")
    lesions = rundir.read_lesions(run, set(manifest["image"]))
    fresh = set(zip(manifest["image"], manifest["sha256"]))

    def current(table: pd.DataFrame | None) -> pd.DataFrame | None:
        if table is None or rundir.GRADES_SHA not in table:
            return table
        keep = [(i, s) in fresh for i, s in zip(table["image"], table[rundir.GRADES_SHA])]
        return table[keep].reset_index(drop=True)

    grades = current(rundir.read_grades(run))
    graders = rundir.read_grades_index(run) if grades is not None else {}
    tables = {name: t for name in (DETECTIONS, TRACKS)
              if (t := current(rundir.read_grade_table(run, name))) is not None}
    outcomes = effects = None
    analysis = run / ANALYSIS
    if (analysis / OUTCOMES).is_file():
        outcomes = rundir.read_parquet(rundir.run_file(run, f"{ANALYSIS}/{OUTCOMES}"))
        rundir.require_columns(outcomes, ("image",), analysis / OUTCOMES)
    if (analysis / EFFECTS).is_file():
        try:
            effects = pd.read_csv(rundir.run_file(run, f"{ANALYSIS}/{EFFECTS}"))
        except (OSError, ValueError) as exc:
            raise RunError(f"{analysis / EFFECTS}: cannot be read as a CSV table ({exc})") from None
    folder = Path(gradcam) if gradcam is not None else run / GRADCAM_DIR
    if gradcam is not None and not folder.is_dir():
        raise RunError(f"{folder}: no such folder (option --gradcam; write one with `synthtrial graders explain "
                       f"{run} --out {folder}`)")
    return RunView(run, manifest, lesions.drop(columns="_row"), grades, graders, tables, outcomes, effects,
                   find_gradcam(manifest, folder) if folder.is_dir() else {})


def find_gradcam(manifest: pd.DataFrame, folder: Path) -> dict[str, dict[str, Path]]:
    """Per manifest image, its Grad-CAM overlays in ``folder`` (``<patient>/<stem>_<characteristic>.png``):
    characteristic -> file. Only regular files inside ``folder`` with a plain characteristic name count."""
    root = folder.resolve()
    found: dict[str, dict[str, Path]] = {}
    for pid, rows in manifest.groupby("patient_id", sort=False):
        sub = folder / pid
        if not sub.is_dir():
            continue
        files = [p for p in sub.iterdir() if p.suffix == ".png" and p.is_file()
                 and p.resolve().is_relative_to(root)]
        for image in rows["image"]:
            stem = PurePosixPath(image).stem
            for p in files:
                name = p.stem.removeprefix(f"{stem}_")
                if p.stem.startswith(f"{stem}_") and _CHARACTERISTIC.fullmatch(name):
                    found.setdefault(image, {})[name] = p
    return found
