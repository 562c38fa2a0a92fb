"""melayer: find where massive activations are born (the ME layer), explain them, measure sinks, fix them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from melayer.util import display as _display
from melayer.util.errors import MelayerError

if TYPE_CHECKING:
    from melayer.analysis import weights  # melayer.weights.candidates(...): data-free ME-layer candidates
    from melayer.analysis.criterion import Criterion
    from melayer.analysis.me_layer import find_me_layer
    from melayer.analysis.scan import ScanResult, scan
    from melayer.capture.encoding import encode
    from melayer.interventions.wemask import WeMask, WeMaskSpec, wemask
    from melayer.models.archmap import ARCHITECTURES, ArchSpec
    from melayer.models.loading import LM, from_model

# the public names import torch and transformers: they load on first use, so that commands which never touch a
# model (``melayer report``, ``--help``) start without them
_LAZY = {"weights": "melayer.analysis.weights", "Criterion": "melayer.analysis.criterion",
         "find_me_layer": "melayer.analysis.me_layer", "ScanResult": "melayer.analysis.scan",
         "scan": "melayer.analysis.scan", "encode": "melayer.capture.encoding", "WeMask": "melayer.interventions.wemask",
         "WeMaskSpec": "melayer.interventions.wemask", "wemask": "melayer.interventions.wemask",
         "ARCHITECTURES": "melayer.models.archmap", "ArchSpec": "melayer.models.archmap",
         "LM": "melayer.models.loading", "from_model": "melayer.models.loading"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name])
    value = module if name == "weights" else getattr(module, name)
    globals()[name] = value
    return value


__version__ = "0.1.0"


def load(spec: str | None = None, *, adapter: str | None = None, adapter_mask: bool = True, **kwargs) -> LM:
    """Load a causal LM (see :func:`melayer.models.loading.load`). ``adapter=DIR``: a ``melayer finetune`` output
    directory, merged into the model; its saved WeMask is re-applied (``lm.adapter_wemask``) unless
    ``adapter_mask=False``. An adapter trained on another base model is refused."""
    from melayer.models.loading import load as _load_base

    lm = _load_base(spec, **kwargs)
    if adapter is not None:
        from melayer.finetune.adapter import attach_adapter

        lm.adapter_wemask = attach_adapter(lm, adapter, mask=adapter_mask)
    return lm


def _repr_html(result: object) -> str:
    from melayer.report.page import repr_html

    return repr_html(result)


_display.set_renderer(_repr_html)  # results display as the HTML report's sections in a notebook

__all__ = ["ARCHITECTURES", "ArchSpec", "Criterion", "LM", "MelayerError", "ScanResult", "WeMask", "WeMaskSpec",
           "encode", "find_me_layer", "from_model", "load", "scan", "weights", "wemask"]
