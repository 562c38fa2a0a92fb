"""Compatibility alias: the error types live in :mod:`melayer.util.errors`."""

from melayer.util.errors import MelayerError, NumericOverflow, UnsupportedArchitecture

__all__ = ["MelayerError", "NumericOverflow", "UnsupportedArchitecture"]
