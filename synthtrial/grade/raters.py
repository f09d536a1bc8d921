"""A simulated rater panel: people reading a trial's photographs, modelled on the lesion table they show.

synthtrial knows every lesion, so it can simulate the readers as well as the patients. Each rater reads an
image's lesions (``lesions.parquet``: type, diameter in millimetres, intensity, and the visibility flag where
the image was measured) through one perceptual model whose parameters (:class:`Panel`, a JSON file for
``synthtrial rate --panel``) a methodologist sets and which are kept as truth (``RUN/ratings.json``):

* **Detection** of an active lesion: ``ceiling[type] * d^h / (d^h + d50[type]^h) * intensity^fading``, a Hill
  curve in its diameter ``d`` (mm) with half-detection diameter ``d50`` (0: size does not matter) and
  steepness ``h`` (:data:`DEFAULTS`: small comedones are missed most), lowered for lesions still growing or
  already fading (``intensity`` < 1). With ``respect_visibility`` (off by default) a lesion the written image
  measured as not visible is never seen: the rater then reads the photograph as rendered, at its resolution,
  rather than the patient a clinical photograph would show; power replicates render nothing and have no flag.
* **Confusion**: a post-inflammatory mark is counted as an active lesion (a papule) with probability
  ``confusion["mark"]``, an atrophic scar (as a closed comedo) with ``confusion["scar"]``.
* **Personal bias and scale**: rater j reports ``scale_j * exp(drift_j * t / 100) * D + bias_j + e`` lesions,
  rounded and floored at 0, where ``D`` is what the rater detected, ``t`` the image's day on the trial's
  calendar (days since its first photograph) and ``e ~ N(0, read_sd^2 + (read_cv * D)^2)`` the read's own
  noise, drawn afresh each time an image is read: the test-retest noise. ``log scale_j ~ N(0, scale_sd)``,
  ``bias_j ~ N(0, bias_sd)``, ``drift_j ~ N(0, drift_sd)`` (per 100 days, on the log scale), unless the
  panel lists the rater's own values.
* **Per-type counts**: the reported count is split over the active types in proportion to the detected ones
  (plus one pseudo-lesion shared by the scale's type mix at that count, so a count with nothing detected is
  still split), by largest remainders: the types always sum to the count.
* **Grades**: IGA (:func:`synthtrial.trial.scale.iga_from_counts`, on the rater's inflammatory and nodule
  counts) and the Hayashi / ACNE04 level (:func:`synthtrial.trial.scale.acne04_level_from_count`), each read
  with the rater's threshold shift: the counts are multiplied by ``exp(-shift_j)`` before the scale's cut-offs
  (a positive shift is a lenient grader), ``shift_j ~ N(0, threshold_shift_sd)``.
* **Rereads**: each rater reads a fraction ``reread_fraction`` of the images a second time (fresh detection
  and read noise, same personal parameters), flagged ``reread``.

Defaults and their sources are in docs/raters.md. Every draw comes from streams derived from the seed, the
rater's index and the reading (:func:`synthtrial.util.seeding.derived_rng`): the same seed reads the same
counts, whatever else the panel holds.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from synthtrial.trial import scale
from synthtrial.util.errors import SynthtrialError
from synthtrial.util.seeding import derived_rng

__all__ = ["ACTIVE_TYPES", "CONFUSED_AS", "DEFAULTS", "Panel", "PanelError", "RATING_COLUMNS", "Rater", "draw_raters",
           "expected_reads", "load_panel", "panel_from_dict", "read_all", "read_arrays", "read_images",
           "read_panel_once", "reading_table"]

ACTIVE_TYPES = scale.LESION_TYPES
#: What a confused residue is counted as.
CONFUSED_AS = {"mark": "papule", "scar": "closed_comedo"}
#: The ratings table's columns (``RUN/ratings.parquet``), in order.
RATING_COLUMNS = ("rater", "image", "reread", "count", *(f"n_{t}" for t in ACTIVE_TYPES), "iga", "hayashi_level")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
MAX_RATERS = 100

#: The default panel (docs/raters.md gives each value's source or says it is an assumption).
DEFAULTS: dict[str, Any] = {
    "ceiling": {"open_comedo": 0.85, "closed_comedo": 0.75, "papule": 0.95, "pustule": 0.97, "nodule": 0.99},
    "d50_mm": {"open_comedo": 1.0, "closed_comedo": 1.2, "papule": 1.0, "pustule": 0.8, "nodule": 2.0},
    "steepness": 3.0,
    "fading": 0.5,
    "respect_visibility": False,
    "confusion": {"mark": 0.10, "scar": 0.05},
    "bias_sd": 1.5,
    "scale_sd": 0.12,
    "threshold_shift_sd": 0.15,
    "drift_sd": 0.03,
    "read_sd": 1.0,
    "read_cv": 0.06,
    "reread_fraction": 0.1,
}


class PanelError(SynthtrialError):
    """A panel file or setting that cannot be used; names the file and the key."""


@dataclass(frozen=True)
class Rater:
    """One rater's personal parameters (kept as truth in ``ratings.json``)."""

    name: str
    bias: float = 0.0
    scale: float = 1.0
    threshold_shift: float = 0.0
    drift: float = 0.0


@dataclass(frozen=True)
class Panel:
    """The perceptual model's parameters (module docstring); :func:`load_panel` reads and checks them."""

    ceiling: dict[str, float] = field(default_factory=lambda: dict(DEFAULTS["ceiling"]))
    d50_mm: dict[str, float] = field(default_factory=lambda: dict(DEFAULTS["d50_mm"]))
    steepness: float = DEFAULTS["steepness"]
    fading: float = DEFAULTS["fading"]
    respect_visibility: bool = DEFAULTS["respect_visibility"]
    confusion: dict[str, float] = field(default_factory=lambda: dict(DEFAULTS["confusion"]))
    bias_sd: float = DEFAULTS["bias_sd"]
    scale_sd: float = DEFAULTS["scale_sd"]
    threshold_shift_sd: float = DEFAULTS["threshold_shift_sd"]
    drift_sd: float = DEFAULTS["drift_sd"]
    read_sd: float = DEFAULTS["read_sd"]
    read_cv: float = DEFAULTS["read_cv"]
    reread_fraction: float = DEFAULTS["reread_fraction"]
    raters: tuple[Rater, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["raters"] = [asdict(r) for r in self.raters]
        return data


# ------------------------------------------------------------------------------------------ the panel file

#: Each scalar setting's allowed range (inclusive).
_RANGES = {"steepness": (0.0, 50.0), "fading": (0.0, 10.0), "bias_sd": (0.0, 100.0), "scale_sd": (0.0, 2.0),
           "threshold_shift_sd": (0.0, 2.0), "drift_sd": (0.0, 2.0), "read_sd": (0.0, 100.0), "read_cv": (0.0, 2.0),
           "reread_fraction": (0.0, 1.0)}
_TYPE_MAPS = {"ceiling": (ACTIVE_TYPES, (0.0, 1.0)), "d50_mm": (ACTIVE_TYPES, (0.0, 100.0)),
              "confusion": (tuple(CONFUSED_AS), (0.0, 1.0))}
_RATER_RANGES = {"bias": (-100.0, 100.0), "scale": (0.01, 100.0), "threshold_shift": (-5.0, 5.0), "drift": (-5.0, 5.0)}


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise PanelError(f"{where}: {value!r} is not a number from {low:g} to {high:g}")
    return float(value)


def panel_from_dict(data: Any, where: str = "panel") -> Panel:
    """A :class:`Panel` from a JSON object (missing keys keep :data:`DEFAULTS`); a wrong key or value is a one-line
    :class:`PanelError` naming ``where`` and the key."""
    if not isinstance(data, Mapping):
        raise PanelError(f"{where}: must be a JSON object, not {type(data).__name__}")
    known = {f.name for f in fields(Panel)}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise PanelError(f"{where}: key '{unknown[0]}' is not a panel setting ({', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for key, (types, (low, high)) in _TYPE_MAPS.items():
        given = data.get(key, {})
        if not isinstance(given, Mapping):
            raise PanelError(f"{where}: key '{key}' must be an object of {', '.join(types)}")
        bad = [t for t in given if t not in types]
        if bad:
            raise PanelError(f"{where}: key '{key}.{bad[0]}' is not one of {', '.join(types)}")
        values[key] = {t: _number(given[t], f"{where}: key '{key}.{t}'", low, high) if t in given
                       else float(DEFAULTS[key][t]) for t in types}
    for key, (low, high) in _RANGES.items():
        values[key] = _number(data[key], f"{where}: key '{key}'", low, high) if key in data else float(DEFAULTS[key])
    visibility = data.get("respect_visibility", DEFAULTS["respect_visibility"])
    if not isinstance(visibility, bool):
        raise PanelError(f"{where}: key 'respect_visibility' must be true or false, not {visibility!r}")
    values["respect_visibility"] = visibility
    values["raters"] = _raters(data.get("raters", []), where)
    return Panel(**values)


def _raters(listed: Any, where: str) -> tuple[Rater, ...]:
    if not isinstance(listed, list) or len(listed) > MAX_RATERS:
        raise PanelError(f"{where}: key 'raters' must be a list of at most {MAX_RATERS} rater objects")
    out, names = [], set()
    for i, item in enumerate(listed):
        at = f"{where}: key 'raters[{i}]"
        if not isinstance(item, Mapping):
            raise PanelError(f"{at}' must be an object")
        bad = [k for k in item if k not in ("name", *_RATER_RANGES)]
        if bad:
            raise PanelError(f"{at}.{bad[0]}' is not a rater setting (name, {', '.join(_RATER_RANGES)})")
        name = item.get("name", f"R{i + 1:02d}")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in names:
            raise PanelError(f"{at}.name': {name!r} is not a new name of letters, digits, '_' or '-' (at most 32)")
        names.add(name)
        out.append(Rater(name, **{k: _number(item[k], f"{at}.{k}'", *rng) for k, rng in _RATER_RANGES.items()
                                  if k in item}))
    return tuple(out)


def load_panel(path: str | Path | None) -> Panel:
    """The panel in a JSON file (None: the defaults), checked; errors name the file and the key."""
    if path is None:
        return Panel()
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PanelError(f"{path}: cannot be read ({exc.strerror or exc}) (option --panel)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PanelError(f"{path}: not JSON ({getattr(exc, 'msg', exc)}) (option --panel)") from None
    return panel_from_dict(data, str(path))


def draw_raters(panel: Panel, n: int, seed: int) -> list[Rater]:
    """``n`` raters: the panel's listed ones first, the rest drawn from its spreads (rater k from its own stream)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_RATERS:
        raise PanelError(f"--raters must be a whole number from 1 to {MAX_RATERS}, got {n!r}")
    raters = list(panel.raters[:n])
    taken = {r.name for r in raters}
    for k in range(len(raters), n):
        rng = derived_rng("rater", seed, k)
        z = rng.standard_normal(4)
        name = f"R{k + 1:02d}"
        while name in taken:
            name += "x"
        raters.append(Rater(name, bias=float(panel.bias_sd * z[0]), scale=float(np.exp(panel.scale_sd * z[1])),
                            threshold_shift=float(panel.threshold_shift_sd * z[2]), drift=float(panel.drift_sd * z[3])))
    return raters


# ------------------------------------------------------------------------------------------ reading

def reading_table(images: pd.DataFrame, lesions: pd.DataFrame, panel: Panel) -> dict[str, np.ndarray]:
    """What every rater reads, fixed before anyone reads: per lesion row its image index, the type it is counted
    as (an index into :data:`ACTIVE_TYPES`) and the chance it is counted; per image its calendar day.

    ``images``: ``image`` (unique) and ``calendar_day``; ``lesions``: ``image``, ``type``, ``diameter_mm``,
    ``intensity`` and, optionally, ``visible``. Lesions of images not listed are ignored."""
    index = pd.Index(images["image"])
    where = index.get_indexer(lesions["image"])
    keep = where >= 0
    les = lesions.loc[keep]
    kind = les["type"].astype(str).to_numpy()
    diameter = pd.to_numeric(les["diameter_mm"], errors="coerce").fillna(0.0).to_numpy(dtype=float)
    intensity = np.clip(pd.to_numeric(les["intensity"], errors="coerce").fillna(1.0).to_numpy(dtype=float), 0, 1)
    p = np.zeros(len(les))
    counted_as = np.full(len(les), -1)
    h = panel.steepness
    for t, name in enumerate(ACTIVE_TYPES):
        on = kind == name
        d50 = panel.d50_mm[name]
        d = diameter[on]
        size = np.ones_like(d) if d50 == 0 else d**h / np.maximum(d**h + d50**h, 1e-300)
        p[on] = panel.ceiling[name] * size * intensity[on] ** panel.fading
        counted_as[on] = t
    for residue, as_type in CONFUSED_AS.items():
        on = kind == residue
        p[on] = panel.confusion[residue]
        counted_as[on] = ACTIVE_TYPES.index(as_type)
    if panel.respect_visibility and "visible" in les.columns:
        seen = les["visible"].astype("boolean").fillna(True).to_numpy(dtype=bool)
        p = np.where(seen, p, 0.0)
    used = counted_as >= 0
    return {"image": where[keep][used], "type": counted_as[used], "p": p[used],
            "calendar_day": images["calendar_day"].to_numpy(dtype=float), "n_images": np.int64(len(images))}


def _detected(table: dict[str, np.ndarray], u: np.ndarray) -> np.ndarray:
    """(readers, images, types) counts of the lesions whose uniform draw ``u`` (readers x lesion rows) falls under
    their chance of being counted."""
    n_images, n_types = int(table["n_images"]), len(ACTIVE_TYPES)
    cell = table["image"] * n_types + table["type"]
    readers = u.shape[0]
    hit = u < table["p"][None, :]
    flat = (np.arange(readers)[:, None] * (n_images * n_types) + cell[None, :])[hit]
    counts = np.bincount(flat, minlength=readers * n_images * n_types)
    return counts.reshape(readers, n_images, n_types).astype(float)


def read_panel_once(table: dict[str, np.ndarray], panel: Panel, raters: list[Rater], u: np.ndarray,
                    z: np.ndarray) -> dict[str, np.ndarray]:
    """Every rater's reading of every image at once: ``u`` uniform draws (raters x lesion rows), ``z`` standard
    normals (raters x images). Returns the count, IGA and Hayashi level (raters x images) and the per-type counts
    (raters x images x types)."""
    detected = _detected(table, u)
    total = detected.sum(axis=2)
    scale_ = np.array([r.scale for r in raters])[:, None]
    drift = np.array([r.drift for r in raters])[:, None]
    bias = np.array([r.bias for r in raters])[:, None]
    factor = scale_ * np.exp(drift * table["calendar_day"][None, :] / 100.0)
    noise_sd = np.sqrt(panel.read_sd**2 + (panel.read_cv * total) ** 2)
    count = np.maximum(0.0, np.rint(factor * total + bias + noise_sd * z))
    k, n = count.shape
    per_type = _split(count.ravel(), detected.reshape(k * n, -1)).reshape(k, n, -1)
    shrink = np.exp(-np.array([r.threshold_shift for r in raters]))[:, None]
    inflammatory = per_type[:, :, [ACTIVE_TYPES.index(t) for t in scale.INFLAMMATORY_TYPES]].sum(axis=2)
    nodule = per_type[:, :, ACTIVE_TYPES.index("nodule")]
    iga = scale.iga_from_counts(inflammatory * shrink, nodule * shrink)
    level = scale.acne04_level_from_count(count * shrink)
    return {"count": count.astype(np.int64), "per_type": per_type.astype(np.int64),
            "iga": np.asarray(iga, np.int64), "hayashi_level": np.asarray(level, np.int64)}


def read_images(table: dict[str, np.ndarray], panel: Panel, rater: Rater, u: np.ndarray,
                z: np.ndarray) -> dict[str, np.ndarray]:
    """One rater's reading of every image: ``u`` uniform draws per lesion row, ``z`` standard normals per image.
    Returns the count, the per-type counts (images x types), IGA and Hayashi level."""
    reading = read_panel_once(table, panel, [rater], u[None, :], z[None, :])
    return {key: value[0] for key, value in reading.items()}


def _split(count: np.ndarray, detected: np.ndarray) -> np.ndarray:
    """Split each count over the types in proportion to the detected ones plus one pseudo-lesion of the scale's
    mix at that count, by largest remainders (ties to the earlier type)."""
    mix = scale.lesion_mix(scale.severity_from_count(count))
    prior = np.stack([np.atleast_1d(mix[t]) for t in ACTIVE_TYPES], axis=1)
    weights = (detected + prior) / (detected.sum(axis=1, keepdims=True) + 1.0)
    share = count[:, None] * weights
    base = np.floor(share + 1e-9)
    left = (count - base.sum(axis=1)).astype(np.int64)
    order = np.argsort(-(share - base), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(share.shape[1])[None, :].repeat(len(share), 0), axis=1)
    return base + (rank < left[:, None])


def read_arrays(table: dict[str, np.ndarray], panel: Panel, raters: list[Rater], seed: int,
                stream: object = "read", rereads: bool = True) -> dict[str, Any]:
    """Every rater's reading of every image as arrays (:func:`read_panel_once`'s, raters x images), plus
    ``reread``: per rater the indices of the images it read again and that second reading (``None`` without
    rereads). Rater k draws from its own stream (``stream``, ``seed``, k): its first reading's uniforms and
    normals, then which images it rereads, then the second reading's; :func:`read_all` tabulates the same draws."""
    n_images, n_lesions = int(table["n_images"]), len(table["p"])
    draws = {"u": [], "z": [], "again": [], "u2": [], "z2": []}
    again_too = rereads and panel.reread_fraction > 0
    for k in range(len(raters)):
        rng = derived_rng(stream, seed, k)
        draws["u"].append(rng.random(n_lesions))
        draws["z"].append(rng.standard_normal(n_images))
        if again_too:
            draws["again"].append(np.flatnonzero(rng.random(n_images) < panel.reread_fraction))
            draws["u2"].append(rng.random(n_lesions))
            draws["z2"].append(rng.standard_normal(n_images))
    first = read_panel_once(table, panel, raters, np.stack(draws["u"]).reshape(len(raters), n_lesions),
                            np.stack(draws["z"]))
    first["reread"] = None
    if again_too:
        second = read_panel_once(table, panel, raters, np.stack(draws["u2"]).reshape(len(raters), n_lesions),
                                 np.stack(draws["z2"]))
        first["reread"] = [(idx, {key: value[k][idx] for key, value in second.items()})
                           for k, idx in enumerate(draws["again"])]
    return first


def read_all(table: dict[str, np.ndarray], panel: Panel, raters: list[Rater], seed: int,
             stream: object = "read", rereads: bool = True) -> pd.DataFrame:
    """Every rater's reading of every image (rater by rater, images in ``table`` order), with each rater's rereads
    (a ``reread_fraction`` of the images) after its first reads; the columns of :data:`RATING_COLUMNS` but
    ``image``, which is the image's index (``image_index``). ``stream`` names the draws (another stream: another
    reading by the same panel, as the agreement's simulation uses)."""
    reading = read_arrays(table, panel, raters, seed, stream, rereads)
    n_images = int(table["n_images"])
    frames = []
    for k, rater in enumerate(raters):
        parts = [(np.arange(n_images), False, {key: reading[key][k] for key in _READ_KEYS})]
        if reading["reread"] is not None:
            parts.append((reading["reread"][k][0], True, reading["reread"][k][1]))
        for idx, reread, one in parts:
            frame = pd.DataFrame({"rater": rater.name, "image_index": idx, "reread": reread, "count": one["count"]})
            for t, name in enumerate(ACTIVE_TYPES):
                frame[f"n_{name}"] = one["per_type"][:, t]
            frame["iga"] = one["iga"]
            frame["hayashi_level"] = one["hayashi_level"]
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


_READ_KEYS = ("count", "per_type", "iga", "hayashi_level")


def expected_reads(table: dict[str, np.ndarray], panel: Panel, raters: list[Rater]) -> tuple[np.ndarray, np.ndarray]:
    """The mean and variance of every rater's count of every image (images x raters) the model implies: the
    detected count's mean and (Poisson-binomial) variance, scaled, biased and noised as read, then floored at 0
    (moments of a normal censored at 0) and rounded (variance + 1/12)."""
    from scipy.stats import norm

    n = int(table["n_images"])
    m = np.bincount(table["image"], weights=table["p"], minlength=n)
    v = np.bincount(table["image"], weights=table["p"] * (1 - table["p"]), minlength=n)
    means, variances = [], []
    for rater in raters:
        factor = rater.scale * np.exp(rater.drift * table["calendar_day"] / 100.0)
        mu = factor * m + rater.bias
        var = factor**2 * v + panel.read_sd**2 + panel.read_cv**2 * (v + m**2)
        sd = np.sqrt(np.maximum(var, 1e-12))
        a = mu / sd
        cdf, pdf = norm.cdf(a), norm.pdf(a)
        mean = mu * cdf + sd * pdf
        second = (mu**2 + var) * cdf + mu * sd * pdf
        means.append(mean)
        variances.append(np.maximum(second - mean**2, 0.0) + np.where(var > 1e-12, 1.0 / 12.0, 0.0))
    return np.stack(means, axis=1), np.stack(variances, axis=1)
