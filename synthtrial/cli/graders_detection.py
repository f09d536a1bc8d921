"""`synthtrial graders train|eval detector|dermx`, `graders ablation`, `graders explain`: the localisation graders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from synthtrial.cli.common import RunDir, graders_app, graders_eval_app, graders_train_app, handles_errors, out
from synthtrial.util.progress import progress_bar

Device = Annotated[Optional[str], typer.Option(help="Torch device (default: cuda if available, else cpu).",
                                               show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
Seed = Annotated[int, typer.Option(min=0, help="Seed: the same seed and data write the same bytes.")]
Runs = Annotated[Optional[list[Path]], typer.Argument(help="Run directories to train on (synthtrial generate).",
                                                      show_default=False)]

#: Figures of the papers, printed beside ours.
PAPER_DETECTOR = {"rpn": "AP .481 (Mask R-CNN, AcneSCU)", "sadh": "AP .497 (+ SADH)",
                  "sadh_nwd": "AP .507 (+ SADH + NWD)"}
PAPER_DERMX = "characteristic F1 .77-.79, localisation F1 .35-.39 (DermX / DermX+, Jalaboi et al.)"


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"


def _weights(name: str, weights: Optional[Path]) -> Path:
    from synthtrial.graders.base import DEFAULT_WEIGHTS_DIR, WEIGHTS_FILE, GraderError

    folder = weights if weights is not None else DEFAULT_WEIGHTS_DIR / name
    if weights is None and not (folder / WEIGHTS_FILE).is_file():
        raise GraderError(f"grader '{name}' has no default weights in {folder}; train them with "
                          f"`synthtrial graders train {name}` and pass --weights")
    return folder


@graders_train_app.command("detector")
@handles_errors
def train_detector_command(
    runs: Runs = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for model.safetensors + config.json "
                                          "(checkpoints in OUT/checkpoint; re-run to resume).")] = ...,
    acne04: Annotated[Optional[Path], typer.Option(help="Train on ACNE04's VOC boxes instead of runs "
                                                   "(one class, 'lesion').", show_default=False)] = None,
    head: Annotated[str, typer.Option(help="RPN head: rpn (torchvision's), sadh (Spatial Aware Double Head) or "
                                      "sadh_nwd (SADH + NWD branch).")] = "sadh_nwd",
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 600,
    batch: Annotated[int, typer.Option(min=1, help="Masked crops per step.")] = 2,
    image_side: Annotated[int, typer.Option(min=64, help="Longer image side the detector works at.")] = 512,
    tile: Annotated[int, typer.Option(min=64, help="Side of the training crops.")] = 256,
    seed: Seed = 0,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """Train the two-stage lesion detector (Faster R-CNN + FPN, SADH + NWD RPN head) from scratch.

    Example (the shipped weights, ~55 min on 2 busy CPU cores):

      synthtrial generate protocols/graders_train.csv --out runs/gtrain --seed 1 --size 512

      synthtrial graders train detector runs/gtrain --out graders/weights/detector

    On ACNE04 (one class, 'lesion'): synthtrial graders train detector --acne04 ACNE04/ --image-side 1024 --out det
    """
    from synthtrial.graders.base import GraderError
    from synthtrial.graders.detector import HEADS
    from synthtrial.graders.detector_train import load_acne04_data, load_run_data, train_detector

    if head not in HEADS:
        raise GraderError(f"--head '{head}' must be one of {', '.join(HEADS)}")
    if bool(runs) == (acne04 is not None):
        raise GraderError("give run directories or --acne04 DIR (not both, not neither)")
    data = load_acne04_data(acne04, image_side) if acne04 is not None else load_run_data(runs, image_side)
    sources = [str(acne04)] if acne04 is not None else [str(r) for r in runs]
    with progress_bar("training detector", steps, unit="steps", enabled=not quiet) as update:
        detector = train_detector(data, out_dir, head=head, steps=steps, batch=batch, seed=seed,
                                  image_side=image_side, tile=tile, device=device, sources=sources, progress=update)
    out.print(f"[green]wrote[/green] {out_dir} (count threshold {detector.config.count_threshold:.2f}, "
              f"NWD constant {detector.config.nwd_constant:.2f} px)")


@graders_train_app.command("dermx")
@handles_errors
def train_dermx_command(
    runs: Runs = None,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for model.safetensors + config.json "
                                          "(checkpoints in OUT/checkpoint; re-run to resume).")] = ...,
    guided: Annotated[bool, typer.Option("--guided/--no-guided", help="DermX+: Dice between each characteristic's "
                                         "Grad-CAM and its lesion mask (lambda_A = 10).")] = False,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the images.")] = 10,
    batch: Annotated[int, typer.Option(min=1, help="Images per step.")] = 8,
    input_side: Annotated[int, typer.Option(min=64, help="Network input side (multiple of 16).")] = 256,
    seed: Seed = 0,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """Train DermX (severity + lesion characteristics with Grad-CAM explanations) from scratch on runs.

    Example (the shipped weights, ~19 min on 2 busy CPU cores):

      synthtrial graders train dermx runs/gtrain --guided --out graders/weights/dermx
    """
    import math

    from synthtrial.graders.base import GraderError
    from synthtrial.graders.dermx_train import load_dermx_data, train_dermx

    if not runs:
        raise GraderError("give at least one run directory to train on")
    data = load_dermx_data(runs, input_side)
    total = epochs * math.ceil(len(data.images) / batch)
    with progress_bar("training dermx", total, unit="steps", enabled=not quiet) as update:
        train_dermx(data, out_dir, guided=guided, epochs=epochs, batch=batch, seed=seed, input_side=input_side,
                    device=device, sources=[str(r) for r in runs], progress=update)
    out.print(f"[green]wrote[/green] {out_dir}")


def _metric_table(title: str, rows: list[dict], columns: list[str]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in columns:
        table.add_column(col, justify="left" if col in ("variant", "paper") else "right")
    for row in rows:
        table.add_row(*[row[c] if isinstance(row[c], str) else _fmt(row[c]) for c in columns])
    return table


DETECTOR_COLUMNS = ["AP", "AP50", "AP_small", "AR", "count_MAE", "count_RMSE", "level_accuracy"]


@graders_eval_app.command("detector")
@handles_errors
def eval_detector_command(
    run: RunDir,
    weights: Annotated[Optional[Path], typer.Option(help="Weights folder (default: the shipped weights).",
                                                    show_default=False)] = None,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Write the metrics as JSON.",
                                                     show_default=False)] = None,
    detections: Annotated[Optional[Path], typer.Option(help="Write the detections as COCO results JSON.",
                                                       show_default=False)] = None,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """COCO AP, AP50, AP_small, AR (pycocotools), counting MAE / RMSE and Hayashi-level accuracy on a run."""
    from synthtrial.graders.detector import LesionDetector
    from synthtrial.graders.detector_train import evaluate_detector, write_metrics
    from synthtrial.util.atomic import write_text_atomic

    detector = LesionDetector.load(_weights("detector", weights), device=device)
    with progress_bar("evaluating detector", 1, unit="images", enabled=not quiet) as update:
        metrics, results = evaluate_detector(detector, run, progress=update)
    row = {"variant": detector.config.head, **metrics}
    out.print(_metric_table(f"detector on {run}", [row], ["variant", *DETECTOR_COLUMNS]))
    if out_file is not None:
        write_metrics(out_file, metrics)
    if detections is not None:
        write_text_atomic(detections, json.dumps(results) + "\n")


@graders_eval_app.command("dermx")
@handles_errors
def eval_dermx_command(
    run: RunDir,
    weights: Annotated[Optional[Path], typer.Option(help="Weights folder (default: the shipped weights).",
                                                    show_default=False)] = None,
    plausibility: Annotated[bool, typer.Option("--plausibility/--no-plausibility",
                                               help="Also score the Grad-CAM maps against the exact masks.")] = True,
    out_file: Annotated[Optional[Path], typer.Option("--out", help="Write the metrics as JSON.",
                                                     show_default=False)] = None,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """Characteristic F1, level accuracy, severity MAE and explanation plausibility (fuzzy F1) on a run."""
    from synthtrial.graders.dermx import DermX
    from synthtrial.graders.dermx_train import evaluate_dermx
    from synthtrial.graders.detector_train import write_metrics

    dermx = DermX.load(_weights("dermx", weights), device=device)
    with progress_bar("evaluating dermx", 1, unit="images", enabled=not quiet) as update:
        metrics = evaluate_dermx(dermx, run, plausibility=plausibility, progress=update)
    table = Table(title=f"DermX{'+' if dermx.config.guided else ''} on {run}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("metric"), table.add_column("value", justify="right")
    for key, value in metrics.items():
        table.add_row(key, _fmt(value))
    out.print(table)
    out.print(f"paper: {PAPER_DERMX}")
    if out_file is not None:
        write_metrics(out_file, metrics)


@graders_app.command("ablation")
@handles_errors
def ablation_command(
    run_train: Annotated[Path, typer.Argument(help="Run to train the three variants on.", show_default=False)],
    run_test: Annotated[Path, typer.Argument(help="Held-out run to evaluate them on (other seed, other portrait).",
                                             show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the variants (OUT/<head>/, resumable) "
                                          "and OUT/ablation.csv.")] = Path("runs/ablation"),
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps per variant.")] = 600,
    batch: Annotated[int, typer.Option(min=1, help="Masked crops per step.")] = 2,
    seed: Seed = 0,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """The paper's RPN ablation on one split: plain RPN vs SADH vs SADH + NWD, same data, same seed.

    Variants already trained in OUT/<head>/ with the same settings are evaluated, not retrained.
    """
    from synthtrial.graders.detector_train import run_ablation

    with progress_bar("ablation", steps, unit="steps", enabled=not quiet) as update:
        table = run_ablation([run_train], run_test, out_dir, steps=steps, batch=batch, seed=seed, device=device,
                             progress=lambda head, step, total, status: update(step, f"{head} {status}"))
    rows = [{**r, "paper": PAPER_DETECTOR[r["head"]]} for r in table.to_dict("records")]
    out.print(_metric_table(f"RPN ablation: train {run_train}, test {run_test}", rows,
                            ["variant", *DETECTOR_COLUMNS, "paper"]))
    out.print(f"[green]wrote[/green] {out_dir / 'ablation.csv'}")


@graders_app.command("explain")
@handles_errors
def explain_command(
    run: RunDir,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG overlays "
                                          "(<patient>/<image stem>_<characteristic>.png).")] = ...,
    weights: Annotated[Optional[Path], typer.Option(help="DermX weights folder (default: the shipped weights).",
                                                    show_default=False)] = None,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Draw the map of each characteristic whose "
                                             "probability reaches this.")] = 0.5,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N images.", show_default=False)] = None,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """DermX's Grad-CAM explanation maps as PNG overlays, one per image and characteristic found."""
    from PIL import Image

    from synthtrial.graders.base import read_rgb
    from synthtrial.graders.dermx import DermX, overlay
    from synthtrial.run import rundir
    from synthtrial.util.atomic import write_bytes_atomic

    dermx = DermX.load(_weights("dermx", weights), device=device)
    manifest = rundir.read_manifest(run)
    images = list(manifest["image"])[:limit]
    written = 0
    with progress_bar("explaining", len(images), unit="images", enabled=not quiet) as update:
        for k, rel in enumerate(images, start=1):
            image = read_rgb(Path(run) / rel)
            _, probs = dermx.probabilities([image])
            maps = dermx.explain(image)
            for c, name in enumerate(dermx.config.characteristics):
                if probs[0, c] >= threshold:
                    import io

                    buf = io.BytesIO()
                    Image.fromarray(overlay(image, maps[c])).save(buf, format="PNG")
                    rel_path = Path(rel)
                    write_bytes_atomic(out_dir / rel_path.parent.name / f"{rel_path.stem}_{name}.png", buf.getvalue())
                    written += 1
            update(k)
    out.print(f"[green]wrote[/green] {written} overlays to {out_dir}")
