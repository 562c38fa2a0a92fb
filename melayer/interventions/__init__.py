"""Interventions on a loaded model, all hook-based and fully removable: WeMask, reversible ablations, and the
causal explain experiment built on them; greedy generation under any of them."""

from melayer.interventions.generate import chat_prompt, greedy, greedy_generate
from melayer.interventions.wemask import (
           WeMask,
           format_layers,
           parse_layers,
           wemask,
)

__all__ = ["WeMask", "chat_prompt", "format_layers", "greedy", "greedy_generate", "parse_layers",
           "wemask"]
