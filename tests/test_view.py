"""The run browser (``synthtrial view``): its data, its guard against paths it does not list, the static site,
the command, and what a user sees in a real Chromium (Selenium; skipped only where no chromium is installed)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synthtrial.view import data as view_data
from synthtrial.view.data import TYPE_COLORS, TYPES, load
from synthtrial.view.server import MARKER, ViewError, resolve, start, stop, url_of, write_static

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two simulated patients (P1 photographed frontal and left, P2 frontal) over four days at 128 px, graded
    by the counter and analysed (period and LMM only: cheap)."""
    from synthtrial.analyze.pipeline import AnalysisSettings, analyze_run
    from synthtrial.grade.stage import grade_run
    from synthtrial.graders.base import get_grader
    from synthtrial.run.generation import generate
    from synthtrial.trial.protocol import read_protocol
    from synthtrial.trial.simulate import SeverityModel, simulate_severity

    folder = tmp_path_factory.mktemp("view")
    rows = [(p, d, ["Control", "Cream"][(d - 1) % 2], v) for p, views in (("P1", ("frontal", "left")), ("P2", ("frontal",)))
            for d in (1, 2, 3, 4) for v in views]
    pd.DataFrame(rows, columns=["patient_id", "day", "treatment", "view"]).to_csv(folder / "s.csv", index=False)
    simulate_severity(read_protocol(folder / "s.csv"), SeverityModel(effects={"Cream": -1.0}, noise_sd=0.2),
                      seed=5).write(folder / "p.csv")
    path = generate(folder / "p.csv", folder / "run", size=128, seed=5, progress=False)
    grade_run(path, [get_grader("counter")])
    analyze_run(path, AnalysisSettings(autoencoder=False, n_permutations=100, methods=("period", "lmm")),
                progress=False)
    return path


@pytest.fixture(scope="module")
def view(run):
    return load(run)


@pytest.fixture(scope="module")
def server(view):
    srv = start(view, 0)
    yield url_of(srv)
    stop(srv)


def manifest(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "manifest.parquet")


def type_map(run: Path, image: str) -> np.ndarray:
    """The truth the overlay must show: per pixel the lesion type index + 1 (0 = none), from the mask file and
    lesions.parquet, computed here independently of the viewer."""
    mask = np.asarray(Image.open(run / image.replace("images/", "masks/", 1))).astype(np.int64)
    lesions = pd.read_parquet(run / "lesions.parquet")
    lesions = lesions[lesions["image"] == image]
    types = dict(zip(lesions["lesion_id"] + 1, lesions["type"]))
    out = np.zeros(mask.shape, np.uint8)
    for value in np.unique(mask[mask > 0]):
        out[mask == value] = TYPES.index(types[int(value)]) + 1
    return out


# ------------------------------------------------------------------------------------------- data API

def test_patient_data_follows_the_manifest(run, view):
    m = manifest(run)
    p1 = view.patient("P1")
    assert [d["day"] for d in p1["days"]] == [1, 2, 3, 4]
    assert [d["treatment"] for d in p1["days"]] == ["Control", "Cream", "Control", "Cream"]
    assert sorted(p1["days"][0]["views"]) == ["frontal", "left"]
    entry = p1["days"][1]["views"]["left"]
    assert entry["image"] == "run/images/P1/P1_d002_left.png"
    lesions = pd.read_parquet(run / "lesions.parquet")
    assert len(entry["lesions"]) == int((lesions["image"] == "images/P1/P1_d002_left.png").sum())
    series = {s["name"]: s for s in p1["series"]}
    # truth per day is the mean over the day's views; the counter's outcomes are there; so is the oracle
    rows = m[m["patient_id"] == "P1"]
    assert series["lesion_count"]["values"] == pytest.approx(rows.groupby("day")["lesion_count"].mean().tolist())
    assert series["lesion_count"]["source"] == "truth" and series["lesion_count"]["scale"] == "count"
    assert series["oracle"]["source"] == "analysis" and series["oracle"]["scale"] == "severity"
    assert {"counter_count", "counter_severity"} <= set(series)
    with pytest.raises(KeyError):
        view.patient("P3")


def test_typemap_holds_each_mask_pixels_lesion_type(run, view):
    image = "images/P1/P1_d001_frontal.png"
    import io

    got = np.asarray(Image.open(io.BytesIO(view.typemap(image))))
    expected = type_map(run, image)
    assert got.dtype == np.uint8 and (expected > 0).sum() > 20
    np.testing.assert_array_equal(got, expected)


def test_accuracy_pairs_each_grade_with_its_truth(run, view):
    grades = pd.read_parquet(run / "grades.parquet").merge(manifest(run), on="image")
    found = {a["column"]: a for a in view.run_page()["accuracy"]}
    count = found["counter_count"]
    assert count["truth"] == "lesion_count" and count["n"] == len(grades)
    assert count["mae"] == pytest.approx((grades["counter_count"] - grades["lesion_count"]).abs().mean(), abs=1e-3)
    assert count["r"] == pytest.approx(np.corrcoef(grades["counter_count"], grades["lesion_count"])[0, 1], abs=1e-3)
    assert found["counter_severity"]["truth"] == "severity"
    effects = view.run_page()["effects"]
    assert {"estimate", "true_effect"} <= set(effects["columns"]) and effects["rows"]


def test_stale_grades_and_grader_tables(run, tmp_path):
    """Detections of the image's current bytes are shown per grader; rows graded from other bytes are not."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    m = manifest(copy)
    lesions = pd.read_parquet(copy / "lesions.parquet").head(6)
    det = lesions[["image", "x0", "y0", "x1", "y1"]].assign(
        image_sha256=[dict(zip(m["image"], m["sha256"]))[i] for i in lesions["image"]], **{"class": "papule"},
        score=0.9, counted=True)
    det.loc[det.index[0], "image_sha256"] = "0" * 64          # graded from other bytes: left out
    det[["image", "image_sha256", "x0", "y0", "x1", "y1", "class", "score", "counted"]].to_parquet(
        copy / "detections.parquet")
    index = json.loads((copy / "grades.json").read_text())
    index["graders"]["counter"]["tables"] = ["detections.parquet"]
    (copy / "grades.json").write_text(json.dumps(index))
    v = load(copy)
    assert v.summary()["layers"] == [{"grader": "counter", "table": "detections.parquet"}]
    image = lesions["image"].iloc[0]
    pid, stem = image.split("/")[1], Path(image).stem
    day = int(stem.split("_d")[1][:3])
    entry = next(d for d in v.patient(pid)["days"] if d["day"] == day)["views"][stem.rsplit("_", 1)[1]]
    assert len(entry["boxes"]["detections.parquet"]) == int((det["image"] == image).sum()) - 1
    assert entry["boxes"]["detections.parquet"][0][4:] == ["papule", 0.9, True]


def test_gradcam_overlays_are_found_and_served(run, tmp_path):
    cams = tmp_path / "cams"
    (cams / "P1").mkdir(parents=True)
    Image.new("RGB", (128, 128), (255, 0, 0)).save(cams / "P1" / "P1_d001_frontal_papules.png")
    (cams / "P1" / "P1_d001_frontal_escape.png").symlink_to(run / "images" / "P1" / "P1_d001_left.png")
    v = load(run, cams)
    entry = v.patient("P1")["days"][0]["views"]["frontal"]
    assert entry["gradcam"] == {"papules": "gradcam/P1/P1_d001_frontal_papules.png"}   # the link out is ignored
    assert v.site()["gradcam/P1/P1_d001_frontal_papules.png"][1]() == (cams / "P1" / "P1_d001_frontal_papules.png").read_bytes()
    with pytest.raises(view_data.RunError, match="--gradcam"):
        load(run, tmp_path / "missing")


def test_damaged_tables_are_one_line_errors(run, tmp_path):
    from typer.testing import CliRunner

    from synthtrial.cli import app

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "analysis" / "outcomes.parquet").write_bytes(b"not parquet")
    with pytest.raises(view_data.RunError, match="outcomes.parquet: cannot be read"):
        load(copy)
    result = CliRunner().invoke(app, ["view", str(copy), "--static", str(tmp_path / "s")])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------- traversal guard

TRAVERSALS = ["/../config.json", "/run/../config.json", "/run/images/P1/../../manifest.parquet",
              "/run/%2e%2e/config.json", "/data/patient/..%2F..%2Fconfig.json", "/data/patient/P3.json",
              "/run/masks/P1/P1_d001_frontal.png", "/run/config.json", "//etc/passwd", "/assets/../data.py",
              "/data/typemap/P1/..%2fP1_d001_frontal.png", "/run/images/P1/P1_d001_frontal.png/"]


def test_resolve_accepts_only_listed_paths(view):
    site = view.site()
    assert resolve(site, "/") == "index.html"
    assert resolve(site, "/run/images/P1/P1_d001_frontal.png?x=1") == "run/images/P1/P1_d001_frontal.png"
    for path in TRAVERSALS:
        assert resolve(site, path) is None, path
    listed = {k for k in site if k.startswith("run/")}
    assert listed == {f"run/{i}" for i in manifest(view.run)["image"]}


def test_server_answers_listed_paths_and_404_for_the_rest(run, server):
    host, port = server.removeprefix("http://").strip("/").split(":")
    for path in TRAVERSALS:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", path)          # sent as written: no client-side normalisation
        response = conn.getresponse()
        assert response.status == 404, path
        conn.close()
    with urllib.request.urlopen(server + "run/images/P2/P2_d003_frontal.png", timeout=10) as r:
        assert r.read() == (run / "images" / "P2" / "P2_d003_frontal.png").read_bytes()
    with urllib.request.urlopen(server, timeout=10) as r:
        assert b"day-slider" in r.read()


def test_both_pages_share_one_layout(view):
    """index.html and run.html are layout.html filled in: same head and header, their own title, nav mark, main
    and script; the layout and the fragments are not served themselves."""
    site = view.site()
    pages = {name: site[name][1]().decode("utf-8") for name in ("index.html", "run.html")}
    heads = {name: html[:html.index("<main")] for name, html in pages.items()}
    assert heads["index.html"].replace("patients", "run").replace('"index.html" class="current"', '"index.html"') \
        == heads["run.html"].replace('"run.html" class="current"', '"run.html"')
    assert '<a href="index.html" class="current">Patients</a>' in pages["index.html"]
    assert '<a href="run.html" class="current">Run</a>' in pages["run.html"]
    assert 'src="assets/patient.js"' in pages["index.html"] and 'id="day-slider"' in pages["index.html"]
    assert 'src="assets/run.js"' in pages["run.html"] and 'id="accuracy"' in pages["run.html"]
    assert all("$" not in html for html in pages.values())      # every placeholder filled
    assert not {k for k in site if k.endswith(("layout.html", ".main.html"))}


def test_port_taken_explicitly_is_an_error_default_falls_back(view):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(ViewError, match="--port"):
            start(view, sock.getsockname()[1])
    srv = start(view)
    try:
        assert srv.server_address[1] > 0
    finally:
        stop(srv)


# ------------------------------------------------------------------------------------- static and CLI

def test_static_site_holds_every_url(view, tmp_path):
    out = write_static(view, tmp_path / "site")
    site = view.site()
    for key in ("index.html", "data/patient/P1.json", "data/typemap/P2/P2_d004_frontal.png",
                "run/images/P1/P1_d003_left.png", "assets/patient.js"):
        assert (out / key).read_bytes() == site[key][1](), key
    assert (out / MARKER).is_file()
    write_static(view, out)                            # a previous site is replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ViewError, match="--static"):
        write_static(view, tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"


def test_cli_static_and_errors(run, tmp_path):
    from typer.testing import CliRunner

    from synthtrial.cli import app

    result = CliRunner().invoke(app, ["view", str(run), "--static", str(tmp_path / "s"), "-q"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "data" / "run.json").is_file()
    result = CliRunner().invoke(app, ["view", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such run directory" in result.output


def test_cli_serves_until_ctrl_c(run):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "synthtrial", "view", str(run), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/index.json", timeout=10) as r:
            assert [p["id"] for p in json.load(r)["patients"]] == ["P1", "P2"]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=180)    # generous: a loaded CI machine exits slowly
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "stopped" in stdout and "Traceback" not in stderr


# ------------------------------------------------------------------------------------- in a browser

@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium/chromedriver installed (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--force-color-profile=srgb"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def open_page(browser, url):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get("about:blank")            # a fresh page, even where only the #fragment differs
    browser.get(url)
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))


def wait_for(browser, script):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 20).until(lambda d: d.execute_script(script))


PHOTO = "const p = document.getElementById('photo'); return p.complete && p.naturalWidth > 0 ? p.src : null;"


def shown_bytes(src: str) -> bytes:
    with urllib.request.urlopen(src, timeout=10) as r:
        return r.read()


def test_browser_day_slider_and_keys_change_the_image_and_move_the_marker(browser, server, run):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server + "index.html#P1/0/frontal")
    first = wait_for(browser, PHOTO)
    marker = browser.find_element(By.CSS_SELECTOR, "#trajectory .day-marker")
    x_first = float(marker.get_attribute("x1"))
    assert shown_bytes(first) == (run / "images/P1/P1_d001_frontal.png").read_bytes()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    second = wait_for(browser, f"const p = document.getElementById('photo'); return p.complete && "
                               f"p.naturalWidth > 0 && p.src !== {json.dumps(first)} ? p.src : null;")
    assert shown_bytes(second) == (run / "images/P1/P1_d002_frontal.png").read_bytes()
    assert shown_bytes(second) != shown_bytes(first)
    assert "day 2" in browser.find_element(By.ID, "day-label").text
    x_second = float(marker.get_attribute("x1"))
    assert x_second > x_first
    # the slider, as a user drags it, to the last day: the image and every panel's marker follow
    browser.execute_script("const s = document.getElementById('day-slider'); s.value = 3;"
                           "s.dispatchEvent(new Event('input'));")
    last = wait_for(browser, PHOTO)
    assert shown_bytes(last) == (run / "images/P1/P1_d004_frontal.png").read_bytes()
    xs = {float(m.get_attribute("x1")) for m in browser.find_elements(By.CSS_SELECTOR, "#trajectory .day-marker")}
    assert len(xs) == 1 and xs.pop() > x_second
    assert len(browser.find_elements(By.CSS_SELECTOR, "#trajectory svg.panel")) >= 3
    # flip to the left view
    browser.find_element(By.CSS_SELECTOR, "#views button[data-view='left']").click()
    left = wait_for(browser, PHOTO)
    assert left.endswith("P1_d004_left.png")
    assert browser.find_element(By.CSS_SELECTOR, "#views button[data-view='right']").get_attribute("disabled")


def overlay_pixels(browser) -> np.ndarray:
    wait_for(browser, "return document.getElementById('mask-layer').dataset.ready === '1'")
    w, h, flat = browser.execute_script(
        "const c = document.getElementById('mask-layer');"
        "return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];")
    return np.asarray(flat, np.uint8).reshape(h, w, 4)


def test_browser_mask_overlay_matches_the_mask_pixels(browser, server, run):
    from selenium.webdriver.common.by import By

    open_page(browser, server + "index.html#P2/2/frontal")
    assert overlay_pixels(browser)[..., 3].max() == 0                   # off until asked
    browser.find_element(By.ID, "show-masks").click()
    shown = overlay_pixels(browser)
    truth = type_map(run, "images/P2/P2_d003_frontal.png")
    np.testing.assert_array_equal(shown[..., 3] > 0, truth > 0)
    for value in np.unique(truth[truth > 0]):
        colour = TYPE_COLORS[TYPES[value - 1]]
        rgb = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
        assert (shown[truth == value][:, :3] == rgb).all(), TYPES[value - 1]
    # untick the most common type: its pixels go, the others stay
    common = int(np.bincount(truth[truth > 0]).argmax())
    browser.find_element(By.CSS_SELECTOR, f"#type-filters input[data-type='{TYPES[common - 1]}']").click()
    shown = overlay_pixels(browser)
    np.testing.assert_array_equal(shown[..., 3] > 0, (truth > 0) & (truth != common))
    browser.find_element(By.CSS_SELECTOR, f"#type-filters input[data-type='{TYPES[common - 1]}']").click()
    # boxes: one per lesion of the image
    browser.find_element(By.ID, "show-boxes").click()
    lesions = pd.read_parquet(run / "lesions.parquet")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#box-layer rect.lesion-box")) == \
        int((lesions["image"] == "images/P2/P2_d003_frontal.png").sum())


def test_browser_run_page_shows_accuracy_and_effects(browser, server, run):
    from selenium.webdriver.common.by import By

    open_page(browser, server + "run.html")
    row = browser.find_element(By.CSS_SELECTOR, "#accuracy tr[data-column='counter_count']")
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells[:4] == ["counter", "counter_count", "lesion_count", str(len(manifest(run)))]
    assert browser.find_elements(By.CSS_SELECTOR, "#scatters svg[data-column='counter_count'] circle.point")
    pooled = browser.find_elements(By.CSS_SELECTOR, "#effects tbody tr")
    effects = pd.read_csv(run / "analysis" / "effects.csv")
    assert len(pooled) == int((~effects["scope"].isin(["P1", "P2"])).sum()) > 0
    assert browser.find_elements(By.CSS_SELECTOR, "#effects .truth-mark")
    header = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#effects thead th")]
    shown_p = [r.find_elements(By.TAG_NAME, "td")[header.index("p")].text for r in pooled]
    assert all(re.fullmatch(r"<0\.001|0\.\d\d\d?|1\.00|–", p) for p in shown_p), shown_p   # as format_p prints
    links = browser.find_elements(By.CSS_SELECTOR, "#patients a")
    assert [a.text for a in links] == ["P1", "P2"]


def test_browser_static_site_shows_detections_tracks_and_gradcam(browser, run, tmp_path):
    """The --static site, served by a plain static file server, works like the live one: a grader's detections
    and the tracker's tracks drawn as boxes on the image they belong to, and a Grad-CAM overlay replacing it."""
    import functools
    import http.server
    import threading

    from selenium.webdriver.common.by import By

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    m = manifest(copy)
    sha = dict(zip(m["image"], m["sha256"]))
    lesions = pd.read_parquet(copy / "lesions.parquet")
    image = "images/P1/P1_d002_frontal.png"
    boxes = lesions[lesions["image"] == image].head(5)[["image", "x0", "y0", "x1", "y1"]].reset_index(drop=True)
    boxes = boxes.assign(image_sha256=sha[image], **{"class": "papule"})
    boxes.assign(score=0.8, counted=True).to_parquet(copy / "detections.parquet")
    boxes.head(3).assign(track_id=[7, 8, 9], score=0.8, face_x=0.0, face_y=0.0).to_parquet(copy / "tracks.parquet")
    index = json.loads((copy / "grades.json").read_text())
    index["graders"]["counter"]["tables"] = ["detections.parquet"]
    index["graders"]["tracker"] = {"columns": [], "outcomes": [], "tables": ["tracks.parquet"]}
    (copy / "grades.json").write_text(json.dumps(index))
    (copy / "gradcam" / "P1").mkdir(parents=True)
    Image.new("RGB", (128, 128), (200, 30, 30)).save(copy / "gradcam" / "P1" / "P1_d002_frontal_papules.png")
    site = write_static(load(copy), tmp_path / "site")

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        open_page(browser, f"http://127.0.0.1:{httpd.server_address[1]}/index.html#P1/1/frontal")
        assert wait_for(browser, PHOTO).endswith("run/images/P1/P1_d002_frontal.png")
        browser.find_element(By.CSS_SELECTOR, "#layer-toggles input[data-layer='detections.parquet']").click()
        assert len(browser.find_elements(By.CSS_SELECTOR, "rect.detection-box[data-layer='detections.parquet']")) == 5
        browser.find_element(By.CSS_SELECTOR, "#layer-toggles input[data-layer='tracks.parquet']").click()
        labels = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#box-layer text")]
        assert labels == ["7", "8", "9"]
        browser.find_element(By.TAG_NAME, "body").send_keys("\ue014")        # → : the next day has none
        wait_for(browser, "return document.getElementById('day-label').textContent.startsWith('day 3')")
        assert not browser.find_elements(By.CSS_SELECTOR, "rect.detection-box")
        browser.find_element(By.TAG_NAME, "body").send_keys("\ue012")        # ←
        from selenium.webdriver.support.ui import Select

        Select(browser.find_element(By.ID, "gradcam")).select_by_value("papules")
        assert wait_for(browser, PHOTO).endswith("gradcam/P1/P1_d002_frontal_papules.png")
    finally:
        httpd.shutdown()
        httpd.server_close()
