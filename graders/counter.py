"""The classical lesion counter: the baseline every learned grader must beat. No weights, no training.

On the skin that MediaPipe's face mesh and the face's own skin colour delimit (``synthtrial.face.faces.
skin_regions``), each pixel's CIELAB a* (redness) and L* (lightness) are compared with the local skin
around it (a normalised Gaussian average over the skin, sigma = ``background_sigma`` x the interocular
distance). Red excess marks inflamed lesions (papules, pustules, nodules, red closed comedones); a
lightness deficit marks open comedones and dark marks. After a light smoothing, every local maximum of
``max(red excess / red_threshold, darkness / dark_threshold)`` above 1 and at least ``min_distance`` apart
is one lesion. The count gives the ACNE04 / Hayashi level and, through the inverse of the severity scale's
count map, a severity on the 0-3 scale (``synthtrial scale``).

Its limits are those of colour blobs: faint (growing or fading) lesions are missed, clusters merge,
flat red marks count as lesions, and an image without a detectable face gets no count (NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import pandas as pd

from synthtrial.face.mesh import interocular
from synthtrial.graders.base import GraderComponent, GraderError
from synthtrial.trial import scale

OUTPUT_COLUMNS = ("count", "red_count", "dark_count", "level", "severity", "face_found")


@dataclass(frozen=True)
class CounterConfig:
    """Plain-data settings; the defaults were chosen on a generated run (README, "Graders")."""

    red_threshold: float = 2.0         # a* above the local skin (CIELAB units) that counts as a red lesion
    dark_threshold: float = 25.0      # L* below the local skin that counts as a dark lesion
    background_sigma: float = 0.3      # local skin average, in interocular distances
    smooth_sigma: float = 0.008        # pre-smoothing, in interocular distances
    min_distance: float = 0.035        # between two lesions' maxima, in interocular distances
    edge_margin: float = 0.05          # skin within this distance of the mask's edge is not searched (IOD)
    min_roundness: float = 0.6         # smaller / larger Hessian curvature at a maximum: lines (wrinkles, frames)
                                       # score near 0, round blobs near 1

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise GraderError(f"counter setting {name} must be a positive number, got {value!r}")


class LesionCounter(GraderComponent):
    """``LesionCounter().predict(images)`` -> count, red_count, dark_count, level, severity, face_found.

    A component without weights: ``save_pretrained`` writes its ``config.json`` only; it runs on the CPU
    (the device is still checked, as every grader's)."""

    name = "counter"
    label = "counter"
    outcomes = ("count", "severity")
    config_class = CounterConfig
    has_weights = False

    def __init__(self, config: CounterConfig | None = None, detector=None, *, device=None,
                 record: dict | None = None) -> None:
        super().__init__(config, device=device, record=record)
        self._detector = detector     # a synthtrial.face.faces.LandmarkDetector; built on first use when None

    def _landmarks(self, image: np.ndarray) -> np.ndarray | None:
        if self._detector is None:
            from synthtrial.face.faces import LandmarkDetector

            self._detector = LandmarkDetector()
        return self._detector(image)

    def count(self, image: np.ndarray) -> dict[str, float]:
        """The counts of one (H, W, 3) uint8 RGB image, and the peaks found (``peaks``: (N, 2) x, y)."""
        from synthtrial.face.faces import skin_regions

        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise GraderError("counter: images must be (H, W, 3) uint8 RGB arrays")
        landmarks = self._landmarks(image)
        if landmarks is None:
            return {"count": math.nan, "red_count": math.nan, "dark_count": math.nan, "level": math.nan,
                    "severity": math.nan, "face_found": 0.0, "peaks": np.zeros((0, 2))}
        skin, _ = skin_regions(image, landmarks)
        peaks, is_red = self.peaks(image, skin, interocular(landmarks, eyes="corners"))
        n = len(peaks)
        return {"count": float(n), "red_count": float(is_red.sum()), "dark_count": float(n - is_red.sum()),
                "level": float(scale.acne04_level_from_count(n)), "severity": float(scale.severity_from_count(n)),
                "face_found": 1.0, "peaks": peaks}

    def peaks(self, image: np.ndarray, skin: np.ndarray, iod: float) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2) x, y of the lesion maxima on ``skin`` and whether each is red (else dark)."""
        from skimage.feature import peak_local_max

        cfg = self.config
        lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2Lab)
        weight = skin.astype(np.float32)
        if weight.sum() < 16:
            return np.zeros((0, 2)), np.zeros(0, bool)
        sigma = max(1.0, cfg.background_sigma * iod)
        norm = cv2.GaussianBlur(weight, (0, 0), sigma) + 1e-6
        local = [cv2.GaussianBlur(lab[..., c] * weight, (0, 0), sigma) / norm for c in (0, 1)]
        red = (lab[..., 1] - local[1]) / cfg.red_threshold
        dark = (local[0] - lab[..., 0]) / cfg.dark_threshold
        smooth = max(0.5, cfg.smooth_sigma * iod)
        red = cv2.GaussianBlur(red, (0, 0), smooth) * weight
        dark = cv2.GaussianBlur(dark, (0, 0), smooth) * weight
        score = np.maximum(red, dark)
        k = max(1, int(round(cfg.edge_margin * iod)))
        inner = cv2.erode(skin.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
        found = peak_local_max(score, min_distance=max(1, int(round(cfg.min_distance * iod))), threshold_abs=1.0,
                               labels=inner.astype(np.int32), exclude_border=False)
        if len(found) == 0:
            return np.zeros((0, 2)), np.zeros(0, bool)
        rows, cols = found[:, 0], found[:, 1]
        # keep round maxima: the two principal curvatures of the score at the peak must be alike
        blob = cv2.GaussianBlur(score, (0, 0), max(0.7, 2 * cfg.smooth_sigma * iod))
        dyy, dxx = np.gradient(np.gradient(blob, axis=0), axis=0), np.gradient(np.gradient(blob, axis=1), axis=1)
        dxy = np.gradient(np.gradient(blob, axis=0), axis=1)
        a, b, c = dxx[rows, cols], dyy[rows, cols], dxy[rows, cols]
        half_trace, root = (a + b) / 2, np.sqrt(((a - b) / 2) ** 2 + c ** 2)
        l1, l2 = half_trace - root, half_trace + root          # l1 <= l2; a maximum has both < 0
        roundness = np.where(l1 < 0, np.clip(-l2, 0, None) / np.maximum(-l1, 1e-9), 0.0)
        keep = roundness >= cfg.min_roundness
        rows, cols = rows[keep], cols[keep]
        return np.stack([cols + 0.5, rows + 0.5], axis=1), red[rows, cols] >= dark[rows, cols]

    def predict(self, images: Sequence[np.ndarray], meta: pd.DataFrame | None = None) -> pd.DataFrame:
        rows = []
        for image in images:
            found = self.count(image)
            found.pop("peaks")
            rows.append(found)
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS)).astype("float64")

