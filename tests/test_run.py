"""`generate`: a run directory whose tables, images and masks agree, resumable to the same bytes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synthtrial.trial import scale
from synthtrial.util.errors import SynthtrialError
from synthtrial.run.generation import generate, image_stem
from synthtrial.run.rundir import read_run
from synthtrial.run.verify import verify

ROOT = Path(__file__).resolve().parents[1]
TINY = ("patient_id,day,date,block,treatment,severity,view\n"
        "a1,1,2018-01-01,1,Control,2.6,frontal\n"
        "a1,1,2018-01-01,1,Control,2.6,left\n"
        "a1,2,2018-01-02,1,Control,2.4,frontal\n"
        "a1,3,2018-01-03,2,Cream,1.2,frontal\n"
        "b2,1,2018-01-01,1,Control,0.4,frontal\n"
        "b2,2,2018-01-02,2,Cream,0.9,frontal\n")


def files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "quick"
    generate(ROOT / "protocols" / "quick.csv", out, size=256, progress=False)
    return out


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "tiny.csv"
    path.write_text(TINY)
    return path


def test_run_directory_layout(quick_run):
    for name in ("protocol.csv", "config.json", "truth.json", "manifest.parquet", "manifest.csv", "lesions.parquet"):
        assert (quick_run / name).is_file(), name
    manifest, lesions = read_run(quick_run)
    assert len(manifest) == 48
    assert sorted(p.name for p in (quick_run / "grids").iterdir()) == ["P01.jpg", "P02.jpg", "P03.jpg"]
    assert json.loads((quick_run / "truth.json").read_text()) == json.loads(
        (ROOT / "protocols" / "quick.truth.json").read_text())
    config = json.loads((quick_run / "config.json").read_text())
    assert config["settings"] == {"backend": "procedural", "naming": "native", "seed": 0, "size": 256,
                                  "quality_filter": False, "reject": False, "yaw_deg": 25.0}
    for col in ("image", "patient_id", "day", "date", "block", "treatment", "view", "severity", "lesion_count",
                "n_open_comedo", "n_closed_comedo", "n_papule", "n_pustule", "n_nodule", "n_scar", "acne04_level",
                "iga", "identity", "seed", "backend", "sha256"):
        assert col in manifest.columns, col
    for col in ("image", "patient_id", "day", "lesion_id", "type", "x0", "y0", "x1", "y1", "cx", "cy", "radius_px",
                "stage", "age_days"):
        assert col in lesions.columns, col
    assert manifest["image"].iloc[0] == "images/P01/P01_20180101_frontal.png"
    import hashlib

    for rec in manifest.head(5).itertuples():
        data = (quick_run / rec.image).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec.sha256
        assert Image.open(quick_run / rec.image).size == (256, 256)


def test_manifest_and_lesions_agree(quick_run):
    manifest, lesions = read_run(quick_run)
    per_type = lesions.groupby(["image", "type"]).size().unstack(fill_value=0)
    for rec in manifest.itertuples():
        row = per_type.loc[rec.image] if rec.image in per_type.index else pd.Series(dtype=int)
        for t in ("open_comedo", "closed_comedo", "papule", "pustule", "nodule", "mark", "scar"):
            assert getattr(rec, f"n_{t}") == int(row.get(t, 0)), (rec.image, t)
        active = sum(int(row.get(t, 0)) for t in scale.LESION_TYPES)
        assert rec.lesion_count == active
        # the lesion count follows the target severity exactly, and the grades follow the count
        assert rec.lesion_count == round(float(scale.expected_lesion_count(rec.severity)))
        assert rec.acne04_level == scale.acne04_level_from_count(rec.lesion_count)
        inflamed = rec.n_papule + rec.n_pustule + rec.n_nodule
        assert rec.iga == scale.iga_from_counts(inflamed, rec.n_nodule)


def test_boxes_inside_image_and_on_skin_masks(quick_run):
    from synthtrial.face.faces import identity_for, load_base_faces, make_face

    manifest, lesions = read_run(quick_run)
    assert (lesions[["x0", "y0"]] >= 0).all().all()
    assert (lesions[["x1", "y1"]] <= 256).all().all()
    assert (lesions["x1"] > lesions["x0"]).all() and (lesions["y1"] > lesions["y0"]).all()
    bases = load_base_faces(None)
    face = make_face(bases[0], identity_for(0, bases, 0), 256)  # P01's face
    p01 = lesions[lesions["patient_id"] == "P01"]
    x, y = np.round(p01["cx"]).astype(int), np.round(p01["cy"]).astype(int)
    assert face.skin[y, x].all()
    # instance masks: every labelled pixel lies inside its lesion's box and on skin
    for image, rows in list(p01.groupby("image"))[:4]:
        stem = Path(image).stem
        label = np.asarray(Image.open(quick_run / "masks" / "P01" / f"{stem}.png"))
        assert label.dtype == np.uint16 or label.max() < 65536
        assert not (label[~face.skin] > 0).any()
        for les in rows.itertuples():
            ys, xs = np.nonzero(label == les.lesion_id + 1)
            if len(xs):
                assert xs.min() >= les.x0 - 1 and xs.max() <= les.x1 and ys.min() >= les.y0 - 1 and ys.max() <= les.y1


def test_lesions_keep_id_and_position_across_days(quick_run):
    _, lesions = read_run(quick_run)
    frontal = lesions[lesions["view"] == "frontal"]
    spread = frontal.groupby(["patient_id", "lesion_id"])[["cx", "cy"]].agg(lambda v: v.max() - v.min())
    assert (spread.to_numpy() == 0).all()
    days_seen = frontal.groupby(["patient_id", "lesion_id"])["day"].nunique()
    assert (days_seen > 1).mean() > 0.5  # most lesions persist over several days


def test_image_changes_where_lesions_are(quick_run):
    from synthtrial.face.faces import Identity, load_base_faces, make_face

    manifest, _ = read_run(quick_run)
    bases = load_base_faces(None)
    base_image = make_face(bases[0], Identity(base="astronaut"), 256).image.astype(int)
    first = manifest.iloc[0]
    image = np.asarray(Image.open(quick_run / first["image"])).astype(int)
    label = np.asarray(Image.open(quick_run / first["mask"]))
    changed = np.abs(image - base_image).sum(axis=2) > 0
    assert changed[label > 0].mean() > 0.9
    assert changed.mean() < 0.3  # the rest of the portrait is left alone


def test_interrupted_run_resumes_to_the_same_bytes(tiny, tmp_path):
    whole = tmp_path / "whole"
    generate(tiny, whole, size=160, progress=False)

    class Stop(Exception):
        pass

    def stop_after_three(done, total, status):
        if done >= 3:
            raise Stop

    cut = tmp_path / "cut"
    with pytest.raises(Stop):
        generate(tiny, cut, size=160, progress=False, on_progress=stop_after_three)
    assert not (cut / "manifest.parquet").exists()
    generate(tiny, cut, size=160, progress=False)
    assert files(cut) == files(whole)
    # a finished run re-run is a no-op with the same bytes
    generate(tiny, cut, size=160, progress=False)
    assert files(cut) == files(whole)


def test_killed_process_resumes_to_the_same_bytes(tmp_path):
    proto = ROOT / "protocols" / "quick.csv"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    cmd = [sys.executable, "-m", "synthtrial", "generate", str(proto), "--size", "160", "--quiet"]
    subprocess.run([*cmd, "--out", str(whole)], check=True, capture_output=True)
    proc = subprocess.Popen([*cmd, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list((killed / ".parts").rglob("*.json"))) >= 10:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    interrupted = proc.returncode == -signal.SIGKILL
    subprocess.run([*cmd, "--out", str(killed)], check=True, capture_output=True)
    assert files(killed) == files(whole)
    assert interrupted, "the run finished before it could be killed; the resume was not exercised"


def test_workers_do_not_change_the_result(tiny, tmp_path):
    generate(tiny, tmp_path / "one", size=160, progress=False, workers=1)
    generate(tiny, tmp_path / "two", size=160, progress=False, workers=2)
    assert files(tmp_path / "one") == files(tmp_path / "two")


def test_seed_changes_lesions(tiny, tmp_path):
    generate(tiny, tmp_path / "s0", size=160, progress=False, seed=0)
    generate(tiny, tmp_path / "s1", size=160, progress=False, seed=1)
    a, b = read_run(tmp_path / "s0")[1], read_run(tmp_path / "s1")[1]
    assert not a[["cx", "cy"]].equals(b[["cx", "cy"]])


def test_side_views_and_anchor_naming(tiny, tmp_path):
    run = generate(tiny, tmp_path / "anchor", size=160, progress=False, naming="anchor")
    manifest, lesions = read_run(run)
    assert manifest["image"].tolist()[:3] == ["images/a1/a1_20180101_severity_3.png",
                                              "images/a1/a1_20180101_severity_3_left.png",
                                              "images/a1/a1_20180102_severity_2.png"]
    front = lesions[(lesions["day"] == 1) & (lesions["patient_id"] == "a1")]
    ids = front.groupby("view")["lesion_id"].apply(set)
    assert ids["frontal"] == ids["left"]  # the same lesions in every view of a day
    moved = front.pivot_table(index="lesion_id", columns="view", values="cx")
    assert (moved["frontal"] != moved["left"]).any()


def test_image_stem():
    date = pd.Timestamp("2018-01-29")
    assert image_stem("P01", 29, date, "frontal", 1.994, "native") == "P01_20180129_frontal"
    assert image_stem("P01", 29, pd.NaT, "left", 1.994, "native") == "P01_d029_left"
    assert image_stem("1", 29, date, "frontal", 1.994, "anchor") == "1_20180129_severity_2"
    assert image_stem("1", 29, date, "frontal", 3.0, "anchor") == "1_20180129_severity_3"
    with pytest.raises(SynthtrialError, match="needs a date"):
        image_stem("1", 29, pd.NaT, "frontal", 1.0, "anchor")


def test_protocol_without_severity_is_simulated(tmp_path):
    path = tmp_path / "sched.csv"
    path.write_text("patient_id,day,treatment\nz9,0,Control\nz9,1,Control\n")
    run = generate(path, tmp_path / "run", size=160, progress=False)
    manifest, _ = read_run(run)
    assert manifest["severity"].notna().all()
    assert json.loads((run / "truth.json").read_text())["reference"] == "Control"


def test_errors_and_nothing_half_written(tiny, tmp_path, gray_image_dir):
    generate(tiny, tmp_path / "r", size=160, progress=False)
    with pytest.raises(SynthtrialError, match="other settings"):
        generate(tiny, tmp_path / "r", size=192, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with pytest.raises(SynthtrialError, match="not a synthtrial run"):
        generate(tiny, tmp_path / "junk", size=160, progress=False)
    with pytest.raises(SynthtrialError, match=r"wall\.png: no face found"):
        generate(tiny, tmp_path / "nf", faces_dir=gray_image_dir, size=160, progress=False)
    assert not (tmp_path / "nf" / "images").exists()
    with pytest.raises(SynthtrialError, match="--size"):
        generate(tiny, tmp_path / "s", size=16, progress=False)
    with pytest.raises(SynthtrialError, match="no such folder"):
        generate(tiny, tmp_path / "f", faces_dir=tmp_path / "nope", progress=False)
    assert not (tmp_path / "s").exists() and not (tmp_path / "f").exists()


def test_accelerate_launch_shards_to_the_same_bytes(tiny, tmp_path):
    """Two processes under accelerate launch (as on a multi-GPU machine) write the same run as one process."""
    generate(tiny, tmp_path / "one", size=128, progress=False)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "synthtrial", "generate", str(tiny), "--out", str(tmp_path / "two"), "--size", "128",
                           "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert files(tmp_path / "two") == files(tmp_path / "one")


def test_diffusion_backend_batches_and_resumes_to_the_same_bytes(tmp_path, tiny_sdxl):
    """A chunk of images goes through the pipeline as one batch; losing one image and re-running redoes the
    same batch and writes back the same bytes."""
    proto = tmp_path / "p.csv"
    proto.write_text("patient_id,day,treatment,severity\n" + "".join(f"z1,{d},Control,{2.0 - 0.2 * d}\n"
                                                                     for d in range(4)))
    options = {"model": str(tiny_sdxl), "num_inference_steps": 3, "device": "cpu"}
    run = generate(proto, tmp_path / "run", size=128, progress=False, backend="sdxl-inpaint", diffusion=options)
    before = files(run)
    (run / ".parts" / "z1" / "z1_d002_frontal.json").unlink()
    (run / "images" / "z1" / "z1_d002_frontal.png").unlink()
    (run / "manifest.parquet").unlink()
    generate(proto, run, size=128, progress=False, backend="sdxl-inpaint", diffusion=options)
    assert files(run) == before
    manifest, _ = read_run(run)
    assert (manifest["backend"] == "sdxl-inpaint").all() and len(manifest) == 4


def test_inpaint_backend_draws_the_procedural_lesion_table(tmp_path, tiny_sdxl):
    """Same protocol and seed: the sdxl-inpaint run's lesion table (boxes, mask areas) equals the procedural run's,
    because the backend draws its lesion map with the run's own procedural settings; only the visibility, measured
    on each backend's own image, may differ."""
    proto = tmp_path / "p.csv"
    proto.write_text("patient_id,day,treatment,severity\n" + "".join(f"z1,{d},Control,{2.6 - 0.8 * d}\n"
                                                                     for d in range(3)))
    options = {"model": str(tiny_sdxl), "num_inference_steps": 2, "device": "cpu"}
    inpaint = generate(proto, tmp_path / "inpaint", size=128, progress=False, backend="sdxl-inpaint",
                       diffusion=options)
    procedural = generate(proto, tmp_path / "procedural", size=128, progress=False)
    a, b = read_run(inpaint)[1], read_run(procedural)[1]
    assert len(a) > 10 and (a["intensity"] < 1).any()
    measured = ["area_px", "contrast", "signal", "visible"]
    pd.testing.assert_frame_equal(a.drop(columns=measured), b.drop(columns=measured))
    assert (a["area_px"] == b["area_px"]).all()  # the same masks
    # inpainting repaints the masked pixels: no lesion-free reference, so no signal; the procedural one has it
    assert a["signal"].isna().all() and b.loc[b["area_px"] > 0, "signal"].notna().all()
    config = json.loads((inpaint / "config.json").read_text())
    assert config["renderer"]["size_at_zero_intensity"] == 1.0 and config["backend"]["name"] == "sdxl-inpaint"


def test_deleted_and_corrupted_files_heal_to_the_same_bytes(tiny, tmp_path):
    run = generate(tiny, tmp_path / "run", size=160, progress=False)
    before = files(run)
    (run / "images" / "a1" / "a1_20180102_frontal.png").unlink()
    (run / "masks" / "b2" / "b2_20180101_frontal.png").unlink()
    truncated = run / "images" / "b2" / "b2_20180102_frontal.png"
    truncated.write_bytes(truncated.read_bytes()[:100])
    edited = run / "images" / "a1" / "a1_20180103_frontal.png"
    data = bytearray(edited.read_bytes())
    data[-20] ^= 0xFF
    edited.write_bytes(bytes(data))
    (run / "grids" / "a1.jpg").unlink()
    generate(tiny, run, size=160, progress=False)
    assert files(run) == before


def test_a_second_writer_is_refused(tiny, tmp_path):
    from synthtrial.run import rundir

    run = tmp_path / "run"
    with rundir.locked(run):
        with pytest.raises(SynthtrialError, match="another synthtrial process is writing"):
            generate(tiny, run, size=160, progress=False)
    assert not (run / "config.json").exists()
    generate(tiny, run, size=160, progress=False)  # free again
    assert (run / "manifest.parquet").is_file()


def test_two_processes_on_one_new_run_do_not_mix(tmp_path):
    """Two generate commands with different seeds on the same new --out: one runs, the other is refused."""
    proto = ROOT / "protocols" / "quick.csv"
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "synthtrial", "generate", str(proto), "--size", "128", "--quiet", "--out", str(out)]
    procs = [subprocess.Popen([*cmd, "--seed", str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for seed in (7, 8)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "another synthtrial process is writing" in refused or "other settings" in refused
    winner = (7, 8)[[code for code, _ in results].index(0)]
    assert json.loads((out / "config.json").read_text())["settings"]["seed"] == winner
    assert verify(out) == []


def test_verify_reports_the_grids_a_full_disk_left_out(tiny, tmp_path):
    """generate draws the contact sheets last; a run stopped there (a full disk) must not verify."""
    out = generate(tiny, tmp_path / "run", size=128, progress=False)
    assert verify(out) == []
    (out / "grids" / "a1_views.jpg").unlink()
    (out / "grids" / "b2.jpg").unlink()
    assert verify(out) == ["grids/a1_views.jpg: missing; re-run the generate command to draw it",
                           "grids/b2.jpg: missing; re-run the generate command to draw it"]
    generate(tiny, out, size=128, progress=False)
    assert verify(out) == []


def test_refused_generate_leaves_nothing_behind(tiny, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("patient_id,day,treatment,severity,face\nq1,0,Control,1.0,missing.png\n")
    with pytest.raises(SynthtrialError, match="face 'missing.png'"):
        generate(bad, tmp_path / "run", size=160, progress=False)
    assert not (tmp_path / "run").exists()
    undated = tmp_path / "undated.csv"
    undated.write_text("patient_id,day,treatment,severity\nq1,0,Control,1.0\n")
    with pytest.raises(SynthtrialError, match="needs a date"):
        generate(undated, tmp_path / "run2", size=160, progress=False, naming="anchor")
    assert not (tmp_path / "run2").exists()
    generate(undated, tmp_path / "run2", size=160, progress=False)  # the fixed command is not refused


def _children(pid):
    import psutil

    return psutil.Process(pid).children(recursive=True)


def test_ctrl_c_stops_the_workers_and_resume_is_exact(tmp_path):
    import psutil

    proto = ROOT / "protocols" / "quick.csv"
    cmd = [sys.executable, "-m", "synthtrial", "generate", str(proto), "--size", "256", "--quiet", "--workers", "2"]
    whole = tmp_path / "whole"
    subprocess.run([*cmd, "--out", str(whole)], check=True, capture_output=True)
    out = tmp_path / "cut"
    proc = subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".parts").rglob("*.json"))) < 6:
        time.sleep(0.05)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    assert "interrupted" in proc.stderr.read()
    done = len(list((out / ".parts").rglob("*.json")))
    assert done < 48
    time.sleep(1.5)
    assert len(list((out / ".parts").rglob("*.json"))) == done  # nothing renders on after the stop
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    subprocess.run([*cmd, "--out", str(out)], check=True, capture_output=True)
    assert files(out) == files(whole)


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    import psutil

    proto = ROOT / "protocols" / "quick.csv"
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "synthtrial", "generate", str(proto), "--size", "256", "--quiet",
                             "--workers", "2", "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".parts").rglob("*.json"))) < 4:
        time.sleep(0.05)
    workers = [w for w in _children(proc.pid) if "python" in w.name().lower()]
    assert workers
    proc.kill()
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_given_severities_are_kept_and_only_the_others_simulated(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text("patient_id,day,treatment,severity\n"
                    "p1,0,Control,2.9\np1,1,Control,2.9\np1,2,Cream,2.9\n"
                    "p2,0,Control,\np2,1,Control,\np2,2,Cream,\n")
    run = generate(path, tmp_path / "run", size=128, progress=False)
    protocol = pd.read_csv(run / "protocol.csv")
    assert protocol.loc[protocol["patient_id"] == "p1", "severity"].tolist() == [2.9, 2.9, 2.9]
    assert protocol.loc[protocol["patient_id"] == "p2", "severity"].notna().all()
    truth = json.loads((run / "truth.json").read_text())
    assert truth["simulated_patients"] == ["p2"] and truth["given_patients"] == ["p1"]
    assert list(truth["patients"]) == ["p2"]  # the truth covers the simulated patient only


class FakeQuality:
    """Stands in for ImageQX: rejects the images whose mean is below a cut, and counts its calls."""

    label = "ImageQX"

    def __init__(self, cut=None):
        self.cut, self.calls = cut, 0

    def verdicts(self, images):
        self.calls += len(images)
        means = [float(im.mean()) for im in images]
        ok = [self.cut is None or m >= self.cut for m in means]
        return pd.DataFrame({"acceptable": [float(a) for a in ok], "p_acceptable": [0.9 if a else 0.1 for a in ok],
                             "reason": ["" if a else "poor quality (p_acceptable 0.10): too dark (0.90)" for a in ok]})


def test_quality_filter_records_imagesqx_verdicts(tiny, tmp_path):
    from synthtrial.graders.base import get_grader

    run = generate(tiny, tmp_path / "run", size=160, progress=False, quality=get_grader("imageqx", device="cpu"))
    manifest, _ = read_run(run)
    assert manifest["quality_acceptable"].notna().all() and manifest["quality_p"].between(0, 1).all()
    assert (manifest["render_attempt"] == 0).all()
    assert (manifest["quality_reason"] == "").tolist() == manifest["quality_acceptable"].tolist()
    plain = read_run(generate(tiny, tmp_path / "plain", size=160, progress=False))[0]
    assert plain["quality_acceptable"].isna().all() and (plain["sha256"] == manifest["sha256"]).all()
    with pytest.raises(SynthtrialError, match="--reject needs --quality-filter"):
        generate(tiny, tmp_path / "x", size=160, progress=False, reject=True)


def test_reject_draws_again_with_the_next_seed(tiny, tmp_path):
    from synthtrial.run.rendering import MAX_RENDER_ATTEMPTS

    rejects_all = FakeQuality(cut=1e9)
    run = generate(tiny, tmp_path / "run", size=160, progress=False, quality=rejects_all, reject=True)
    manifest, _ = read_run(run)
    assert (manifest["render_attempt"] == MAX_RENDER_ATTEMPTS - 1).all()
    assert (~manifest["quality_acceptable"]).all() and manifest["quality_reason"].str.contains("too dark").all()
    plain = read_run(generate(tiny, tmp_path / "plain", size=160, progress=False))[0]
    assert (plain["seed"] != manifest["seed"]).all()  # the kept attempt was drawn with another seed
    again = generate(tiny, tmp_path / "again", size=160, progress=False, quality=rejects_all, reject=True)
    assert files(again) == files(run)  # retries are seeded too


def test_refused_portraits_are_left_out(tmp_path, bases):
    from PIL import Image

    faces = tmp_path / "faces"
    faces.mkdir()
    Image.fromarray(bases[0].image).save(faces / "good.png")
    Image.fromarray((bases[1].image // 4).astype(np.uint8)).save(faces / "dark.png")
    quality = FakeQuality(cut=60.0)
    proto = tmp_path / "p.csv"
    proto.write_text("patient_id,day,treatment,severity\nq1,0,Control,1.0\nq2,0,Control,1.0\n")
    run = generate(proto, tmp_path / "run", size=160, progress=False, faces_dir=faces, quality=quality)
    config = json.loads((run / "config.json").read_text())
    assert config["faces"]["refused"] == [{"file": "dark.png",
                                           "reason": "poor quality (p_acceptable 0.10): too dark (0.90)"}]
    manifest, _ = read_run(run)
    assert set(manifest["face_source"]) == {str(faces / "good.png")}
    Image.fromarray((bases[0].image // 4).astype(np.uint8)).save(faces / "good.png")
    with pytest.raises(SynthtrialError, match="ImageQX refused every portrait"):
        generate(proto, tmp_path / "run2", size=160, progress=False, faces_dir=faces, quality=quality)
    assert not (tmp_path / "run2").exists()


def test_yaw_turns_the_side_views_only(tiny, tmp_path):
    a = read_run(generate(tiny, tmp_path / "a", size=160, progress=False))[0].set_index("image")
    b = read_run(generate(tiny, tmp_path / "b", size=160, progress=False, yaw_deg=40.0))[0].set_index("image")
    side = a["view"] != "frontal"
    assert side.any() and (a.loc[side, "sha256"] != b.loc[side, "sha256"]).all()
    assert (a.loc[~side, "sha256"] == b.loc[~side, "sha256"]).all()
    with pytest.raises(SynthtrialError, match="--yaw must be between 0 and 60"):
        generate(tiny, tmp_path / "c", size=160, progress=False, yaw_deg=75.0)
    assert not (tmp_path / "c").exists()


def test_quality_filter_reaches_every_worker(tiny, tmp_path):
    """The quality filter is a component handed to each worker process once: two workers keep the verdicts and
    bytes of one."""
    quality = FakeQuality(cut=120.0)
    one = generate(tiny, tmp_path / "one", size=160, progress=False, quality=quality, reject=True, workers=1)
    two = generate(tiny, tmp_path / "two", size=160, progress=False, quality=quality, reject=True, workers=2)
    manifest = read_run(two)[0]
    assert manifest["quality_acceptable"].notna().all() and manifest["quality_p"].isin([0.1, 0.9]).all()
    assert {k: v for k, v in files(one).items() if k != ".lock"} == {k: v for k, v in files(two).items()
                                                                      if k != ".lock"}


def test_full_disk_while_writing_grids_names_the_file_and_leaves_no_verifiable_run(tiny, tmp_path, monkeypatch):
    """A full disk while the contact sheets are written: one line naming the sheet, exit 2, no manifest (so
    verify and every later stage refuse the run), and the same command run again finishes it to the bytes of
    an uninterrupted run."""
    from typer.testing import CliRunner

    from synthtrial.cli import app
    from synthtrial.run import rundir
    from test_atomic import full_disk_on

    whole = generate(tiny, tmp_path / "whole", size=160, progress=False)
    run = tmp_path / "run"
    args = ["generate", str(tiny), "--out", str(run), "--size", "160", "--quiet"]
    for first in (True, False):   # a new run, then a finished one re-run (its old manifest must not survive)
        with monkeypatch.context() as patch:
            full_disk_on(patch, lambda path: f"{os.sep}grids{os.sep}" in path)
            result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        line = " ".join(result.output.split())
        assert line.startswith(f"synthtrial: error: {run / 'grids' / 'a1.jpg'}: No space left on device"), line
        assert not (run / rundir.MANIFEST).exists()
        with pytest.raises(SynthtrialError):
            verify(run)
        assert CliRunner().invoke(app, args).exit_code == 0
        assert verify(run) == []
        assert files(run) == files(whole)


def test_visibility_is_measured_on_every_lesion_and_counted(quick_run):
    """Every lesion has its area in the written mask, a contrast and a flag by the stated rule; the manifest's
    visible counts count the flags; lesions with no pixels are never visible; visibility depends on the type
    (inflammatory lesions stand out more than closed comedones)."""
    from synthtrial.render.visibility import is_visible

    manifest, lesions = read_run(quick_run)
    assert (lesions["area_px"] <= lesions["mask_area"]).all()
    assert (lesions["visible"] == is_visible(lesions["contrast"], lesions["area_px"], lesions["signal"])).all()
    assert not lesions.loc[lesions["area_px"] == 0, "visible"].any()
    assert lesions["contrast"].notna().mean() > 0.95
    # the procedural renderer's photo is every lesion's reference
    assert lesions.loc[lesions["area_px"] > 0, "signal"].notna().all()
    assert (lesions.loc[lesions["visible"], "signal"] >= 5).all()
    visible = lesions[lesions["visible"]]
    for rec in manifest.itertuples():
        mine = visible[visible["image"] == rec.image]
        assert rec.visible_count == int(mine["type"].isin(scale.LESION_TYPES).sum())
        assert rec.n_visible_papule == int((mine["type"] == "papule").sum())
    share = lesions.groupby("type")["visible"].mean()
    assert share["papule"] > 0.5 > share["closed_comedo"]
    config = json.loads((quick_run / "config.json").read_text())
    assert config["visibility"]["visible_delta_e"] == 5.0
