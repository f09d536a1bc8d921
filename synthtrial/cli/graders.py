"""`synthtrial grade RUN` and `synthtrial graders list`: score a run with the embedded graders."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from synthtrial.cli.common import (BatchSize, Device, Quiet, RunLocation, Scheduler, app, graders_app,
                                   handles_errors, out)
from synthtrial.cli.jsonout import emit, json_option
from synthtrial.util.cluster import MAX_WORKERS
from synthtrial.util.progress import StageBars

GradersJson = json_option("the list")


@app.command("grade")
@handles_errors
def grade_command(
    run: RunLocation,
    graders: Annotated[Optional[str], typer.Option(help="Comma-separated graders to run (default: the graders "
                                                   "whose model card meets its targets; see [bold]synthtrial "
                                                   "graders list[/]). Others run when named, with a warning.",
                                                   show_default=False)] = None,
    weights: Annotated[Optional[list[str]], typer.Option(help="Use other weights for a grader: NAME=FOLDER "
                                                         "(safetensors + config.json; repeatable).",
                                                         show_default=False)] = None,
    device: Device = None,
    batch_size: BatchSize = 64,
    workers: Annotated[Optional[int], typer.Option(min=1, max=MAX_WORKERS, help="Grade on a local Dask cluster of "
                                                   "this many processes (the result does not change).",
                                                   show_default=False)] = None,
    scheduler: Scheduler = None,
    quiet: Quiet = False,
) -> None:
    """Score every image of a run with the embedded graders: RUN/grades.parquet (one row per image: image, image_sha256, columns <grader>_<name>) and RUN/grades.json (which columns [bold]synthtrial analyze[/] takes as outcomes).

    The detector also keeps its boxes in RUN/detections.parquet; the tracker (list it after the detector: --graders detector,tracker) links them visit to visit into RUN/tracks.parquet and counts persisting, new and resolved lesions per image.

    Each image is checked against the manifest's sha256 before it is graded. Interrupted? Run the same command again: finished chunks are kept (a chunk is kept by what it holds, so another --batch-size, or images changed since, are graded afresh). Grades of other graders already in the file are kept for the images that did not change.
    """
    from synthtrial.graders.base import GraderError, get_grader
    from synthtrial.graders.cards import default_graders
    from synthtrial.grade import grade_run

    names = [n.strip() for n in graders.split(",") if n.strip()] if graders else default_graders()
    chosen: dict[str, str] = {}
    for item in weights or []:
        name, sep, folder = item.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise GraderError(f"--weights '{item}' must look like NAME=FOLDER")
        chosen[name.strip()] = folder.strip()
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise GraderError(f"--weights {unknown[0]}=...: '{unknown[0]}' is not among the graders run "
                          f"({', '.join(names)})")
    if device is not None:  # checked for every grader alike (one that runs no network would ignore it)
        from synthtrial.util.device import resolve_device

        resolve_device(device)
    built = [get_grader(n, chosen.get(n), device=device) for n in names]
    with StageBars("grading", unit="images", enabled=not quiet) as update:
        path = grade_run(run, built, batch_size=batch_size, progress=update, workers=workers, scheduler=scheduler)
    out.print(f"[green]wrote[/green] {path} ({', '.join(names)})")


@graders_app.command("list")
@handles_errors
def graders_list(as_json: GradersJson = False) -> None:
    """List the graders, what each reports, whether its weights are here and whether [bold]synthtrial grade[/] runs it by default.

    --json keys: [bold]graders[/], a list with per grader [bold]name[/], [bold]weights[/] ("none needed", "default" or "train first"), [bold]ready[/] (true where [bold]synthtrial grade[/] can run it now), [bold]default[/] (true where [bold]synthtrial grade[/] runs it when no --graders are named: its model card meets its targets), [bold]why[/] (what its card says, or the default grader it reads), [bold]needs[/] (the graders whose output it reads) and [bold]summary[/] (what it reports).
    """
    from synthtrial.graders.base import DEFAULT_WEIGHTS_DIR, REGISTRY, WEIGHTS_FILE, available
    from synthtrial.graders.cards import card_status, default_graders

    ready, chosen = set(available()), default_graders()

    def why(name: str) -> str:
        status = card_status(name)
        if not status.meets_targets:
            return status.reason
        missing = [n for n in REGISTRY[name].needs if n not in chosen]
        return f"reads {', '.join(missing)}, not a default grader" if missing else status.reason

    rows = [{"name": name, "weights": "none needed" if not spec.needs_weights else (
                "default" if (DEFAULT_WEIGHTS_DIR / name / WEIGHTS_FILE).is_file() else "train first"),
             "ready": name in ready, "default": name in chosen, "why": why(name), "needs": list(spec.needs),
             "summary": spec.summary}
            for name, spec in REGISTRY.items()]
    if as_json:
        emit({"graders": rows})
        return
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("grader", "weights", "graded by default", "what it reports"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["name"], row["weights"], "yes" if row["default"] else f"no: {row['why']}", row["summary"])
    out.print(table)
