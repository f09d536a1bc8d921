"""`synthtrial export`: a run to a grader's training format."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from synthtrial.cli.common import Quiet, RunLocation, Seed, app, handles_errors, out
from synthtrial.run.export import REPLACE_RULE


class ExportFormat(str, Enum):
    coco = "coco"
    acne04 = "acne04"
    imagefolder = "imagefolder"


@app.command("export")
@handles_errors
def export_command(
    run: RunLocation,
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="coco: detection JSON of the lesion boxes "
                                              "and masks; acne04: ACNE04 label lines (filename level count) "
                                              "with patient-wise folds; imagefolder: a Hugging Face imagefolder "
                                              "with metadata.csv.", show_default=False)],
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write (default: "
                                                    "RUN/exports/<format>).", show_default=False)] = None,
    folds: Annotated[int, typer.Option(min=2, help="Folds for the acne04 format (split by patient).")] = 5,
    seed: Seed = 0,
    force: Annotated[bool, typer.Option("--force", help=f"The rule: {REPLACE_RULE}.")] = False,
    link: Annotated[bool, typer.Option("--link", help="imagefolder: hard-link the images instead of copying them "
                                       "(saves space, but editing an exported image then changes the run).")]
    = False,
    visible_only: Annotated[bool, typer.Option("--visible-only", help="coco: only the lesions the image shows "
                                               "(lesions.parquet's visible); acne04: the visible counts "
                                               "(visible_count) and their level instead of the simulated ones.")]
    = False,
    active_only: Annotated[bool, typer.Option("--active-only", help="coco: only the active lesion types (no marks "
                                              "or scars; each annotation's attributes.stage gives its phase).")]
    = False,
    image_root: Annotated[Optional[Path], typer.Option(
        "--image-root", help="coco: write each file_name relative to this folder (default: the JSON's own folder, so "
        "the JSON loads where it lies; --image-root RUN gives the run's own paths).", show_default=False)] = None,
    quiet: Quiet = False,
) -> None:
    """Export a run's images and ground truth to a grader's training format.

    Every image (and, for COCO, every mask) is checked against the manifest's sha256 first; files that resolve outside the run are refused. --out may not lie inside the run directory (except under RUN/exports/); an earlier export, at --out or the default path, is replaced only with --force.

    COCO's file_name is relative to the JSON's folder (or --image-root): point a loader's image root there, e.g. pycocotools' COCO(JSON) with images at os.path.join(dirname(JSON), file_name).
    """
    from synthtrial.run.export import export_run

    path = export_run(run, fmt.value, out_dir, folds=folds, seed=seed, force=force, link=link, progress=not quiet,
                      visible_only=visible_only, active_only=active_only, image_root=image_root)
    out.print(f"[green]wrote[/green] {path}")
