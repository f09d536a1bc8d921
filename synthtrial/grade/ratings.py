"""``synthtrial rate``: a simulated rater panel reads a run (:mod:`synthtrial.grade.raters`); its ratings and truth.

Writes, under the run's lock, each file atomically and only after every input was checked:

* ``RUN/ratings.parquet``: one row per reading, :data:`synthtrial.grade.raters.RATING_COLUMNS` (rater, image,
  reread flag, count, per-type counts, IGA, Hayashi level);
* ``RUN/ratings.json``: the truth behind them: the seed, the panel's parameters, every rater's personal
  parameters, the agreement table (:mod:`synthtrial.grade.agreement`) and the sha256 of the parquet's bytes, which
  :func:`read_ratings` checks (a ratings table that no longer matches its truth is refused in one line).

The panel reads the run's lesion table (type, ``diameter_mm``, ``intensity``, ``visible``); the calendar day of an
image is its date's distance from the run's first date (``day`` when the manifest has no dates). ``analyze``
takes the ratings as outcomes through :func:`rating_outcomes` (first reads only): each rater's count and IGA and
the panel mean's count, IGA and Hayashi level, named ``rater_<name>_<column>`` and ``raters_mean_<column>``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.grade.agreement import DEFAULT_SIMULATIONS, agreement_table
from synthtrial.grade.raters import RATING_COLUMNS, Panel, draw_raters, load_panel, read_all, reading_table
from synthtrial.run import rundir
from synthtrial.run.rundir import RunError
from synthtrial.util.atomic import write_bytes_atomic, write_text_atomic

__all__ = ["RATINGS", "RATINGS_INDEX", "agreement_of_run", "rate_run", "rating_outcomes", "read_ratings",
           "run_images"]

RATINGS = "ratings.parquet"
RATINGS_INDEX = "ratings.json"
_LESION_NEEDS = ("type", "diameter_mm", "intensity")
MAX_SIMULATIONS = 10_000


def run_images(run: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's images (``image``, ``calendar_day``, in manifest order) and its lesion table, checked for what the
    raters read."""
    manifest, lesions = rundir.read_run(run)
    path = Path(run) / rundir.LESIONS
    rundir.require_columns(lesions, _LESION_NEEDS, path)
    for column in ("diameter_mm", "intensity"):
        values = pd.to_numeric(lesions[column], errors="coerce").to_numpy(dtype=float)
        bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
        if bad.size:
            raise RunError(f"{path}: row {bad[0] + 1}, column '{column}': {rundir.show(lesions[column].iloc[bad[0]])} "
                           "is not a number >= 0")
    if "date" in manifest.columns and manifest["date"].notna().all():
        dates = pd.to_datetime(manifest["date"])
        calendar = (dates - dates.min()).dt.days.to_numpy(dtype=float)
    else:
        days = manifest["day"].to_numpy(dtype=float)
        calendar = days - days.min()
    return pd.DataFrame({"image": manifest["image"].to_numpy(), "calendar_day": calendar}), lesions


def rate_run(run: str | os.PathLike[str], n_raters: int, panel: str | os.PathLike[str] | Panel | None = None, *,
             seed: int = 0, simulations: int = DEFAULT_SIMULATIONS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Let ``n_raters`` simulated raters read the run; write ``ratings.parquet`` and ``ratings.json`` (module
    docstring) and return the ratings and the agreement table. ``panel``: a :class:`Panel`, a JSON file, or None
    (the defaults)."""
    if isinstance(simulations, bool) or not isinstance(simulations, (int, np.integer)) \
            or not 2 <= simulations <= MAX_SIMULATIONS:
        raise RunError(f"--simulations must be a whole number from 2 to {MAX_SIMULATIONS}, got {simulations!r}")
    panel = panel if isinstance(panel, Panel) else load_panel(panel)
    raters = draw_raters(panel, n_raters, seed)
    run = rundir.check_run_dir(run)
    images, lesions = run_images(run)
    table = reading_table(images, lesions, panel)
    readings = read_all(table, panel, raters, seed)
    agreement = agreement_table(readings, table, panel, raters, seed, simulations)
    ratings = readings.assign(image=images["image"].to_numpy()[readings["image_index"].to_numpy()])
    ratings = ratings[list(RATING_COLUMNS)]
    data = rundir.parquet_bytes(ratings)
    truth = {"seed": int(seed), "n_raters": len(raters), "simulations": int(simulations),
             "panel": panel.as_dict(), "raters": [asdict(r) for r in raters],
             "ratings_sha256": rundir.sha256_bytes(data),
             "agreement": json.loads(agreement.to_json(orient="records"))}
    with rundir.locked(run, what="rating"):
        write_bytes_atomic(run / RATINGS, data)
        write_text_atomic(run / RATINGS_INDEX, json.dumps(truth, indent=2, allow_nan=True) + "\n")
    return ratings, agreement


def _truth(run: Path) -> dict[str, Any] | None:
    path = run / RATINGS_INDEX
    if not path.exists() and not (run / RATINGS).exists():
        return None
    if not path.exists():
        raise RunError(f"{path}: missing beside {RATINGS}; run `synthtrial rate` again")
    truth = rundir.read_json(path)
    for key in ("ratings_sha256", "raters", "panel", "agreement"):
        if key not in truth:
            raise RunError(f"{path}: key '{key}' is missing; run `synthtrial rate` again")
    return truth


def read_ratings(run: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]] | None:
    """``ratings.parquet`` and its truth (``ratings.json``), checked against each other and the manifest; None
    when the run was not rated."""
    run = Path(run)
    truth = _truth(run)
    if truth is None:
        return None
    path = rundir.run_file(run, RATINGS)
    if not path.is_file():
        raise RunError(f"{path}: missing beside {RATINGS_INDEX}; run `synthtrial rate` again")
    if rundir.sha256_file(path) != truth["ratings_sha256"]:
        raise RunError(f"{path}: does not match the ratings_sha256 of {RATINGS_INDEX} (changed or truncated); run "
                       "`synthtrial rate` again")
    ratings = rundir.read_parquet(path)
    rundir.require_columns(ratings, RATING_COLUMNS, path)
    return ratings, truth


def rating_outcomes(run: str | os.PathLike[str], images: pd.Series | None = None) -> pd.DataFrame | None:
    """``image`` + every rater's count and IGA and the panel mean's count, IGA and Hayashi level on the first reads
    (``rater_<name>_count``, ``rater_<name>_iga``, ``raters_mean_<column>``); None when the run was not rated.
    ``images`` (the manifest's) must all have been read."""
    found = read_ratings(run)
    if found is None:
        return None
    ratings, _ = found
    first = ratings[~ratings["reread"].astype(bool)]
    order = list(dict.fromkeys(first["rater"].astype(str)))
    wide = {f"rater_{name}_{column}": first[first["rater"].astype(str) == name].set_index("image")[column]
            .astype(float) for name in order for column in ("count", "iga")}
    out = pd.DataFrame(wide)
    for column in ("count", "iga", "hayashi_level"):
        out[f"raters_mean_{column}"] = first.groupby("image")[column].mean().astype(float)
    out = out.rename_axis("image").reset_index()
    if images is not None:
        missing = sorted(set(images) - set(out["image"]))
        if missing:
            raise RunError(f"{Path(run) / RATINGS}: image {rundir.show(missing[0])} of the manifest was not rated; "
                           "run `synthtrial rate` again")
    return out


def agreement_of_run(run: str | os.PathLike[str]) -> pd.DataFrame | None:
    """The agreement table ``rate`` recorded in ``ratings.json`` (None when the run was not rated)."""
    found = read_ratings(run)
    return None if found is None else pd.DataFrame(found[1]["agreement"])

