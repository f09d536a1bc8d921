"""`synthtrial graders train|eval detector|dermx`, `graders calibrate detector`, `graders ablation`, `graders
explain`: the localisation graders."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Table

from synthtrial.cli.common import (AugmentStrength, BatchSize, Device, Epochs, EvalData, Force, Quiet, Restart,
                                   RunDir, Seed, Steps, TrainData, TrainOut, Weights, augment_option, graders_app,
                                   graders_calibrate_app, graders_eval_app, graders_train_app, handles_errors,
                                   image_size_option, out)
from synthtrial.graders.base import MAX_IMAGE_SIDE, MAX_INPUT_SIZE
from synthtrial.util.progress import progress_bar

#: Figures of the papers, printed beside ours.
PAPER_DETECTOR = {"rpn": "AP .481 (Mask R-CNN, AcneSCU)", "sadh": "AP .497 (+ SADH)",
                  "sadh_nwd": "AP .507 (+ SADH + NWD)"}
PAPER_DERMX = "characteristic F1 .77-.79, localisation F1 .35-.39 (DermX / DermX+, Jalaboi et al.)"
Head = Annotated[str, typer.Option(help="RPN head: rpn (torchvision's), sadh (Spatial Aware Double Head) or "
                                   "sadh_nwd (SADH + NWD branch).")]
LearningRate = Annotated[float, typer.Option("--lr", min=0.0, max=10.0, help="AdamW learning rate after the "
                                            "warm-up (cosine decay).")]
Marks = Annotated[bool, typer.Option("--marks/--no-marks", help="Also detect post-inflammatory marks as their own "
                                     "class (never counted), so that they are told apart from active lesions.")]
AnchorRatios = Annotated[str, typer.Option(help="Anchor aspect ratios (h / w), comma-separated.")]
RpnIou = Annotated[float, typer.Option(min=0.05, max=0.95, help="RPN foreground IoU (background: half of it); "
                                       "0.5 as in the paper, lower for lesions of a few pixels.")]
Highpass = Annotated[float, typer.Option(min=0.0, max=64.0, help="Feed the network each pixel's difference from "
                                         "a Gaussian blur of this sigma (px; 0: off), so skin tone and light are "
                                         "no cue.")]
Augmentation = Annotated[str, typer.Option(help="Augmentation when on: wide (the graders'), detector (wider "
                                           "colour temperature, scale, blur and sharpness) or texture (detector "
                                           "plus skin texture and wrinkles: for faces older or sharper than the "
                                           "training portrait).")]
MetricsOut = Annotated[Optional[Path], typer.Option("--out", help="Write the metrics as JSON.", show_default=False)]


def recipe_options(lr: float, anchor_ratios: str, rpn_iou: float, highpass: float, augmentation: str) -> dict:
    """The detector training options shared by ``graders train detector`` and ``graders ablation``, checked."""
    from synthtrial.graders.base import GraderError
    from synthtrial.graders.detector_train import AUGMENTS

    try:
        ratios = tuple(float(r) for r in anchor_ratios.split(","))
    except ValueError:
        raise GraderError(f"--anchor-ratios {anchor_ratios!r}: give numbers separated by commas, e.g. 0.7,1,1.4") \
            from None
    if augmentation not in AUGMENTS:
        raise GraderError(f"--augmentation must be one of {', '.join(AUGMENTS)}, got {augmentation!r}")
    return {"lr": lr, "anchor_ratios": ratios, "rpn_iou": (rpn_iou, rpn_iou / 2), "highpass_sigma": highpass,
            "augmentation": AUGMENTS[augmentation]}


def _fmt(value: float) -> str:
    return "-" if value != value else f"{value:.3f}"


@graders_train_app.command("detector")
@handles_errors
def train_detector_command(
    data: TrainData,
    out_dir: TrainOut,
    head: Head = "sadh_nwd",
    steps: Steps = 600,
    batch_size: BatchSize = 2,
    image_side: Annotated[int, typer.Option(min=64, max=MAX_IMAGE_SIDE, help="Longer image side the detector works at "
                                            "(every image is resized to it).")] = 512,
    tile: Annotated[int, typer.Option(min=64, max=2048, help="Side of the training crops.")] = 256,
    augment: augment_option("each crop's horizontal flip only") = True,
    visible_only: Annotated[bool, typer.Option("--visible-only/--all-lesions", help="Targets: the lesions the run "
                                               "measured as visible, or every simulated one.")] = True,
    focus: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of crops centred on a lesion (the rest "
                                         "anywhere).")] = 0.75,
    fit_anchors: Annotated[bool, typer.Option("--fit-anchors/--fixed-anchors", help="Anchor sizes from the "
                                              "training lesions (2 per level) or 6/12/24 px.")] = True,
    backbone: Annotated[str, typer.Option(help="timm backbone (random init; features at strides 4, 8, 16).")]
    = "tinynet_e",
    lr: LearningRate = 2e-3,
    marks: Marks = False,
    anchor_ratios: AnchorRatios = "0.5,1,2",
    rpn_iou: RpnIou = 0.5,
    highpass: Highpass = 0.0,
    augmentation: Augmentation = "wide",
    balance: Annotated[float, typer.Option(min=0.0, max=1.0, help="Class balance of the focused crops: a lesion "
                                           "is picked with weight (its class's share)^-BALANCE; 0 every lesion "
                                           "alike, 1 every class alike (rare ones such as scars met as often as "
                                           "papules).")] = 0.0,
    init: Annotated[Optional[Path], typer.Option(help="Fine-tune: start from these detector weights (a folder "
                                                 "with model.safetensors + config.json of the same "
                                                 "architecture) instead of a random initialisation.",
                                                 show_default=False)] = None,
    seed: Seed = 0,
    device: Device = None,
    restart: Restart = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Train the two-stage lesion detector (Faster R-CNN + FPN, SADH + NWD RPN head), from scratch or --init.

    --data takes run directories (six lesion classes) or one ACNE04 copy (its VOC boxes, one class 'lesion').

    Example (the shipped weights' first stage on the grader training set, ~75 min on one core; the second
    stage, a fine-tune with --init, and the count calibration are in graders/weights/detector/MODEL_CARD.md):

      synthtrial graders dataset --out runs/graderset --images 3000

      synthtrial graders train detector --data runs/graderset/train --out runs/weights/det --backbone regnetx_004 --batch-size 4 --steps 4000 --seed 0 --marks --anchor-ratios 0.7,1,1.4 --rpn-iou 0.3 --highpass 8 --augmentation detector

    On ACNE04: synthtrial graders train detector --data ACNE04/ --image-side 1024 --out det
    """
    from synthtrial.graders.base import GraderError, check_weights_out
    from synthtrial.graders.detector import HEADS
    from synthtrial.graders.detector_train import load_detection_data, train_detector
    from synthtrial.util.device import resolve_device

    if head not in HEADS:
        raise GraderError(f"--head '{head}' must be one of {', '.join(HEADS)}")
    recipe = recipe_options(lr, anchor_ratios, rpn_iou, highpass, augmentation)
    check_weights_out(out_dir, "detector", force)
    resolve_device(device)
    if init is not None:                  # a missing or foreign --init is refused before the images are read
        from synthtrial.graders.detector import LesionDetector

        LesionDetector.from_pretrained(init, device="cpu")
    detection = load_detection_data(data, image_side, visible_only=visible_only, marks=marks)
    with progress_bar("training detector", steps, unit="steps", enabled=not quiet) as update:
        detector = train_detector(detection, out_dir, head=head, steps=steps, batch_size=batch_size, seed=seed,
                                  image_side=image_side, tile=tile, device=device, sources=[str(d) for d in data],
                                  restart=restart, force=force, augment=augment, focus=focus,
                                  fit_anchors=fit_anchors, backbone=backbone, balance=balance, init=init,
                                  progress=update, **recipe)
    out.print(f"[green]wrote[/green] {out_dir} (count threshold {detector.config.count_threshold:.2f}, "
              f"NWD constant {detector.config.nwd_constant:.2f} px)")


SoftFloor = Annotated[float, typer.Option(min=0.0, max=0.99, help="Count each detection from this score on with its "
                                          "score (a soft count); 0: count the detections above the visible-count "
                                          "threshold.")]


@graders_calibrate_app.command("detector")
@handles_errors
def calibrate_detector_command(
    data: Annotated[list[Path], typer.Option("--data", help="Run directories with known lesion counts "
                                             "(repeatable).", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the recalibrated weights (the same "
                                          "model.safetensors, a new config.json).", show_default=False)],
    weights: Weights = None,
    images: Annotated[int, typer.Option(min=2, max=100_000, help="Images the calibration is fitted on, spread "
                                        "evenly over --data.")] = 200,
    soft_floor: SoftFloor = 0.05,
    curve: Annotated[bool, typer.Option("--curve/--linear", help="Map the linear estimate through a monotone "
                                        "(isotonic) curve fitted on the same images, or keep it linear.")] = True,
    device: Device = None,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Refit the detector's count calibration on runs: the visible-count threshold, the per-class weights and bias that map its detections to the simulated lesion count, and a monotone curve.

    The network is not retrained: OUT gets the same model.safetensors and a config.json with the new calibration (see graders/detector_count.py). Use it to calibrate shipped weights to your runs' lesion mix.

    Example (the shipped weights' calibration):

      synthtrial graders calibrate detector --weights runs/weights/detector-v4 --data runs/graderset/train --images 600 --out graders/weights/detector
    """
    from synthtrial.graders.base import GraderError, check_weights_out, get_grader
    from synthtrial.graders.classify import is_run_dir
    from synthtrial.graders.detector_count import calibrate
    from synthtrial.graders.detector_train import load_run_data

    check_weights_out(out_dir, "detector", force)
    for run in data:
        if not is_run_dir(run):
            raise GraderError(f"--data {run}: not a run directory (calibration needs each image's lesion count)")
    detector = get_grader("detector", weights, device=device)
    detection = load_run_data(data, detector.config.image_side, detector.config.classes, visible_only=True)
    with progress_bar("calibrating detector", min(images, len(detection.images)), unit="images",
                      enabled=not quiet) as update:
        calibrated = calibrate(detector, detection, images=images, soft_floor=soft_floor, curve=curve,
                               source=f"images of {', '.join(str(d) for d in data)}", progress=update)
    calibrated.save_pretrained(out_dir)
    cfg = calibrated.config
    out.print(f"[green]wrote[/green] {out_dir} (visible-count threshold {cfg.count_threshold:.2f}, soft floor "
              f"{cfg.count_soft_floor:.2f}, {len(cfg.count_curve)} curve points)")


@graders_train_app.command("dermx")
@handles_errors
def train_dermx_command(
    data: TrainData,
    out_dir: TrainOut,
    guided: Annotated[bool, typer.Option("--guided/--no-guided", help="DermX+: Dice between each characteristic's "
                                         "Grad-CAM and its explanation area (lambda_A = 10).")] = False,
    epochs: Epochs = 10,
    batch_size: BatchSize = 8,
    lr: Annotated[float, typer.Option("--lr", min=0.0, max=10.0, help="AdamW learning rate at the start (cosine "
                                      "decay).")] = 2e-3,
    image_size: image_size_option(64, MAX_INPUT_SIZE, "Network input side in pixels (a multiple of 16)") = 256,
    backbone: Annotated[str, typer.Option(help="plain (five 3x3 conv layers to stride 8, fast on a CPU) or a timm "
                                          "model name (its stride-8 stage).")] = "plain",
    truth: Annotated[str, typer.Option(help="What a characteristic's presence counts: visible (lesions the image "
                                       "shows, lesions.parquet's 'visible') or simulated (every lesion of the "
                                       "course).")] = "visible",
    augment: augment_option("horizontal flips only") = True,
    augment_strength: AugmentStrength = 1.0,
    balanced_characteristics: Annotated[bool, typer.Option(
        "--balanced-characteristics/--plain-characteristics", help="Weigh each characteristic's positives by "
        "its negatives / positives ratio in the training images, in its BCE and, with --characteristic-counts, "
        "in its count error (else a common one is learned as always present, a rare one as never).")] = False,
    presence_from_maps: Annotated[bool, typer.Option(
        "--presence-from-maps/--presence-from-head", help="After training, fit each characteristic's presence "
        "on its head logit and its Grad-CAM map's peak and mass (600 training images, F1-best threshold); "
        "re-running a finished training adds it. Default: the pooled head's sigmoid alone.")] = False,
    count_head: Annotated[bool, typer.Option(
        "--count-head/--no-count-head", help="Also learn each image's lesion count (a density head on the Grad-CAM "
        "layer, trained jointly: grading and counting as LDL does); grades gain a count column.")] = False,
    characteristic_counts: Annotated[bool, typer.Option(
        "--characteristic-counts/--no-characteristic-counts", help="Also learn how many lesions of each "
        "characteristic the image shows (a density head each on the Grad-CAM layer, trained jointly); after "
        "training each is called present from the count with the best F1 on 600 training images. Grades gain "
        "count_<characteristic> columns. Not with --presence-from-maps.")] = False,
    level_from: Annotated[str, typer.Option(
        "--level-from", help="Where level and severity come from: classifier (the diagnosis head), count (the "
        "Hayashi level of the count head's count; needs --count-head) or auto (count when it is right more often "
        "on 600 training images). Decided after training: re-running a finished training sets it again.")] = "auto",
    live_maps: Annotated[bool, typer.Option(
        "--live-maps/--no-live-maps", help="With --guided: also push each characteristic's Grad-CAM map above 0 "
        "somewhere on its explanation area (a map that is 0 everywhere gives the Dice loss nothing to work on).")
    ] = False,
    init: Annotated[Optional[Path], typer.Option(help="Fine-tune: start from these DermX weights (a folder with "
                                                 "model.safetensors + config.json; the same network and input "
                                                 "size) instead of a random initialisation.",
                                                 show_default=False)] = None,
    seed: Seed = 0,
    device: Device = None,
    restart: Restart = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Train DermX (severity + lesion characteristics with Grad-CAM explanations) from scratch on runs, or
    fine-tune saved weights with --init.

    Example (DermX and DermX+ on the grader training set, sized for about an hour each alone on 2 CPU cores:
    188 steps of 16 images an epoch, about 1 s a step, plus about 14 min reading the 3,000 images; see the
    model card's "How to retrain"):

      synthtrial graders train dermx --data runs/graderset/train --out runs/weights/dermx --epochs 12 --batch-size 16

      synthtrial graders train dermx --data runs/graderset/train --out runs/weights/dermx+ --guided --epochs 10 --batch-size 16

    The shipped weights' command is in graders/weights/dermx/MODEL_CARD.md.
    """
    import math

    from synthtrial.graders.base import GraderError, check_weights_out
    from synthtrial.graders.dermx import DermXConfig
    from synthtrial.graders.dermx_train import (TRUTHS, check_level_from, check_live_maps, check_presence_routes,
                                                fine_tune_start, load_dermx_data, train_dermx)
    from synthtrial.util.device import resolve_device

    DermXConfig(image_size=image_size, guided=guided, backbone=backbone)    # refuse bad options before reading
    check_level_from(level_from, count_head)
    check_presence_routes(characteristic_counts, presence_from_maps)
    check_live_maps(live_maps, guided)
    if init is not None:                  # a missing or foreign --init is refused before the images are read
        fine_tune_start(init, DermXConfig(image_size=image_size, guided=guided, backbone=backbone,
                                          count_head=count_head, characteristic_counts=characteristic_counts))
    if truth not in TRUTHS:
        raise GraderError(f"--truth must be one of {', '.join(TRUTHS)}, got '{truth}'")
    check_weights_out(out_dir, "dermx", force)
    resolve_device(device)
    with progress_bar("reading", 1, unit="images", enabled=not quiet) as update:
        dataset = load_dermx_data(data, image_size, truth=truth, progress=update)
    total = epochs * math.ceil(len(dataset.images) / batch_size)
    with progress_bar("training dermx", total, unit="steps", enabled=not quiet) as update:
        train_dermx(dataset, out_dir, guided=guided, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                    image_size=image_size, backbone=backbone, device=device, sources=[str(d) for d in data],
                    restart=restart, force=force, augment=augment, augment_strength=augment_strength,
                    balanced=balanced_characteristics, presence_from_maps=presence_from_maps,
                    count_head=count_head, level_from=level_from, characteristic_counts=characteristic_counts,
                    live_maps=live_maps, init=init, progress=update)
    out.print(f"[green]wrote[/green] {out_dir}")


def _metric_table(title: str, rows: list[dict], columns: list[str]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in columns:
        table.add_column(col, justify="left" if col in ("variant", "truth", "paper") else "right")
    for row in rows:
        table.add_row(*[row[c] if isinstance(row[c], str) else _fmt(row[c]) for c in columns])
    return table


DETECTOR_COLUMNS = ["AP", "AP50", "AP50_any_class", "AP_small", "AR", "count_MAE", "count_RMSE", "level_accuracy"]


def truth_rows(variant: str, metrics: dict[str, float]) -> list[dict]:
    """One table row against the simulated truth and, where the run measured visibility, one against the
    visible truth (invisible lesions ignored; level accuracy there is the Hayashi level of the visible count
    against that of the visible truth)."""
    rows = [{"variant": variant, "truth": "simulated", **metrics}]
    if "AP50_visible" in metrics:
        rows.append({"variant": variant, "truth": "visible", **metrics,
                     **{k: metrics.get(f"{k}_visible", float("nan")) for k in DETECTOR_COLUMNS}})
    return rows


@graders_eval_app.command("detector")
@handles_errors
def eval_detector_command(
    data: EvalData,
    weights: Weights = None,
    out_file: MetricsOut = None,
    detections: Annotated[Optional[Path], typer.Option(help="Write the detections as COCO results JSON.",
                                                       show_default=False)] = None,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """COCO AP, AP50, AP_small, AR (pycocotools), counting MAE / RMSE and Hayashi-level accuracy on a run."""
    from synthtrial.graders.base import get_grader
    from synthtrial.graders.detector_train import evaluate_detector, write_metrics
    from synthtrial.util.atomic import write_text_atomic

    detector = get_grader("detector", weights, device=device)
    with progress_bar("evaluating detector", 1, unit="images", enabled=not quiet) as update:
        metrics, results = evaluate_detector(detector, data, progress=update)
    rows = truth_rows(detector.config.head, metrics)
    table = Table(title=f"detector ({detector.config.head}) on {data}", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("metric")
    for row in rows:
        table.add_column(f"{row['truth']} truth", justify="right")
    for key in DETECTOR_COLUMNS:
        table.add_row(key, *[_fmt(row[key]) for row in rows])
    out.print(table)
    if "AP50_ceiling" in metrics:
        out.print(f"AP50 of a perfect detector of the visible lesions against the simulated truth: "
                  f"{_fmt(metrics['AP50_ceiling'])}")
    if out_file is not None:
        write_metrics(out_file, metrics)
    if detections is not None:
        write_text_atomic(detections, json.dumps(results) + "\n")


@graders_eval_app.command("dermx")
@handles_errors
def eval_dermx_command(
    data: EvalData,
    weights: Weights = None,
    beside: Annotated[Optional[Path], typer.Option(help="Other DermX weights (e.g. DermX+ beside unguided DermX) "
                                                   "scored on the same images and shown beside.",
                                                   show_default=False)] = None,
    plausibility: Annotated[bool, typer.Option("--plausibility/--no-plausibility",
                                               help="Also score the Grad-CAM maps against the explanation areas "
                                               "(lesion masks widened to their erythema).")] = True,
    card: Annotated[Optional[str], typer.Option(help="Write the figures into the weights' evaluation.json as this "
                                                "evaluation set: held_out_seed (its varied subset also fills "
                                                "varied_characteristics), held_out_portrait or shipped_trial.",
                                                show_default=False)] = None,
    out_file: MetricsOut = None,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """Level accuracy, per-characteristic prevalence / precision / recall / F1 and Grad-CAM plausibility on a run.

    Plausibility is the paper's: fuzzy F1 (and sensitivity, specificity) of each characteristic's Grad-CAM,
    at the CAM's resolution, against its explanation area, over the images where truth and network both
    find the characteristic, averaged per characteristic and then over characteristics; beside it the F1 of
    an all-ones map (chance). Characteristic F1 also on the varied subset (every characteristic absent from a
    quarter of its images).

    Example (DermX and DermX+ side by side on the held-out seed, DermX's card filled):

      synthtrial graders eval dermx --data runs/graderset/test_seed --weights graders/weights/dermx --beside runs/weights/dermx+ --card held_out_seed --out runs/weights/dermx_test_seed.json
    """
    from synthtrial.graders.base import DEFAULT_WEIGHTS_DIR, GraderError, get_grader
    from synthtrial.graders.cards import SETS, update_card
    from synthtrial.graders.dermx_eval import MIN_ABSENT, card_figures, evaluate_dermx_models, side_by_side
    from synthtrial.graders.detector_train import write_metrics

    if card is not None and (card not in SETS or card == "varied_characteristics"):
        raise GraderError(f"--card must be one of held_out_seed, held_out_portrait, shipped_trial, got '{card}'")
    dermx = get_grader("dermx", weights, device=device)
    models = {_dermx_label(dermx, "weights"): dermx}
    if beside is not None:
        other = get_grader("dermx", beside, device=device)
        models[_dermx_label(other, "beside", set(models))] = other
    with progress_bar("evaluating dermx", 1, unit="images", enabled=not quiet) as update:
        results = evaluate_dermx_models(models, data, plausibility=plausibility, progress=update)
    metrics = next(iter(results.values()))
    for label, result in results.items():
        _print_dermx(f"{label} on {data}", result, plausibility)
    if len(results) > 1:
        frame = side_by_side(results)
        out.print(_metric_table(f"side by side on {data}", [{"metric": k, **row} for k, row in frame.iterrows()],
                                ["metric", *frame.columns]))
    if metrics["rarely_absent"]:
        out.print(f"[yellow]absent from fewer than {MIN_ABSENT:.0%} of the images:[/yellow] "
                  f"{', '.join(metrics['rarely_absent'])} (their F1 says little; see the varied subset)")
    out.print(f"paper: {PAPER_DERMX}")
    if out_file is not None:
        write_metrics(out_file, {**metrics, "beside": {label: m for label, m in list(results.items())[1:]}}
                      if len(results) > 1 else metrics)
    if card is not None:
        folder = weights if weights is not None else DEFAULT_WEIGHTS_DIR / "dermx"
        command = f"synthtrial graders eval dermx --data {data} --weights {folder}" + \
            (f" --beside {beside}" if beside is not None else "") + f" --card {card}"
        written = update_card(folder, card_figures(metrics, card), command)
        out.print(f"[green]wrote[/green] {written} ({card})")


def _dermx_label(dermx: Any, fallback: str, taken: Collection[str] = ()) -> str:
    label = "DermX+" if dermx.config.guided else "DermX"
    return label if label not in taken else f"{label} ({fallback})"


def _print_dermx(title: str, metrics: dict, plausibility: bool) -> None:
    tables = [("characteristics ({truth} truth; var.: varied subset)",
               {"prevalence": "prev.", "precision": "prec.", "recall": "recall", "F1": "F1",
                "F1_simulated": "F1 sim.", "prevalence_varied": "prev. var.", "F1_varied": "F1 var."})]
    if "characteristic_count_MAE" in metrics:       # weights with characteristic counts
        tables[0][1]["count_MAE"] = "count MAE"
    if plausibility:
        tables.append(("plausibility (chance: an all-ones map)",
                       {"plausibility_F1": "loc. F1", "plausibility_F1_uniform": "chance",
                        "plausibility_sensitivity": "sens.", "plausibility_specificity": "spec.",
                        "plausibility_samples": "n"}))
    for caption, columns in tables:
        table = Table(title=f"{title}: {caption.format(truth=metrics['truth'])}", box=box.SIMPLE_HEAD,
                      pad_edge=False)
        table.add_column("characteristic", no_wrap=True)
        for header in columns.values():
            table.add_column(header, justify="right")
        for name, row in metrics["characteristics"].items():
            table.add_row(name, *[str(row[c]) if c == "plausibility_samples" and c in row else
                                  _fmt(row.get(c, float("nan"))) for c in columns])
        out.print(table)
    summary = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    summary.add_column("metric"), summary.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            summary.add_row(key, _fmt(value))
    summary.add_row("varied subset (images)", f"{metrics['varied_images']}, levels {metrics['varied_levels']}, "
                    + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in metrics["varied_composition"].items()))
    summary.add_row("levels true / predicted", f"{metrics['level_true']} / {metrics['level_predicted']}")
    out.print(summary)


@graders_app.command("ablation")
@handles_errors
def ablation_command(
    data: Annotated[Path, typer.Option("--data", help="Run to train the three variants on.", show_default=False)],
    test_data: Annotated[list[Path], typer.Option("--test-data", help="Held-out run to evaluate them on (other "
                                                  "seed, other portrait; repeatable).", show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the variants (OUT/<head>/, resumable) "
                                          "and OUT/ablation.csv.")] = Path("runs/ablation"),
    steps: Steps = 600,
    batch_size: BatchSize = 2,
    tile: Annotated[int, typer.Option(min=64, max=2048, help="Side of the training crops.")] = 256,
    backbone: Annotated[str, typer.Option(help="timm backbone (random init).")] = "tinynet_e",
    lr: LearningRate = 2e-3,
    marks: Marks = False,
    anchor_ratios: AnchorRatios = "0.5,1,2",
    rpn_iou: RpnIou = 0.5,
    highpass: Highpass = 0.0,
    augmentation: Augmentation = "wide",
    seed: Seed = 0,
    device: Device = None,
    restart: Restart = False,
    quiet: Quiet = False,
) -> None:
    """The paper's RPN ablation on one split: plain RPN vs SADH vs SADH + NWD, same data, same seed.

    Variants already trained in OUT/<head>/ with the same settings are evaluated, not retrained (--restart
    trains them again).
    """
    from synthtrial.graders.detector_train import run_ablation

    recipe = recipe_options(lr, anchor_ratios, rpn_iou, highpass, augmentation)
    with progress_bar("ablation", steps, unit="steps", enabled=not quiet) as update:
        table = run_ablation([data], test_data, out_dir, steps=steps, batch_size=batch_size, seed=seed, device=device,
                             restart=restart, marks=marks, progress=update, tile=tile, backbone=backbone, **recipe)
    for test in test_data:
        chosen = table[table["test"] == str(test)].to_dict("records")
        rows = [{**row, "paper": PAPER_DETECTOR[r["head"]]} for r in chosen for row in truth_rows(r["variant"], r)]
        out.print(_metric_table(f"RPN ablation: train {data}, test {test}", rows,
                                ["variant", "truth", "AP", "AP50", "count_MAE", "level_accuracy", "paper"]))
    out.print(f"[green]wrote[/green] {out_dir / 'ablation.csv'}")


@graders_app.command("explain")
@handles_errors
def explain_command(
    run: RunDir,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the PNG overlays "
                                          "(<patient>/<image stem>_<characteristic>.png).")] = ...,
    weights: Weights = None,
    threshold: Annotated[float, typer.Option(min=0.0, max=1.0, help="Draw the map of each characteristic whose "
                                             "probability reaches this.")] = 0.5,
    limit: Annotated[Optional[int], typer.Option(min=1, max=10_000_000, help="Only the first N images.",
                                                 show_default=False)] = None,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """DermX's Grad-CAM explanation maps as PNG overlays, one per image and characteristic found."""
    from PIL import Image

    from synthtrial.graders.base import get_grader, read_rgb
    from synthtrial.graders.dermx import overlay
    from synthtrial.run import rundir
    from synthtrial.util.atomic import write_bytes_atomic

    dermx = get_grader("dermx", weights, device=device)
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
            update(k, len(images), "")
    out.print(f"[green]wrote[/green] {written} overlays to {out_dir}")
