"""`synthtrial scale`: print the severity scale."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from synthtrial.util.errors import SynthtrialError
from synthtrial.cli.common import app, handles_errors, out
from synthtrial.cli.jsonout import emit, json_option


@app.command("scale")
@handles_errors
def scale_command(
    severity: Annotated[Optional[list[float]], typer.Argument(
        help="Latent severities (0-3) to look up; default: a table from 0 to 3 in steps of 0.25.")] = None,
    as_json: json_option("the scale") = False,
) -> None:
    """Show the severity scale: latent severity -> expected lesions -> ACNE04 level -> IGA.

    The scale is a modelling assumption: lesion counts are piecewise linear through (0, 0), (0.5, 5.5), (1.5, 20.5), (2.5, 50.5), (3, 65); ACNE04 levels follow Hayashi's counts (<=5, 6-20, 21-50, >50); IGA follows the inflammatory lesions the lesion mix expects.

    --json: a list with one record per severity, keys [bold]severity[/], [bold]expected_lesions[/], [bold]inflammatory_fraction[/], [bold]acne04_level[/], [bold]acne04_name[/], [bold]iga[/], [bold]iga_name[/], [bold]iga_group[/].
    """
    from synthtrial.trial.scale import SEVERITY_MAX, SEVERITY_MIN, scale_table

    for s in severity or []:
        if not SEVERITY_MIN <= s <= SEVERITY_MAX:
            raise SynthtrialError(f"severity {s:g} is outside the scale 0-3 (argument SEVERITY)")
    table = scale_table(severity or None)
    if as_json:
        emit(table.to_dict(orient="records"))
        return
    view = Table(title="synthtrial severity scale (a modelling assumption)")
    for name in ("severity", "lesions", "inflam.", "ACNE04", "IGA", "3-class"):
        view.add_column(name, no_wrap=True, justify="right" if name in ("severity", "lesions", "inflam.") else "left")
    for rec in table.itertuples(index=False):
        view.add_row(f"{rec.severity:g}", f"{rec.expected_lesions:g}", f"{rec.inflammatory_fraction:.0%}",
                     f"{rec.acne04_level} {rec.acne04_name}", f"{rec.iga} {rec.iga_name}", str(rec.iga_group))
    out.print(view)
