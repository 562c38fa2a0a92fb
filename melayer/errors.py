"""Compatibility alias: the error types live in :mod:`melayer.util.errors`."""

from melayer.util.errors import Interrupted, MelayerError, NumericOverflow, UnsupportedArchitecture

__all__ = ["Interrupted", "MelayerError", "NumericOverflow", "UnsupportedArchitecture"]
