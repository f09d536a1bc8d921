"""Training and evaluation of the IGA grader (:mod:`synthtrial.graders.iga`).

Choices, stated once:

* **Data.** Face crops of every training image are made once per training (BlazeFace, a few ms per 512 px
  image) and held in memory as uint8, once (3,000 crops of 384 px: 1.3 GB); each step augments its batch from
  them.
* **Loss.** Class-weighted cross-entropy on the five grades (balanced weights from the training labels), plus,
  with the count head, ``count_weight`` times the squared error of ``log(1 + count)`` for the inflammatory and
  the nodule count (summed over the two). The log scale because the IGA's boundaries (2.5, 10.5, 30.5
  inflammatory lesions) are about evenly spaced on it: an error costs the same at each boundary, where a
  Poisson loss would weigh the large counts (IGA 3 against 4, one class of the 3-class view) most. No ordinal
  loss: the count head carries the grades' order (a count that is a little off moves the grade by one).
* **Count target** (``count_target``): "simulated", the visit's papules + pustules + nodules and nodules from
  the manifest (the counts the IGA label is defined from, the same for every view), or "visible", the view's
  own visible ones (``n_visible_<type>``: what that photo shows; a side view shows fewer). A source without
  those columns (ACNE04, whose counts are of all lesions) trains the classifier only.
* **Grade route** (``grade_from``): "auto" keeps the route -- classifier or counts -- whose 3-class balanced
  accuracy (mean recall) on the validation patients' visits is the higher after the last epoch (the
  classifier without validation or count head), and stores it in ``config.json``; "classifier" or "counts"
  force one. Both routes are always reported by :func:`evaluate`.
* **Optimiser.** Adam with a cosine schedule (``classify.fit``). Augmentation: by default the graders' wide
  photometric and geometric one (:mod:`synthtrial.graders.augment`, images only: an IGA grade and a count
  survive it); with ``augment=False`` the paper's: horizontal flip, rotation (up to 15 degrees) and brightness
  (x0.8-1.2), each applied with probability ``augment_p`` (0.2). Tensors stay in the standard memory layout:
  channels-last measured no faster on the CPU for this network (26.4 against 25.5 ms of CPU per image and
  step, one thread).
* **Evaluation** is per visit (views fused), against the manifest's IGA (the simulated lesions) and, where the
  run records visibility, against the IGA of the visible lesions (per visit, the most visible inflammatory
  lesions and nodules of any one view: a perfect grader can only see those).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.graders import classify
from synthtrial.graders.augment import WIDE, Augmenter, draw_seeds, scaled
from synthtrial.graders.base import GraderError
from synthtrial.graders.iga import (COUNT_NAMES, GRADE_NAMES, GRADE_ROUTES, GROUP_NAMES, N_GRADES, IGAConfig,
                                    IGAGrader, grade_from_counts, group_of, outputs, visits)
from synthtrial.run import rundir
from synthtrial.trial import scale
from synthtrial.util.progress import ProgressCallback

COUNT_TARGETS = ("simulated", "visible")


@dataclass(frozen=True)
class TrainSettings(classify.TrainSettings):
    epochs: int = 20
    batch_size: int = 16
    lr: float = 3e-3
    class_weighted: bool = True
    augment_p: float = 0.2          # the paper's augmentation, used when ``augment`` is off
    augment: bool = True            # the wide augmentation (synthtrial.graders.augment.WIDE)
    augment_strength: float = 1.0   # its photometric ranges scaled by this (synthtrial.graders.augment.scaled)
    count_weight: float = 1.0       # weight of the count head's loss beside the cross-entropy
    count_target: str = "simulated"  # or "visible"
    grade_from: str = "auto"        # or "classifier" / "counts"

    def __post_init__(self) -> None:
        if self.count_target not in COUNT_TARGETS:
            raise GraderError(f"--count-target must be simulated or visible, got {self.count_target!r}")
        if self.grade_from not in ("auto", *GRADE_ROUTES):
            raise GraderError(f"--grade-from must be auto, classifier or counts, got {self.grade_from!r}")
        if not 0 <= self.augment_strength <= 1:
            raise GraderError(f"--augment-strength must be in [0, 1], got {self.augment_strength}")
        if not 0 <= self.count_weight <= 100:
            raise GraderError(f"--count-weight must be in [0, 100], got {self.count_weight}")


def augment(x: Any, gen: Any, p: float = 0.2, max_degrees: float = 15.0) -> Any:
    """The paper's augmentation on a [0, 1] batch: flip, rotation, brightness, each with probability ``p``."""
    import torch
    from torchvision.transforms.v2 import functional as F

    draws = torch.rand(len(x), 6, generator=gen)
    out = []
    for img, d in zip(x, draws):
        if d[0] < p:
            img = torch.flip(img, dims=(2,))
        if d[1] < p:
            img = F.rotate(img, float((d[2] * 2 - 1) * max_degrees), interpolation=F.InterpolationMode.BILINEAR)
        if d[3] < p:
            img = (img * float(0.8 + 0.4 * d[4])).clamp(0, 1)
        out.append(img)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- data

def prepare_source(grader: IGAGrader, source: classify.Source,
                   progress: ProgressCallback | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Face crops of every image of ``source`` and whether a face was found (``progress`` per image)."""
    found: list[bool] = []

    def one(image: np.ndarray) -> np.ndarray:
        crop, ok = grader.cropper.crop(image, grader.config.image_size)
        found.append(ok)
        return crop

    crops = classify.load_images(source.paths, one, progress)
    return crops, np.array(found, dtype=bool)


def count_targets(source: classify.Source, target: str = "simulated", option: str = "--count-target") -> np.ndarray:
    """``(N, 2)`` float64 counts (inflammatory, nodules) of every image of ``source`` from its run's manifest:
    the visit's simulated lesions or the view's visible ones (``target``); NaN for a source that has none
    (ACNE04). A run without the visible counts is refused for "visible" in one line."""
    if source.kind != "run":
        return np.full((len(source), len(COUNT_NAMES)), np.nan)
    prefix = "n_visible_" if target == "visible" else "n_"
    columns = [prefix + t for t in scale.INFLAMMATORY_TYPES]
    try:
        manifest = rundir.read_manifest(Path(source.where), ("image", *columns), images_must_exist=False)
    except rundir.RunError as exc:
        raise GraderError(f"{option} {target}: {exc}") from None
    table = manifest.set_index("image")[columns].astype(np.float64)
    rows = table.loc[source.meta["image"].tolist()]
    return np.stack([rows.sum(axis=1).to_numpy(), rows[prefix + "nodule"].to_numpy()], axis=1)


@dataclass
class TrainingData:
    """Every training and validation image, cropped, with its grade, counts, patient group and visit."""

    crops: np.ndarray
    grades: np.ndarray
    counts: np.ndarray
    groups: np.ndarray
    visit: np.ndarray
    is_extra: np.ndarray


def read_training_data(grader: IGAGrader, sources: Sequence[classify.Source], extras: Sequence[classify.Source],
                       count_target: str, progress: ProgressCallback | None) -> TrainingData:
    everything = [*sources, *extras]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("crops", "grades", "counts", "groups", "visit", "extra")}
    for k, (src, reading) in enumerate(zip(everything, classify.source_progress(everything, progress))):
        parts["counts"].append(count_targets(src, count_target) if grader.config.count_head
                               else np.full((len(src), len(COUNT_NAMES)), np.nan))
        parts["crops"].append(prepare_source(grader, src, reading)[0])
        parts["grades"].append(src.meta["iga"].to_numpy(np.int64))
        parts["groups"].append(np.array([f"{k}:{g}" for g in src.meta["group"]]))
        parts["visit"].append(np.array([f"{k}:{p}:{d}" for p, d in zip(src.meta["patient_id"], src.meta["day"])]))
        parts["extra"].append(np.full(len(src), k >= len(sources)))
    data = TrainingData(*(np.concatenate(parts[k]) if len(parts[k]) > 1 else parts[k][0]     # one source: no copy
                          for k in ("crops", "grades", "counts", "groups", "visit", "extra")))
    if ((data.grades < 0) | (data.grades >= N_GRADES)).any():
        raise GraderError("IGA labels must be grades 0-4 (manifest column 'iga')")
    data.visit = np.unique(data.visit, return_inverse=True)[1]
    return data


# ------------------------------------------------------------------------------------------- training

def balanced_accuracy(result: dict[str, Any]) -> float:
    """Mean recall over the classes present (the route-choice score)."""
    recalls = [r for r, s in zip(result["recall"], result["support"]) if s > 0]
    return float(np.mean(recalls)) if recalls else float("nan")


def visit_reports(grader: IGAGrader, crops: np.ndarray, visit: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """3-class reports per visit of both routes (``counts`` only with the count head) on ``crops``."""
    logp, counts = grader.heads(crops)
    frame = outputs(logp, visit, np.ones(len(crops), bool), counts, "classifier")
    first = pd.Series(np.arange(len(visit))).groupby(visit).first().to_numpy()
    truth_visit = group_of(pd.Series(truth).groupby(visit).max().to_numpy())
    result = {"classifier": classify.report(truth_visit, frame["group"].to_numpy(np.int64)[first], GROUP_NAMES)}
    if counts is not None:
        result["counts"] = classify.report(truth_visit, frame["count_group"].to_numpy(np.int64)[first], GROUP_NAMES)
    return result


def choose_route(wanted: str, history: list[dict[str, Any]], count_head: bool) -> str:
    """``wanted`` unless "auto": then the route with the higher validation balanced accuracy in the last entry."""
    if wanted != "auto":
        return wanted
    last = history[-1] if history else {}
    if not count_head or "val_balanced3_counts" not in last:
        return "classifier"
    return "counts" if last["val_balanced3_counts"] > last["val_balanced3"] else "classifier"


def train(data: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
          extra: Sequence[str | os.PathLike[str]] = (), identities: Sequence[str] | None = None,
          config: IGAConfig | None = None, settings: TrainSettings | None = None, device: str | None = None,
          backbone_weights: str | os.PathLike[str] | None = None, restart: bool = False, force: bool = False,
          weights_dtype: str = "float32", read_progress: ProgressCallback | None = None,
          progress: ProgressCallback | None = None) -> IGAGrader:
    """Train the IGA grader on ``data`` (runs or ACNE04; ``extra`` runs join the training part only) and save
    it to ``out`` (``model.safetensors`` + ``config.json``; checkpoints in ``out/checkpoint``). An ``out``
    holding anything but IGA weights is refused unless ``force``. ``read_progress`` counts the face crops of
    all sources (status: the source), ``progress`` the training steps (status: the loss)."""
    config = config or IGAConfig()
    settings = settings or TrainSettings()
    if settings.grade_from == "counts" and not config.count_head:
        raise GraderError("--grade-from counts needs the count head (drop --no-count-head)")
    grader, sources, extras = classify.start_training(IGAGrader, config, settings.seed, out, data=data, extra=extra,
                                                      identities=identities, device=device,
                                                      weights_dtype=weights_dtype, force=force)
    if backbone_weights is not None:
        load_backbone(grader.model, backbone_weights)
    d = read_training_data(grader, sources, extras, settings.count_target, read_progress)
    own = np.flatnonzero(~d.is_extra)
    tr_own, va_own = classify.grouped_split(group_of(d.grades[own]), d.groups[own], settings.val_fraction,
                                            settings.seed)
    train_idx = np.sort(np.concatenate([own[tr_own], np.flatnonzero(d.is_extra)]))
    val_idx = own[va_own]
    weights = classify.class_weights(d.grades[train_idx], N_GRADES) if settings.class_weighted else np.ones(N_GRADES)
    calibrate_count_head(grader, d.crops[train_idx[:32]], d.counts[train_idx])
    batch_loss = make_batch_loss(grader, d, train_idx, weights, settings)

    def validate() -> dict[str, Any]:
        if not len(val_idx):
            return {}
        reports = visit_reports(grader, d.crops[val_idx], d.visit[val_idx], d.grades[val_idx])
        entry = {"val_accuracy3": reports["classifier"]["accuracy"], "val_recall3": reports["classifier"]["recall"],
                 "val_balanced3": balanced_accuracy(reports["classifier"])}
        if "counts" in reports:
            entry.update(val_accuracy3_counts=reports["counts"]["accuracy"],
                         val_recall3_counts=reports["counts"]["recall"],
                         val_balanced3_counts=balanced_accuracy(reports["counts"]))
        return entry

    plan = settings.plan(len(train_idx), batch_loss, validate)
    trained = classify.fit_and_save(
        grader, plan, out, sources=sources, extras=extras, identities=identities, settings=settings,
        restart=restart, progress=progress, weights_dtype=weights_dtype, device=device,
        record={"backbone_weights": None if backbone_weights is None else str(backbone_weights)},
        summary={"n_train": int(len(train_idx)), "n_val": int(len(val_idx)),
                 "train_grade_counts": np.bincount(d.grades[train_idx], minlength=N_GRADES).tolist(),
                 "class_weights": [round(float(w), 6) for w in weights]})
    route = choose_route(settings.grade_from, trained.record["history"], config.count_head)
    if route == trained.config.grade_from:
        return trained
    chosen = IGAGrader(replace(trained.config, grade_from=route), trained.model, device=device,
                       record=trained.record)
    chosen.save_pretrained(out, weights_dtype)
    return IGAGrader.from_pretrained(out, device=device)


def calibrate_count_head(grader: IGAGrader, crops: np.ndarray, counts: np.ndarray) -> None:
    """Start the count head at the training counts' geometric mean: shift its density bias so that its mean
    ``log(1 + count)`` on ``crops`` (a few training images) matches that of ``counts``, per channel (as a
    classifier's bias is started at the class prior; without it the head spends thousands of steps just
    reaching the right order of magnitude). A no-op without the count head or known counts."""
    import torch

    counter = getattr(grader.model, "counter", None)
    known = np.isfinite(counts[:, 0])
    if counter is None or not known.any() or not len(crops):
        return
    target = np.log1p(counts[known]).mean(axis=0)
    current = np.log1p(grader.heads(crops)[1]).mean(axis=0)
    # softplus(b) ~ exp(b) for the negative biases it starts at: adding d multiplies the counts by about exp(d)
    shift = np.maximum(np.expm1(target), 0.1) / np.maximum(np.expm1(current), 1e-6)     # at least 0.1 lesions
    with torch.no_grad():
        counter.density.bias.add_(torch.from_numpy(np.log(shift)).to(counter.density.bias))


def make_batch_loss(grader: IGAGrader, data: TrainingData, rows: np.ndarray, class_weights: np.ndarray,
                    settings: TrainSettings) -> Any:
    """``loss(indices, generator, epoch)`` of one training batch, ``indices`` into ``rows`` of ``data`` (module
    docstring: loss, augmentation). The crops are read in place, never copied."""
    import torch

    dev = grader.device
    weight_t = torch.tensor(class_weights, dtype=torch.float32, device=dev)
    grades_t = torch.from_numpy(data.grades[rows]).to(dev)
    counts_t = torch.from_numpy(data.counts[rows].astype(np.float32)).to(dev)
    wide = Augmenter(scaled(WIDE, settings.augment_strength)) if settings.augment else None

    def batch_loss(idx: np.ndarray, gen: Any, epoch: int) -> Any:
        crops = data.crops[rows[idx]]
        if wide is not None:
            batch = classify.to_tensor(wide.images(crops, draw_seeds(len(idx), gen)), dev)
        else:
            batch = classify.to_tensor(crops, dev)
            if settings.augment_p > 0:
                batch = augment(batch.cpu(), gen, settings.augment_p).to(dev)
        logits, predicted = grader.model.both(batch)
        loss = torch.nn.functional.cross_entropy(logits, grades_t[idx], weight=weight_t)
        target = counts_t[idx]
        known = torch.isfinite(target[:, 0])
        if predicted is not None and settings.count_weight > 0 and bool(known.any()):
            error = torch.log1p(predicted[known]) - torch.log1p(target[known])
            loss = loss + settings.count_weight * error.pow(2).sum(dim=1).mean()
        return loss

    return batch_loss


def load_backbone(model: Any, path: str | os.PathLike[str]) -> None:
    """Load a user's safetensors weights into a timm backbone (``backbone.*`` keys or bare keys)."""
    from synthtrial.util.weights import load_safetensors

    path = Path(path)
    if not hasattr(model, "backbone"):
        raise GraderError("--backbone-weights needs a timm backbone (--backbone timm:<name>)")
    if path.suffix != ".safetensors" or not path.is_file():
        raise GraderError(f"--backbone-weights {path}: must be an existing .safetensors file (pickles are refused)")
    state = load_safetensors(path)
    state = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in state.items()}
    missing, _ = model.backbone.load_state_dict(state, strict=False)
    if len(missing) == len(model.backbone.state_dict()):
        raise GraderError(f"--backbone-weights {path}: no tensor matches the backbone's parameter names")


# ------------------------------------------------------------------------------------------ evaluation

def evaluate(grader: IGAGrader, data: str | os.PathLike[str], identities: Sequence[str] | None = None,
             progress: ProgressCallback | None = None) -> dict[str, Any]:
    """Visit-level metrics on a run: per-grade and 3-class precision / recall / F1, accuracy, confusion of the
    grader's output (``grade_from``), the 3-class view of both routes, the count's error, and the 3-class view
    against the visible lesions' IGA where the run records visibility (``progress`` counts the face crops)."""
    source = classify.read_source(data, identities, "--data")
    crops, found = prepare_source(grader, source, progress)
    visit = visits(source.meta, len(source))
    logp, counts = grader.heads(crops)
    frame = outputs(logp, visit, found, counts, grader.config.grade_from)
    first = pd.Series(np.arange(len(visit))).groupby(visit).first().to_numpy()
    truth_visit = pd.Series(source.meta["iga"].to_numpy(np.int64)).groupby(visit).max().to_numpy()
    pred = frame["grade"].to_numpy(np.int64)[first]
    result = {"data": source.where, "identities": list(identities or []), "images": len(source),
              "visits": int(len(first)), "faces_found": float(found.mean()) if len(found) else float("nan"),
              "grade_from": grader.config.grade_from,
              "grades": classify.report(truth_visit, pred, GRADE_NAMES),
              "groups": classify.report(group_of(truth_visit), frame["group"].to_numpy(np.int64)[first], GROUP_NAMES),
              "mae_expected_grade": float(np.mean(np.abs(frame["expected_grade"].to_numpy()[first] - truth_visit)))}
    # each route's 3-class call: the classifier's most probable group (as ``group``), the counts' IGA group
    routes = {"classifier": frame[[f"p_group{k}" for k in range(len(GROUP_NAMES))]].to_numpy().argmax(axis=1)[first]}
    if counts is not None:
        routes["counts"] = frame["count_group"].to_numpy(np.int64)[first]
        result["counts"] = count_metrics(source, frame["inflammatory_count"].to_numpy()[first], first)
    result["routes"] = {name: classify.report(group_of(truth_visit), g, GROUP_NAMES) for name, g in routes.items()}
    visible = visible_iga(source, visit)
    if visible is not None:
        result["visible"] = classify.report(group_of(visible), frame["group"].to_numpy(np.int64)[first], GROUP_NAMES)
    return result


def count_metrics(source: classify.Source, predicted: np.ndarray, first: np.ndarray) -> dict[str, float]:
    """Mean absolute error and Spearman r of a visit's predicted inflammatory count against its simulated one."""
    from scipy.stats import spearmanr

    truth = count_targets(source, "simulated", "--data")[first, 0]
    if not np.isfinite(truth).all():
        return {}
    r = spearmanr(predicted, truth).statistic if len(truth) > 1 else float("nan")
    return {"mae": float(np.mean(np.abs(predicted - truth))), "spearman": float(r),
            "mean_true": float(truth.mean()), "mean_predicted": float(predicted.mean())}


def visible_iga(source: classify.Source, visit: np.ndarray) -> np.ndarray | None:
    """Per visit, the IGA of the visible lesions: the most visible inflammatory lesions and nodules of any one
    of its views; None for a run that does not record visibility."""
    try:
        counts = count_targets(source, "visible", "--data")
    except GraderError:
        return None
    if not np.isfinite(counts).all():
        return None
    per_visit = pd.DataFrame(counts).groupby(visit).max().to_numpy()
    return grade_from_counts(per_visit)

