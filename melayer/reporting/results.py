"""Every kind of melayer result in one table, and :func:`read`, which loads any result JSON back into its object.

One :class:`Kind` per analysis says everything the rest of melayer needs to know about it: its file, its result
class, its title, its console summary, its PNG figures and its report sections. The CLI (:func:`write` after a
command ran), the HTML report and :func:`read` all take them from :data:`KINDS`; so a new analysis is its module
(the function and its :class:`~melayer.util.results.Result`), its rendering (summary, figures, sections) and
one entry here, plus the command that calls it; sweeps run every analysis whose entry names its function.

Functions are named by import path and imported on first use, so that the report (which reads the JSON only)
never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from melayer.util.errors import MelayerError
from melayer.util.results import Result, read_json, schema_kind


def _resolve(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Kind:
    """One kind of result: its name (the schema's ``melayer.<name>/N``), its file, its class and its rendering.

    ``summary(data)`` prints the console summary; each ``figures`` entry ``(draw, file)`` writes
    ``draw(data, path)`` (a PNG next to the JSON); ``sections(data, figures, **extra)`` builds the report's
    sections. All are ``"module:function"`` paths.

    An analysis of a loaded model also names its function, ``run``: ``run(lm, prompts, *, batch_size, progress,
    **options) -> Result``. That makes it a sweep command (``command: <name>`` with ``prompts``, ``batch_size``
    and ``options``: the function's keyword arguments whose type is a number, text, a flag or None), and
    ``metrics`` are the top-level numbers of its JSON that the sweep table lists, one row each.
    """

    name: str
    file: str
    result: str  # "module:Class"
    title: str = ""
    summary: str | None = None
    figures: tuple[tuple[str, str], ...] = ()
    sections: str | None = None  # None: an analysis gets a table of its top-level values; any other kind no section
    run: str | None = None  # "module:function" of an analysis of a loaded model (a sweep command)
    metrics: tuple[str, ...] = ("me_layer",)
    extra: str | None = None  # "module:function": (the JSON's path) -> more keyword arguments for ``sections``

    def result_class(self) -> type[Result]:
        return _resolve(self.result)

    def run_function(self) -> Any:
        """The analysis function (``run``), imported."""
        if self.run is None:
            raise MelayerError(f"{self.name} is not an analysis of a loaded model")
        return _resolve(self.run)

    def options(self) -> dict[str, tuple[type, ...]]:
        """The analysis function's settings a sweep may give (keyword arguments of plain JSON types), with the
        types each takes."""
        import inspect
        import typing

        out: dict[str, tuple[type, ...]] = {}
        for p in inspect.signature(self.run_function()).parameters.values():
            if p.kind is not p.KEYWORD_ONLY or p.name in _RUN_ARGS:
                continue
            ann = p.annotation  # text under ``from __future__ import annotations``, else the type itself
            names = ([t.strip() for t in ann.split("|")] if isinstance(ann, str)
                     else [getattr(t, "__name__", str(t)) for t in (typing.get_args(ann) or (ann,))])
            if all(t in _PLAIN for t in names):
                out[p.name] = tuple(_PLAIN[t] for t in names)
        return out

    def check_options(self, options: Any, where: str) -> dict[str, Any]:
        """``options`` if each is one of :meth:`options` with a value of its type; else one-line :class:`MelayerError`."""
        if not isinstance(options, dict):
            raise MelayerError(f"{where}: options must be a mapping of setting -> value")
        known = self.options()
        for key, value in options.items():
            if key not in known:
                raise MelayerError(f"{where}: {self.name} has no option {key!r}; it takes "
                                   f"{', '.join(sorted(known)) or 'none'}")
            types = known[key]
            if not (any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in types)
                    or (float in types and isinstance(value, int) and not isinstance(value, bool))):
                wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
                raise MelayerError(f"{where}: {self.name} option {key} must be {wanted} (got {value!r})")
        return dict(options)

    def print_summary(self, data: dict[str, Any]) -> None:
        if self.summary is not None:
            _resolve(self.summary)(data)

    def draw(self, data: dict[str, Any], folder: Path) -> list[Path]:
        """Write the figures into ``folder``; the paths written."""
        return [p for draw, name in self.figures if (p := _resolve(draw)(data, folder / name)) is not None]

    @property
    def in_report(self) -> bool:
        """Whether the HTML report has sections for this kind (its own, or an analysis's plain table)."""
        return self.sections is not None or self.run is not None

    def read_extra(self, path: Path) -> dict[str, Any]:
        """What ``sections`` takes besides the JSON, read from beside the file at ``path``."""
        return _resolve(self.extra)(path) if self.extra else {}

    def build_sections(self, data: dict[str, Any], figures: Any, **extra: Any) -> list[dict[str, Any]]:
        if self.sections:
            return _resolve(self.sections)(data, figures, **extra)
        if self.run:
            return _resolve(f"{_R}.blocks:plain_sections")(data, figures, title=self.title or self.name)
        return []


# the arguments a sweep cell gives every analysis itself, and the plain types an option may have
_RUN_ARGS = {"lm", "prompts", "batch_size", "progress"}
_PLAIN: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "None": type(None),
                           "NoneType": type(None)}
_R = "melayer.reporting"
# in report order
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("scan", "scan.json", "melayer.analysis.scan:ScanResult", "ME layer", f"{_R}.scan:print_scan",
         ((f"{_R}.scan:layer_magnitudes", "layer_magnitudes.png"), (f"{_R}.scan:token_surface", "massive_token_surface.png")),
         f"{_R}.scan:scan_sections", run="melayer.analysis.scan:scan"),
    Kind("weights", "weights.json", "melayer.analysis.weights:WeightsResult", "The ME layer read off the weights",
         f"{_R}.weights:print_weights", ((f"{_R}.weights:score_plot", "weights_scores.png"),),
         f"{_R}.weights:weights_sections"),
    Kind("explain", "explain.json", "melayer.interventions.explain:ExplainResult",
         "Why the ME layer: branches, neurons, norms, ablations", f"{_R}.explain:print_explain",
         ((f"{_R}.explain:explain_mechanism", "explain_mechanism.png"),
          (f"{_R}.explain:explain_norm_gains", "explain_norm_gains.png"),
          (f"{_R}.explain:explain_ablations", "explain_ablations.png")),
         f"{_R}.explain:explain_sections", run="melayer.interventions.explain:explain"),
    Kind("rigidity", "rigidity.json", "melayer.analysis.rigidity:RigidityResult", "Rigidity of the massive token",
         f"{_R}.rigidity:print_rigidity", ((f"{_R}.rigidity:rigidity_plot", "rigidity.png"),),
         f"{_R}.rigidity:rigidity_sections", run="melayer.analysis.rigidity:rigidity"),
    Kind("sinks", "sinks.json", "melayer.analysis.sinks:SinkResult", "Attention sinks",
         f"{_R}.sinks:print_sinks", ((f"{_R}.sinks:sinks_heatmap", "sinks_heatmap.png"),),
         f"{_R}.sinks:sinks_sections", run="melayer.analysis.sinks:sinks",
         metrics=("sink_rate", "first_sink_layer", "me_layer")),
    Kind("eval", "eval.json", "melayer.eval.runner:EvalResult", "Evaluation", f"{_R}.eval:print_eval", (),
         f"{_R}.eval:eval_sections"),
    Kind("compare", "compare.json", "melayer.eval.compare:CompareResult", "WeMask dose-response",
         f"{_R}.compare:print_compare",
         ((f"{_R}.compare:dose_response_plot", "dose_response.png"), (f"{_R}.compare:forest_plot", "forest.png")),
         f"{_R}.compare:compare_sections", extra=f"{_R}.compare:report_extra"),
    Kind("finetune", "finetune.json", "melayer.finetuning.train:FinetuneResult", "Fine-tuning", None, (),
         f"{_R}.finetune:finetune_sections", extra=f"{_R}.finetune:report_extra"),
    Kind("sweep", "sweep.json", "melayer.sweeps.runner:SweepResult", "Sweep"),
)}


def analyses() -> dict[str, Kind]:
    """The registered analyses of a loaded model (the kinds with a ``run`` function), in report order."""
    return {name: kind for name, kind in KINDS.items() if kind.run is not None}


def read(source: str | Path | dict[str, Any]) -> Result:
    """Load a result JSON written by any melayer command (or its parsed dict) back into its result object.

    >>> result = melayer.read("out/scan/scan.json")     # a ScanResult, equal to the one the scan returned
    >>> result.me_layer

    Args:
        source: a JSON file (``scan.json``, ``sinks.json``, ``eval.json``, ...), a directory holding exactly one
            of them, or a dict with a melayer ``"schema"``.

    Returns:
        The result object of the file's kind (:class:`~melayer.analysis.scan.ScanResult`, ...).

    Raises:
        MelayerError: not a melayer output, a kind or schema version this melayer does not read, or a file
            without the fields its result needs.
    """
    if isinstance(source, dict):
        kind, _ = schema_kind(source, "result")
        if kind not in KINDS:
            raise MelayerError(f"result: a {kind!r} output, which has no result class")
        cls = KINDS[kind].result_class()
        return cls.from_dict(cls.check(source))
    path = Path(source)
    if path.is_dir():
        found = [path / k.file for k in KINDS.values() if (path / k.file).is_file()]
        if len(found) != 1:
            names = ", ".join(k.file for k in KINDS.values())
            raise MelayerError(f"{path}: holds {len(found) or 'none'} of {names}; give the file")
        path = found[0]
    kind, _ = schema_kind(read_json(path), str(path))
    if kind not in KINDS:
        raise MelayerError(f"{path}: a {kind!r} output, which has no result class")
    return KINDS[kind].result_class().load(path)
