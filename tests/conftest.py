"""Shared fixtures: faces are built once per session (MediaPipe runs once per portrait)."""

import numpy as np
import pytest


@pytest.fixture(scope="session")
def bases():
    from synthtrial.face.faces import load_base_faces

    return load_base_faces(None)


@pytest.fixture(scope="session")
def face256(bases):
    from synthtrial.face.faces import identity_for, make_face

    return make_face(bases[0], identity_for(0, bases, seed=0), 256)


@pytest.fixture()
def gray_image_dir(tmp_path):
    """A folder holding one image without a face."""
    from PIL import Image

    folder = tmp_path / "nofaces"
    folder.mkdir()
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(folder / "wall.png")
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny random SDXL saved like a hub model (see tests/tiny_sdxl.py)."""
    from tiny_sdxl import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for modules that drive tiny torch models: they gain nothing from more, and a busy
    2-core machine loses a lot when threads contend. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def quick_run_256(tmp_path_factory):
    """protocols/quick.csv (3 patients x 16 days) rendered once at 256 px, for the tests that read a run."""
    from pathlib import Path

    from synthtrial.run.generation import generate

    root = Path(__file__).resolve().parents[1]
    return generate(root / "protocols" / "quick.csv", tmp_path_factory.mktemp("runs") / "quick256", size=256,
                    progress=False)


@pytest.fixture()
def toy_detection_data():
    """Three 96 px grey images with four 6 px red papules each: a detector learns them in a few steps."""
    from synthtrial.graders.detector import CLASSES
    from synthtrial.graders.detector_train import DetectionData

    rng = np.random.default_rng(0)
    images, boxes, labels = [], [], []
    for _ in range(3):
        image = np.full((96, 96, 3), 180, np.uint8)
        b = []
        for _ in range(4):
            x, y = rng.integers(4, 84, 2)
            image[y:y + 6, x:x + 6] = (200, 40, 40)
            b.append([x, y, x + 6, y + 6])
        images.append(image), boxes.append(np.array(b, np.float32)), labels.append(np.full(4, 2, np.int64))
    return DetectionData(images, boxes, labels, CLASSES, ["a", "b", "c"], np.full(3, 4.0))


def render_small_run(tmp_path_factory, name, prefix, face, severities, *, size, seed):
    """A run of one portrait: patient ``<prefix>1`` on days 1, 2, then ``<prefix>2`` ..., one visit per severity."""
    import pandas as pd

    from synthtrial.run.generation import generate

    folder = tmp_path_factory.mktemp(name)
    n = len(severities)
    pd.DataFrame({"patient_id": [f"{prefix}{i // 2 + 1}" for i in range(n)], "day": [i % 2 + 1 for i in range(n)],
                  "treatment": ["Control"] * n, "severity": list(severities),
                  "face": [face] * n}).to_csv(folder / "p.csv", index=False)
    return generate(folder / "p.csv", folder / "run", size=size, seed=seed, progress=False)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` need a GPU: skipped where ``torch.cuda.is_available()`` is False."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in marked:
        item.add_marker(skip)
