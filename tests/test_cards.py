"""Grading a user can plan (issue 22): ``grade`` runs by default only the graders whose model card meets its
targets, read from the card's figures (``evaluation.json``) against issue 20's targets in code; others run when
named, with a one-line warning that ``analyze`` repeats."""

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.graders import base, cards
from synthtrial.graders.cards import CARD_FILE, TARGETS, Target, card_status, check, default_graders

ROOT = Path(__file__).resolve().parents[1]


def _numbers(value):
    """Every number of a card figure: a number, a list of them, or a mapping of them (the varied subset's
    prevalence per characteristic)."""
    if isinstance(value, dict):
        return [v for item in value.values() for v in _numbers(item)]
    return value if isinstance(value, list) else [value]


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_each_shipped_card_gives_the_figures_its_model_card_states(name):
    folder = base.DEFAULT_WEIGHTS_DIR / name
    card = json.loads((folder / CARD_FILE).read_text())
    prose = (folder / "MODEL_CARD.md").read_text()
    for figures in card["figures"].values():
        for metric, value in figures.items():
            for v in _numbers(value):
                assert f"{v:g}" in prose or f"{v:.2f}" in prose, (name, metric, v)   # transcribed, not invented
    assert card["weights_sha256"] == hashlib.sha256((folder / base.WEIGHTS_FILE).read_bytes()).hexdigest()
    status = card_status(name)
    assert status.meets_targets == all(c.met for c in status.checks) and len(status.checks) == len(TARGETS[name])


def test_the_default_is_what_the_cards_say():
    chosen = default_graders()
    assert "counter" in chosen                          # the baseline: no targets of its own
    for name in base.available():
        meets = card_status(name).meets_targets and all(n in chosen for n in base.REGISTRY[name].needs)
        assert (name in chosen) == meets, name


def test_targets_read_bounds_ratios_and_every_element_of_a_list():
    ratio = Target("held_out_seed", "count_mae", "<=", 0.5, relative_to="counter_count_mae")
    assert check(ratio, {"held_out_seed": {"count_mae": 4.0, "counter_count_mae": 16.0}}).value == 0.25
    assert check(ratio, {"held_out_seed": {"count_mae": 9.0, "counter_count_mae": 16.0}}).met is False
    recall = Target("held_out_seed", "recall3", ">=", 0.7)
    assert check(recall, {"held_out_seed": {"recall3": [0.9, 0.8, 0.75]}}).met
    low = check(recall, {"held_out_seed": {"recall3": [0.9, 0.65, 0.75]}})
    assert not low.met and low.value == 0.65              # the worst class decides
    missing = check(recall, {"held_out_portrait": {"recall3": [1, 1, 1]}})
    assert missing.value is None and not missing.met and "not measured" in missing.describe()


@pytest.fixture()
def weights_home(tmp_path, monkeypatch):
    """A copy of the shipped weights folders (linked files) that the registry and the cards read instead."""
    home = tmp_path / "weights"
    for folder in base.DEFAULT_WEIGHTS_DIR.iterdir():
        if folder.is_dir():
            (home / folder.name).mkdir(parents=True)
            for f in folder.iterdir():
                (home / folder.name / f.name).symlink_to(f)
    monkeypatch.setattr(base, "DEFAULT_WEIGHTS_DIR", home)
    monkeypatch.setattr(cards, "DEFAULT_WEIGHTS_DIR", home)
    return home


def _write_card(folder: Path, figures: dict, sha: str | None = None) -> None:
    (folder / CARD_FILE).unlink(missing_ok=True)
    sha = sha or hashlib.sha256((folder / base.WEIGHTS_FILE).read_bytes()).hexdigest()
    (folder / CARD_FILE).write_text(json.dumps({"figures": figures, "weights_sha256": sha}))


GOOD_IGA = {"held_out_seed": {"accuracy3": 0.86, "recall3": [0.8, 0.74, 0.9]}, "held_out_portrait": {"accuracy3": 0.66}}


def test_a_new_card_that_meets_its_targets_joins_the_default(weights_home):
    iga = weights_home / "iga"
    _write_card(iga, GOOD_IGA)
    assert card_status("iga").meets_targets and "iga" in default_graders()
    short = {**GOOD_IGA, "held_out_portrait": {"accuracy3": 0.59}}
    _write_card(iga, short)
    status = card_status("iga")
    assert not status.meets_targets and "iga" not in default_graders()
    assert status.reason == "short of its targets: held-out portrait accuracy3 >= 0.6: 0.59"


def test_a_card_for_other_weights_or_none_meets_nothing(weights_home):
    iga = weights_home / "iga"
    _write_card(iga, GOOD_IGA, sha="0" * 64)          # retrained weights copied in, the card not updated
    status = card_status("iga")
    assert not status.meets_targets and "measured other weights" in status.reason
    (iga / CARD_FILE).unlink()
    assert "no measured figures" in card_status("iga").reason and "iga" not in default_graders()
    (iga / CARD_FILE).write_text("{not json")
    with pytest.raises(base.GraderError, match=r"evaluation\.json: not a readable JSON card"):
        card_status("iga")


def test_the_tracker_joins_the_default_only_with_the_detector(weights_home):
    assert ("tracker" in default_graders()) == ("detector" in default_graders())
    detector = weights_home / "detector"
    _write_card(detector, {"held_out_seed": {"count_mae": 3, "counter_count_mae": 16, "level_accuracy": 0.9,
                                             "ap50": 0.7}, "held_out_portrait": {"ap50": 0.5},
                           "shipped_trial": {"within_spearman_median": 0.85}})
    chosen = default_graders()
    assert {"detector", "tracker"} <= set(chosen) and chosen.index("tracker") > chosen.index("detector")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """2 patients x 3 days of protocols/quick.csv at 128 px."""
    from synthtrial.run.generation import generate

    lines = (ROOT / "protocols" / "quick.csv").read_text().splitlines()
    keep = [lines[0]] + [r for r in lines[1:] if r.split(",")[0] in ("P01", "P02") and int(r.split(",")[1]) <= 3]
    folder = tmp_path_factory.mktemp("cards")
    (folder / "p.csv").write_text("\n".join(keep) + "\n")
    return generate(folder / "p.csv", folder / "R", size=128, progress=False)


def test_grade_runs_the_default_graders_and_warns_once_for_one_named(small_run, tmp_path, weights_home):
    run = Path(shutil.copytree(small_run, tmp_path / "R"))
    iga = weights_home / "iga"
    (iga / CARD_FILE).unlink()                       # whatever the shipped card says: this one has none
    first = CliRunner().invoke(app, ["grade", str(run), "-q"])
    assert first.exit_code == 0, first.output
    assert set(json.loads((run / "grades.json").read_text())["graders"]) == set(default_graders())
    assert "warning" not in first.stderr
    named = CliRunner().invoke(app, ["grade", str(run), "--graders", "counter,iga", "-q"])
    assert named.exit_code == 0, named.output
    lines = named.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"synthtrial: warning: grader 'iga' is not a default grader, no measured "
                                        r"figures \(.*evaluation\.json missing\); see its MODEL_CARD\.md", lines[0])
    entry = json.loads((run / "grades.json").read_text())["graders"]["iga"]
    assert entry["meets_targets"] is False and entry["below_targets"].startswith("no measured figures")
    from synthtrial.analyze.pipeline import warn_below_targets

    with pytest.warns(cards.BelowTargetsWarning) as caught:   # analyze repeats it where the column is an outcome
        said = warn_below_targets(run, ["image", "counter_count", "iga_expected_grade"])
    assert len(caught) == 1 and said == [str(caught[0].message)]
    assert said[0].endswith("analysed as outcome(s) grader_iga_expected_grade")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_below_targets(run, ["image", "counter_count"]) == []   # not an outcome here: no warning


def test_graders_list_says_which_graders_run_by_default():
    result = CliRunner().invoke(app, ["graders", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.strip()
            and line.split()[0] in base.REGISTRY}
    for name in base.REGISTRY:
        assert (" yes " in rows[name]) == (name in default_graders()), rows[name]
