"""melayer: find where massive activations are born (the ME layer), explain them, measure sinks, fix them."""

from melayer.analysis.criterion import Criterion
from melayer.analysis.scan import ScanResult, scan
from melayer.util.errors import MelayerError
from melayer.interventions.wemask import WeMask, wemask
from melayer.models.archmap import ARCHITECTURES, ArchSpec
from melayer.models.loading import LM, from_model, load

__version__ = "0.1.0"
__all__ = ["ARCHITECTURES", "ArchSpec", "Criterion", "LM", "MelayerError", "ScanResult", "WeMask", "from_model", "load", "scan",
           "wemask"]
