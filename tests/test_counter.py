"""The classical lesion counter: counts follow the drawn lesions; no face, no count; settings are checked."""

import numpy as np
import pandas as pd
import pytest

from synthtrial.graders.base import GraderError, read_rgb
from synthtrial.graders.counter import CounterConfig, LesionCounter
from synthtrial.trial import scale


@pytest.fixture(scope="module")
def counted(quick_run_256):
    manifest = pd.read_parquet(quick_run_256 / "manifest.parquet")
    images = [read_rgb(quick_run_256 / rel) for rel in manifest["image"]]
    return manifest, LesionCounter().predict(images, manifest)


def test_counts_follow_the_lesions_drawn(counted):
    manifest, grades = counted
    assert list(grades.columns) == ["count", "red_count", "dark_count", "level", "severity", "face_found"]
    assert (grades["face_found"] == 1).all()
    truth = manifest["lesion_count"].to_numpy()
    assert np.corrcoef(grades["count"], truth)[0, 1] > 0.5
    assert np.abs(grades["count"] - truth).mean() < 10
    assert (grades["red_count"] + grades["dark_count"] == grades["count"]).all()
    assert (grades["level"] == scale.acne04_level_from_count(grades["count"].to_numpy())).all()


def test_more_lesions_more_counted(bases):
    """About thirty papules and pustules of a run's size at 512 px (radius 3 px), drawn well apart."""
    from synthtrial.face.faces import identity_for, make_face

    face512 = make_face(bases[0], identity_for(0, bases, seed=0), 512)
    from synthtrial.render.base import LesionSpec
    from synthtrial.render.procedural import ProceduralRenderer

    rng = np.random.default_rng(0)
    ys, xs = np.nonzero(face512.skin)
    picks = rng.choice(len(xs), 400, replace=False)
    specs, taken = [], []
    for k in picks:  # papules and pustules well apart on the skin
        x, y = xs[k] + 0.5, ys[k] + 0.5
        if all((x - a) ** 2 + (y - b) ** 2 > 40 ** 2 for a, b in taken):
            taken.append((x, y))
            specs.append(LesionSpec(lesion_id=len(specs), type=("papule", "pustule")[len(specs) % 2], cx=x, cy=y,
                                    radius_px=3.0, seed=len(specs)))
    image = ProceduralRenderer()(face512.image, specs, skin_mask=face512.skin).image
    counter = LesionCounter()
    clean, spotted = counter.predict([face512.image, image])["count"]
    assert len(specs) >= 15
    # a baseline, not a detector: colour blobs on a clean face count too, and some lesions are missed
    assert clean < len(specs) and spotted - clean >= 0.25 * len(specs)


def test_no_face_no_count():
    out = LesionCounter().predict([np.full((200, 200, 3), 128, np.uint8)])
    assert out["face_found"].iloc[0] == 0 and np.isnan(out["count"].iloc[0])


def test_bad_input_and_settings(tmp_path):
    with pytest.raises(GraderError, match="uint8 RGB"):
        LesionCounter().predict([np.zeros((10, 10), np.float32)])
    with pytest.raises(GraderError, match="red_threshold must be a positive number"):
        CounterConfig(red_threshold=-1)
    counter = LesionCounter(CounterConfig(red_threshold=3.0))
    counter.save_pretrained(tmp_path)
    again = LesionCounter.from_pretrained(tmp_path)
    assert again.config == counter.config and again.fingerprint() == counter.fingerprint()
    assert again.fingerprint() != LesionCounter().fingerprint()



def test_counter_measures_faces_with_the_mesh_corners(quick_run_256):
    """The counter's length unit is synthtrial.face.mesh.interocular(eyes="corners") (its thresholds were chosen
    with it): the peaks it reports are those found at that scale."""
    from PIL import Image

    from synthtrial.face.faces import LandmarkDetector, skin_regions
    from synthtrial.face.mesh import interocular
    from synthtrial.graders.counter import LesionCounter
    from synthtrial.run.rundir import read_run

    manifest, _ = read_run(quick_run_256)
    row = manifest.sort_values("lesion_count").iloc[-1]
    image = np.asarray(Image.open(quick_run_256 / row["image"]).convert("RGB"))
    found = LesionCounter().count(image)["peaks"]
    lm = LandmarkDetector()(image)
    skin, _ = skin_regions(image, lm)
    assert len(found) > 5
    assert np.array_equal(found, LesionCounter().peaks(image, skin, interocular(lm, eyes="corners"))[0])
