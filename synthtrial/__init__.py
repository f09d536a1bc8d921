"""synthtrial: simulated multimodal N-of-1 acne trials.

The scripting API at the top level (:mod:`synthtrial.api`): ``synthtrial.design``, ``generate``, ``grade``,
``analyze`` and ``power``, each returning a typed result (``DesignResult``, ``GenerateResult``, ...). The API
module loads on first use, so ``import synthtrial`` imports neither pandas nor torch.

``grade`` and ``analyze`` are also the names of two stage packages (``synthtrial.grade.stage``,
``synthtrial.analyze.pipeline``, ...): an imported package is an attribute of its parent and would hide a
function of the same name, so those two packages are made callable instead, and calling one calls the API
function: ``synthtrial.grade(run)`` is ``synthtrial.api.grade(run)``, while ``synthtrial.grade.stage`` stays the
module it was.
"""

from __future__ import annotations

import inspect
import types
from typing import Any

from synthtrial.version import __version__
from synthtrial import analyze, grade  # the stage packages: light, their modules load on first use

__all__ = ["AnalyzeResult", "DesignResult", "GenerateResult", "GradeResult", "PowerResult", "__version__", "analyze",
           "design", "generate", "grade", "power"]


class _CallableStage(types.ModuleType):
    """A stage package that is also the API function of its name (see the module docstring)."""

    def _target(self) -> Any:
        from synthtrial import api

        return getattr(api, self.__name__.rpartition(".")[2])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._target()(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self._target())


for _stage in (analyze, grade):
    _stage.__class__ = _CallableStage


def __getattr__(name: str) -> Any:
    if name in __all__:
        from synthtrial import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
