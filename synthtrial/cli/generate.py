"""`synthtrial generate`: render a protocol into a run directory."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from synthtrial.run.generation import MAX_WORKERS
from synthtrial.cli.common import Quiet, Scheduler, Seed, app, device_option, err, handles_errors, out
from synthtrial.render.base import BACKENDS as BACKEND_SPECS


class Naming(str, Enum):
    native = "native"
    anchor = "anchor"


#: --backend choices, from the renderer registry (synthtrial.render.base.BACKENDS)
Backend = Enum("Backend", {name.replace("-", "_"): name for name in BACKEND_SPECS}, type=str)


_DIFFUSION_PANEL = "Diffusion backends (GPU recommended)"


def _diffusion(help: str, **limits) -> typer.models.OptionInfo:
    """An option of the diffusion backends (no default shown: the backend's own applies)."""
    return typer.Option(help=help, show_default=False, rich_help_panel=_DIFFUSION_PANEL, **limits)


@app.command("generate")
@handles_errors
def generate_command(
    protocol: Annotated[Path, typer.Argument(help="Protocol CSV (native or anchor form). A shipped protocol is "
                                             "found by name from any directory: trial, quick, views, graders "
                                             "(or protocols/<name>.csv).")] = Path("protocols/trial.csv"),
    out_dir: Annotated[Optional[str], typer.Option("--out", "-o", help="Run directory to write: a folder, or a URL "
                                                   "of object storage (s3://bucket/run, gs://..., file://...) "
                                                   "(default: runs/<protocol name>).", show_default=False)] = None,
    faces: Annotated[Optional[Path], typer.Option(help="Folder of frontal portraits to use as patients' faces "
                                                  "(e.g. ACNE04 level-0 images); default: the public-domain "
                                                  "portraits shipped with scikit-image and matplotlib.",
                                                  show_default=False)] = None,
    seed: Seed = 0,
    size: Annotated[int, typer.Option(min=128, max=4096, help="Image side in pixels.")] = 512,
    workers: Annotated[int, typer.Option(min=1, max=MAX_WORKERS, help="Processes rendering in parallel (does "
                                         "not change the result).")] = 1,
    scheduler: Scheduler = None,
    naming: Annotated[Naming, typer.Option(help="native: <patient>_<YYYYMMDD>_<view>.png; anchor: "
                                           "synthetic_acne_images' <patient>_<YYYYMMDD>_severity_<N>.png.")]
    = Naming.native,
    backend: Annotated[Backend, typer.Option(help=" ".join(f"{s.name}: {s.summary}." for s in BACKEND_SPECS.values()),
                                             rich_help_panel=_DIFFUSION_PANEL)] = Backend("procedural"),
    model: Annotated[Optional[str], _diffusion("SDXL base: a local folder or a hub id (only a hub id downloads). "
                                               "Default: stabilityai/stable-diffusion-xl-base-1.0.")] = None,
    lora: Annotated[Optional[Path], _diffusion("LoRA folder from synthtrial finetune: one adapter, or subfolders "
                                               "acne0..acne3.")] = None,
    steps: Annotated[Optional[int], _diffusion("Inference steps (default 30).", min=1)] = None,
    strength: Annotated[Optional[float], _diffusion("Denoising strength (default 0.1 for img2img, 0.75 for "
                                                    "inpaint).")] = None,
    guidance: Annotated[Optional[float], _diffusion("Guidance scale (default 12).")] = None,
    device: device_option(" Under accelerate launch each process takes its own GPU.", _DIFFUSION_PANEL) = None,
    dtype: Annotated[Optional[str], _diffusion("float16 | bfloat16 | float32 (default: float16 on CUDA).")] = None,
    compile_unet: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (CUDA).",
                                               rich_help_panel=_DIFFUSION_PANEL)] = False,
    yaw: Annotated[float, typer.Option("--yaw", help="Head turn of the left/right views, in degrees (the 3-D face "
                                       "mesh is rotated; 0-60).")] = 25.0,
    quality_filter: Annotated[bool, typer.Option("--quality-filter", help="Score every image with the ImageQX "
                                                 "quality grader and record its verdict in the manifest "
                                                 "(quality_acceptable, quality_p, quality_reason); with --faces, "
                                                 "portraits it refuses are left out, one line each.")] = False,
    reject: Annotated[bool, typer.Option("--reject", help="With --quality-filter: draw a rejected image again with "
                                         "the next seed (up to 3 attempts; render_attempt in the manifest).")]
    = False,
    counterfactual: Annotated[bool, typer.Option("--counterfactual", help="Also render every patient's series had "
                                                 "it received each arm of the design on every day (same face, same "
                                                 "lesions until the worlds diverge) into counterfactual/<arm>/, "
                                                 "each a run directory, with the individual effects (factual minus "
                                                 "counterfactual severity and lesion count per patient-day) in "
                                                 "counterfactual/individual_effects.parquet. Needs the simulation "
                                                 "truth.")] = False,
    quiet: Quiet = False,
) -> None:
    """Render a protocol into a run directory: an image series per patient with exact lesion ground truth.

    Every lesion is a persistent object with a life course, drawn at the same anatomical spot every day; the lesion count follows the protocol's severity through the severity scale ([bold]synthtrial scale[/]). Patients beyond the number of portraits get a distinct skin type, geometry, lighting and framing.

    Writes images/, masks/ (16-bit instance maps), manifest.parquet (+ .csv), lesions.parquet, config.json, truth.json and grids/ (a contact sheet per patient). Re-run the same command to resume an interrupted run: the result is byte-identical to an uninterrupted one.
    """
    from synthtrial.run.generation import generate

    diffusion = {k: v for k, v in {
        "model": model, "lora": None if lora is None else str(lora), "num_inference_steps": steps,
        "guidance_scale": guidance, "device": device, "dtype": dtype, "compile": compile_unet or None,
    }.items() if v is not None}
    if strength is not None:
        diffusion["strength" if backend.value == "sdxl-img2img" else "inpaint_strength"] = strength
    quality = None
    if quality_filter:  # the run stage takes the quality filter as a component; the graders build ImageQX
        from synthtrial.graders.base import get_grader

        quality = get_grader("imageqx", device="cpu")
    run_dir = generate(protocol, out_dir, faces_dir=faces, seed=seed, size=size, naming=naming.value,
                       workers=workers, progress=not quiet, backend=backend.value, diffusion=diffusion or None,
                       quality=quality, reject=reject, yaw_deg=yaw, counterfactual=counterfactual,
                       scheduler=scheduler)
    from synthtrial.run.rundir import CONFIG, GRIDS

    if quality_filter and faces is not None:
        import fsspec

        with fsspec.open(f"{run_dir}/{CONFIG}", "rt", encoding="utf-8") as fh:   # a folder or object storage
            refused = json.load(fh)["faces"].get("refused", [])
        for item in refused:
            err.print(f"synthtrial: portrait {faces / item['file']} left out: {item['reason']}", markup=False)
    out.print(f"[green]wrote[/green] {run_dir}  (look at {run_dir}/{GRIDS})")
