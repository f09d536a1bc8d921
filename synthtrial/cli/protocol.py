"""`synthtrial protocol check|design`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from synthtrial.util.errors import SynthtrialError
from synthtrial.cli.common import Seed, app, handles_errors, out, PresetName, protocol_app


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
    from synthtrial.trial.protocol import read_protocol, summarize

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
    seed: Seed = 0,
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
    from synthtrial.trial.simulate import design_with_overrides, parse_effects, simulate_trial, truth_path_for

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
    trial.write(out_path, form=form.value)
    truth = trial.truth
    out.print(f"[green]wrote[/green] {out_path} ({len(trial.protocol)} rows, {trial_design.n_patients} patients "
              f"x {trial_design.days_per_patient} days) and {truth_path}")
    effects = ", ".join(f"{a} {v:+.3f} (delivered {truth['mean_delivered_effects'][a]:+.3f})"
                        for a, v in truth["population_effects"].items())
    out.print(f"true effects vs {truth['reference']}: {effects or 'none'}")
