"""Frictions a new user met: the shipped protocols work by name from any directory (package data), and
``protocol design --design pairs`` draws each pair's order unless --fixed-order, while the presets (and so the
shipped protocols) stay fixed-order, byte for byte."""

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.trial.protocol import SHIPPED_PROTOCOLS, read_protocol, resolve_protocol, shipped_protocols
from synthtrial.trial.simulate import design_with_overrides
from synthtrial.util.errors import ProtocolError

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "synthtrial", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_package_data_holds_the_repositorys_protocols_byte_for_byte():
    repo = sorted(p.name for p in (ROOT / "protocols").iterdir() if p.suffix in (".csv", ".json"))
    assert repo == sorted(p.name for p in SHIPPED_PROTOCOLS.iterdir() if p.suffix in (".csv", ".json"))
    match, mismatch, errors = filecmp.cmpfiles(ROOT / "protocols", SHIPPED_PROTOCOLS, repo, shallow=False)
    assert not mismatch and not errors and len(match) == len(repo)
    assert {"trial", "quick", "views"} <= set(shipped_protocols())


def test_a_name_resolves_to_the_shipped_protocol_only_where_no_such_file_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("trial", "trial.csv", "protocols/trial.csv"):
        assert resolve_protocol(name) == SHIPPED_PROTOCOLS / "trial.csv"
    for name in ("nothing.csv", "elsewhere/trial.csv", "trial.txt", str(tmp_path / "protocols" / "trial.csv")):
        assert resolve_protocol(name) == Path(name)
    (tmp_path / "protocols").mkdir()
    (tmp_path / "protocols" / "trial.csv").write_text("patient_id,day,treatment\nA,0,Control\n")
    assert resolve_protocol("protocols/trial.csv") == Path("protocols/trial.csv")  # the user's own file wins
    assert read_protocol("protocols/trial.csv")["patient_id"].tolist() == ["A"]
    with pytest.raises(ProtocolError, match="no such file .*shipped protocols.*quick.*trial"):
        read_protocol("nothing.csv")


def test_readme_commands_work_outside_the_clone(tmp_path):
    """``protocol check`` and ``generate`` on ``protocols/<name>.csv`` from a folder that has no protocols/."""
    proc = cli("protocol", "check", "protocols/trial.csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "10" in proc.stdout and "OK" in proc.stdout
    proc = cli("protocol", "check", "quick", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["patients"] == 3
    proc = cli("generate", "protocols/quick.csv", "--size", "128", "-q", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "quick"  # the default run directory, runs/<protocol name>, in the user's folder
    manifest = pd.read_parquet(run / "manifest.parquet")
    assert len(manifest) == 48
    # the shipped truth came along: the run's truth is the protocol's, not a fresh simulation
    assert json.loads((run / "truth.json").read_text()) == json.loads((SHIPPED_PROTOCOLS / "quick.truth.json")
                                                                      .read_text())
    proc = cli("generate", "protocols/nothing.csv", cwd=tmp_path)
    assert proc.returncode == 2 and "no such file" in proc.stderr and proc.stderr.count("\n") == 1


def _orders(protocol: pd.DataFrame) -> set[tuple[str, ...]]:
    """Each patient's sequence of treatments by period."""
    return {tuple(dict.fromkeys(zip(g["block"], g["treatment"]))) for _, g in protocol.groupby("patient_id")}


def test_pairs_design_randomises_unless_fixed_order(tmp_path):
    design, _ = design_with_overrides("quick", {"design": "pairs"})
    assert design.randomize is True
    assert design_with_overrides("quick", {"design": "pairs", "randomize": False})[0].randomize is False
    assert design_with_overrides("quick")[0].randomize is False  # a preset as it is keeps its order
    assert design_with_overrides("quick", {"design": "abab"})[0].randomize is False
    common = ["protocol", "design", "--preset", "quick", "--design", "pairs", "--patients", "12", "--seed", "1"]
    drawn = runner.invoke(app, [*common, "--out", str(tmp_path / "drawn.csv")])
    fixed = runner.invoke(app, [*common, "--fixed-order", "--out", str(tmp_path / "fixed.csv")])
    assert drawn.exit_code == 0 and fixed.exit_code == 0, drawn.output + fixed.output
    assert json.loads((tmp_path / "drawn.truth.json").read_text())["design"]["randomize"] is True
    assert json.loads((tmp_path / "fixed.truth.json").read_text())["design"]["randomize"] is False
    assert len(_orders(read_protocol(tmp_path / "drawn.csv"))) > 1   # patients got different orders
    assert len(_orders(read_protocol(tmp_path / "fixed.csv"))) == 1


@pytest.mark.parametrize("preset, name", [("quick", "quick"), ("anchor", "trial")])
def test_presets_still_write_the_shipped_protocols_byte_for_byte(tmp_path, preset, name):
    result = runner.invoke(app, ["protocol", "design", "--preset", preset, "--seed", "0", "--out",
                                 str(tmp_path / f"{name}.csv")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / f"{name}.csv").read_bytes() == (ROOT / "protocols" / f"{name}.csv").read_bytes()
    truth = json.loads((tmp_path / f"{name}.truth.json").read_text())
    shipped = json.loads((ROOT / "protocols" / f"{name}.truth.json").read_text())
    assert truth["design"] == shipped["design"] and truth["patients"] == shipped["patients"]
