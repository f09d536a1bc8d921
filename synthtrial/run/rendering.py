"""The worker side of ``generate``: rebuild a patient's face and lesion course, render a chunk of its images
through the backend, and write each image, its instance mask and its record (``RUN/.parts``) atomically.

A chunk is always rendered whole (a diffusion backend's output depends on its batch), and only the images
that are missing or whose bytes no longer match their record are written. A renderer whose requests are
independent (``independent_requests``, the procedural one) draws the chunk one request at a time, in the
same order and with the same bytes, so progress is told per image (:data:`ImageProgress`), from the worker
processes too (through a queue the parent drains while it waits). Chunks are spread over spawned
processes; each builds its renderer and the patient's state once, and exits when its parent dies. The
optional quality filter (:class:`QualityFilter`, e.g. ImageQX, built by the caller) is handed to each worker
once, when the pool starts.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd

from synthtrial.render.base import LesionSpec, RenderRequest, get_backend
from synthtrial.render.procedural import photo_stats, render_config
from synthtrial.render.visibility import measure_visibility
from synthtrial.run import rundir
from synthtrial.run.rundir import RunError
from synthtrial.trial import scale
from synthtrial.util.atomic import write_bytes_atomic, write_text_atomic
from synthtrial.util.cluster import run_tasks, terminate_as_interrupt
from synthtrial.util.seeding import derive_seed

__all__ = ["GenerateSettings", "ImageProgress", "MAX_RENDER_ATTEMPTS", "NAMINGS", "PatientJob", "QualityFilter",
           "png_bytes", "render_all", "render_chunk", "render_dask"]

NAMINGS = ("native", "anchor")
#: ``tell(images, status)``: ``images`` more images of the chunk are finished (0: only the status changed, e.g.
#: "P01: face and lesion course" while a patient's state is built).
ImageProgress = Callable[[int, str], None]
#: With a quality filter and ``reject``, a rejected image is drawn again with the next derived seed, at most this
#: many times.
MAX_RENDER_ATTEMPTS = 3


@runtime_checkable
class QualityFilter(Protocol):
    """What ``generate --quality-filter`` needs of a quality grader (ImageQX satisfies it).

    ``verdicts(images)`` takes (H, W, 3) uint8 RGB arrays and returns one row per image with ``acceptable``
    (true or 1.0 when the photo passes), ``p_acceptable`` (0-1) and ``reason`` ('' when acceptable, else one
    line); ``label`` names it in messages. It must pickle when ``generate`` runs more than one worker.
    """

    label: str

    def verdicts(self, images: Sequence[np.ndarray]) -> pd.DataFrame: ...


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



def png_bytes(array: np.ndarray, compress_level: int = 4) -> bytes:
    """PNG bytes of an image or a 16-bit mask (fixed settings, so the same array gives the same bytes)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()



@dataclass(frozen=True)
class PatientJob:
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
    excluded_faces: tuple[str, ...] = ()                     # --faces portraits the quality filter refused
    #: a counterfactual world's job: the factual severities of ``days`` (``severity`` holds the world's own);
    #: its rows name the factual image of the same patient, day and view (``factual``)
    factual_severity: tuple[float, ...] | None = None


_CACHE: dict[tuple, Any] = {}
_RENDERERS: dict[str, Any] = {}   # one renderer per process and configuration: models load once
_WORKER: dict[str, Any] = {"quality": None, "events": None}   # a pool worker's quality filter and progress queue


def _renderer(job: PatientJob):
    key = json.dumps([job.settings.backend, job.options], sort_keys=True)
    if key not in _RENDERERS:
        _RENDERERS[key] = get_backend(job.settings.backend).build(render_config(), job.options)
    return _RENDERERS[key]


def _patient_state(job: PatientJob):
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
        factual = LesionCourse(face, job.days, job.factual_severity or job.severity, seed=job.settings.seed,
                               patient_id=job.patient_id)
        course = factual
        if job.factual_severity is not None:
            from synthtrial.lesions.course import counterfactual_course

            course = counterfactual_course(factual, job.days, job.severity)
        _CACHE.clear()  # one patient at a time per process keeps memory flat
        _CACHE[key] = (face, course, {}, _renderer(job), factual)
    return _CACHE[key]


def _record(run_dir: Path, row: dict[str, Any]) -> dict[str, Any] | None:
    """The image's record when the image, its mask and the record agree byte for byte; else None (redo it).
    A record without the visibility measurement (written by an earlier synthtrial) is redone too."""
    try:
        record = json.loads((run_dir / row["part"]).read_text())
        if "visible_count" in record and rundir.sha256_file(run_dir / row["image"]) == record["sha256"] and \
                rundir.sha256_file(run_dir / row["mask"]) == record["mask_sha256"]:
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def render_chunk(job: PatientJob, rows: list[dict[str, Any]], quality: QualityFilter | None = None,
                 tell: ImageProgress | None = None) -> list[dict[str, Any]]:
    """Render the images of one patient's chunk that are missing or damaged; returns every row's record.

    Whenever any image of the chunk must be (re)drawn, the whole chunk goes through the backend's
    ``render_batch``, so the batch, and with it every image's bytes, is the same as on the first run (a
    diffusion backend's output depends on its batch); only the images that need it are written. With
    ``settings.quality_filter`` every new image gets ``quality``'s verdict. ``tell`` hears of each image as it
    is finished (an intact one at once) and of the patient's state being built.
    """
    tell = tell or (lambda images, status: None)
    run_dir = Path(job.run_dir)
    records = [_record(run_dir, row) for row in rows]
    intact = sum(r is not None for r in records)
    if intact:
        tell(intact, job.patient_id)
    if intact == len(rows):
        return records  # type: ignore[return-value]
    if job.settings.quality_filter and quality is None:
        raise RunError("--quality-filter needs a quality grader (generate(..., quality=...))")
    if (job.run_dir, job.patient_id) not in _CACHE:
        tell(0, f"{job.patient_id}: face and lesion course")
    face, course, views, renderer, factual = _patient_state(job)
    onto_photo = bool(getattr(renderer, "draws_onto_photo", False))

    def finish(k: int, p: dict[str, Any], result) -> None:
        if job.factual_severity is not None:  # a counterfactual world: paired with its factual image
            result = _paired(renderer, _prepare(job, face, factual, views, p["row"]), p, result)
        if records[k] is None:
            verdict = _quality(job, quality, renderer, p, result) if job.settings.quality_filter else None
            if verdict is not None:
                p, result = verdict.pop("prepared"), verdict.pop("result")
            records[k] = _write_image(run_dir, face, course, p, result, verdict, onto_photo=onto_photo)
            tell(1, job.patient_id)

    if getattr(renderer, "independent_requests", False):  # one request at a time: the same bytes, told per image
        for k, row in enumerate(rows):
            p = _prepare(job, face, course, views, row)
            finish(k, p, renderer.render_batch([_request(p)])[0])
    else:
        prepared = [_prepare(job, face, course, views, row) for row in rows]
        for k, (p, result) in enumerate(zip(prepared, renderer.render_batch([_request(p) for p in prepared]),
                                            strict=True)):
            finish(k, p, result)
    return records  # type: ignore[return-value]


def _paired(renderer, factual: dict[str, Any], prepared: dict[str, Any], result):
    """A counterfactual image paired with its factual one: the factual pixels wherever the lesions that differ
    between the two worlds cannot reach (``renderer.reach``; the grain there is the factual draw), this world's
    rendering inside. A backend that cannot say where its lesions reach keeps its whole rendering."""
    from dataclasses import replace

    from PIL import Image

    if not callable(getattr(renderer, "reach", None)):
        return result
    ours, theirs = set(prepared["specs"]), set(factual["specs"])
    differ = [s for s in prepared["specs"] if s not in theirs] + [s for s in factual["specs"] if s not in ours]
    with Image.open(prepared["row"]["factual"]) as im:
        image = np.asarray(im.convert("RGB"))
    inside = renderer.reach(differ, image.shape[:2], prepared["stats"])
    return replace(result, image=np.where(inside[..., None], result.image, image))


def _request(prepared: dict[str, Any]) -> RenderRequest:
    """What the backend draws for a prepared row: the face in its view, the day's lesions, the image's seed."""
    return RenderRequest(image=prepared["face"].image, lesions=prepared["specs"], skin_mask=prepared["face"].skin,
                         stats=prepared["stats"], seed=prepared["seed"], severity=prepared["row"]["severity"])


def _quality(job: PatientJob, grader: QualityFilter, renderer, prepared: dict[str, Any], result) -> dict[str, Any]:
    """The quality filter's verdict on a rendered image; with --reject, the image is drawn again with the next
    derived seed until it is accepted or MAX_RENDER_ATTEMPTS are spent (the last attempt is kept, flagged)."""
    attempt = 0
    while True:
        verdict = grader.verdicts([result.image]).iloc[0]
        if bool(verdict["acceptable"]) or not job.settings.reject or attempt + 1 >= MAX_RENDER_ATTEMPTS:
            break
        attempt += 1
        prepared = {**prepared, "seed": derive_seed("render", job.settings.seed, job.patient_id,
                                                    prepared["row"]["day"], prepared["row"]["view"], attempt,
                                                    bits=32)}
        result = renderer.render_batch([_request(prepared)])[0]
    return {"prepared": prepared, "result": result, "quality_acceptable": bool(verdict["acceptable"]),
            "quality_p": round(float(verdict["p_acceptable"]), 4), "quality_reason": str(verdict["reason"]),
            "render_attempt": attempt}


def _prepare(job: PatientJob, face, course, views: dict, row: dict[str, Any]) -> dict[str, Any]:
    """The face (in the row's view), its photo statistics, and the day's lesions as renderer specs."""
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
                 quality: dict[str, Any] | None = None, *, onto_photo: bool = False) -> dict[str, Any]:
    """Write the image, its instance mask and its record (the record last: it marks the image as done).
    ``onto_photo``: the backend drew the lesions onto the face photo and left it untouched elsewhere, so that
    photo is each lesion's lesion-free reference (visibility's ``signal``)."""
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
    seen = {t: 0 for t in scale.ALL_LESION_TYPES}
    sight = measure_visibility(result.image, label, [spec.lesion_id for spec in specs], skin=prepared["face"].skin,
                               reference=prepared["face"].image if onto_photo else None)
    lesions = []
    for state, spec, area, box, look in zip(states, specs, areas, result.boxes,
                                            sight.itertuples(index=False), strict=True):
        counts[state.type] += 1
        seen[state.type] += bool(look.visible)
        lesions.append({
            "lesion_id": state.lesion_id, "type": state.type,
            "x0": float(box[0]), "y0": float(box[1]), "x1": float(box[2]), "y1": float(box[3]),
            "cx": round(spec.cx, 3), "cy": round(spec.cy, 3), "radius_px": round(spec.radius_px, 3),
            "mask_area": area, "stage": state.stage, "age_days": int(state.age_days),
            "intensity": round(state.intensity, 4), "diameter_mm": round(state.diameter_mm, 3),
            "area_px": int(look.area_px), "contrast": None if np.isnan(look.contrast) else float(look.contrast),
            "signal": None if np.isnan(look.signal) else float(look.signal), "visible": bool(look.visible),
        })
    n_active = sum(counts[t] for t in scale.LESION_TYPES)
    n_inflammatory = counts["papule"] + counts["pustule"] + counts["nodule"]
    record = {
        "image": row["image"], "mask": row["mask"], "seed": prepared["seed"],
        "sha256": rundir.sha256_bytes(image_bytes), "mask_sha256": rundir.sha256_bytes(mask_bytes),
        "width": int(result.image.shape[1]), "height": int(result.image.shape[0]),
        "lesion_count": n_active, "target_count": course.target(row["day"]),
        **{f"n_{t}": c for t, c in counts.items()},
        "visible_count": sum(seen[t] for t in scale.LESION_TYPES), **{f"n_visible_{t}": c for t, c in seen.items()},
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


def _work(task: tuple[PatientJob, list[dict[str, Any]]]) -> tuple[str, list[dict[str, Any]]]:
    job, rows = task
    events = _WORKER["events"]
    return job.patient_id, render_chunk(job, rows, _WORKER["quality"],
                                        None if events is None else lambda n, status: events.put((n, status)))


def _worker_init(parent: int, quality: QualityFilter | None, events=None) -> None:
    """In each worker: keep the quality filter and the parent's progress queue, leave Ctrl-C to the parent,
    and exit when the parent is gone (even after kill -9)."""
    _WORKER["quality"] = quality
    _WORKER["events"] = events
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def render_all(tasks: Sequence[tuple[PatientJob, list[dict[str, Any]]]], workers: int,
               finished: Callable[[str, list[dict[str, Any]]], None], quality: QualityFilter | None = None,
               tell: ImageProgress | None = None) -> None:
    """Render every task (a patient's job and a chunk of its rows) on ``workers`` processes, calling
    ``finished(patient_id, records)`` in the parent as each chunk is done (in any order) and ``tell`` (in the
    parent too) as each image is (see :func:`render_chunk`)."""
    if workers == 1:
        for job, rows in tasks:
            finished(job.patient_id, render_chunk(job, rows, quality, tell))
        return
    import multiprocessing as mp
    import queue as queues

    ctx = mp.get_context("spawn")
    events = ctx.Queue() if tell is not None else None
    pool = ctx.Pool(processes=workers, initializer=_worker_init, initargs=(os.getpid(), quality, events))

    def drain() -> None:
        while events is not None:
            try:
                tell(*events.get_nowait())
            except queues.Empty:
                return

    try:
        with terminate_as_interrupt():
            results = pool.imap_unordered(_work, tasks)
            left = len(tasks)
            while left:
                try:
                    pid, recs = results.next(timeout=0.2)
                except mp.TimeoutError:
                    drain()
                    continue
                drain()
                finished(pid, recs)
                left -= 1
        pool.close()
    except BaseException:
        pool.terminate()   # Ctrl-C, SIGTERM or an error: stop rendering now; finished images are kept
        raise
    finally:
        pool.join()


def render_dask(tasks: Sequence[tuple[PatientJob, list[dict[str, Any]]]], client: Any,
                finished: Callable[[str, list[dict[str, Any]]], None], quality: QualityFilter | None = None) -> None:
    """Render every task on the Dask cluster of ``client``: each chunk is rendered, and its images, masks and
    records written, by a worker (the run directory must be one the workers can reach, by the same path);
    ``finished(patient_id, records)`` is called here as each chunk is done. The quality filter is sent to
    every worker once. A lost worker's chunk is rendered again elsewhere (a chunk writes only what is missing,
    atomically, so a half-done one is finished, not duplicated); Ctrl-C or SIGTERM cancels what is pending."""
    shared = client.scatter(quality, broadcast=True, hash=False) if quality is not None else None
    run_tasks(client, render_chunk, ((job.patient_id, (job, rows, shared)) for job, rows in tasks), finished,
              failed=lambda pid, exc: f"rendering patient '{pid}' failed on a Dask worker")
