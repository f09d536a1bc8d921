"""Evaluation of DermX on a run: levels, characteristics where they vary, and Grad-CAM plausibility as the paper
measures it.

Choices, stated once:

* **Level**: accuracy of the predicted ACNE04 / Hayashi level (by the weights' ``level_from`` route:
  :meth:`DermX.grades`) against the manifest's ``acne04_level``, the predicted levels' histogram beside the
  true one (a network that says one level for every image shows there), and the MAE of ``severity`` against
  the simulated severity. Weights with a count head also get both routes' accuracies
  (``level_accuracy_classifier``, ``level_accuracy_count``) and the count's MAE against the simulated
  active-lesion count (``count_MAE``). Weights with characteristic counts get each characteristic's count MAE
  against the truth's count of its lesions (``characteristics[c]["count_MAE"]``) and their mean
  (``characteristic_count_MAE``).
* **Characteristics** (threshold 0.5): per characteristic its prevalence (share of images that show it) and
  absent share beside precision, recall, F1 and support, against the ``visible`` truth where the run has it
  (else the ``simulated`` one; :mod:`synthtrial.graders.dermx_train`), and the F1 against the simulated truth.
  Macro F1 over the characteristics present in the run; the record says whether every characteristic is
  absent from at least :data:`MIN_ABSENT` of the images (``rarely_absent`` names those that are not: on
  them a network that always says "present" scores a high F1 without reading anything).
* **The varied subset** (``*_varied``): where some characteristic is rarely absent (on the grader training
  set's held-out splits, visible marks are on 91 % of the images, papules, pustules and open comedones on
  80-82 %: a patient's earlier visits leave marks, and every level from 1 up shows every active type), the
  same metrics on the largest subset :func:`varied_subset` finds in which every characteristic is absent
  from at least a quarter of the images. It is chosen from the truth alone, never from the predictions.
* **Plausibility** (Jalaboi et al., DermX paper eqs. 6-8 and Tables 6-7): fuzzy F1, sensitivity and
  specificity of each characteristic's Grad-CAM map (``DermX.explain(grid=True)``: the grad-cam package's
  map, min-max scaled to [0, 1], at the CAM layer's own resolution; no threshold: the paper compares the
  activations themselves, not a binarised map) against the characteristic's explanation area
  (:func:`synthtrial.graders.dermx_train.image_truth`: lesion masks widened to their erythema halo)
  max-pooled to the same grid. Averaged as the paper does: per characteristic over the images where both the
  truth and the network say the characteristic is there (so localisation is scored apart from
  identification), then the mean over characteristics (the paper's "Mean" row: 0.39 DermX, 0.36 DermX+).
  The same over every image where the truth has it (missed ones included; the paper's Tables B.19 / B.21)
  is reported as ``plausibility_F1_all_present``. Beside each F1 its chance level ``F1_uniform``: the F1 of a
  map that is 1 on every cell (``2 f / (1 + f)`` for an area covering a share ``f`` of the cells, reported as
  ``area_share``): a map that does not beat it localises nothing. On the grader set's 512 px images at the
  default 256 px input (32 x 32 cells of 16 image px, 6.7 mm at the shipped trial's 0.42 mm/px) a papule's area
  covers 3-4 % of the cells, a comedo's 0.4 %, so ``F1_uniform`` is 0.01-0.07 (the shipped weights scored 0.04
  against 0.035 on 20 hopper images: diffuse maps of a head that says "present" for everything). The paper's
  dermatologist maps cover far more of their images, so its 0.35-0.39 is a lower bar there than here.
* **Several weights side by side** (:func:`evaluate_dermx_models`; DermX+ beside unguided DermX): each image
  and its truth read once, every model scored on the same images, :func:`side_by_side` sets their headline
  figures in one table.
* **Model card** (:func:`card_figures`): the figures ``evaluation.json`` (:mod:`synthtrial.graders.cards`)
  reads for an evaluation set; the held-out seed's varied subset fills ``varied_characteristics``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from synthtrial.graders.base import GraderError, read_rgb
from synthtrial.graders.dermx import LEVEL_ROUTES, LEVELS, DermX, fuzzy_scores, route_grades
from synthtrial.graders.dermx_train import image_truth, truth_counts
from synthtrial.run import rundir
from synthtrial.util.progress import ProgressCallback

#: least share of images a characteristic must be absent from for its F1 to say something (issue 20)
MIN_ABSENT = 0.25
#: per record: the paper's three scores, then the chance F1 of an all-ones map and the area's share of the cells
PLAUSIBILITY = ("F1", "sensitivity", "specificity", "F1_uniform", "area_share")


def prevalence_table(truth: np.ndarray, predicted: np.ndarray, names: Sequence[str]) -> pd.DataFrame:
    """Per characteristic (rows ``names``): prevalence, absent share, precision, recall, F1 (0 where undefined)
    and support, from ``(N, C)`` 0/1 truth and predictions."""
    y, p = np.asarray(truth, bool), np.asarray(predicted, bool)
    tp, fp, fn = (y & p).sum(0), (~y & p).sum(0), (y & ~p).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)
    prevalence = y.mean(0) if len(y) else np.zeros(y.shape[1])
    return pd.DataFrame({"prevalence": prevalence, "absent": 1 - prevalence, "precision": precision,
                         "recall": recall, "F1": f1, "support": y.sum(0)}, index=list(names))


def varied_subset(present: np.ndarray, min_absent: float = MIN_ABSENT) -> np.ndarray:
    """A boolean selection of the images (rows of ``(N, C)`` 0/1 ``present``) in which every characteristic
    that is ever absent is absent from at least ``min_absent`` of the selected images. Greedy and
    deterministic: while some characteristic falls short, drop the image that has it and has the most of
    the characteristics that fall short (the last such image on a tie)."""
    y = np.asarray(present, bool)
    keep = np.ones(len(y), bool)
    possible = (~y).any(axis=0)
    while keep.any():
        absent = (~y[keep]).mean(axis=0)
        short = possible & (absent < min_absent)
        if not short.any():
            break
        worst = int(np.argmin(np.where(short, absent, np.inf)))
        candidates = np.flatnonzero(keep & y[:, worst])
        score = y[candidates][:, short].sum(axis=1)
        keep[candidates[np.flatnonzero(score == score.max())[-1]]] = False
    return keep


def plausibility_summary(records: list[tuple[int, bool, tuple[float, ...]]], names: Sequence[str]) -> dict[str, Any]:
    """The paper's averaging of ``(characteristic, predicted present, scores)`` records (each for an image whose
    truth has the characteristic; scores in :data:`PLAUSIBILITY` order, missing trailing ones NaN): per
    characteristic the mean over the records the network also found, then the mean over characteristics;
    ``*_all_present`` over every record."""
    pad = (float("nan"),) * len(PLAUSIBILITY)
    frame = pd.DataFrame([(c, hit, *(tuple(scores) + pad)[:len(PLAUSIBILITY)]) for c, hit, scores in records],
                         columns=["c", "hit", *PLAUSIBILITY])
    out: dict[str, Any] = {"per_characteristic": {}}
    for suffix, part in (("", frame[frame["hit"]] if len(frame) else frame), ("_all_present", frame)):
        means = part.groupby("c")[list(PLAUSIBILITY)].mean() if len(part) else pd.DataFrame(columns=PLAUSIBILITY)
        for metric in PLAUSIBILITY:
            out[f"plausibility_{metric}{suffix}"] = float(means[metric].mean()) if len(means) else float("nan")
        if not suffix:
            counts = part.groupby("c").size() if len(part) else pd.Series(dtype=int)
            out["per_characteristic"] = {names[c]: {**{m: float(means.loc[c, m]) for m in PLAUSIBILITY},
                                                    "samples": int(counts[c])} for c in means.index}
    return out


def evaluate_dermx(dermx: DermX, run: str | Path, *, plausibility: bool = True,
                   progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Level, characteristic and plausibility metrics of ``dermx`` on a run (module docstring);
    ``progress(done, images, "")`` after each image."""
    return evaluate_dermx_models({"dermx": dermx}, run, plausibility=plausibility, progress=progress)["dermx"]


def evaluate_dermx_models(models: Mapping[str, DermX], run: str | Path, *, plausibility: bool = True,
                          progress: ProgressCallback | None = None) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_dermx` of several models (same characteristics) on the same run, each image and its truth
    read once: ``{label: metrics}``."""
    run = Path(run)
    chars = next(iter(models.values())).config.characteristics
    if any(m.config.characteristics != chars for m in models.values()):
        raise GraderError("dermx: the weights compared must name the same characteristics")
    manifest = rundir.read_manifest(run, ("image", "patient_id", "acne04_level", "severity", "lesion_count"))
    lesions = rundir.read_lesions(run, set(manifest["image"]))
    truth = "visible" if "visible" in lesions.columns else "simulated"
    by_image = dict(tuple(lesions.groupby("image", sort=False)))
    present, simulated, true_counts = [], [], []
    scored: dict[str, tuple[list, ...]] = {label: ([], [], [], [], []) for label in models}
    for k, rel in enumerate(manifest["image"], start=1):
        image = read_rgb(run / rel)
        rows = by_image.get(rel, lesions.iloc[:0])
        has, areas = image_truth(run, rel, rows, chars, truth)
        present.append(has)
        true_counts.append(truth_counts(rows, chars, truth, run))
        simulated.append(image_truth(run, rel, rows, chars, "simulated")[0] if truth != "simulated" else has)
        pooled: dict[tuple[int, ...], np.ndarray] = {}
        for label, dermx in models.items():
            probs, level_probs, counts, records, char_counts = scored[label]
            level_p, char_p, count, char_count = dermx.outputs([image])
            level_probs.append(level_p[0]), probs.append(char_p[0])
            if char_count is not None:
                char_counts.append(char_count[0])
            counts.append(float(count[0]) if count is not None else float("nan"))
            if plausibility and has.any():
                maps = dermx.explain(image, grid=True)
                shape = tuple(maps.shape[-2:])
                if shape not in pooled:
                    pooled[shape] = F.adaptive_max_pool2d(torch.from_numpy(areas).float(), shape).numpy()
                records.extend((c, bool(char_p[0, c] >= 0.5), map_scores(maps[c], pooled[shape][c]))
                               for c in range(len(chars)) if has[c])
        if progress is not None:
            progress(k, len(manifest), "")
    result = {}
    for label, (probs, level_probs, counts, records, char_counts) in scored.items():
        count = np.asarray(counts) if models[label].config.count_head else None
        level, severity = models[label].grades(np.asarray(level_probs), count)
        result[label] = summarize(manifest, chars, truth, np.asarray(present), np.asarray(simulated),
                                  np.asarray(probs), level, severity, records if plausibility else None)
        result[label]["level_from"] = models[label].config.level_from
        if count is not None:       # both routes side by side, and the count itself
            true_levels = manifest["acne04_level"].to_numpy(int)
            for route in LEVEL_ROUTES:
                guess = route_grades(route, np.asarray(level_probs), count)[0]
                result[label][f"level_accuracy_{route}"] = float((guess == true_levels).mean())
            result[label]["count_MAE"] = float(np.abs(count - manifest["lesion_count"].to_numpy(float)).mean())
        if char_counts:             # each characteristic's count against the truth's count of its lesions
            errors = np.abs(np.asarray(char_counts) - np.asarray(true_counts)).mean(axis=0)
            for c, error in zip(chars, errors):
                result[label]["characteristics"][c]["count_MAE"] = float(error)
            result[label]["characteristic_count_MAE"] = float(errors.mean())
    return result


def map_scores(cam: np.ndarray, area: np.ndarray) -> tuple[float, ...]:
    """One plausibility record's scores (:data:`PLAUSIBILITY`): the paper's fuzzy F1, sensitivity and
    specificity of ``cam`` against ``area`` (same grid), the F1 of an all-ones map and the area's share."""
    area = np.asarray(area, np.float64)
    return (*fuzzy_scores(cam, area), fuzzy_scores(np.ones_like(area), area)[0], float(area.mean()))


def summarize(manifest: pd.DataFrame, chars: Sequence[str], truth: str, present: np.ndarray, simulated: np.ndarray,
              probs: np.ndarray, guess: np.ndarray, severity: np.ndarray,
              records: list[tuple[int, bool, tuple[float, ...]]] | None) -> dict[str, Any]:
    """The metrics record of :func:`evaluate_dermx` from its per-image arrays (``guess``: predicted levels,
    ``severity``: predicted severities, by the weights' level route)."""
    from sklearn.metrics import f1_score

    predicted = probs >= 0.5
    table = prevalence_table(present, predicted, chars)
    table["F1_simulated"] = prevalence_table(simulated, predicted, chars)["F1"]
    table["prevalence_simulated"] = simulated.mean(0)
    used = [c for c in range(len(chars)) if present[:, c].any()]
    levels = manifest["acne04_level"].to_numpy(int)
    guess = np.asarray(guess, int)
    result: dict[str, Any] = {
        "images": int(len(manifest)), "truth": truth,
        "level_accuracy": float((guess == levels).mean()),
        "level_true": np.bincount(levels, minlength=LEVELS).tolist(),
        "level_predicted": np.bincount(guess, minlength=LEVELS).tolist(),
        "severity_MAE": float(np.abs(np.asarray(severity, float) - manifest["severity"].to_numpy(float)).mean()),
        "characteristic_F1_macro": float(table["F1"].iloc[used].mean()) if used else float("nan"),
        "characteristic_F1_micro": float(f1_score(present, predicted, average="micro", zero_division=0)),
        "characteristic_F1_macro_simulated": float(table["F1_simulated"].iloc[used].mean()) if used else float("nan"),
        "rarely_absent": [c for c in chars if table.loc[c, "absent"] < MIN_ABSENT],
        "characteristics": {c: {k: (int(v) if k == "support" else float(v)) for k, v in row.items()}
                            for c, row in table.iterrows()},
    }
    result["every_characteristic_absent_from_a_quarter"] = not result["rarely_absent"]
    chosen = varied_subset(present)
    varied = prevalence_table(present[chosen], predicted[chosen], chars)
    used_varied = [c for c in range(len(chars)) if present[chosen, c].any()]
    result["varied_images"] = int(chosen.sum())
    result["varied_levels"] = np.bincount(levels[chosen], minlength=LEVELS).tolist()
    result["varied_composition"] = composition(present[chosen], chars)
    result["characteristic_F1_macro_varied"] = (float(varied["F1"].iloc[used_varied].mean()) if used_varied
                                                 else float("nan"))
    for c, row in varied.iterrows():
        result["characteristics"][c].update({"prevalence_varied": float(row["prevalence"]),
                                             "F1_varied": float(row["F1"])})
    if records is not None:
        plaus = plausibility_summary(records, chars)
        for c, scores in plaus.pop("per_characteristic").items():
            result["characteristics"][c].update({f"plausibility_{k}": v for k, v in scores.items()})
        result.update(plaus)
    return result


COMEDONES, INFLAMMATORY = ("open_comedo", "closed_comedo"), ("papule", "pustule", "nodule")


def composition(present: np.ndarray, names: Sequence[str]) -> dict[str, int]:
    """How many of the images (rows of ``(N, C)`` 0/1 ``present``) show no lesion, comedones only (no
    inflammatory lesion), and nodules."""
    y = np.asarray(present, bool)
    col = {n: y[:, k] for k, n in enumerate(names)}
    none = np.zeros(len(y), bool)
    comedo = np.any([col.get(n, none) for n in COMEDONES], axis=0)
    inflamed = np.any([col.get(n, none) for n in INFLAMMATORY], axis=0)
    return {"no_lesion": int((~y.any(axis=1)).sum()), "comedones_only": int((comedo & ~inflamed).sum()),
            "with_nodules": int(col.get("nodule", none).sum())}


#: the headline figures :func:`side_by_side` compares
HEADLINE = ("level_accuracy", "level_accuracy_classifier", "level_accuracy_count", "count_MAE", "severity_MAE",
            "characteristic_F1_macro", "characteristic_F1_macro_varied", "characteristic_F1_micro", "plausibility_F1", "plausibility_F1_uniform", "plausibility_sensitivity",
            "plausibility_specificity", "plausibility_F1_all_present")


def side_by_side(results: Mapping[str, dict[str, Any]]) -> pd.DataFrame:
    """The headline figures (rows) of each model's metrics (columns, in the order given); NaN where a model's
    record lacks one (no plausibility scored)."""
    return pd.DataFrame({label: [float(m.get(k, float("nan"))) for k in HEADLINE] for label, m in results.items()},
                        index=list(HEADLINE))


#: card figure name -> metrics key, per evaluation set (issue 20's targets read these; graders/cards.py)
CARD_KEYS = {"level_accuracy": "level_accuracy", "level_accuracy_classifier": "level_accuracy_classifier",
             "level_accuracy_count": "level_accuracy_count", "count_mae": "count_MAE", "severity_mae": "severity_MAE",
             "characteristic_macro_f1": "characteristic_F1_macro",
             "characteristic_micro_f1": "characteristic_F1_micro",
             "characteristic_macro_f1_varied": "characteristic_F1_macro_varied",
             "plausibility_f1": "plausibility_F1", "plausibility_f1_uniform": "plausibility_F1_uniform"}


def card_figures(metrics: dict[str, Any], on: str) -> dict[str, dict[str, float]]:
    """The ``evaluation.json`` figures of one evaluation (``on``: the card's set, e.g. ``held_out_seed``), rounded
    to 3 places; on the held-out seed its varied subset also fills ``varied_characteristics`` (the set issue 20's
    characteristic target is measured on), with the subset's prevalences."""
    figures = {on: {card: round(float(metrics[key]), 3) for card, key in CARD_KEYS.items()
                    if key in metrics and np.isfinite(metrics[key])}}
    if on == "held_out_seed":
        figures["varied_characteristics"] = {
            "characteristic_macro_f1": round(float(metrics["characteristic_F1_macro_varied"]), 3),
            "images": int(metrics["varied_images"]),
            "prevalence": {c: round(row["prevalence_varied"], 3) for c, row in metrics["characteristics"].items()}}
    return figures
