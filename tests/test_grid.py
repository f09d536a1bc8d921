"""The size-and-coverage grid: its cells, `synthtrial power --grid` at tiny scale, and the check's logic."""

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from synthtrial.analyze import grid as G
from synthtrial.cli import app
from synthtrial.cli.power import GridName
from synthtrial.util.errors import SynthtrialError


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_grid_cells_span_the_ranges():
    cells = G.grid_designs("full")
    assert len(cells) == 96 and len({name for name, _, _ in cells}) == 96
    assert {d.period_days for _, d, _ in cells} == {2, 7, 14, 28}
    assert {m.ar_phi for _, _, m in cells} == {0.3, 0.6, 0.95}
    assert {m.trend_per_day for _, _, m in cells} == {0.0, G.GRID_TREND}
    assert {(m.washin_half_life, m.washout_half_life) for _, _, m in cells} == {(0.0, 0.0), G.GRID_KINETICS}
    assert {d.randomize for _, d, _ in cells} == {False, True}
    assert {d.days_per_patient for _, d, _ in cells} == {24, 84, 168, 336}
    small = G.grid_designs("small")
    assert len(small) == 32 and {d.period_days for _, d, _ in small} == {2, 28}
    assert {g.value for g in GridName} == set(G.GRIDS)
    with pytest.raises(SynthtrialError, match="unknown grid 'huge'"):
        G.grid_designs("huge")


def _row(cell, method, role, size, se, coverage):
    return {"cell": cell, "method": method, "level": "per patient", "role": role, "size": size, "size_mc_se": se,
            "coverage": coverage}


def test_the_check_reports_every_inferential_row_that_fails_and_nothing_else():
    table = pd.DataFrame([
        _row("a", "period", "inferential", 0.050, 0.005, 0.95),          # holds
        _row("a", "gls_kinetics", "inferential", 0.067, 0.003, 0.95),    # size: 0.067 > 0.05 + 0.006
        _row("b", "lmm", "inferential", 0.058, 0.005, 0.95),             # within 2 MC SE: holds
        _row("b", "lmm_cr1", "inferential", 0.040, 0.005, 0.92),         # coverage below 0.93
        _row("c", "gls_kinetics", "descriptive", 0.150, 0.005, 0.50),    # not claimed: not checked
        _row("c", "randomization", "not available", np.nan, np.nan, np.nan),
        _row("d", "randomization", "inferential", 0.031, 0.004, np.nan),  # no CI: size alone
    ])
    bad = G.grid_violations(table)
    assert list(zip(bad["cell"], bad["method"])) == [("a", "gls_kinetics"), ("b", "lmm_cr1")]
    assert bad["check"].tolist() == ["size 0.067 > 0.05 + 2 x 0.003", "coverage 0.920 < 0.93"]
    assert [G.check_row(row) for row in table.to_dict("records")] == [
        "ok", bad["check"].iloc[0], "ok", bad["check"].iloc[1], "", "", "ok"]
    holding = table.drop(index=[1, 3])
    assert G.grid_violations(holding).empty and list(G.grid_violations(holding).columns) == [*table.columns, "check"]


def test_grid_command_at_tiny_scale_writes_the_table(tmp_path, monkeypatch):
    import synthtrial.cli.power as power_cli

    monkeypatch.setattr(power_cli, "MAX_TRIALS", 100)   # the pooled study (64 x 4 trials) runs in batches
    path = tmp_path / "grid.md"
    result = invoke("power", "--grid", "small", "--replicates", 1, "--workers", 1, "--grid-table", path, "--quiet")
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "grid.csv")
    assert tuple(table.columns) == G.TABLE_COLUMNS
    assert len(table) == 32 * len(G.GRID_METHODS) and set(table["method"]) == set(G.GRID_METHODS)
    assert set(table["cell"]) == {name for name, _, _ in G.grid_designs("small")}
    assert (table["null_tests"] > 0).any() and set(table["period_days"]) == {2, 28}
    rand = table[table["method"] == "randomization"].set_index("order")["role"]
    assert set(rand["fixed"]) == {"not available"} and set(rand["random"]) == {"inferential"}
    gls = table[table["method"] == "gls_kinetics"].set_index(["period_days", "phi"])["role"]
    assert set(gls[(28, 0.3)]) == {"inferential"} and set(gls[(28, 0.95)]) == {"descriptive"}
    assert set(gls[(2, 0.3)]) == {"descriptive"}                         # 24 days
    # the pooled model runs on GRID_PATIENTS x --replicates trials: as many tests per row as a per-patient method
    tests = table.set_index("method")["null_tests"]
    assert set(tests["lmm"]) == {G.pooled_replicates(1)} == set(tests["period"]) == {G.GRID_PATIENTS}
    pooled = table.set_index("method")["role"]
    assert set(pooled["lmm"]) == {"inferential"} and set(pooled["lmm_cr1"]) == {"descriptive"}
    assert list(table["method"][:len(G.GRID_METHODS)]) == list(G.GRID_METHODS)   # method order kept per cell
    checked = table["role"] == "inferential"
    assert table.loc[checked, "check"].notna().all() and table.loc[~checked, "check"].isna().all()
    text = path.read_text()
    assert text.startswith("# Size-and-coverage grid (small)") and "**Check:" in text and "grid.csv" in text
    assert "check" in result.stdout


def test_grid_refuses_options_that_make_other_scenarios(tmp_path):
    result = invoke("power", "--preset", "quick", "--pooled-replicates", 8)
    assert result.exit_code == 2 and "--pooled-replicates needs --grid" in result.stderr
    result = invoke("power", "--grid", "small", "--replicates", 4, "--pooled-replicates", 2)
    assert result.exit_code == 2 and "--pooled-replicates 2 is below --replicates 4" in result.stderr
    result = invoke("power", "--grid", "small", "--preset", "quick")
    assert result.exit_code == 2 and "--grid makes its own scenarios; drop --preset" in result.stderr
    result = invoke("power", "--preset", "quick", "--grid-table", tmp_path / "grid.md")
    assert result.exit_code == 2 and "--grid-table needs --grid" in result.stderr
    result = invoke("power", "--grid", "small", "--grid-table", tmp_path / "grid.txt")
    assert result.exit_code == 2 and "'.txt'" in result.stderr


def test_merge_pooled_takes_the_pooled_rows_from_the_pooled_study_in_the_main_order():
    main = pd.DataFrame({"scenario": ["b", "b", "b", "a", "a", "a"], "method": ["period", "lmm", "lmm_cr1"] * 2,
                         "tests": [8, 2, 2, 8, 2, 2]})
    pooled = pd.DataFrame({"scenario": ["a", "a", "b", "b"], "method": ["lmm", "lmm_cr1"] * 2, "tests": [8, 8, 9, 9]})
    merged = G.merge_pooled(main, pooled)
    assert merged.to_dict("list") == {"scenario": ["b", "b", "b", "a", "a", "a"],
                                      "method": ["period", "lmm", "lmm_cr1"] * 2, "tests": [8, 9, 9, 8, 8, 8]}


def test_the_pooled_study_reuses_the_main_studys_trials_and_gets_the_same_numbers():
    from synthtrial.analyze.power import StudySettings, power_study, scenario_grid

    scenarios = scenario_grid([G.grid_designs("small")[5]], effect_scales=[1.0])
    main = StudySettings(methods=G.GRID_METHODS, outcomes=("oracle",), seed=3)
    pooled = StudySettings(methods=G.GRID_POOLED_METHODS, outcomes=("oracle",), seed=3)
    estimates, _ = power_study(scenarios, replicates=2, settings=main)
    known = G.known_pooled(G.pooled_trials(estimates), [s.name for s in scenarios])
    assert sorted(known) == [(0, 0), (0, 1)]
    reused, summary = power_study(scenarios, replicates=3, settings=pooled, known=known)
    fresh, fresh_summary = power_study(scenarios, replicates=3, settings=pooled)
    pd.testing.assert_frame_equal(reused, fresh)
    pd.testing.assert_frame_equal(summary, fresh_summary)
    assert set(reused["method"]) == set(G.GRID_POOLED_METHODS) and sorted(set(reused["replicate"])) == [0, 1, 2]


def test_known_pooled_picks_each_batchs_scenarios_from_rows_grouped_once():
    estimates = pd.DataFrame({"scenario": ["a", "a", "b", "b", "c", "a", "c"],
                              "replicate": [0, 0, 0, 0, 0, 1, 1],
                              "method": ["lmm", "period", "lmm_cr1", "lmm", "lmm", "lmm", "period"],
                              "estimate": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]})
    trials = G.pooled_trials(estimates)
    assert {name: sorted(reps) for name, reps in trials.items()} == {"a": [0, 1], "b": [0], "c": [0]}
    second = G.known_pooled(trials, ["c", "b"])             # indices within the batch
    assert sorted(second) == [(0, 0), (1, 0)]
    assert second[(1, 0)].to_dict("list") == {"scenario": ["b", "b"], "replicate": [0, 0],
                                              "method": ["lmm_cr1", "lmm"], "estimate": [3.0, 4.0]}
    assert list(second[(0, 0)].index) == [0]
    assert G.known_pooled(trials, ["a"])[(0, 1)]["estimate"].tolist() == [6.0]
    assert G.known_pooled(trials, ["z"]) == {}
