"""Progress wherever a user waits: a fake sink (a ProgressCallback) hears every step of generate, analyze and
power, and no step is larger than a few percent of its phase (one image, one batch, one method of one outcome,
at most 1/32 of the replicates), with the slow start-ups (a patient's face, the Dask cluster) named while the
count is still 0."""

import pandas as pd
import pytest

from synthtrial.analyze.pipeline import AnalysisSettings, analyze_run
from synthtrial.analyze.power import PROGRESS_STEP, StudySettings, power_study, scenario_grid
from synthtrial.run.generation import generate
from synthtrial.trial.simulate import PRESETS


class Sink:
    """Records every (done, total, status) call."""

    def __init__(self):
        self.calls = []

    def __call__(self, done, total, status):
        self.calls.append((done, total, status))

    def phase(self, name):
        """The calls of one phase (its status starts with the phase's name)."""
        return [(d, t, s) for d, t, s in self.calls if s.split(":")[0] == name]


def steps(calls):
    """The increments of the count, in order (a repeated count is a status change, not a step)."""
    counts = [d for d, _, _ in calls]
    return [b - a for a, b in zip([0] + counts, counts)]


@pytest.fixture(scope="module")
def tiny_protocol(tmp_path_factory):
    folder = tmp_path_factory.mktemp("progress")
    rows = [(f"T{p}", day, "Control" if (day // 2) % 2 == 0 else "Cream", 1.6 - 0.3 * ((day // 2) % 2) + 0.1 * p)
            for p in (1, 2) for day in range(8)]
    pd.DataFrame(rows, columns=["patient_id", "day", "treatment", "severity"]).to_csv(folder / "p.csv", index=False)
    return folder / "p.csv"


@pytest.fixture(scope="module")
def tiny_run(tiny_protocol):
    sink = Sink()
    run = generate(tiny_protocol, tiny_protocol.parent / "run", size=128, progress=False, on_progress=sink)
    return run, sink


def test_generate_counts_each_image_and_names_each_patients_start(tiny_run):
    _, sink = tiny_run
    assert sink.calls[-1][:2] == (16, 16)
    assert all(step in (0, 1) for step in steps(sink.calls))  # one image at a time: 1/16 of this run
    assert sum(steps(sink.calls)) == 16
    first_image = next(i for i, step in enumerate(steps(sink.calls)) if step)
    # before the first image the bar says what it is doing: building patient T1's face and lesion course
    assert any(s == "T1: face and lesion course" for _, _, s in sink.calls[:first_image])
    assert any(s == "T2: face and lesion course" for _, _, s in sink.calls)


def test_generate_counts_each_image_from_worker_processes_too(tiny_protocol, tmp_path):
    sink = Sink()
    generate(tiny_protocol, tmp_path / "run", size=128, workers=2, progress=False, on_progress=sink)
    assert sink.calls[-1][:2] == (16, 16)
    assert all(step in (0, 1) for step in steps(sink.calls))
    assert sum(1 for step in steps(sink.calls) if step == 1) >= 12  # per image, not per chunk of 8
    again = Sink()  # a resumed run counts its intact images at once
    generate(tiny_protocol, tmp_path / "run", size=128, progress=False, on_progress=again)
    assert again.calls[-1][:2] == (16, 16)


def test_analyze_tells_each_phase_in_small_steps(tiny_run):
    run, _ = tiny_run
    sink = Sink()
    analyze_run(run, AnalysisSettings(epochs=3, image_size=16, n_permutations=100), device="cpu", progress=False,
                on_progress=sink)
    phases = [s.split(":")[0] for _, _, s in sink.calls]
    assert list(dict.fromkeys(phases)) == ["loading images", "autoencoder", "statistics", "report"]
    loading = sink.phase("loading images")
    assert steps(loading) == [1] * 16 and loading[-1][:2] == (16, 16)
    training = sink.phase("autoencoder")
    assert set(steps(training)) == {1} and training[-1][0] == training[-1][1] >= 3  # per batch, every epoch
    stats = sink.phase("statistics")
    total = stats[-1][1]
    assert stats[-1][0] == total and total >= 40
    assert max(steps(stats)) / total <= 0.03  # one method of one outcome
    assert any("lesion_count" in s for _, _, s in stats)
    assert sink.phase("report")[0][:2] == (0, 1) and sink.phase("report")[-1][:2] == (1, 1)


def test_power_chunks_are_a_few_percent_and_dask_start_up_is_a_phase():
    grid = scenario_grid([("quick", *PRESETS["quick"])])
    settings = StudySettings(seed=1, methods=("period",), outcomes=("oracle",))
    sink = Sink()
    power_study(grid, replicates=64, settings=settings, progress=sink)
    assert sink.calls[-1][:2] == (64, 64)
    assert max(steps(sink.calls)) <= 64 * PROGRESS_STEP == 2
    sink = Sink()
    power_study(grid, replicates=2, settings=settings, workers=1, progress=sink)
    before = [s for d, _, s in sink.calls if d == 0]
    assert before[:2] == ["starting a local Dask cluster of 1 worker", "the workers are loading the statistics"]
    assert sink.calls[-1][:2] == (2, 2)
