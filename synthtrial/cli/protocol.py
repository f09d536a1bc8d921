"""`synthtrial protocol check|design`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from synthtrial.util.errors import SynthtrialError
from synthtrial.cli.common import PresetName, Seed, handles_errors, out, protocol_app
from synthtrial.cli.jsonout import emit, json_option
from synthtrial.trial.protocol import MAX_DAY, MAX_DAY_SPAN, MAX_ROWS
from synthtrial.trial.simulate import (MAX_BLOCKS, MAX_PATIENTS, MAX_PERIOD_DAYS, MAX_SD, MAX_TREND_PER_DAY,
                                       MAX_WASHOUT_DAYS, PRESET_HELP, PRESETS)


@protocol_app.command("check")
@handles_errors
def protocol_check(
    file: Annotated[Path, typer.Argument(help="Protocol CSV, in the native or the anchor form.",
                                         show_default=False)],
    as_json: json_option("the summary") = False,
) -> None:
    """Validate a protocol CSV and summarise it: patients, days, treatments, blocks, severity range.

    Both forms are read: the anchor form of synthetic_acne_images ([italic],patient_id,date,block,day,treatment,AcneSeverity[/]) and the native form ([italic]patient_id,day,date,treatment,block,severity,view,face[/], the last four optional). Any problem is reported as one line naming the file, the row (as a spreadsheet numbers it) and the column, with exit status 2.

    --json keys: [bold]source[/], [bold]form[/] (native or anchor), [bold]rows[/], [bold]patients[/], [bold]patient_ids[/], [bold]days_per_patient[/] ({min, max}), [bold]day_range[/] and [bold]date_range[/] (first and last; dates null without dates), [bold]treatments[/] (rows per treatment), [bold]blocks[/], [bold]views[/], [bold]severity[/] ({min, max, mean}, null without severities), [bold]acne04_levels[/] (rows per level, null without severities), [bold]faces[/].
    """
    from synthtrial.trial.protocol import read_protocol, summarize

    summary = summarize(read_protocol(file))
    if as_json:
        emit(summary)
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


_DESIGN_PANEL = "Schedule"
_MODEL_PANEL = "Severity model"


def _preset_values(field: str, part: int) -> str:
    """What ``--preset`` gives a schedule (``part`` 0) or severity-model (``part`` 1) option, per preset."""
    def show(value) -> str:
        if isinstance(value, bool):
            return "random" if value else "fixed"
        if isinstance(value, dict):
            return " ".join(f"{k}={v:g}" for k, v in value.items()) or "none"
        if isinstance(value, tuple):
            return ",".join(value)
        return f"{value:g}" if isinstance(value, float) else str(value)

    return "from --preset: " + "; ".join(f"{name} {show(getattr(PRESETS[name][part], field))}" for name in PRESETS)


def _schedule(help: str, field: str, **limits) -> typer.models.OptionInfo:
    return typer.Option(help=help, rich_help_panel=_DESIGN_PANEL, show_default=_preset_values(field, 0), **limits)


def _model(help: str, field: str) -> typer.models.OptionInfo:
    return typer.Option(help=help, rich_help_panel=_MODEL_PANEL, show_default=_preset_values(field, 1))


_PRESET_HELP = "Start from a ready-made trial; every other option overrides it. " + " ".join(
    f"{name}: {text}." for name, text in PRESET_HELP.items()) + (
    " Both presets keep a fixed order of periods (pass --randomize to draw it per patient); the shipped "
    "protocols/trial.csv and protocols/quick.csv are --preset anchor and --preset quick with --seed 0.")


_DESIGN_HELP = f"""Design an N-of-1 trial and simulate every patient's acne severity, keeping the truth.

    Writes the protocol CSV and [italic]<stem>.truth.json[/] (every parameter, every patient's baseline, true effects and delivered effects). Severity on day d is baseline + trend + effects (with first-order wash-in, washout and carryover) + AR(1) noise, clipped to the 0-3 scale.

    Limits (refused before any work): each option's range as shown; a patient's schedule spans at most {MAX_DAY_SPAN + 1} days and ends by day {MAX_DAY}; patients x days at most {MAX_ROWS:,} rows.

    Examples:

      synthtrial protocol design --out trial.csv

      synthtrial protocol design --preset quick --seed 3 --out quick.csv

      synthtrial protocol design --design pairs --arms Control,Cream --blocks 3 --period-days 7 --effect Cream=-0.4 --patients 20 --out pairs.csv

    The schedule and severity-model options default to the chosen preset's values (each option lists them). --design pairs draws each pair's order (AB or BA) per patient unless --fixed-order is given, so the randomisation test has orders to permute; the presets themselves are fixed-order.
    """


@protocol_app.command("design", help=_DESIGN_HELP)
@handles_errors
def protocol_design(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Protocol CSV to write; its truth goes to "
                                           "<stem>.truth.json beside it.", show_default=False)],
    preset: Annotated[PresetName, typer.Option(help=_PRESET_HELP)] = PresetName("anchor"),
    seed: Seed = 0,
    form: Annotated[Form, typer.Option(help="native, or anchor for the synthetic_acne_images layout.")] = Form.native,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
    design: Annotated[Optional[DesignName], _schedule(
        "baseline-alternating: a reference period, then the active arms in turn; abab: the two arms "
        "alternate; pairs: blocks of two periods, AB or BA.", "design")] = None,
    arms: Annotated[Optional[str], _schedule("Comma-separated treatment names, reference (control/baseline) "
                                             "first.", "arms")] = None,
    patients: Annotated[Optional[int], _schedule("Number of patients.", "n_patients", min=1, max=MAX_PATIENTS)] = None,
    blocks: Annotated[Optional[int], _schedule("Periods (pairs of periods for the pairs design).", "blocks", min=1,
                                               max=MAX_BLOCKS)] = None,
    period_days: Annotated[Optional[int], _schedule("Days in one treatment period.", "period_days", min=1,
                                                    max=MAX_PERIOD_DAYS)] = None,
    washout_days: Annotated[Optional[int], _schedule("Washout days between periods (treatment 'Washout', no "
                                                     "block).", "washout_days", min=0, max=MAX_WASHOUT_DAYS)] = None,
    randomize: Annotated[Optional[bool], typer.Option(
        "--randomize/--fixed-order", help="Draw the order of periods per patient (which arm starts abab, each "
        "pair's order, the order of the active arms' cycle), or keep the design's fixed order.",
        show_default="random with --design pairs; else " + _preset_values("randomize", 0),
        rich_help_panel=_DESIGN_PANEL)] = None,
    start_date: Annotated[Optional[str], _schedule("Date of the first day (YYYY-MM-DD).", "start_date")] = None,
    first_day: Annotated[Optional[int], _schedule("Number of the first day (the anchor uses 1).", "first_day", min=0,
                                                  max=MAX_DAY)] = None,
    effect: Annotated[Optional[list[str]], _model(
        "Population effect of an arm on severity (0-3 scale; negative improves), as ARM=NUMBER; repeat per arm. "
        "Arms not named have no effect.", "effects")] = None,
    effect_sd: Annotated[Optional[float], _model(f"SD of each patient's own effect around it (0-{MAX_SD:g}).", "effect_sd")]
    = None,
    baseline_mean: Annotated[Optional[float], _model("Mean baseline severity.", "baseline_mean")] = None,
    baseline_sd: Annotated[Optional[float], _model(f"SD of baseline severity between patients (0-{MAX_SD:g}).", "baseline_sd")]
    = None,
    baseline_min: Annotated[Optional[float], _model("Lowest baseline (the normal is truncated).", "baseline_min")] = None,
    baseline_max: Annotated[Optional[float], _model("Highest baseline.", "baseline_max")] = None,
    trend: Annotated[Optional[float], _model(f"Linear trend in severity per day (at most {MAX_TREND_PER_DAY:g} "
                                             "either way).", "trend_per_day")] = None,
    washin_half_life: Annotated[Optional[float], _model("Days for a treatment to reach half its effect (0: at "
                                                        "once).", "washin_half_life")] = None,
    washout_half_life: Annotated[Optional[float], _model("Days for an effect to halve after stopping (carryover; "
                                                         "0: at once).", "washout_half_life")] = None,
    ar_phi: Annotated[Optional[float], _model("AR(1) autocorrelation of day-to-day noise.", "ar_phi")] = None,
    noise_sd: Annotated[Optional[float], _model(f"Stationary SD of the day-to-day noise (0-{MAX_SD:g}).", "noise_sd")] = None,
    missing_rate: Annotated[Optional[float], _model("Chance that a day is missing (dropped).", "missing_rate")] = None,
) -> None:
    """Design an N-of-1 trial and simulate its severities (the --help text is _DESIGN_HELP)."""
    from synthtrial.trial.simulate import design_with_overrides, parse_effects

    trial_design, model = design_with_overrides(preset.value, {
        "design": design.value if design else None,
        "arms": tuple(a.strip() for a in arms.split(",")) if arms is not None else None,
        "n_patients": patients, "blocks": blocks, "period_days": period_days, "washout_days": washout_days,
        "randomize": randomize, "start_date": start_date, "first_day": first_day,
    }, {
        "effects": parse_effects(effect) if effect else None,
        "effect_sd": effect_sd, "baseline_mean": baseline_mean, "baseline_sd": baseline_sd,
        "baseline_min": baseline_min, "baseline_max": baseline_max, "trend_per_day": trend,
        "washin_half_life": washin_half_life, "washout_half_life": washout_half_life, "ar_phi": ar_phi,
        "noise_sd": noise_sd, "missing_rate": missing_rate,
    })
    _write_trial(trial_design, model, out_path, seed=seed, form=form.value, force=force)


def _write_trial(trial_design, model, out_path: Path, *, seed: int, form: str, force: bool) -> None:
    """Simulate the trial and write its protocol and truth, refusing files that exist unless ``force``."""
    from synthtrial.trial.simulate import simulate_trial, truth_path_for
    from synthtrial.util.atomic import check_writable

    check_writable(out_path)
    truth_path = truth_path_for(out_path)
    if not force:
        for p in (out_path, truth_path):
            if p.exists():
                raise SynthtrialError(f"{p} already exists; pass --force to replace it (option --out)")
    if out_path.exists() and out_path.is_dir():
        raise SynthtrialError(f"{out_path} is a directory (option --out)")
    trial = simulate_trial(trial_design, model, seed=seed)
    trial.write(out_path, form=form)
    truth = trial.truth
    out.print(f"[green]wrote[/green] {out_path} ({len(trial.protocol)} rows, {trial_design.n_patients} patients "
              f"x {trial_design.days_per_patient} days) and {truth_path}")
    effects = ", ".join(f"{a} {v:+.3f} (delivered {truth['mean_delivered_effects'][a]:+.3f})"
                        for a, v in truth["population_effects"].items())
    out.print(f"true effects vs {truth['reference']}: {effects or 'none'}")
