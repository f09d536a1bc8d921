"""``--json`` on verify, graders list, analyze and protocol check: one JSON document on stdout and nothing else
there, its keys listed in --help; p-values printed as people read them, by one function."""

import json
import math

import pytest
from typer.testing import CliRunner

from synthtrial.analyze.estimate import format_p
from synthtrial.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def graded_run(tmp_path_factory):
    """2 patients x 4 days of the quick design at 128 px, graded by the counter."""
    from synthtrial.grade.stage import grade_run
    from synthtrial.graders.base import get_grader
    from synthtrial.run.generation import generate
    from synthtrial.trial.simulate import design_with_overrides, simulate_trial

    folder = tmp_path_factory.mktemp("json")
    protocol, _ = simulate_trial(*design_with_overrides("quick", {"n_patients": 2, "blocks": 1})).write(
        folder / "tiny.csv")
    run = generate(protocol, folder / "run", size=128, progress=False)
    grade_run(run, [get_grader("counter")])
    return run


@pytest.mark.parametrize(("p", "shown"), [
    (0.41, "0.41"), (0.4149, "0.41"), (1.0, "1.00"), (0.12, "0.12"), (0.0999, "0.10"), (0.0496, "0.050"),
    (0.0421, "0.042"), (0.004, "0.004"), (0.001, "0.001"), (0.00099, "<0.001"), (0.0, "<0.001"), (4e-12, "<0.001"),
    (math.nan, "n/a"), (None, "n/a"), ("x", "n/a"), (1.5, "n/a"), (-0.1, "n/a")])
def test_p_values_read_as_people_read_them(p, shown):
    assert format_p(p) == shown


def test_every_json_command_lists_its_keys_in_help():
    for command, key in ((("verify",), "problems"), (("graders", "list"), "ready"), (("analyze",), "pooled"),
                         (("protocol", "check"), "days_per_patient"), (("scale",), "expected_lesions")):
        text = " ".join(invoke(*command, "--help").stdout.split())
        assert "--json" in text and ("--json keys:" in text or "--json: a list" in text) and key in text, command


def test_verify_json_on_a_good_and_a_damaged_run(graded_run, tmp_path):
    import shutil

    result = invoke("verify", graded_run, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"run": str(graded_run), "ok": True, "problems": []}
    copy = tmp_path / "run"
    shutil.copytree(graded_run, copy)
    image = sorted((copy / "images").rglob("*.png"))[0]
    image.write_bytes(image.read_bytes()[:-10])
    result = invoke("verify", copy, "--json")
    assert result.exit_code == 1
    document = json.loads(result.stdout)  # the whole of stdout is the document
    assert document["ok"] is False and any(image.name in line for line in document["problems"])
    assert result.stderr == ""  # the problems are in the document, not printed beside it


def test_graders_list_json():
    result = invoke("graders", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)["graders"]}
    assert rows["counter"]["weights"] == "none needed" and rows["counter"]["ready"] is True
    assert rows["tracker"]["needs"] == ["detector"]
    assert all(set(row) == {"name", "weights", "ready", "needs", "summary"} for row in rows.values())


def test_analyze_json_and_readable_p_values(graded_run):
    result = invoke("analyze", graded_run, "--no-autoencoder", "--permutations", 100, "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert set(document) == {"analysis", "report", "effects", "outcomes", "alpha", "pooled"}
    assert document["alpha"] == 0.05 and document["report"].endswith("report.html")
    rows = {(r["outcome"], r["arm"]): r for r in document["pooled"]}
    oracle = rows[("oracle", "Cream")]
    assert oracle["ci_low"] <= oracle["estimate"] <= oracle["ci_high"] and 0 <= oracle["p"] <= 1
    assert isinstance(oracle["covered"], bool) and ("grader_counter_count", "Cream") in rows
    assert all(set(r) == {"outcome", "arm", "estimate", "ci_low", "ci_high", "p", "true_effect", "covered",
                          "calibration_slope"} for r in document["pooled"])
    table = invoke("analyze", graded_run, "--no-autoencoder", "--permutations", 100, "--quiet")
    assert table.exit_code == 0, table.output
    assert "e-0" not in table.stdout and "e+0" not in table.stdout  # no 4e-01
    assert format_p(oracle["p"]) in table.stdout


def test_protocol_check_json_is_the_whole_stdout(tmp_path):
    from synthtrial.trial.simulate import design_with_overrides, simulate_trial

    protocol, _ = simulate_trial(*design_with_overrides("quick", {"n_patients": 2})).write(tmp_path / "p.csv")
    result = invoke("protocol", "check", protocol, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["patients"] == 2 and summary["acne04_levels"] and all(isinstance(k, str)
                                                                         for k in summary["acne04_levels"])
