"""`generate --counterfactual`: each arm's world paired with the factual run, and the individual effects."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthtrial.analyze.individual import individual_errors, patient_contrasts, summary
from synthtrial.analyze.pipeline import AnalysisSettings, analyze_run
from synthtrial.cli import app
from synthtrial.run import rundir
from synthtrial.run.generation import generate
from synthtrial.run.verify import verify
from synthtrial.trial.counterfactual import CounterfactualError, counterfactual_severities
from synthtrial.trial.simulate import SeverityModel, TrialDesign, simulate_trial

SIZE = 128
DESIGN = TrialDesign(design="pairs", arms=("Control", "Cream"), n_patients=2, blocks=2, period_days=2)
MODEL = SeverityModel(effects={"Cream": -1.2}, effect_sd=0.1, baseline_mean=1.8, baseline_sd=0.3,
                      washin_half_life=0.5, washout_half_life=0.5, ar_phi=0.2, noise_sd=0.08)


def files(run_dir: Path, under: str = "") -> dict[str, bytes]:
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in sorted((run_dir / under).rglob("*"))
            if p.is_file() and p.name != rundir.LOCK}


@pytest.fixture(scope="module")
def protocol(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("protocol") / "tiny.csv"
    simulate_trial(DESIGN, MODEL, seed=3).write(path)
    return path


@pytest.fixture(scope="module")
def run(protocol, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "cf"
    generate(protocol, out, size=SIZE, seed=3, progress=False, counterfactual=True)
    return out


def _worlds(run: Path):
    for arm in ("Control", "Cream"):
        yield arm, rundir.counterfactual_dir(run, arm)


def test_severities_share_every_draw_until_the_calendars_differ():
    """Without noise and kinetics the worlds are the equations themselves; with them, a world equals the
    factual severity to the bit until the first day its arm is not the factual one."""
    plain = SeverityModel(effects={"Cream": -0.5}, baseline_mean=2.0, baseline_sd=0.0)
    trial = simulate_trial(DESIGN, plain, seed=1, counterfactual=True)
    worlds = trial.counterfactual.set_index(["patient_id", "day", "arm"])["severity"]
    assert set(worlds.xs("Control", level="arm")) == {2.0}
    assert set(worlds.xs("Cream", level="arm")) == {1.5}
    noisy = simulate_trial(DESIGN, MODEL, seed=1, counterfactual=True)
    both = noisy.counterfactual.merge(noisy.protocol[["patient_id", "day", "treatment", "severity"]],
                                      on=["patient_id", "day"], suffixes=("_cf", ""))
    for (pid, arm), rows in both.groupby(["patient_id", "arm"]):
        rows = rows.sort_values("day")
        first_other = int(np.argmax((rows["treatment"] != arm).to_numpy()))
        before = rows.iloc[:first_other]
        assert (before["severity"].to_numpy() == before["severity_cf"].to_numpy()).all()
        assert not np.allclose(rows["severity"], rows["severity_cf"])
    assert trial.protocol.equals(simulate_trial(DESIGN, plain, seed=1).protocol)  # factual draws untouched


def test_counterfactual_needs_a_truth_that_reproduces_the_protocol(protocol):
    frame = pd.read_csv(protocol).assign(view="frontal")
    truth = json.loads(protocol.with_name("tiny.truth.json").read_text())
    assert len(counterfactual_severities(frame, truth, "t")) == 2 * len(frame)
    with pytest.raises(CounterfactualError, match="has none"):
        counterfactual_severities(frame, None, "t")
    with pytest.raises(CounterfactualError, match="does not reproduce .*patient 'P01', day 1"):
        counterfactual_severities(frame.assign(severity=frame["severity"] + 0.01), truth, "t")


def test_cli_refuses_a_protocol_without_truth_and_writes_nothing(protocol, tmp_path):
    bare = tmp_path / "bare.csv"
    shutil.copy(protocol, bare)
    result = CliRunner().invoke(app, ["generate", str(bare), "--out", str(tmp_path / "out"), "--size", str(SIZE),
                                      "--counterfactual", "--quiet"])
    assert result.exit_code == 2
    assert "--counterfactual needs the simulation truth" in result.output
    assert not (tmp_path / "out").exists()
    assert "--counterfactual" in CliRunner().invoke(app, ["generate", "--help"]).output


def test_worlds_share_every_lesion_until_they_diverge(run):
    factual = pd.read_parquet(run / rundir.LESIONS)
    effects = rundir.read_individual_effects(run)
    shared_after = own_after = 0
    for arm, world_dir in _worlds(run):
        world = pd.read_parquet(world_dir / rundir.LESIONS)
        ite = effects[effects["arm"] == arm]
        for pid in factual["patient_id"].unique():
            days = ite[ite["patient_id"] == pid].sort_values("day")
            differ = days.loc[days["ite_severity"] != 0, "day"]
            diverge = int(differ.min()) if len(differ) else 10**9
            f, w = (t[t["patient_id"] == pid].set_index(["day", "lesion_id"]) for t in (factual, world))
            # before the worlds diverge: the same lesions (ids), of the same type at the same place
            before_f, before_w = (t[t.index.get_level_values("day") < diverge] for t in (f, w))
            assert before_f.index.sort_values().equals(before_w.index.sort_values())
            assert before_f[["type", "cx", "cy"]].equals(before_w.loc[before_f.index, ["type", "cx", "cy"]])
            # one id never names two lesions: wherever an id is in both tables it sits at the same place
            common = f.index.intersection(w.index)
            assert np.array_equal(f.loc[common, ["cx", "cy"]].to_numpy(), w.loc[common, ["cx", "cy"]].to_numpy())
            born_before = set(before_f.index.get_level_values("lesion_id"))
            after = w[w.index.get_level_values("day") >= diverge]
            ids = set(after.index.get_level_values("lesion_id"))
            shared_after += len(ids & born_before)
            own_after += len(ids - set(f.index.get_level_values("lesion_id")))
            assert min(ids - born_before, default=10**9) > max(born_before, default=-1)
    assert shared_after > 0 and own_after > 0  # the lesions carried over, and the worlds' own births


def test_pairs_differ_only_where_their_lesion_tables_do(run):
    factual = pd.read_parquet(run / rundir.LESIONS)
    keys = ["type", "cx", "cy", "radius_px", "intensity"]
    changed_pairs = 0
    for arm, world_dir in _worlds(run):
        world = pd.read_parquet(world_dir / rundir.LESIONS)
        for image in pd.read_parquet(world_dir / rundir.MANIFEST)["image"]:
            a = np.asarray(Image.open(run / image)).astype(int)
            b = np.asarray(Image.open(world_dir / image)).astype(int)
            f, w = (t[t["image"] == image].set_index("lesion_id")[keys] for t in (factual, world))
            both = f.index.intersection(w.index)
            same = both[(f.loc[both] == w.loc[both]).all(axis=1)]
            differing = pd.concat([f.drop(index=same), w.drop(index=same)])
            near = np.zeros(a.shape[:2], bool)
            for les in differing.itertuples():  # a lesion's drawing reaches a few radii (its halo, the blur)
                half = 5 * les.radius_px + 10
                near[max(0, int(les.cy - half)):int(les.cy + half) + 1, max(0, int(les.cx - half)):int(les.cx + half) + 1] = True
            diff = (a != b).any(axis=2)
            assert not diff[~near].any(), f"{arm}/{image}: pixels changed away from the lesions that differ"
            changed_pairs += bool(diff.any())
            if differing.empty:
                assert not diff.any()
            assert near.mean() < 0.95 or len(differing) > 20
    assert changed_pairs > 0


def test_counterfactual_runs_verify_and_are_seeded(run, protocol, tmp_path):
    assert verify(run) == []
    for _, world_dir in _worlds(run):
        assert verify(world_dir) == []
    again = tmp_path / "again"
    generate(protocol, again, size=SIZE, seed=3, progress=False, counterfactual=True)
    assert files(again) == files(run)
    plain = tmp_path / "plain"
    generate(protocol, plain, size=SIZE, seed=3, progress=False)
    assert {k: v for k, v in files(run).items() if not k.startswith("counterfactual/")} == files(plain)
    # a damaged world image is found by verify RUN, and the same command heals it
    assert not (plain / rundir.COUNTERFACTUAL).exists()
    target = sorted((rundir.counterfactual_dir(again, "Cream") / "images").rglob("*.png"))[0]
    target.write_bytes(b"broken")
    assert any(line.startswith("counterfactual/Cream/images/") for line in verify(again))
    generate(protocol, again, size=SIZE, seed=3, progress=False, counterfactual=True)
    assert files(again) == files(run)


def test_interrupted_counterfactual_generation_resumes_to_the_same_bytes(run, protocol, tmp_path):
    class Stop(Exception):
        pass

    seen = {"factual done": False}

    def stop_in_a_world(done, total, status):
        if seen["factual done"] and done >= 3:
            raise Stop
        seen["factual done"] = seen["factual done"] or done == total

    cut = tmp_path / "cut"
    with pytest.raises(Stop):
        generate(protocol, cut, size=SIZE, seed=3, progress=False, counterfactual=True, on_progress=stop_in_a_world)
    assert (cut / rundir.MANIFEST).is_file() and not (cut / rundir.INDIVIDUAL_EFFECTS).exists()
    assert any("counterfactual/Control" in line for line in verify(cut))
    generate(protocol, cut, size=SIZE, seed=3, progress=False, counterfactual=True)
    assert files(cut) == files(run)


def test_individual_effects_and_the_analysis_hook(run, tmp_path):
    effects = rundir.read_individual_effects(run)
    factual = rundir.read_manifest(run, ("day", "severity", "lesion_count", "treatment")).drop_duplicates(
        ["patient_id", "day"])
    cream = effects[effects["arm"] == "Cream"].merge(factual, on=["patient_id", "day"], suffixes=("", "_m"))
    assert (cream["severity"] == cream["severity_m"]).all()
    assert np.allclose(cream["ite_severity"], cream["severity"] - cream["severity_cf"])
    assert (cream["ite_count"] == cream["lesion_count"] - cream["lesion_count_cf"]).all()
    # the Cream world is Cream every day: no effect against it on Cream days beyond carryover, a large one on
    # Control days (factual Control is worse)
    control_days = cream[cream["treatment"] == "Control"]
    assert (control_days["ite_severity"] > 0.5).all() and (control_days["ite_count"] > 0).all()
    contrasts = patient_contrasts(effects, "Control").set_index("scope")
    assert list(contrasts["arm"].unique()) == ["Cream"] and (contrasts["ite_severity"] < -0.5).all()
    rows = pd.DataFrame({"outcome": ["oracle", "lesion_count", "iga", "oracle"], "method": "period",
                         "role": "inferential", "scope": ["P01", "P01", "P01", "pooled"], "arm": "Cream",
                         "reference": "Control", "estimate": [-1.0, -20.0, -1.0, -1.0]})
    table = individual_errors(run, rows, "Control")
    assert list(table["outcome"]) == ["oracle", "lesion_count"]  # IGA has no counterfactual units; pooled is not
    assert table["error"].tolist() == pytest.approx([-1.0 - contrasts.loc["P01", "ite_severity"],
                                                     -20.0 - contrasts.loc["P01", "ite_count"]])
    assert set(summary(table)["patients"]) == {1}
    copy = shutil.copytree(run, tmp_path / "run")
    analysis = analyze_run(copy, AnalysisSettings(autoencoder=False, n_permutations=200), progress=False)
    written = pd.read_csv(analysis / "individual_effects.csv")
    assert set(written["outcome"]) == {"oracle", "lesion_severity", "lesion_count"}
    assert set(written["scope"]) == {"P01", "P02"} and written["error"].notna().all()
    assert "Against the individual effects" in (analysis / "report.html").read_text()


def test_reach_covers_every_pixel_the_differing_lesions_change():
    """Without grain, two renderings whose lesion sets differ are identical outside the reach of the lesions
    that differ, also where those overlap, merge halos with or sit under the shared ones; the reach is local."""
    from synthtrial.render.procedural import LESION_TYPES, LesionSpec, PhotoStats, ProceduralRenderer

    rng = np.random.default_rng(5)
    n = 160
    yy, xx = np.mgrid[:n, :n]
    skin = np.hypot(xx - n / 2, yy - n / 2) < 0.45 * n
    image = np.full((n, n, 3), (200, 160, 140), np.uint8)
    stats = PhotoStats((1.0, 0.2), 0.0, 0.8, (200.0, 160.0, 140.0))
    lesions = [LesionSpec(i, str(rng.choice(LESION_TYPES)), float(rng.uniform(40, 120)), float(rng.uniform(40, 120)),
                          float(rng.uniform(1.5, 4.0)), float(rng.uniform(0.3, 1.0)), int(rng.integers(1 << 30)))
               for i in range(30)]
    renderer = ProceduralRenderer()
    shared, only_a, only_b = lesions[:20], lesions[20:25], lesions[25:]
    a = renderer(image, shared + only_a, skin_mask=skin, stats=stats, seed=1).image
    b = renderer(image, only_b + shared, skin_mask=skin, stats=stats, seed=1).image
    inside = renderer.reach(only_a + only_b, (n, n), stats)
    assert (a != b).any(axis=2)[inside].any()
    assert not (a != b).any(axis=2)[~inside].any()
    assert inside.mean() < 0.6
