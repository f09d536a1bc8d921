"""The ``synthtrial`` command line: a thin layer over the library, one public function per command.

Bad input ends with one line on stderr (``synthtrial: error: FILE: row N, column 'C': ...``) and exit
status 2; nothing is half-written.
"""

from __future__ import annotations

import functools
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

try:  # typer vendors click from 0.2x on; older releases raise click's own exceptions
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from rich.table import Table

from synthtrial import __version__
from synthtrial.errors import SynthtrialError

EXIT_BAD_INPUT = 2


class OneLineErrors(TyperGroup):
    """Usage errors (bad option values, unknown options) as one line on stderr and exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            exc.show()  # a bare command prints its help
            sys.exit(exc.exit_code)
        except UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            print(f"synthtrial: error: {' '.join(exc.format_message().split())}{hint}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        except ClickException as exc:
            print(f"synthtrial: error: {' '.join(exc.format_message().split())}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("synthtrial: aborted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    name="synthtrial",
    help="Simulate multimodal N-of-1 acne trials: protocols, patients' acne courses and the truth behind "
         "them, so that graders and analysis pipelines can be tested against a known answer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
protocol_app = typer.Typer(
    help="Check, design and simulate trial protocols (the CSV files that [bold]generate[/] reads).",
    no_args_is_help=True,
)
app.add_typer(protocol_app, name="protocol")

out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str) -> None:
    err.print(f"synthtrial: error: {message}", markup=False)
    raise typer.Exit(EXIT_BAD_INPUT)


def handles_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`SynthtrialError` into one line on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SynthtrialError as exc:
            _fail(str(exc))

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"synthtrial {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Simulate multimodal N-of-1 acne trials with a known truth.

    Start with [bold]synthtrial protocol design --preset quick --out quick.csv[/], then
    [bold]synthtrial protocol check quick.csv[/].
    """


# --------------------------------------------------------------------------------------------- scale

@app.command("scale")
@handles_errors
def scale_command(
    severity: Annotated[Optional[list[float]], typer.Argument(
        help="Latent severities (0-3) to look up; default: a table from 0 to 3 in steps of 0.25.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON records instead of a table.")] = False,
) -> None:
    """Show the severity scale: latent severity -> expected lesions -> ACNE04 level -> IGA.

    The scale is a modelling assumption: lesion counts are piecewise linear through (0, 0), (0.5, 5.5), (1.5, 20.5), (2.5, 50.5), (3, 65); ACNE04 levels follow Hayashi's counts (<=5, 6-20, 21-50, >50); IGA follows the inflammatory lesions the lesion mix expects.
    """
    from synthtrial.scale import SEVERITY_MAX, SEVERITY_MIN, scale_table

    for s in severity or []:
        if not SEVERITY_MIN <= s <= SEVERITY_MAX:
            raise SynthtrialError(f"severity {s:g} is outside the scale 0-3 (argument SEVERITY)")
    table = scale_table(severity or None)
    if as_json:
        out.print_json(data=table.to_dict(orient="records"))
        return
    view = Table(title="synthtrial severity scale (a modelling assumption)")
    for name in ("severity", "lesions", "inflam.", "ACNE04", "IGA", "3-class"):
        view.add_column(name, no_wrap=True, justify="right" if name in ("severity", "lesions", "inflam.") else "left")
    for rec in table.itertuples(index=False):
        view.add_row(f"{rec.severity:g}", f"{rec.expected_lesions:g}", f"{rec.inflammatory_fraction:.0%}",
                     f"{rec.acne04_level} {rec.acne04_name}", f"{rec.iga} {rec.iga_name}", str(rec.iga_group))
    out.print(view)


# ------------------------------------------------------------------------------------------ protocol

@protocol_app.command("check")
@handles_errors
def protocol_check(
    file: Annotated[Path, typer.Argument(help="Protocol CSV, in the native or the anchor form.",
                                         show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Validate a protocol CSV and summarise it: patients, days, treatments, blocks, severity range.

    Both forms are read: the anchor form of synthetic_acne_images ([italic],patient_id,date,block,day,treatment,AcneSeverity[/]) and the native form ([italic]patient_id,day,date,treatment,block,severity,view,face[/], the last four optional). Any problem is reported as one line naming the file, the row (as a spreadsheet numbers it) and the column, with exit status 2.
    """
    from synthtrial.protocol import read_protocol, summarize

    summary = summarize(read_protocol(file))
    if as_json:
        out.print_json(data=summary)
        return
    table = Table(title=f"{file}  ({summary['form']} form)", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    ids = summary["patient_ids"]
    table.add_row("patients", f"{summary['patients']}  ({', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''})")
    table.add_row("rows", str(summary["rows"]))
    dpp = summary["days_per_patient"]
    table.add_row("days per patient", str(dpp["min"]) if dpp["min"] == dpp["max"] else f"{dpp['min']}-{dpp['max']}")
    table.add_row("day range", "{} - {}".format(*summary["day_range"]))
    if summary["date_range"]:
        table.add_row("dates", "{} - {}".format(*summary["date_range"]))
    table.add_row("treatments", ", ".join(f"{k} ({v} rows)" for k, v in summary["treatments"].items()))
    table.add_row("blocks", ", ".join(map(str, summary["blocks"])) or "-")
    table.add_row("views", ", ".join(summary["views"]))
    if summary["severity"]:
        sev = summary["severity"]
        table.add_row("severity", f"{sev['min']:.3f} - {sev['max']:.3f} (mean {sev['mean']:.3f})")
        table.add_row("ACNE04 levels", ", ".join(f"{k}: {v}" for k, v in summary["acne04_levels"].items()))
    else:
        table.add_row("severity", "not given: the trial simulator will fill it in")
    out.print(table)
    out.print("[green]OK[/green]")


class Form(str, Enum):
    native = "native"
    anchor = "anchor"


class DesignName(str, Enum):
    baseline_alternating = "baseline-alternating"
    abab = "abab"
    pairs = "pairs"


class PresetName(str, Enum):
    anchor = "anchor"
    quick = "quick"


def _parse_effects(values: list[str]) -> dict[str, float]:
    effects: dict[str, float] = {}
    for item in values:
        arm, sep, number = item.partition("=")
        arm = arm.strip()
        if not sep or not arm:
            raise SynthtrialError(f"--effect '{item}' must look like ARM=NUMBER, e.g. --effect Cream=-0.5")
        try:
            effects[arm] = float(number)
        except ValueError:
            raise SynthtrialError(f"--effect '{item}': '{number}' is not a number") from None
    return effects


_DESIGN_PANEL = "Schedule"
_MODEL_PANEL = "Severity model"


@protocol_app.command("design")
@handles_errors
def protocol_design(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Protocol CSV to write; its truth goes to "
                                           "<stem>.truth.json beside it.", show_default=False)],
    preset: Annotated[PresetName, typer.Option(help="Start from a ready-made trial; every other option "
                                               "overrides it. anchor: 10 x 140 days, Baseline / Antibiotics / "
                                               "Cream in 28-day periods. quick: 3 x 16 days, Fu et al.'s "
                                               "2-off / 2-on blocks.")] = PresetName.anchor,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same bytes.")] = 0,
    form: Annotated[Form, typer.Option(help="native, or anchor for the synthetic_acne_images layout.")] = Form.native,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
    design: Annotated[Optional[DesignName], typer.Option(
        help="baseline-alternating: a reference period, then the active arms in turn; abab: the two arms "
             "alternate; pairs: blocks of two periods, AB or BA.", rich_help_panel=_DESIGN_PANEL)] = None,
    arms: Annotated[Optional[str], typer.Option(
        help="Comma-separated treatment names, reference (control/baseline) first.",
        rich_help_panel=_DESIGN_PANEL)] = None,
    patients: Annotated[Optional[int], typer.Option(min=1, help="Number of patients.",
                                                    rich_help_panel=_DESIGN_PANEL)] = None,
    blocks: Annotated[Optional[int], typer.Option(min=1, help="Periods (pairs of periods for the pairs design).",
                                                  rich_help_panel=_DESIGN_PANEL)] = None,
    period_days: Annotated[Optional[int], typer.Option(min=1, help="Days in one treatment period.",
                                                       rich_help_panel=_DESIGN_PANEL)] = None,
    washout_days: Annotated[Optional[int], typer.Option(min=0, help="Washout days between periods "
                                                        "(treatment 'Washout', no block).",
                                                        rich_help_panel=_DESIGN_PANEL)] = None,
    randomize: Annotated[Optional[bool], typer.Option(
        "--randomize/--fixed-order", help="Draw the order of periods per patient.",
        rich_help_panel=_DESIGN_PANEL)] = None,
    start_date: Annotated[Optional[str], typer.Option(help="Date of the first day (YYYY-MM-DD).",
                                                      rich_help_panel=_DESIGN_PANEL)] = None,
    first_day: Annotated[Optional[int], typer.Option(min=0, help="Number of the first day (the anchor uses 1).",
                                                     rich_help_panel=_DESIGN_PANEL)] = None,
    effect: Annotated[Optional[list[str]], typer.Option(
        help="Population effect of an arm on severity (0-3 scale; negative improves), as ARM=NUMBER; "
             "repeat per arm. Arms not named have no effect.", rich_help_panel=_MODEL_PANEL)] = None,
    effect_sd: Annotated[Optional[float], typer.Option(help="SD of each patient's own effect around it.",
                                                       rich_help_panel=_MODEL_PANEL)] = None,
    baseline_mean: Annotated[Optional[float], typer.Option(help="Mean baseline severity.",
                                                           rich_help_panel=_MODEL_PANEL)] = None,
    baseline_sd: Annotated[Optional[float], typer.Option(help="SD of baseline severity between patients.",
                                                         rich_help_panel=_MODEL_PANEL)] = None,
    baseline_min: Annotated[Optional[float], typer.Option(help="Lowest baseline (the normal is truncated).",
                                                          rich_help_panel=_MODEL_PANEL)] = None,
    baseline_max: Annotated[Optional[float], typer.Option(help="Highest baseline.",
                                                          rich_help_panel=_MODEL_PANEL)] = None,
    trend: Annotated[Optional[float], typer.Option(help="Linear trend in severity per day.",
                                                   rich_help_panel=_MODEL_PANEL)] = None,
    washin_half_life: Annotated[Optional[float], typer.Option(
        help="Days for a treatment to reach half its effect (0: at once).", rich_help_panel=_MODEL_PANEL)] = None,
    washout_half_life: Annotated[Optional[float], typer.Option(
        help="Days for an effect to halve after stopping (carryover; 0: at once).",
        rich_help_panel=_MODEL_PANEL)] = None,
    ar_phi: Annotated[Optional[float], typer.Option(help="AR(1) autocorrelation of day-to-day noise.",
                                                    rich_help_panel=_MODEL_PANEL)] = None,
    noise_sd: Annotated[Optional[float], typer.Option(help="Stationary SD of the day-to-day noise.",
                                                      rich_help_panel=_MODEL_PANEL)] = None,
    missing_rate: Annotated[Optional[float], typer.Option(help="Chance that a day is missing (dropped).",
                                                          rich_help_panel=_MODEL_PANEL)] = None,
) -> None:
    """Design an N-of-1 trial and simulate every patient's acne severity, keeping the truth.

    Writes the protocol CSV and [italic]<stem>.truth.json[/] (every parameter, every patient's baseline, true effects and delivered effects). Severity on day d is baseline + trend + effects (with first-order wash-in, washout and carryover) + AR(1) noise, clipped to the 0-3 scale.

    Examples:

      synthtrial protocol design --out trial.csv

      synthtrial protocol design --preset quick --seed 3 --out quick.csv

      synthtrial protocol design --design pairs --arms Control,Cream --blocks 3 --period-days 7
      --effect Cream=-0.4 --patients 20 --out pairs.csv
    """
    from synthtrial.simulate import SeverityModel, TrialDesign, preset as get_preset, simulate_trial, truth_path_for

    base_design, base_model = get_preset(preset.value)
    design_changes = {k: v for k, v in {
        "design": design.value if design else None,
        "arms": tuple(a.strip() for a in arms.split(",")) if arms is not None else None,
        "n_patients": patients, "blocks": blocks, "period_days": period_days, "washout_days": washout_days,
        "randomize": randomize, "start_date": start_date, "first_day": first_day,
    }.items() if v is not None}
    model_changes = {k: v for k, v in {
        "effects": _parse_effects(effect) if effect else None,
        "effect_sd": effect_sd, "baseline_mean": baseline_mean, "baseline_sd": baseline_sd,
        "baseline_min": baseline_min, "baseline_max": baseline_max, "trend_per_day": trend,
        "washin_half_life": washin_half_life, "washout_half_life": washout_half_life, "ar_phi": ar_phi,
        "noise_sd": noise_sd, "missing_rate": missing_rate,
    }.items() if v is not None}
    if "arms" in design_changes and "effects" not in model_changes:
        # the preset's effects name the preset's arms; keep those that still exist
        model_changes["effects"] = {a: v for a, v in base_model.effects.items() if a in design_changes["arms"]}
    trial_design = TrialDesign(**{**_fields(base_design), **design_changes})
    model = SeverityModel(**{**_fields(base_model), **model_changes})

    truth_path = truth_path_for(out_path)
    if not force:
        for p in (out_path, truth_path):
            if p.exists():
                raise SynthtrialError(f"{p} already exists; pass --force to replace it (option --out)")
    if out_path.exists() and out_path.is_dir():
        raise SynthtrialError(f"{out_path} is a directory (option --out)")
    trial = simulate_trial(trial_design, model, seed=seed)
    trial.write(out_path, form=form.value)
    truth = trial.truth
    out.print(f"[green]wrote[/green] {out_path} ({len(trial.protocol)} rows, {trial_design.n_patients} patients "
              f"x {trial_design.days_per_patient} days) and {truth_path}")
    effects = ", ".join(f"{a} {v:+.3f} (delivered {truth['mean_delivered_effects'][a]:+.3f})"
                        for a, v in truth["population_effects"].items())
    out.print(f"true effects vs {truth['reference']}: {effects or 'none'}")


# ------------------------------------------------------------------------------------------ generate

class Naming(str, Enum):
    native = "native"
    anchor = "anchor"


@app.command("generate")
@handles_errors
def generate_command(
    protocol: Annotated[Path, typer.Argument(help="Protocol CSV (native or anchor form).")] = Path("protocols/trial.csv"),
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory to write "
                                                    "(default: runs/<protocol name>).", show_default=False)] = None,
    faces: Annotated[Optional[Path], typer.Option(help="Folder of frontal portraits to use as patients' faces "
                                                  "(e.g. ACNE04 level-0 images); default: the public-domain "
                                                  "portraits shipped with scikit-image and matplotlib.",
                                                  show_default=False)] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed: the same seed writes the same bytes.")] = 0,
    size: Annotated[int, typer.Option(min=128, max=4096, help="Image side in pixels.")] = 512,
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering in parallel (does not change the "
                                         "result).")] = 1,
    naming: Annotated[Naming, typer.Option(help="native: <patient>_<YYYYMMDD>_<view>.png; anchor: "
                                           "synthetic_acne_images' <patient>_<YYYYMMDD>_severity_<N>.png.")]
    = Naming.native,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Render a protocol into a run directory: an image series per patient with exact lesion ground truth.

    Every lesion is a persistent object with a life course, drawn at the same anatomical spot every day; the lesion count follows the protocol's severity through the severity scale ([bold]synthtrial scale[/]). Patients beyond the number of portraits get a distinct skin type, geometry, lighting and framing.

    Writes images/, masks/ (16-bit instance maps), manifest.parquet (+ .csv), lesions.parquet, config.json, truth.json and grids/ (a contact sheet per patient). Re-run the same command to resume an interrupted run: the result is byte-identical to an uninterrupted one.
    """
    from synthtrial.run import generate

    run_dir = generate(protocol, out_dir, faces_dir=faces, seed=seed, size=size, naming=naming.value,
                       workers=workers, progress=not quiet)
    out.print(f"[green]wrote[/green] {run_dir}  (look at {run_dir / 'grids'})")


# -------------------------------------------------------------------------------------------- export

class ExportFormat(str, Enum):
    coco = "coco"
    acne04 = "acne04"
    imagefolder = "imagefolder"


@app.command("export")
@handles_errors
def export_command(
    run: Annotated[Path, typer.Argument(help="A run directory written by [bold]synthtrial generate[/].",
                                        show_default=False)],
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="coco: detection JSON of the lesion boxes "
                                              "and masks; acne04: ACNE04 label lines (filename level count) "
                                              "with patient-wise folds; imagefolder: a Hugging Face imagefolder "
                                              "with metadata.csv.", show_default=False)],
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write (default: "
                                                    "RUN/exports/<format>).", show_default=False)] = None,
    folds: Annotated[int, typer.Option(min=2, help="Folds for the acne04 format (split by patient).")] = 5,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the patient-to-fold assignment.")] = 0,
) -> None:
    """Export a run's images and ground truth to a grader's training format."""
    from synthtrial.export import export_run

    path = export_run(run, fmt.value, out_dir, folds=folds, seed=seed)
    out.print(f"[green]wrote[/green] {path}")


def _fields(obj: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
