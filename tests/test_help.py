"""Every command's --help at 80 columns: nothing cut, no ``<bool>`` beside a flag, every default shown."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from synthtrial.cli import app
from synthtrial.cli.helpformat import prepare_help

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _commands():
    """(path, command) for the root and every command and group under it."""
    root = typer.main.get_command(app)
    prepare_help(root)  # as the command line does before it parses (plain text, panels, whole summaries)
    todo = [([], root)]
    while todo:
        path, command = todo.pop()
        yield path, command
        todo += [(path + [name], sub) for name, sub in getattr(command, "commands", {}).items()]


COMMANDS = sorted(_commands(), key=lambda item: item[0])


def _flat(text: str) -> str:
    """One line of words; a word wrapped at its hyphen (``stable-`` / ``diffusion``) joined again."""
    return re.sub(r"-\s+", "-", " ".join(text.split()))


def test_the_walk_finds_every_command():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"generate", "export", "protocol design", "power", "analyze", "graders train detector"} <= names
    assert len(names) > 25


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "synthtrial")
def test_help_renders_at_80_columns(path):
    command = dict((tuple(p), c) for p, c in COMMANDS)[tuple(path)]
    result = runner.invoke(app, path + ["--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    text = result.output
    assert "…" not in text and "<bool>" not in text
    assert "[bold]" not in text and "[/]" not in text and "[italic]" not in text  # markup rendered
    assert max(len(line) for line in text.splitlines()) <= 80, max(text.splitlines(), key=len)
    flat = _flat(text)
    ctx = command.make_context(path[-1] if path else "synthtrial", [], resilient_parsing=True)
    for param in command.params:
        record = param.get_help_record(ctx)
        if record is None:
            continue
        assert _flat(record[0]) in flat  # every option and argument is listed
        flag_off = getattr(param, "is_flag", False) and not param.secondary_opts and not param.default
        if param.param_type_name == "option" and param.default is not None and not flag_off \
                and param.name != "help" and param.show_default is not False:
            assert "[default: " in record[1], (path, param.name)  # a default is shown beside the option
            assert _flat(record[1]) in flat
    for name, sub in getattr(command, "commands", {}).items():  # a group lists each command's whole summary
        assert name in flat and _flat(sub.short_help or "") in flat
        assert not (sub.short_help or "").endswith("...")


def test_flags_show_no_value_and_panels_stay():
    text = runner.invoke(app, ["generate", "--help"], terminal_width=80).output
    assert "  --quiet, -q " in text or "  -q, --quiet " in text  # a flag is its name alone
    assert "Diffusion backends (GPU recommended):" in text


def test_protocol_design_help_states_the_presets_defaults_at_COLUMNS_80(tmp_path):
    """The console as a user runs it (COLUMNS=80, a pipe): each schedule and model option says its default comes
    from the preset and gives each preset's value; the help says which presets are fixed-order."""
    env = {**os.environ, "COLUMNS": "80", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "synthtrial", "protocol", "design", "--help"], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines()) <= 80
    flat = _flat(proc.stdout)
    assert "…" not in flat and "<bool>" not in flat
    assert "--patients <int range> Number of patients. [default: (from --preset: anchor 10; quick 3)" in flat
    assert "--effect-sd <float> SD of each patient's own effect around it (0-3). [default: (from --preset: " \
           "anchor 0.2; quick 0.1)]" in flat
    assert "[default: (random with --design pairs; else from --preset: anchor fixed; quick fixed)]" in flat
    assert "Both presets keep a fixed order of periods" in flat
