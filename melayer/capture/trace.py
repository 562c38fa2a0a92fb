"""``melayer.trace``: the activations at melayer's named capture sites, for users who want more than the verbs.

>>> t = melayer.trace(lm, ["The cat sat.", "Hello"], sites=["resid_out", "attn_in"], layers=[2, 3])
>>> t["resid_out", 3]                       # one (tokens, hidden) tensor per prompt, padding removed
>>> t["blocks.3.hook_resid_post"]           # the same, by its TransformerLens name
>>> melayer.trace(lm, prompts, sites="hook_resid_post", reduce="max_abs")["resid_out", 3]   # (hidden,) each

Sites are the names of :data:`melayer.capture.sites.SITES` (``resid_in``, ``resid_out``, ``attn_in``, ``attn_out``,
``mlp_in``, ``mlp_out``, ``down_in``, the norms' inputs and the post-norm outputs); TransformerLens's hook names
(``hook_resid_post``, ``ln1.hook_out``, ``mlp.hook_post`` ..., or ``blocks.L.<hook>`` with the layer) are accepted
as aliases: :data:`TL_HOOKS` is the mapping, checked against TransformerLens itself on every mapped family
(``tests/test_peer_transformer_lens.py``). Prompts run in left-padded batches; what is kept is each prompt's own
tokens, so nothing depends on the batching.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from melayer.capture.batching import planned
from melayer.capture.hooks import Hooks
from melayer.capture.sites import SITES, forward_until, read_site, site_module
from melayer.models.loading import LM
from melayer.util.errors import MelayerError

# melayer's site -> TransformerLens's hook of the same block (``blocks.L.<hook>``)
TL_HOOKS: dict[str, str] = {
    "resid_in": "hook_resid_pre",
    "resid_out": "hook_resid_post",
    "attn_in": "ln1.hook_out",
    "attn_out": "attn.hook_out",
    "post_attn_out": "ln1_post.hook_out",
    "mlp_in": "ln2.hook_out",
    "mlp_out": "mlp.hook_out",
    "down_in": "mlp.hook_post",
    "post_ffn_out": "ln2_post.hook_out",
    "pre_attn_norm_in": "ln1.hook_in",
    "post_attn_norm_in": "ln1_post.hook_in",
    "pre_ffn_norm_in": "ln2.hook_in",
    "post_ffn_norm_in": "ln2_post.hook_in",
}
# families without pre-norms (OLMo2): attention and FFN read the raw residual stream, which TransformerLens names so
TL_HOOKS_NO_PRE_NORM: dict[str, str] = {"attn_in": "hook_resid_pre", "mlp_in": "hook_resid_mid"}

Reduction = Literal["max_abs", "mean", "first", "last", "norm"]
_REDUCE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "max_abs": lambda x: x.abs().amax(dim=0),  # per dim, over the prompt's tokens
    "mean": lambda x: x.mean(dim=0),
    "first": lambda x: x[0],
    "last": lambda x: x[-1],
    "norm": lambda x: x.norm(dim=-1),  # per token
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _pre_norm_free(lm: LM) -> bool:
    return site_module(lm, 0, "pre_attn_norm_in") is None


def tl_hook(lm: LM, site: str) -> str:
    """TransformerLens's name (within ``blocks.L``) for melayer's ``site`` on ``lm``'s family."""
    if site not in SITES:
        raise MelayerError(f"unknown site {site!r}; use one of {', '.join(SITES)}")
    return TL_HOOKS_NO_PRE_NORM.get(site, TL_HOOKS[site]) if _pre_norm_free(lm) else TL_HOOKS[site]


def resolve(lm: LM, name: str) -> tuple[str, int | None]:
    """(melayer site, layer or None) for a melayer site name or a TransformerLens hook name."""
    layer = None
    m = _BLOCK.match(name)
    if m:
        layer, name = int(m.group(1)), m.group(2)
    if name in SITES:
        return name, layer
    for site in SITES:
        if tl_hook(lm, site) == name:
            return site, layer
    raise MelayerError(f"unknown site {name!r}: use one of {', '.join(SITES)} or their TransformerLens names "
                       f"({', '.join(sorted({tl_hook(lm, s) for s in SITES}))})")


@dataclass
class Trace:
    """Captured activations: ``trace[site, layer]`` (or ``trace["blocks.L.<tl hook>"]``) is one tensor per prompt.

    Attributes:
        prompts: the prompts, in the order given.
        tokens: each prompt's token ids (padding removed).
        sites: the capture sites traced (melayer names, TransformerLens aliases resolved).
        layers: the decoder layers traced.
        reduce: the reduction kept per prompt (None: whole (tokens, width) tensors).
        lm: the model traced.
        values: ``{(site, layer): [one tensor per prompt]}``; read it through ``trace[site, layer]``.
    """

    prompts: list[str]
    tokens: list[list[int]]
    sites: list[str]
    layers: list[int]
    reduce: str | None
    lm: LM = field(repr=False)
    values: dict[tuple[str, int], list[torch.Tensor]] = field(default_factory=dict, repr=False)

    def __getitem__(self, key: tuple[str, int] | str) -> list[torch.Tensor]:
        if isinstance(key, str):
            site, layer = resolve(self.lm, key)
            if layer is None:
                raise MelayerError(f"{key!r} names no layer: use trace[site, layer] or 'blocks.L.{key}'")
        else:
            site, layer = resolve(self.lm, key[0])[0], key[1]
        if (site, layer) not in self.values:
            raise MelayerError(f"{site} at layer {layer} was not traced (traced: sites {', '.join(self.sites)}; "
                               f"layers {self.layers})")
        return self.values[site, layer]

    def stack(self, site: str, layer: int) -> torch.Tensor:
        """The per-prompt tensors of ``site`` at ``layer``, stacked.

        Args:
            site: a capture site (``"resid_out"``, ...).
            layer: a traced layer.

        Returns:
            One tensor with the prompts on its first axis (the per-prompt tensors must share a shape: a reduction,
            or prompts of one length).
        """
        return torch.stack(self[site, layer])


@torch.no_grad()
def trace(
    lm: LM,
    prompts: str | Sequence[str],
    sites: str | Sequence[str] = "resid_out",
    layers: int | Sequence[int] | None = None,
    *,
    reduce: Reduction | Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = "cpu",
) -> Trace:
    """Run ``prompts`` through the decoder stack and keep the activations at the named capture sites.

    Args:
        lm: the model.
        prompts: one prompt or several.
        sites: melayer site names (``resid_out``, ``attn_in``, ``down_in`` ...) or TransformerLens hook names
            (``hook_resid_post``, ``ln1.hook_out``, ``blocks.3.hook_resid_post``: the layer joins ``layers``).
        layers: the layers to trace (default: all, or those the ``blocks.L`` names give).
        reduce: keep a reduction over each prompt's tokens instead of the whole (tokens, width) tensor:
            ``"max_abs"`` (per dim), ``"mean"``, ``"first"``, ``"last"``, ``"norm"`` (per token), or a function
            of the (tokens, width) tensor.
        batch_size: at most this many prompts per forward pass.
        device: where the kept tensors go (``"cpu"`` by default; None leaves them on the model's device).

    Returns:
        A :class:`Trace`: ``trace[site, layer]`` is a list with one tensor per prompt (its own tokens, no padding).

    Raises:
        MelayerError: an empty prompt, an unknown site, a layer out of range, or a site the family does not have.
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts or any(not p.strip() for p in texts):
        raise MelayerError("empty prompt: every prompt must contain text")
    resolved = [resolve(lm, s) for s in ([sites] if isinstance(sites, str) else list(sites))]
    names = list(dict.fromkeys(site for site, _ in resolved))
    if layers is None:
        given = sorted({layer for _, layer in resolved if layer is not None})
        chosen = given or list(range(lm.num_layers))
    else:
        chosen = [layers] if isinstance(layers, int) else list(layers)
    bad = [layer for layer in chosen if not 0 <= layer < lm.num_layers]
    if bad:
        raise MelayerError(f"layer {bad[0]} is out of range: {lm.name} has layers 0-{lm.num_layers - 1}")
    missing = [s for s in names if site_module(lm, 0, s) is None]
    if missing:
        raise MelayerError(f"{lm.name} ({lm.arch.name}) has no {', '.join(missing)} site")
    if isinstance(reduce, str) and reduce not in _REDUCE:
        raise MelayerError(f"unknown reduction {reduce!r}; use one of {', '.join(_REDUCE)} or a function")
    fn = _REDUCE[reduce] if isinstance(reduce, str) else reduce
    ids = [lm.tokenizer(p)["input_ids"] for p in texts]
    out = Trace(prompts=texts, tokens=ids, sites=names, layers=chosen, lm=lm,
                reduce=reduce if isinstance(reduce, str) or reduce is None else getattr(reduce, "__name__", "custom"))
    kept: dict[tuple[str, int], list[torch.Tensor | None]] = {(s, l): [None] * len(texts) for s in names for l in chosen}
    current: list[tuple[torch.Tensor, list[int]]] = []  # the batch running now: (attention mask, prompt indices)

    def keeper(site: str, layer: int) -> Callable[[torch.Tensor], None]:
        def keep(h: torch.Tensor) -> None:
            mask, idx = current[0]
            for b, i in enumerate(idx):
                x = h[b][mask[b]].detach()
                x = fn(x) if fn is not None else x
                kept[site, layer][i] = x.to(device) if device is not None else x

        return keep

    with Hooks() as hooks:
        for layer in chosen:
            for site in names:
                read_site(hooks, lm, layer, site, keeper(site, layer))
        for idx, batch in planned(lm, ids, max_batch=batch_size):
            current[:] = [(batch["attention_mask"].bool(), idx)]
            forward_until(lm, batch, last_layer=max(chosen))  # nothing after the last traced layer runs
    out.values = {k: [x for x in v if x is not None] for k, v in kept.items()}
    return out
