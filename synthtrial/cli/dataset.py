"""`synthtrial graders dataset`: render a grader training set and its held-out sets (synthtrial.run.dataset)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Table

from synthtrial.cli.common import Quiet, Seed, graders_app, handles_errors, out
from synthtrial.face.faces import BUILTIN_FACES
from synthtrial.run.dataset import BOTH, MAX_IMAGES, VISITS_PER_PATIENT
from synthtrial.run.generation import MAX_WORKERS
from synthtrial.trial import scale


def histogram_table(record: dict[str, Any]) -> Table:
    """Per split: images, the images at each Hayashi level and IGA grade, and those showing marks and scars."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False,
                  caption=f"IGA {', '.join(f'{k} {n}' for k, n in enumerate(scale.IGA_NAMES))}")
    for col in ("split", "images", "level 0/1/2/3", "IGA 0/1/2/3/4", "marks", "scars"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for name, s in record["splits"].items():
        table.add_row(name, str(s["images"]), "/".join(map(str, s["level"])), "/".join(map(str, s["iga"])),
                      str(s["images_with_marks"]), str(s["images_with_scars"]))
    return table


@graders_app.command("dataset")
@handles_errors
def dataset_command(
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the three run directories (train, "
                                          "test_seed, test_portrait) and dataset.json; re-run to resume.",
                                          show_default=False)],
    images: Annotated[int, typer.Option(min=3, max=MAX_IMAGES, help="Images of the train split (a multiple of "
                                        "3: frontal, left and right of every visit).")] = 3000,
    test_images: Annotated[Optional[int], typer.Option(min=3, max=MAX_IMAGES, help="Images of each held-out "
                                                       "split (default: a fifth of --images, a multiple of 3).",
                                                       show_default=False)] = None,
    size: Annotated[int, typer.Option(min=128, max=4096, help="Image side in pixels (native resolution: the "
                                      "graders crop or tile it).")] = 512,
    seed: Seed = 0,
    train_portrait: Annotated[str, typer.Option(help=f"Built-in portrait of the train and test_seed splits "
                                                f"({', '.join(BUILTIN_FACES)} or {BOTH}); test_portrait takes the "
                                                f"other ({BOTH}: no test_portrait split).")] = "astronaut",
    visits: Annotated[int, typer.Option(min=1, max=100, help="Visits per patient, one every 7 days (lesions "
                                        "resolve between visits and leave marks).")] = VISITS_PER_PATIENT,
    workers: Annotated[int, typer.Option(min=1, max=MAX_WORKERS, help="Processes rendering in parallel (does "
                                         "not change the result).")] = 1,
    quiet: Quiet = False,
) -> None:
    """Render a grader training set: thousands of images of one built-in portrait in all its identity variants, three views per visit, severities stratified so every Hayashi level is a quarter of the visits, marks and scars present; and two held-out sets: test_seed (same portrait, new seed) and test_portrait (the other portrait). --train-portrait both: both portraits in train and test_seed, no test_portrait.

    Each split is a normal run directory (synthtrial verify passes); OUT/dataset.json records the recipe, the seeds and per-split counts by Hayashi level and IGA grade. The same options give the same bytes; an interrupted command, run again, finishes.

    Example (the grader training set; about 12 minutes at 512 px on two busy cores):

      synthtrial graders dataset --out runs/graderset --images 3000

      synthtrial graders train detector --data runs/graderset/train --out det
    """
    from synthtrial.run.dataset import Recipe, build_dataset

    recipe = Recipe(images=images, test_images=test_images, size=size, seed=seed, train_portrait=train_portrait,
                    visits_per_patient=visits)
    record = build_dataset(out_dir, recipe, workers=workers, progress=not quiet)
    for name, s in record["splits"].items():
        out.print(f"{name}: portrait {s['portrait']}, seed {s['seed']}, {s['patients']} patients "
                  f"({s['identity_variants']} identity variants)")
    out.print(histogram_table(record))
    out.print(f"[green]wrote[/green] {out_dir} ({', '.join(record['splits'])}; {out_dir / 'dataset.json'})")
