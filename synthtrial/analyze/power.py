"""``synthtrial power``: type I error, power, bias and coverage of every analysis over simulated trials.

A *scenario* is one design (preset or ``protocol design`` truth file) with one block length and one
effect scale (a multiplier on the design's population effects; 0 is the null, where every effect and its
spread are zero). A grid of scenarios runs in one call. Each replicate simulates a fresh trial (new
baselines, effects, noise) and analyses the outcomes that need no rendering: the oracle severity and the
lesion count the lesion model would draw (``round(expected_lesion_count(s))``, read back on the severity
scale), each also standardised (:func:`synthtrial.analyze.stats.standardize`). Optionally the first replicates
of each scenario are also rendered (:mod:`synthtrial.analyze.power_render`), adding the image outcomes
(autoencoder/PCA, graders) to those replicates; each summary row's ``tests`` says how many replicates it
rests on.

Choices, stated once:

* Seeds: replicate r of every scenario simulates from ``derive_seed("power", seed, r)`` (common random
  numbers: scenarios differ by their settings, not by their noise, so power curves are smooth), and the
  result depends on ``seed`` only, never on the number of workers or on resuming.
* Engine: Dask (``distributed``). ``workers >= 1`` starts a ``LocalCluster`` of that many single-threaded
  processes; ``scheduler`` connects to a running cluster instead; ``workers = 0`` runs in this process
  (library use, tests). Replicates travel in chunks, and each chunk comes back as one frame (the client
  concatenates tens of frames, not one per replicate); each finished replicate is written to the cache
  folder (``<cache>/<scenario key>/r<replicate>.parquet``, atomically) when one is given, and a re-run
  reads it instead of recomputing (the key hashes every setting that changes a number). A chunk runs
  vectorised across its replicates where :mod:`synthtrial.analyze.power_batch` covers the settings (the
  same numbers, several times faster), else replicate by replicate.
* Kinetics: ``gls_kinetics`` is given the scenario's true half-lives (what an analyst who knows the
  drug's pharmacokinetics would use) unless ``estimate_kinetics``, which profiles them per patient.
* A rejection rate is over the tests that returned a p-value; rows without one are counted in ``no_p``
  (a failed fit, or a randomisation test that a fixed-order design does not have), never dropped
  silently. MC SE of a rate r over n tests: ``sqrt(r (1 - r) / n)``.
* Responders: each replicate's per-patient rows get Holm/BH-adjusted p-values and responder calls over its
  patients (:mod:`synthtrial.analyze.multiplicity`); the summary's ``familywise*`` columns are the share of
  trials with at least one call (the family-wise error under the null). A replicate with missing days gives
  them their scheduled treatment in the exposure curves (the design's schedule, rebuilt from its seed).
* Roles: each row's role comes from the rules of :mod:`synthtrial.analyze.roles` with the scenario's own
  AR(1) phi and kinetics, so a ``--design`` no grid holds is labelled as ``analyze`` would label it;
  :mod:`synthtrial.analyze.grid` builds the size-and-coverage grid that checks those rules.
* Rendered replicates travel to the workers one per chunk, ahead of the others, so a few slow ones do not
  queue behind one worker.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import json
import os
from collections.abc import Container, Iterator, Mapping, Sequence
from typing import Any
from pathlib import Path

import numpy as np
import pandas as pd

from synthtrial.analyze.estimate import check_alpha
from synthtrial.analyze.estimators import METHODS
from synthtrial.analyze.limits import MAX_DAYS_PER_PATIENT, MAX_PATIENTS, MAX_REPLICATES, MAX_TRIALS
from synthtrial.analyze.power_render import RenderedSettings
from synthtrial.trial import scale
from synthtrial.util.cluster import client_for, local_cluster, run_tasks  # noqa: F401 (local_cluster: benchmarks)
from synthtrial.util.errors import SynthtrialError, one_line
from synthtrial.util.progress import ProgressCallback
from synthtrial.util.seeding import derive_seed
from synthtrial.trial.simulate import MAX_PERIOD_DAYS, DesignError, SeverityModel, TrialDesign, simulate_trial

POWER_OUTCOMES = ("oracle", "lesion_severity")
#: Largest share of a study's replicates one chunk (one step of the progress bar) holds, where there are enough.
PROGRESS_STEP = 1 / 32
DEFAULT_METHODS = ("period", "randomization", "gls_kinetics", "lmm", "lmm_cr1", "welch", "gls_ar1", "hac")
SUMMARY_KEYS = ["scenario", "design_name", "period_days", "effect_scale", "outcome", "method", "role", "level", "arm"]


def design_from_file(path: str | os.PathLike[str]) -> tuple[TrialDesign, SeverityModel]:
    """A design and model from a truth file written by ``synthtrial protocol design`` (or any JSON with the
    same ``design`` and ``model`` objects)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise SynthtrialError(f"{path}: cannot be read ({exc.strerror or exc}) (option --design)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SynthtrialError(f"{path}: not JSON ({getattr(exc, 'msg', exc)}) (option --design)") from None
    if not isinstance(data, dict) or not isinstance(data.get("design"), dict) or not isinstance(data.get("model"), dict):
        raise SynthtrialError(f"{path}: needs 'design' and 'model' objects, as in a <stem>.truth.json written by "
                              "`synthtrial protocol design` (option --design)")
    try:
        design = TrialDesign(**{**data["design"], "arms": tuple(data["design"].get("arms", ()))})
        model = SeverityModel(**data["model"])
    except (TypeError, DesignError) as exc:     # an unknown field, or a value beyond the design's limits
        raise SynthtrialError(f"{path}: {one_line(exc)} (option --design)") from None
    unknown = [arm for arm in model.effects if arm not in design.arms]
    if unknown:
        raise SynthtrialError(f"{path}: model effect '{unknown[0]}' names no arm of the design "
                              f"({', '.join(design.arms)}) (option --design)")
    return design, model


def replicate_outcomes(protocol: pd.DataFrame) -> pd.DataFrame:
    """The rendering-free outcomes of one simulated trial, one row per patient-day."""
    severity = protocol["severity"].to_numpy(dtype=float)
    count = np.rint(scale.expected_lesion_count(severity))
    return pd.DataFrame({
        "patient_id": protocol["patient_id"].to_numpy(), "day": protocol["day"].to_numpy(),
        "treatment": protocol["treatment"].to_numpy(), "block": protocol["block"].to_numpy(dtype=object),
        "oracle": severity,
        "lesion_severity": scale.severity_from_count(count),
    })


def with_effects(model: SeverityModel, effects: dict[str, float] | None = None, null: bool = False,
                 effect_scale: float = 1.0) -> SeverityModel:
    """The model with effects replaced, then multiplied by ``effect_scale`` (``null`` or scale 0: every
    effect and its spread zero)."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    effects_now = {**model.effects, **(effects or {})}
    if null or effect_scale == 0:
        fields["effects"] = {a: 0.0 for a in effects_now}
        fields["effect_sd"] = 0.0
    else:
        fields["effects"] = {a: v * effect_scale for a, v in effects_now.items()}
    return SeverityModel(**fields)


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One cell of a power grid."""

    design_name: str
    design: TrialDesign
    model: SeverityModel
    effect_scale: float

    @property
    def name(self) -> str:
        return f"{self.design_name} {self.design.period_days}d x{self.effect_scale:g}"


def scenario_grid(designs: Sequence[tuple[str, TrialDesign, SeverityModel]], *, period_days: Sequence[int] = (),
                  effect_scales: Sequence[float] = (1.0,), effects: dict[str, float] | None = None,
                  n_patients: int | None = None) -> list[Scenario]:
    """Every design x block length x effect scale (block length and patients default to the design's)."""
    if not designs:
        raise SynthtrialError("a power study needs at least one design (--preset or --design)")
    for value in effect_scales:
        if not np.isfinite(value) or value < 0:
            raise SynthtrialError(f"--effect-scale must be a finite number >= 0, got {value}")
    for value in period_days:
        if not 1 <= int(value) <= MAX_PERIOD_DAYS:
            raise SynthtrialError(f"--period-days must be between 1 and {MAX_PERIOD_DAYS}, got {value}")
    if n_patients is not None and not 1 <= int(n_patients) <= MAX_PATIENTS:
        raise SynthtrialError(f"--patients must be between 1 and {MAX_PATIENTS}, got {n_patients}")
    out = []
    for name, design, model in designs:
        own = {a: v for a, v in (effects or {}).items() if a in design.arms}
        if n_patients is not None:
            design = dataclasses.replace(design, n_patients=int(n_patients))
        for days in (period_days or (design.period_days,)):
            sized = dataclasses.replace(design, period_days=int(days))
            _check_size(name, sized)
            for factor in effect_scales:
                out.append(Scenario(name, sized, with_effects(model, own, effect_scale=float(factor)), float(factor)))
    return out


def _check_size(name: str, design: TrialDesign) -> None:
    """Refuse a scenario too large for one simulated trial (:mod:`synthtrial.analyze.limits`), naming it."""
    if design.n_patients > MAX_PATIENTS:
        raise SynthtrialError(f"design '{name}': {design.n_patients} patients; a power study simulates at most "
                              f"{MAX_PATIENTS} per trial (option --design or --patients)")
    if design.days_per_patient > MAX_DAYS_PER_PATIENT:
        raise SynthtrialError(f"design '{name}': {design.days_per_patient} days per patient; a power study "
                              f"simulates at most {MAX_DAYS_PER_PATIENT} (option --design or --period-days)")


@dataclasses.dataclass(frozen=True)
class StudySettings:
    """What a replicate's numbers depend on besides its scenario and index."""

    seed: int = 0
    methods: tuple[str, ...] = DEFAULT_METHODS
    outcomes: tuple[str, ...] = POWER_OUTCOMES
    alpha: float = 0.05
    trend: bool = True
    random_slopes: bool = False
    estimate_kinetics: bool = False
    rendered: RenderedSettings | None = None   # None: no replicate is rendered
    raters: tuple[int, ...] = ()               # rater panel sizes: rated_count_k<K> outcomes (power_raters)
    panel: Any = None                          # the raters' Panel (None: the defaults)

    def __post_init__(self) -> None:
        check_alpha(self.alpha, "--alpha")
        unknown = [o for o in self.outcomes if o not in POWER_OUTCOMES]
        if unknown:
            raise SynthtrialError(f"unknown outcome '{unknown[0]}'; power studies use {', '.join(POWER_OUTCOMES)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise SynthtrialError(f"unknown method '{bad[0]}'; choose from {', '.join(METHODS)}")
        if self.raters or self.panel is not None:
            from synthtrial.analyze.power_raters import check_raters

            object.__setattr__(self, "raters", check_raters(self.raters, self.panel))
        if self.rendered is not None and not isinstance(self.rendered, RenderedSettings):
            raise SynthtrialError(f"rendered must be a RenderedSettings or None, not {type(self.rendered).__name__}")

    def renders(self, replicate: int) -> bool:
        """Whether replicate ``replicate`` (0-based) is rendered."""
        return self.rendered is not None and replicate < self.rendered.replicates


def scenario_key(scenario: Scenario, settings: StudySettings) -> str:
    """A short hash of everything that changes a replicate's numbers (the cache folder's name)."""
    chosen = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("raters", "panel") or v}  # unused: old keys
    blob = json.dumps({"design": dataclasses.asdict(scenario.design), "model": dataclasses.asdict(scenario.model),
                       "settings": chosen, "version": 7}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_replicate(scenario: Scenario, settings: StudySettings, replicate: int) -> pd.DataFrame:
    """Every estimate of one simulated trial, beside its truth, raw and standardised."""
    from synthtrial.analyze.multiplicity import adjust_responders
    from synthtrial.analyze.nof1 import Kinetics
    from synthtrial.analyze.pipeline import missing_day_schedule
    from synthtrial.analyze.stats import analyze_outcome, attach_truth, standardize

    design, model = scenario.design, scenario.model
    trial_seed = derive_seed("power", settings.seed, replicate, bits=32)
    trial = simulate_trial(design, model, seed=trial_seed)
    data = replicate_outcomes(trial.protocol)
    outcomes = list(settings.outcomes)
    if settings.renders(replicate):
        from synthtrial.analyze.power_render import render_trial, rendered_outcome_names

        images = render_trial(trial, settings.rendered, seed=trial_seed)
        image_columns = list(rendered_outcome_names(settings.rendered))
        data = data.merge(images[["patient_id", "day", *image_columns]], on=["patient_id", "day"], how="left",
                          validate="one_to_one")
        outcomes += image_columns
    if settings.raters:
        from synthtrial.analyze.power_raters import rated_outcomes

        rated = rated_outcomes(trial.protocol, settings.raters, settings.panel, trial_seed)
        data = data.merge(rated, on=["patient_id", "day"], how="left", validate="one_to_one")
        outcomes += [c for c in rated.columns if c not in ("patient_id", "day")]
    exclude = (design.washout_label,)
    kinetics = None if settings.estimate_kinetics else Kinetics(model.washin_half_life, model.washout_half_life)
    schedule = missing_day_schedule(trial.truth, design, trial_seed)
    frames = [analyze_outcome(data, outcome, design.reference, exclude=exclude, trend=settings.trend,
                              seed=replicate, alpha=settings.alpha, methods=settings.methods,
                              random_slopes=settings.random_slopes, design=design, kinetics=kinetics,
                              schedule=schedule, ar_phi=model.ar_phi)
              for outcome in outcomes]
    effects = attach_truth(pd.concat(frames, ignore_index=True), trial.truth, outcomes_on_truth_scale=POWER_OUTCOMES)
    effects = standardize(effects, data, trial.truth, exclude=exclude, trend=settings.trend, alpha=settings.alpha)
    effects = adjust_responders(effects, settings.alpha)
    effects.insert(0, "replicate", replicate)
    for i, (col, value) in enumerate((("scenario", scenario.name), ("design_name", scenario.design_name),
                                      ("period_days", design.period_days), ("effect_scale", scenario.effect_scale))):
        effects.insert(i, col, value)
    effects["population_effect"] = effects["arm"].map(lambda a: float(model.effects.get(a, 0.0)))
    return effects


def _run_chunk(scenario: Scenario, settings: StudySettings, replicates: list[int]) -> pd.DataFrame:
    """The chunk's replicates' frames (:func:`run_replicate`) as one, concatenated in order: one frame per chunk
    travels back, so the client concatenates tens of frames, not one per replicate."""
    import warnings

    from synthtrial.analyze.power_batch import batch_applies, run_chunk_frame

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if batch_applies(scenario, settings, POWER_OUTCOMES):  # the same frame, computed as arrays
            return run_chunk_frame(scenario, settings, replicates, run_replicate)
        return pd.concat([run_replicate(scenario, settings, r) for r in replicates], ignore_index=True)


def _runs(frame: pd.DataFrame, replicates: list[int]) -> list[tuple[int, pd.DataFrame]]:
    """A chunk's frame (its ``replicates`` ascending) cut where the replicates skip one (a gap read from the cache),
    as (first replicate, rows of the run): runs that, sorted, put every replicate in order."""
    cuts = [k for k in range(1, len(replicates)) if replicates[k] != replicates[k - 1] + 1]
    if not cuts:
        return [(replicates[0], frame)]
    rows = np.searchsorted(frame["replicate"].to_numpy(), [replicates[k] for k in cuts])
    bounds = [0, *rows.tolist(), len(frame)]
    return [(replicates[k], frame.iloc[bounds[j]:bounds[j + 1]])
            for j, k in enumerate([0, *cuts])]


def _cache_path(cache: Path, key: str, replicate: int) -> Path:
    return cache / key / f"r{replicate:06d}.parquet"


def _read_cached(path: Path) -> pd.DataFrame:
    """A cached replicate as run_replicate made it: parquet gives a flag column without a None back as bool,
    where a fresh replicate holds objects (True, False or None), and concatenation would then differ."""
    frame = pd.read_parquet(path)
    for col in ("covered", "std_covered", "responder", "responder_holm", "responder_bh"):
        if col in frame.columns:
            frame[col] = frame[col].astype(object)
    return frame


def _write_cached(path: Path, frame: pd.DataFrame) -> None:
    from synthtrial.util.atomic import write_bytes_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    write_bytes_atomic(path, buf.getvalue())


def power_study(scenarios: Sequence[Scenario] | TrialDesign, model: SeverityModel | None = None,
                replicates: int = 100, *, settings: StudySettings | None = None, workers: int = 0,
                scheduler: str | None = None, cache: str | os.PathLike[str] | None = None, chunk: int | None = None,
                progress: ProgressCallback | None = None, known: Mapping[tuple[int, int], pd.DataFrame] | None = None,
                **setting_overrides) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run ``replicates`` simulated trials per scenario; return every estimate and the summary.

    ``scenarios`` may also be one design with its ``model`` (a one-scenario grid). Keyword arguments
    other than those named are fields of :class:`StudySettings`. The result depends on the settings'
    ``seed`` only, not on ``workers``, the scheduler, chunking or resuming from ``cache``.
    ``progress(done, total, status)`` counts the replicates (those read back from ``cache`` at once), in
    chunks of at most :data:`PROGRESS_STEP` of them (and at most 25 replicates); before the first, on Dask,
    the status names the start-up phases (starting the cluster, the workers loading the statistics).
    ``known``: replicates already computed, by (scenario index, replicate) — each exactly what
    :func:`run_replicate` gives for these settings (e.g. the pooled rows of a study of more methods on the same
    trials, :func:`synthtrial.analyze.grid.known_pooled`); used as if read from the cache, and written to it.
    """
    if isinstance(scenarios, TrialDesign):
        if model is None:
            raise SynthtrialError("power_study(design, model, ...) needs the severity model")
        scenarios = [Scenario("design", scenarios, model, 1.0)]
    settings = dataclasses.replace(settings or StudySettings(), **{
        k: tuple(v) if k in ("methods", "outcomes") else v for k, v in setting_overrides.items()})
    _check_study(scenarios, replicates, settings, workers)
    cache_dir = Path(cache) if cache is not None else None
    keys = [scenario_key(s, settings) for s in scenarios]
    results = _cached(cache_dir, keys, replicates) if cache_dir is not None else {}
    for (i, r), frame in (known or {}).items():
        if (i, r) not in results and 0 <= i < len(scenarios) and 0 <= r < replicates:
            results[(i, r)] = frame
            if cache_dir is not None:
                _write_cached(_cache_path(cache_dir, keys[i], r), frame)
    total, done = len(scenarios) * replicates, len(results)
    if progress and done:
        progress(done, total, "")
    size = chunk or max(1, min(25, (total - done) // max(round(1 / PROGRESS_STEP), 8 * max(workers, 1))))
    chunks = pending_chunks(len(scenarios), replicates, settings, results, size)
    runs: dict[tuple[int, int], pd.DataFrame] = dict(results)   # (scenario, first replicate): a run's rows

    def phase(status: str) -> None:
        if progress:
            progress(done, total, status)

    def finished(i: int, frame: pd.DataFrame, reps: list[int]) -> None:
        nonlocal done
        runs.update({(i, first): rows for first, rows in _runs(frame, reps)})
        if cache_dir is not None:
            from synthtrial.analyze.power_batch import split_replicates

            for r, one in split_replicates(frame):
                _write_cached(_cache_path(cache_dir, keys[i], r), one)
        for _ in reps:
            done += 1
            if progress:
                progress(done, total, "")

    first = next(chunks, None)
    if first is None:
        pass  # everything came from the cache
    elif workers == 0 and scheduler is None:
        for i, reps in itertools.chain([first], chunks):
            finished(i, _run_chunk(scenarios[i], settings, reps), reps)
    else:
        _run_dask(itertools.chain([first], chunks), scenarios, settings, workers, scheduler, finished, phase)
    estimates = pd.concat([runs[key] for key in sorted(runs)], ignore_index=True)
    return estimates, summarize_power(estimates, settings.alpha)


def _check_study(scenarios: Sequence[Scenario], replicates: int, settings: StudySettings, workers: int) -> None:
    """Refuse, before any work, a study beyond :mod:`synthtrial.analyze.limits` or inconsistent settings."""
    if isinstance(replicates, bool) or not isinstance(replicates, (int, np.integer)) \
            or not 1 <= replicates <= MAX_REPLICATES:
        raise SynthtrialError(f"--replicates must be a whole number from 1 to {MAX_REPLICATES}, got {replicates!r}")
    if len(scenarios) * replicates > MAX_TRIALS:
        raise SynthtrialError(f"{len(scenarios)} scenarios x {replicates} replicates = "
                              f"{len(scenarios) * replicates} trials; a power study runs at most {MAX_TRIALS} "
                              "(fewer --replicates, or a smaller grid)")
    if workers < 0:
        raise SynthtrialError(f"--workers must be >= 0, got {workers}")
    if settings.rendered is not None and settings.rendered.replicates > replicates:
        raise SynthtrialError(f"--rendered {settings.rendered.replicates} exceeds --replicates {replicates}")


def _cached(cache: Path, keys: list[str], replicates: int) -> dict[tuple[int, int], pd.DataFrame]:
    """Every replicate the cache folder holds intact (a damaged file is left to be recomputed)."""
    results = {}
    for i, key in enumerate(keys):
        for r in range(replicates):
            path = _cache_path(cache, key, r)
            if path.is_file():
                try:
                    results[(i, r)] = _read_cached(path)
                except (OSError, ValueError):
                    pass  # a damaged cache file is recomputed
    return results


def pending_chunks(n_scenarios: int, replicates: int, settings: StudySettings, done: Container[tuple[int, int]],
            size: int) -> Iterator[tuple[int, list[int]]]:
    """The work still to do, generated as it is taken (never built whole): each rendered replicate alone and
    first, then each scenario's other replicates in chunks of ``size``."""
    for i in range(n_scenarios):
        for r in range(min(replicates, settings.rendered.replicates if settings.rendered else 0)):
            if (i, r) not in done:
                yield i, [r]
    for i in range(n_scenarios):
        reps: list[int] = []
        for r in range(replicates):
            if (i, r) not in done and not settings.renders(r):
                reps.append(r)
                if len(reps) == size:
                    yield i, reps
                    reps = []
        if reps:
            yield i, reps


def warm_up_worker() -> None:
    """Import what a replicate needs (the statistics stack takes seconds), so a worker's first chunk does not."""
    import synthtrial.analyze.multiplicity  # noqa: F401
    import synthtrial.analyze.nof1  # noqa: F401
    import synthtrial.analyze.pipeline  # noqa: F401
    import synthtrial.analyze.stats  # noqa: F401


def _run_dask(chunks: Iterator[tuple[int, list[int]]], scenarios, settings, workers, scheduler, finished,
              phase) -> None:
    """Run the chunks on Dask, a bounded number in flight; the first failure ends the study in one line.
    ``phase(status)`` names each start-up step (the cluster, the workers' imports) as it begins."""
    phase(f"connecting to the Dask scheduler at {scheduler}" if scheduler is not None else
          f"starting a local Dask cluster of {max(1, workers)} worker{'s' if workers > 1 else ''}")
    with client_for(workers, scheduler) as client:
        phase("the workers are loading the statistics")
        client.run(warm_up_worker)
        phase("")
        run_tasks(client, _run_chunk, (((i, reps), (scenarios[i], settings, reps)) for i, reps in chunks),
                  lambda tag, frame: finished(tag[0], frame, tag[1]),
                  ahead=64 if scheduler is not None else 4 * max(1, workers),
                  failed=lambda tag, exc: f"a replicate of scenario '{scenarios[tag[0]].name}' failed on a Dask worker")


def summarize_power(estimates: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Per scenario/outcome/method/arm: rejection rate (power, or type I error where the effect is 0), MC SE,
    tests with and without a p-value, bias, CI coverage, the median calibration slope (estimate on the truth,
    :func:`synthtrial.analyze.stats.standardize`), the standardised coverage, and for the
    per-patient rows the share of trials with at least one responder call, unadjusted, Holm and BH
    (:func:`synthtrial.analyze.multiplicity.familywise`; the family-wise error where the effect is 0).

    Rows are grouped once (:func:`synthtrial.analyze.multiplicity.group_ids`, pandas' numbering of the groups) and
    counted with array operations; each mean and median is pandas' own on the group's values in row order, so
    the numbers are those of a ``groupby`` loop, without taking the wide frame's rows per group."""
    from synthtrial.analyze.multiplicity import familywise, group_ids

    level = np.where(estimates["scope"] == "pooled", "pooled", "per patient")
    keyed = estimates[[c for c in estimates.columns if c in SUMMARY_KEYS]].assign(level=level)
    ids = group_ids(keyed, SUMMARY_KEYS)
    groups = int(ids.max()) + 1 if ids.size else 0
    order = np.argsort(ids, kind="stable")                         # each group's rows, in frame order
    bounds = np.searchsorted(ids[order], np.arange(groups + 1))
    first = order[bounds[:-1]]

    def count(mask: np.ndarray) -> np.ndarray:
        return np.bincount(ids[mask & (ids >= 0)], minlength=groups)

    p = estimates["p"].to_numpy(dtype=float)
    has_p = ~np.isnan(p)
    tests, rejected, size = count(has_p), count(has_p & (p < alpha)), count(np.ones(ids.size, dtype=bool))
    shares = {name: _share(estimates[name], count) if name in estimates else (np.zeros(groups, int),) * 2
              for name in ("covered", "std_covered")}
    slope = (estimates["calibration_slope"].replace([np.inf, -np.inf], np.nan).to_numpy(dtype=float)
             if "calibration_slope" in estimates else None)
    values = {name: estimates[name].to_numpy(dtype=float) for name in ("estimate", "true_effect", "bias")}
    effects = estimates["population_effect"].to_numpy(dtype=float)[first]
    estimands = estimates["estimand"].to_numpy()[first] if "estimand" in estimates else None
    rows = []
    for g, keys in enumerate(keyed[SUMMARY_KEYS].iloc[first].itertuples(index=False, name=None)):
        at = order[bounds[g]:bounds[g + 1]]
        n = int(tests[g])
        rate = rejected[g] / n if n else np.nan
        group_slope = pd.Series(slope[at]) if slope is not None else pd.Series(dtype=float)
        (cov_k, cov_n), (std_k, std_n) = ((k[g], m[g]) for k, m in (shares["covered"], shares["std_covered"]))
        rows.append({
            **dict(zip(SUMMARY_KEYS, keys)), **({"estimand": estimands[g]} if estimands is not None else {}),
            "population_effect": float(effects[g]),
            "quantity": "type I error" if effects[g] == 0 else "power",
            "rejection_rate": rate, "mc_se": float(np.sqrt(rate * (1 - rate) / n)) if n else np.nan,
            "tests": n, "no_p": int(size[g] - n),
            **{name: float(pd.Series(values[column][at]).mean()) for name, column in
               (("mean_estimate", "estimate"), ("mean_truth", "true_effect"), ("bias", "bias"))},
            "coverage": cov_k / cov_n if cov_n else np.nan,
            "calibration": float(group_slope.median()) if group_slope.notna().any() else np.nan,
            "std_coverage": std_k / std_n if std_n else np.nan,
        })
    summary = pd.DataFrame(rows)
    if "responder" not in estimates.columns or summary.empty:
        return summary
    fw_columns = [c for c in estimates.columns
                  if c in {*SUMMARY_KEYS, "scope", "replicate", "responder", "responder_holm", "responder_bh"}]
    fw = familywise(estimates[fw_columns].assign(level=level), SUMMARY_KEYS).rename(columns={"trials": "fw_trials"})
    merged = summary.merge(fw, on=SUMMARY_KEYS, how="left", validate="one_to_one")
    merged["fw_trials"] = merged["fw_trials"].fillna(0).astype("int64")
    return merged


def _share(flags: pd.Series, count) -> tuple[np.ndarray, np.ndarray]:
    """Per group (``count(mask)``: rows per group): the flags that are true and those that are set (not None)."""
    present = flags.notna().to_numpy()
    true = np.zeros(present.size, dtype=bool)
    true[present] = flags.to_numpy(dtype=object)[present].astype(bool)
    return count(true), count(present)
