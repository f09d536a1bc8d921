"""`synthtrial data check`, `finetune`, `faces generate`: training data and models for the diffusion backends."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich import box
from rich.table import Table

from synthtrial.cli.common import (BatchSize, Quiet, Restart, Seed, Steps, app, data_app, faces_app, handles_errors,
                                   image_size_option, out)
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.progress import progress_bar


@data_app.command("check")
@handles_errors
def data_check(
    folder: Annotated[Path, typer.Argument(help="ACNE04 as released (NNEW_*.txt labels, JPEGImages/, VOC XML) "
                                           "or per-level folders acne0_1024/ ... acne3_1024/.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Validate an ACNE04-style dataset and print counts per level.

    Checks label lines, that every labelled image exists and opens, that labels agree across files, and that labels agree with the VOC boxes (box count = label count; grade = Hayashi level of the count). Any problem is one line naming the file (and line), exit status 2.
    """
    from synthtrial.data.acne04 import scan_acne04, summarize_acne04

    summary = summarize_acne04(scan_acne04(folder))
    if as_json:
        out.print_json(data=summary)
        return
    table = Table(title=f"{folder}  ({summary['layout']} layout)", title_justify="left", box=box.SIMPLE_HEAD)
    table.add_column("level")
    table.add_column("images", justify="right")
    for level, n in summary["per_level"].items():
        table.add_row(str(level), str(n))
    table.add_row("all", str(summary["images"]))
    out.print(table)
    if summary["boxes"] is not None:
        out.print(f"{summary['boxes']} lesion boxes; splits: {', '.join(summary['splits'])}")
    out.print("[green]OK[/green]")


@app.command("finetune")
@handles_errors
def finetune_command(
    data: Annotated[Path, typer.Option(help="ACNE04 (released layout) or per-level folders acne0_1024/ ...",
                                       show_default=False)],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for the LoRA weights, checkpoints and "
                                          "training log (re-run to resume).", show_default=False)],
    base: Annotated[str, typer.Option(help="Base model: a local folder or a hub id (only a hub id downloads); "
                                      "SDXL or SD 1.5.")] = "stabilityai/stable-diffusion-xl-base-1.0",
    level: Annotated[str, typer.Option(help="ACNE04 level 0-3 (one adapter per level, as the anchor), or 'all' "
                                       "for one adapter with a severity token per level.")] = "all",
    instance_prompt: Annotated[str, typer.Option(help="Prompt; {level} is replaced by the image's level.")]
    = "photo of a person with acne{level}",
    image_size: image_size_option(8, 4096, "Training resolution: images are resized and centre-cropped to this "
                                  "side (a multiple of 8)") = 1024,
    steps: Steps = 500,
    learning_rate: Annotated[float, typer.Option("--lr", min=0.0, max=10.0, help="Learning rate (constant "
                                                 "schedule).")] = 1e-4,
    batch_size: BatchSize = 1,
    accumulation: Annotated[int, typer.Option("--gradient-accumulation-steps", min=1, max=1024, help="Gradient "
                                              "accumulation.")] = 3,
    snr_gamma: Annotated[float, typer.Option(min=0.0, max=1e6, help="Min-SNR weighting gamma (0 turns it off).")]
    = 5.0,
    rank: Annotated[int, typer.Option(min=1, max=1024, help="LoRA rank.")] = 4,
    checkpointing_steps: Annotated[int, typer.Option(min=1, max=10_000_000, help="Save a resumable checkpoint every "
                                                     "N steps.")] = 100,
    mixed_precision: Annotated[Optional[str], typer.Option(help="no | fp16 | bf16 (default: fp16 on CUDA, no on "
                                                           "CPU).", show_default=False)] = None,
    seed: Seed = 0,
    restart: Restart = False,
    quiet: Quiet = False,
) -> None:
    """DreamBooth fine-tuning with LoRA (peft) on the SDXL UNet, through accelerate: the anchor's recipe by default (1024 px, lr 1e-4 constant, snr_gamma 5, 500 steps, batch 1 x accumulation 3, gradient checkpointing, fp16 on GPU).

    Writes pytorch_lora_weights.safetensors for [bold]synthtrial generate --lora[/]. The checkpoint (OUT/checkpoint) is safetensors + JSON; re-running the same command resumes from it (--restart starts over).
    """
    from synthtrial.render.finetune import FinetuneConfig, finetune

    if level != "all" and level not in ("0", "1", "2", "3"):
        raise SynthtrialError(f"--level must be 0, 1, 2, 3 or all, got '{level}'")
    config = FinetuneConfig(base=base, level=None if level == "all" else int(level), instance_prompt=instance_prompt,
                            resolution=image_size, train_batch_size=batch_size,
                            gradient_accumulation_steps=accumulation, learning_rate=learning_rate,
                            snr_gamma=snr_gamma or None, max_train_steps=steps, rank=rank, seed=seed,
                            mixed_precision=mixed_precision, checkpointing_steps=checkpointing_steps)
    with progress_bar("training", steps, unit="steps", enabled=not quiet) as update:
        weights = finetune(data, out_dir, config, restart=restart,
                           progress=update)
    out.print(f"[green]wrote[/green] {weights}")


@faces_app.command("generate")
@handles_errors
def faces_generate(
    n: Annotated[int, typer.Option("--n", min=1, help="Portraits to keep.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (face_0000.png ..., faces.csv).",
                                          show_default=False)],
    model: Annotated[str, typer.Option(help="SDXL base: a local folder or a hub id (only a hub id downloads).")]
    = "stabilityai/stable-diffusion-xl-base-1.0",
    seed: Seed = 0,
    size: Annotated[int, typer.Option(min=64, help="Image side in pixels.")] = 1024,
    steps: Annotated[int, typer.Option(min=1, help="Inference steps.")] = 30,
    guidance: Annotated[float, typer.Option(help="Guidance scale.")] = 7.0,
    max_tries: Annotated[Optional[int], typer.Option(min=1, help="Give up after this many images "
                                                     "(default 4 x --n).", show_default=False)] = None,
) -> None:
    """Render a bank of diverse, privacy-free synthetic portraits (ages, sexes, Fitzpatrick skin types I-VI, lighting) with the base model, keeping those where MediaPipe finds one frontal face.

    The folder it writes is what [bold]synthtrial generate --faces[/] takes: a distinct identity for every patient.
    """
    from synthtrial.render.facebank import generate_face_bank

    with progress_bar("portraits", max_tries or 4 * n, unit="tries") as update:
        table = generate_face_bank(n, model, out_dir, seed=seed, size=size, steps=steps, guidance=guidance,
                                   max_tries=max_tries, progress=update)
    out.print(f"[green]kept[/green] {len(table)} of the rendered portraits in {out_dir}")
