"""Face bank: the frontal filter and the bookkeeping (with an injected image source), and the SDXL plumbing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from synthtrial.util.errors import SynthtrialError  # noqa: E402
from synthtrial.render.facebank import COLUMNS, SKIN_WORDS, face_prompt, generate_face_bank  # noqa: E402



pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def astronaut():
    from skimage import data

    return np.asarray(data.astronaut())


class FakeSource:
    """The astronaut portrait for prompts of even skin types, a rolled astronaut for type III, noise else."""

    def __init__(self, portrait):
        import cv2

        self.portrait = portrait
        self.rolled = cv2.warpAffine(portrait, cv2.getRotationMatrix2D((250, 150), 25, 1.0), (512, 512))
        self.calls: list[tuple[str, int]] = []

    def __call__(self, prompt, generator):
        from PIL import Image

        seed = generator.initial_seed()
        self.calls.append((prompt, seed))
        if "Fitzpatrick type III)" in prompt:
            return Image.fromarray(self.rolled)
        if any(f"Fitzpatrick type {t})" in prompt for t in ("II", "IV", "VI")):
            return Image.fromarray(self.portrait)
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))


def test_prompts_are_deterministic_and_diverse():
    prompts = [face_prompt(0, i) for i in range(12)]
    assert prompts == [face_prompt(0, i) for i in range(12)]
    assert face_prompt(1, 0) != face_prompt(0, 0)
    assert {a["fitzpatrick"] for _, a, _ in prompts} == set(range(1, 7))
    for prompt, attrs, seed in prompts:
        assert ("frontal passport-style portrait photo, neutral expression, looking at the camera, "
                "plain background") in prompt
        assert f"{SKIN_WORDS[attrs['fitzpatrick']]} skin" in prompt and attrs["age"] in prompt
        assert isinstance(seed, int)


def test_only_frontal_faces_are_kept(tmp_path, astronaut):
    from synthtrial.face.faces import load_base_faces

    fake = FakeSource(astronaut)
    seen = []
    out = tmp_path / "bank"
    table = generate_face_bank(3, "unused", out, seed=7, pipeline=fake, progress=lambda t, total, status: seen.append((t, total, status)))
    # attempts cycle skin types I..VI: I noise, II face, III rolled face, IV face, V noise, VI face -> 3 kept
    assert len(fake.calls) == 6 and seen[-1] == (6, 12, "3 kept")  # 12 = default max_tries 4 x n
    assert list(table.columns) == list(COLUMNS)
    assert table["file"].tolist() == ["face_0000.png", "face_0001.png", "face_0002.png"]
    assert table["attempt"].tolist() == [1, 3, 5] and table["fitzpatrick"].tolist() == [2, 4, 6]
    assert (table["roll_deg"].abs() < 10).all() and (table["nose_offset"].abs() <= 0.15).all()
    assert [(p, s) for p, s in fake.calls] == [(face_prompt(7, i)[0], face_prompt(7, i)[2]) for i in range(6)]
    assert sorted(p.name for p in out.iterdir()) == ["face_0000.png", "face_0001.png", "face_0002.png", "faces.csv"]
    on_disk = pd.read_csv(out / "faces.csv")
    assert on_disk["file"].tolist() == table["file"].tolist() and on_disk["prompt"].tolist() == table["prompt"].tolist()
    assert on_disk["seed"].tolist() == table["seed"].tolist()
    faces = load_base_faces(out)
    assert [f.key for f in faces] == ["face_0000", "face_0001", "face_0002"]
    assert np.array_equal(faces[0].image, astronaut)
    # an occupied folder is refused rather than mixed
    with pytest.raises(SynthtrialError, match="already holds face_"):
        generate_face_bank(1, "unused", out, pipeline=fake)


def test_max_tries_is_respected(tmp_path, astronaut):
    fake = FakeSource(astronaut)
    table = generate_face_bank(5, "unused", tmp_path / "a", pipeline=fake, max_tries=4)
    assert len(fake.calls) == 4 and len(table) == 2          # attempts 1 and 3 hold faces
    fake = FakeSource(astronaut)
    table = generate_face_bank(2, "unused", tmp_path / "b", pipeline=fake)
    assert len(fake.calls) == 4 and len(table) == 2          # stops as soon as n are kept
    fake = FakeSource(astronaut)
    table = generate_face_bank(3, "unused", tmp_path / "c", pipeline=lambda p, g: fake.__call__(
        p.replace("type II)", "type I)").replace("type IV)", "type I)").replace("type VI)", "type I)"), g))
    assert len(fake.calls) == 12 and len(table) == 0         # no face at all: default max_tries = 4n


def test_errors(tmp_path):
    with pytest.raises(SynthtrialError, match="n must be at least 1"):
        generate_face_bank(0, "unused", tmp_path, pipeline=lambda p, g: None)
    with pytest.raises(SynthtrialError, match="no such folder.*nothing is downloaded"):
        generate_face_bank(1, str(tmp_path / "missing_model"), tmp_path / "out")


def test_real_tiny_pipeline_plumbing(tmp_path, tiny_sdxl):
    out = tmp_path / "bank"
    table = generate_face_bank(1, str(tiny_sdxl), out, size=64, steps=2, max_tries=2)
    assert len(table) == 0 and list(table.columns) == list(COLUMNS)
    assert [p.name for p in out.iterdir()] == ["faces.csv"]
    on_disk = pd.read_csv(out / "faces.csv")
    assert list(on_disk.columns) == list(COLUMNS) and len(on_disk) == 0
