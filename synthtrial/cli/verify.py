"""`synthtrial verify RUN`: check a run directory's files and tables."""

from __future__ import annotations

import typer

from synthtrial.cli.common import Quiet, RunDir, app, err, handles_errors, out
from synthtrial.cli.jsonout import emit, json_option
from synthtrial.util.progress import progress_bar

VerifyJson = json_option("the verdict")


@app.command("verify")
@handles_errors
def verify_command(run: RunDir,
                   quiet: Quiet = False,
                   as_json: VerifyJson = False) -> None:
    """Check a run: every image and mask against the manifest's sha256, no file missing, unlisted or outside the run, the contact sheets present, the manifest's lesion counts against lesions.parquet, config.json's settings, and the manifest's treatment, severity, date and block against protocol.csv (and its days against truth.json).

    Exit status 0 when all holds; 1 with one line per problem otherwise. Re-running the same [bold]synthtrial generate[/] command re-renders what is missing or damaged.

    --json keys: [bold]run[/] (the path), [bold]ok[/] (true or false), [bold]problems[/] (a list of lines, empty when ok); the exit status is the same.
    """
    from synthtrial.run.verify import verify

    with progress_bar("verifying", 1, unit="images", enabled=not quiet) as update:
        problems = verify(run, progress=update)
    if as_json:
        emit({"run": str(run), "ok": not problems, "problems": problems})
        if problems:
            raise typer.Exit(1)
        return
    if problems:
        for line in problems:
            err.print(f"{run}: {line}", markup=False)
        err.print(f"synthtrial: {len(problems)} problem{'s' if len(problems) > 1 else ''} in {run}; re-run the "
                  "generate command to heal missing or damaged images", markup=False)
        raise typer.Exit(1)
    out.print(f"[green]OK[/green] {run}: every file matches the manifest")
