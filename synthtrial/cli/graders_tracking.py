"""`synthtrial graders eval tracker`: the lesion tracks of a graded run against the stable lesion ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from synthtrial.cli.common import EvalData, graders_eval_app, handles_errors, out

#: The columns printed and their headers (all metrics go to --out).
SHOWN = {"mota": "MOTA", "idf1": "IDF1", "num_switches": "IDsw", "num_false_positives": "FP", "num_misses": "FN",
         "num_objects": "boxes", "recall": "recall", "precision": "prec"}


@graders_eval_app.command("tracker")
@handles_errors
def eval_tracker_command(
    data: EvalData,
    iou: Annotated[float, typer.Option(min=0.01, max=1.0, help="Least IoU of a track box and a lesion box that "
                                       "match (0.5: the MOT benchmarks' and AP50's criterion).")] = 0.5,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Write the metrics as JSON (per truth).",
                                                     show_default=False)] = None,
) -> None:
    """MOTA, IDF1, identity switches (motmetrics) of RUN/tracks.parquet against the lesions' stable lesion_id, for the simulated and the visible truth.

    Grade the run first: synthtrial grade RUN --graders detector,tracker
    """
    from synthtrial.grade.evaluate import evaluate_run_tracks
    from synthtrial.util.atomic import write_text_atomic

    metrics = evaluate_run_tracks(data, iou=iou)
    table = Table(title=f"tracker on {data} (IoU >= {iou:g})", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("truth")
    for header in SHOWN.values():
        table.add_column(header, justify="right")
    for truth, row in metrics.iterrows():
        table.add_row(str(truth), *[f"{row[c]:.0f}" if c.startswith("num_") else f"{row[c]:.3f}"
                                    for c in SHOWN])
    out.print(table)
    if out_file is not None:
        record = {"iou": iou, **{str(truth): {k: float(v) for k, v in row.items()}
                                 for truth, row in metrics.iterrows()}}
        write_text_atomic(out_file, json.dumps(record, indent=2, sort_keys=True) + "\n")
