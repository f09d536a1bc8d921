"""The scripting API: design, generate, grade, analyze and power, each returning a typed result.

In: what the commands take, as Python values (a preset or protocol path, a run directory, grader names,
settings). Out: frozen dataclasses holding the paths written and the tables loaded from them, so a script
reads results without knowing the run directory's file names. Owns: nothing of its own; every function calls
the stage that does the work (the same functions the ``synthtrial`` commands call), then reads back what it
wrote. ``import synthtrial`` exposes these names at the top level and loads this module on first use; this
module loads the stages inside each function, so neither import pulls in torch.

A whole study, tiny (2 patients x 4 days at 128 px; the autoencoder outcome left out to keep it fast)::

    >>> import synthtrial
    >>> trial = synthtrial.design("quick", "tiny.csv", n_patients=2, blocks=1)
    >>> gen = synthtrial.generate(trial.protocol, "runs/tiny", size=128)
    >>> len(gen.manifest), sorted(gen.truth["population_effects"])
    (8, ['Cream'])
    >>> graded = synthtrial.grade(gen.run, ["counter"])
    >>> graded.outcomes
    ['counter_count', 'counter_severity']
    >>> result = synthtrial.analyze(gen.run, autoencoder=False, n_permutations=100)
    >>> sorted(result.pooled["outcome"].unique())[:3]
    ['grader_counter_count', 'grader_counter_severity', 'iga']
    >>> study = synthtrial.power("quick", replicates=3, progress=False)
    >>> sorted(study.summary["method"].unique())[:3]
    ['gls_ar1', 'gls_kinetics', 'hac']

``synthtrial.grade`` and ``synthtrial.analyze`` are also the grading and analysis stage packages
(``synthtrial.analyze.pipeline`` and the rest still import as before); calling them calls :func:`grade` and
:func:`analyze` here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["AnalyzeResult", "DesignResult", "GenerateResult", "GradeResult", "PowerResult", "analyze", "design",
           "generate", "grade", "power"]

PathLike = str | os.PathLike[str]


# ------------------------------------------------------------------------------------------------ results
# eq=False: the tables are DataFrames, whose == is elementwise; results compare by identity.

@dataclass(frozen=True, eq=False)
class DesignResult:
    """A designed trial: the protocol CSV and its truth file, and both loaded."""

    protocol: Path            #: the protocol CSV (``generate`` reads it)
    truth_path: Path          #: ``<stem>.truth.json`` beside it
    table: pd.DataFrame       #: the protocol, one row per patient per day (severities simulated)
    truth: dict[str, Any]     #: every parameter and every patient's true effect


@dataclass(frozen=True, eq=False)
class GenerateResult:
    """A rendered run directory and its tables."""

    run: Path                     #: the run directory
    manifest: pd.DataFrame        #: one row per image (``manifest.parquet``)
    lesions: pd.DataFrame         #: one row per lesion per image (``lesions.parquet``)
    truth: dict[str, Any] | None  #: ``truth.json`` (None where the protocol gave every severity)
    config: dict[str, Any]        #: ``config.json``: every setting, the seed and the package versions


@dataclass(frozen=True, eq=False)
class GradeResult:
    """The grades of a run."""

    run: Path                 #: the run directory
    path: Path                #: ``RUN/grades.parquet``
    grades: pd.DataFrame      #: one row per image: ``image``, ``image_sha256``, ``<grader>_<column>``
    outcomes: list[str]       #: the columns ``analyze`` takes as outcomes (it names them ``grader_<column>``)
    graders: dict[str, Any]   #: ``RUN/grades.json``'s entry per grader (fingerprint, columns, outcomes, tables)


@dataclass(frozen=True, eq=False)
class AnalyzeResult:
    """The treatment effects read off a run, beside the truth."""

    folder: Path              #: ``RUN/analysis/``
    report: Path              #: ``RUN/analysis/report.html``
    effects: pd.DataFrame     #: ``effects.csv``: one row per outcome x method x scope x arm, with its ``role``
    pooled: pd.DataFrame      #: the pooled mixed-model (CR2) rows: what ``synthtrial analyze`` prints
    outcomes: pd.DataFrame    #: ``outcomes.parquet``: every outcome per image
    settings: dict[str, Any]  #: ``settings.json``: the settings, the reference arm and the outcomes analysed

    @property
    def inferential(self) -> pd.DataFrame:
        """The rows of tests that hold their size on this design (``role`` inferential; the rest are
        descriptive or not available, as docs/analysis.md says)."""
        return self.effects[self.effects["role"] == "inferential"]


@dataclass(frozen=True, eq=False)
class PowerResult:
    """A power study: every replicate's estimate and the summary per scenario, method and arm."""

    summary: pd.DataFrame     #: rate (type I error or power), its Monte-Carlo SE, bias, coverage, calibration
    estimates: pd.DataFrame   #: one row per replicate x outcome x method x arm
    scenarios: tuple[str, ...]  #: the grid's scenario names, in order


# ---------------------------------------------------------------------------------------------- functions

def design(preset: str, out: PathLike, *, seed: int = 0, form: str = "native",
           force: bool = False, **changes: Any) -> DesignResult:
    """Design a trial from a preset, simulate its severities and write ``out`` and its ``.truth.json``.

    ``changes`` replace fields of the preset's :class:`~synthtrial.trial.simulate.TrialDesign` (``n_patients``,
    ``blocks``, ``period_days``, ``washout_days``, ``randomize``, ``design``, ``arms``, ...) or of its
    :class:`~synthtrial.trial.simulate.SeverityModel` (``effects``, ``effect_sd``, ``ar_phi``, ...), as
    ``synthtrial protocol design`` does. Files already there are replaced only with ``force`` (or when they
    hold exactly what this call writes, so a script can run again).

    >>> import synthtrial
    >>> trial = synthtrial.design("quick", "tiny.csv", n_patients=2, blocks=1)
    >>> trial.protocol.name, trial.truth_path.name, len(trial.table)
    ('tiny.csv', 'tiny.truth.json', 8)
    >>> trial.truth["population_effects"]
    {'Cream': -0.6}
    """
    import tempfile

    from synthtrial.trial.protocol import read_protocol
    from synthtrial.trial.simulate import SeverityModel, TrialDesign, design_with_overrides, simulate_trial
    from synthtrial.util.errors import SynthtrialError

    design_fields = {f.name for f in dataclasses.fields(TrialDesign)}
    model_fields = {f.name for f in dataclasses.fields(SeverityModel)}
    _check_settings("design", changes, design_fields | model_fields)
    trial_design, model = design_with_overrides(
        preset, {k: v for k, v in changes.items() if k in design_fields},
        {k: v for k, v in changes.items() if k in model_fields})
    trial = simulate_trial(trial_design, model, seed=seed)
    out = Path(out)
    truth_path = out.with_name(f"{out.stem}.truth.json")
    if force or not (out.exists() or truth_path.exists()):
        trial.write(out, form=form)
    else:
        with tempfile.TemporaryDirectory() as scratch:
            fresh = trial.write(Path(scratch) / out.name, form=form)
            same = all(p.is_file() and p.read_bytes() == f.read_bytes() for p, f in zip((out, truth_path), fresh))
        if not same:
            raise SynthtrialError(f"{out} or {truth_path} already exists and holds another trial; pass force=True "
                                  "to replace it")
    return DesignResult(protocol=out, truth_path=truth_path, table=read_protocol(out), truth=trial.truth)


def generate(protocol: PathLike | DesignResult, out: PathLike | None = None, *, size: int = 512, seed: int = 0,
             workers: int = 1, faces: PathLike | None = None, progress: bool = True,
             **options: Any) -> GenerateResult:
    """Render a protocol into a run directory (``out``, default ``runs/<protocol stem>``) and load its tables.

    Re-running the same call resumes or heals the run. ``options`` are the other keywords of
    :func:`synthtrial.run.generation.generate` (``naming``, ``backend``, ``diffusion``, ``quality``, ``reject``,
    ``yaw_deg``, ``on_progress``). The progress bar is drawn on stderr, and only on a terminal.

    >>> import synthtrial
    >>> trial = synthtrial.design("quick", "tiny.csv", n_patients=2, blocks=1)
    >>> gen = synthtrial.generate(trial, "runs/tiny", size=128)
    >>> gen.run.name, len(gen.manifest), int(gen.manifest["width"].iloc[0])
    ('tiny', 8, 128)
    >>> gen.manifest[["patient_id", "day", "treatment"]].head(3)
      patient_id  day treatment
    0        P01    1   Control
    1        P01    2   Control
    2        P01    3     Cream
    """
    from synthtrial.run import rundir
    from synthtrial.run.generation import generate as generate_run
    from synthtrial.run.rundir import read_config, read_truth

    if isinstance(protocol, DesignResult):
        protocol = protocol.protocol
    run = generate_run(protocol, out, faces_dir=faces, seed=seed, size=size, workers=workers, progress=progress,
                       **options)
    manifest, lesions = rundir.read_run(run)
    return GenerateResult(run=run, manifest=manifest, lesions=lesions, truth=read_truth(run),
                          config=read_config(run))


def grade(run: PathLike | GenerateResult, graders: Sequence[str] | str | None = None, *,
          weights: Mapping[str, PathLike] | None = None, device: str | None = None, batch_size: int = 64,
          progress: bool = True) -> GradeResult:
    """Score every image of a run with the embedded graders (``RUN/grades.parquet``) and load the grades.

    ``graders``: names (a list, or comma-separated), default the graders whose model card meets its targets
    (``synthtrial graders list``, :func:`synthtrial.graders.cards.default_graders`); list the tracker after the
    detector. ``weights`` maps a grader to another weights folder.
    Re-running resumes: finished chunks are kept.

    >>> import synthtrial
    >>> gen = synthtrial.generate(synthtrial.design("quick", "tiny.csv", n_patients=2, blocks=1), "runs/tiny",
    ...                           size=128)
    >>> graded = synthtrial.grade(gen, "counter")
    >>> graded.path.name, len(graded.grades), graded.outcomes
    ('grades.parquet', 8, ['counter_count', 'counter_severity'])
    """
    from synthtrial.grade.stage import grade_run
    from synthtrial.graders.base import GraderError, get_grader
    from synthtrial.graders.cards import default_graders
    from synthtrial.run import rundir
    from synthtrial.run.rundir import read_json
    from synthtrial.util.progress import StageBars

    run_dir = run.run if isinstance(run, GenerateResult) else Path(run)
    names = ([n.strip() for n in graders.split(",") if n.strip()] if isinstance(graders, str)
             else list(graders) if graders else default_graders())
    stray = [n for n in (weights or {}) if n not in names]
    if stray:
        raise GraderError(f"weights for '{stray[0]}', which is not among the graders run ({', '.join(names)})")
    built = [get_grader(n, (weights or {}).get(n), device=device) for n in names]
    with StageBars("grading", unit="images", enabled=progress) as update:   # one bar per grader, as the CLI
        path = grade_run(run_dir, built, batch_size=batch_size, progress=update)
    index = read_json(run_dir / rundir.GRADES_INDEX).get("graders", {})
    outcomes = [c for n in names for c in index.get(n, {}).get("outcomes", [])]
    return GradeResult(run=run_dir, path=path, grades=rundir.read_parquet(path), outcomes=outcomes, graders=index)


def analyze(run: PathLike | GenerateResult, *, device: str | None = None, progress: bool = True,
            **settings: Any) -> AnalyzeResult:
    """Estimate the treatment effects of a run beside the truth (``RUN/analysis/``) and load the tables.

    ``settings`` are fields of :class:`synthtrial.analyze.pipeline.AnalysisSettings` (``autoencoder``,
    ``epochs``, ``image_size``, ``embedding``, ``trend``, ``n_permutations``, ``alpha``, ``seed``,
    ``methods``), with its defaults. Which rows are tests: :attr:`AnalyzeResult.inferential`.

    >>> import synthtrial
    >>> gen = synthtrial.generate(synthtrial.design("quick", "tiny.csv", n_patients=2, blocks=1), "runs/tiny",
    ...                           size=128)
    >>> result = synthtrial.analyze(gen, autoencoder=False, n_permutations=100)
    >>> result.report.name, list(result.pooled.columns[:3])
    ('report.html', ['outcome', 'arm', 'estimate'])
    >>> sorted(result.inferential.query("scope != 'pooled'")["method"].unique())
    ['period']
    """
    import pandas as pd

    from synthtrial.analyze.pipeline import (EFFECTS, OUTCOMES, REPORT, AnalysisSettings, analysis_summary,
                                             analyze_run)
    from synthtrial.run import rundir
    from synthtrial.run.rundir import read_json

    _check_settings("analyze", settings, {f.name for f in dataclasses.fields(AnalysisSettings)})
    run_dir = run.run if isinstance(run, GenerateResult) else Path(run)
    folder = analyze_run(run_dir, AnalysisSettings(**settings), device=device, progress=progress)
    effects = pd.read_csv(folder / EFFECTS)
    return AnalyzeResult(folder=folder, report=folder / REPORT, effects=effects,
                         pooled=analysis_summary(effects).reset_index(drop=True),
                         outcomes=rundir.read_parquet(folder / OUTCOMES),
                         settings=read_json(folder / "settings.json"))


def power(designs: str | PathLike | DesignResult | Sequence[str | PathLike | DesignResult] = "quick", *,
          replicates: int = 100, period_days: Sequence[int] = (), effect_scales: Sequence[float] = (1.0,),
          effects: Mapping[str, float] | None = None, n_patients: int | None = None, workers: int = 0,
          scheduler: str | None = None, cache: PathLike | None = None, progress: bool = True,
          **settings: Any) -> PowerResult:
    """Type I error, power, bias and coverage of every test over a grid of simulated trials.

    ``designs``: preset names, design or truth files (``<stem>.truth.json``), or :class:`DesignResult`\\ s; the
    grid is designs x ``period_days`` x ``effect_scales`` (scale 0: the null). ``settings`` are fields of
    :class:`synthtrial.analyze.power.StudySettings` (``seed``, ``methods``, ``outcomes``, ``alpha``, ``trend``,
    ``rendered``, ...). ``workers`` > 0 runs the replicates on a local Dask cluster; the numbers depend on the
    seed only.

    >>> import synthtrial
    >>> study = synthtrial.power("quick", replicates=3, effect_scales=(0, 1), progress=False)
    >>> study.scenarios
    ('quick 2d x0', 'quick 2d x1')
    >>> study.summary.query("method == 'lmm' and outcome == 'oracle'")[["effect_scale", "tests"]]
    ... # doctest: +NORMALIZE_WHITESPACE
         effect_scale  tests
    ...           0.0      3
    ...           1.0      3
    """
    from synthtrial.analyze.power import StudySettings, design_from_file, power_study, scenario_grid
    from synthtrial.trial.simulate import preset
    from synthtrial.util.progress import progress_bar

    _check_settings("power", settings, {f.name for f in dataclasses.fields(StudySettings)})
    named = []
    for item in [designs] if isinstance(designs, (str, os.PathLike, DesignResult)) else list(designs):
        if isinstance(item, DesignResult):
            named.append((item.protocol.stem, *design_from_file(item.truth_path)))
        elif isinstance(item, str) and not item.endswith(".json"):
            named.append((item, *preset(item)))
        else:
            named.append((Path(item).stem.removesuffix(".truth"), *design_from_file(item)))
    grid = scenario_grid(named, period_days=period_days, effect_scales=effect_scales,
                         effects=dict(effects) if effects else None, n_patients=n_patients)
    with progress_bar("replicates", len(grid) * replicates, unit="trials", enabled=progress) as update:
        estimates, summary = power_study(grid, replicates=replicates, workers=workers, scheduler=scheduler,
                                         cache=cache, progress=update, **settings)
    return PowerResult(summary=summary, estimates=estimates, scenarios=tuple(s.name for s in grid))


def _check_settings(function: str, given: Mapping[str, Any], known: set[str]) -> None:
    """A one-line error naming the first keyword ``function`` does not take, and those it does."""
    from synthtrial.util.errors import SynthtrialError

    unknown = sorted(set(given) - known)
    if unknown:
        raise SynthtrialError(f"{function}(): unknown setting '{unknown[0]}'; it takes {', '.join(sorted(known))}")
