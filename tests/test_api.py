"""The scripting API: top-level synthtrial.design/generate/grade/analyze/power with typed results, docstring
examples that run, and an ``import synthtrial`` that stays light."""

import dataclasses
import doctest
import json
import subprocess
import sys
from pathlib import Path

import pytest

import synthtrial
from synthtrial import api

ROOT = Path(__file__).resolve().parents[1]


def test_docstring_examples_run(tmp_path, monkeypatch):
    """Every example in synthtrial/api.py, in a scratch folder (they share tiny.csv and runs/tiny: a re-run of
    design and generate with the same arguments reuses what is there)."""
    monkeypatch.chdir(tmp_path)
    results = doctest.testmod(api, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert results.failed == 0
    assert results.attempted >= 25  # the walk-through and each function's examples
    assert (tmp_path / "runs" / "tiny" / "analysis" / "report.html").is_file()


def test_import_synthtrial_is_light():
    code = ("import sys, json, synthtrial\n"
            "names = [synthtrial.generate, synthtrial.power, synthtrial.GenerateResult, synthtrial.grade,"
            " synthtrial.analyze, synthtrial.__version__]\n"
            "print(json.dumps({m: m in sys.modules for m in ('torch', 'pandas', 'synthtrial.api',"
            " 'synthtrial.grade.stage', 'synthtrial.analyze.pipeline')}))\n")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       cwd=ROOT).stdout)
    assert loaded == {"torch": False, "pandas": False, "synthtrial.api": True, "synthtrial.grade.stage": False,
                      "synthtrial.analyze.pipeline": False}


def test_top_level_names_are_the_api():
    for name in api.__all__:
        if name in ("grade", "analyze"):
            continue
        assert getattr(synthtrial, name) is getattr(api, name)
    assert {"design", "generate", "grade", "analyze", "power", "AnalyzeResult"} <= set(dir(synthtrial))
    with pytest.raises(AttributeError):
        synthtrial.no_such_thing  # noqa: B018


def test_grade_and_analyze_are_the_stage_packages_and_call_the_api(monkeypatch):
    import inspect

    import synthtrial.analyze.pipeline as pipeline  # the packages import as before
    from synthtrial.grade import grade_run

    assert synthtrial.grade is sys.modules["synthtrial.grade"] and synthtrial.analyze is sys.modules["synthtrial.analyze"]
    assert synthtrial.analyze.pipeline is pipeline and synthtrial.grade.grade_run is grade_run
    assert inspect.signature(synthtrial.grade) == inspect.signature(api.grade)
    seen = []
    monkeypatch.setattr("synthtrial.api.analyze", lambda *a, **k: seen.append((a, k)) or "result")
    assert synthtrial.analyze("RUN", alpha=0.1) == "result" and seen == [(("RUN",), {"alpha": 0.1})]
    monkeypatch.setattr("synthtrial.analyze.pipeline.analyze_run", "patched")  # dotted paths still resolve
    assert pipeline.analyze_run == "patched"


def test_results_are_frozen():
    result = api.PowerResult(summary=None, estimates=None, scenarios=())
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.summary = 1
    for cls in (api.DesignResult, api.GenerateResult, api.GradeResult, api.AnalyzeResult, api.PowerResult):
        assert cls.__dataclass_params__.frozen


def test_design_keeps_what_it_wrote_and_refuses_another_trial(tmp_path):
    from synthtrial.util.errors import SynthtrialError

    first = synthtrial.design("quick", tmp_path / "t.csv", n_patients=2, blocks=1)
    again = synthtrial.design("quick", tmp_path / "t.csv", n_patients=2, blocks=1)  # the same bytes: fine
    assert again.truth == first.truth
    before = (tmp_path / "t.csv").read_bytes()
    with pytest.raises(SynthtrialError, match="holds another trial"):
        synthtrial.design("quick", tmp_path / "t.csv", n_patients=2, blocks=1, seed=1)
    assert (tmp_path / "t.csv").read_bytes() == before
    assert synthtrial.design("quick", tmp_path / "t.csv", n_patients=2, blocks=1, seed=1, force=True).truth != first.truth
    with pytest.raises(SynthtrialError, match=r"design\(\): unknown setting 'patients'; it takes .*n_patients"):
        synthtrial.design("quick", tmp_path / "u.csv", patients=2)
    assert not (tmp_path / "u.csv").exists()


def test_unknown_settings_are_one_line_errors(tmp_path):
    from synthtrial.util.errors import SynthtrialError

    with pytest.raises(SynthtrialError, match=r"analyze\(\): unknown setting 'permutations'; it takes .*n_permutations"):
        synthtrial.analyze(tmp_path, permutations=100)
    with pytest.raises(SynthtrialError, match=r"power\(\): unknown setting 'replicate'; it takes .*methods"):
        synthtrial.power("quick", replicate=3)


def test_power_takes_a_designed_trial(tmp_path):
    trial = synthtrial.design("quick", tmp_path / "d.csv", n_patients=2, blocks=2)
    study = synthtrial.power(trial, replicates=2, progress=False, methods=("lmm",), outcomes=("oracle",))
    assert study.scenarios == ("d 2d x1",)
    assert set(study.summary["method"]) == {"lmm"} and len(study.estimates) == 2


def test_grade_opens_one_bar_per_grader_counting_images(tmp_path, monkeypatch):
    """synthtrial.grade shows what `synthtrial grade` shows: a bar per grader, each counting that grader's images."""
    opened = []

    class FakeBar:
        def __init__(self, what, total, *, unit, enabled):
            opened.append((what, total, unit))

        def __enter__(self):
            return lambda done, total, status: None

        def __exit__(self, *exc):
            pass

    class Stop(Exception):
        pass

    def fake_grade_run(run, graders, *, batch_size, progress):
        for grader in graders:
            for done in (0, 3, 6):
                progress(done, 6, grader.name)
        raise Stop

    monkeypatch.setattr("synthtrial.util.progress.progress_bar", FakeBar)
    monkeypatch.setattr("synthtrial.grade.stage.grade_run", fake_grade_run)
    with pytest.raises(Stop):
        synthtrial.grade(tmp_path, ["counter", "iga"])
    assert opened == [("grading counter", 6, "images"), ("grading iga", 6, "images")]
