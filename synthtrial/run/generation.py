"""``synthtrial generate``: turn a protocol into a run directory of image series with exact ground truth.

The run directory's layout and schemas belong to :mod:`synthtrial.run.rundir`; the backends to the registry of
:mod:`synthtrial.render.base`. Every file is written atomically. Each finished image also leaves a small
record under ``RUN/.parts``; a re-run of the same command re-renders exactly the images and masks that are
missing or whose bytes no longer match their record (a deleted, truncated or edited file), so an
interrupted or damaged run heals and ends with the same bytes as an uninterrupted one. A run directory is
written by one process at a time (``RUN/.lock``); everything a user gives is checked before the first write,
so a refused command leaves nothing behind. Work is spread over processes by patient and chunk; the result
does not depend on the number of workers. Ctrl-C or SIGTERM stops the workers at once; workers whose parent
dies exit on their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial import __version__
from synthtrial.run import rundir
from synthtrial.trial import scale
from synthtrial.util.atomic import write_bytes_atomic, write_text_atomic
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.progress import progress_bar
from synthtrial.trial.protocol import has_severity, read_protocol, to_csv_text
from synthtrial.render.base import BACKENDS as BACKEND_SPECS
from synthtrial.render.base import RenderRequest, backend_names, get_backend
from synthtrial.run.rundir import RunError
from synthtrial.util.seeding import derive_seed

NAMINGS = ("native", "anchor")
#: The backends ``--backend`` accepts, from the registry (synthtrial.render.base.BACKENDS).
BACKENDS = backend_names()
CHUNK = 8
#: With --reject, an image ImageQX rejects is drawn again with the next derived seed, at most this many times.
MAX_RENDER_ATTEMPTS = 3

__all__ = ["BACKENDS", "GenerateSettings", "NAMINGS", "RunError", "generate", "image_stem", "png_bytes",
           "render_config"]


@dataclass(frozen=True)
class GenerateSettings:
    """What decides a run's bytes (the number of workers does not); checked when built."""

    seed: int = 0
    size: int = 512
    naming: str = "native"
    backend: str = "procedural"
    quality_filter: bool = False   # ImageQX scores every image (and the --faces portraits) before it is kept
    reject: bool = False           # re-render a rejected image with the next derived seed (needs quality_filter)
    yaw_deg: float = 25.0          # head turn of the left/right views

    def __post_init__(self) -> None:
        if self.reject and not self.quality_filter:
            raise RunError("--reject needs --quality-filter")
        if not 128 <= self.size <= 4096:
            raise RunError(f"--size must be between 128 and 4096 pixels, got {self.size}")
        if self.naming not in NAMINGS:
            raise RunError(f"--naming must be one of {', '.join(NAMINGS)}, got '{self.naming}'")
        get_backend(self.backend)
        if self.seed < 0:
            raise RunError(f"--seed must be >= 0, got {self.seed}")
        if not 0 < self.yaw_deg < 60:
            raise RunError(f"--yaw must be between 0 and 60 degrees (exclusive), got {self.yaw_deg:g}")


# ------------------------------------------------------------------------------------------ naming

def image_stem(patient_id: str, day: int, date: Any, view: str, severity: float, naming: str) -> str:
    """File stem of one image. ``anchor`` naming is synthetic_acne_images': ``{patient}_{YYYYMMDD}_severity_{N}``."""
    if naming == "anchor":
        if pd.isna(date):
            raise RunError(f"--naming anchor needs a date on every row; patient '{patient_id}' day {day} has none")
        level = min(round(float(severity)), 3)  # the anchor's own rule, ties to even
        stem = f"{patient_id}_{pd.Timestamp(date):%Y%m%d}_severity_{level}"
        return stem if view == "frontal" else f"{stem}_{view}"
    when = f"{pd.Timestamp(date):%Y%m%d}" if not pd.isna(date) else f"d{int(day):03d}"
    return f"{patient_id}_{when}_{view}"


# ------------------------------------------------------------------------------------------- helpers

def png_bytes(array: np.ndarray, compress_level: int = 4) -> bytes:
    """PNG bytes of an image or a 16-bit mask (fixed settings, so the same array gives the same bytes)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def package_versions() -> dict[str, str]:
    out = {"synthtrial": __version__}
    for name in ("numpy", "opencv-contrib-python", "mediapipe", "pillow", "scikit-image", "scipy", "pandas",
                 "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def render_config():
    """The procedural renderer's settings for runs (every backend draws its lesion map with them): the
    lesion model already sizes growing and fading lesions, so the renderer does not shrink them again."""
    from synthtrial.render.procedural import ProceduralConfig

    return ProceduralConfig(size_at_zero_intensity=1.0)


# ------------------------------------------------------------------------------------------- workers

@dataclass(frozen=True)
class _PatientJob:
    """Everything a worker needs to rebuild one patient's face and lesion course."""

    run_dir: str
    patient_id: str
    patient_index: int          # order among patients without an explicit face
    face: str | None
    faces_dir: str | None
    protocol_dir: str
    settings: GenerateSettings
    days: tuple[int, ...]
    severity: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)   # the backend's options (e.g. DiffusionConfig fields)
    excluded_faces: tuple[str, ...] = ()                     # --faces portraits ImageQX refused


_CACHE: dict[tuple, Any] = {}
_RENDERERS: dict[str, Any] = {}   # one renderer per process and configuration: models load once
_QUALITY: dict[str, Any] = {}     # the ImageQX grader, loaded once per process when --quality-filter is on


def _quality_grader():
    if "imageqx" not in _QUALITY:
        from synthtrial.graders.base import get_grader

        _QUALITY["imageqx"] = get_grader("imageqx", device="cpu")
    return _QUALITY["imageqx"]


def _renderer(job: _PatientJob):
    key = json.dumps([job.settings.backend, job.options], sort_keys=True)
    if key not in _RENDERERS:
        _RENDERERS[key] = get_backend(job.settings.backend).build(render_config(), job.options)
    return _RENDERERS[key]


def _patient_state(job: _PatientJob):
    """The patient's face and lesion course, built once per process."""
    key = (job.run_dir, job.patient_id)
    if key not in _CACHE:
        from synthtrial.face.faces import Identity, face_from_request, identity_for, load_base_faces, make_face
        from synthtrial.lesions.course import LesionCourse

        size = job.settings.size
        if job.face:
            base = face_from_request(job.face, job.faces_dir, Path(job.protocol_dir), job.patient_id)
            face = make_face(base, Identity(base=base.key), size)
        else:
            bases = load_base_faces(job.faces_dir, exclude=job.excluded_faces)
            identity = identity_for(job.patient_index, bases, job.settings.seed)
            face = make_face(next(b for b in bases if b.key == identity.base), identity, size)
        course = LesionCourse(face, job.days, job.severity, seed=job.settings.seed, patient_id=job.patient_id)
        _CACHE.clear()  # one patient at a time per process keeps memory flat
        _CACHE[key] = (face, course, {}, _renderer(job))
    return _CACHE[key]


def _record(run_dir: Path, row: dict[str, Any]) -> dict[str, Any] | None:
    """The image's record when the image, its mask and the record agree byte for byte; else None (redo it)."""
    try:
        record = json.loads((run_dir / row["part"]).read_text())
        if rundir.sha256_file(run_dir / row["image"]) == record["sha256"] and \
                rundir.sha256_file(run_dir / row["mask"]) == record["mask_sha256"]:
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _render_images(job: _PatientJob, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Render the images of one patient's chunk that are missing or damaged; returns every row's record.

    Whenever any image of the chunk must be (re)drawn, the whole chunk goes through the backend's
    ``render_batch``, so the batch, and with it every image's bytes, is the same as on the first run (a
    diffusion backend's output depends on its batch); only the images that need it are written.
    """
    run_dir = Path(job.run_dir)
    records = [_record(run_dir, row) for row in rows]
    if any(r is None for r in records):
        face, course, views, renderer = _patient_state(job)
        prepared = [_prepare(job, face, course, views, row) for row in rows]
        results = renderer.render_batch([
            RenderRequest(image=p["face"].image, lesions=p["specs"], skin_mask=p["face"].skin, stats=p["stats"],
                          seed=p["seed"], severity=p["row"]["severity"]) for p in prepared])
        for k, (p, result) in enumerate(zip(prepared, results, strict=True)):
            if records[k] is None:
                quality = _quality(job, renderer, p, result) if job.settings.quality_filter else None
                if quality is not None:
                    p, result = quality.pop("prepared"), quality.pop("result")
                records[k] = _write_image(run_dir, face, course, p, result, quality)
    return records  # type: ignore[return-value]


def _quality(job: _PatientJob, renderer, prepared: dict[str, Any], result) -> dict[str, Any]:
    """ImageQX's verdict on a rendered image; with --reject, the image is drawn again with the next derived
    seed until it is accepted or MAX_RENDER_ATTEMPTS are spent (the last attempt is kept, flagged)."""
    grader = _quality_grader()
    attempt = 0
    while True:
        verdict = grader.verdicts([result.image]).iloc[0]
        if bool(verdict["acceptable"]) or not job.settings.reject or attempt + 1 >= MAX_RENDER_ATTEMPTS:
            break
        attempt += 1
        prepared = {**prepared, "seed": derive_seed("render", job.settings.seed, job.patient_id,
                                                    prepared["row"]["day"], prepared["row"]["view"], attempt,
                                                    bits=32)}
        result = renderer.render_batch([RenderRequest(
            image=prepared["face"].image, lesions=prepared["specs"], skin_mask=prepared["face"].skin,
            stats=prepared["stats"], seed=prepared["seed"], severity=prepared["row"]["severity"])])[0]
    return {"prepared": prepared, "result": result, "quality_acceptable": bool(verdict["acceptable"]),
            "quality_p": round(float(verdict["p_acceptable"]), 4), "quality_reason": str(verdict["reason"]),
            "render_attempt": attempt}


def _prepare(job: _PatientJob, face, course, views: dict, row: dict[str, Any]) -> dict[str, Any]:
    """The face (in the row's view), its photo statistics, and the day's lesions as renderer specs."""
    from synthtrial.render.base import LesionSpec
    from synthtrial.render.procedural import photo_stats

    view = row["view"]
    if view not in views:
        face_v = face.view(view, job.settings.yaw_deg)
        views[view] = (face_v, photo_stats(face_v.image, face_v.skin))
    face_v, stats = views[view]
    states = course.on(row["day"])
    if states:
        centres = face_v.to_pixels(np.array([s.triangle for s in states]), np.stack([s.bary for s in states]))
    else:
        centres = np.zeros((0, 2))
    # a lesion out of sight in a side view (the far cheek behind the nose) is not drawn: intensity 0
    seen = face_v.visible(np.array([s.triangle for s in states], np.int64),
                          np.stack([s.bary for s in states])) if states else np.zeros(0, bool)
    specs = [LesionSpec(lesion_id=s.lesion_id, type=s.type, cx=float(c[0]), cy=float(c[1]),
                        radius_px=float(s.radius * face_v.scale), intensity=s.intensity if v else 0.0, seed=s.seed)
             for s, c, v in zip(states, centres, seen, strict=True)]
    seed = derive_seed("render", job.settings.seed, job.patient_id, row["day"], view, bits=32)
    return {"row": row, "face": face_v, "stats": stats, "states": states, "specs": specs, "seed": seed}


def _write_image(run_dir: Path, face, course, prepared: dict[str, Any], result,
                 quality: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the image, its instance mask and its record (the record last: it marks the image as done)."""
    row, states, specs = prepared["row"], prepared["states"], prepared["specs"]
    label = np.zeros(result.image.shape[:2], dtype=np.uint16)
    areas = []
    for spec, mask, box in zip(specs, result.masks, result.boxes, strict=True):
        win = _box_window(box, label.shape)  # masks lie inside their boxes: work on the crop
        crop = mask[win]
        label[win][crop] = spec.lesion_id + 1
        areas.append(int(crop.sum()))
    image_bytes = png_bytes(result.image)
    mask_bytes = png_bytes(label, compress_level=1)  # mostly zeros: cheap
    write_bytes_atomic(run_dir / row["image"], image_bytes)
    write_bytes_atomic(run_dir / row["mask"], mask_bytes)
    counts = {t: 0 for t in scale.ALL_LESION_TYPES}
    lesions = []
    for state, spec, area, box in zip(states, specs, areas, result.boxes, strict=True):
        counts[state.type] += 1
        lesions.append({
            "lesion_id": state.lesion_id, "type": state.type,
            "x0": float(box[0]), "y0": float(box[1]), "x1": float(box[2]), "y1": float(box[3]),
            "cx": round(spec.cx, 3), "cy": round(spec.cy, 3), "radius_px": round(spec.radius_px, 3),
            "mask_area": area, "stage": state.stage, "age_days": int(state.age_days),
            "intensity": round(state.intensity, 4), "diameter_mm": round(state.diameter_mm, 3),
        })
    n_active = sum(counts[t] for t in scale.LESION_TYPES)
    n_inflammatory = counts["papule"] + counts["pustule"] + counts["nodule"]
    record = {
        "image": row["image"], "mask": row["mask"], "seed": prepared["seed"],
        "sha256": rundir.sha256_bytes(image_bytes), "mask_sha256": rundir.sha256_bytes(mask_bytes),
        "width": int(result.image.shape[1]), "height": int(result.image.shape[0]),
        "lesion_count": n_active, "target_count": course.target(row["day"]),
        **{f"n_{t}": c for t, c in counts.items()},
        "acne04_level": int(scale.acne04_level_from_count(n_active)),
        "iga": int(scale.iga_from_counts(n_inflammatory, counts["nodule"])),
        "identity": face.identity.to_json(), "face_source": face.source,
        "mm_per_px": round(prepared["face"].mm_per_px, 5),
        **(quality or {"quality_acceptable": None, "quality_p": None, "quality_reason": "", "render_attempt": 0}),
        "lesions": lesions,
    }
    write_text_atomic(run_dir / row["part"], json.dumps(record, sort_keys=True))
    return record


def _box_window(box: np.ndarray, shape: tuple[int, int]) -> tuple[slice, slice]:
    x0, y0, x1, y1 = box
    return (slice(max(0, int(np.floor(y0))), min(shape[0], int(np.ceil(y1)))),
            slice(max(0, int(np.floor(x0))), min(shape[1], int(np.ceil(x1)))))


def _work(task: tuple[_PatientJob, list[dict[str, Any]]]) -> tuple[str, list[dict[str, Any]]]:
    job, rows = task
    return job.patient_id, _render_images(job, rows)


def _worker_init(parent: int) -> None:
    """In each worker: leave Ctrl-C to the parent, and exit when the parent is gone (even after kill -9)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so the workers are stopped (and the command ends) as for Ctrl-C."""


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def _render_all(tasks, workers: int, finished: Callable[[str, list[dict[str, Any]]], None]) -> None:
    if workers == 1:
        for task in tasks:
            finished(*_work(task))
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    pool = ctx.Pool(processes=workers, initializer=_worker_init, initargs=(os.getpid(),))
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        for pid, recs in pool.imap_unordered(_work, tasks):
            finished(pid, recs)
        pool.close()
    except BaseException:
        pool.terminate()   # Ctrl-C, SIGTERM or an error: stop rendering now; finished images are kept
        raise
    finally:
        pool.join()
        if in_main:
            signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------------------------------- the command

def generate(protocol_path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
             faces_dir: str | os.PathLike[str] | None = None, seed: int = 0, size: int = 512,
             naming: str = "native", workers: int = 1, progress: bool = True, backend: str = "procedural",
             diffusion: dict[str, Any] | None = None, quality_filter: bool = False, reject: bool = False,
             yaw_deg: float = 25.0,
             on_progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Render every row of a protocol into a run directory and return its path (see the module docstring).

    ``out`` defaults to ``runs/<protocol stem>``. ``on_progress(done, total, status)`` is called after each chunk
    of images.
    ``diffusion`` holds the backend's options (:class:`synthtrial.render.diffusion.DiffusionConfig` fields for
    the sdxl backends). ``quality_filter`` scores every image with ImageQX and records the verdict in the
    manifest (``quality_acceptable``, ``quality_p``, ``quality_reason``); ``reject`` draws a rejected image again
    with the next derived seed (``render_attempt``); with ``faces_dir`` the portraits are checked first and
    refused ones are left out, each with its reason in ``config.json``. Under ``accelerate launch`` (several processes, e.g. one per GPU) each process
    renders its share of the images and the main process writes the one manifest.
    """
    settings = GenerateSettings(seed=seed, size=size, naming=naming, backend=backend,
                                quality_filter=quality_filter, reject=reject, yaw_deg=yaw_deg)
    if workers < 1:
        raise RunError(f"--workers must be >= 1, got {workers}")
    options, recorded = _backend_options(settings.backend, diffusion)
    state = _distributed_state()
    protocol_path = Path(protocol_path)
    protocol = read_protocol(protocol_path)
    run_dir = Path(out) if out is not None else Path("runs") / protocol_path.stem
    _check_out(run_dir)
    faces_dir_str = None if faces_dir is None else str(Path(faces_dir))

    from synthtrial.face.faces import face_files

    face_inputs, refused = [], []
    if faces_dir is not None:
        face_inputs = [{"file": p.name, "sha256": rundir.sha256_file(p)} for p in face_files(faces_dir)]
        if settings.quality_filter:
            refused = _check_portraits(faces_dir)

    truth, protocol = _severities(protocol, protocol_path, seed)
    spec = get_backend(settings.backend)
    config = {
        "synthtrial_version": __version__,
        "settings": asdict(settings),
        "protocol": {"source": str(protocol_path), "sha256": rundir.sha256_bytes(to_csv_text(protocol).encode()),
                     "rows": int(len(protocol))},
        "faces": {"dir": faces_dir_str, "files": face_inputs, "builtin": faces_dir is None,
                  **({"refused": refused} if refused else {})},
        "backend": {"name": spec.name, "summary": spec.summary, "placement_exact": spec.placement_exact},
        "renderer": asdict(render_config()),
        "packages": package_versions(),
    }
    if options:
        config["diffusion"] = {k: v for k, v in recorded.items() if k != "device"}
    jobs, tasks, total = _plan(protocol, run_dir, settings, faces_dir_str, protocol_path, options,
                               tuple(r["file"] for r in refused))
    _check_faces(jobs, faces_dir_str, protocol_path, tuple(r["file"] for r in refused))  # every check first

    main = state is None or state.is_main_process
    lock = rundir.locked(run_dir) if main else contextlib.nullcontext()  # shards run under the main's lock
    with lock:
        if main:
            _prepare_run_dir(run_dir, config)
            rundir.remove_stale_temps(run_dir)
            write_text_atomic(run_dir / rundir.PROTOCOL, to_csv_text(protocol))
            if truth is not None:
                write_text_atomic(run_dir / rundir.TRUTH, json.dumps(truth, indent=2) + "\n")
        if state is not None:
            state.wait_for_everyone()
            if not main:
                _prepare_run_dir(run_dir, config)  # verifies the main process's config
            jobs, tasks, total = _plan(protocol, run_dir, settings, faces_dir_str, protocol_path,
                                       {**options, "device": str(state.device)} if options else options,
                                       tuple(r["file"] for r in refused))
            workers = 1
        all_tasks = tasks
        if state is not None:
            tasks = tasks[state.process_index::state.num_processes]
            total = sum(len(rows) for _, rows in tasks)
        records: dict[str, list[dict[str, Any]]] = {pid: [] for pid in jobs}
        done = 0
        with progress_bar("rendering", total, unit="images", enabled=progress) as update:
            def finished(pid: str, recs: list[dict[str, Any]]) -> None:
                nonlocal done
                records[pid].extend(recs)
                done += len(recs)
                update(done)
                if on_progress is not None:
                    on_progress(done, total, "")

            _render_all(tasks, workers, finished)

        if state is not None:
            state.wait_for_everyone()
            if not main:
                return run_dir
            records = {pid: [] for pid in jobs}  # every image now has its record: gather them all
            for job, rows in all_tasks:
                records[job.patient_id].extend(_render_images(job, rows))
        manifest, lesions = _tables(protocol, records, settings)
        rundir.write_manifest(run_dir, manifest, lesions)
        from synthtrial.run.grids import write_grids

        write_grids(run_dir, manifest)
    return run_dir


def _check_out(run_dir: Path) -> None:
    """Refuse an --out that can never be a run directory, before anything is written."""
    from synthtrial.util.atomic import check_writable

    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} exists and is not a folder (option --out)")
    check_writable(run_dir / rundir.CONFIG)


def _backend_options(backend: str, options: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The backend's options, checked now by building the backend once (models load lazily later), and every
    setting it runs with (its config with defaults filled in), as config.json records it."""
    options = dict(options or {})
    spec = get_backend(backend)
    if options and not spec.options:
        raise RunError(f"--model, --lora and the other diffusion options need --backend "
                       f"{' or '.join(n for n, s in BACKEND_SPECS.items() if s.options)}")
    config = getattr(spec.build(render_config(), options), "config", None)
    return options, (asdict(config) if config is not None else dict(options))


def _distributed_state():
    """accelerate's process state when launched as several processes (accelerate launch), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def _severities(protocol: pd.DataFrame, protocol_path: Path, seed: int) -> tuple[dict | None, pd.DataFrame]:
    """Severities from the protocol (and its truth file beside it); the trial simulator fills in only the
    patients that have none. A patient's given severities are never replaced."""
    from synthtrial.trial.protocol import patients_without_severity
    from synthtrial.trial.simulate import SeverityModel, simulate_severity, truth_path_for

    if has_severity(protocol):
        truth_file = truth_path_for(protocol_path)
        truth = rundir.read_json(truth_file, what="the simulation truth (a JSON object)") \
            if truth_file.is_file() else None
        return truth, protocol
    missing = patients_without_severity(protocol)
    todo = protocol[protocol["patient_id"].isin(missing)]
    first = str(protocol["treatment"].iloc[0])
    trial = simulate_severity(todo.reset_index(drop=True), SeverityModel(), seed=seed,
                              reference=first if first in set(todo["treatment"]) else None)
    if len(missing) == protocol["patient_id"].nunique():
        return trial.truth, trial.protocol
    given = protocol[~protocol["patient_id"].isin(missing)]
    order = {pid: i for i, pid in enumerate(dict.fromkeys(protocol["patient_id"]))}
    merged = pd.concat([given, trial.protocol], ignore_index=True)
    merged = merged.sort_values("patient_id", key=lambda col: col.map(order), kind="stable").reset_index(drop=True)
    merged.attrs.update(protocol.attrs)
    truth = {**trial.truth, "simulated_patients": missing,
             "given_patients": list(dict.fromkeys(given["patient_id"]))}
    return truth, merged


def _prepare_run_dir(run_dir: Path, config: dict[str, Any]) -> None:
    config_path = run_dir / rundir.CONFIG
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    if config_path.exists() or config_path.is_symlink():
        if not config_path.is_file():
            raise RunError(f"{config_path} is not a file; choose another --out")
        try:
            same = config_path.read_bytes() == text.encode()
        except OSError as exc:
            raise RunError(f"{config_path}: cannot be read ({exc.strerror})") from None
        if not same:
            raise RunError(f"{run_dir} holds a run made with other settings, protocol, faces or package versions; "
                           "choose another --out or delete it")
        return  # resume
    if not rundir.is_empty_dir(run_dir):
        raise RunError(f"{run_dir} is not empty and is not a synthtrial run (no config.json); choose another --out")
    write_text_atomic(config_path, text)


def _plan(protocol: pd.DataFrame, run_dir: Path, settings: GenerateSettings, faces_dir: str | None,
          protocol_path: Path, options: dict[str, Any], excluded_faces: tuple[str, ...] = ()):
    jobs: dict[str, _PatientJob] = {}
    tasks = []
    total = 0
    auto_index = 0
    for pid, rows in protocol.groupby("patient_id", sort=False):
        per_day = rows.drop_duplicates("day")
        face = rows["face"].dropna().iloc[0] if rows["face"].notna().any() else None
        job = _PatientJob(run_dir=str(run_dir), patient_id=str(pid), patient_index=auto_index, face=face,
                          faces_dir=faces_dir, protocol_dir=str(protocol_path.parent), settings=settings,
                          days=tuple(int(d) for d in per_day["day"]),
                          severity=tuple(float(s) for s in per_day["severity"]), options=options,
                          excluded_faces=excluded_faces)
        if face is None:
            auto_index += 1
        jobs[str(pid)] = job
        items = []
        for rec in rows.itertuples(index=False):
            stem = image_stem(str(pid), int(rec.day), rec.date, rec.view, float(rec.severity), settings.naming)
            items.append({"day": int(rec.day), "view": rec.view, "severity": float(rec.severity),
                          "image": f"{rundir.IMAGES}/{pid}/{stem}.png", "mask": f"{rundir.MASKS}/{pid}/{stem}.png",
                          "part": f"{rundir.PARTS}/{pid}/{stem}.json"})
        names = [i["image"] for i in items]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise RunError(f"two rows of patient '{pid}' map to the same file name {dup} "
                           f"(--naming {settings.naming}); use --naming native")
        for start in range(0, len(items), CHUNK):
            tasks.append((job, items[start:start + CHUNK]))
        total += len(items)
    return jobs, tasks, total


def _check_portraits(faces_dir: str | os.PathLike[str]) -> list[dict[str, str]]:
    """ImageQX's check of the --faces portraits: ``[{"file", "reason"}]`` for each one refused (left out of the
    run). Refusing them all is an error."""
    from synthtrial.graders.imageqx import check_portraits
    from synthtrial.face.faces import face_files

    files = face_files(faces_dir)
    refused = [{"file": Path(path).name, "reason": reason}
               for path, reason in check_portraits(files, grader=_quality_grader()) if reason]
    if len(refused) == len(files):
        raise RunError(f"{faces_dir}: ImageQX refused every portrait ({refused[0]['file']}: {refused[0]['reason']}) "
                       "(option --faces; drop --quality-filter to use them anyway)")
    return refused


def _check_faces(jobs: dict[str, _PatientJob], faces_dir: str | None, protocol_path: Path,
                 excluded: tuple[str, ...] = ()) -> None:
    """Fail before writing anything if a requested face cannot be found or has no face in it."""
    from synthtrial.face.faces import face_from_request, load_base_faces

    load_base_faces(faces_dir, exclude=excluded)
    for job in jobs.values():
        if job.face:
            face_from_request(job.face, faces_dir, protocol_path.parent, job.patient_id)


def _tables(protocol: pd.DataFrame, records: dict[str, list[dict[str, Any]]],
            settings: GenerateSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    by_image = {rec["image"]: rec for recs in records.values() for rec in recs}
    manifest_rows, lesion_rows = [], []
    for row in protocol.itertuples(index=False):
        stem = image_stem(row.patient_id, int(row.day), row.date, row.view, float(row.severity), settings.naming)
        rec = by_image[f"{rundir.IMAGES}/{row.patient_id}/{stem}.png"]
        manifest_rows.append({
            **{c: rec[c] for c in rundir.MANIFEST_COLUMNS if c in rec},
            "patient_id": row.patient_id, "day": int(row.day), "date": row.date, "block": row.block,
            "treatment": row.treatment, "view": row.view, "severity": float(row.severity),
            "backend": settings.backend,
        })
        for les in rec["lesions"]:
            lesion_rows.append({"image": rec["image"], "patient_id": row.patient_id, "day": int(row.day),
                                "view": row.view, **les})
    manifest = pd.DataFrame(manifest_rows, columns=list(rundir.MANIFEST_COLUMNS))
    manifest["date"] = pd.to_datetime(manifest["date"]).astype("datetime64[ns]")
    manifest["block"] = pd.array(manifest["block"].tolist(), dtype="Int64")
    manifest["quality_acceptable"] = pd.array(manifest["quality_acceptable"].tolist(), dtype="boolean")
    manifest["quality_p"] = pd.to_numeric(manifest["quality_p"], errors="coerce").astype("float64")
    lesions = pd.DataFrame(lesion_rows, columns=list(rundir.LESION_COLUMNS))
    lesions = lesions.astype({"day": "int64", "lesion_id": "int64", "age_days": "int64", "mask_area": "int64"})
    return manifest, lesions
