"""`synthtrial rate`: a simulated rater panel reads a run's lesions; ratings, their truth and their agreement."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from synthtrial.cli.common import RunDir, Seed, app, handles_errors, out


@app.command("rate")
@handles_errors
def rate_command(
    run: RunDir,
    raters: Annotated[int, typer.Option("--raters", min=1, max=100, help="Raters in the panel.")] = 3,
    panel: Annotated[Optional[Path], typer.Option(
        "--panel", help="Panel parameters (JSON; see docs/raters.md); missing keys keep the defaults.",
        show_default=False)] = None,
    simulations: Annotated[int, typer.Option(
        "--simulations", min=2, max=10_000, help="Readings simulated for the implied grade agreement.")] = 100,
    seed: Seed = 0,
) -> None:
    """Let a simulated rater panel read every image of a run through its perceptual model (detection by lesion type and size, confusion of marks and scars, personal bias, scale, grade threshold and drift, test-retest noise on rereads). Writes RUN/ratings.parquet (rater, image, reread, count, per-type counts, IGA, Hayashi level) and RUN/ratings.json (the panel's parameters and each rater's, kept as truth, and the agreement table), and prints the agreement (ICC, weighted kappa, Krippendorff's alpha) beside the values the panel implies. `analyze` then takes the ratings as outcomes.
    """
    from synthtrial.grade.ratings import rate_run

    ratings, agreement = rate_run(run, raters, panel, seed=seed, simulations=simulations)
    view = Table(title=f"agreement of {raters} rater(s) on {agreement['images'].iloc[0]} images", title_justify="left",
                 box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, padding=(0, 1))
    for col in ("variable", "statistic", "observed", "implied", "MC SD", "implied by"):
        view.add_column(col, justify="left" if col in ("variable", "statistic", "implied by") else "right",
                        no_wrap=True)
    for rec in agreement.itertuples(index=False):
        view.add_row(_SHORT.get(rec.variable, rec.variable), rec.statistic, _num(rec.observed), _num(rec.implied),
                     _num(rec.mc_sd), rec.implied_by)
    out.print(view)
    out.print("implied: the value the panel's parameters give for these raters and images (analytic, or the mean "
              "of simulated readings); MC SD: the statistic's SD over those simulated readings", soft_wrap=False)
    out.print(f"[green]wrote[/green] {Path(run) / 'ratings.parquet'} ({len(ratings)} readings) and "
              f"{Path(run) / 'ratings.json'}")


_SHORT = {"hayashi_level": "Hayashi"}


def _num(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"
