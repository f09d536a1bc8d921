"""What every command shares: the Typer app and its groups, one-line errors (exit 2), consoles, shared options."""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from synthtrial.cli.helpformat import prepare_help
from synthtrial.version import __version__
from synthtrial.trial.simulate import PRESETS
from synthtrial.util.errors import SynthtrialError, SynthtrialWarning, one_line
from synthtrial.util.training import MAX_STEPS

EXIT_BAD_INPUT = 2
#: the command-line parser's errors: typer's public base class (typer vendors click from 0.2x on) and click's
CLI_ERRORS = (typer.TyperException, click.ClickException)


class OneLineErrors(TyperGroup):
    """Usage errors (bad option values, unknown options) as one line on stderr and exit status 2; help in
    the plain layout of :mod:`synthtrial.cli.helpformat`."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        prepare_help(self)  # plain help that renders well at 80 columns (synthtrial.cli.helpformat)
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except CLI_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command prints its help
                exc.show()
                sys.exit(exc.exit_code)
            message = " ".join(exc.format_message().split())
            if hasattr(exc, "ctx"):  # a usage error: bad option values, unknown options
                ctx = exc.ctx
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                print(f"synthtrial: error: {message}{hint}", file=sys.stderr)
                sys.exit(EXIT_BAD_INPUT)
            print(f"synthtrial: error: {message}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except typer.Abort:
            code = 130
        if code == 130:  # Ctrl-C or SIGTERM (typer turns KeyboardInterrupt into exit status 130)
            print("synthtrial: interrupted; finished work is kept: run the same command again to resume",
                  file=sys.stderr)
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


def fail(message: str) -> None:
    err.print(f"synthtrial: error: {message}", markup=False)
    raise typer.Exit(EXIT_BAD_INPUT)


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Show each :class:`SynthtrialWarning` as one line on stderr (``synthtrial: warning: ...``)."""
    with warnings.catch_warnings():
        shown = warnings.showwarning

        def show(message: Any, category: Any, *args: Any, **kwargs: Any) -> None:
            if issubclass(category, SynthtrialWarning):
                print(f"synthtrial: warning: {one_line(message)}", file=sys.stderr)
            else:
                shown(message, category, *args, **kwargs)

        warnings.showwarning = show
        yield


def handles_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a :class:`SynthtrialError` into one line on stderr and exit status 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with one_line_warnings():
                return func(*args, **kwargs)
        except SynthtrialError as exc:
            fail(one_line(exc))
        except OSError as exc:  # a full disk, a vanished folder, a permission: the file and the reason, one line
            where = exc.filename if exc.filename is not None else ""
            fail(f"{where}: {exc.strerror or one_line(exc)}" if where else one_line(exc))

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


RunDir = Annotated[Path, typer.Argument(help="A run directory written by [bold]synthtrial generate[/].",
                                        show_default=False)]

#: The run of the stages that also read and write object storage (synthtrial.run.remote): a folder or a URL.
RunLocation = Annotated[str, typer.Argument(help="A run directory written by [bold]synthtrial generate[/]: a folder, "
                                            "or a URL of object storage (s3://bucket/run, gs://..., file://...).",
                                            show_default=False)]

#: ``--scheduler`` of ``generate`` and ``grade``: the work goes to a running Dask cluster (synthtrial.util.cluster).
Scheduler = Annotated[Optional[str], typer.Option(
    "--scheduler", help="Address of a running Dask scheduler (tcp://HOST:PORT): its workers do the work and write "
    "the files (they must reach the run directory by the same path); the result is the same bytes.",
    show_default=False)]

# ------------------------------------------------------------------------------ shared options
# One declaration, one name per meaning, for every command: --device, --seed, --quiet, --batch-size,
# --image-size (a network's input side), --data (training / evaluation data), --out / --restart / --force
# of a training. Limits on sizes are part of the declaration, so --help states them and a value beyond is
# refused in one line before any work.

#: largest batch, image side and epoch count a command accepts (steps: the training loop's own MAX_STEPS)
MAX_BATCH = 4096
MAX_IMAGE_SIZE = 4096
MAX_EPOCHS = 100_000



def device_option(note: str = "", panel: Optional[str] = None) -> Any:
    """The ``--device`` option (``note`` adds a sentence, ``panel`` a help panel); :data:`Device` is the plain one."""
    return Annotated[Optional[str], typer.Option(help=f"Torch device: cpu, cuda or cuda:N (default: cuda if available, "
                                                 f"else cpu).{note}", show_default=False, rich_help_panel=panel)]


Device = device_option()
Seed = Annotated[int, typer.Option(min=0, max=2**63 - 1, help="Seed: the same seed and inputs write the same "
                                   "bytes.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, max=MAX_BATCH, help="Images (or crops) per step.")]
Epochs = Annotated[int, typer.Option(min=1, max=MAX_EPOCHS, help="Passes over the training images.")]
Steps = Annotated[int, typer.Option(min=1, max=MAX_STEPS, help="Optimiser steps.")]
TrainData = Annotated[list[Path], typer.Option("--data", help="Training data: a run directory (labels from its "
                                               "manifest) or an ACNE04 copy (repeatable).", show_default=False)]
EvalData = Annotated[Path, typer.Option("--data", help="A run directory (or, where the grader reads one, an ACNE04 "
                                        "copy) to evaluate on.", show_default=False)]
TrainOut = Annotated[Path, typer.Option("--out", "-o", help="Folder for model.safetensors + config.json "
                                        "(checkpoints in OUT/checkpoint; re-run to resume).", show_default=False)]
Restart = Annotated[bool, typer.Option("--restart", help="Ignore a checkpoint in OUT/checkpoint and start over (by "
                                       "default an interrupted training resumes from it).")]
Force = Annotated[bool, typer.Option("--force", help="Write into OUT even when it holds something else (a run, "
                                     "another grader's weights).")]
Weights = Annotated[Optional[Path], typer.Option(help="Weights folder (model.safetensors + config.json; default: "
                                                 "the shipped weights).", show_default=False)]


def augment_option(off: str) -> Any:
    """The ``--augment/--no-augment`` switch of a training; ``off`` says what ``--no-augment`` leaves."""
    return Annotated[bool, typer.Option("--augment/--no-augment", help="The graders' photometric and geometric "
                                        f"training augmentation (synthtrial.graders.augment). --no-augment: {off}.")]


#: ``--augment-strength``: the wide augmentation's photometric ranges scaled (synthtrial.graders.augment.scaled)
AugmentStrength = Annotated[float, typer.Option(min=0.0, max=1.0, help="Scale of the wide augmentation's colour, "
                                                "gamma, white-balance and light ranges (1: the full ranges; at 1 "
                                                "the IGA network learned nothing in 8 epochs, at 0.4 it learns).")]


def image_size_option(low: int, high: int, what: str = "Network input side in pixels") -> Any:
    """The ``--image-size`` option (a network's input side) with the limits of one network."""
    return Annotated[int, typer.Option("--image-size", min=low, max=high, help=f"{what}.")]


#: --preset choices, from the trial stage's ready-made designs (synthtrial.trial.simulate.PRESETS)
PresetName = Enum("PresetName", {name: name for name in PRESETS}, type=str)



graders_app = typer.Typer(help="Train, evaluate and list the embedded graders (IGA, ImageQX, lesion detector, "
                               "DermX, classical counter).", no_args_is_help=True)
app.add_typer(graders_app, name="graders")
#: ``synthtrial graders train NAME``: one command per trainable grader, each in its own CLI module
graders_train_app = typer.Typer(help="Train a grader from generated runs (or ACNE04); safetensors checkpoints, "
                                     "resumable, seeded.", no_args_is_help=True)
graders_app.add_typer(graders_train_app, name="train")
#: ``synthtrial graders eval NAME``: one command per grader
graders_eval_app = typer.Typer(help="Evaluate a grader on a run with known truth, as its paper reports it.",
                               no_args_is_help=True)
graders_app.add_typer(graders_eval_app, name="eval")
#: ``synthtrial graders calibrate NAME``: refit a grader's calibration on runs, the network unchanged
graders_calibrate_app = typer.Typer(help="Refit a trained grader's calibration on runs with known truth (the "
                                         "network is unchanged).", no_args_is_help=True)
graders_app.add_typer(graders_calibrate_app, name="calibrate")
