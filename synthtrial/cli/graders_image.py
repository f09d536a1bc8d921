"""`synthtrial graders train|eval iga|imageqx`: the image-level classifiers (IGA severity, ImageQX quality)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.table import Table

from synthtrial.cli.common import (AugmentStrength, BatchSize, Device, Epochs, EvalData, Force, Quiet, Restart, Seed,
                                   TrainData, TrainOut, Weights, augment_option, graders_eval_app, graders_train_app,
                                   handles_errors, image_size_option, out)
from synthtrial.graders.base import MAX_DEPTH, MAX_WIDTH
from synthtrial.util.progress import ProgressCallback, progress_bar

Extra = Annotated[Optional[list[Path]], typer.Option(help="Generated run(s) mixed into the training part only "
                                                     "(synthetic augmentation of a real training set).",
                                                     show_default=False)]
Identity = Annotated[Optional[list[str]], typer.Option("--identity", help="Keep only the patients of runs whose "
                                                       "face was made from this base portrait (astronaut, hopper, "
                                                       "a --faces key; repeatable): train on one, evaluate on "
                                                       "another for a held-out-identity test.", show_default=False)]
WeightsDtype = Annotated[str, typer.Option(help="Storage dtype of the saved weights: float32 or float16 (half "
                                           "the size; loaded as float32).")]
EvalOut = Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the confusion-matrix PNG and the "
                                                 "metrics JSON (default: DATA/eval).", show_default=False)]
LearningRate = Annotated[float, typer.Option("--lr", min=0.0, max=10.0, help="Adam learning rate at the start "
                                             "(cosine decay).")]
FinalRate = Annotated[float, typer.Option(min=0.0, max=10.0, help="Learning rate at the end.")]


class _Stages:
    """Bars one after the other for a job of several stages (rich draws one live display at a time):
    :meth:`stage` is the progress callback of one stage; its first call closes the bar before and opens its own."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.stage_name, self.bar, self.update = enabled, None, None, None

    def stage(self, name: str, unit: str) -> ProgressCallback:
        def report(done: int, total: int, status: str) -> None:
            if name != self.stage_name:
                self.close()
                self.stage_name = name
                self.bar = progress_bar(name, total, unit=unit, enabled=self.enabled)
                self.update = self.bar.__enter__()
            self.update(done, total, status)

        return report

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _report_table(result: dict[str, Any], title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("class", "precision", "recall", "F1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for k, name in enumerate(result["classes"]):
        table.add_row(name, f"{result['precision'][k]:.3f}", f"{result['recall'][k]:.3f}",
                      f"{result['f1'][k]:.3f}", str(result["support"][k]))
    table.caption = f"accuracy {result['accuracy']:.4f}   macro F1 {result['macro_f1']:.4f}"
    return table


def _confusion_table(result: dict[str, Any], title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("true \\ predicted")
    for name in result["classes"]:
        table.add_column(name, justify="right")
    for name, row in zip(result["classes"], result["confusion"]):
        table.add_row(name, *map(str, row))
    return table


def _write_json(path: Path, result: dict[str, Any]) -> None:
    from synthtrial.util.atomic import write_text_atomic

    write_text_atomic(path, json.dumps(result, indent=2, sort_keys=True) + "\n")


def _eval_folder(data: Path, out_dir: Optional[Path]) -> Path:
    return out_dir if out_dir is not None else data / "eval"


# ---------------------------------------------------------------------------------------------- IGA

@graders_train_app.command("iga")
@handles_errors
def train_iga(
    data: TrainData,
    out_dir: TrainOut,
    extra: Extra = None,
    identity: Identity = None,
    epochs: Epochs = 20,
    batch_size: BatchSize = 16,
    lr: LearningRate = 3e-3,
    lr_final: FinalRate = 1e-4,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Patients held out for validation "
                                                "(grouped by patient, stratified by the 3-class view; 0: none).")]
    = 0.2,
    backbone: Annotated[str, typer.Option(help="cifar-resnet (He et al.'s CIFAR ResNet, the paper's), or "
                                          "timm:<model> (e.g. timm:resnet18).")] = "cifar-resnet",
    depth: Annotated[int, typer.Option(min=8, max=MAX_DEPTH, help="CIFAR ResNet depth 6n+2 (the paper: 110, "
                                       "1.7 M parameters).")] = 14,
    width: Annotated[int, typer.Option(min=1, max=MAX_WIDTH, help="CIFAR ResNet channels of the first stage "
                                       "(doubled twice; He et al.: 16).")] = 16,
    image_size: image_size_option(16, 1024, "Face crop side in pixels, the network's input (the paper: 224)") = 384,
    crop_margin: Annotated[float, typer.Option(min=0.0, max=1.0, help="Face box widened by this fraction on "
                                               "every side before cropping.")] = 0.1,
    stem_stride: Annotated[int, typer.Option(min=1, max=4, help="1: the CIFAR stem (the paper's); 2 halves the "
                                             "input in the first convolution; 4 quarters it with two.")] = 4,
    dropout: Annotated[float, typer.Option(min=0.0, max=0.95, help="Dropout before the classifier.")] = 0.2,
    count_head: Annotated[bool, typer.Option("--count-head/--no-count-head", help="The inflammatory / nodule "
                                             "count head trained beside the grades (--no-count-head with the "
                                             "paper's settings is the paper's network).")] = True,
    count_weight: Annotated[float, typer.Option(min=0.0, max=100.0, help="Weight of the count loss (squared "
                                                "error of log(1 + count)) beside the cross-entropy.")] = 1.0,
    count_target: Annotated[str, typer.Option(help="What the count head learns: simulated (the visit's "
                                              "papules + pustules + nodules, which define the IGA) or visible "
                                              "(the view's visible ones).")] = "simulated",
    grade_from: Annotated[str, typer.Option(help="Which route gives the grade: auto (the better on the "
                                            "validation patients), classifier, or counts (IGA of the counted "
                                            "lesions).")] = "auto",
    backbone_weights: Annotated[Optional[Path], typer.Option(help="Your own pretrained backbone weights "
                                                             "(.safetensors; timm backbones).",
                                                             show_default=False)] = None,
    no_class_weights: Annotated[bool, typer.Option("--no-class-weights", help="Plain cross-entropy (the "
                                                   "paper's ablation).")] = False,
    augment: augment_option("the paper's flips, rotation and brightness, each with probability 0.2") = True,
    augment_strength: AugmentStrength = 1.0,
    weights_dtype: WeightsDtype = "float32",
    seed: Seed = 0,
    device: Device = None,
    restart: Restart = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Train the IGA severity grader (QuantifiCare recipe) with an inflammatory-count head and save it to OUT.

    Face crops (MediaPipe BlazeFace) at 384 px, a CIFAR ResNet with a stride-4 stem, class-weighted
    cross-entropy over the five IGA grades plus the count loss, Adam, the graders' wide augmentation
    (--no-augment: the paper's flips / rotation / brightness each with probability 0.2). Labels: the manifest's
    'iga' and lesion counts for runs; for ACNE04 the IGA of the expected lesion mix at the severity of the
    labelled count ([bold]synthtrial scale[/]), no count. The paper's network: --depth 110 --width 16
    --image-size 224 --stem-stride 1 --no-count-head.

    Example (the shipped weights):

      synthtrial graders train iga --data runs/graderset/train --out runs/weights/iga --val-fraction 0.1
    """
    from synthtrial.graders import iga, iga_train

    config = iga.IGAConfig(backbone=backbone, depth=depth, width=width, image_size=image_size,
                           stem_stride=stem_stride, dropout=dropout, crop_margin=crop_margin, count_head=count_head)
    settings = iga_train.TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, lr_final=lr_final,
                                       val_fraction=val_fraction, seed=seed, class_weighted=not no_class_weights,
                                       augment=augment, augment_strength=augment_strength,
                                       count_weight=count_weight, count_target=count_target, grade_from=grade_from)
    stages = _Stages(not quiet)
    try:
        grader = iga_train.train(data, out_dir, extra=extra or (), identities=identity, config=config,
                                 settings=settings, device=device, backbone_weights=backbone_weights,
                                 restart=restart, force=force, weights_dtype=weights_dtype,
                                 read_progress=stages.stage("cropping faces", "images"),
                                 progress=stages.stage("training", "steps"))
    finally:
        stages.close()
    last = grader.record["history"][-1]
    val = f", validation 3-class accuracy {last['val_accuracy3']:.3f}" if "val_accuracy3" in last else ""
    if "val_accuracy3_counts" in last:
        val += f" (counts' route {last['val_accuracy3_counts']:.3f})"
    out.print(f"[green]wrote[/green] {out_dir} ({grader.record['n_train']} training images, "
              f"final loss {last['loss']:.3f}{val}; grade from the {grader.config.grade_from})")


@graders_eval_app.command("iga")
@handles_errors
def eval_iga(
    data: EvalData,
    weights: Weights = None,
    identity: Identity = None,
    out_dir: EvalOut = None,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate the IGA grader visit by visit (the views of a patient-day fused), as the paper reports it.

    Prints per-grade and 3-class (0-1 / 2 / 3-4) precision, recall and F1, accuracy and the confusion matrices
    of the grader's output, the 3-class view of both routes (classifier, counts) and against the visible
    lesions' IGA, and the count's error; writes OUT/iga_confusion.png (3-class), OUT/iga_confusion_grades.png
    and OUT/iga_metrics.json.
    The paper (real photos): 3-class accuracy 0.667, recalls 0.64 / 0.70 / 0.65.
    """
    from synthtrial.graders import classify, iga_train
    from synthtrial.graders.base import get_grader

    grader = get_grader("iga", weights, device=device)
    with progress_bar("cropping faces", 1, unit="images", enabled=not quiet) as update:
        result = iga_train.evaluate(grader, data, identity, progress=update)
    folder = _eval_folder(data, out_dir)
    classify.confusion_png(folder / "iga_confusion.png", result["groups"], "IGA 3-class view (visits)")
    classify.confusion_png(folder / "iga_confusion_grades.png", result["grades"], "IGA grades (visits)")
    _write_json(folder / "iga_metrics.json", result)
    out.print(f"{result['visits']} visits ({result['images']} images) of {result['data']}"
              + (f", identities {', '.join(result['identities'])}" if result["identities"] else "")
              + f"; faces found in {result['faces_found']:.0%}")
    out.print(_report_table(result["groups"], "3-class view (paper: accuracy 0.667, recalls 0.64 / 0.70 / 0.65)"))
    out.print(_confusion_table(result["groups"], "3-class confusion"))
    out.print(_report_table(result["grades"], "IGA grades"))
    out.print(_confusion_table(result["grades"], "grade confusion"))
    out.print(f"mean |expected grade - true grade| {result['mae_expected_grade']:.3f}")
    out.print(_routes_table(result))
    if result.get("counts"):
        c = result["counts"]
        out.print(f"inflammatory count per visit: mean abs error {c['mae']:.2f} (true mean {c['mean_true']:.1f}, "
                  f"predicted {c['mean_predicted']:.1f}), Spearman r {c['spearman']:.3f}")
    out.print(f"[green]wrote[/green] {folder / 'iga_confusion.png'}, {folder / 'iga_metrics.json'}")


def _routes_table(result: dict[str, Any]) -> Table:
    """3-class accuracy and recalls of each route, and of the output against the visible lesions' IGA."""
    table = Table(title=f"3-class view by route (output: {result['grade_from']})", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for col in ("route", "truth", "accuracy", "recalls 0-1 / 2 / 3-4"):
        table.add_column(col, justify="left" if col in ("route", "truth") else "right")
    rows = [(name, "simulated", r) for name, r in result["routes"].items()]
    if "visible" in result:
        rows.append((result["grade_from"], "visible", result["visible"]))
    for name, truth, r in rows:
        table.add_row(name, truth, f"{r['accuracy']:.3f}", " / ".join(f"{v:.2f}" for v in r["recall"]))
    return table


# ------------------------------------------------------------------------------------------ ImageQX

@graders_train_app.command("imageqx")
@handles_errors
def train_imageqx(
    data: TrainData,
    out_dir: TrainOut,
    extra: Extra = None,
    identity: Identity = None,
    epochs: Epochs = 12,
    batch_size: BatchSize = 32,
    lr: LearningRate = 2e-3,
    lr_final: FinalRate = 1e-4,
    val_fraction: Annotated[float, typer.Option(min=0.0, max=0.9, help="Patients held out for validation "
                                                "(0: none).")] = 0.2,
    backbone: Annotated[str, typer.Option(help="timm model name (the paper: efficientnet_b0).")] =
    "efficientnet_b0",
    image_size: image_size_option(16, 1024) = 96,
    base_size: Annotated[int, typer.Option(min=32, max=2048, help="Side the clean images are brought to "
                                           "before they are degraded.")] = 256,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Horizontal flips of the degraded images "
                                          "(label-safe: nothing else is added to ImageQX's own degradations).")]
    = True,
    looks: Annotated[bool, typer.Option("--looks/--no-looks", help="Also vary each training image's look "
                                        "(brightness, contrast, colour, gamma, white balance, side light) well "
                                        "inside every label's margin: train on one portrait, grade another.")]
    = False,
    recipe: Annotated[str, typer.Option(help="Degradation recipe: varied (backgrounds, exposure, softening, noise, "
                                        "JPEG within the acceptable bounds on every image; blur on an absolute "
                                        "scale), wide (varied, plus wider acceptable exposure, colour and "
                                        "saturation, tight and shifted framings, and bad light further out) or "
                                        "narrow (the earlier one: clean renders).")] = "varied",
    photos: Annotated[int, typer.Option(min=0, max=100_000, help="Also train on this many crops of scikit-image's "
                                        "bundled photos (scenes, objects, textures; no face), degraded by the same "
                                        "recipe, so that the verdict rests on the degradation and not on the "
                                        "training portrait.")] = 0,
    weights_dtype: WeightsDtype = "float32",
    seed: Seed = 0,
    device: Device = None,
    restart: Restart = False,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Train ImageQX (quality verdict + five explanations) on degradations of clean images, labels known by construction.

    Each epoch degrades every image afresh (blur / motion blur, under- and over-exposure and colour casts,
    down-sampling, off-centre and cut-off crops, zoom-out; with the varied recipe also new backgrounds and
    acceptable exposure, softening, noise and JPEG on every image); loss CE + 5 BCE, class-weighted.

    Example (cross-portrait: train on the grader set's astronaut, evaluate on its hopper split):

      synthtrial graders train imageqx --data runs/graderset/train --out runs/weights/imageqx --looks --epochs 4 --weights-dtype float16

      synthtrial graders eval imageqx --data runs/graderset/test_portrait --weights runs/weights/imageqx
    """
    from synthtrial.graders import imageqx

    config = imageqx.ImageQXConfig(backbone=backbone, image_size=image_size)
    settings = imageqx.TrainSettings(epochs=epochs, batch_size=batch_size, lr=lr, lr_final=lr_final,
                                     val_fraction=val_fraction, seed=seed, base_size=base_size, augment=augment,
                                     looks=looks, recipe=recipe, photos=photos)
    stages = _Stages(not quiet)
    try:
        grader = imageqx.train(data, out_dir, extra=extra or (), identities=identity, config=config,
                               settings=settings, device=device, restart=restart, force=force,
                               weights_dtype=weights_dtype, read_progress=stages.stage("reading", "images"),
                               progress=stages.stage("training", "steps"))
    finally:
        stages.close()
    last = grader.record["history"][-1]
    val = (f", validation quality macro F1 {last['val_quality_macro_f1']:.3f}"
           if "val_quality_macro_f1" in last else "")
    out.print(f"[green]wrote[/green] {out_dir} ({grader.record['n_train']} clean images, final loss "
              f"{last['loss']:.3f}{val})")


@graders_eval_app.command("imageqx")
@handles_errors
def eval_imageqx(
    data: EvalData,
    weights: Weights = None,
    identity: Identity = None,
    seed: Seed = 12345,
    recipe: Annotated[Optional[str], typer.Option(help="Degradation recipe (varied, wide or narrow); default: the one "
                                                  "the weights were trained with.")] = None,
    out_dir: EvalOut = None,
    device: Device = None,
    quiet: Quiet = False,
) -> None:
    """Evaluate ImageQX on one seeded degradation of every image: quality precision / recall / F1 and the F1 of each explanation.

    The paper: macro F1 0.73 (raters 0.77). Writes OUT/imageqx_confusion.png and OUT/imageqx_metrics.json.
    """
    from synthtrial.graders import classify, imageqx
    from synthtrial.graders.base import get_grader

    grader = get_grader("imageqx", weights, device=device)
    with progress_bar("reading", 1, unit="images", enabled=not quiet) as update:
        result = imageqx.evaluate(grader, data, identity, seed=seed, recipe=recipe, progress=update)
    folder = _eval_folder(data, out_dir)
    classify.confusion_png(folder / "imageqx_confusion.png", result["quality"], "ImageQX quality")
    _write_json(folder / "imageqx_metrics.json", result)
    out.print(f"{result['images']} degraded images ({result['recipe']} recipe) of {result['data']}"
              + (f", identities {', '.join(result['identities'])}" if result["identities"] else ""))
    out.print(_report_table(result["quality"], "quality verdict (paper: macro F1 0.73)"))
    out.print(_confusion_table(result["quality"], "quality confusion"))
    table = Table(title="explanations", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("explanation")
    table.add_column("F1", justify="right")
    for name, f1 in result["explanation_f1"].items():
        table.add_row(imageqx.EXPLANATION_TEXT[name], f"{f1:.3f}")
    table.caption = f"macro F1 {result['explanation_macro_f1']:.4f}"
    out.print(table)
    out.print(f"[green]wrote[/green] {folder / 'imageqx_confusion.png'}, {folder / 'imageqx_metrics.json'}")
