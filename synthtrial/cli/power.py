"""`synthtrial power`: type I error, power, bias and coverage over grids of simulated trials (on Dask)."""

from __future__ import annotations

import dataclasses
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from synthtrial.analyze.limits import (ALPHA_RANGE, MAX_DAYS_PER_PATIENT, MAX_EPOCHS, MAX_PATIENTS, MAX_RENDERED,
                                      MAX_REPLICATES, MAX_TRIALS)
from synthtrial.run.generation import MAX_WORKERS
from synthtrial.cli.common import PresetName, Quiet, Seed, app, handles_errors, out
from synthtrial.trial.simulate import MAX_PERIOD_DAYS
from synthtrial.graders.base import REGISTRY
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.progress import progress_bar

_GRID = "Scenario grid"
_RUN = "Engine"
_RENDER = "Rendered replicates (image outcomes)"
#: Outcome labels of the 80-column tables' section rows (at most 13 characters; image outcomes get a legend line)
_SHORT_OUTCOME = {"oracle": "oracle", "lesion_severity": "lesion count", "ae_pca": "AE-PCA"}
_SHORT_GRADER = {"counter": "ctr", "detector": "det", "dermx": "dx", "iga": "iga"}
_SHORT_COLUMN = {"count": "n", "severity": "sev", "expected_grade": "gr"}


class PowerMethod(str, Enum):
    """``--method`` choices: the estimator registry's names (synthtrial.analyze.estimators.METHODS, checked by a
    test; listed here so that the command line starts without loading the statistics)."""

    period = "period"
    randomization = "randomization"
    gls_kinetics = "gls_kinetics"
    lmm = "lmm"
    lmm_cr1 = "lmm_cr1"
    welch = "welch"
    permutation = "permutation"
    gls_ar1 = "gls_ar1"
    hac = "hac"


class GridName(str, Enum):
    """``--grid`` choices: synthtrial.analyze.grid.GRIDS (checked by a test)."""

    full = "full"
    small = "small"


class PowerOutcome(str, Enum):
    oracle = "oracle"
    lesion_severity = "lesion_severity"


#: ``--grader`` choices: every registered grader (one without shipped weights or outcomes is refused in one line)
GraderName = Enum("GraderName", {name: name for name in REGISTRY}, type=str)


def short_outcome(name: str) -> str:
    """An outcome's label in the 80-column tables: ``grader_counter_severity`` -> ``ctr sev``."""
    if name in _SHORT_OUTCOME:
        return _SHORT_OUTCOME[name]
    from synthtrial.analyze.estimators import GRADER_OUTCOME_PREFIX

    if name.startswith(GRADER_OUTCOME_PREFIX):
        grader, _, column = name.removeprefix(GRADER_OUTCOME_PREFIX).partition("_")
        return f"{_SHORT_GRADER.get(grader, grader[:3])} {_SHORT_COLUMN.get(column, column[:3])}".strip()
    return name


def _default_workers() -> int:
    """The CPUs this process may use (its affinity, not the host's count), at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _output_path(path: Path, option: str, suffixes: tuple[str, ...], force: bool,
                 companion: str | None = None) -> Path:
    """The file an output option will write (a missing suffix gets the first of ``suffixes``), checked now:
    its folder exists and is writable, and neither it nor its ``companion`` (``<stem><companion>`` beside it)
    exists unless ``force``."""
    if path.suffix == "":
        path = path.with_name(path.name + suffixes[0])
    elif path.suffix.lower() not in suffixes:
        raise SynthtrialError(f"{path}: {option} writes {' or '.join(suffixes)} files, not '{path.suffix}'")
    if path.is_dir():
        raise SynthtrialError(f"{path} is a directory ({option})")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise SynthtrialError(f"{parent}: no such directory ({option} {path})")
    written = [path] + ([path.with_name(f"{path.stem}{companion}")] if companion else [])
    existing = [str(p) for p in written if p.exists() or p.is_symlink()]
    if existing and not force:
        raise SynthtrialError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; pass "
                              f"--force to overwrite (option {option})")
    if not os.access(parent, os.W_OK | os.X_OK) or any(p.exists() and not os.access(p, os.W_OK) for p in written):
        raise SynthtrialError(f"{path}: not writable ({option})")
    return path


#: The estimates CSV written beside ``--out``'s summary CSV.
_ESTIMATES_SUFFIX = ".estimates.csv"

GridOption = Annotated[Optional[GridName], typer.Option(
    "--grid", help="Run the size-and-coverage grid instead of --preset/--design: pairs designs over period length x "
    "AR(1) phi x trend x carryover x fixed/randomised order (full: 2-28 days, phi 0.3-0.95, 96 cells; small: the "
    "corners, 32), a null and an effect scenario per cell, oracle outcome, the inferential methods; checks every "
    "method labelled inferential (size <= alpha + 2 MC SE, coverage >= 0.93).", show_default=False,
    rich_help_panel=_GRID)]
GridTable = Annotated[Optional[Path], typer.Option(
    "--grid-table", help="With --grid: write the grid table as Markdown (.md) and CSV beside it (e.g. docs/grid.md).",
    show_default=False, rich_help_panel=_GRID)]
PooledReplicates = Annotated[Optional[int], typer.Option(
    "--pooled-replicates", min=1, max=MAX_REPLICATES, help="With --grid: trials per scenario for the pooled model "
    "(one test per trial; default: patients x --replicates, as many tests as a per-patient row; the first "
    "--replicates are the per-patient rows' trials).", show_default=False, rich_help_panel=_GRID)]
Presets = Annotated[Optional[list[PresetName]], typer.Option(
    "--preset", help="A ready-made design (repeatable; default: quick).", show_default=False, rich_help_panel=_GRID)]
DesignFiles = Annotated[Optional[list[Path]], typer.Option(
    "--design", help="A truth file written by [bold]protocol design[/] (repeatable; at most "
    f"{MAX_PATIENTS} patients, {MAX_DAYS_PER_PATIENT} days each).", show_default=False, rich_help_panel=_GRID)]
PeriodDays = Annotated[Optional[list[int]], typer.Option(
    "--period-days", min=1, max=MAX_PERIOD_DAYS, help="Block length(s) in days (repeatable; default: each "
    "design's own).", show_default=False, rich_help_panel=_GRID)]
EffectScales = Annotated[Optional[list[float]], typer.Option(
    "--effect-scale", help="Multiplier(s) of the design's effects (repeatable; 0 = null; default 1).",
    show_default=False, rich_help_panel=_GRID)]
Null = Annotated[bool, typer.Option("--null", help="Same as --effect-scale 0: every effect and its spread zero, "
                                    "so rejection rates are type I errors.", rich_help_panel=_GRID)]
Effects = Annotated[Optional[list[str]], typer.Option(
    "--effect", help="Override an arm's population effect, ARM=NUMBER (repeatable).", show_default=False,
    rich_help_panel=_GRID)]
Patients = Annotated[Optional[int], typer.Option(
    "--patients", min=1, max=MAX_PATIENTS, help="Override the number of patients.", show_default=False,
    rich_help_panel=_GRID)]
Replicates = Annotated[int, typer.Option(
    "--replicates", min=1, max=MAX_REPLICATES, help=f"Simulated trials per scenario (at most {MAX_TRIALS} over "
    "the whole grid).")]
Methods = Annotated[Optional[list[PowerMethod]], typer.Option(
    "--method", metavar="<method>", help="Tests to run (repeatable): " + ", ".join(m.value for m in PowerMethod) +
    " (default: all but permutation).", show_default=False)]
Outcomes = Annotated[Optional[list[PowerOutcome]], typer.Option(
    "--outcome", help="Outcomes (repeatable; default: both).", show_default=False)]
Alpha = Annotated[float, typer.Option(
    "--alpha", help=f"Significance level, strictly between {ALPHA_RANGE[0]:g} and {ALPHA_RANGE[1]:g}.")]
Trend = Annotated[bool, typer.Option("--trend/--no-trend", help="Adjust for a linear time trend.")]
RandomSlopes = Annotated[bool, typer.Option(
    "--random-slopes", help="Pooled model with random treatment slopes (statsmodels; ~20x slower than the default "
    "random intercept, whose cluster-robust SEs already allow them).")]
EstimateKinetics = Annotated[bool, typer.Option(
    "--estimate-kinetics", help="gls_kinetics profiles the half-lives per patient instead of using the design's.")]
Workers = Annotated[Optional[int], typer.Option(
    "--workers", min=1, max=MAX_WORKERS, help="Dask LocalCluster worker processes (results do not depend on it; default: this "
    "machine's CPUs, at most 8).", show_default=False, rich_help_panel=_RUN)]
Scheduler = Annotated[Optional[str], typer.Option(
    "--scheduler", help="Address of a running Dask scheduler (tcp://HOST:PORT) instead of a local cluster.",
    show_default=False, rich_help_panel=_RUN)]
Cache = Annotated[Optional[Path], typer.Option(
    "--cache", help="Folder keeping every finished replicate; a re-run resumes from it.", show_default=False,
    rich_help_panel=_RUN)]
Out = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help=f"Summary CSV (every estimate goes to <stem>{_ESTIMATES_SUFFIX} beside it); a name without "
    "suffix gets .csv; a .html name writes the report instead. Existing files are refused without --force.",
    show_default=False)]
Report = Annotated[Optional[Path], typer.Option(
    "--report", help="HTML report with power curves and type I error tables (.html added when missing).",
    show_default=False)]
Force = Annotated[bool, typer.Option("--force", help="Overwrite existing --out / --report files (and --out's "
                                     f"{_ESTIMATES_SUFFIX}).")]
Rendered = Annotated[int, typer.Option(
    "--rendered", min=0, max=MAX_RENDERED, help="Also render the first N replicates of each scenario (procedural "
    "backend, built-in faces) and analyse their image outcomes: the autoencoder/PCA score and the graders'. Costs "
    "about 3 s per rendered quick-design replicate (48 images at 128 px, counter) and about 50 s per anchor-design "
    "one (1400 images), per worker.", rich_help_panel=_RENDER)]
ImageSize = Annotated[Optional[int], typer.Option(
    "--size", help="Side of the rendered images in pixels (as generate --size), 128 (the least generate draws; the default) to "
    "1024.", show_default=False, rich_help_panel=_RENDER)]
AeEpochs = Annotated[Optional[int], typer.Option(
    "--ae-epochs", min=1, max=MAX_EPOCHS, help="Autoencoder training epochs per rendered replicate (default 3).",
    show_default=False, rich_help_panel=_RENDER)]
AeImageSize = Annotated[Optional[int], typer.Option(
    "--ae-image-size", help="Autoencoder input side, a power of two from 16 to --size (default 64).",
    show_default=False, rich_help_panel=_RENDER)]
RaterCounts = Annotated[Optional[list[int]], typer.Option(
    "--raters", min=1, max=100, help="Also let a simulated panel of K raters read each replicate's lesions (no "
    "rendering) and analyse their mean count, outcome rated_count_kK (repeatable: --raters 1 --raters 5; "
    "docs/raters.md).", show_default=False, rich_help_panel=_GRID)]
RaterPanel = Annotated[Optional[Path], typer.Option(
    "--panel", help="With --raters: the panel's parameters (JSON, as for rate --panel; default: docs/raters.md's).",
    show_default=False, rich_help_panel=_GRID)]
Graders = Annotated[Optional[list[GraderName]], typer.Option(
    "--grader", help="Grader scoring the rendered images (repeatable; default: counter; the detector adds ~10 s per "
    "quick replicate).", show_default=False, rich_help_panel=_RENDER)]


@app.command("power")
@handles_errors
def power_command(preset: Presets = None, design_file: DesignFiles = None, period_days: PeriodDays = None,
                  effect_scale: EffectScales = None, null: Null = False, effect: Effects = None,
                  patients: Patients = None, replicates: Replicates = 200, method: Methods = None,
                  outcome: Outcomes = None, alpha: Alpha = 0.05, trend: Trend = True, random_slopes: RandomSlopes = False,
                  estimate_kinetics: EstimateKinetics = False, workers: Workers = None, scheduler: Scheduler = None,
                  cache: Cache = None, seed: Seed = 0, out_path: Out = None, report: Report = None, force: Force = False,
                  rendered: Rendered = 0, image_size: ImageSize = None, ae_epochs: AeEpochs = None,
                  ae_image_size: AeImageSize = None, grader: Graders = None, grid: GridOption = None,
                  grid_table: GridTable = None, pooled_replicates: PooledReplicates = None,
                  raters: RaterCounts = None, panel: RaterPanel = None,
                  quiet: Quiet = False) -> None:
    """Type I error, power, bias and CI coverage of every analysis over grids of simulated trials.

    A scenario is one design x block length x effect scale; each replicate simulates a new trial and analyses the oracle severity and the lesion count (raw and standardised) with the per-patient tests (period-level, randomisation over the design's scheme, GLS-AR(1) with kinetics; descriptive: Welch, GLS-AR(1) with a step, Newey-West) and the pooled mixed model (CR2 and CR1). With --rendered N the first N replicates are also rendered, graded and embedded, so the image outcomes get power and a calibration slope too (their tests column counts those replicates). With --grid the scenarios are the size-and-coverage grid's cells, and a table per cell and method (role, size, power, coverage) checks every method labelled inferential. Runs on Dask; the result depends on --seed only.
    """
    from synthtrial.analyze.power import (DEFAULT_METHODS, POWER_OUTCOMES, StudySettings, power_study, scenario_grid,
                                          summarize_power)

    csv_path, html_path = _outputs(out_path, report, force)
    if cache is not None and cache.exists() and not cache.is_dir():
        raise SynthtrialError(f"{cache} is not a directory (option --cache)")
    table_path = _grid_table_path(grid, grid_table, force, preset=preset, design=design_file, period_days=period_days,
                                  effect_scale=effect_scale, null=null, effect=effect, patients=patients,
                                  rendered=rendered)
    if grid is not None:
        from synthtrial.analyze.grid import GRID_METHODS, grid_designs

        designs, scales = grid_designs(grid.value), [0.0, 1.0]
        default_methods, default_outcomes = GRID_METHODS, ("oracle",)
    else:
        designs, default_methods, default_outcomes = _designs(preset, design_file), DEFAULT_METHODS, POWER_OUTCOMES
        scales = [0.0] if null else (effect_scale or [1.0])
    effects = _effects(effect, designs)
    render = _render_settings(rendered, image_size=image_size, epochs=ae_epochs, ae_image_size=ae_image_size,
                              graders=tuple(g.value for g in grader) if grader else None)
    scenarios = scenario_grid(designs, period_days=period_days or (), effect_scales=scales, effects=effects,
                              n_patients=patients)
    settings = StudySettings(seed=seed, methods=tuple(m.value for m in method) if method else default_methods,
                             outcomes=tuple(o.value for o in outcome) if outcome else default_outcomes, alpha=alpha,
                             trend=trend, random_slopes=random_slopes, estimate_kinetics=estimate_kinetics,
                             rendered=render, **_rater_settings(raters, panel))
    pooled_reps = 0
    if grid is not None:
        from synthtrial.analyze.grid import GRID_POOLED_METHODS, pooled_replicates as default_pooled

        pooled_settings = dataclasses.replace(
            settings, methods=tuple(m for m in settings.methods if m in GRID_POOLED_METHODS))
        pooled_reps = (pooled_replicates or default_pooled(replicates)) if pooled_settings.methods else 0
        if pooled_reps < replicates:
            raise SynthtrialError(f"--pooled-replicates {pooled_reps} is below --replicates {replicates}")
    elif pooled_replicates is not None:
        raise SynthtrialError("--pooled-replicates needs --grid")
    run = dict(workers=workers or _default_workers(), scheduler=scheduler, cache=cache)
    with progress_bar("replicates", len(scenarios) * (replicates + pooled_reps), enabled=not quiet) as update:
        estimates, summary = power_study(scenarios, replicates=replicates, settings=settings, progress=update, **run)
        if pooled_reps:
            from synthtrial.analyze.grid import merge_pooled

            pooled_estimates = _pooled_grid_study(scenarios, estimates, pooled_reps, pooled_settings, update,
                                                  done=len(scenarios) * replicates, **run)
            estimates = merge_pooled(estimates, pooled_estimates)
            summary = merge_pooled(summary, summarize_power(pooled_estimates, settings.alpha))
    if grid is not None:
        _grid_outputs(summary, grid.value, table_path, replicates=replicates, seed=seed, alpha=alpha,
                      pooled_replicates=pooled_reps)
    else:
        _print_summary(summary, estimates, scenarios, replicates, alpha, rendered)
        if raters:
            out.print("rated_count_kK: the mean lesion count of K simulated raters reading each replicate's lesions "
                      "(docs/raters.md); calib: lesions per severity unit", soft_wrap=False)
    _write_outputs(csv_path, html_path, summary, estimates, settings, replicates, scenarios)


def _pooled_grid_study(scenarios, estimates, replicates: int, settings, update, *, done: int, **run):
    """The grid's pooled methods on ``replicates`` trials per scenario (the main study's trials reused), run in
    batches of scenarios that each stay within a power study's trial limit; every estimate."""
    import pandas as pd

    from synthtrial.analyze.grid import known_pooled, pooled_trials
    from synthtrial.analyze.power import power_study

    batch = max(1, MAX_TRIALS // replicates)
    trials = pooled_trials(estimates)      # grouped once, not once per batch
    frames = []
    for start in range(0, len(scenarios), batch):
        part = scenarios[start:start + batch]
        offset = done + start * replicates
        frame, _ = power_study(part, replicates=replicates, settings=settings,
                               known=known_pooled(trials, [s.name for s in part]),
                               progress=lambda n, total, text, o=offset: update(o + n, None, text), **run)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _grid_table_path(grid: GridName | None, table: Path | None, force: bool, **others) -> Path | None:
    """--grid-table's file, checked now; --grid refuses the options that make other scenarios (one line)."""
    if grid is None:
        if table is not None:
            raise SynthtrialError("--grid-table needs --grid")
        return None
    given = [name for name, value in others.items() if value]
    if given:
        raise SynthtrialError(f"--grid makes its own scenarios; drop --{given[0].replace('_', '-')}")
    return None if table is None else _output_path(table, "--grid-table", (".md",), force, companion=".csv")


def _grid_outputs(summary, grid: str, path: Path | None, *, replicates: int, seed: int, alpha: float,
                  pooled_replicates: int) -> None:
    """The grid table (written to ``path`` with its CSV, else printed) and the check's verdict."""
    from synthtrial.analyze.grid import MIN_COVERAGE, grid_table, grid_violations, write_grid

    table = grid_table(summary, alpha)
    if path is not None:
        written = write_grid(path, table, grid=grid, replicates=replicates, seed=seed, alpha=alpha,
                             pooled_trials=pooled_replicates)
        out.print(f"[green]wrote[/green] {written[0]} and {written[1]}")
    else:
        view = Table(title=f"grid {grid}: {replicates} null and {replicates} effect trials per cell",
                     box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False, collapse_padding=True, padding=(0, 1))
        for col in ("cell", "method", "size", "MC SE", "power", "cover"):
            view.add_column(col, justify="left" if col in ("cell", "method") else "right", no_wrap=True)
        for rec in table.itertuples(index=False):
            view.add_row(rec.cell, _marked(rec.method, rec.role), _num(rec.size, 3), _num(rec.size_mc_se, 3),
                         _num(rec.power, 3), _num(rec.coverage, 3))
        out.print(view)
        out.print("* descriptive on the cell by the role rules (not checked); † not available", soft_wrap=False)
    bad = grid_violations(table, alpha)
    inferential = int((table["role"] == "inferential").sum())
    if bad.empty:
        out.print(f"check: all {inferential} inferential rows hold (size <= {alpha:g} + 2 MC SE, coverage >= "
                  f"{MIN_COVERAGE:g})", soft_wrap=False)
    for rec in bad.itertuples(index=False):
        out.print(f"check FAILS: {rec.cell} {rec.method} ({rec.level}): {rec.check}", soft_wrap=False)


def _outputs(out_path: Path | None, report: Path | None, force: bool) -> tuple[Path | None, Path | None]:
    """The summary CSV and the HTML report to write, each checked before any work."""
    csv_path = html_path = None
    if out_path is not None:
        if out_path.suffix.lower() in (".html", ".htm"):
            html_path = _output_path(out_path, "--out", (".html", ".htm"), force)
        else:
            csv_path = _output_path(out_path, "--out", (".csv",), force, companion=_ESTIMATES_SUFFIX)
    if report is not None:
        html_path = _output_path(report, "--report", (".html", ".htm"), force)
    return csv_path, html_path


def _designs(preset: list[PresetName] | None, design_file: list[Path] | None) -> list[tuple]:
    """(name, design, model) of every --preset and --design (default: the quick preset)."""
    from synthtrial.analyze.power import design_from_file
    from synthtrial.trial.simulate import preset as get_preset

    designs = [(p.value, *get_preset(p.value)) for p in (preset or [])]
    designs += [(path.stem.removesuffix(".truth"), *design_from_file(path)) for path in (design_file or [])]
    return designs or [("quick", *get_preset("quick"))]


def _effects(effect: list[str] | None, designs: list[tuple]) -> dict[str, float] | None:
    """--effect ARM=NUMBER overrides, each naming an arm of some design."""
    from synthtrial.trial.simulate import parse_effects

    effects = parse_effects(effect) if effect else None
    known_arms = {arm for _, design, _ in designs for arm in design.arms}
    for arm in effects or {}:
        if arm not in known_arms:
            raise SynthtrialError(f"--effect {arm}=...: not an arm of any design ({', '.join(sorted(known_arms))})")
    return effects


def _rater_settings(raters: list[int] | None, panel: Path | None) -> dict:
    """StudySettings' rater fields for --raters and --panel (--panel needs --raters; the file is read now)."""
    if not raters:
        if panel is not None:
            raise SynthtrialError("--panel needs --raters K")
        return {}
    from synthtrial.grade.raters import load_panel

    return {"raters": tuple(raters), "panel": load_panel(panel)}


def _render_settings(rendered: int, **options):
    """The rendered replicates' settings (None without --rendered); a rendering option needs --rendered."""
    from synthtrial.analyze.power_render import RenderedSettings

    given = {k: v for k, v in options.items() if v is not None}
    if rendered == 0 and given:
        option = {"image_size": "--size", "epochs": "--ae-epochs", "ae_image_size": "--ae-image-size",
                  "graders": "--grader"}[next(iter(given))]
        raise SynthtrialError(f"{option} needs --rendered N (N >= 1 replicates to render)")
    return RenderedSettings(replicates=rendered, **given) if rendered else None


def _write_outputs(csv_path: Path | None, html_path: Path | None, summary, estimates, settings, replicates: int,
                   grid) -> None:
    if csv_path is not None:
        from synthtrial.util.atomic import write_text_atomic

        write_text_atomic(csv_path, summary.to_csv(index=False, lineterminator="\n"))
        estimates_path = csv_path.with_name(f"{csv_path.stem}{_ESTIMATES_SUFFIX}")
        write_text_atomic(estimates_path, estimates.to_csv(index=False, lineterminator="\n"))
        out.print(f"[green]wrote[/green] {csv_path} and {estimates_path}")
    if html_path is not None:
        from synthtrial.analyze.power_report import write_power_report

        write_power_report(html_path, summary, settings=settings, replicates=replicates,
                           scenarios=[s.name for s in grid])
        out.print(f"[green]wrote[/green] {html_path}")


def _print_summary(summary, estimates, grid, replicates: int, alpha: float, rendered: int = 0) -> None:
    """One table per scenario, each fitting 80 columns."""
    for scenario in grid:
        rows = summary[summary["scenario"] == scenario.name]
        if scenario.effect_scale == 0:
            effects = "null (all 0)"
        else:
            effects = ", ".join(f"{a} {v:+.2f}" for a, v in scenario.model.effects.items()) or "none"
        trials = f"{replicates} trials ({rendered} rendered)" if rendered else f"{replicates} trials"
        table = Table(title=f"{scenario.name}: {trials}, {scenario.design.n_patients} patients x "
                            f"{scenario.design.days_per_patient} d; effects {effects}", title_justify="left",
                      box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, padding=(0, 1))
        for col in ("method", "arm", "rate", "MC SE", "tests", "no p", "bias", "cover", "calib"):
            table.add_column(col, justify="left" if col in ("method", "arm") else "right", no_wrap=True)
        for k, (outcome_name, group) in enumerate(rows.groupby("outcome", sort=False)):
            if k:
                table.add_section()
            table.add_row(f"[bold]{short_outcome(outcome_name)}[/bold]")
            for rec in group.itertuples(index=False):
                table.add_row(" " + _marked(rec.method, rec.role), rec.arm, _num(rec.rejection_rate, 3),
                              _num(rec.mc_se, 3), str(rec.tests), str(rec.no_p), _num(rec.bias, 3, sign=True),
                              _num(rec.coverage, 2), _num(rec.calibration, 2))
        out.print(table)
        _print_familywise(rows, scenario)
    out.print(f"rate: share of tests with p < {alpha} (type I error where the effect is 0, else power); "
              "cover: 95% CI coverage of each method's own estimand (docs/analysis.md, Estimands); calib: median "
              "calibration slope (estimate regressed on the truth through 0; 1 = nothing lost on the severity "
              "scale); * descriptive only (not a valid test on these series); † not available: the design leaves "
              "the test no chance to reject (fixed order, or too few orders)", soft_wrap=False)
    if "familywise" in summary.columns:
        out.print(f"responders: share of trials in which at least one patient's test rejects at {alpha} with a "
                  "beneficial estimate (the family-wise error where the effect is 0), unadjusted and with Holm "
                  "and Benjamini-Hochberg adjustment across the trial's patients", soft_wrap=False)
    if rendered:
        from synthtrial.analyze.power_render import is_image_outcome

        names = [o for o in dict.fromkeys(summary["outcome"]) if is_image_outcome(o)]
        legend = ", ".join(f"{short_outcome(o)} = {o}" for o in names)
        out.print(f"image outcomes, from the first {rendered} replicate(s) of each scenario, rendered: {legend} "
                  "(AE-PCA: autoencoder + per-patient PCA; grader_*: a grader's column). They have no truth on "
                  "the severity scale: bias and cover are '-', calib is in their units per severity unit",
                  soft_wrap=False)
    lacking = estimates.loc[estimates["p"].isna(), ["method", "note"]]   # two columns, not the wide frame's rows
    for method_name, grp in lacking.groupby("method", sort=False):
        reason = grp["note"].astype(str).str.split(";").str[0].value_counts().index[0]
        out.print(f"no p-value for {len(grp)} {method_name} row(s), e.g.: {reason}")


def _print_familywise(rows, scenario) -> None:
    """Per outcome and per-patient inferential method: the share of trials with at least one responder call."""
    if "familywise" not in rows.columns:
        return
    chosen = rows[(rows["level"] == "per patient") & (rows["role"] == "inferential") & (rows["fw_trials"] > 0)]
    if chosen.empty:
        return
    what = ("family-wise error" if scenario.effect_scale == 0 else "share of trials") + " with a responder call"
    table = Table(title=f"{scenario.name}: {what}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, padding=(0, 1))
    for col in ("outcome", "method", "arm", "trials", "unadj.", "Holm", "BH"):
        table.add_column(col, justify="left" if col in ("outcome", "method", "arm") else "right", no_wrap=True)
    for rec in chosen.itertuples(index=False):
        table.add_row(short_outcome(rec.outcome), rec.method, rec.arm, str(rec.fw_trials), _num(rec.familywise, 3),
                      _num(rec.familywise_holm, 3), _num(rec.familywise_bh, 3))
    out.print(table)


def _marked(method: str, role: str) -> str:
    """A method's name with its role's mark: ``*`` descriptive, ``†`` not available, none for inferential."""
    from synthtrial.analyze.estimators import DESCRIPTIVE, NOT_AVAILABLE  # the statistics stack loads when used

    return method + {DESCRIPTIVE: "*", NOT_AVAILABLE: "†"}.get(role, "")


def _num(value: float, digits: int, sign: bool = False) -> str:
    if value != value:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"
