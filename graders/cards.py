"""Whether a grader's weights meet their targets: read from the figures its model card measured, never typed.

Each weights folder holds, beside ``MODEL_CARD.md`` (the prose), ``evaluation.json`` (:data:`CARD_FILE`): the
figures the card's tables give, per evaluation set, and the sha256 of the ``model.safetensors`` they were
measured on::

    {"weights_sha256": "…", "figures": {"held_out_seed": {"ap50": 0.421, …}, "held_out_portrait": {…}},
     "measured_by": {"held_out_seed": "synthtrial graders eval detector --data …"}}

The targets are issue 20's "done when", stated once here (:data:`TARGETS`); :func:`card_status` sets a card's
figures against them and says ``meets_targets`` with every check and the first shortfall in words. A figure a
card does not give counts as not met ("not measured"), and so do figures measured on other weights (the
sha256 differs: weights retrained and copied in without a new evaluation). A list figure (the recall of every
class) must meet its bound in every element. Graders with no targets (the classical counter, the baseline the
targets are measured against; the tracker, whose target is that its figures are reported) meet theirs when
what they read does.

:func:`default_graders` is what ``synthtrial grade`` runs when no ``--graders`` are named: the available
graders that meet their targets. New weights with a new ``evaluation.json`` change it with no code change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthtrial.graders.base import DEFAULT_WEIGHTS_DIR, REGISTRY, WEIGHTS_FILE, GraderError, available
from synthtrial.util.errors import SynthtrialWarning

#: The machine-readable card beside each grader's weights.
CARD_FILE = "evaluation.json"

#: The evaluation sets a card's figures are grouped by.
SETS = {"held_out_seed": "held-out seed", "held_out_portrait": "held-out portrait",
        "shipped_trial": "shipped trial", "varied_characteristics": "set with varied characteristics"}


@dataclass(frozen=True)
class Target:
    """``metric`` on evaluation set ``on`` must be ``>=`` (or ``<=``) ``bound``; with ``relative_to`` the bound
    is a ratio to that figure of the same set (the detector's count MAE against the counter's)."""

    on: str
    metric: str
    op: str
    bound: float
    relative_to: str | None = None

    def describe(self) -> str:
        what = f"{self.metric} / {self.relative_to}" if self.relative_to else self.metric
        return f"{SETS.get(self.on, self.on)} {what} {self.op} {self.bound:g}"


#: Issue 20's targets ("done when"), per grader. Graders not listed have none.
TARGETS: dict[str, tuple[Target, ...]] = {
    "detector": (Target("held_out_seed", "count_mae", "<=", 0.5, relative_to="counter_count_mae"),
                 Target("held_out_seed", "level_accuracy", ">=", 0.85),
                 Target("held_out_seed", "ap50", ">=", 0.6),
                 Target("held_out_portrait", "ap50", ">=", 0.4),
                 Target("shipped_trial", "within_spearman_median", ">=", 0.8)),
    "iga": (Target("held_out_seed", "accuracy3", ">=", 0.8),
            Target("held_out_seed", "recall3", ">=", 0.7),
            Target("held_out_portrait", "accuracy3", ">=", 0.6)),
    "dermx": (Target("held_out_seed", "level_accuracy", ">=", 0.8),
              Target("held_out_seed", "plausibility_f1", ">=", 0.35),
              Target("varied_characteristics", "characteristic_macro_f1", ">=", 0.8)),
    "imageqx": (Target("held_out_portrait", "quality_macro_f1", ">=", 0.8),),
}


@dataclass(frozen=True)
class Check:
    target: Target
    value: float | None   # the card's figure (the worst element of a list); None: not measured
    met: bool

    def describe(self) -> str:
        shown = "not measured" if self.value is None else f"{self.value:g}"
        return f"{self.target.describe()}: {shown}"


@dataclass(frozen=True)
class CardStatus:
    """A grader's card set against its targets: ``meets_targets``, every ``checks`` and ``reason`` in words."""

    grader: str
    meets_targets: bool
    reason: str
    checks: tuple[Check, ...] = field(default=())

    def as_dict(self) -> dict[str, Any]:
        return {"meets_targets": self.meets_targets, "reason": self.reason,
                "checks": [{"target": c.target.describe(), "value": c.value, "met": c.met} for c in self.checks]}


def read_card(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``FOLDER/evaluation.json`` as a dict, None when there is none; a one-line error when it is not a card."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GraderError(f"{path}: not a readable JSON card ({exc})") from None
    figures = card.get("figures") if isinstance(card, dict) else None
    if not isinstance(figures, dict) or not all(isinstance(v, dict) for v in figures.values()):
        raise GraderError(f"{path}: 'figures' must map each evaluation set to its figures")
    return card


def _figure(figures: dict[str, Any], on: str, metric: str, worst: str) -> float | None:
    value = figures.get(on, {}).get(metric)
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                             for v in values):
        return None
    return float(min(values) if worst == "min" else max(values))


def check(target: Target, figures: dict[str, Any]) -> Check:
    """One target against a card's figures."""
    value = _figure(figures, target.on, target.metric, "min" if target.op == ">=" else "max")
    if value is not None and target.relative_to is not None:
        base = _figure(figures, target.on, target.relative_to, "max")
        value = value / base if base else None
    if value is None:
        return Check(target, None, False)
    return Check(target, value, value >= target.bound if target.op == ">=" else value <= target.bound)


def weights_sha256(folder: str | os.PathLike[str]) -> str | None:
    path = Path(folder) / WEIGHTS_FILE
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def update_card(folder: str | os.PathLike[str], figures: dict[str, dict[str, Any]], measured_by: str) -> Path:
    """Merge ``figures`` (per evaluation set) into ``FOLDER/evaluation.json`` (created when missing), each set's
    ``measured_by`` the command given and ``weights_sha256`` that of the folder's weights now; figures the card
    holds for other weights (another sha256) are dropped, not kept beside the new ones."""
    from synthtrial.util.atomic import write_text_atomic

    folder = Path(folder)
    sha = weights_sha256(folder)
    if sha is None:
        raise GraderError(f"{folder / WEIGHTS_FILE}: no weights to write a card for")
    card = read_card(folder) or {}
    if card.get("weights_sha256") != sha:
        card = {"about": card.get("about", "Figures measured on these weights, read by synthtrial.graders.cards "
                                  "against issue 20's targets.")}
    card.setdefault("figures", {}).update(figures)
    card.setdefault("measured_by", {}).update({on: measured_by for on in figures})
    card["weights_sha256"] = sha
    return Path(write_text_atomic(folder / CARD_FILE, json.dumps(card, indent=2, sort_keys=True) + "\n"))


def card_status(name: str, folder: str | os.PathLike[str] | None = None) -> CardStatus:
    """Grader ``name``'s card (in ``folder``, default: its shipped weights) against :data:`TARGETS`."""
    if name not in REGISTRY:
        raise GraderError(f"unknown grader '{name}'; choose from: {', '.join(REGISTRY)} (option --graders)")
    targets = TARGETS.get(name, ())
    if not targets:
        return CardStatus(name, True, "no targets of its own" + (
            " (the classical baseline the others are measured against)" if not REGISTRY[name].needs_weights
            and not REGISTRY[name].needs else ""))
    folder = Path(folder) if folder is not None else DEFAULT_WEIGHTS_DIR / name
    card = read_card(folder)
    if card is None:
        return CardStatus(name, False, f"no measured figures ({folder / CARD_FILE} missing)")
    recorded = card.get("weights_sha256")
    if recorded and recorded != weights_sha256(folder):
        return CardStatus(name, False, f"{folder / CARD_FILE} measured other weights than {folder / WEIGHTS_FILE}; "
                          "evaluate these and update it")
    checks = tuple(check(t, card["figures"]) for t in targets)
    short = [c for c in checks if not c.met]
    if not short:
        return CardStatus(name, True, "meets every target", checks)
    more = f" (and {len(short) - 1} more)" if len(short) > 1 else ""
    return CardStatus(name, False, f"short of its targets: {short[0].describe()}{more}", checks)


def default_graders() -> list[str]:
    """The graders ``synthtrial grade`` runs when none are named: those :func:`~synthtrial.graders.base.available`
    whose card meets its targets, and whose inputs (``needs``) are graded by default too, in registry order."""
    chosen: list[str] = []
    for name in available():
        if card_status(name).meets_targets and all(n in chosen for n in REGISTRY[name].needs):
            chosen.append(name)
    return chosen


class BelowTargetsWarning(SynthtrialWarning):
    """A grader used although its card does not meet its targets (``grade`` says so, ``analyze`` repeats it)."""


def below_targets_line(grader: str, reason: str) -> str:
    """The one line that ``grade`` and ``analyze`` print for a grader used below its targets."""
    return (f"grader '{grader}' is not a default grader, {reason}; see its MODEL_CARD.md before relying on "
            "its grades")


def grader_card(grader: Any) -> CardStatus | None:
    """The card status of a grader object: of the folder it was loaded from (its shipped weights when built by
    :meth:`~synthtrial.graders.base.GraderComponent.default`); None for a grader outside the registry."""
    spec = REGISTRY.get(getattr(grader, "name", ""))
    if spec is None or not isinstance(grader, spec.cls()):
        return None
    folder = getattr(grader, "weights_folder", None)
    if folder is None and spec.needs_weights and TARGETS.get(spec.name):
        return CardStatus(spec.name, False, "its weights were not loaded from a folder with a model card")
    return card_status(spec.name, folder)
