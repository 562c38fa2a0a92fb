"""melayer: find where massive activations are born (the ME layer), explain them, measure sinks, fix them."""

from melayer.analysis import weights  # melayer.weights.candidates(...): data-free ME-layer candidates
from melayer.analysis.criterion import Criterion
from melayer.analysis.me_layer import find_me_layer
from melayer.analysis.scan import ScanResult, scan
from melayer.capture.encoding import encode
from melayer.interventions.wemask import WeMask, WeMaskSpec, wemask
from melayer.models.archmap import ARCHITECTURES, ArchSpec
from melayer.models.loading import LM, from_model, load
from melayer.util.errors import MelayerError

__version__ = "0.1.0"
__all__ = ["ARCHITECTURES", "ArchSpec", "Criterion", "LM", "MelayerError", "ScanResult", "WeMask", "WeMaskSpec",
           "encode", "find_me_layer", "from_model", "load", "scan", "weights", "wemask"]
