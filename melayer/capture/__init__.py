"""Capture: hook context managers and streaming reductions."""

from melayer.capture.hooks import Hooks, layer_output

__all__ = ["Hooks", "layer_output"]
