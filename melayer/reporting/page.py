"""One self-contained HTML report from the JSON outputs of melayer's commands.

``html(dirs, output=...)`` finds ``scan.json``, ``weights.json``, ``explain.json``, ``rigidity.json``, ``sinks.json``,
``eval.json``, ``compare.json`` and ``finetune.json`` (+ ``train_log.jsonl``) in the given directories (and
up to two levels below them), checks each one's ``"schema"``, builds one section per input and renders them
with jinja2 into a single page: figures inline as SVG, CSS inline, the raw JSON embedded, no external asset
and no network access. With ``interactive=True`` plotly's bundled JavaScript is inlined too.
"""

from __future__ import annotations

import json
import platform
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from melayer.reporting.results import KINDS as RESULT_KINDS
from melayer.util.errors import MelayerError

KINDS = tuple(k.name for k in RESULT_KINDS.values() if k.in_report)
FILES = {RESULT_KINDS[k].file: k for k in KINDS}
SCHEMA_VERSION = "1"
SCHEMA_VERSIONS = {"weights": "2"}  # kinds whose schema moved on (the others read /1)
MAX_DEPTH = 2  # DIR, DIR/*, DIR/*/*
_SKIP_DIRS = {"checkpoints", "__pycache__", "node_modules"}


@dataclass
class Input:
    """One melayer output: its kind, where it came from, its data (and a fine-tuning run's log)."""

    kind: str
    source: str
    data: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# finding and checking inputs


def _schema_kind(data: Any, where: str, expected: str | None = None) -> str:
    if not isinstance(data, dict) or not isinstance(data.get("schema"), str):
        raise MelayerError(f"{where}: not a melayer output (no \"schema\" key)")
    schema = data["schema"]
    name, _, version = schema.partition("/")
    kind = name.removeprefix("melayer.")
    if not name.startswith("melayer.") or kind not in KINDS:
        raise MelayerError(f"{where}: not a melayer output the report knows (schema {schema!r})")
    want = SCHEMA_VERSIONS.get(kind, SCHEMA_VERSION)
    if version != want:
        raise MelayerError(f"{where}: schema {schema!r} has a version this melayer does not read (expected /{want})")
    if expected is not None and kind != expected:
        raise MelayerError(f"{where}: holds a {kind!r} result (schema {schema!r}), not {expected!r}")
    return kind


def read_input(path: Path) -> Input:
    """Read and check one JSON output (one-line MelayerError when corrupt or foreign)."""
    from melayer.util.io import parse_json

    try:
        text = path.read_bytes()
    except OSError as exc:
        raise MelayerError(f"{path}: cannot read ({exc.strerror or exc})") from None
    data = parse_json(text, path)
    kind = _schema_kind(data, str(path), FILES.get(path.name))
    return Input(kind, str(path), data, RESULT_KINDS[kind].read_extra(path))


def _walk(root: Path, depth: int) -> list[Path]:
    found = [root / name for name in FILES if (root / name).is_file()]
    if depth >= MAX_DEPTH or (root / "compare.json").is_file():  # a compare dir's rate_*/eval.json belong to it
        return found
    try:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in _SKIP_DIRS)
    except OSError as exc:
        raise MelayerError(f"{root}: cannot list ({exc.strerror})") from None
    for sub in subdirs:
        found += _walk(sub, depth + 1)
    return found


def find_inputs(paths: list[str | Path]) -> list[Input]:
    """Every melayer output in ``paths`` (directories searched two levels deep, or JSON files named directly)."""
    if not paths:
        raise MelayerError("give at least one directory with melayer outputs")
    inputs: list[Input] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_file():
            files = [path]
        elif path.is_dir():
            files = _walk(path, 0)
            if not files:
                raise MelayerError(f"{path}: no melayer outputs found ({', '.join(FILES)} or one or two levels below)")
        else:
            raise MelayerError(f"{path}: no such file or directory")
        for f in files:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                inputs.append(read_input(f))
    inputs.sort(key=lambda i: KINDS.index(i.kind))  # stable: the order given within a kind
    return inputs


def as_input(obj: Any) -> Input:
    """A result object (anything with ``to_dict()``) or a dict with a melayer schema."""
    data = obj.to_dict() if hasattr(obj, "to_dict") else obj
    kind = _schema_kind(data, type(obj).__name__)
    return Input(kind, f"{type(obj).__name__} (in memory)", data)


# --------------------------------------------------------------------------------------------------
# building


def build_sections(inputs: list[Input], interactive: bool = False, prefix: str = "") -> list[dict[str, Any]]:
    """All sections of the page, in the order scan, explain, rigidity, sinks, eval, compare, finetune.
    ``prefix`` starts every element id (figures and sections), for fragments that share a notebook page."""
    from melayer.reporting.blocks import Figures

    figs = Figures(interactive, prefix=f"{prefix}fig")
    models = {i.data.get("model") for i in inputs}
    out: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    for inp in inputs:
        try:
            secs = RESULT_KINDS[inp.kind].build_sections(inp.data, figs, **inp.extra)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as exc:
            what = f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise MelayerError(f"{inp.source}: malformed {inp.kind} output ({what})") from None
        for s in secs:
            n = counts[inp.kind] = counts.get(inp.kind, 0) + 1
            s["id"] = f"{prefix}{inp.kind}-{n}"
            s["kind"] = inp.kind
            s["source"] = inp.source
            if len(models) > 1 and inp.data.get("model"):
                s["title"] = f"{s['title']} - {inp.data['model']}"
        out += secs
    return out


def versions(inputs: list[Input], interactive: bool = False) -> list[tuple[str, str]]:
    """Versions of what rendered the page, and those the inputs recorded."""
    from importlib.metadata import PackageNotFoundError, version

    rows = [("python", platform.python_version())]
    for pkg in ("melayer", "torch", "transformers", "numpy", "matplotlib", "jinja2") + (("plotly",) if interactive else ()):
        try:
            rows.append((pkg, version(pkg)))
        except PackageNotFoundError:
            pass
    for inp in inputs:
        recorded = inp.data.get("versions") or {}
        if isinstance(inp.data.get("settings"), dict) and inp.data["settings"].get("torch"):
            recorded = {"torch": inp.data["settings"]["torch"], **recorded}
        for k, v in recorded.items():
            rows.append((f"{k} (recorded in {Path(inp.source).name})", str(v)))
    return rows


def _flat(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _flat(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, list) and (len(d) > 12 or any(isinstance(v, (dict, list)) for v in d)):
        out.append((prefix, f"[{len(d)} items]"))
    else:
        out.append((prefix, json.dumps(d) if not isinstance(d, str) else d))
    return out


_SETTING_KEYS = ("model", "arch", "dtype", "num_layers", "hidden_size", "threshold", "settings", "select", "gamma",
                 "rates", "layers", "me_layer_source", "method", "config", "data", "elapsed_s", "runtime_s")


def settings_rows(inp: Input) -> list[tuple[str, str]]:
    return [row for k in _SETTING_KEYS if k in inp.data for row in _flat(inp.data[k], k)]


def raw_json(data: dict[str, Any]) -> str:
    """JSON safe inside ``<script type="application/json">`` (no ``</script>`` can end it early)."""
    return json.dumps(data, indent=None, allow_nan=False).replace("<", "\\u003c").replace(">", "\\u003e").replace(
        "&", "\\u0026")


def _env():
    try:
        import jinja2
    except ImportError:
        raise MelayerError("the HTML report needs jinja2: pip install 'melayer[report]'") from None
    from markupsafe import Markup

    from melayer.util.console import plain

    def finalize(value: Any) -> Any:  # every plain string the page prints (a --title too): controls shown
        return plain(value) if isinstance(value, str) and not isinstance(value, Markup) else value

    return jinja2.Environment(loader=jinja2.PackageLoader("melayer.reporting", "templates"),
                              autoescape=jinja2.select_autoescape(default=True, default_for_string=True),
                              trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined,
                              finalize=finalize)


def render(inputs: list[Input], interactive: bool = False, title: str | None = None, fragment: bool = False) -> str:
    """The page (or, with ``fragment``, one ``<div>`` for a notebook) for ``inputs``."""
    from importlib.resources import files

    from melayer.util.console import map_strings, plain
    from melayer.util.io import _clean

    raw = [i.data for i in inputs]
    # names are shown, never obeyed: terminal and bidirectional controls (an RTL override would reverse the
    # report's own text after it) become visible \uXXXX escapes everywhere but in the embedded raw JSON
    inputs = [Input(i.kind, plain(i.source), map_strings(i.data, plain, keys=True), map_strings(i.extra, plain, keys=True))
              for i in inputs]
    sections = build_sections(inputs, interactive, prefix=f"m{uuid.uuid4().hex[:8]}-" if fragment else "")
    models = sorted({str(i.data.get("model")) for i in inputs if i.data.get("model")})
    css = files("melayer.reporting").joinpath("templates/report.css").read_text()
    js = None
    if interactive and any(b.get("plotly") for s in sections for b in s["blocks"] if b["kind"] == "figure"):
        from melayer.reporting.interactive import plotly_js

        js = plotly_js()
    ctx = {
        "title": title or "melayer report" + (f": {', '.join(models)}" if models else ""),
        "models": models, "sections": sections, "css": css, "plotly_js": js, "fragment": fragment,
        "inputs": [{"kind": i.kind, "source": i.source, "schema": i.data["schema"],
                    "settings": settings_rows(i), "raw": raw_json(_clean(raw[n])), "n": n}
                   for n, i in enumerate(inputs)],
        "versions": versions(inputs, interactive),
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "melayer_version": dict(versions(inputs)).get("melayer", "?"),
    }
    return _env().get_template("report.html.j2").render(**ctx)


def check_output(output: str | Path) -> Path:
    """Refuse an output path that cannot be written, before any work."""
    out = Path(output).expanduser()
    if out.is_dir():
        raise MelayerError(f"-o {out} is a directory; give a file name such as {out / 'report.html'}")
    parent = out.parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise MelayerError(f"-o {out}: {probe} is not a directory")
    import os

    if not os.access(probe, os.W_OK | os.X_OK):
        raise MelayerError(f"-o {out}: {probe} is not writable")
    return out


def html(*sources: Any, output: str | Path | None = None, interactive: bool = False, title: str | None = None) -> str:
    """One self-contained HTML page (no external asset) from melayer outputs (``melayer report``;
    ``melayer.report``).

    Args:
        *sources: directories (searched two levels deep), JSON files written by melayer, result objects, or
            dicts with a melayer schema.
        output: also write the page there, atomically (a reader never sees half a file).
        interactive: also inline plotly's bundled JavaScript (~5 MB) for hover and zoom.
        title: the page title (default: ``melayer report: <models>``).

    Returns:
        The HTML text.

    Raises:
        MelayerError: nothing to report, an unreadable input, or an output that cannot be written.
    """
    out = check_output(output) if output is not None else None
    paths = [s for s in sources if isinstance(s, (str, Path))]
    inputs = find_inputs(paths) if paths else []
    inputs += [as_input(s) for s in sources if not isinstance(s, (str, Path))]
    if not inputs:
        raise MelayerError("nothing to report: give at least one directory with melayer outputs")
    inputs.sort(key=lambda i: KINDS.index(i.kind))
    text = render(inputs, interactive=interactive, title=title)
    if out is not None:
        from melayer.util.io import write_atomic

        try:
            write_atomic(out, lambda p: p.write_text(text, encoding="utf-8"))
        except OSError as exc:
            raise MelayerError(f"-o {out}: cannot write ({exc.strerror or exc})") from None
    return text


def repr_html(obj: Any) -> str:
    """The sections of one result object as a notebook fragment (for ``_repr_html_``)."""
    return render([as_input(obj)], fragment=True)
