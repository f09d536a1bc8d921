"""`power` against hostile input: other people's files, sizes that would exhaust the machine, values analyze
refuses, and Dask workers that fail or are interrupted; each ends in one line and exit status 2 (issue 19)."""

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from synthtrial.analyze.limits import MAX_PATIENTS, MAX_REPLICATES
from synthtrial.analyze.power import StudySettings, pending_chunks, power_study, scenario_grid
from synthtrial.trial.simulate import PRESETS, simulate_trial
from synthtrial.util.errors import SynthtrialError
from test_hostile import invoke, one_line_exit_2

ROOT = Path(__file__).resolve().parents[1]
TINY = ("--preset", "quick", "--replicates", 1, "--method", "period", "--outcome", "oracle", "--quiet")


def run_cli(*args, timeout=120):
    """The command in a process of its own (Dask workers write to the real stderr, not CliRunner's)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "synthtrial", *[str(a) for a in args]], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=ROOT)


def truth_file(tmp_path, name="q", **changes):
    _, path = simulate_trial(*PRESETS["quick"], seed=0).write(tmp_path / f"{name}.csv")
    data = json.loads(path.read_text())
    for section, values in changes.items():
        data[section].update(values)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("existing", ["keep.csv", "keep.estimates.csv", "both"])
def test_out_does_not_overwrite_existing_files_without_force(tmp_path, existing):
    names = ["keep.csv", "keep.estimates.csv"] if existing == "both" else [existing]
    for name in names:
        (tmp_path / name).write_text("mine\n")
    one_line_exit_2(invoke("power", *TINY, "--out", tmp_path / "keep.csv"), "--force")
    for name in names:
        assert (tmp_path / name).read_text() == "mine\n"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # the companion was not written either
    assert invoke("power", *TINY, "--out", tmp_path / "keep.csv", "--force").exit_code == 0
    assert (tmp_path / "keep.csv").read_text().startswith("scenario,")
    assert (tmp_path / "keep.estimates.csv").read_text().startswith("scenario,")


def test_report_does_not_overwrite_without_force(tmp_path):
    (tmp_path / "r.html").write_text("mine")
    one_line_exit_2(invoke("power", *TINY, "--report", tmp_path / "r.html"), "r.html already exists")
    assert (tmp_path / "r.html").read_text() == "mine"


@pytest.mark.parametrize("args, needle", [
    (("--replicates", 10 ** 9), "--replicates"),
    (("--patients", 10 ** 9), "--patients"),
    (("--period-days", 10 ** 8), "--period-days"),
    (("--rendered", 10 ** 6), "--rendered"),
    (("--rendered", 1, "--ae-epochs", 10 ** 12), "--ae-epochs"),
    (("--alpha", 0.9), "--alpha must lie in (0, 0.5)"),
    (("--alpha", "nan"), "--alpha"),
])
def test_sizes_and_alpha_are_refused_before_any_work(tmp_path, args, needle):
    started = time.perf_counter()
    one_line_exit_2(invoke("power", "--preset", "quick", *args, "--out", tmp_path / "p.csv", "--quiet"), needle)
    assert time.perf_counter() - started < 20 and not (tmp_path / "p.csv").exists()


def test_limits_are_stated_in_help():
    text = " ".join(invoke("power", "--help").stdout.split())
    assert f"1<=x<={MAX_REPLICATES}" in text and f"1<=x<={MAX_PATIENTS}" in text and "0.5" in text


@pytest.mark.parametrize("design, needles", [
    ({"n_patients": 10 ** 9}, ("patients",)),
    ({"blocks": 10 ** 7}, ("days", "blocks")),
    ({"period_days": 10 ** 8}, ("days",)),
])
def test_design_files_too_large_are_refused(tmp_path, design, needles):
    path = truth_file(tmp_path, design=design)
    started = time.perf_counter()
    result = invoke("power", "--design", path, "--quiet")
    assert time.perf_counter() - started < 20
    one_line_exit_2(result, "")
    assert any(needle in result.stderr for needle in needles), result.stderr


def test_library_limits_and_one_alpha_rule():
    design, model = PRESETS["quick"]
    with pytest.raises(SynthtrialError, match="--replicates must be a whole number from 1"):
        power_study(design, model, 10 ** 9, methods=("period",))
    grid = scenario_grid([("q", design, model)], effect_scales=[0.0, 0.5, 1.0])
    with pytest.raises(SynthtrialError, match="trials; a power study runs at most"):
        power_study(grid, replicates=MAX_REPLICATES, methods=("period",))
    for alpha in (0.9, 0.5, 0.0, float("nan")):
        with pytest.raises(SynthtrialError, match="--alpha"):
            StudySettings(alpha=alpha)


def test_the_task_list_is_streamed_not_built():
    settings = StudySettings(methods=("period",))
    started = time.perf_counter()
    chunks = pending_chunks(3, 10 ** 9, settings, {(0, 0), (0, 2)}, 25)
    first = list(itertools.islice(chunks, 2))  # a list of 3e9 tasks would take minutes and gigabytes
    assert time.perf_counter() - started < 5
    assert first[0] == (0, [1] + list(range(3, 27))) and first[1] == (0, list(range(27, 52)))


@pytest.mark.parametrize("section, values, needle", [
    ("design", {"n_patients": 10 ** 9}, "n_patients"),
    ("design", {"design": "zigzag"}, "must be one of baseline-alternating"),
    ("model", {"noise_sd": 1e308}, "noise_sd"),
])
def test_a_design_file_beyond_the_limits_names_the_file_and_the_option(tmp_path, section, values, needle):
    path = truth_file(tmp_path, **{section: values})
    result = invoke("power", "--design", path, "--replicates", 2, "--quiet")
    one_line_exit_2(result, needle)
    line = " ".join(result.stderr.split())
    assert "q.truth.json: " in line and line.endswith("(option --design)"), result.stderr


def test_an_unknown_arm_in_a_design_file_is_one_line(tmp_path):
    path = truth_file(tmp_path, model={"effects": {"Gel": -0.5}})
    one_line_exit_2(invoke("power", "--design", path, "--replicates", 2, "--quiet"), "'Gel' names no arm")


def test_a_failing_worker_is_summarised_in_one_line(tmp_path):
    # a design the worker cannot simulate (noise so large that severities overflow); if the design check
    # refuses it up front, that is one line too
    path = truth_file(tmp_path, model={"noise_sd": 1e308})
    result = run_cli("power", "--design", path, "--replicates", 4, "--workers", 2, "--method", "period", "-q")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("synthtrial: error:"), result.stderr
    assert "Compute Failed" not in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_with_dask_workers_is_one_line():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "synthtrial", "power", "--preset", "anchor", "--replicates", "5000",
                             "--workers", "2", "--method", "period", "-q"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # wait until both workers run
            workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
            if len(workers) >= 2:
                break
            time.sleep(0.5)
        time.sleep(3)
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches every process of the group
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130
    assert stderr.strip().splitlines() == ["synthtrial: interrupted; finished work is kept: run the same command "
                                           "again to resume"], stderr
