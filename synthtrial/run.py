"""``synthtrial generate``: turn a protocol into a run directory of image series with exact ground truth.

The run directory (DESIGN.md) is the contract every later stage reads::

    RUN/protocol.csv       the normalised protocol actually used (severities filled in)
    RUN/config.json        every setting, the seed and package versions
    RUN/truth.json         the simulation truth, when known
    RUN/manifest.parquet   one row per image (also manifest.csv)
    RUN/lesions.parquet    one row per lesion per image
    RUN/images/<patient>/<patient>_<YYYYMMDD|dNNN>_<view>.png
    RUN/masks/<patient>/<same stem>.png     16-bit instance map: lesion_id + 1, 0 = no lesion
    RUN/grids/<patient>.jpg                  contact sheet of the series

Every file is written atomically. Each finished image also leaves a small record under ``RUN/.parts``;
a re-run of the same command skips the images that have one, so an interrupted run resumes and ends
with the same bytes as an uninterrupted one. Work is spread over processes by patient and chunk; the
result does not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial import __version__, scale
from synthtrial.errors import SynthtrialError
from synthtrial.atomic import write_bytes_atomic, write_text_atomic
from synthtrial.progress import progress_bar
from synthtrial.protocol import has_severity, read_protocol, to_csv_text
from synthtrial.seeding import derive_seed

NAMINGS = ("native", "anchor")
#: procedural: the CPU lesion renderer; sdxl-img2img: the anchor's pipeline (placement not controlled);
#: sdxl-inpaint: procedural lesion map, diffusion repaints only the dilated lesion masks.
BACKENDS = ("procedural", "sdxl-img2img", "sdxl-inpaint")
CHUNK = 8
MANIFEST_COUNT_COLUMNS = ("n_open_comedo", "n_closed_comedo", "n_papule", "n_pustule", "n_nodule", "n_mark",
                          "n_scar")
LESION_COLUMNS = ("image", "patient_id", "day", "view", "lesion_id", "type", "x0", "y0", "x1", "y1", "cx", "cy",
                  "radius_px", "mask_area", "stage", "age_days", "intensity")


class RunError(SynthtrialError):
    """A run directory that cannot be written or resumed."""


@dataclass(frozen=True)
class GenerateSettings:
    """What decides a run's bytes (the number of workers does not)."""

    seed: int = 0
    size: int = 512
    naming: str = "native"
    backend: str = "procedural"

    def validate(self) -> None:
        if not 128 <= self.size <= 4096:
            raise RunError(f"--size must be between 128 and 4096 pixels, got {self.size}")
        if self.naming not in NAMINGS:
            raise RunError(f"--naming must be one of {', '.join(NAMINGS)}, got '{self.naming}'")
        if self.backend not in BACKENDS:
            raise RunError(f"--backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'")
        if self.seed < 0:
            raise RunError(f"--seed must be >= 0, got {self.seed}")


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

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _png_bytes(array: np.ndarray, compress_level: int = 4) -> bytes:
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
    """The renderer's settings for runs: the lesion model already sizes growing and fading lesions."""
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
    diffusion: dict[str, Any] | None = None   # DiffusionConfig fields for the sdxl backends


_CACHE: dict[tuple, Any] = {}
_RENDERERS: dict[str, Any] = {}   # one renderer per process and configuration: models load once


def _renderer(job: _PatientJob):
    key = json.dumps(job.diffusion, sort_keys=True)
    if key not in _RENDERERS:
        if job.diffusion is None:
            from synthtrial.render.procedural import ProceduralRenderer

            _RENDERERS[key] = ProceduralRenderer(render_config())
        else:
            from synthtrial.render.diffusion import DiffusionConfig, DiffusionRenderer

            _RENDERERS[key] = DiffusionRenderer(DiffusionConfig(**job.diffusion))
    return _RENDERERS[key]


def _patient_state(job: _PatientJob):
    """The patient's face and lesion course, built once per process."""
    key = (job.run_dir, job.patient_id)
    if key not in _CACHE:
        from synthtrial.faces import Identity, face_from_request, identity_for, load_base_faces, make_face
        from synthtrial.lesions import LesionCourse

        size = job.settings.size
        if job.face:
            base = face_from_request(job.face, job.faces_dir, Path(job.protocol_dir), job.patient_id)
            face = make_face(base, Identity(base=base.key), size)
        else:
            bases = load_base_faces(job.faces_dir)
            identity = identity_for(job.patient_index, bases, job.settings.seed)
            face = make_face(next(b for b in bases if b.key == identity.base), identity, size)
        course = LesionCourse(face, job.days, job.severity, seed=job.settings.seed, patient_id=job.patient_id)
        _CACHE.clear()  # one patient at a time per process keeps memory flat
        _CACHE[key] = (face, course, {}, _renderer(job))
    return _CACHE[key]


def _render_images(job: _PatientJob, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Render the images of one patient's chunk that have no record yet; returns every row's record.

    The procedural renderer draws image by image. A diffusion backend renders the whole chunk in one batch
    whenever any image of it is missing, so the batch, and with it every image's bytes, is the same on a
    resumed run; only the missing images are written.
    """
    run_dir = Path(job.run_dir)
    if any(not (run_dir / row["part"]).exists() for row in rows):
        face, course, views, renderer = _patient_state(job)
        todo = rows if job.diffusion is not None else [r for r in rows if not (run_dir / r["part"]).exists()]
        prepared = [_prepare(job, face, course, views, row) for row in todo]
        if job.diffusion is None:
            results = [renderer(p["face"].image, p["specs"], skin_mask=p["face"].skin, stats=p["stats"],
                                seed=p["seed"]) for p in prepared]
        else:
            results = renderer.render_batch([dict(image=p["face"].image, lesions=p["specs"], skin_mask=p["face"].skin,
                                                  stats=p["stats"], seed=p["seed"], severity=p["row"]["severity"])
                                             for p in prepared])
        for p, result in zip(prepared, results, strict=True):
            if not (run_dir / p["row"]["part"]).exists():
                _write_image(run_dir, face, course, p, result)
    return [json.loads((run_dir / row["part"]).read_text()) for row in rows]


def _prepare(job: _PatientJob, face, course, views: dict, row: dict[str, Any]) -> dict[str, Any]:
    """The face (in the row's view), its photo statistics, and the day's lesions as renderer specs."""
    from synthtrial.render.procedural import LesionSpec, photo_stats

    view = row["view"]
    if view not in views:
        face_v = face.view(view)
        views[view] = (face_v, photo_stats(face_v.image, face_v.skin))
    face_v, stats = views[view]
    states = course.on(row["day"])
    if states:
        centres = face_v.to_pixels(np.array([s.triangle for s in states]), np.stack([s.bary for s in states]))
    else:
        centres = np.zeros((0, 2))
    specs = [LesionSpec(lesion_id=s.lesion_id, type=s.type, cx=float(c[0]), cy=float(c[1]),
                        radius_px=float(s.radius * face_v.scale), intensity=s.intensity, seed=s.seed)
             for s, c in zip(states, centres, strict=True)]
    seed = derive_seed("render", job.settings.seed, job.patient_id, row["day"], view, bits=32)
    return {"row": row, "face": face_v, "stats": stats, "states": states, "specs": specs, "seed": seed}


def _write_image(run_dir: Path, face, course, prepared: dict[str, Any], result) -> None:
    """Write the image, its instance mask and its record (the record last: it marks the image as done)."""
    row, states, specs = prepared["row"], prepared["states"], prepared["specs"]
    label = np.zeros(result.image.shape[:2], dtype=np.uint16)
    areas = []
    for spec, mask, box in zip(specs, result.masks, result.boxes, strict=True):
        win = _box_window(box, label.shape)  # masks lie inside their boxes: work on the crop
        crop = mask[win]
        label[win][crop] = spec.lesion_id + 1
        areas.append(int(crop.sum()))
    image_bytes = _png_bytes(result.image)
    write_bytes_atomic(run_dir / row["image"], image_bytes)
    write_bytes_atomic(run_dir / row["mask"], _png_bytes(label, compress_level=1))  # mostly zeros: cheap
    counts = {t: 0 for t in scale.ALL_LESION_TYPES}
    lesions = []
    for state, spec, area, box in zip(states, specs, areas, result.boxes, strict=True):
        counts[state.type] += 1
        lesions.append({
            "lesion_id": state.lesion_id, "type": state.type,
            "x0": float(box[0]), "y0": float(box[1]), "x1": float(box[2]), "y1": float(box[3]),
            "cx": round(spec.cx, 3), "cy": round(spec.cy, 3), "radius_px": round(spec.radius_px, 3),
            "mask_area": area, "stage": state.stage, "age_days": int(state.age_days),
            "intensity": round(state.intensity, 4),
        })
    n_active = sum(counts[t] for t in scale.LESION_TYPES)
    n_inflammatory = counts["papule"] + counts["pustule"] + counts["nodule"]
    record = {
        "image": row["image"], "mask": row["mask"], "seed": prepared["seed"], "sha256": _sha256(image_bytes),
        "width": int(result.image.shape[1]), "height": int(result.image.shape[0]),
        "lesion_count": n_active, "target_count": course.target(row["day"]),
        **{f"n_{t}": c for t, c in counts.items()},
        "acne04_level": int(scale.acne04_level_from_count(n_active)),
        "iga": int(scale.iga_from_counts(n_inflammatory, counts["nodule"])),
        "identity": face.identity.to_json(), "face_source": face.source,
        "lesions": lesions,
    }
    write_text_atomic(run_dir / row["part"], json.dumps(record, sort_keys=True))


def _box_window(box: np.ndarray, shape: tuple[int, int]) -> tuple[slice, slice]:
    x0, y0, x1, y1 = box
    return (slice(max(0, int(np.floor(y0))), min(shape[0], int(np.ceil(y1)))),
            slice(max(0, int(np.floor(x0))), min(shape[1], int(np.ceil(x1)))))


def _work(job: _PatientJob, rows: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    return job.patient_id, _render_images(job, rows)


# ---------------------------------------------------------------------------------------- the command

def generate(protocol_path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
             faces_dir: str | os.PathLike[str] | None = None, seed: int = 0, size: int = 512,
             naming: str = "native", workers: int = 1, progress: bool = True, backend: str = "procedural",
             diffusion: dict[str, Any] | None = None,
             on_image: Callable[[int, int], None] | None = None) -> Path:
    """Render every row of a protocol into a run directory and return its path (see the module docstring).

    ``out`` defaults to ``runs/<protocol stem>``. ``on_image(done, total)`` is called after each image.
    ``diffusion`` overrides :class:`synthtrial.render.diffusion.DiffusionConfig` fields for the sdxl backends.
    Under ``accelerate launch`` (several processes, e.g. one per GPU) each process renders its share of the
    images and the main process writes the one manifest.
    """
    settings = GenerateSettings(seed=seed, size=size, naming=naming, backend=backend)
    settings.validate()
    diffusion_config = _diffusion_config(backend, diffusion)
    state = _distributed_state()
    if workers < 1:
        raise RunError(f"--workers must be >= 1, got {workers}")
    protocol_path = Path(protocol_path)
    protocol = read_protocol(protocol_path)
    run_dir = Path(out) if out is not None else Path("runs") / protocol_path.stem
    faces_dir_str = None if faces_dir is None else str(Path(faces_dir))

    from synthtrial.faces import face_files

    face_inputs = []
    if faces_dir is not None:
        face_inputs = [{"file": p.name, "sha256": _sha256(p.read_bytes())} for p in face_files(faces_dir)]

    truth, protocol = _severities(protocol, protocol_path, seed)
    config = {
        "synthtrial_version": __version__,
        "settings": asdict(settings),
        "protocol": {"source": str(protocol_path), "sha256": _sha256(to_csv_text(protocol).encode()),
                     "rows": int(len(protocol))},
        "faces": {"dir": faces_dir_str, "files": face_inputs, "builtin": faces_dir is None},
        "renderer": asdict(render_config()),
        "packages": package_versions(),
    }
    if diffusion_config is not None:
        config["diffusion"] = {k: v for k, v in diffusion_config.items() if k != "device"}
    main = state is None or state.is_main_process
    if main:
        _prepare_run_dir(run_dir, config)
        write_text_atomic(run_dir / "protocol.csv", to_csv_text(protocol))
        if truth is not None:
            write_text_atomic(run_dir / "truth.json", json.dumps(truth, indent=2) + "\n")
    if state is not None:
        state.wait_for_everyone()
        if not main:
            _prepare_run_dir(run_dir, config)  # verifies the main process's config
        diffusion_config = None if diffusion_config is None else {**diffusion_config, "device": str(state.device)}
        workers = 1

    jobs, tasks, total = _plan(protocol, run_dir, settings, faces_dir_str, protocol_path, diffusion_config)
    _check_faces(jobs, faces_dir_str, protocol_path)
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
            if on_image is not None:
                on_image(done, total)

        if workers == 1:
            for job, rows in tasks:
                finished(*_work(job, rows))
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
                futures = [pool.submit(_work, job, rows) for job, rows in tasks]
                for fut in as_completed(futures):
                    finished(*fut.result())

    if state is not None:
        state.wait_for_everyone()
        if not main:
            return run_dir
        records = {pid: [] for pid in jobs}  # every image now has its record: gather them all
        for job, rows in all_tasks:
            records[job.patient_id].extend(_render_images(job, rows))
    manifest, lesions = _tables(protocol, records, run_dir, settings)
    _write_tables(run_dir, manifest, lesions)
    from synthtrial.grids import write_grids

    write_grids(run_dir, manifest)
    return run_dir


def _diffusion_config(backend: str, overrides: dict[str, Any] | None) -> dict[str, Any] | None:
    """DiffusionConfig fields for an sdxl backend (validated by building the config), None for procedural."""
    if backend == "procedural":
        if overrides:
            raise RunError("--model, --lora and the other diffusion options need --backend sdxl-img2img or "
                           "sdxl-inpaint")
        return None
    from synthtrial.render.diffusion import DiffusionConfig, DiffusionRenderer

    try:
        config = DiffusionConfig(mode="img2img" if backend == "sdxl-img2img" else "inpaint", **(overrides or {}))
    except TypeError as exc:
        raise RunError(f"diffusion options: {exc}") from None
    DiffusionRenderer(config)  # checks the settings, model and LoRA folders now (models load lazily later)
    return asdict(config)


def _distributed_state():
    """accelerate's process state when launched as several processes (accelerate launch), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def _severities(protocol: pd.DataFrame, protocol_path: Path, seed: int) -> tuple[dict | None, pd.DataFrame]:
    """Severities from the protocol (and its truth file beside it), or simulated here when missing."""
    from synthtrial.simulate import SeverityModel, simulate_severity, truth_path_for

    if has_severity(protocol):
        truth_file = truth_path_for(protocol_path)
        truth = json.loads(truth_file.read_text()) if truth_file.is_file() else None
        return truth, protocol
    trial = simulate_severity(protocol, SeverityModel(), seed=seed)
    return trial.truth, trial.protocol


def _prepare_run_dir(run_dir: Path, config: dict[str, Any]) -> None:
    config_path = run_dir / "config.json"
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} exists and is not a folder (option --out)")
    if config_path.exists():
        if config_path.read_text() != text:
            raise RunError(f"{run_dir} holds a run made with other settings, protocol, faces or package versions; "
                           "choose another --out or delete it")
        return  # resume
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunError(f"{run_dir} is not empty and is not a synthtrial run (no config.json); choose another --out")
    write_text_atomic(config_path, text)


def _plan(protocol: pd.DataFrame, run_dir: Path, settings: GenerateSettings, faces_dir: str | None,
          protocol_path: Path, diffusion: dict[str, Any] | None = None):
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
                          severity=tuple(float(s) for s in per_day["severity"]), diffusion=diffusion)
        if face is None:
            auto_index += 1
        jobs[str(pid)] = job
        items = []
        for rec in rows.itertuples(index=False):
            stem = image_stem(str(pid), int(rec.day), rec.date, rec.view, float(rec.severity), settings.naming)
            items.append({"day": int(rec.day), "view": rec.view, "severity": float(rec.severity),
                          "image": f"images/{pid}/{stem}.png", "mask": f"masks/{pid}/{stem}.png",
                          "part": f".parts/{pid}/{stem}.json"})
        names = [i["image"] for i in items]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise RunError(f"two rows of patient '{pid}' map to the same file name {dup} "
                           f"(--naming {settings.naming}); use --naming native")
        for start in range(0, len(items), CHUNK):
            tasks.append((job, items[start:start + CHUNK]))
        total += len(items)
    return jobs, tasks, total


def _check_faces(jobs: dict[str, _PatientJob], faces_dir: str | None, protocol_path: Path) -> None:
    """Fail before rendering anything if a requested face cannot be found or has no face in it."""
    from synthtrial.faces import face_from_request, load_base_faces

    load_base_faces(faces_dir)
    for job in jobs.values():
        if job.face:
            face_from_request(job.face, faces_dir, protocol_path.parent, job.patient_id)


def _tables(protocol: pd.DataFrame, records: dict[str, list[dict[str, Any]]], run_dir: Path,
            settings: GenerateSettings) -> tuple[pd.DataFrame, pd.DataFrame]:
    by_image = {rec["image"]: rec for recs in records.values() for rec in recs}
    manifest_rows, lesion_rows = [], []
    for row in protocol.itertuples(index=False):
        stem = image_stem(row.patient_id, int(row.day), row.date, row.view, float(row.severity), settings.naming)
        rec = by_image[f"images/{row.patient_id}/{stem}.png"]
        manifest_rows.append({
            "image": rec["image"], "mask": rec["mask"], "patient_id": row.patient_id, "day": int(row.day),
            "date": row.date, "block": row.block, "treatment": row.treatment, "view": row.view,
            "severity": float(row.severity), "lesion_count": rec["lesion_count"],
            "target_count": rec["target_count"],
            **{c: rec[c] for c in MANIFEST_COUNT_COLUMNS},
            "acne04_level": rec["acne04_level"], "iga": rec["iga"], "identity": rec["identity"],
            "face_source": rec["face_source"], "seed": rec["seed"], "backend": settings.backend,
            "sha256": rec["sha256"], "width": rec["width"], "height": rec["height"],
        })
        for les in rec["lesions"]:
            lesion_rows.append({"image": rec["image"], "patient_id": row.patient_id, "day": int(row.day),
                                "view": row.view, **les})
    manifest = pd.DataFrame(manifest_rows)
    manifest["date"] = pd.to_datetime(manifest["date"]).astype("datetime64[ns]")
    manifest["block"] = pd.array(manifest["block"].tolist(), dtype="Int64")
    lesions = pd.DataFrame(lesion_rows, columns=list(LESION_COLUMNS))
    lesions = lesions.astype({"day": "int64", "lesion_id": "int64", "age_days": "int64", "mask_area": "int64"})
    return manifest, lesions


def _write_tables(run_dir: Path, manifest: pd.DataFrame, lesions: pd.DataFrame) -> None:
    for name, frame in (("manifest.parquet", manifest), ("lesions.parquet", lesions)):
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        write_bytes_atomic(run_dir / name, buf.getvalue())
    csv = manifest.copy()
    csv["date"] = csv["date"].dt.strftime("%Y-%m-%d")
    write_text_atomic(run_dir / "manifest.csv", csv.to_csv(index=False, lineterminator="\n"))


def read_run(run_dir: str | os.PathLike[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The manifest and lesions tables of a finished run (clear error when it is not one)."""
    run_dir = Path(run_dir)
    for name in ("config.json", "manifest.parquet", "lesions.parquet"):
        if not (run_dir / name).is_file():
            raise RunError(f"{run_dir} is not a complete run directory: {name} is missing; "
                           "run `synthtrial generate` first (or again, to finish it)")
    return pd.read_parquet(run_dir / "manifest.parquet"), pd.read_parquet(run_dir / "lesions.parquet")
