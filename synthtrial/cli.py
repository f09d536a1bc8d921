"""The ``synthtrial`` command line: a thin layer over the library, one public function per command.

Bad input ends with one line on stderr (``synthtrial: error: FILE: row N, column 'C': ...``) and exit
status 2; nothing is half-written.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich import box
from rich.console import Console
from typer.core import TyperGroup

try:  # typer vendors click from 0.2x on; older releases raise click's own exceptions
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError
from rich.table import Table

from synthtrial import __version__
from synthtrial.errors import SynthtrialError
from synthtrial.progress import progress_bar

EXIT_BAD_INPUT = 2


class OneLineErrors(TyperGroup):
    """Usage errors (bad option values, unknown options) as one line on stderr and exit status 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NoArgsIsHelpError as exc:
            exc.show()  # a bare command prints its help
            sys.exit(exc.exit_code)
        except UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            print(f"synthtrial: error: {' '.join(exc.format_message().split())}{hint}", file=sys.stderr)
            sys.exit(EXIT_BAD_INPUT)
        except ClickException as exc:
            print(f"synthtrial: error: {' '.join(exc.format_message().split())}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            print("synthtrial: aborted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    name="synthtrial",
    help="Simulate multimodal N-of-1 acne trials: protocols, patients' acne courses and the truth behind "
         "them, so that graders and analysis pipelines can be tested against a known answer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
protocol_app = typer.Typer(
    help="Check, design and simulate trial protocols (the CSV files that [bold]generate[/] reads).",
    no_args_is_help=True,
)
app.add_typer(protocol_app, name="protocol")
data_app = typer.Typer(help="Check training data (ACNE04 and per-level folders).", no_args_is_help=True)
app.add_typer(data_app, name="data")
faces_app = typer.Typer(help="Build folders of portraits for generate --faces.", no_args_is_help=True)
app.add_typer(faces_app, name="faces")

out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str) -> None:
    err.print(f"synthtrial: error: {message}", markup=False)
    raise typer.Exit(EXIT_BAD_INPUT)


def handles_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`SynthtrialError` into one line on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SynthtrialError as exc:
            _fail(str(exc))

    return wrapper


def _version(value: bool) -> None:
    if value:
        out.print(f"synthtrial {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Simulate multimodal N-of-1 acne trials with a known truth.

    Start with [bold]synthtrial protocol design --preset quick --out quick.csv[/], then
    [bold]synthtrial protocol check quick.csv[/].
    """


# --------------------------------------------------------------------------------------------- scale

@app.command("scale")
@handles_errors
def scale_command(
    severity: Annotated[Optional[list[float]], typer.Argument(
        help="Latent severities (0-3) to look up; default: a table from 0 to 3 in steps of 0.25.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON records instead of a table.")] = False,
) -> None:
    """Show the severity scale: latent severity -> expected lesions -> ACNE04 level -> IGA.

    The scale is a modelling assumption: lesion counts are piecewise linear through (0, 0), (0.5, 5.5), (1.5, 20.5), (2.5, 50.5), (3, 65); ACNE04 levels follow Hayashi's counts (<=5, 6-20, 21-50, >50); IGA follows the inflammatory lesions the lesion mix expects.
    """
    from synthtrial.scale import SEVERITY_MAX, SEVERITY_MIN, scale_table

    for s in severity or []:
        if not SEVERITY_MIN <= s <= SEVERITY_MAX:
            raise SynthtrialError(f"severity {s:g} is outside the scale 0-3 (argument SEVERITY)")
    table = scale_table(severity or None)
    if as_json:
        out.print_json(data=table.to_dict(orient="records"))
        return
    view = Table(title="synthtrial severity scale (a modelling assumption)")
    for name in ("severity", "lesions", "inflam.", "ACNE04", "IGA", "3-class"):
        view.add_column(name, no_wrap=True, justify="right" if name in ("severity", "lesions", "inflam.") else "left")
    for rec in table.itertuples(index=False):
        view.add_row(f"{rec.severity:g}", f"{rec.expected_lesions:g}", f"{rec.inflammatory_fraction:.0%}",
                     f"{rec.acne04_level} {rec.acne04_name}", f"{rec.iga} {rec.iga_name}", str(rec.iga_group))
    out.print(view)


# ------------------------------------------------------------------------------------------ protocol

@protocol_app.command("check")
@handles_errors
def protocol_check(
    file: Annotated[Path, typer.Argument(help="Protocol CSV, in the native or the anchor form.",
                                         show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Validate a protocol CSV and summarise it: patients, days, treatments, blocks, severity range.

    Both forms are read: the anchor form of synthetic_acne_images ([italic],patient_id,date,block,day,treatment,AcneSeverity[/]) and the native form ([italic]patient_id,day,date,treatment,block,severity,view,face[/], the last four optional). Any problem is reported as one line naming the file, the row (as a spreadsheet numbers it) and the column, with exit status 2.
    """
    from synthtrial.protocol import read_protocol, summarize

    summary = summarize(read_protocol(file))
    if as_json:
        out.print_json(data=summary)
        return
    table = Table(title=f"{file}  ({summary['form']} form)", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    ids = summary["patient_ids"]
    table.add_row("patients", f"{summary['patients']}  ({', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''})")
    table.add_row("rows", str(summary["rows"]))
    dpp = summary["days_per_patient"]
    table.add_row("days per patient", str(dpp["min"]) if dpp["min"] == dpp["max"] else f"{dpp['min']}-{dpp['max']}")
    table.add_row("day range", "{} - {}".format(*summary["day_range"]))
    if summary["date_range"]:
        table.add_row("dates", "{} - {}".format(*summary["date_range"]))
    table.add_row("treatments", ", ".join(f"{k} ({v} rows)" for k, v in summary["treatments"].items()))
    table.add_row("blocks", ", ".join(map(str, summary["blocks"])) or "-")
    table.add_row("views", ", ".join(summary["views"]))
    if summary["severity"]:
        sev = summary["severity"]
        table.add_row("severity", f"{sev['min']:.3f} - {sev['max']:.3f} (mean {sev['mean']:.3f})")
        table.add_row("ACNE04 levels", ", ".join(f"{k}: {v}" for k, v in summary["acne04_levels"].items()))
    else:
        table.add_row("severity", "not given: the trial simulator will fill it in")
    out.print(table)
    out.print("[green]OK[/green]")


class Form(str, Enum):
    native = "native"
    anchor = "anchor"


class DesignName(str, Enum):
    baseline_alternating = "baseline-alternating"
    abab = "abab"
    pairs = "pairs"


class PresetName(str, Enum):
    anchor = "anchor"
    quick = "quick"


def _parse_effects(values: list[str]) -> dict[str, float]:
    effects: dict[str, float] = {}
    for item in values:
        arm, sep, number = item.partition("=")
        arm = arm.strip()
        if not sep or not arm:
            raise SynthtrialError(f"--effect '{item}' must look like ARM=NUMBER, e.g. --effect Cream=-0.5")
        try:
            effects[arm] = float(number)
        except ValueError:
            raise SynthtrialError(f"--effect '{item}': '{number}' is not a number") from None
    return effects


_DESIGN_PANEL = "Schedule"
_MODEL_PANEL = "Severity model"


@protocol_app.command("design")
@handles_errors
def protocol_design(
    out_path: Annotated[Path, typer.Option("--out", "-o", help="Protocol CSV to write; its truth goes to "
                                           "<stem>.truth.json beside it.", show_default=False)],
    preset: Annotated[PresetName, typer.Option(help="Start from a ready-made trial; every other option "
                                               "overrides it. anchor: 10 x 140 days, Baseline / Antibiotics / "
                                               "Cream in 28-day periods. quick: 3 x 16 days, Fu et al.'s "
                                               "2-off / 2-on blocks.")] = PresetName.anchor,
    seed: Annotated[int, typer.Option(help="Seed: the same seed writes the same bytes.")] = 0,
    form: Annotated[Form, typer.Option(help="native, or anchor for the synthetic_acne_images layout.")] = Form.native,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
    design: Annotated[Optional[DesignName], typer.Option(
        help="baseline-alternating: a reference period, then the active arms in turn; abab: the two arms "
             "alternate; pairs: blocks of two periods, AB or BA.", rich_help_panel=_DESIGN_PANEL)] = None,
    arms: Annotated[Optional[str], typer.Option(
        help="Comma-separated treatment names, reference (control/baseline) first.",
        rich_help_panel=_DESIGN_PANEL)] = None,
    patients: Annotated[Optional[int], typer.Option(min=1, help="Number of patients.",
                                                    rich_help_panel=_DESIGN_PANEL)] = None,
    blocks: Annotated[Optional[int], typer.Option(min=1, help="Periods (pairs of periods for the pairs design).",
                                                  rich_help_panel=_DESIGN_PANEL)] = None,
    period_days: Annotated[Optional[int], typer.Option(min=1, help="Days in one treatment period.",
                                                       rich_help_panel=_DESIGN_PANEL)] = None,
    washout_days: Annotated[Optional[int], typer.Option(min=0, help="Washout days between periods "
                                                        "(treatment 'Washout', no block).",
                                                        rich_help_panel=_DESIGN_PANEL)] = None,
    randomize: Annotated[Optional[bool], typer.Option(
        "--randomize/--fixed-order", help="Draw the order of periods per patient.",
        rich_help_panel=_DESIGN_PANEL)] = None,
    start_date: Annotated[Optional[str], typer.Option(help="Date of the first day (YYYY-MM-DD).",
                                                      rich_help_panel=_DESIGN_PANEL)] = None,
    first_day: Annotated[Optional[int], typer.Option(min=0, help="Number of the first day (the anchor uses 1).",
                                                     rich_help_panel=_DESIGN_PANEL)] = None,
    effect: Annotated[Optional[list[str]], typer.Option(
        help="Population effect of an arm on severity (0-3 scale; negative improves), as ARM=NUMBER; "
             "repeat per arm. Arms not named have no effect.", rich_help_panel=_MODEL_PANEL)] = None,
    effect_sd: Annotated[Optional[float], typer.Option(help="SD of each patient's own effect around it.",
                                                       rich_help_panel=_MODEL_PANEL)] = None,
    baseline_mean: Annotated[Optional[float], typer.Option(help="Mean baseline severity.",
                                                           rich_help_panel=_MODEL_PANEL)] = None,
    baseline_sd: Annotated[Optional[float], typer.Option(help="SD of baseline severity between patients.",
                                                         rich_help_panel=_MODEL_PANEL)] = None,
    baseline_min: Annotated[Optional[float], typer.Option(help="Lowest baseline (the normal is truncated).",
                                                          rich_help_panel=_MODEL_PANEL)] = None,
    baseline_max: Annotated[Optional[float], typer.Option(help="Highest baseline.",
                                                          rich_help_panel=_MODEL_PANEL)] = None,
    trend: Annotated[Optional[float], typer.Option(help="Linear trend in severity per day.",
                                                   rich_help_panel=_MODEL_PANEL)] = None,
    washin_half_life: Annotated[Optional[float], typer.Option(
        help="Days for a treatment to reach half its effect (0: at once).", rich_help_panel=_MODEL_PANEL)] = None,
    washout_half_life: Annotated[Optional[float], typer.Option(
        help="Days for an effect to halve after stopping (carryover; 0: at once).",
        rich_help_panel=_MODEL_PANEL)] = None,
    ar_phi: Annotated[Optional[float], typer.Option(help="AR(1) autocorrelation of day-to-day noise.",
                                                    rich_help_panel=_MODEL_PANEL)] = None,
    noise_sd: Annotated[Optional[float], typer.Option(help="Stationary SD of the day-to-day noise.",
                                                      rich_help_panel=_MODEL_PANEL)] = None,
    missing_rate: Annotated[Optional[float], typer.Option(help="Chance that a day is missing (dropped).",
                                                          rich_help_panel=_MODEL_PANEL)] = None,
) -> None:
    """Design an N-of-1 trial and simulate every patient's acne severity, keeping the truth.

    Writes the protocol CSV and [italic]<stem>.truth.json[/] (every parameter, every patient's baseline, true effects and delivered effects). Severity on day d is baseline + trend + effects (with first-order wash-in, washout and carryover) + AR(1) noise, clipped to the 0-3 scale.

    Examples:

      synthtrial protocol design --out trial.csv

      synthtrial protocol design --preset quick --seed 3 --out quick.csv

      synthtrial protocol design --design pairs --arms Control,Cream --blocks 3 --period-days 7
      --effect Cream=-0.4 --patients 20 --out pairs.csv
    """
    from synthtrial.simulate import preset as get_preset, simulate_trial, truth_path_for

    base_design, base_model = get_preset(preset.value)
    design_changes = {k: v for k, v in {
        "design": design.value if design else None,
        "arms": tuple(a.strip() for a in arms.split(",")) if arms is not None else None,
        "n_patients": patients, "blocks": blocks, "period_days": period_days, "washout_days": washout_days,
        "randomize": randomize, "start_date": start_date, "first_day": first_day,
    }.items() if v is not None}
    model_changes = {k: v for k, v in {
        "effects": _parse_effects(effect) if effect else None,
        "effect_sd": effect_sd, "baseline_mean": baseline_mean, "baseline_sd": baseline_sd,
        "baseline_min": baseline_min, "baseline_max": baseline_max, "trend_per_day": trend,
        "washin_half_life": washin_half_life, "washout_half_life": washout_half_life, "ar_phi": ar_phi,
        "noise_sd": noise_sd, "missing_rate": missing_rate,
    }.items() if v is not None}
    if "arms" in design_changes and "effects" not in model_changes:
        # the preset's effects name the preset's arms; keep those that still exist
        model_changes["effects"] = {a: v for a, v in base_model.effects.items() if a in design_changes["arms"]}
    trial_design = dataclasses.replace(base_design, **design_changes)
    model = dataclasses.replace(base_model, **model_changes)

    truth_path = truth_path_for(out_path)
    if not force:
        for p in (out_path, truth_path):
            if p.exists():
                raise SynthtrialError(f"{p} already exists; pass --force to replace it (option --out)")
    if out_path.exists() and out_path.is_dir():
        raise SynthtrialError(f"{out_path} is a directory (option --out)")
    trial = simulate_trial(trial_design, model, seed=seed)
    trial.write(out_path, form=form.value)
    truth = trial.truth
    out.print(f"[green]wrote[/green] {out_path} ({len(trial.protocol)} rows, {trial_design.n_patients} patients "
              f"x {trial_design.days_per_patient} days) and {truth_path}")
    effects = ", ".join(f"{a} {v:+.3f} (delivered {truth['mean_delivered_effects'][a]:+.3f})"
                        for a, v in truth["population_effects"].items())
    out.print(f"true effects vs {truth['reference']}: {effects or 'none'}")


# ------------------------------------------------------------------------------------------ generate

class Naming(str, Enum):
    native = "native"
    anchor = "anchor"


class Backend(str, Enum):
    procedural = "procedural"
    img2img = "sdxl-img2img"
    inpaint = "sdxl-inpaint"


_DIFFUSION_PANEL = "Diffusion backends (GPU recommended)"


@app.command("generate")
@handles_errors
def generate_command(
    protocol: Annotated[Path, typer.Argument(help="Protocol CSV (native or anchor form).")] = Path("protocols/trial.csv"),
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory to write "
                                                    "(default: runs/<protocol name>).", show_default=False)] = None,
    faces: Annotated[Optional[Path], typer.Option(help="Folder of frontal portraits to use as patients' faces "
                                                  "(e.g. ACNE04 level-0 images); default: the public-domain "
                                                  "portraits shipped with scikit-image and matplotlib.",
                                                  show_default=False)] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed: the same seed writes the same bytes.")] = 0,
    size: Annotated[int, typer.Option(min=128, max=4096, help="Image side in pixels.")] = 512,
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering in parallel (does not change the "
                                         "result).")] = 1,
    naming: Annotated[Naming, typer.Option(help="native: <patient>_<YYYYMMDD>_<view>.png; anchor: "
                                           "synthetic_acne_images' <patient>_<YYYYMMDD>_severity_<N>.png.")]
    = Naming.native,
    backend: Annotated[Backend, typer.Option(help="procedural: the fast CPU lesion renderer. sdxl-img2img: the "
                                             "anchor's SDXL img2img with per-level LoRA (lesion placement not "
                                             "controlled). sdxl-inpaint: the procedural lesion map, repainted by "
                                             "SDXL inpainting inside the dilated lesion masks only.",
                                             rich_help_panel=_DIFFUSION_PANEL)] = Backend.procedural,
    model: Annotated[Optional[str], typer.Option(help="SDXL base: a local folder or a hub id (only a hub id "
                                                 "downloads). Default: stabilityai/stable-diffusion-xl-base-1.0.",
                                                 show_default=False, rich_help_panel=_DIFFUSION_PANEL)] = None,
    lora: Annotated[Optional[Path], typer.Option(help="LoRA folder from synthtrial finetune: one adapter, or "
                                                 "subfolders acne0..acne3.", show_default=False,
                                                 rich_help_panel=_DIFFUSION_PANEL)] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Inference steps (default 30).", show_default=False,
                                                 rich_help_panel=_DIFFUSION_PANEL)] = None,
    strength: Annotated[Optional[float], typer.Option(help="Denoising strength (default 0.1 for img2img, 0.75 "
                                                      "for inpaint).", show_default=False,
                                                      rich_help_panel=_DIFFUSION_PANEL)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Guidance scale (default 12).", show_default=False,
                                                      rich_help_panel=_DIFFUSION_PANEL)] = None,
    device: Annotated[Optional[str], typer.Option(help="Torch device (default: cuda if available). Under "
                                                  "accelerate launch each process takes its own GPU.",
                                                  show_default=False, rich_help_panel=_DIFFUSION_PANEL)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float16 | bfloat16 | float32 (default: float16 on CUDA).",
                                                 show_default=False, rich_help_panel=_DIFFUSION_PANEL)] = None,
    compile_unet: Annotated[bool, typer.Option("--compile", help="torch.compile the UNet (CUDA).",
                                               rich_help_panel=_DIFFUSION_PANEL)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Render a protocol into a run directory: an image series per patient with exact lesion ground truth.

    Every lesion is a persistent object with a life course, drawn at the same anatomical spot every day; the lesion count follows the protocol's severity through the severity scale ([bold]synthtrial scale[/]). Patients beyond the number of portraits get a distinct skin type, geometry, lighting and framing.

    Writes images/, masks/ (16-bit instance maps), manifest.parquet (+ .csv), lesions.parquet, config.json, truth.json and grids/ (a contact sheet per patient). Re-run the same command to resume an interrupted run: the result is byte-identical to an uninterrupted one.
    """
    from synthtrial.run import generate

    diffusion = {k: v for k, v in {
        "model": model, "lora": None if lora is None else str(lora), "num_inference_steps": steps,
        "guidance_scale": guidance, "device": device, "dtype": dtype, "compile": compile_unet or None,
    }.items() if v is not None}
    if strength is not None:
        diffusion["strength" if backend is Backend.img2img else "inpaint_strength"] = strength
    run_dir = generate(protocol, out_dir, faces_dir=faces, seed=seed, size=size, naming=naming.value,
                       workers=workers, progress=not quiet, backend=backend.value, diffusion=diffusion or None)
    out.print(f"[green]wrote[/green] {run_dir}  (look at {run_dir / 'grids'})")


# ---------------------------------------------------------------------------------------------- data

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
    resolution: Annotated[int, typer.Option(min=8, help="Training resolution.")] = 1024,
    steps: Annotated[int, typer.Option("--max-train-steps", min=1, help="Optimizer steps.")] = 500,
    learning_rate: Annotated[float, typer.Option(help="Learning rate (constant schedule).")] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per step.")] = 1,
    accumulation: Annotated[int, typer.Option("--gradient-accumulation-steps", min=1, help="Gradient "
                                              "accumulation.")] = 3,
    snr_gamma: Annotated[float, typer.Option(help="Min-SNR weighting gamma (0 turns it off).")] = 5.0,
    rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 4,
    checkpointing_steps: Annotated[int, typer.Option(min=1, help="Save a resumable checkpoint every N steps.")] = 100,
    mixed_precision: Annotated[Optional[str], typer.Option(help="no | fp16 | bf16 (default: fp16 on CUDA, no on "
                                                           "CPU).", show_default=False)] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed.")] = 0,
) -> None:
    """DreamBooth fine-tuning with LoRA (peft) on the SDXL UNet, through accelerate: the anchor's recipe by default (1024 px, lr 1e-4 constant, snr_gamma 5, 500 steps, batch 1 x accumulation 3, gradient checkpointing, fp16 on GPU).

    Writes pytorch_lora_weights.safetensors for [bold]synthtrial generate --lora[/]. Checkpoints are safetensors + JSON; re-running the same command resumes from the latest one.
    """
    from synthtrial.finetune import FinetuneConfig, finetune

    if level != "all" and level not in ("0", "1", "2", "3"):
        raise SynthtrialError(f"--level must be 0, 1, 2, 3 or all, got '{level}'")
    config = FinetuneConfig(base=base, level=None if level == "all" else int(level), instance_prompt=instance_prompt,
                            resolution=resolution, train_batch_size=batch_size,
                            gradient_accumulation_steps=accumulation, learning_rate=learning_rate,
                            snr_gamma=snr_gamma or None, max_train_steps=steps, rank=rank, seed=seed,
                            mixed_precision=mixed_precision, checkpointing_steps=checkpointing_steps)
    with progress_bar("training", steps, unit="steps") as update:
        weights = finetune(data, out_dir, config, progress=lambda step, total, loss: update(step, f"loss {loss:.4f}"))
    out.print(f"[green]wrote[/green] {weights}")


@faces_app.command("generate")
@handles_errors
def faces_generate(
    n: Annotated[int, typer.Option("--n", min=1, help="Portraits to keep.")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (face_0000.png ..., faces.csv).",
                                          show_default=False)],
    model: Annotated[str, typer.Option(help="SDXL base: a local folder or a hub id (only a hub id downloads).")]
    = "stabilityai/stable-diffusion-xl-base-1.0",
    seed: Annotated[int, typer.Option(min=0, help="Seed of the prompts and images.")] = 0,
    size: Annotated[int, typer.Option(min=64, help="Image side in pixels.")] = 1024,
    steps: Annotated[int, typer.Option(min=1, help="Inference steps.")] = 30,
    guidance: Annotated[float, typer.Option(help="Guidance scale.")] = 7.0,
    max_tries: Annotated[Optional[int], typer.Option(min=1, help="Give up after this many images "
                                                     "(default 4 x --n).", show_default=False)] = None,
) -> None:
    """Render a bank of diverse, privacy-free synthetic portraits (ages, sexes, Fitzpatrick skin types I-VI, lighting) with the base model, keeping those where MediaPipe finds one frontal face.

    The folder it writes is what [bold]synthtrial generate --faces[/] takes: a distinct identity for every patient.
    """
    from synthtrial.facebank import generate_face_bank

    with progress_bar("portraits", max_tries or 4 * n, unit="tries") as update:
        table = generate_face_bank(n, model, out_dir, seed=seed, size=size, steps=steps, guidance=guidance,
                                   max_tries=max_tries, progress=lambda tries, kept: update(tries, f"{kept} kept"))
    out.print(f"[green]kept[/green] {len(table)} of the rendered portraits in {out_dir}")


# -------------------------------------------------------------------------------------------- export

RunDir = Annotated[Path, typer.Argument(help="A run directory written by [bold]synthtrial generate[/].",
                                        show_default=False)]


class ExportFormat(str, Enum):
    coco = "coco"
    acne04 = "acne04"
    imagefolder = "imagefolder"


@app.command("export")
@handles_errors
def export_command(
    run: RunDir,
    fmt: Annotated[ExportFormat, typer.Option("--format", "-f", help="coco: detection JSON of the lesion boxes "
                                              "and masks; acne04: ACNE04 label lines (filename level count) "
                                              "with patient-wise folds; imagefolder: a Hugging Face imagefolder "
                                              "with metadata.csv.", show_default=False)],
    out_dir: Annotated[Optional[Path], typer.Option("--out", "-o", help="Where to write (default: "
                                                    "RUN/exports/<format>).", show_default=False)] = None,
    folds: Annotated[int, typer.Option(min=2, help="Folds for the acne04 format (split by patient).")] = 5,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the patient-to-fold assignment.")] = 0,
) -> None:
    """Export a run's images and ground truth to a grader's training format."""
    from synthtrial.export import export_run

    path = export_run(run, fmt.value, out_dir, folds=folds, seed=seed)
    out.print(f"[green]wrote[/green] {path}")


# ------------------------------------------------------------------------------------------- analyze

_ANALYSIS_PANEL = "Analysis"


@app.command("analyze")
@handles_errors
def analyze_command(
    run: RunDir,
    autoencoder: Annotated[bool, typer.Option("--autoencoder/--no-autoencoder",
                                              help="Train the unsupervised autoencoder + PCA outcome.")] = True,
    epochs: Annotated[int, typer.Option(help="Autoencoder training epochs.", rich_help_panel=_ANALYSIS_PANEL)] = 10,
    image_size: Annotated[int, typer.Option(help="Autoencoder input size (power of two; Schneider et al.: 256).",
                                            rich_help_panel=_ANALYSIS_PANEL)] = 256,
    trend: Annotated[bool, typer.Option("--trend/--no-trend", help="Adjust the pooled model for a linear time "
                                        "trend.", rich_help_panel=_ANALYSIS_PANEL)] = True,
    permutations: Annotated[int, typer.Option(help="Permutations per permutation test.",
                                              rich_help_panel=_ANALYSIS_PANEL)] = 2000,
    alpha: Annotated[float, typer.Option(help="Significance level (CIs are 1 - alpha).",
                                         rich_help_panel=_ANALYSIS_PANEL)] = 0.05,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the autoencoder and the permutations.")] = 0,
    device: Annotated[Optional[str], typer.Option(help="Torch device for the autoencoder (default: cuda if "
                                                  "available, else cpu).", show_default=False)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Estimate the treatment effects of a run from its images, each beside the truth it simulated.

    Outcomes: the oracle severity, the lesion count (also read on the severity scale), IGA, any grader scores in RUN/grades.parquet, and Schneider et al.'s unsupervised autoencoder + PCA score. Tests: per-patient Welch t, permutation and GLS with AR(1) errors; pooled linear mixed model with random intercept and treatment slopes. Writes RUN/analysis/: outcomes.parquet, effects.csv (estimate, SE, CI, p, true effect, bias, covered) and report.html.
    """
    import pandas as pd

    from synthtrial.analyze.pipeline import AnalysisSettings, analysis_summary, analyze_run

    settings = AnalysisSettings(autoencoder=autoencoder, epochs=epochs, image_size=image_size, trend=trend,
                                n_permutations=permutations, seed=seed, alpha=alpha)
    folder = analyze_run(run, settings, device=device, progress=not quiet)
    summary = analysis_summary(pd.read_csv(folder / "effects.csv"))
    table = Table(title="pooled effects (linear mixed model) beside the truth", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("outcome", "arm", f"estimate [{1 - alpha:.0%} CI]", "p", "truth"):
        table.add_column(col, justify="left" if col in ("outcome", "arm") else "right", no_wrap=True)
    for rec in summary.itertuples(index=False):
        truth = "" if pd.isna(rec.true_effect) else f"{rec.true_effect:+.2f} " + (
            "✓" if str(rec.covered) == "True" else "✗ missed")
        table.add_row(rec.outcome, rec.arm, f"{rec.estimate:+.2f} [{rec.ci_low:+.2f}, {rec.ci_high:+.2f}]",
                      f"{rec.p:.0e}", truth)
    out.print(table)
    out.print(f"[green]wrote[/green] {folder} (open {folder / 'report.html'})")


class PowerMethod(str, Enum):
    welch = "welch"
    permutation = "permutation"
    gls_ar1 = "gls_ar1"
    lmm = "lmm"


class PowerOutcome(str, Enum):
    oracle = "oracle"
    lesion_severity = "lesion_severity"


@app.command("power")
@handles_errors
def power_command(
    design_file: Annotated[Optional[Path], typer.Option("--design", help="A truth file written by [bold]protocol "
                                                        "design[/] (its design and severity model are reused).",
                                                        show_default=False)] = None,
    preset: Annotated[Optional[PresetName], typer.Option(help="A ready-made design instead of --design.",
                                                         show_default=False)] = None,
    replicates: Annotated[int, typer.Option(min=1, help="Simulated trials.")] = 200,
    null: Annotated[bool, typer.Option("--null", help="Set every effect (and its spread) to zero: rejection rates "
                                       "are type I errors.")] = False,
    effect: Annotated[Optional[list[str]], typer.Option(help="Override an arm's population effect, ARM=NUMBER "
                                                        "(repeatable).")] = None,
    patients: Annotated[Optional[int], typer.Option(min=1, help="Override the number of patients.")] = None,
    alpha: Annotated[float, typer.Option(help="Significance level.")] = 0.05,
    trend: Annotated[bool, typer.Option("--trend/--no-trend", help="Adjust for a linear time trend.")] = True,
    method: Annotated[Optional[list[PowerMethod]], typer.Option(help="Tests to run (repeatable; default: welch, "
                                                                "gls_ar1, lmm).", show_default=False)] = None,
    outcome: Annotated[Optional[list[PowerOutcome]], typer.Option(help="Outcomes (repeatable; default: both).",
                                                                  show_default=False)] = None,
    random_intercept: Annotated[bool, typer.Option("--random-intercept", help="Pooled model with a random "
                                                   "intercept only (faster; no random treatment slopes).")] = False,
    workers: Annotated[int, typer.Option(min=1, help="Processes (the result does not depend on it).")] = 1,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the replicates.")] = 0,
    out_path: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the summary CSV here (every "
                                                     "estimate goes to <stem>.estimates.csv beside it).",
                                                     show_default=False)] = None,
) -> None:
    """Type I error and power of every analysis over many simulated trials (no rendering needed).

    Each replicate simulates a new trial from the design and analyses the oracle severity and the lesion count the lesion model would draw, with per-patient Welch t and GLS-AR(1) tests and the pooled mixed model. Rejection rates come with their Monte-Carlo standard error.
    """
    from synthtrial.analyze.power import DEFAULT_METHODS, POWER_OUTCOMES, design_from_file, power_study, with_effects
    from synthtrial.simulate import preset as get_preset

    if design_file is not None and preset is not None:
        raise SynthtrialError("give --design or --preset, not both")
    design, model = design_from_file(design_file) if design_file else get_preset((preset or PresetName.quick).value)
    if patients is not None:
        design = dataclasses.replace(design, n_patients=patients)
    model = with_effects(model, _parse_effects(effect) if effect else None, null=null)
    for arm in model.effects:
        if arm not in design.arms:
            raise SynthtrialError(f"--effect {arm}=...: not an arm of the design ({', '.join(design.arms)})")
    if out_path is not None and out_path.is_dir():
        raise SynthtrialError(f"{out_path} is a directory (option --out)")
    with progress_bar("replicates", replicates) as update:
        estimates, summary = power_study(
            design, model, replicates, seed=seed, workers=workers, alpha=alpha, trend=trend,
            methods=[m.value for m in method] if method else DEFAULT_METHODS,
            outcomes=[o.value for o in outcome] if outcome else POWER_OUTCOMES, random_slopes=not random_intercept,
            on_replicate=lambda done, total: update(done))
    table = Table(title=f"{replicates} simulated trials, {design.n_patients} patients x {design.days_per_patient} days, "
                        f"alpha {alpha}", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for col in ("outcome", "test", "arm", "effect", "rate", "of", "MC SE", "bias", "cover"):
        table.add_column(col, justify="left" if col in ("outcome", "test", "arm", "of") else "right", no_wrap=True)
    for rec in summary.itertuples(index=False):
        table.add_row(rec.outcome, rec.method if rec.level == "pooled" else f"{rec.method}/pt", rec.arm,
                      f"{rec.population_effect:+.2f}", f"{rec.rejection_rate:.3f}",
                      "type I" if rec.quantity == "type I error" else "power", f"{rec.mc_se:.3f}",
                      f"{rec.bias:+.3f}", "" if rec.coverage != rec.coverage else f"{rec.coverage:.2f}")
    out.print(table)
    out.print("rate: share of tests rejecting at alpha (type I error where the effect is 0, else power); "
              "/pt: one test per patient")
    if out_path is not None:
        from synthtrial.atomic import write_text_atomic

        write_text_atomic(out_path, summary.to_csv(index=False, lineterminator="\n"))
        estimates_path = out_path.with_name(f"{out_path.stem}.estimates.csv")
        write_text_atomic(estimates_path, estimates.to_csv(index=False, lineterminator="\n"))
        out.print(f"[green]wrote[/green] {out_path} and {estimates_path}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
