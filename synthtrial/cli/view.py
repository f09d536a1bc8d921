"""`synthtrial view RUN`: browse a run in a web browser (served on 127.0.0.1, or written with --static)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from synthtrial.cli.common import Quiet, RunDir, app, handles_errors, out
from synthtrial.util.progress import progress_bar


@app.command("view")
@handles_errors
def view_command(
    run: RunDir,
    port: Annotated[Optional[int], typer.Option(min=1, max=65535, show_default=False,
                                                help="Port on 127.0.0.1 (default: 8765, or a free one when "
                                                     "8765 is taken).")] = None,
    static: Annotated[Optional[Path], typer.Option("--static", show_default=False,
                                                   help="Write the browser as a static site into this folder "
                                                        "instead of serving it (serve the folder with any web "
                                                        "server, e.g. python -m http.server -d DIR).")] = None,
    gradcam: Annotated[Optional[Path], typer.Option("--gradcam", show_default=False,
                                                    help="Folder of DermX Grad-CAM overlays written by "
                                                         "synthtrial graders explain RUN --out DIR "
                                                         "(default: RUN/gradcam when it exists).")] = None,
    quiet: Quiet = False,
) -> None:
    """Browse a run: pick a patient, scrub the days with the slider or the arrow keys, overlay the exact lesion masks and boxes by type, each grader's detections and tracks and DermX Grad-CAM maps, flip views, and follow the patient's trajectory (truth, oracle, every grader); a run page sets grader accuracy and the effects beside the truth.

    Serves on 127.0.0.1 until Ctrl-C; with [bold]--static DIR[/] writes the same pages and data as files.
    """
    from synthtrial.view.data import load
    from synthtrial.view.server import start, stop, url_of, write_static

    view = load(run, gradcam)
    if static is not None:
        with progress_bar("writing", len(view.manifest), unit="files", enabled=not quiet) as update:
            written = write_static(view, static, progress=update)
        out.print(f"[green]wrote[/green] {written} (serve it: python -m http.server -d {written})", soft_wrap=True)
        return
    server = start(view, port)
    try:  # Ctrl-C at any moment from here on stops the server and ends with status 0
        out.print(f"synthtrial view: open {url_of(server)}  (serving {run}; Ctrl-C stops)", markup=False,
                  soft_wrap=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop(server)
    out.print("synthtrial view: stopped", markup=False)
