"""Persistent lesions: a birth-death process anchored in face-mesh coordinates.

Each lesion is an object with an id, an anchor on the face (a mesh triangle and barycentric weights), a
size and a life course, a sequence of stages such as closed comedo -> papule -> pustule -> mark. Every
day the process keeps the number of active lesions at ``round(expected_lesion_count(severity))``:
lesions whose course ends resolve; if too many remain, the longest-standing ones are made to resolve
early (that is how treatment shows); if too few, new ones are born, with types chosen so that the standing
mix follows :func:`synthtrial.scale.lesion_mix` at that severity. Inflamed lesions leave a fading mark
when they resolve, and sometimes an atrophic scar that stays.

The process is seeded per patient and knows nothing about images: :class:`LesionCourse` gives, for any
day, the lesions present with their current type, stage and size, in face-mesh coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from synthtrial import scale
from synthtrial.seeding import derived_rng

ACTIVE_TYPES = scale.LESION_TYPES                      # counted as lesions
RESIDUAL_TYPES = scale.RESIDUAL_TYPES                  # what resolution leaves behind; not counted
ALL_TYPES = scale.ALL_LESION_TYPES

#: Peak radius range of each type, in interocular distances (about 150 px on a 512 px face crop).
SIZE_RANGE = {
    "open_comedo": (0.010, 0.018), "closed_comedo": (0.011, 0.020), "papule": (0.020, 0.036),
    "pustule": (0.020, 0.034), "nodule": (0.045, 0.075), "scar": (0.012, 0.024),
}
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


@dataclass
class Lesion:
    lesion_id: int
    triangle: int
    bary: np.ndarray
    size: float         # peak radius, interocular distances
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
    radius: float         # interocular distances, on this day
    intensity: float      # 0-1: growth, fading
    seed: int


class PlacementSampler:
    """Draws lesion positions on a face's skin, weighted by region, as face-mesh anchors.

    ``face`` is a :class:`synthtrial.faces.Face`; positions avoid existing lesions.
    """

    def __init__(self, face, region_weights: dict[str, float] | None = None) -> None:
        from synthtrial.faces import REGION_WEIGHTS, REGIONS

        weights = region_weights or REGION_WEIGHTS
        region_map = face.region_map
        tri_map = face.triangle_map
        usable = (region_map >= 0) & (tri_map >= 0)
        ys, xs = np.nonzero(usable)
        if len(xs) == 0:
            raise ValueError("the face has no skin to place lesions on")
        w = np.array([weights.get(name, 0.0) for name in REGIONS])[region_map[ys, xs]]
        self._xs, self._ys = xs, ys
        self._cdf = np.cumsum(w / w.sum())
        self._face = face

    def draw(self, rng: np.random.Generator, radius_px: float,
             occupied: Sequence[tuple[float, float, float]], tries: int = 40) -> tuple[int, np.ndarray]:
        """An anchor (triangle, barycentric) at least MIN_SEPARATION radii from every occupied (x, y, r)."""
        occ = np.array(occupied, dtype=np.float64).reshape(-1, 3)
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
    not depend on which days were photographed, after a burn-in of :data:`BURN_IN_DAYS` days.
    """

    def __init__(self, face, days: Sequence[int], severity: Sequence[float], *, seed: int,
                 patient_id: str) -> None:
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
                target = int(self.targets[k])
                for _ in range(-excess):
                    deficit = np.array([max(target * mix[t] - counts[t], 0.0) + 1e-3 * mix[t] for t in ACTIVE_TYPES])
                    if deficit.sum() <= 0:
                        deficit = np.array([mix[t] for t in ACTIVE_TYPES]) + 1e-9
                    kind = ACTIVE_TYPES[int(rng.choice(len(ACTIVE_TYPES), p=deficit / deficit.sum()))]
                    size = float(rng.uniform(*SIZE_RANGE[kind]))
                    tri, bary = sampler.draw(place_rng, size * scale_px, occupied)
                    lesion = Lesion(lesion_id=next_id, triangle=tri, bary=bary, size=size,
                                    seed=int(rng.integers(0, 2**31 - 1)), born=day,
                                    stages=self._course(kind, day, rng))
                    next_id += 1
                    alive.append(lesion)
                    self.lesions.append(lesion)
                    counts[kind] += 1
                    occupied.append((*self.face.to_pixels([tri], bary[None])[0], size * scale_px))

    @staticmethod
    def _course(kind: str, day: int, rng: np.random.Generator) -> list[Stage]:
        stages: list[Stage] = []
        start = day
        while True:
            lo, hi = STAGE_DAYS[kind]
            end = start + int(rng.integers(lo, hi + 1))
            stages.append(Stage(kind, start, end))
            nxt = PROGRESSION.get(kind)
            if nxt is None or rng.random() >= nxt[1]:
                break
            kind, start = nxt[0], end
        LesionCourse._add_residue(stages, rng)
        return stages

    @staticmethod
    def _add_residue(stages: list[Stage], rng: np.random.Generator) -> None:
        last = stages[-1]
        if last.type in MARK_DAYS:
            lo, hi = MARK_DAYS[last.type]
            mark_end = last.end + int(rng.integers(lo, hi + 1))
            stages.append(Stage("mark", last.end, mark_end))
            if rng.random() < SCAR_CHANCE[last.type]:
                stages.append(Stage("scar", mark_end - (mark_end - last.end) // 2, 10**9))
                stages[-2].end = stages[-1].start

    def _resolve(self, lesion: Lesion, day: int, rng: np.random.Generator) -> None:
        """End the lesion's active life on ``day`` (it is no longer active that day)."""
        kept = [s for s in lesion.stages if s.start < day and s.type in ACTIVE_TYPES]
        if kept:
            kept[-1].end = day
        lesion.stages = kept
        if not kept:  # born today: it never shows
            lesion.stages = [Stage(lesion.stages[0].type, day, day)]
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
                radius = les.size * (0.55 + 0.45 * intensity)
                if stage.type == "nodule" or stage.type == "pustule":
                    radius = max(radius, les.size * 0.8)
            elif stage.type == "mark":
                span = max(1, stage.end - stage.start)
                intensity = max(0.15, 1.0 - (day - stage.start) / span)
                phase, radius = "residual", les.size * 1.15
            else:  # scar
                intensity, phase = 1.0, "residual"
                radius = max(SIZE_RANGE["scar"][0], min(les.size * 0.7, SIZE_RANGE["scar"][1]))
            states.append(LesionState(lesion_id=les.lesion_id, type=stage.type, stage=phase, age_days=age,
                                      triangle=les.triangle, bary=les.bary, radius=radius,
                                      intensity=float(intensity), seed=les.seed))
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
