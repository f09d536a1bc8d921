"""`synthtrial power`: type I error and power over simulated trials."""

from __future__ import annotations

import dataclasses
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from synthtrial.cli.common import PresetName, app, handles_errors, out
from synthtrial.errors import SynthtrialError
from synthtrial.progress import progress_bar

class PowerMethod(str, Enum):
    welch = "welch"
    permutation = "permutation"
    gls_ar1 = "gls_ar1"
    lmm = "lmm"


class PowerOutcome(str, Enum):
    oracle = "oracle"
    lesion_severity = "lesion_severity"


@app.command("power")
@handles_errors
def power_command(
    design_file: Annotated[Optional[Path], typer.Option("--design", help="A truth file written by [bold]protocol "
                                                        "design[/] (its design and severity model are reused).",
                                                        show_default=False)] = None,
    preset: Annotated[Optional[PresetName], typer.Option(help="A ready-made design instead of --design.",
                                                         show_default=False)] = None,
    replicates: Annotated[int, typer.Option(min=1, help="Simulated trials.")] = 200,
    null: Annotated[bool, typer.Option("--null", help="Set every effect (and its spread) to zero: rejection rates "
                                       "are type I errors.")] = False,
    effect: Annotated[Optional[list[str]], typer.Option(help="Override an arm's population effect, ARM=NUMBER "
                                                        "(repeatable).")] = None,
    patients: Annotated[Optional[int], typer.Option(min=1, help="Override the number of patients.")] = None,
    alpha: Annotated[float, typer.Option(help="Significance level.")] = 0.05,
    trend: Annotated[bool, typer.Option("--trend/--no-trend", help="Adjust for a linear time trend.")] = True,
    method: Annotated[Optional[list[PowerMethod]], typer.Option(help="Tests to run (repeatable; default: welch, "
                                                                "gls_ar1, lmm).", show_default=False)] = None,
    outcome: Annotated[Optional[list[PowerOutcome]], typer.Option(help="Outcomes (repeatable; default: both).",
                                                                  show_default=False)] = None,
    random_intercept: Annotated[bool, typer.Option("--random-intercept", help="Pooled model with a random "
                                                   "intercept only (faster; no random treatment slopes).")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Processes (the result does not depend on it).")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the replicates.")] = 0,
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the summary CSV here (every "
                                                     "estimate goes to <stem>.estimates.csv beside it).",
                                                     show_default=False)] = None,
) -> None:
    """Type I error and power of every analysis over many simulated trials (no rendering needed).

    Each replicate simulates a new trial from the design and analyses the oracle severity and the lesion count the lesion model would draw, with per-patient Welch t and GLS-AR(1) tests and the pooled mixed model. Rejection rates come with their Monte-Carlo standard error.
    """
    from synthtrial.analyze.power import DEFAULT_METHODS, POWER_OUTCOMES, design_from_file, power_study, with_effects
    from synthtrial.simulate import parse_effects, preset as get_preset

    if design_file is not None and preset is not None:
        raise SynthtrialError("give --design or --preset, not both")
    design, model = design_from_file(design_file) if design_file else get_preset((preset or PresetName.quick).value)
    if patients is not None:
        design = dataclasses.replace(design, n_patients=patients)
    model = with_effects(model, parse_effects(effect) if effect else None, null=null)
    for arm in model.effects:
        if arm not in design.arms:
            raise SynthtrialError(f"--effect {arm}=...: not an arm of the design ({', '.join(design.arms)})")
    if out_path is not None and out_path.is_dir():
        raise SynthtrialError(f"{out_path} is a directory (option --out)")
    with progress_bar("replicates", replicates) as update:
        estimates, summary = power_study(
            design, model, replicates, seed=seed, workers=workers, alpha=alpha, trend=trend,
            methods=[m.value for m in method] if method else DEFAULT_METHODS,
            outcomes=[o.value for o in outcome] if outcome else POWER_OUTCOMES, random_slopes=not random_intercept,
            on_replicate=lambda done, total: update(done))
    table = Table(title=f"{replicates} simulated trials, {design.n_patients} patients x {design.days_per_patient} days, "
                        f"alpha {alpha}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for col in ("outcome", "test", "arm", "effect", "rate", "of", "MC SE", "bias", "cover"):
        table.add_column(col, justify="left" if col in ("outcome", "test", "arm", "of") else "right", no_wrap=True)
    for rec in summary.itertuples(index=False):
        table.add_row(rec.outcome, rec.method if rec.level == "pooled" else f"{rec.method}/pt", rec.arm,
                      f"{rec.population_effect:+.2f}", f"{rec.rejection_rate:.3f}",
                      "type I" if rec.quantity == "type I error" else "power", f"{rec.mc_se:.3f}",
                      f"{rec.bias:+.3f}", "" if rec.coverage != rec.coverage else f"{rec.coverage:.2f}")
    out.print(table)
    out.print("rate: share of tests rejecting at alpha (type I error where the effect is 0, else power); "
              "/pt: one test per patient")
    if out_path is not None:
        from synthtrial.atomic import write_text_atomic

        write_text_atomic(out_path, summary.to_csv(index=False, lineterminator="\n"))
        estimates_path = out_path.with_name(f"{out_path.stem}.estimates.csv")
        write_text_atomic(estimates_path, estimates.to_csv(index=False, lineterminator="\n"))
        out.print(f"[green]wrote[/green] {out_path} and {estimates_path}")
