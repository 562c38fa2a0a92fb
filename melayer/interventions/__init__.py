"""Interventions on a loaded model, all hook-based and fully removable (WeMask)."""

from melayer.interventions.wemask import WeMask, format_layers, greedy_generate, parse_layers, wemask

__all__ = ["WeMask", "format_layers", "greedy_generate", "parse_layers", "wemask"]
