"""Persistent lesions: a birth-death process anchored in face-mesh coordinates.

Each lesion is an object with an id, an anchor on the face (a mesh triangle and barycentric weights), a
size and a life course, a sequence of stages such as closed comedo -> papule -> pustule -> mark. Every
day the process keeps the number of active lesions at ``round(expected_lesion_count(severity))``:
lesions whose course ends resolve; if too many remain, the longest-standing ones are made to resolve
early (that is how treatment shows); if too few, new ones are born, with types chosen so that the standing
mix follows :func:`synthtrial.trial.scale.lesion_mix` at that severity. Inflamed lesions leave a fading mark
when they resolve, and sometimes an atrophic scar that stays.

Sizes are physical: each stage of a lesion gets a diameter in millimetres drawn from its type's range in
:data:`DIAMETER_MM` (one table, with its sources below); a face's millimetres per pixel come from its
inter-pupillary distance (:data:`synthtrial.face.faces.ADULT_IPD_MM`). New lesions cluster: with probability
:data:`CLUSTER_CHANCE` a new lesion is placed a few diameters from one already standing (acne erupts in
crops within a pilosebaceous field), otherwise anywhere on the skin, weighted by region.

Lesion size ranges (diameter at full development), adopted from the clinical descriptions in:

* Zaenglein AL et al. Guidelines of care for the management of acne vulgaris. J Am Acad Dermatol
  2016;74:945-973 (lesion definitions: comedones, papules, pustules, nodules);
* Bolognia JL, Schaffer JV, Cerroni L (eds). Dermatology, 4th ed., Elsevier 2018, chapter "Acne
  vulgaris" (closed comedones as 1-3 mm skin-coloured papules; open comedones as dilated follicular
  openings with a dark keratin plug);
* the lesion-counting convention of acne trials (Lehmann HP et al. Acne therapy: a methodologic review.
  J Am Acad Dermatol 2002;47:231-240; Tan JKL, Bhate K. A global perspective on the epidemiology of
  acne. Br J Dermatol 2015;172 Suppl 1:3-12): papules and pustules under 5 mm, nodules 5 mm or more;
* Jacob CI, Dover JS, Kaminer MS. Acne scarring: a classification system and review of treatment
  options. J Am Acad Dermatol 2001;45:109-117 (ice-pick scars < 2 mm, boxcar scars 1.5-4 mm).

Open comedones start at 1 mm rather than the clinical 0.5 mm: smaller ones are below the resolution of a
512-pixel face photograph (about 0.4 mm per pixel) and would not be drawn at all.

The process is seeded per patient and knows nothing about images: :class:`LesionCourse` gives, for any
day, the lesions present with their current type, stage and size, in face-mesh coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from synthtrial.trial import scale
from synthtrial.util.seeding import derived_rng

ACTIVE_TYPES = scale.LESION_TYPES                      # counted as lesions
RESIDUAL_TYPES = scale.RESIDUAL_TYPES                  # what resolution leaves behind; not counted
ALL_TYPES = scale.ALL_LESION_TYPES

#: Diameter range (mm) of each type at full development; sources in the module docstring. A mark (post-
#: inflammatory erythema or hyperpigmentation) is :data:`MARK_SPREAD` times the lesion that left it.
DIAMETER_MM = {
    "open_comedo": (1.0, 2.0), "closed_comedo": (1.0, 3.0), "papule": (2.0, 5.0), "pustule": (2.0, 5.0),
    "nodule": (5.0, 10.0), "scar": (1.0, 4.0),
}
MARK_SPREAD = 1.15
#: The diameter range of every type, marks included (for checks and documentation).
DIAMETER_RANGE_MM = {**DIAMETER_MM, "mark": (MARK_SPREAD * DIAMETER_MM["papule"][0],
                                             MARK_SPREAD * DIAMETER_MM["nodule"][1])}
#: Chance that a new lesion is placed next to a standing one, and how far from it (in sums of the two
#: radii, centre to centre).
CLUSTER_CHANCE = 0.6
CLUSTER_DISTANCE = (1.7, 2.6)
#: Duration ranges (days) of each active stage.
STAGE_DAYS = {
    "open_comedo": (14, 42), "closed_comedo": (10, 30), "papule": (4, 10), "pustule": (3, 7),
    "nodule": (14, 35),
}
#: Chance that a stage progresses to the next instead of resolving.
PROGRESSION = {"closed_comedo": ("papule", 0.25), "papule": ("pustule", 0.4)}
#: Days a post-inflammatory mark lasts, and the chance an inflamed lesion leaves an atrophic scar.
MARK_DAYS = {"papule": (5, 14), "pustule": (7, 18), "nodule": (14, 35)}
SCAR_CHANCE = {"papule": 0.015, "pustule": 0.03, "nodule": 0.2}
#: Days of growth at the start and of fading at the end of an active stage.
RAMP_DAYS = 2
#: Days the process runs before the first day, at the first day's severity, so the trial opens on lesions
#: of every age rather than on a face where all appear at once.
BURN_IN_DAYS = 60
#: Lesions keep at least this many of their radii apart (centre to centre: sum of radii times this).
MIN_SEPARATION = 1.6


@dataclass
class Stage:
    type: str
    start: int          # first day of the stage
    end: int            # first day after the stage (exclusive); a scar lasts for ever (a large number)
    diameter_mm: float = 0.0   # diameter at full development


@dataclass
class Lesion:
    lesion_id: int
    triangle: int
    bary: np.ndarray
    size: float         # largest radius of its course, interocular distances (for spacing)
    seed: int
    born: int
    stages: list[Stage] = field(default_factory=list)

    def stage_on(self, day: int) -> Stage | None:
        for stage in self.stages:
            if stage.start <= day < stage.end:
                return stage
        return None

    def active_on(self, day: int) -> bool:
        stage = self.stage_on(day)
        return stage is not None and stage.type in ACTIVE_TYPES

    @property
    def end(self) -> int:
        return self.stages[-1].end


@dataclass(frozen=True)
class LesionState:
    """One lesion on one day, as the renderer and the tables need it."""

    lesion_id: int
    type: str
    stage: str            # onset | active | resolving | residual
    age_days: int
    triangle: int
    bary: np.ndarray
    radius: float         # interocular distances, on this day (as drawn: growing lesions are smaller)
    intensity: float      # 0-1: growth, fading
    seed: int
    diameter_mm: float = 0.0   # the stage's diameter at full development, millimetres


def radius_iod(diameter_mm: float) -> float:
    """A diameter in millimetres as a radius in interocular distances (the unit of face-mesh sizes)."""
    from synthtrial.face.faces import ADULT_IPD_MM

    return 0.5 * diameter_mm / ADULT_IPD_MM


def drawn_radius(stage_type: str, diameter_mm: float, intensity: float) -> float:
    """Radius (interocular distances) a lesion of this type and diameter is drawn at, at this intensity:
    growing and fading lesions are smaller; pustules and nodules stay near full size while they last."""
    r = radius_iod(diameter_mm)
    if stage_type in ACTIVE_TYPES:
        radius = r * (0.55 + 0.45 * intensity)
        return max(radius, 0.8 * r) if stage_type in ("nodule", "pustule") else radius
    return r


class PlacementSampler:
    """Draws lesion positions on a face's skin, weighted by region, as face-mesh anchors.

    ``face`` is a :class:`synthtrial.face.faces.Face`; positions avoid existing lesions.
    """

    def __init__(self, face, region_weights: dict[str, float] | None = None) -> None:
        from synthtrial.face.faces import REGION_WEIGHTS, REGIONS

        weights = region_weights or REGION_WEIGHTS
        region_map = face.region_map
        tri_map = face.triangle_map
        usable = (region_map >= 0) & (tri_map >= 0)
        ys, xs = np.nonzero(usable)
        if len(xs) == 0:
            raise ValueError("the face has no skin to place lesions on")
        w = np.array([weights.get(name, 0.0) for name in REGIONS])[region_map[ys, xs]]
        self._xs, self._ys = xs, ys
        self._usable = usable
        self._cdf = np.cumsum(w / w.sum())
        self._face = face

    def _near(self, rng: np.random.Generator, radius_px: float, occ: np.ndarray,
              neighbours: np.ndarray, tries: int = 12) -> np.ndarray | None:
        """A free skin point a few diameters from one of ``neighbours`` (x, y, r), or None."""
        usable = self._usable
        h, w = usable.shape
        k = int(rng.integers(len(neighbours)))
        nx, ny, nr = neighbours[k]
        for _ in range(tries):
            dist = rng.uniform(*CLUSTER_DISTANCE) * (nr + radius_px)
            ang = rng.uniform(0, 2 * np.pi)
            p = np.array([nx + dist * np.cos(ang), ny + dist * np.sin(ang)])
            xi, yi = int(np.round(p[0])), int(np.round(p[1]))
            if not (0 <= xi < w and 0 <= yi < h) or not usable[yi, xi]:
                continue
            gap = np.min(np.hypot(occ[:, 0] - p[0], occ[:, 1] - p[1]) - MIN_SEPARATION * (occ[:, 2] + radius_px))
            if gap >= 0:
                return p
        return None

    def draw(self, rng: np.random.Generator, radius_px: float,
             occupied: Sequence[tuple[float, float, float]], tries: int = 40,
             neighbours: Sequence[tuple[float, float, float]] = ()) -> tuple[int, np.ndarray]:
        """An anchor (triangle, barycentric) at least MIN_SEPARATION radii from every occupied (x, y, r).

        With probability :data:`CLUSTER_CHANCE` (and standing ``neighbours``) it is first sought a few
        diameters from one of them; otherwise, or when no free spot is found there, anywhere on the skin.
        """
        occ = np.array(occupied, dtype=np.float64).reshape(-1, 3)
        nb = np.array(neighbours, dtype=np.float64).reshape(-1, 3)
        if len(nb) and len(occ) and rng.random() < CLUSTER_CHANCE:
            p = self._near(rng, radius_px, occ, nb)
            if p is not None:
                tri, bary = self._face.to_anchors(p[None, :])
                return int(tri[0]), bary[0]
        best, best_gap = None, -np.inf
        for _ in range(tries):
            i = int(np.searchsorted(self._cdf, rng.random(), side="right"))
            i = min(i, len(self._xs) - 1)
            p = np.array([self._xs[i] + rng.random() - 0.5, self._ys[i] + rng.random() - 0.5])
            if len(occ) == 0:
                best = p
                break
            gap = float(np.min(np.hypot(occ[:, 0] - p[0], occ[:, 1] - p[1]) - MIN_SEPARATION * (occ[:, 2] + radius_px)))
            if gap >= 0:
                best = p
                break
            if gap > best_gap:
                best, best_gap = p, gap
        tri, bary = self._face.to_anchors(best[None, :])
        return int(tri[0]), bary[0]


class LesionCourse:
    """The lesions of one patient over the days of the trial.

    ``days`` and ``severity`` give the latent severity on the days the protocol has; the process runs
    over every day from the first to the last (severity interpolated across gaps), so a lesion's life does
    not depend on which days were photographed, after a burn-in of :data:`BURN_IN_DAYS` days at the first
    day's severity (or at ``burn_in_severity``: :func:`counterfactual_course`).
    """

    def __init__(self, face, days: Sequence[int], severity: Sequence[float], *, seed: int,
                 patient_id: str, burn_in_severity: float | None = None) -> None:
        days_arr = np.asarray(days, dtype=np.int64)
        sev_arr = np.asarray(severity, dtype=np.float64)
        if days_arr.ndim != 1 or len(days_arr) == 0 or len(days_arr) != len(sev_arr):
            raise ValueError("days and severity must be equal-length, non-empty sequences")
        order = np.argsort(days_arr, kind="stable")
        days_arr, sev_arr = days_arr[order], sev_arr[order]
        self.first_day, self.last_day = int(days_arr[0]), int(days_arr[-1])
        self.start_day = self.first_day - BURN_IN_DAYS
        grid = np.arange(self.start_day, self.last_day + 1)
        self.severity = np.interp(grid, days_arr, sev_arr)  # held at the first value through the burn-in
        if burn_in_severity is not None:  # a counterfactual world keeps the factual one's history
            self.severity[grid < self.first_day] = burn_in_severity
        self.seed, self.patient_id = seed, patient_id
        self.targets = np.rint(scale.expected_lesion_count(self.severity)).astype(int)
        self.face = face
        self.lesions: list[Lesion] = []
        self._run(derived_rng(seed, "lesions", patient_id), derived_rng(seed, "placement", patient_id))

    # -------------------------------------------------------------------------------- simulation

    def _run(self, rng: np.random.Generator, place_rng: np.random.Generator) -> None:
        sampler = PlacementSampler(self.face)
        scale_px = self.face.scale
        next_id = 0
        alive: list[Lesion] = []
        for k, day in enumerate(range(self.start_day, self.last_day + 1)):
            alive = [les for les in alive if les.end > day]
            active = [les for les in alive if les.active_on(day)]
            excess = len(active) - int(self.targets[k])
            if excess > 0:
                # the longest-standing lesions resolve first (ties broken at random)
                ages = np.array([day - les.stage_on(day).start + rng.random() for les in active])
                for idx in np.argsort(-ages, kind="stable")[:excess]:
                    self._resolve(active[idx], day, rng)
            elif excess < 0:
                mix = scale.lesion_mix(self.severity[k])
                counts = {t: 0 for t in ACTIVE_TYPES}
                for les in active:
                    counts[les.stage_on(day).type] += 1
                occupied = [(*self.face.to_pixels([les.triangle], les.bary[None])[0], les.size * scale_px)
                            for les in alive]
                standing = [occ for occ, les in zip(occupied, alive) if les.active_on(day)]
                target = int(self.targets[k])
                for _ in range(-excess):
                    deficit = np.array([max(target * mix[t] - counts[t], 0.0) + 1e-3 * mix[t] for t in ACTIVE_TYPES])
                    if deficit.sum() <= 0:
                        deficit = np.array([mix[t] for t in ACTIVE_TYPES]) + 1e-9
                    kind = ACTIVE_TYPES[int(rng.choice(len(ACTIVE_TYPES), p=deficit / deficit.sum()))]
                    stages = self._course(kind, day, rng)
                    size = max(radius_iod(st.diameter_mm) for st in stages)
                    tri, bary = sampler.draw(place_rng, size * scale_px, occupied, neighbours=standing)
                    lesion = Lesion(lesion_id=next_id, triangle=tri, bary=bary, size=size,
                                    seed=int(rng.integers(0, 2**31 - 1)), born=day, stages=stages)
                    next_id += 1
                    alive.append(lesion)
                    self.lesions.append(lesion)
                    counts[kind] += 1
                    occupied.append((*self.face.to_pixels([tri], bary[None])[0], size * scale_px))
                    standing.append(occupied[-1])

    @staticmethod
    def _course(kind: str, day: int, rng: np.random.Generator) -> list[Stage]:
        stages: list[Stage] = []
        start = day
        diameter = float(rng.uniform(*DIAMETER_MM[kind]))
        while True:
            lo, hi = STAGE_DAYS[kind]
            end = start + int(rng.integers(lo, hi + 1))
            stages.append(Stage(kind, start, end, diameter))
            nxt = PROGRESSION.get(kind)
            if nxt is None or rng.random() >= nxt[1]:
                break
            # an inflamed follicle grows from the comedo it was; a papule turning pustular keeps its size
            growth = rng.uniform(1.2, 1.8) if kind.endswith("comedo") else rng.uniform(0.9, 1.1)
            kind, start = nxt[0], end
            diameter = float(np.clip(diameter * growth, *DIAMETER_MM[kind]))
        LesionCourse._add_residue(stages, rng)
        return stages

    @staticmethod
    def _add_residue(stages: list[Stage], rng: np.random.Generator) -> None:
        last = stages[-1]
        if last.type in MARK_DAYS:
            lo, hi = MARK_DAYS[last.type]
            mark_end = last.end + int(rng.integers(lo, hi + 1))
            stages.append(Stage("mark", last.end, mark_end, MARK_SPREAD * last.diameter_mm))
            if rng.random() < SCAR_CHANCE[last.type]:
                scar = float(np.clip(0.6 * last.diameter_mm, *DIAMETER_MM["scar"]))
                stages.append(Stage("scar", mark_end - (mark_end - last.end) // 2, 10**9, scar))
                stages[-2].end = stages[-1].start

    def _resolve(self, lesion: Lesion, day: int, rng: np.random.Generator) -> None:
        """End the lesion's active life on ``day`` (it is no longer active that day)."""
        kept = [s for s in lesion.stages if s.start < day and s.type in ACTIVE_TYPES]
        if kept:
            kept[-1].end = day
        lesion.stages = kept
        if not kept:  # born today: it never shows
            lesion.stages = [Stage(lesion.stages[0].type, day, day, lesion.stages[0].diameter_mm)]
            return
        self._add_residue(lesion.stages, rng)

    # ------------------------------------------------------------------------------------ queries

    def on(self, day: int) -> list[LesionState]:
        """The lesions present on ``day`` (active ones first, then residues; by id)."""
        states = []
        for les in self.lesions:
            stage = les.stage_on(day)
            if stage is None:
                continue
            age = day - les.born
            if stage.type in ACTIVE_TYPES:
                into, left = day - stage.start, stage.end - day
                first_stage = stage is les.stages[0]
                next_active = any(s.start == stage.end and s.type in ACTIVE_TYPES for s in les.stages)
                grow = min(1.0, (into + 1) / (RAMP_DAYS + 1)) if first_stage else 1.0
                fade = 1.0 if next_active else min(1.0, left / (RAMP_DAYS + 1))
                intensity = min(grow, fade)
                phase = "onset" if grow < 1 else "resolving" if fade < 1 else "active"
            elif stage.type == "mark":
                span = max(1, stage.end - stage.start)
                intensity = max(0.15, 1.0 - (day - stage.start) / span)
                phase = "residual"
            else:  # scar
                intensity, phase = 1.0, "residual"
            radius = drawn_radius(stage.type, stage.diameter_mm, intensity)
            states.append(LesionState(lesion_id=les.lesion_id, type=stage.type, stage=phase, age_days=age,
                                      triangle=les.triangle, bary=les.bary, radius=radius,
                                      intensity=float(intensity), seed=les.seed,
                                      diameter_mm=float(stage.diameter_mm)))
        states.sort(key=lambda s: (s.type in RESIDUAL_TYPES, s.lesion_id))
        return states

    def counts(self, day: int) -> dict[str, int]:
        """Number of lesions of each type present on ``day`` (marks and scars included)."""
        out = {t: 0 for t in ALL_TYPES}
        for state in self.on(day):
            out[state.type] += 1
        return out

    def target(self, day: int) -> int:
        return int(self.targets[day - self.start_day])


def counterfactual_course(factual: LesionCourse, days: Sequence[int], severity: Sequence[float]) -> LesionCourse:
    """The patient's lesions in a counterfactual world with ``severity`` on ``days`` (the same face and seed).

    The process runs from the same random streams as ``factual`` with the factual burn-in (the history before
    the first day no assignment changes), so it makes the same draws, and the same lesions, until the first
    day the two worlds' targets differ; from then on the shared lesions keep the courses they were born with
    (one world may end a lesion early) and new births draw differently. A lesion is the factual one (same
    ``lesion_id``) when it was born the same day at the same anchor with the same seed; every later birth
    is the counterfactual world's own and is numbered after the factual run's last lesion, so one id never
    names two different lesions of a factual-counterfactual pair.
    """
    cf = LesionCourse(factual.face, days, severity, seed=factual.seed, patient_id=factual.patient_id,
                      burn_in_severity=float(factual.severity[0]))
    if cf.start_day != factual.start_day:
        raise ValueError("a counterfactual course must cover the factual course's days")
    next_id = len(factual.lesions)
    shared = True
    for k, lesion in enumerate(cf.lesions):  # both in birth order, ids 0, 1, ...
        twin = factual.lesions[k] if k < len(factual.lesions) else None
        shared = shared and twin is not None and (twin.born, twin.triangle, twin.seed) == (
            lesion.born, lesion.triangle, lesion.seed) and np.array_equal(twin.bary, lesion.bary)
        if not shared:
            lesion.lesion_id, next_id = next_id, next_id + 1
    return cf
