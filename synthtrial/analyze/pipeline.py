"""``synthtrial analyze``: read the treatment effect off a run's images in several ways, beside the truth.

Outcomes per image (``RUN/analysis/outcomes.parquet``):

* ``oracle`` — the simulated latent severity itself (what a perfect grader would report);
* ``lesion_count`` — the number of active lesions drawn, and ``lesion_severity``, the same count read back
  on the severity scale through the inverse of the scale's count map (so its effect is comparable with the
  truth);
* ``iga`` — the IGA grade the drawn lesions imply;
* ``new_inflammatory`` — the new inflammatory lesions since the previous visit (papules, pustules and nodules
  of ``lesions.parquet`` inflammatory for the first time in that patient's series of that view, counted as the
  tracker counts its tracks: :func:`synthtrial.graders.tracker.changes_by_image`; NaN at a series' first
  visit), the simulated truth of the endpoint "new inflammatory lesions per period" beside the tracker's
  ``grader_tracker_new_inflammatory`` when the run was graded with it;
* ``grader_<grader>_<column>`` — the outcome columns of ``RUN/grades.parquet`` (as ``RUN/grades.json`` names
  them) when graders have scored the run (``synthtrial grade``);
* ``grader_rater_<name>_<column>``, ``grader_raters_mean_<column>`` — a simulated rater panel's counts and grades
  (``synthtrial rate``; :func:`synthtrial.grade.ratings.rating_outcomes`), read like a grader's, with the panel's
  agreement in ``analysis/agreement.csv``;
* ``ae_pca`` — Schneider et al.'s unsupervised pipeline: a convolutional autoencoder trained on the run's
  images, its 64-d embeddings (by default the bottleneck before its sigmoid, which saturates and leaves a
  spread of ~1e-4; ``embedding="sigmoid"`` is Schneider's variant), and each patient's first principal component (as Schneider et al. did for
  their one participant; pooled, the component would tell the faces apart). A component's sign is arbitrary:
  it is oriented to grow with the lesion count on the reference arm's images, centred on the reference mean
  and put in units of the pooled reference-day SD, none of which the treatment or red marks can move.

Views of one day are averaged, then each outcome goes through every method of
:mod:`synthtrial.analyze.stats` (``effects.csv``; ``role`` says which are valid tests and which are
descriptive). When the run was simulated, ``truth.json`` gives the design (so the randomisation test knows
the design's scheme) and the kinetics (so ``gls_kinetics`` and the pooled model use the true half-lives).
Each row names the estimand it targets (``estimand``); outcomes on the severity scale (oracle,
lesion_severity) are set beside that estimand's truth: bias and CI coverage, with the steady-state effect, the
carryover part and (pooled rows) the patients' sample mean beside it. Every outcome gets a calibration slope
against the truth (its attenuation, apart from its noise, ``residual_sd``) and is put on one scale (``std_*``:
effect / the outcome's within-patient residual SD, intervals carrying that SD's uncertainty) beside the
oracle's standardised truth.
New lesions are an incidence: a count per visit, which the period-level methods (``period``,
``randomization``) turn into one value per treatment period — the period's count divided by its visits, so with
the equal periods of a design the per-period count up to one factor — and the other methods analyse day by day
like any outcome; ``new_lesions.csv`` lists the count of every patient's periods (:func:`new_lesion_periods`).
A run made with ``generate --counterfactual`` also gets ``individual_effects.csv``: each per-patient estimate
against the patient's own effect (:mod:`synthtrial.analyze.individual`).
Per-patient rows
carry Holm/BH-adjusted p-values and responder calls (:mod:`synthtrial.analyze.multiplicity`); a day missing
from a simulated run keeps its scheduled treatment in the exposure curves (:func:`missing_day_schedule`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from synthtrial.trial import scale
from synthtrial.util.atomic import write_bytes_atomic, write_text_atomic
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.progress import ProgressCallback, progress_bar
from synthtrial.run import rundir
from synthtrial.run.remote import on_storage
from synthtrial.run.rundir import read_run
from synthtrial.analyze.estimands import with_estimands
from synthtrial.analyze.estimate import check_alpha
from synthtrial.analyze.estimators import GRADER_OUTCOME_PREFIX
from synthtrial.analyze.limits import (MAX_AE_IMAGE_SIZE, MAX_EPOCHS, MAX_PERMUTATIONS, MIN_AE_IMAGE_SIZE,
                                      MIN_PERMUTATIONS)

#: Outcomes whose effects are on the latent severity scale, where the truth applies directly.
TRUTH_SCALE_OUTCOMES = ("oracle", "lesion_severity")
BASE_OUTCOMES = ("oracle", "lesion_severity", "lesion_count", "iga", "new_inflammatory")
#: The endpoint counted per treatment period in ``analysis/new_lesions.csv``: the truth's and the tracker's.
NEW_LESION_OUTCOMES = ("new_inflammatory", f"{GRADER_OUTCOME_PREFIX}tracker_new_inflammatory")
#: The analysis folder of a run and the files ``analyze`` writes there (with settings.json, timings.json and,
#: with the autoencoder, pca.json, embeddings.parquet and the autoencoder's files).
ANALYSIS, OUTCOMES, EFFECTS, REPORT, EMBEDDINGS = ("analysis", "outcomes.parquet", "effects.csv", "report.html",
                                                   "embeddings.parquet")
NEW_LESIONS = "new_lesions.csv"
#: The rater panel's agreement (``synthtrial rate``), written beside the effects when the run was rated.
AGREEMENT = "agreement.csv"
EFFECT_COLUMNS = ("outcome", "method", "role", "estimand", "scope", "arm", "reference", "estimate", "se", "ci_low",
                  "ci_high", "p", "n", "p_holm", "p_bh", "responder", "responder_holm", "responder_bh", "true_effect",
                  "bias", "covered", "true_steady_state", "true_carryover", "true_sample_mean", "calibration_slope",
                  "calibration_lo", "calibration_hi", "residual_sd", "residual_df", "std_estimate", "std_ci_low",
                  "std_ci_high", "std_true_effect", "std_covered", "note")


@dataclass(frozen=True)
class AnalysisSettings:
    """What an analysis depends on (recorded in ``analysis/settings.json``); checked when built."""

    autoencoder: bool = True
    epochs: int = 10
    image_size: int = 256
    trend: bool = True
    n_permutations: int = 2000
    seed: int = 0
    alpha: float = 0.05
    embedding: str = "logits"
    methods: tuple[str, ...] = ("period", "randomization", "gls_kinetics", "lmm", "lmm_cr1", "welch", "permutation",
                                "gls_ar1", "hac")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name, option, low, high in (("epochs", "--epochs", 1, MAX_EPOCHS),
                                        ("n_permutations", "--permutations", MIN_PERMUTATIONS, MAX_PERMUTATIONS)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
                raise SynthtrialError(f"{option} must be a whole number from {low} to {high}, got {value!r}")
        size = self.image_size
        if (isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < MIN_AE_IMAGE_SIZE
                or size > MAX_AE_IMAGE_SIZE or size & (size - 1)):
            raise SynthtrialError(f"--image-size must be a power of two from {MIN_AE_IMAGE_SIZE} to "
                                  f"{MAX_AE_IMAGE_SIZE}, got {size!r}")
        check_alpha(self.alpha, "--alpha")
        if self.embedding not in ("logits", "sigmoid"):
            raise SynthtrialError(f"--embedding must be logits or sigmoid, got {self.embedding!r}")


@dataclass
class Timings:
    """Seconds spent per stage, for the benchmark and the report."""

    stages: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.stages[name] = self.stages.get(name, 0.0) + seconds


def _reference_and_exclusions(truth: dict | None, manifest: pd.DataFrame) -> tuple[str, tuple[str, ...]]:
    if truth and truth.get("reference"):
        exclude = ()
        label = (truth.get("design") or {}).get("washout_label")
        if label:
            exclude = (label,)
        return str(truth["reference"]), exclude
    return str(manifest.sort_values(["patient_id", "day"])["treatment"].iloc[0]), ("Washout",)


def image_outcomes(run_dir: Path, manifest: pd.DataFrame) -> pd.DataFrame:
    """The label-based outcomes of every image (no model needed)."""
    out = manifest[["image", "patient_id", "day", "date", "block", "treatment", "view"]].copy()
    out["oracle"] = manifest["severity"].astype(float)
    out["lesion_count"] = manifest["lesion_count"].astype(float)
    out["lesion_severity"] = scale.severity_from_count(manifest["lesion_count"].to_numpy(dtype=float))
    out["iga"] = manifest["iga"].astype(float)
    out["new_inflammatory"] = new_inflammatory_truth(run_dir, manifest)
    from synthtrial.grade.ratings import rating_outcomes

    for grades in (rundir.grade_outcomes(run_dir), rating_outcomes(run_dir, manifest["image"])):  # graders, raters
        if grades is not None:
            warn_below_targets(run_dir, list(grades.columns))
            renamed = grades.rename(columns={c: f"{GRADER_OUTCOME_PREFIX}{c}" for c in grades.columns if c != "image"})
            out = out.merge(renamed, on="image", how="left", validate="one_to_one")
    return out


def warn_below_targets(run_dir: Path, columns: list[str]) -> list[str]:
    """Repeat ``grade``'s warning for each grader graded below its targets (``grades.json``'s ``meets_targets``)
    whose columns become outcomes; returns the lines warned."""
    from synthtrial.graders.cards import BelowTargetsWarning, below_targets_line

    lines = []
    for name, entry in rundir.read_grades_index(run_dir).items():
        used = [c for c in entry.get("outcomes", []) if c in columns]
        if used and entry.get("meets_targets") is False:
            lines.append(below_targets_line(name, str(entry.get("below_targets", "below its targets")))
                         + f"; analysed as outcome(s) {', '.join(GRADER_OUTCOME_PREFIX + c for c in used)}")
            warnings.warn(BelowTargetsWarning(lines[-1]), stacklevel=2)
    return lines


def new_inflammatory_truth(run_dir: Path, manifest: pd.DataFrame) -> np.ndarray:
    """The simulated new inflammatory lesions of every manifest row since the previous visit of its series
    (patient and view; NaN at the first visit): the lesion table's ``lesion_id`` counted as the tracker counts
    its tracks."""
    from synthtrial.graders.tracker import changes_by_image

    lesions = rundir.read_lesions(run_dir, set(manifest["image"]))
    active = lesions[lesions["type"].isin(scale.LESION_TYPES)]
    changes = changes_by_image(manifest, active, id_column="lesion_id", class_column="type")
    return changes["new_inflammatory"].to_numpy(dtype=float)


def new_lesion_periods(per_day: pd.DataFrame, exclude: tuple[str, ...] = ()) -> pd.DataFrame:
    """The new inflammatory lesions of every patient's treatment periods (one row per patient and period, in day
    order; :data:`NEW_LESION_OUTCOMES` present in ``per_day``, the views of a day averaged): ``period`` (1, 2,
    ...), ``treatment``, ``mid_day``, and per outcome its count (the sum over the period's visits that have a
    value) and ``visits_<outcome>`` (how many). Periods as the period-level methods cut them
    (:func:`synthtrial.analyze.nof1.period_arrays`: a run of days on one treatment, a new block starts one;
    excluded treatments such as washout end a period and are left out)."""
    from synthtrial.analyze.nof1 import period_arrays

    columns = [c for c in NEW_LESION_OUTCOMES if c in per_day.columns]
    frames = []
    for pid, rows in per_day.groupby(per_day["patient_id"].astype(str), sort=True):
        blocks = rows["block"].to_numpy() if "block" in rows.columns else None
        table: dict[str, object] = {}
        for column in columns:
            values = rows[column].to_numpy(dtype=float)
            # finite stand-ins, so that every column is cut into the same periods: sums and visits with a value
            total, present = (period_arrays(rows["day"].to_numpy(), rows["treatment"].to_numpy(), v, set(exclude),
                                            blocks) for v in (np.nan_to_num(values), np.isfinite(values) * 1.0))
            table.setdefault("treatment", total["treatment"])
            table.setdefault("mid_day", total["mid"])
            visits = np.round(present["mean"] * present["n"]).astype(int)
            table[column] = np.where(visits > 0, np.round(total["mean"] * total["n"], 6), np.nan)
            table[f"visits_{column}"] = visits
        if table:
            frame = pd.DataFrame(table)
            frames.append(frame.assign(patient_id=pid, period=np.arange(1, len(frame) + 1)))
    head = ["patient_id", "period", "treatment", "mid_day"]
    if not frames:
        return pd.DataFrame(columns=head)
    result = pd.concat(frames, ignore_index=True)
    return result[head + [c for c in result.columns if c not in head]]


def _manifest_key(manifest: pd.DataFrame, settings: AnalysisSettings) -> str:
    digest = hashlib.sha256()
    digest.update("\n".join(manifest["sha256"].astype(str)).encode())
    digest.update(json.dumps({"epochs": settings.epochs, "image_size": settings.image_size, "seed": settings.seed,
                              "embedding": settings.embedding}, sort_keys=True).encode())
    return digest.hexdigest()


def autoencoder_outcome(run_dir: Path, manifest: pd.DataFrame, settings: AnalysisSettings, analysis_dir: Path,
                        timings: Timings, *, device: str | None = None, progress: bool = True,
                        reference: str | None = None, on_progress: ProgressCallback | None = None) -> pd.DataFrame:
    """Per-image ``ae_pca`` score from the autoencoder's embeddings (cached by content and settings).

    Schneider et al. reduce one participant's embeddings to their first principal component. With many
    patients a pooled component separates the faces, and even a shared within-patient one follows the few
    patients who vary most; so the PCA is fitted per patient, as in the original. Its sign, origin and unit
    come from the reference arm's images only (:func:`synthtrial.analyze.embed.patient_scores`): oriented to
    grow with the lesion count there, centred on the patient's reference mean, in units of the pooled
    reference-day SD. ``reference`` defaults to the run truth's reference arm (else the first treatment).
    """
    from synthtrial.analyze.embed import patient_scores

    embeddings, red = _embeddings(run_dir, manifest, settings, analysis_dir, timings, device=device,
                                  progress=progress, on_progress=on_progress)
    if reference is None:
        reference, _ = _reference_and_exclusions(rundir.read_truth(run_dir), manifest)
    t0 = time.perf_counter()
    patients = manifest["patient_id"].astype(str).to_numpy()
    scores, summary = patient_scores(embeddings, patients, manifest["treatment"].astype(str).to_numpy() == reference,
                                     manifest["lesion_count"].to_numpy(dtype=float))
    redness_r = {}
    for pid, idx in manifest.groupby(patients, sort=False).indices.items():
        if np.isfinite(scores[idx]).all() and np.std(red[idx]) > 0 and np.std(scores[idx]) > 0:
            redness_r[str(pid)] = round(float(np.corrcoef(scores[idx], red[idx])[0, 1]), 4)
    timings.add("embed + PCA", time.perf_counter() - t0)
    write_text_atomic(analysis_dir / "pca.json", json.dumps({
        "fitted": "per patient (first principal component of that patient's embeddings)",
        "orientation": f"scores grow with the lesion count on the reference arm's ({reference}) images",
        "origin": "the patient's mean score on the reference arm's images",
        "units": f"pooled within-patient SD of the scores on the {summary['unit_from']} "
                 f"({summary['unit']:.6g} embedding units)",
        "sign": summary["sign"],
        "explained_variance_ratio": summary["explained_variance_ratio"],
        "redness_correlation": redness_r,
    }, indent=2) + "\n")
    return pd.DataFrame({"image": manifest["image"].to_numpy(), "ae_pca": scores})


def _embeddings(run_dir: Path, manifest: pd.DataFrame, settings: AnalysisSettings, analysis_dir: Path,
                timings: Timings, *, device: str | None, progress: bool,
                on_progress: ProgressCallback | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, 64) autoencoder embeddings and per-image redness, trained once per run content and settings; a bar
    per image loaded and per training batch."""
    from synthtrial.analyze.embed import (AutoencoderConfig, embed, load_images, redness, save_model,
                                          train_autoencoder)

    cache = analysis_dir / EMBEDDINGS
    key = _manifest_key(manifest, settings)
    cached = _cached_embeddings(cache, key, manifest)
    if cached is not None:
        return cached
    t0 = time.perf_counter()
    with progress_bar("loading images", len(manifest), unit="images", enabled=progress, sink=on_progress) as update:
        images = load_images([run_dir / p for p in manifest["image"]], settings.image_size, progress=update)
    red = redness(images)
    timings.add("load images", time.perf_counter() - t0)
    config = AutoencoderConfig(image_size=settings.image_size, epochs=settings.epochs, seed=settings.seed)
    t0 = time.perf_counter()
    with progress_bar("autoencoder", settings.epochs, unit="batches", enabled=progress, sink=on_progress) as update:
        model, losses = train_autoencoder(images, config, device=device, batch_progress=update)
    timings.add("train autoencoder", time.perf_counter() - t0)
    t0 = time.perf_counter()
    embeddings = embed(model, images, device=device, kind=settings.embedding)
    timings.add("embed + PCA", time.perf_counter() - t0)
    del images
    save_model(model, config, analysis_dir / "autoencoder.safetensors")
    frame = pd.DataFrame(embeddings, columns=[f"e{i:02d}" for i in range(embeddings.shape[1])])
    frame.insert(0, "image", manifest["image"].to_numpy())
    frame["redness"] = red
    frame["key"] = key
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    write_bytes_atomic(cache, buf.getvalue())
    write_text_atomic(analysis_dir / "autoencoder_training.json", json.dumps(
        {"config": asdict(config), "losses": [float(x) for x in losses]}, indent=2) + "\n")
    return embeddings.astype(np.float64), red


def _cached_embeddings(cache: Path, key: str, manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached embeddings and redness when ``cache`` holds them for this run content and these settings;
    None (recompute) when it is absent, stale, or damaged (a truncated or foreign file is a cache miss)."""
    if not cache.is_file():
        return None
    try:
        cached = pd.read_parquet(cache)
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
        return None
    cols = [c for c in cached.columns if c.startswith("e") and c[1:].isdigit()]
    if not ({"key", "image", "redness"} <= set(cached.columns) and cols and (cached["key"] == key).all()
            and cached["image"].tolist() == manifest["image"].tolist()):
        return None
    try:
        return cached[cols].to_numpy(dtype=np.float64), cached["redness"].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        return None


def daily(outcomes: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """One row per patient and day (views averaged), as the tests expect."""
    keys = ["patient_id", "day", "treatment"] + (["block"] if "block" in outcomes.columns else [])
    return outcomes.groupby(keys, sort=False, as_index=False, dropna=False)[columns].mean()


def outcome_columns(outcomes: pd.DataFrame) -> list[str]:
    """The outcome columns of an outcomes table, in its order (label outcomes, graders', ``ae_pca``)."""
    return [c for c in outcomes.columns if c in BASE_OUTCOMES or c.startswith(GRADER_OUTCOME_PREFIX) or c == "ae_pca"]


def run_outcomes(run_dir: Path, manifest: pd.DataFrame, settings: AnalysisSettings, analysis_dir: Path,
                 timings: Timings, *, device: str | None = None, progress: bool = True,
                 reference: str | None = None, on_progress: ProgressCallback | None = None) -> pd.DataFrame:
    """Every outcome of every image: the label outcomes, the graders' and (``settings.autoencoder``) ``ae_pca``,
    whose cache and model files go to ``analysis_dir``. ``synthtrial analyze`` and rendered power replicates
    both read a run's outcomes through here."""
    t0 = time.perf_counter()
    outcomes = image_outcomes(run_dir, manifest)
    timings.add("read run", time.perf_counter() - t0)
    if settings.autoencoder:
        ae = autoencoder_outcome(run_dir, manifest, settings, analysis_dir, timings, device=device,
                                 progress=progress, reference=reference, on_progress=on_progress)
        outcomes = outcomes.merge(ae[["image", "ae_pca"]], on="image", how="left", validate="one_to_one")
    return outcomes


def outcome_effects(outcomes: pd.DataFrame, columns: list[str], truth: dict | None, reference: str,
                    exclude: tuple[str, ...], settings: AnalysisSettings, *, progress: bool = False,
                    on_progress: ProgressCallback | None = None) -> pd.DataFrame:
    """Every outcome's effects by every method (views of a day averaged), beside the truth, raw and standardised.

    A new-lesion outcome (:data:`NEW_LESION_OUTCOMES`) with no value on any reference day is left out: new
    lesions are undefined at a series' first visit, so a run whose reference days are all first visits has
    none to compare with (any other outcome without a reference value is refused, as before). A bar (and
    ``on_progress``) counts each method of each outcome, then the truth, standardising and adjusting steps."""
    from synthtrial.analyze.multiplicity import adjust_responders
    from synthtrial.analyze.nof1 import Kinetics
    from synthtrial.analyze.estimators import choose
    from synthtrial.analyze.stats import TRUTH_COLUMNS, analyze_outcome, attach_truth, standardize

    per_day = daily(outcomes, columns)
    on_reference = per_day["treatment"].astype(str) == str(reference)
    columns = [c for c in columns if c not in NEW_LESION_OUTCOMES
               or np.isfinite(pd.to_numeric(per_day.loc[on_reference, c], errors="coerce").astype(float)).any()]
    design = _design_of(truth)
    kinetics = Kinetics.from_truth(truth)
    ar_phi = _ar_phi_of(truth)
    schedule = missing_day_schedule(truth, design, (truth or {}).get("seed"), per_day)
    steps = len(columns) * len(choose(settings.methods)) + 3  # each method of each outcome; truth, scale, adjust
    done = 0
    with warnings.catch_warnings(), progress_bar("statistics", steps, unit="steps", enabled=progress,
                                                 sink=on_progress) as update:
        # near-constant series (IGA within a patient) and boundary fits make scipy/statsmodels warn; the
        # effects table says what happened in its note column instead
        warnings.simplefilter("ignore", RuntimeWarning)

        def step(status: str) -> None:
            nonlocal done
            done += 1
            update(done, steps, status)

        effects = pd.concat([analyze_outcome(per_day, column, reference, exclude=exclude, trend=settings.trend,
                                             n_permutations=settings.n_permutations, seed=settings.seed,
                                             alpha=settings.alpha, methods=settings.methods, design=design,
                                             kinetics=kinetics, schedule=schedule, ar_phi=ar_phi,
                                             on_method=lambda method, column=column: step(f"{column} {method}"))
                             for column in columns],
                            ignore_index=True)
        if truth is not None:
            effects = attach_truth(effects, truth, outcomes_on_truth_scale=TRUTH_SCALE_OUTCOMES)
        else:
            for col in TRUTH_COLUMNS:
                effects[col] = np.nan
        step("truth")
        effects = standardize(effects, per_day, truth, exclude=exclude, trend=settings.trend, alpha=settings.alpha)
        step("standardised effects")
        effects = adjust_responders(effects, settings.alpha)
        step("multiplicity")
    return effects[list(EFFECT_COLUMNS)]


def missing_day_schedule(truth: dict | None, design, seed, data: pd.DataFrame | None = None) -> pd.DataFrame | None:
    """Every scheduled day and its treatment when the truth lists missing days, so that they keep their
    treatment in the exposure curves: the simulated design's schedule (rebuilt from its seed) when known, else
    ``data``'s rows plus each listed missing day with the treatment of the period it belongs to
    (:func:`synthtrial.analyze.nof1.missing_day_treatments`). None when nothing is missing (or neither is given):
    then a day without a row continues the previous day's treatment."""
    from synthtrial.analyze.nof1 import missing_day_treatments
    from synthtrial.trial.simulate import design_schedule

    patients = (truth or {}).get("patients") or {}
    missing = {str(pid): p["missing_days"] for pid, p in patients.items()
               if isinstance(p, dict) and p.get("missing_days")} if isinstance(patients, dict) else {}
    if not missing:
        return None
    if design is not None and not isinstance(seed, bool) and isinstance(seed, (int, np.integer)):
        return design_schedule(design, int(seed))
    if data is None:
        return None
    frames = []
    for pid, rows in data.groupby(data["patient_id"].astype(str), sort=False):
        days = rows["day"].to_numpy(dtype=np.int64)
        lacking = np.setdiff1d(np.asarray(missing.get(pid, []), dtype=np.int64), days)
        frames.append(pd.DataFrame({"patient_id": pid, "day": np.r_[days, lacking], "treatment": np.r_[
            rows["treatment"].astype(str).to_numpy(), missing_day_treatments(days, rows["treatment"], lacking)]}))
    return pd.concat(frames, ignore_index=True) if frames else None


@on_storage("run_dir", what="analysing")
def analyze_run(run_dir: str | os.PathLike[str], settings: AnalysisSettings | None = None, *,
                device: str | None = None, progress: bool = True,
                on_progress: ProgressCallback | None = None) -> Path:
    """Analyze a run directory; writes ``RUN/analysis/`` and returns its path (see the module docstring).

    Each phase that takes a while draws a bar (``progress``) and tells ``on_progress(done, total, status)``,
    the status naming the phase: loading images (per image), autoencoder (per batch), statistics (per method
    of each outcome), report.

    The folder is written as a set: everything goes to a scratch copy of it, which replaces it only when
    the whole analysis succeeded, so a refused analysis leaves the previous outputs as they were.
    """
    from synthtrial.analyze.individual import INDIVIDUAL, individual_errors
    from synthtrial.analyze.report import write_report

    settings = settings or AnalysisSettings()
    settings.validate()
    if settings.autoencoder and device is not None:
        from synthtrial.util.device import resolve_device

        device = str(resolve_device(device))  # a bogus or absent device fails here, before anything is written
    run_dir = Path(run_dir)
    timings = Timings()
    t0 = time.perf_counter()
    manifest, _ = read_run(run_dir)
    truth = with_estimands(rundir.read_truth(run_dir))
    reference, exclude = _reference_and_exclusions(truth, manifest)
    timings.add("read run", time.perf_counter() - t0)
    analysis_dir = run_dir / ANALYSIS
    with rundir.locked(run_dir, what="analysing"), staged_folder(analysis_dir) as stage:
        outcomes = run_outcomes(run_dir, manifest, settings, stage, timings, device=device, progress=progress,
                                reference=reference, on_progress=on_progress)
        columns = outcome_columns(outcomes)
        write_bytes_atomic(stage / OUTCOMES, rundir.parquet_bytes(outcomes))
        t0 = time.perf_counter()
        effects = outcome_effects(outcomes, columns, truth, reference, exclude, settings, progress=progress,
                                  on_progress=on_progress)
        write_text_atomic(stage / EFFECTS, effects.to_csv(index=False, lineterminator="\n"))
        individual = individual_errors(run_dir, effects, reference)  # runs made with --counterfactual
        if individual is not None:
            write_text_atomic(stage / INDIVIDUAL, individual.to_csv(index=False, lineterminator="\n"))
        write_agreement(run_dir, stage)
        periods = new_lesion_periods(daily(outcomes, columns), exclude)
        write_text_atomic(stage / NEW_LESIONS, periods.to_csv(index=False, lineterminator="\n"))
        timings.add("statistics", time.perf_counter() - t0)
        t0 = time.perf_counter()
        with progress_bar("report", 1, enabled=progress, sink=on_progress) as update:
            update(0, 1, "writing report.html")
            write_report(stage / REPORT, run_dir=run_dir, outcomes=outcomes, effects=effects, truth=truth,
                         reference=reference, settings=asdict(settings), timings=timings.stages,
                         individual=individual)
            update(1, 1, "")
        timings.add("report", time.perf_counter() - t0)
        write_text_atomic(stage / "settings.json", json.dumps(
            {"settings": asdict(settings), "reference": reference, "excluded": list(exclude),
             "outcomes": columns}, indent=2) + "\n")
        write_text_atomic(stage / "timings.json", json.dumps(timings.stages, indent=2) + "\n")
    return analysis_dir


def write_agreement(run_dir: Path, folder: Path) -> None:
    """``agreement.csv`` beside the effects: the rater panel's agreement as ``synthtrial rate`` recorded it (removed
    when the run has no ratings)."""
    from synthtrial.grade.ratings import agreement_of_run

    agreement = agreement_of_run(run_dir)
    if agreement is None:
        (folder / AGREEMENT).unlink(missing_ok=True)
    else:
        write_text_atomic(folder / AGREEMENT, agreement.to_csv(index=False, lineterminator="\n"))


@contextlib.contextmanager
def staged_folder(folder: Path) -> Iterator[Path]:
    """A scratch copy of ``folder`` (its files hard-linked) to write into; it takes ``folder``'s place when the
    block succeeds and is deleted when the block fails, so a failed writer leaves ``folder`` as it was.

    Writes into the copy must replace files (temp file + rename), never edit a linked one in place. Scratch
    folders a killed writer left behind (``.NAME.*.tmp``, ``.NAME.*.old``) are deleted first; call this under
    the run's lock.
    """
    for stale in [*folder.parent.glob(f".{folder.name}.*.tmp"), *folder.parent.glob(f".{folder.name}.*.old")]:
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; give the permissions mkdir would
        if folder.is_dir():
            for item in folder.iterdir():
                if item.is_file() and not item.is_symlink():
                    try:
                        os.link(item, stage / item.name)
                    except OSError:
                        shutil.copy2(item, stage / item.name)
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = stage.with_suffix(".old")
    if folder.exists():
        os.rename(folder, old)
    try:
        os.rename(stage, folder)
    except BaseException:
        if old.exists():
            os.rename(old, folder)
        shutil.rmtree(stage, ignore_errors=True)
        raise
    if old.is_symlink():  # the folder was a link: the link goes, not what it pointed to
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _ar_phi_of(truth: dict | None) -> float | None:
    """The simulated AR(1) coefficient in a truth file (the role rules use it), or None."""
    value = ((truth or {}).get("model") or {}).get("ar_phi")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and -1 < value < 1 else None


def _design_of(truth: dict | None):
    """The simulated design in a truth file, or None (a user's protocol, or a truth without one)."""
    from synthtrial.trial.simulate import TrialDesign

    spec = (truth or {}).get("design")
    if not isinstance(spec, dict):
        return None
    try:
        return TrialDesign(**{**spec, "arms": tuple(spec.get("arms", ()))})
    except (TypeError, SynthtrialError):
        return None


def analysis_summary(effects: pd.DataFrame) -> pd.DataFrame:
    """The pooled CR2 rows of an effects table: what the CLI prints."""
    pooled = effects[(effects["scope"] == "pooled") & (effects["method"] == "lmm")]
    return pooled[["outcome", "arm", "estimate", "ci_low", "ci_high", "p", "true_effect", "covered",
                   "calibration_slope"]]
