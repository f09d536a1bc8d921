"""Lesion model: counts follow severity, lesions persist in place, types follow the mix, all seeded."""

import numpy as np
import pytest

from synthtrial.trial import scale
from synthtrial.lesions.course import ACTIVE_TYPES, LesionCourse


def severity_wave(days):
    return 1.5 + 1.2 * np.sin(np.asarray(days) / 9.0)


@pytest.fixture(scope="module")
def course(face256):
    days = np.arange(1, 61)
    return LesionCourse(face256, days, severity_wave(days), seed=3, patient_id="P01")


def active_count(course, day):
    counts = course.counts(day)
    return sum(counts[t] for t in ACTIVE_TYPES)


def test_active_count_equals_target_every_day(course):
    for day in range(1, 61):
        expected = int(np.rint(scale.expected_lesion_count(severity_wave(day))))
        assert course.target(day) == expected
        assert active_count(course, day) == expected


def test_lesions_keep_id_and_position(course, face256):
    seen: dict[int, tuple] = {}
    moved = 0
    for day in range(1, 61):
        for s in course.on(day):
            pos = tuple(np.round(face256.to_pixels([s.triangle], s.bary[None])[0], 9))
            if s.lesion_id in seen and seen[s.lesion_id] != pos:
                moved += 1
            seen.setdefault(s.lesion_id, pos)
    assert moved == 0
    assert len(seen) > 40
    # a lesion present on two days is the same object: same id, same seed, same anchor
    day10 = {s.lesion_id: s for s in course.on(10)}
    day11 = {s.lesion_id: s for s in course.on(11)}
    shared = set(day10) & set(day11)
    assert len(shared) > 0.5 * len(day10)
    for i in shared:
        assert day10[i].seed == day11[i].seed and day10[i].triangle == day11[i].triangle


def test_lesions_lie_on_skin(course, face256):
    for day in (1, 30, 60):
        states = course.on(day)
        pts = face256.to_pixels([s.triangle for s in states], np.stack([s.bary for s in states]))
        x, y = np.round(pts).astype(int).T
        assert face256.skin[y, x].all()


def test_mix_shifts_with_severity(face256):
    days = np.arange(1, 121)
    mild = LesionCourse(face256, days, np.full(120, 0.9), seed=1, patient_id="a")
    severe = LesionCourse(face256, days, np.full(120, 2.8), seed=1, patient_id="a")

    def totals(c):
        out = {t: 0 for t in ACTIVE_TYPES}
        for d in days:
            for t, n in c.counts(int(d)).items():
                if t in out:
                    out[t] += n
        return out

    m, s = totals(mild), totals(severe)
    inflamed = lambda c: (c["papule"] + c["pustule"] + c["nodule"]) / sum(c.values())  # noqa: E731
    assert inflamed(s) > inflamed(m) + 0.15
    assert m["nodule"] == 0 and s["nodule"] > 0
    assert abs(inflamed(s) - float(scale.inflammatory_fraction(2.8))) < 0.15


def test_seeded_and_independent_of_photographed_days(face256):
    days = np.arange(1, 41)
    sev = np.linspace(2.5, 0.8, 40)  # linear, so interpolating a subset gives the same series
    full = LesionCourse(face256, days, sev, seed=5, patient_id="P07")
    again = LesionCourse(face256, days, sev, seed=5, patient_id="P07")
    sparse_days = days[::5]
    sparse = LesionCourse(face256, np.append(sparse_days, 40), np.append(sev[::5], sev[-1]), seed=5,
                          patient_id="P07")
    other = LesionCourse(face256, days, sev, seed=6, patient_id="P07")
    key = lambda c, d: [(s.lesion_id, s.type, s.triangle, round(s.radius, 12)) for s in c.on(d)]  # noqa: E731
    for d in sparse_days:
        assert key(full, int(d)) == key(again, int(d)) == key(sparse, int(d))
    assert any(key(full, int(d)) != key(other, int(d)) for d in sparse_days)


def test_improvement_resolves_lesions_into_marks(face256):
    days = np.arange(1, 31)
    sev = np.where(days <= 10, 2.5, 0.5)
    course = LesionCourse(face256, days, sev, seed=2, patient_id="x")
    before, after = course.counts(10), course.counts(11)
    assert active_count(course, 11) == course.target(11) < active_count(course, 10)
    assert after["mark"] > before["mark"]
    stages = {s.stage for d in days for s in course.on(int(d))}
    assert {"onset", "active", "resolving", "residual"} <= stages


def test_diameters_stay_in_their_stated_ranges(course):
    from synthtrial.lesions.course import DIAMETER_RANGE_MM, drawn_radius, radius_iod

    seen = set()
    for day in range(1, 61):
        for s in course.on(day):
            lo, hi = DIAMETER_RANGE_MM[s.type]
            assert lo - 1e-9 <= s.diameter_mm <= hi + 1e-9, (s.type, s.diameter_mm)
            assert s.radius == pytest.approx(drawn_radius(s.type, s.diameter_mm, s.intensity))
            assert s.radius <= radius_iod(s.diameter_mm) + 1e-12   # growing lesions are drawn smaller, never larger
            seen.add(s.type)
    assert {"open_comedo", "closed_comedo", "papule", "pustule", "mark"} <= seen
    # nodules are at least 5 mm, papules and pustules under it, comedones up to 3 mm
    assert DIAMETER_RANGE_MM["nodule"][0] >= 5.0 and DIAMETER_RANGE_MM["papule"][1] <= 5.0
    assert DIAMETER_RANGE_MM["closed_comedo"][1] <= 3.0


def test_new_lesions_cluster_near_standing_ones(face256):
    """With clustering, nearest-neighbour distances are shorter than for lesions placed independently."""
    import synthtrial.lesions.course as lesions_mod

    days = np.arange(1, 41)
    sev = np.full(40, 1.2)

    def mean_nn(course, day):
        states = [s for s in course.on(day) if s.type in ACTIVE_TYPES]
        pts = face256.to_pixels([s.triangle for s in states], np.stack([s.bary for s in states]))
        d = np.hypot(*(pts[:, None] - pts[None]).transpose(2, 0, 1))
        np.fill_diagonal(d, np.inf)
        return np.median(d.min(axis=1))

    clustered = np.mean([mean_nn(LesionCourse(face256, days, sev, seed=k, patient_id="c"), 40) for k in range(3)])
    saved = lesions_mod.CLUSTER_CHANCE
    try:
        lesions_mod.CLUSTER_CHANCE = 0.0
        spread = np.mean([mean_nn(LesionCourse(face256, days, sev, seed=k, patient_id="c"), 40) for k in range(3)])
    finally:
        lesions_mod.CLUSTER_CHANCE = saved
    assert clustered < 0.75 * spread
