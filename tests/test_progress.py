"""The shared progress bar: drawn on stderr with its status on a terminal, silent when disabled or piped,
stdout left alone; and the one callback signature: every public ``progress`` parameter of the library is a
``ProgressCallback``."""

import ast
import re
from pathlib import Path

import pytest

from synthtrial.util.progress import progress_bar


def test_bar_goes_to_stderr_with_status(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: treat the captured stderr as a terminal
    with progress_bar("training", 4, unit="steps") as update:
        for step in range(1, 5):
            update(step, 4, f"loss {1 / step:.2f}")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "training" in captured.err and "4/4" in captured.err and "loss 0.25" in captured.err


def test_total_can_be_given_late(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    with progress_bar("grading", 1) as update:
        update(6, 12, "")
    assert "6/12" in capsys.readouterr().err


def test_piped_or_disabled_bar_is_silent(capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    with progress_bar("rendering", 3) as update:  # stderr is not a terminal under capsys
        update(3, 3, "")
    with progress_bar("rendering", 3, enabled=False) as update:
        update(3, 3, "")
    assert capsys.readouterr() == ("", "")


# ------------------------------------------------------------------ one callback signature, checked

ROOT = Path(__file__).resolve().parents[1]
#: parameter names that carry a progress callback (``read_progress`` and the like: one callback per stage)
PROGRESS_NAME = re.compile(r"^(progress|on_progress|on_replicate|\w+_progress)$")
#: what such a parameter may be typed as: the one signature, optional, or a plain switch for the library's bar
ALLOWED = {"ProgressCallback", "ProgressCallback|None", "None|ProgressCallback", "Optional[ProgressCallback]", "bool"}
IMPORT = "from synthtrial.util.progress import"


def _public_functions(tree: ast.Module):
    """Module-level public functions and the public methods (``__init__`` / ``__call__`` included) of public
    classes: ``(qualified name, node)``."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and (
                        not item.name.startswith("_") or item.name in ("__init__", "__call__")):
                    yield f"{node.name}.{item.name}", item


def progress_deviations(source: str, where: str) -> list[str]:
    """Every public function parameter named like a progress callback that is not typed ProgressCallback
    (optionally ``| None``) or ``bool``, or typed so without importing it from :mod:`synthtrial.util.progress`."""
    tree = ast.parse(source)
    imported = any(isinstance(n, ast.ImportFrom) and n.module == "synthtrial.util.progress"
                   and any(a.name == "ProgressCallback" for a in n.names) for n in ast.walk(tree))
    defined = any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "ProgressCallback" for t in n.targets)
                  for n in tree.body)
    found = []
    for name, func in _public_functions(tree):
        args = func.args
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            if not PROGRESS_NAME.match(arg.arg):
                continue
            text = "" if arg.annotation is None else ast.unparse(arg.annotation).replace(" ", "")
            if text not in ALLOWED:
                found.append(f"{where}: {name}({arg.arg}: {text or 'no annotation'})")
            elif "ProgressCallback" in text and not (imported or defined):
                found.append(f"{where}: {name}({arg.arg}) uses a ProgressCallback not from synthtrial.util.progress")
    return found


def _library_modules() -> list[Path]:
    return sorted([*(ROOT / "synthtrial").rglob("*.py"), *(ROOT / "graders").rglob("*.py")])


def test_every_public_progress_parameter_is_a_progress_callback():
    found = []
    checked = 0
    for path in _library_modules():
        if path.is_relative_to(ROOT / "synthtrial" / "graders"):      # the worktree's symlink to graders/
            continue
        source = path.read_text(encoding="utf-8")
        checked += source.count("ProgressCallback")
        found += progress_deviations(source, str(path.relative_to(ROOT)))
    assert found == []
    assert checked >= 20        # the walk did reach the library (a wrong ROOT would pass vacuously)


@pytest.mark.parametrize("signature, bad", [
    ("progress: ProgressCallback | None = None", False),
    ("*, on_progress: Optional[ProgressCallback] = None", False),
    ("progress: bool = True", False),
    ("read_progress: ProgressCallback", False),
    ("progress: Callable[[int, str], None] | None = None", True),
    ("on_replicate: Callable[[int, int], None] | None = None", True),
    ("progress=None", True),
    ("*, read_progress: Callable[..., None]", True),
])
def test_the_check_catches_a_deviating_signature(signature, bad):
    source = f"{IMPORT} ProgressCallback\n\n\ndef job(x: int, {signature}) -> None:\n    pass\n"
    assert bool(progress_deviations(source, "job.py")) is bad
    method = f"{IMPORT} ProgressCallback\n\n\nclass Job:\n    def run(self, {signature}) -> None:\n        pass\n"
    assert bool(progress_deviations(method, "job.py")) is bad
    private = f"def _job({signature}) -> None:\n    pass\n"     # private helpers are free
    assert progress_deviations(private, "job.py") == []


def test_the_check_wants_the_shared_alias():
    own = "ProgressCallback = object\n"         # a module-level alias of its own is the definition (progress.py)
    assert progress_deviations(own + "def job(progress: ProgressCallback) -> None:\n    pass\n", "p.py") == []
    stray = "from elsewhere import ProgressCallback\n\n\ndef job(progress: ProgressCallback) -> None:\n    pass\n"
    assert progress_deviations(stray, "p.py") != []
