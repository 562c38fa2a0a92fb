"""mkdocs hooks for the documentation site (``make docs``).

A line ``<!-- melayer-cli NAME -->`` in a page becomes the usage line and option table of ``melayer NAME``, read
from the command itself (typer's click command), so the command pages never drift from the CLI. A name the CLI
does not have is an error, which fails the strict build.
"""

from __future__ import annotations

import re

MARKER = re.compile(r"^<!-- melayer-cli (\S+) -->$", re.M)


def _commands():
    import typer

    from melayer.cli import app

    return typer.main.get_command(app).commands


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def cli_markdown(name: str) -> str:
    """The usage line, description and options of ``melayer NAME`` as Markdown."""
    import click

    commands = _commands()
    if name not in commands:
        raise KeyError(f"docs: melayer has no command {name!r} (it has: {', '.join(sorted(commands))})")
    cmd = commands[name]
    ctx = click.Context(cmd, info_name=f"melayer {name}")
    usage = " ".join(["melayer", name, *cmd.collect_usage_pieces(ctx)])
    rows = []
    for param in cmd.params:
        record = param.get_help_record(ctx) if param.param_type_name == "option" else None
        if param.param_type_name == "argument":
            record = (param.make_metavar(ctx).upper() if hasattr(param, "make_metavar") else param.name.upper(),
                      getattr(param, "help", None) or "")
        if record is None or getattr(param, "hidden", False):
            continue
        flags, help_text = record
        rows.append(f"| `{_cell(flags)}` | {_cell(help_text or '')} |")
    text = (cmd.help or "").strip()
    return "\n".join([f"```\n{usage}\n```", "", _cell(text), "", "| option | what it does |", "|---|---|", *rows, ""])




ARCH_MARKER = "<!-- melayer-architectures -->"


def architectures_markdown() -> str:
    """One row per mapped ``model_type``: its layout and the roles the analyses use (from the architecture map)."""
    from melayer.models.archmap import ARCHITECTURES

    rows = ["| `model_type` | layout | FFN | norms around attention / FFN | notes |", "|---|---|---|---|---|"]
    for model_type, spec in ARCHITECTURES.items():
        ffn = f"fused `{spec.gate_up}`" if spec.gate_up else " / ".join(
            f"`{p}`" for p in (spec.gate, spec.up) if p) or "-"
        ffn += f", down `{spec.down}`"
        norms = ", ".join(f"{role.replace('_', '-')}" for role in
                          ("pre_attn_norm", "post_attn_norm", "pre_ffn_norm", "post_ffn_norm") if getattr(spec, role))
        rows.append(f"| `{model_type}` | `{spec.name}` | {ffn} | {norms} ({spec.norm_kind}) | {_cell(spec.notes)} |")
    return "\n".join(rows) + "\n"


TASKS_MARKER = "<!-- melayer-tasks -->"


def tasks_markdown() -> str:
    """One row per registered evaluation task (the task registry's own description of each)."""
    from melayer.eval.tasks import REGISTRY

    rows = ["| task | kind | what it is | metrics | options |", "|---|---|---|---|---|"]
    for spec in REGISTRY.values():
        d = spec.describe()
        options = ", ".join(f"`--{o.replace('_', '-')}`" for o in d["options"]) or "-"
        rows.append(f"| `{d['name']}` | {d['family']} | {_cell(d['description'])} | "
                    f"{', '.join(f'`{m}`' for m in d['metrics'])} | {options} |")
    return "\n".join(rows) + "\n"


GENERATED = {ARCH_MARKER: architectures_markdown, TASKS_MARKER: tasks_markdown}


def on_page_markdown(markdown: str, page, config, files) -> str:
    markdown = MARKER.sub(lambda m: cli_markdown(m.group(1)), markdown)
    for marker, render in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown


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
