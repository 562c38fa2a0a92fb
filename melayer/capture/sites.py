"""Named capture sites, built from the architecture map, and the forward pass of the decoder stack.

A site is ``(layer, name)``; :data:`SITES` maps each name to the role module that carries it and whether it is
read before (``pre``: the module's input) or after (``out``: its output) that module runs. Analyses ask for
sites by name and never for module paths:

=================  ===========================================================================
``resid_in``       residual stream entering the decoder layer
``resid_out``      residual stream leaving it (the layer output)
``attn_in``        attention input (after the pre-attention norm; raw residual for post-norm)
``attn_out``       attention output (before any post-attention norm)
``post_attn_out``  output of the post-attention norm (Gemma 2/3, OLMo2)
``mlp_in``         FFN input
``mlp_out``        FFN output (before any post-FFN norm)
``down_in``        intermediate activations entering the down projection
``post_ffn_out``   output of the post-FFN norm (Gemma 2/3, OLMo2)
``<norm>_in``      input of each norm role (``pre_attn_norm_in`` ...)
=================  ===========================================================================

Norm gains are read with ``LM.norm_gain`` (the ArchSpec's weight -> gain mapping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from melayer.capture.encoding import position_ids
from melayer.capture.hooks import Hooks, StopForward, layer_output, run_until
from melayer.capture.tokens import hidden_arg
from melayer.models.archmap import NORM_ROLES
from melayer.models.experts import FusedExperts, experts_call
from melayer.models.guard import check_overflow
from melayer.models.loading import LM
from melayer.util.errors import MelayerError

LOGIT_BUDGET = 1 << 26  # floats of logits materialised at once (256 MiB in float32)

SITES: dict[str, tuple[str, str]] = {
    "resid_in": ("layer", "pre"),
    "resid_out": ("layer", "out"),
    "attn_in": ("attn", "pre"),
    "attn_out": ("attn", "out"),
    "post_attn_out": ("post_attn_norm", "out"),
    "mlp_in": ("mlp", "pre"),
    "mlp_out": ("mlp", "out"),
    "down_in": ("down", "pre"),
    "post_ffn_out": ("post_ffn_norm", "out"),
    **{f"{role}_in": (role, "pre") for role in NORM_ROLES},
}


def site_module(lm: LM, layer: int, site: str) -> nn.Module | None:
    """The module whose input or output is ``site`` in ``layer`` (None if the family has no such role).

    An FFN of projections the layer calls itself (no ``mlp`` module: OPT, XGLM, BioGPT) has its input at its input
    projection and its output at its down projection. In a layer without FFN, ``down_in`` is the input of the
    mixer's output projection (:meth:`~melayer.models.loading.LM.neuron_projection`)."""
    role, _ = SITES[site]
    if role == "layer":
        return lm.layers[layer]
    module = lm.module(layer, role) if role != "down" else lm.neuron_projection(layer)
    if module is None and role == "mlp" and lm.experts(layer) is None:
        ends = ("down",) if site == "mlp_out" else ("gate_up", "up", "gate")
        module = next((m for r in ends if (m := lm.module(layer, r)) is not None), None)
    return module


def read_site(hooks: Hooks, lm: LM, layer: int, site: str, fn: Callable[[torch.Tensor], None]) -> bool:
    """Call ``fn(tensor)`` with the site's activation on every forward; False if the model has no such site."""
    if site == "down_in" and (fused := lm.experts(layer)) is not None:
        _read_expert_neurons(hooks, lm, layer, fused, fn)
        return True
    if site == "mlp_out" and (beside := shared_beside(lm, layer)) is not None:
        _read_ffn_sum(hooks, lm.required(layer, "mlp"), beside, fn)
        return True
    module = site_module(lm, layer, site)
    if module is None:
        return False
    if module is not lm.layers[layer]:
        fn = _unflattened(hooks, lm.layers[layer], fn)
    if SITES[site][1] == "pre":
        hooks.pre(module, lambda m, args, kwargs: fn(hidden_arg(args, kwargs)), with_kwargs=True)
    else:
        hooks.forward(module, lambda m, args, kwargs, out: fn(layer_output(out)), with_kwargs=True)
    return True


def shared_beside(lm: LM, layer: int) -> nn.Module | None:
    """The down projection of a shared expert the layer calls beside its MoE block (Granite-MoE's ``shared_mlp``),
    not inside it; None otherwise. The FFN's output is then the block's output plus this projection's."""
    block, down = lm.module(layer, "mlp"), lm.module(layer, "down")
    if block is None or down is None or lm.experts(layer) is None or any(m is down for m in block.modules()):
        return None
    return down


def _read_ffn_sum(hooks: Hooks, block: nn.Module, down: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
    """``fn`` given the MoE block's output plus the shared expert's beside it, once both have run."""
    parts: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(m: Any, args: tuple, out: Any) -> None:
            parts[name] = layer_output(out)
            if len(parts) == 2:
                block_out = parts.pop("block")
                fn(block_out + parts.pop("shared").reshape(block_out.shape))
        return hook

    hooks.forward(block, keep("block"))
    hooks.forward(down, keep("shared"))


def _unflattened(hooks: Hooks, layer: nn.Module, fn: Callable[[torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    """``fn`` given (batch, tokens, width) where the layer hands a module the tokens flattened, (batch x tokens,
    width) (OPT's FFN), shaped as the layer's own input."""
    shape: dict[str, torch.Size] = {}
    hooks.pre(layer, lambda m, args, kwargs: shape.__setitem__("tokens", hidden_arg(args, kwargs).shape[:-1]),
              with_kwargs=True)

    def call(t: torch.Tensor) -> None:
        tokens = shape.get("tokens")
        if tokens is not None and len(tokens) == 2 and t.dim() == 2 and t.shape[0] == tokens[0] * tokens[1]:
            t = t.reshape(tokens[0], tokens[1], t.shape[-1])
        fn(t)

    return call


def _read_expert_neurons(hooks: Hooks, lm: LM, layer: int, fused: FusedExperts,
                         fn: Callable[[torch.Tensor], None]) -> None:
    """``down_in`` of an MoE layer: (batch, tokens, neurons) numbered as ``LM.ffn_segments``, each routed expert's
    activations times the token's routing weight for it (zero where not routed), then the shared expert's times
    its gate (sigmoid), so that activation x down column is each neuron's share of the block's output."""
    block, shared, gate = lm.required(layer, "mlp"), lm.module(layer, "down"), lm.module(layer, "shared_gate")
    state: dict[str, Any] = {}

    def on_block(m: Any, args: tuple, kwargs: dict) -> None:
        state["shape"] = hidden_arg(args, kwargs).shape

    def on_experts(m: Any, args: tuple, kwargs: dict) -> None:
        call = experts_call(args, kwargs)
        if call is not None:
            state["routed"] = fused.routed(*call)

    def on_shared(m: Any, args: tuple) -> None:
        state["shared"] = args[0].reshape(-1, args[0].shape[-1]).float()

    def on_gate(m: Any, args: tuple, out: Any) -> None:
        state["gate"] = torch.sigmoid(layer_output(out).float()).reshape(-1, 1)

    def emit() -> None:  # each part popped: a forward's parts never mix with the next one's
        parts = [state.pop("routed")]
        if shared is not None:
            parts.append(state.pop("shared") * state.pop("gate", 1.0))
        fn(torch.cat(parts, dim=-1).reshape(*state["shape"][:-1], -1))

    def on_block_out(m: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if beside is None or "shared" in state:  # a shared expert beside the block may run before it or after it
            emit()

    def on_beside_out(m: Any, args: tuple, out: Any) -> None:
        if "routed" in state:
            emit()

    beside = shared_beside(lm, layer)
    hooks.pre(block, on_block, with_kwargs=True)
    hooks.pre(fused.module, on_experts, with_kwargs=True)
    if shared is not None:
        hooks.pre(shared, on_shared)
    if gate is not None:
        hooks.forward(gate, on_gate)
    hooks.forward(block, on_block_out, with_kwargs=True)
    if beside is not None:
        hooks.forward(beside, on_beside_out)


def edit_site(hooks: Hooks, lm: LM, layer: int, site: str, fn: Callable[..., torch.Tensor | None],
              with_call: bool = False) -> None:
    """Replace an input site (``pre``) with ``fn(tensor)`` when it returns a tensor (never edits in place).
    ``with_call=True``: ``fn(tensor, kwargs)`` also gets the module call's keyword arguments (attention mask,
    position ids), so an edit can be a function of each call alone (as gradient checkpointing needs)."""
    if SITES[site][1] != "pre":
        raise ValueError(f"only input sites can be edited, not {site!r}")
    module = site_module(lm, layer, site)
    if module is None:
        raise ValueError(f"layer {layer} of {lm.name} has no {site} site")

    def hook(m: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        in_kwargs = "hidden_states" in kwargs
        h = kwargs["hidden_states"] if in_kwargs else args[0]
        new = fn(h, kwargs) if with_call else fn(h)
        if new is None:
            return None
        if in_kwargs:
            return args, {**kwargs, "hidden_states": new}
        return (new, *args[1:]), kwargs

    hooks.pre(module, hook, with_kwargs=True)


def forward_body(lm: LM, batch: dict[str, torch.Tensor]) -> Any:
    """The decoder stack only: no LM head, no hidden-state outputs, no KV cache."""
    return lm.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=position_ids(batch["attention_mask"]), use_cache=False)


def forward_until(lm: LM, batch: dict[str, torch.Tensor], last_layer: int | None = None) -> None:
    """Run the decoder stack and stop right after ``last_layer`` (nothing later runs; None: run it all)."""
    def stop(module: Any, args: Any, output: Any) -> None:
        raise StopForward

    with Hooks() as hooks:
        if last_layer is not None and last_layer < lm.num_layers - 1:
            hooks.forward(lm.layers[last_layer], stop)
        run_until(lambda: forward_body(lm, batch))
    check_overflow(lm.model)  # a stopped forward never reaches the guard's final check


def final_hidden(hooks: Hooks, lm: LM, into: dict[str, torch.Tensor]) -> None:
    """Keep the decoder stack's final hidden states (after the final norm) in ``into["h"]`` on every forward."""
    def grab(_mod: Any, _args: Any, output: Any) -> None:
        into["h"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    hooks.forward(lm.body, grab)


def output_head(lm: LM) -> Callable[[torch.Tensor], torch.Tensor]:
    """Final hidden states -> float32 logits: the LM head, the measured logit scale (Cohere, Granite) and any final
    logit soft-capping (Gemma 2)."""
    head = lm.model.get_output_embeddings()
    if head is None:
        raise MelayerError(f"{lm.name}: the model has no output embedding (LM head)")
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = lm.arch.logit_scale

    def apply(h: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        if scale != 1.0:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return apply
