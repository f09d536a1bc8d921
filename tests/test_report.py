"""The report leads with the answer (issue 22): a forest plot and table of each outcome's pooled estimate beside
its truth first, then grader accuracy, then the details; notes as footnotes; CR1 only where it differs; per-patient
results as a patients x methods grid without the unavailable test; graders on the trajectories; and the image strip
shows what it measured."""

import base64
import io
import json
import shutil
from html.parser import HTMLParser
from itertools import combinations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from synthtrial.analyze.report import (TYPE_COLOURS, embedding_axes, image_strip, strip_days, trajectories_axes,
                                       write_report)
from synthtrial.analyze.report_tables import Footnotes, answer_table, clauses, masked
from synthtrial.grade.evaluate import count_agreement


class Page(HTMLParser):
    """What a reader sees of the report, in order: headings, images (alt), tables (header and row cells), notes
    (list items) and paragraphs of a class."""

    def __init__(self, text: str):
        super().__init__()
        self.items: list[tuple[str, object]] = []   # ("h2", text) / ("img", alt) / ("table", dict) / ...
        self._cell = self._text = None
        self._table = None
        self._tag = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in ("h2", "h3", "li", "p", "summary"):
            self._tag, self._text, self._class = tag, [], attrs.get("class")
        elif tag == "img":
            self.items.append(("img", attrs.get("alt")))
        elif tag == "table":
            self._table = {"class": attrs.get("class"), "header": [], "rows": []}
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._table is not None:
            self._cell = []

    def handle_data(self, data):
        for sink in (self._cell, self._text):
            if sink is not None:
                sink.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._table is not None:
            self._table["rows"].append(self._row)
        elif tag == "table" and self._table is not None:
            rows = self._table["rows"]
            self.items.append(("table", {"class": self._table["class"], "header": rows[0] if rows else [],
                                         "rows": rows[1:]}))
            self._table = None
        elif tag == self._tag and self._text is not None:
            self.items.append((tag if tag != "p" or not self._class else f"p.{self._class}", "".join(self._text)))
            self._text = self._tag = None

    def all(self, kind):
        return [v for k, v in self.items if k == kind]

    def tables(self, cls):
        return [t for t in self.all("table") if t["class"] == cls]


def _abab_run(folder, *, patients, days_per_period):
    from synthtrial.run.generation import generate
    from synthtrial.trial.simulate import SeverityModel, TrialDesign, simulate_trial

    trial = simulate_trial(TrialDesign(design="abab", arms=("Control", "Cream"), n_patients=patients, blocks=4,
                                       period_days=days_per_period),
                           SeverityModel(effects={"Cream": -0.9}, effect_sd=0.1, baseline_mean=2.0, baseline_sd=0.2,
                                         ar_phi=0.2, noise_sd=0.1), seed=3)
    protocol, _ = trial.write(folder / "trial.csv")
    return generate(protocol, folder / "run", size=128, progress=False)


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """3 patients x 8 days (ABAB, 2-day periods), graded by the counter and by the shipped IGA grader (its
    network replaced by the drawn IGA, one grade off on a third of the images, so nothing slow runs), analysed
    with a 1-epoch autoencoder. Returns the run, its analysis folder and the report parsed."""
    from synthtrial.analyze.pipeline import AnalysisSettings, analyze_run
    from synthtrial.grade import grade_run
    from synthtrial.graders import base
    from synthtrial.graders.base import get_grader
    from synthtrial.graders.iga import IGAGrader

    run = _abab_run(tmp_path_factory.mktemp("report"), patients=3, days_per_period=2)
    manifest = pd.read_parquet(run / "manifest.parquet")
    # the shipped IGA weights copied without their evaluation.json: a grader below its targets (not measured)
    uncarded = tmp_path_factory.mktemp("iga-uncarded")
    for name in ("model.safetensors", "config.json"):
        shutil.copy(base.DEFAULT_WEIGHTS_DIR / "iga" / name, uncarded / name)
    iga = IGAGrader.from_pretrained(uncarded, device="cpu")
    truth = dict(zip(manifest["image"], manifest["iga"]))
    inflammatory = manifest[["n_papule", "n_pustule", "n_nodule"]].sum(axis=1)
    counts = dict(zip(manifest["image"], inflammatory))

    def drawn_iga(images, meta):
        grade = np.array([truth[i] for i in meta["image"]], dtype=float)
        grade[::3] = np.clip(grade[::3] + 1, 0, 4)
        frame = pd.DataFrame({"grade": grade, "expected_grade": grade + 0.25})
        return frame.assign(**{c: [float(counts[i]) for i in meta["image"]] for c in iga.outcomes
                               if c not in frame})

    iga.predict = drawn_iga
    with pytest.warns(UserWarning, match="grader 'iga' is not a default grader"):
        grade_run(run, [get_grader("counter", device="cpu"), iga])
    with pytest.warns(UserWarning, match="analysed as outcome"):
        analysis = analyze_run(run, AnalysisSettings(epochs=1, image_size=16, n_permutations=100), progress=False)
    return run, analysis, Page((analysis / "report.html").read_text())


def test_the_report_leads_with_the_answer(reported):
    _, analysis, page = reported
    headings = page.all("h2")
    assert headings[:4] == ["1. Pooled effects beside the truth", "2. Grader accuracy", "3. Trajectories",
                            "4. Per-patient tests"]
    assert headings.index("5. Details") > 3
    assert page.all("img")[0] == "forest plot"        # the first figure is the answer
    first_table = page.all("table")[0]
    assert first_table["class"] == "answer"
    effects = pd.read_csv(analysis / "effects.csv")
    cr2 = effects[(effects["scope"] == "pooled") & (effects["method"] == "lmm")]
    rows = first_table["rows"]
    assert [(r[0], r[1]) for r in rows] == list(zip(cr2["outcome"], cr2["arm"]))   # one row per outcome, CR2
    assert len(rows) == effects.loc[effects["scope"] == "pooled", "outcome"].nunique()


def test_every_outcome_shows_its_raw_truth(reported):
    _, analysis, page = reported
    table = page.tables("answer")[0]
    truth = table["header"].index("truth (severity)")
    effects = pd.read_csv(analysis / "effects.csv")
    population = effects.loc[(effects["outcome"] == "oracle") & (effects["method"] == "lmm"), "true_effect"].iloc[0]
    assert [r[truth] for r in table["rows"]] == [f"{population:.3f}"] * len(table["rows"])
    for grid in page.tables("grid"):     # and every per-patient grid its patients' truth
        column = grid["header"].index("truth")
        assert all(r[column] for r in grid["rows"][:-2])


def test_notes_are_footnotes_said_once(reported):
    _, analysis, page = reported
    assert all("note" not in t["header"] for t in page.all("table"))
    notes = page.all("li")
    assert len(notes) == len(set(notes))                       # each clause listed once
    effects = pd.read_csv(analysis / "effects.csv")
    pooled = effects[(effects["scope"] == "pooled") & (effects["method"] == "lmm")]
    for clause in {c for n in pooled["note"] for c in clauses(n)}:
        assert clause in notes
    repeated = effects.loc[effects["method"] == "hac", "note"].iloc[0]
    html = (analysis / "report.html").read_text()
    for clause in clauses(repeated):    # a per-patient clause in full, or masked where its figures vary
        assert clause in notes or masked(clause) in notes
        assert html.count(clause) <= 1


def test_cr1_only_where_it_differs_from_cr2(reported):
    _, analysis, page = reported
    effects = pd.read_csv(analysis / "effects.csv")
    assert "CR1 [CI], p" not in page.tables("answer")[0]["header"]    # CR1 = CR2 here (balanced design)
    assert any("agrees with CR2 on every row" in p for p in page.all("p"))
    cr1 = (effects["method"] == "lmm_cr1") & (effects["outcome"] == "oracle")
    moved = effects.copy()
    moved.loc[cr1, "p"] = 0.5          # its decision changes at alpha 0.05
    moved.loc[cr1, "ci_high"] += 1.0
    table, differing = answer_table(moved, Footnotes(), 0.05)
    assert differing == 1
    shown = table.set_index("outcome")["CR1 [CI], p"]
    assert shown["oracle"].startswith(f"{moved.loc[cr1, 'estimate'].iloc[0]:.3f}") and ", p 0.5" in shown["oracle"]
    assert (shown.drop("oracle") == "").all()


def test_per_patient_results_are_a_patients_by_methods_grid(reported):
    _, analysis, page = reported
    effects = pd.read_csv(analysis / "effects.csv")
    grids = page.tables("grid")
    per_patient = effects[effects["scope"] != "pooled"]
    assert len(grids) == per_patient["outcome"].nunique()
    patients = sorted(per_patient["scope"].unique())
    for grid in grids:
        assert [r[0] for r in grid["rows"]] == patients + ["rejected", "CI covers truth"]
        assert not any(h.startswith("randomization") for h in grid["header"])
        assert {"period", "welch (d)"} <= {h.rstrip("0123456789,") for h in grid["header"]}   # less footnote marks
    unavailable = page.all("p.unavailable")
    assert len(unavailable) == 1 and unavailable[0].startswith("randomization: left out")
    assert "fixed" in unavailable[0]                   # why, in one line
    assert "rejected 0.000" not in (analysis / "report.html").read_text()


def test_grader_accuracy_from_the_runs_grades_and_truth(reported):
    run, _, page = reported
    table = page.tables("accuracy")[0]
    rows = {(r[0], r[1]): dict(zip(table["header"], r)) for r in table["rows"]}
    assert {("counter_count", "simulated (lesion_count)"), ("counter_count", "visible (visible_count)"),
            ("counter_severity", "simulated (severity)"), ("iga_expected_grade", "simulated (iga)")} <= set(rows)
    manifest = pd.read_parquet(run / "manifest.parquet")
    grades = manifest[["image", "patient_id", "lesion_count"]].merge(pd.read_parquet(run / "grades.parquet"),
                                                                    on="image")
    expected = count_agreement(grades["counter_count"], grades["lesion_count"], grades["patient_id"])
    row = rows[("counter_count", "simulated (lesion_count)")]
    assert row["MAE"] == f"{expected['mae']:.3f}"
    assert row["within-patient Spearman r (median)"] == (f"{expected['within_spearman_median']:.3f}"
                                                         if np.isfinite(expected["within_spearman_median"]) else "")
    assert {"count vs truth", "confusion matrices"} <= set(page.all("img"))
    assert page.all("img").index("count vs truth") < page.all("img").index("trajectories")
    warned = page.all("p.warn")
    assert len(warned) == 1 and warned[0].startswith("grader 'iga' is not a default grader")


def test_confusion_matrix_counts_graded_against_true_levels():
    from synthtrial.analyze.report_graders import confusion

    truth = np.array([0, 1, 1, 2, 4, np.nan])
    graded = np.array([0, 2, 1, 2, 3, 1])
    matrix = confusion(truth, graded, 5)
    assert matrix.sum() == 5 and matrix[1, 2] == 1 and matrix[4, 3] == 1 and np.trace(matrix) == 3


def test_graders_are_on_the_trajectories(reported):
    _, analysis, _ = reported
    outcomes = pd.read_parquet(analysis / "outcomes.parquet")
    fig = trajectories_axes(outcomes, "Control")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "counter_severity" in labels and "iga_expected_grade (z, right axis)" in labels
    lines = [len(ax.get_lines()) for ax in fig.axes]
    assert max(lines) >= 3                      # truth, lesion count and the counter's severity on one axis


def _overlapping(labels):
    boxes = [t.get_window_extent() for t in labels if t.get_text()]
    return [(a, b) for a, b in combinations(boxes, 2) if a.overlaps(b)]


@pytest.mark.parametrize("spread", [1e-4, 1.0, 3e3])
def test_embedding_tick_labels_do_not_overlap_on_small_runs(reported, spread):
    _, analysis, _ = reported
    outcomes = pd.read_parquet(analysis / "outcomes.parquet")
    embeddings = pd.read_parquet(analysis / "embeddings.parquet")
    cols = [c for c in embeddings.columns if c.startswith("e") and c[1:].isdigit()]
    rng = np.random.default_rng(0)
    embeddings[cols] = 0.123456 + spread * rng.standard_normal((len(embeddings), len(cols)))
    fig = embedding_axes(embeddings, outcomes, "Control")
    fig.canvas.draw()
    ax = fig.axes[0]
    assert not _overlapping(ax.get_xticklabels()) and not _overlapping(ax.get_yticklabels())
    assert len([t for t in ax.get_xticklabels() if t.get_text()]) <= 7


def test_an_ungraded_run_says_so_in_one_line(reported, tmp_path):
    run, analysis, _ = reported
    import shutil

    copy = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("grades.*", ".grades", "analysis"))
    settings = json.loads((analysis / "settings.json").read_text())["settings"]
    outcomes = pd.read_parquet(analysis / "outcomes.parquet")
    outcomes = outcomes[[c for c in outcomes.columns if not c.startswith("grader_")]]
    effects = pd.read_csv(analysis / "effects.csv")
    path = write_report(tmp_path / "report.html", run_dir=copy, outcomes=outcomes,
                        effects=effects[~effects["outcome"].str.startswith("grader_")], truth=None,
                        reference="Control", settings=settings, timings={})
    page = Page(path.read_text())
    section = page.all("p")
    assert any(p.startswith("Not graded: run synthtrial grade") for p in section)
    assert "count vs truth" not in page.all("img") and not page.tables("accuracy")


def test_strip_days_are_the_first_day_and_each_period_end():
    rows = pd.DataFrame({"day": [1, 2, 3, 4, 5, 6], "treatment": ["A", "A", "B", "B", "A", "A"]})
    assert strip_days(rows) == [1, 2, 4, 6]


def test_image_strip_outlines_lesions_in_their_type_colour(quick_run_256):
    manifest = pd.read_parquet(quick_run_256 / "manifest.parquet")
    outcomes = manifest[["image", "patient_id", "day", "treatment", "view", "lesion_count"]]
    thumb = 96
    strip = np.asarray(Image.open(io.BytesIO(base64.b64decode(image_strip(quick_run_256, outcomes, thumb=thumb)))))
    columns = len(strip_days(outcomes[outcomes["patient_id"] == "P01"]))  # quick: day 1 + 8 period ends
    assert columns == 9
    assert strip.shape[:2] == (24 + 3 * (thumb + 28), 60 + columns * thumb)
    first = strip[24:24 + thumb, 60:60 + thumb]  # P01, day 1
    plain = np.asarray(Image.open(quick_run_256 / manifest["image"][0]).convert("RGB").resize(
        (thumb, thumb), Image.Resampling.LANCZOS))
    changed = (first != plain).any(axis=2)
    assert changed.any()  # outlines were drawn
    outline = first[changed]
    assert all(tuple(px) in set(TYPE_COLOURS.values()) for px in outline)  # in the types' colours only


def test_report_prints_p_values_as_every_command_does():
    """The report's p-values are format_p's (0.41, 0.042, <0.001), never scientific; "" where there is none."""
    from synthtrial.analyze.report_tables import p_value

    assert [p_value(p) for p in (0.41, 0.0421, 0.0012, 3.1e-07, float("nan"), None)] == \
        ["0.41", "0.042", "0.001", "<0.001", "", ""]
