"""The quickstart notebook runs from top to bottom and shows what it promises: generate, grade, analyze and
export through the top-level API, naming the valid (inferential) tests apart from the descriptive ones."""

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_executes(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {})]
    assert len(images) >= 3  # the contact sheet, the counter against the truth, the trajectories
    work = tmp_path / "runs" / "quickstart"
    assert (work / "run" / "analysis" / "report.html").is_file()
    assert (work / "run" / "grades.parquet").is_file()  # graded
    coco = json.loads((work / "coco.json").read_text())  # exported
    assert coco["images"] and coco["annotations"]
    # the roles table, as executed: the valid tests are inferential, the anchors' tests descriptive
    roles = next(o["data"]["text/plain"] for o in outputs
                 if "welch" in o.get("data", {}).get("text/plain", "") and "role" in o["data"]["text/plain"])
    role_of = {line.split()[1]: line.split()[-1] for line in roles.splitlines()[1:] if len(line.split()) >= 4}
    assert role_of["period"] == "inferential" and role_of["lmm"] == "inferential"
    assert all(role_of[m] == "descriptive" for m in ("welch", "permutation", "gls_ar1", "hac", "lmm_cr1"))
    text = " ".join(cell.source for cell in nb.cells)
    for step in ("synthtrial.design(", "synthtrial.generate(", "synthtrial.grade(", "synthtrial.analyze(",
                 "export_run(", "synthtrial.power("):
        assert step in text


def test_quickstart_describes_the_tests_as_the_readme_does():
    """Welch, permutation and GLS-AR(1) with a step are descriptive; the per-patient tests named valid are the
    period-level analysis, the randomisation test and GLS-AR(1) with exposure kinetics."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    prose = " ".join(" ".join(cell.source.split()) for cell in nb.cells if cell.cell_type == "markdown")
    inferential, descriptive = prose.split("**Inferential**")[1].split("**Descriptive**")
    for name in ("period-level analysis", "randomisation test", "exposure kinetics", "CR2"):
        assert name in inferential
    for name in ("Welch", "permutation", "step treatment", "Newey-West"):
        assert name in descriptive.split("**Not available**")[0] and name not in inferential
