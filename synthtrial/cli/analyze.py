"""`synthtrial analyze`: treatment effects from a run, beside the truth."""

from __future__ import annotations

from typing import Annotated

import typer
from rich import box
from rich.table import Table

from synthtrial.analyze.limits import (ALPHA_RANGE, MAX_AE_IMAGE_SIZE, MAX_EPOCHS, MAX_PERMUTATIONS, MIN_AE_IMAGE_SIZE,
                                      MIN_PERMUTATIONS)
from synthtrial.cli.common import Device, Quiet, RunDir, Seed, app, handles_errors, out
from synthtrial.cli.jsonout import emit, json_option

_ANALYSIS_PANEL = "Analysis"
AnalyzeJson = json_option("the pooled effects and the files written")
#: the keys of each pooled row in --json, in the order of ``analysis_summary``
POOLED_KEYS = ("outcome", "arm", "estimate", "ci_low", "ci_high", "p", "true_effect", "covered", "calibration_slope")


@app.command("analyze")
@handles_errors
def analyze_command(
    run: RunDir,
    autoencoder: Annotated[bool, typer.Option("--autoencoder/--no-autoencoder",
                                              help="Train the unsupervised autoencoder + PCA outcome.")] = True,
    epochs: Annotated[int, typer.Option(min=1, max=MAX_EPOCHS, help="Autoencoder training epochs.",
                                        rich_help_panel=_ANALYSIS_PANEL)] = 10,
    image_size: Annotated[int, typer.Option(help=f"Autoencoder input size, a power of two from {MIN_AE_IMAGE_SIZE} "
                                            f"to {MAX_AE_IMAGE_SIZE} (Schneider et al.: 256).",
                                            rich_help_panel=_ANALYSIS_PANEL)] = 256,
    embedding: Annotated[str, typer.Option(help="Autoencoder features for the PCA: 'logits' (the bottleneck before "
                                           "its sigmoid, which saturates) or 'sigmoid' (Schneider et al.'s).",
                                           rich_help_panel=_ANALYSIS_PANEL)] = "logits",
    trend: Annotated[bool, typer.Option("--trend/--no-trend", help="Adjust the pooled model for a linear time "
                                        "trend.", rich_help_panel=_ANALYSIS_PANEL)] = True,
    permutations: Annotated[int, typer.Option(min=MIN_PERMUTATIONS, max=MAX_PERMUTATIONS,
                                              help="Permutations per permutation test.",
                                              rich_help_panel=_ANALYSIS_PANEL)] = 2000,
    alpha: Annotated[float, typer.Option(help=f"Significance level (CIs are 1 - alpha), strictly between "
                                         f"{ALPHA_RANGE[0]:g} and {ALPHA_RANGE[1]:g}.",
                                         rich_help_panel=_ANALYSIS_PANEL)] = 0.05,
    seed: Seed = 0,
    device: Device = None,
    quiet: Quiet = False,
    as_json: AnalyzeJson = False,
) -> None:
    """Estimate the treatment effects of a run from its images, each beside the truth it simulated.

    Outcomes: the oracle severity, the lesion count (also read on the severity scale), IGA, any grader scores in RUN/grades.parquet, and Schneider et al.'s unsupervised autoencoder + PCA score. Per-patient tests valid on autocorrelated series with kinetics: period-level analysis, randomisation over the design's scheme, GLS-AR(1) with exposure kinetics; descriptive only: Welch t, day-level permutation, GLS-AR(1) with a step, Newey-West. Pooled: linear mixed model with CR2 (Satterthwaite df) and CR1 cluster-robust SEs. Every outcome also on one scale (effect / within-patient residual SD) beside the standardised truth. Per-patient rows carry Holm- and Benjamini-Hochberg-adjusted p-values and responder calls (a rejection with a beneficial estimate) across the patients; a test the design leaves no chance to reject is marked not available. Writes RUN/analysis/: outcomes.parquet, effects.csv and report.html, as a set (a refused analysis leaves the previous ones as they were).

    --json keys: [bold]analysis[/], [bold]report[/], [bold]effects[/], [bold]outcomes[/] (the paths written), [bold]alpha[/], and [bold]pooled[/]: per outcome and arm the mixed model's (CR2) [bold]outcome[/], [bold]arm[/], [bold]estimate[/], [bold]ci_low[/], [bold]ci_high[/], [bold]p[/], [bold]true_effect[/], [bold]covered[/] and [bold]calibration_slope[/] (null where there is none). Every row of every method is in the effects file.
    """
    import pandas as pd

    from synthtrial.analyze.estimate import format_p
    from synthtrial.analyze.pipeline import (EFFECTS, OUTCOMES, REPORT, AnalysisSettings, analysis_summary,
                                             analyze_run)

    settings = AnalysisSettings(autoencoder=autoencoder, epochs=epochs, image_size=image_size, embedding=embedding,
                                trend=trend,
                                n_permutations=permutations, seed=seed, alpha=alpha)
    folder = analyze_run(run, settings, device=device, progress=not quiet)
    summary = analysis_summary(pd.read_csv(folder / EFFECTS))
    if as_json:
        emit({"analysis": str(folder), "report": str(folder / REPORT), "effects": str(folder / EFFECTS),
              "outcomes": str(folder / OUTCOMES), "alpha": alpha,
              "pooled": [{key: _json_cell(key, getattr(rec, key)) for key in POOLED_KEYS}
                         for rec in summary.itertuples(index=False)]})
        return
    table = Table(title="pooled effects (mixed model, CR2) beside the truth", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, padding=(0, 1))

    def num(value: float) -> str:  # two decimals, one for large effects (lesion counts): fits 80 columns
        return f"{value:+.1f}" if abs(value) >= 10 else f"{value:+.2f}"

    for col in ("outcome", "arm", f"estimate [{1 - alpha:.0%} CI]", "p", "truth"):
        table.add_column(col, justify="left" if col in ("outcome", "arm") else "right", no_wrap=True)
    for rec in summary.itertuples(index=False):
        truth = "" if pd.isna(rec.true_effect) else f"{rec.true_effect:+.2f} " + (
            "✓" if str(rec.covered) == "True" else "✗")
        table.add_row(rec.outcome, rec.arm, f"{num(rec.estimate)} [{num(rec.ci_low)}, {num(rec.ci_high)}]",
                      format_p(rec.p), truth)
    out.print(table)
    out.print(f"[green]wrote[/green] {folder} (open {folder / 'report.html'})")


def _json_cell(key: str, value: object) -> object:
    """A pooled row's value as JSON takes it: ``covered`` true/false/null (the CSV holds True, False or nothing)."""
    if key == "covered":
        return {"True": True, "False": False}.get(str(value))
    return value
