"""Capture: encoding, token tracking, named hook sites and forward control. Every analysis and intervention
asks here; nothing else re-derives padding, first real tokens or module hooks."""

from melayer.capture.encoding import (
           batches,
           check_length,
           encode,
           eos_ids,
           first_real,
           left_pad,
           pad_id,
           position_ids,
)
from melayer.capture.hooks import Hooks, StopForward, layer_output, run_until
from melayer.capture.sites import (
           SITES,
           edit_site,
           forward_body,
           forward_until,
           read_site,
           site_module,
)
from melayer.capture.tokens import CallTokens, TokenTracker, body_call, call_tokens, hidden_arg

__all__ = ["SITES", "CallTokens", "Hooks", "StopForward", "TokenTracker", "batches", "body_call", "call_tokens", "check_length", "edit_site", "encode", "eos_ids",
           "first_real", "forward_body", "forward_until", "hidden_arg", "layer_output", "left_pad", "pad_id",
           "position_ids", "read_site", "run_until", "site_module"]
