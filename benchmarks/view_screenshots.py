"""Screenshots of the run browser (``synthtrial view``) for the docs: docs/view-patient.png and docs/view-run.png.

Builds a tiny simulated run (two patients over six days, patient P1 photographed frontal and left, 256 px),
grades it (counter, detector, tracker), analyses it (period and mixed model, no autoencoder), serves it with
``synthtrial.view`` and photographs both pages in headless Chromium (Debian's ``chromium`` and
``chromium-driver``). About two minutes on two CPU cores, most of it the detector.

    python benchmarks/view_screenshots.py [--out docs] [--work DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd


def build_run(work: Path, size: int) -> Path:
    from synthtrial.analyze.pipeline import AnalysisSettings, analyze_run
    from synthtrial.grade.stage import grade_run
    from synthtrial.graders.base import get_grader
    from synthtrial.run.generation import generate
    from synthtrial.trial.protocol import read_protocol
    from synthtrial.trial.simulate import SeverityModel, simulate_severity

    rows = [(p, d, ["Control", "Cream"][(d - 1) // 2 % 2], v)
            for p, views in (("P1", ("frontal", "left")), ("P2", ("frontal",))) for d in range(1, 7) for v in views]
    pd.DataFrame(rows, columns=["patient_id", "day", "treatment", "view"]).to_csv(work / "schedule.csv", index=False)
    simulate_severity(read_protocol(work / "schedule.csv"),
                      SeverityModel(effects={"Cream": -0.8}, noise_sd=0.15, washin_half_life=1.0), seed=3,
                      ).write(work / "protocol.csv")
    run = generate(work / "protocol.csv", work / "run", size=size, seed=3, progress=False)
    grade_run(run, [get_grader(name) for name in ("counter", "detector", "tracker")])
    analyze_run(run, AnalysisSettings(autoencoder=False, n_permutations=200, methods=("period", "lmm")),
                progress=False)
    return run


def screenshots(run: Path, out: Path) -> list[Path]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from synthtrial.view.data import load
    from synthtrial.view.server import start, stop, url_of

    server = start(load(run), 0)
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    ready = "return document.body.dataset.ready === '1'"
    written = []
    try:
        driver.get(url_of(server) + "index.html#P1/2/frontal")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(ready))
        for selector in ("#show-masks", "#show-boxes", "#layer-toggles input[data-layer='detections.parquet']"):
            driver.find_element(By.CSS_SELECTOR, selector).click()
        WebDriverWait(driver, 30).until(
            lambda d: d.execute_script("return document.getElementById('mask-layer').dataset.ready === '1'"))
        time.sleep(0.5)
        written.append(out / "view-patient.png")
        driver.save_screenshot(str(written[-1]))
        driver.get(url_of(server) + "run.html")
        WebDriverWait(driver, 30).until(lambda d: d.execute_script(ready))
        driver.set_window_size(1400, max(900, driver.execute_script("return document.body.scrollHeight") + 20))
        time.sleep(0.5)
        written.append(out / "view-run.png")
        driver.save_screenshot(str(written[-1]))
    finally:
        driver.quit()
        stop(server)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run (default: a temp folder)")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run = work / "run" if (work / "run" / "analysis").is_dir() else build_run(work, args.size)
        for path in screenshots(run, args.out):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
