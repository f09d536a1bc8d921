"""Help that reads well in any terminal, 80 columns included.

Choice, stated once: every command's ``--help`` uses click's plain layout (option and value on the left, the
help wrapped to the terminal beside or below it), not Typer's Rich tables. Those tables split 80 columns
into seven and then cut long words with "…", and print ``<bool>`` beside every flag as if it took a value.
The plain layout never cuts text and shows a flag as just its name. What the tables gave that is worth
keeping stays: options are grouped under their ``rich_help_panel`` headings, the Rich markup in the help
texts (``[bold]...[/]``) is rendered as plain text, and a group lists each command's whole first paragraph
(click's own list cuts it at 45 characters with "...").

:func:`prepare_help` applies this to a command tree once; ``synthtrial.cli.common.OneLineErrors`` calls it
before parsing, so the console script and ``CliRunner`` alike get it. ``tests/test_help.py`` renders every
command's help at 80 columns.
"""

from __future__ import annotations

import types
from typing import Any

from rich.text import Text

#: Set on a command once :func:`prepare_help` has seen it (a tree is prepared once, even when run twice).
PREPARED = "synthtrial_plain_help"


def plain_text(markup: str | None) -> str | None:
    """Rich markup (``[bold]x[/]``) as the plain text a terminal shows; None stays None."""
    if markup is None:
        return None
    return Text.from_markup(markup, emoji=False).plain


def first_paragraph(text: str) -> str:
    """A help text's first paragraph on one line (what a group lists beside the command's name)."""
    paragraph = text.strip().split("\n\n")[0]
    return " ".join(paragraph.replace("\b", "").split())


def format_options_by_panel(self: Any, ctx: Any, formatter: Any) -> None:
    """Arguments, then options under their panel headings (``Options`` for those without), then a group's
    commands: click's plain definition lists, wrapped to the terminal's width."""
    sections: dict[str, list[tuple[str, str]]] = {"Arguments": [], "Options": []}
    for param in self.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        panel = "Arguments" if param.param_type_name == "argument" else \
            (getattr(param, "rich_help_panel", None) or "Options")
        sections.setdefault(panel, []).append(record)
    for name, records in sections.items():
        if records:
            with formatter.section(name):
                formatter.write_dl(records)
    if hasattr(self, "format_commands"):  # a group (Typer's vendored click or click's own: no isinstance)
        self.format_commands(ctx, formatter)


def prepare_help(command: Any) -> None:
    """Switch ``command`` and every command under it to the plain layout (see the module docstring)."""
    if getattr(command, PREPARED, False):
        return
    setattr(command, PREPARED, True)
    if hasattr(command, "rich_markup_mode"):
        command.rich_markup_mode = None
    command.help = plain_text(command.help)
    if command.short_help is None and command.help:
        command.short_help = first_paragraph(command.help)
    command.epilog = plain_text(command.epilog)
    for param in command.params:
        help_text: Any = getattr(param, "help", None)
        if isinstance(help_text, str):
            param.help = plain_text(help_text)
    command.format_options = types.MethodType(format_options_by_panel, command)
    if hasattr(command, "commands"):
        for sub in command.commands.values():
            prepare_help(sub)
