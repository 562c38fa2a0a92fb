"""mkdocs hooks for the documentation site (``make docs``): the parts of the pages that come from melayer itself.

- ``<!-- melayer-cli NAME -->`` (or ``NAME SUB`` for a group's command) becomes the usage line and option table of
  ``melayer NAME``, read from the command itself (typer's click command), so the command pages never drift from
  the CLI.
- ``<!-- melayer-ls WHAT -->`` becomes the table ``melayer ls WHAT`` prints (tasks, archs, methods), from the same
  registries.

A name melayer does not have is an error, which fails the strict build.
"""

from __future__ import annotations

import re

MARKER = re.compile(r"^<!-- melayer-cli ([^>]+?) -->$", re.M)
LS_MARKER = re.compile(r"^<!-- melayer-ls (\w+) -->$", re.M)


def _commands():
    import typer

    from melayer.cli import app

    return typer.main.get_command(app).commands


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def cli_markdown(name: str) -> str:
    """The usage line, description and options of ``melayer NAME`` (or ``melayer GROUP SUB``) as Markdown."""
    import click

    commands = _commands()
    cmd = None
    for word in name.split():
        if word not in commands:
            raise KeyError(f"docs: melayer has no command {name!r} (it has: {', '.join(sorted(commands))})")
        cmd = commands[word]
        commands = getattr(cmd, "commands", {})
    ctx = click.Context(cmd, info_name=f"melayer {name}")
    usage = " ".join(["melayer", name, *cmd.collect_usage_pieces(ctx)])
    usage = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), usage)
    rows = []
    for param in cmd.params:
        if getattr(param, "hidden", False):
            continue
        if param.param_type_name == "argument":
            record = (param.name.upper(), getattr(param, "help", None) or "")
        elif param.param_type_name == "option":
            record = param.get_help_record(ctx)
        else:
            record = None
        if record is None:
            continue
        flags, help_text = record
        # a | inside a code span is not a column break in Python-Markdown's tables (and a \| would show)
        rows.append(f"| `{flags.strip()}` | {_cell(help_text or '')} |")
    text = (cmd.help or "").strip()
    return "\n".join([f"```\n{usage}\n```", "", _cell(text), "", "| option | what it does |", "|---|---|", *rows, ""])


def ls_markdown(what: str) -> str:
    """What ``melayer ls WHAT`` prints, as a Markdown table: the same rows, from the same registries."""
    from melayer.cli.ls import _rows

    listings = _rows()
    if what not in listings:
        raise KeyError(f"docs: melayer ls has no listing {what!r} (it has: {', '.join(listings)})")
    rows = listings[what]()
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"`{row[keys[0]]}`", *(_cell(str(row[k])) for k in keys[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = MARKER.sub(lambda m: cli_markdown(m.group(1)), markdown)
    return LS_MARKER.sub(lambda m: ls_markdown(m.group(1)), markdown)


# --------------------------------------------------------------------------------------------------
# the API reference: melayer's docstrings cite names with Sphinx roles (:func:`melayer.scan`), which Markdown shows
# verbatim; griffe (mkdocstrings' reader) runs this extension and turns them into inline code


def _griffe_extension():
    import griffe

    role = re.compile(r":(?:func|class|mod|meth|attr|data|exc|obj):`~?([^`]+)`")

    class SphinxRoles(griffe.Extension):
        def on_instance(self, *, obj, **kwargs) -> None:
            if obj.docstring is not None:
                obj.docstring.value = role.sub(lambda m: f"`{m.group(1)}`", obj.docstring.value)

    return SphinxRoles


SphinxRoles = _griffe_extension()
