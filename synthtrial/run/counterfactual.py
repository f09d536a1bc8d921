"""``generate --counterfactual``: each patient's image series in every arm's counterfactual world, paired with
the factual series.

For each arm *X* of the design, ``RUN/counterfactual/<X>/`` is a run directory of its own (the same layout
:mod:`synthtrial.run.rundir` owns, so ``verify``, ``grade`` and ``export`` read it): the patient's series had
*X* been given on every day (:mod:`synthtrial.trial.counterfactual` defines the world and its severities).
What is shared with the factual run is shared exactly:

* the face, each image's render seed and view;
* the lesions: the lesion process runs from the same random streams with the same history
  (:func:`synthtrial.lesions.course.counterfactual_course`), so every lesion born before the first day the two
  worlds' lesion targets differ is the same object with the same ``lesion_id``, drawn alike until one world
  ends it early; lesions born after it are each world's own, numbered after the factual run's last;
* the pixels: with a backend that can say where a lesion's drawing reaches (the procedural one,
  ``reach``), the counterfactual image is the factual image outside the reach of the lesions that differ
  between the two worlds on that day and view (the grain there is the factual draw), so a pair differs only
  where its lesion tables do. A diffusion backend renders the counterfactual image whole, from the same seed.

The individual treatment effects, factual minus counterfactual, per patient, day and arm, for severity and
lesion count, are ``RUN/counterfactual/individual_effects.parquet`` (and ``.csv``); ``truth.json`` keeps its
shape. The factual run is written first and byte for byte as without ``--counterfactual``; each world resumes
like ``generate`` does (its ``.parts`` records), so an interrupted command run again ends with the same bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from synthtrial.run import rundir
from synthtrial.run.rendering import PatientJob
from synthtrial.run.rundir import RunError
from synthtrial.trial.counterfactual import counterfactual_severities
from synthtrial.trial.protocol import PATIENT_ID_PATTERN

__all__ = ["counterfactual_protocols", "individual_effects", "pair_tasks", "world_config"]


def counterfactual_protocols(protocol: pd.DataFrame, truth: Mapping[str, Any] | None,
                             source: str) -> dict[str, pd.DataFrame]:
    """Each arm's counterfactual protocol: the run's rows with that arm as treatment and that world's
    severities (checked before anything is written; one-line errors)."""
    worlds = counterfactual_severities(protocol, truth, source)
    out = {}
    for arm, rows in worlds.groupby("arm", sort=False):
        if not PATIENT_ID_PATTERN.fullmatch(arm):
            raise RunError(f"--counterfactual: arm {arm!r} cannot name a folder (letters, digits, '_', '.', '-')")
        world = protocol.copy()
        world["treatment"] = arm
        world["severity"] = rows["severity"].to_numpy()
        world.attrs.update(protocol.attrs)
        out[str(arm)] = world
    return out


def world_config(config: dict[str, Any], arm: str, protocol_sha256: str, rows: int,
                 factual_sha256: str) -> dict[str, Any]:
    """A world's ``config.json``: the factual run's, with its own protocol and what it is."""
    return {**config, "protocol": {**config["protocol"], "sha256": protocol_sha256, "rows": rows},
            "counterfactual": {"arm": arm, "factual_protocol_sha256": factual_sha256,
                               "definition": f"the factual run's patients given {arm} on every day, everything "
                                             "else shared (synthtrial.trial.counterfactual)"}}


def pair_tasks(jobs: dict[str, PatientJob], tasks: list, factual_jobs: dict[str, PatientJob],
               factual_tasks: list, run_dir: Path) -> tuple[dict[str, PatientJob], list]:
    """A world's render jobs and tasks (as ``generate`` plans them) paired with the factual ones: each job
    knows the factual severities, each row the factual image of its patient, day and view."""
    image_of = {(job.patient_id, row["day"], row["view"]): row["image"] for job, rows in factual_tasks for row in rows}
    paired = {pid: dataclasses.replace(job, factual_severity=factual_jobs[pid].severity) for pid, job in jobs.items()}
    return paired, [(paired[job.patient_id], [
        {**row, "factual": str(run_dir / image_of[(job.patient_id, row["day"], row["view"])])} for row in rows])
        for job, rows in tasks]


def individual_effects(run_dir: Path, arms: list[str]) -> pd.DataFrame:
    """Factual minus counterfactual severity and lesion count per patient, day and arm (one row per day: the
    views of a day share their lesions), from the finished manifests."""
    columns = ["patient_id", "day", "treatment", "severity", "lesion_count"]
    factual = rundir.read_manifest(run_dir, columns).drop_duplicates(["patient_id", "day"])[columns]
    frames = []
    for arm in arms:
        world = rundir.read_manifest(rundir.counterfactual_dir(run_dir, arm), columns).drop_duplicates(
            ["patient_id", "day"])[["patient_id", "day", "severity", "lesion_count"]]
        both = factual.merge(world, on=["patient_id", "day"], how="left", suffixes=("", "_cf"), validate="1:1")
        if both["severity_cf"].isna().any():
            raise RunError(f"{rundir.counterfactual_dir(run_dir, arm)}: its manifest lacks days of the factual run")
        both.insert(2, "arm", arm)
        both["ite_severity"] = both["severity"] - both["severity_cf"]
        both["ite_count"] = both["lesion_count"] - both["lesion_count_cf"]
        frames.append(both)
    table = pd.concat(frames, ignore_index=True)
    table = table.astype({"day": "int64", "lesion_count": "int64", "lesion_count_cf": "int64", "ite_count": "int64"})
    return table[list(rundir.INDIVIDUAL_EFFECT_COLUMNS)]
