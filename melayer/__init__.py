"""melayer: find where massive activations are born (the ME layer), explain them, measure sinks, fix them.

Every command of the ``melayer`` CLI has a function of the same name here, taking the same settings:

>>> import melayer
>>> lm = melayer.load("smollm2-135m")
>>> result = melayer.scan(lm)                     # melayer scan
>>> result.me_layer
>>> with melayer.wemask(lm, 0.05):                # WeMask on every forward inside the block
...     melayer.evaluate(lm, "arc_easy", limit=50)

The verbs are :func:`load`, :func:`from_model`, :func:`scan`, :func:`explain`, :func:`rigidity`, :func:`sinks`,
:func:`weights`, :func:`evaluate`, :func:`compare`, :func:`finetune`, :func:`sweep`, :func:`report` and
:func:`wemask`; :func:`read` loads any result JSON back into its result object, and :func:`trace` returns the
activations at melayer's named capture sites (TransformerLens hook names accepted).

Names are resolved on first use (the functions import torch and transformers), so that ``import melayer`` and the
commands that never touch a model (``melayer report``, ``--help``) start without them. The subpackages that hold
the verbs' machinery are named apart from the verbs (``melayer.sweeps``, ``melayer.reporting``,
``melayer.finetuning``, ``melayer.eval``), so ``melayer.sweep`` is always the function, whatever has been
imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from melayer.util import display as _display
from melayer.util import tracing as _tracing
from melayer.util.errors import Interrupted, MelayerError, NumericOverflow, UnsupportedArchitecture
from melayer.util.version import VERSION

if TYPE_CHECKING:
    from melayer.analysis.criterion import Criterion
    from melayer.analysis.me_layer import find_me_layer
    from melayer.analysis.rigidity import RigidityResult, rigidity
    from melayer.analysis.scan import ScanResult, scan
    from melayer.analysis.sinks import SinkResult, sinks
    from melayer.analysis.weights import WeightsResult, weights
    from melayer.capture.encoding import encode
    from melayer.capture.trace import Trace, trace
    from melayer.eval.compare import CompareResult, compare
    from melayer.eval.runner import EvalResult
    from melayer.eval.runner import run as evaluate
    from melayer.finetuning.config import FinetuneConfig
    from melayer.finetuning.train import FinetuneResult, finetune
    from melayer.interventions.adapter import load
    from melayer.interventions.explain import ExplainResult, explain
    from melayer.interventions.wemask import WeMask, wemask
    from melayer.models.archmap import ARCHITECTURES, ArchSpec
    from melayer.models.loading import LM, from_model
    from melayer.reporting.page import html as report
    from melayer.reporting.results import read
    from melayer.sweeps.runner import SweepResult
    from melayer.sweeps.runner import run as sweep

# public name -> (module, attribute); imported on first use
_LAZY: dict[str, tuple[str, str]] = {
    # verbs, one per command
    "load": ("melayer.interventions.adapter", "load"),
    "from_model": ("melayer.models.loading", "from_model"),
    "scan": ("melayer.analysis.scan", "scan"),
    "explain": ("melayer.interventions.explain", "explain"),
    "rigidity": ("melayer.analysis.rigidity", "rigidity"),
    "sinks": ("melayer.analysis.sinks", "sinks"),
    "weights": ("melayer.analysis.weights", "weights"),
    "wemask": ("melayer.interventions.wemask", "wemask"),
    "evaluate": ("melayer.eval.runner", "run"),
    "compare": ("melayer.eval.compare", "compare"),
    "finetune": ("melayer.finetuning.train", "finetune"),
    "sweep": ("melayer.sweeps.runner", "run"),
    "report": ("melayer.reporting.page", "html"),
    "read": ("melayer.reporting.results", "read"),
    "trace": ("melayer.capture.trace", "trace"),
    # results and the types the verbs take
    "ScanResult": ("melayer.analysis.scan", "ScanResult"),
    "ExplainResult": ("melayer.interventions.explain", "ExplainResult"),
    "RigidityResult": ("melayer.analysis.rigidity", "RigidityResult"),
    "SinkResult": ("melayer.analysis.sinks", "SinkResult"),
    "WeightsResult": ("melayer.analysis.weights", "WeightsResult"),
    "EvalResult": ("melayer.eval.runner", "EvalResult"),
    "CompareResult": ("melayer.eval.compare", "CompareResult"),
    "FinetuneResult": ("melayer.finetuning.train", "FinetuneResult"),
    "FinetuneConfig": ("melayer.finetuning.config", "FinetuneConfig"),
    "SweepResult": ("melayer.sweeps.runner", "SweepResult"),
    "LM": ("melayer.models.loading", "LM"),
    "Trace": ("melayer.capture.trace", "Trace"),
    "WeMask": ("melayer.interventions.wemask", "WeMask"),
    "Criterion": ("melayer.analysis.criterion", "Criterion"),
    "ArchSpec": ("melayer.models.archmap", "ArchSpec"),
    "ARCHITECTURES": ("melayer.models.archmap", "ARCHITECTURES"),
    # lower-level helpers
    "find_me_layer": ("melayer.analysis.me_layer", "find_me_layer"),
    "encode": ("melayer.capture.encoding", "encode"),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})  # the public names, not the helpers this module imports


__version__ = VERSION


def _repr_html(result: object) -> str:
    from melayer.reporting.page import repr_html

    return repr_html(result)


_display.set_renderer(_repr_html)  # results display as the HTML report's sections in a notebook


def _trace(lm: Any, *args: Any, **options: Any) -> Any:
    from melayer.capture.trace import trace

    return trace(lm, *args, **options)


_tracing.set_tracer(_trace)  # LM.trace (the models layer cannot import capture) is melayer.trace

__all__ = ["ARCHITECTURES", "LM", "ArchSpec", "CompareResult", "Criterion", "EvalResult", "ExplainResult",
           "FinetuneConfig", "FinetuneResult", "Interrupted", "MelayerError", "NumericOverflow", "RigidityResult",
           "ScanResult", "SinkResult", "SweepResult", "Trace", "UnsupportedArchitecture", "WeMask", "WeightsResult",
           "compare", "encode", "evaluate", "explain", "find_me_layer", "finetune", "from_model", "load", "read",
           "report", "rigidity", "scan", "sinks", "sweep", "trace", "weights",
           "wemask"]
