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
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from synthtrial.version import __version__
from synthtrial.render.base import BACKENDS as BACKEND_SPECS
from synthtrial.render.base import backend_names, get_backend
from synthtrial.render.procedural import render_config
from synthtrial.render.visibility import visibility_rule
from synthtrial.run import rundir
from synthtrial.run.rendering import (NAMINGS, GenerateSettings, PatientJob, QualityFilter, render_all,
                                      render_chunk, render_dask)
from synthtrial.run.rundir import RunError
from synthtrial.run.remote import on_storage
from synthtrial.trial.protocol import has_severity, read_protocol, resolve_protocol, to_csv_text
from synthtrial.util.atomic import write_text_atomic
from synthtrial.util.cluster import client_for
from synthtrial.util.progress import ProgressCallback, progress_bar

#: The backends ``--backend`` accepts, from the registry (synthtrial.render.base.BACKENDS).
BACKENDS = backend_names()
#: Images a worker renders as one batch (one patient's rows in protocol order); a diffusion backend's bytes
#: depend on it, so it never changes with the number of workers.
RENDER_CHUNK = 8
#: Render processes at most (each holds a face model and a renderer; more only exhausts the machine).
MAX_WORKERS = 64

__all__ = ["BACKENDS", "GenerateSettings", "NAMINGS", "QualityFilter", "RENDER_CHUNK", "RunError", "generate",
           "image_stem"]


# ------------------------------------------------------------------------------------------ naming

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



def package_versions() -> dict[str, str]:
    out = {"synthtrial": __version__}
    for name in ("numpy", "opencv-contrib-python", "mediapipe", "pillow", "scikit-image", "scipy", "pandas",
                 "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out



# ---------------------------------------------------------------------------------------- the command

@on_storage("out", option="--out")
def generate(protocol_path: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
             faces_dir: str | os.PathLike[str] | None = None, seed: int = 0, size: int = 512,
             naming: str = "native", workers: int = 1, progress: bool = True, backend: str = "procedural",
             diffusion: dict[str, Any] | None = None, quality: QualityFilter | None = None, reject: bool = False,
             yaw_deg: float = 25.0, on_progress: ProgressCallback | None = None,
             counterfactual: bool = False, scheduler: str | None = None) -> Path:
    """Render every row of a protocol into a run directory and return its path (see the module docstring).

    ``out`` defaults to ``runs/<protocol stem>``. A shipped protocol is found by name (``trial``,
    ``protocols/trial.csv``) where no such file exists (:func:`~synthtrial.trial.protocol.resolve_protocol`).
    ``on_progress(done, total, status)`` is called as each image is finished (per chunk of images for a
    backend that draws a batch at once), and with ``done`` unchanged while a patient's face and lesion course
    are built (the status says so).
    ``diffusion`` holds the backend's options (:class:`synthtrial.render.diffusion.DiffusionConfig` fields for
    the sdxl backends). ``quality`` is a quality filter (:class:`QualityFilter`, e.g. ImageQX, which the CLI's
    ``--quality-filter`` builds): it scores every image and the manifest records its verdict
    (``quality_acceptable``, ``quality_p``, ``quality_reason``); ``reject`` draws a rejected image again with the
    next derived seed (``render_attempt``); with ``faces_dir`` the portraits are checked first and refused ones
    are left out, each with its reason in ``config.json``. Under ``accelerate launch`` (several processes, e.g.
    one per GPU) each process renders its share of the images and the main process writes the one manifest.
    ``counterfactual`` also renders every arm's counterfactual world under ``RUN/counterfactual/``
    (:mod:`synthtrial.run.counterfactual`), after the factual run, which it leaves byte for byte as it is.
    With ``scheduler`` (a Dask scheduler's address) the chunks are rendered, and their files written, by that
    cluster's workers (``workers`` is then unused); this process writes the tables and contact sheets.
    """
    settings = GenerateSettings(seed=seed, size=size, naming=naming, backend=backend,
                                quality_filter=quality is not None, reject=reject, yaw_deg=yaw_deg)
    if not 1 <= workers <= MAX_WORKERS:
        raise RunError(f"--workers must be between 1 and {MAX_WORKERS}, got {workers}")
    options, recorded = _backend_options(settings.backend, diffusion)
    state = _distributed_state()
    protocol_path = resolve_protocol(protocol_path)
    protocol = read_protocol(protocol_path)
    run_dir = Path(out) if out is not None else Path("runs") / protocol_path.stem
    _check_out(run_dir)
    faces_dir_str = None if faces_dir is None else str(Path(faces_dir))
    faces = _faces_record(faces_dir, quality)
    excluded = tuple(r["file"] for r in faces.get("refused", ()))
    truth, protocol = _severities(protocol, protocol_path, seed)
    worlds = _worlds(protocol, truth, protocol_path, quality, state) if counterfactual else {}
    config = _run_config(settings, protocol, protocol_path, faces, recorded if options else None)
    plan = (protocol, run_dir, settings, faces_dir_str, protocol_path)
    jobs, tasks, total = _plan(*plan, options, excluded)
    _check_faces(jobs, faces_dir_str, protocol_path, excluded)  # every check first

    main = state is None or state.is_main_process
    # shards run under the main's lock
    lock = rundir.locked(run_dir, option="--out") if main else contextlib.nullcontext()
    # the cluster is reached before the first write: an unreachable --scheduler leaves nothing behind
    cluster = client_for(None, scheduler) if scheduler is not None and state is None else contextlib.nullcontext()
    with cluster as client, lock:
        if main:
            _prepare_run_dir(run_dir, config)
            rundir.remove_stale_temps(run_dir)
            write_text_atomic(run_dir / rundir.PROTOCOL, to_csv_text(protocol))
            if truth is not None:
                write_text_atomic(run_dir / rundir.TRUTH, json.dumps(truth, indent=2) + "\n")
        if state is None:
            records = _render(tasks, workers, jobs, quality, progress, on_progress, client)
        else:
            state.wait_for_everyone()
            if not main:
                _prepare_run_dir(run_dir, config)  # verifies the main process's config
            jobs, tasks, _ = _plan(*plan, {**options, "device": str(state.device)} if options else options, excluded)
            _render(tasks[state.process_index::state.num_processes], 1, jobs, quality, progress, on_progress)
            state.wait_for_everyone()
            if not main:
                return run_dir
            records = {pid: [] for pid in jobs}  # every image now has its record: gather them all
            for job, rows in tasks:
                records[job.patient_id].extend(render_chunk(job, rows, quality))
        _finish(run_dir, protocol, records, settings)
        if worlds:
            _render_worlds(worlds, plan, options, excluded, config, (jobs, tasks), workers, progress, on_progress)
    return run_dir


def _worlds(protocol: pd.DataFrame, truth: dict | None, protocol_path: Path, quality, state) -> dict:
    """Each arm's counterfactual protocol, checked before anything is written."""
    from synthtrial.run.counterfactual import counterfactual_protocols
    from synthtrial.trial.simulate import truth_path_for

    if quality is not None or state is not None:
        raise RunError("--counterfactual renders pairs of images in one process: it cannot be combined with "
                       "--quality-filter or run under accelerate launch")
    source = str(truth_path_for(protocol_path)) if truth_path_for(protocol_path).is_file() else str(protocol_path)
    return counterfactual_protocols(protocol, truth, source)


def _render_worlds(worlds: dict[str, pd.DataFrame], plan: tuple, options: dict[str, Any], excluded: tuple[str, ...],
                   config: dict[str, Any], factual: tuple, workers: int, progress: bool,
                   on_progress: ProgressCallback | None) -> None:
    """Render each counterfactual world into its own run directory, paired with the finished factual run, then
    write the individual effects (:mod:`synthtrial.run.counterfactual`)."""
    from synthtrial.run.counterfactual import individual_effects, pair_tasks, world_config

    _, run_dir, settings, faces_dir, protocol_path = plan
    for arm, world in worlds.items():
        world_dir = rundir.counterfactual_dir(run_dir, arm)
        text = to_csv_text(world)
        world_dir.mkdir(parents=True, exist_ok=True)
        _prepare_run_dir(world_dir, world_config(config, arm, rundir.sha256_bytes(text.encode()), len(world),
                                                 config["protocol"]["sha256"]))
        rundir.remove_stale_temps(world_dir)
        write_text_atomic(world_dir / rundir.PROTOCOL, text)
        jobs, tasks = pair_tasks(*_plan(world, world_dir, settings, faces_dir, protocol_path, options, excluded)[:2],
                                 *factual, run_dir)
        _finish(world_dir, world, _render(tasks, workers, jobs, None, progress, on_progress), settings)
    table = individual_effects(run_dir, list(worlds))
    rundir.write_table(run_dir / rundir.INDIVIDUAL_EFFECTS, table)
    write_text_atomic(run_dir / rundir.INDIVIDUAL_EFFECTS_CSV, table.to_csv(index=False, lineterminator="\n"))


def _render(tasks: list, workers: int, jobs: dict[str, PatientJob], quality: QualityFilter | None,
            progress: bool, on_progress: ProgressCallback | None,
            client: Any = None) -> dict[str, list[dict[str, Any]]]:
    """Render ``tasks`` on ``workers`` processes (or on the Dask cluster of ``client``) behind a progress bar;
    every image's record, by patient."""
    records: dict[str, list[dict[str, Any]]] = {pid: [] for pid in jobs}
    total = sum(len(rows) for _, rows in tasks)
    done = 0
    with progress_bar("rendering", total, unit="images", enabled=progress) as update:
        def tell(images: int, status: str) -> None:  # per image (and a status while a patient is prepared)
            nonlocal done
            done = min(total, done + images)
            update(done, total, status)
            if on_progress is not None:
                on_progress(done, total, status)

        def finished(pid: str, recs: list[dict[str, Any]]) -> None:
            records[pid].extend(recs)

        if client is None:
            render_all(tasks, workers, finished, quality, tell)
        else:   # the cluster reports per chunk
            _render_on_cluster(tasks, client, lambda pid, recs: (finished(pid, recs), tell(len(recs), "")), quality)
        if done < total:  # the last images' news still in the workers' queue: the chunks are all in
            tell(total - done, "")
    return records


def _render_on_cluster(tasks: list, client: Any, finished, quality: QualityFilter | None) -> None:
    """The chunks rendered by the Dask cluster of ``client``, with absolute paths (a worker's working folder
    is its own); afterwards the temp files of a worker lost mid-write are removed, so none survives the run."""
    from dataclasses import replace

    def absolute(value: str | None) -> str | None:
        return None if value is None else str(Path(value).absolute())

    moved = {}
    for job, _ in tasks:
        if job.patient_id not in moved:
            moved[job.patient_id] = replace(job, run_dir=absolute(job.run_dir), faces_dir=absolute(job.faces_dir),
                                            protocol_dir=absolute(job.protocol_dir))
    render_dask([(moved[job.patient_id], rows) for job, rows in tasks], client, finished, quality)
    if tasks:
        rundir.remove_stale_temps(Path(tasks[0][0].run_dir))


def _finish(run_dir: Path, protocol: pd.DataFrame, records: dict[str, list[dict[str, Any]]],
            settings: GenerateSettings) -> None:
    """The tables and contact sheets of a rendered run. The manifest is written last and any earlier one is
    removed first, so a run whose grids could not be written (a full disk) has no manifest: verify and every
    later stage refuse it, and the same command run again finishes it."""
    from synthtrial.run.grids import write_grids

    manifest, lesions = _tables(protocol, records, settings)
    (run_dir / rundir.MANIFEST).unlink(missing_ok=True)
    write_grids(run_dir, manifest)
    rundir.write_manifest(run_dir, manifest, lesions)


def _run_config(settings: GenerateSettings, protocol: pd.DataFrame, protocol_path: Path, faces: dict[str, Any],
                diffusion: dict[str, Any] | None) -> dict[str, Any]:
    """What ``config.json`` records: the settings, the protocol's hash, the faces, the backend and packages."""
    spec = get_backend(settings.backend)
    config = {
        "synthtrial_version": __version__,
        "settings": asdict(settings),
        "protocol": {"source": str(protocol_path), "sha256": rundir.sha256_bytes(to_csv_text(protocol).encode()),
                     "rows": int(len(protocol))},
        "faces": faces,
        "backend": {"name": spec.name, "summary": spec.summary, "placement_exact": spec.placement_exact},
        "renderer": asdict(render_config()),
        "visibility": visibility_rule(),
        "packages": package_versions(),
    }
    if diffusion is not None:
        config["diffusion"] = {k: v for k, v in diffusion.items() if k != "device"}
    return config


def _faces_record(faces_dir: str | os.PathLike[str] | None, quality: QualityFilter | None) -> dict[str, Any]:
    """``config.json``'s ``faces``: the folder, each portrait's hash and, with a quality filter, those it
    refused (``[{"file", "reason"}]``; left out of the run). Refusing them all is an error."""
    from synthtrial.face.faces import FaceError, face_files, read_image

    if faces_dir is None:
        return {"dir": None, "files": [], "builtin": True}
    files = face_files(faces_dir)
    record: dict[str, Any] = {"dir": str(Path(faces_dir)), "builtin": False,
                              "files": [{"file": p.name, "sha256": rundir.sha256_file(p)} for p in files]}
    if quality is None:
        return record
    refused = []
    for path in files:
        try:
            reason = str(quality.verdicts([read_image(path)])["reason"].iloc[0])
        except FaceError as exc:
            reason = str(exc).removeprefix(f"{path}: ")
        if reason:
            refused.append({"file": path.name, "reason": reason})
    if len(refused) == len(files):
        raise RunError(f"{faces_dir}: {quality.label} refused every portrait ({refused[0]['file']}: "
                       f"{refused[0]['reason']}) (option --faces; drop --quality-filter to use them anyway)")
    return {**record, "refused": refused} if refused else record


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
    jobs: dict[str, PatientJob] = {}
    tasks = []
    total = 0
    auto_index = 0
    for pid, rows in protocol.groupby("patient_id", sort=False):
        per_day = rows.drop_duplicates("day")
        face = rows["face"].dropna().iloc[0] if rows["face"].notna().any() else None
        job = PatientJob(run_dir=str(run_dir), patient_id=str(pid), patient_index=auto_index, face=face,
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
        for start in range(0, len(items), RENDER_CHUNK):
            tasks.append((job, items[start:start + RENDER_CHUNK]))
        total += len(items)
    return jobs, tasks, total


def _check_faces(jobs: dict[str, PatientJob], faces_dir: str | None, protocol_path: Path,
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
    lesions = lesions.astype({"day": "int64", "lesion_id": "int64", "age_days": "int64", "mask_area": "int64",
                              "area_px": "int64", "contrast": "float64", "signal": "float64",
                              "visible": "bool"})
    return manifest, lesions
