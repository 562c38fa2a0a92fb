"""Tiny configs of any transformers model type: the family's default config with its sizes shrunk.

Used to build small random-weight twins of a family (tests, ``melayer.testing``, and deriving the roles of a
checkpoint known only by its ``config.json``). Sizes match the test tokenizer of :mod:`melayer.testing`.
"""

from __future__ import annotations

from typing import Any

HIDDEN = 64
INTER = 128
HEADS = 4
KV_HEADS = 2
VOCAB = 3 + 256  # <bos>, <eos>, <pad> + 256 byte symbols
BOS, EOS, PAD = 0, 1, 2


# size keys of transformers configs and the tiny value each gets (present keys only; sub-configs alike)
_SHRINK = dict(
    hidden_size=HIDDEN, d_model=HIDDEN, n_embd=HIDDEN, embedding_size=HIDDEN,
    word_embed_proj_dim=HIDDEN, intermediate_size=INTER, ffn_dim=INTER, n_inner=INTER, decoder_ffn_dim=INTER, intermediate_size_mlp=INTER,
    ffn_hidden_size=INTER, moe_intermediate_size=32, shared_expert_intermediate_size=64, shared_intermediate_size=64,
    shared_experts_intermediate_size=64,
    num_attention_heads=HEADS, n_head=HEADS, num_heads=HEADS, n_heads=HEADS, decoder_attention_heads=HEADS,
    head_dim=HIDDEN // HEADS, qk_head_dim=16, v_head_dim=16, qk_rope_head_dim=8, qk_nope_head_dim=8, q_lora_rank=32,
    kv_lora_rank=16, kv_channels=16, attention_head_dim=16,
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_topk=2,
    num_experts_per_token=2, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
    num_shared_experts=1, moe_num_shared_experts=1,
    vocab_size=VOCAB, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
    linear_num_value_heads=4, mamba_d_state=16, mamba_d_head=16, state_size=16, time_step_rank=8, n_groups=1,
    mamba_dt_rank=8, mamba_d_ssm=2 * HIDDEN, rotary_dim=8, index_head_dim=16, index_n_heads=2, index_topk=8,
    swa_num_attention_heads=HEADS, swa_num_key_value_heads=KV_HEADS, swa_head_dim=16,
    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
)
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")


def _shrink(d: dict, num_layers: int) -> dict:
    """A config dict with its sizes replaced by tiny ones and its per-layer lists cut to ``num_layers`` (a config
    with fewer layers and per-layer lists keeps its own count: the lists cannot be lengthened)."""
    old_layers = next((d[k] for k in _LAYER_KEYS if isinstance(d.get(k), int)), None)
    if old_layers and old_layers < num_layers and any(isinstance(v, list) and len(v) == old_layers
                                                      and k != "architectures" for k, v in d.items()):
        num_layers = old_layers
    out = dict(d)
    for key, value in d.items():
        if key in _SHRINK and (value is None or isinstance(value, int) and not isinstance(value, bool)):
            if value is not None or key.endswith(("token_id", "head_dim")) or key == "num_key_value_heads":
                out[key] = _SHRINK[key]
        elif key in _LAYER_KEYS and isinstance(value, int):
            out[key] = num_layers
        elif isinstance(value, list) and old_layers and len(value) == old_layers and key != "architectures":
            out[key] = value[:num_layers]
    if "num_key_value_heads" in d:
        kv = d["num_key_value_heads"]
        out["num_key_value_heads"] = HEADS if kv is None or kv == d.get("num_attention_heads") else KV_HEADS
    if "qk_rope_head_dim" in d and "head_dim" in d:  # multi-head latent attention: rotary part = head_dim
        out["head_dim"] = out["qk_rope_head_dim"]
    # SSM heads must tile expand x hidden
    for expand, heads, head_dim in (("expand", "num_heads", "head_dim"), ("mamba_expand", "mamba_n_heads", "mamba_d_head")):
        if isinstance(d.get(expand), int) and heads in d and isinstance(out.get(head_dim), int):
            out[heads] = d[expand] * HIDDEN // out[head_dim]
    for key in ("model_type", "transformers_version", "architectures"):
        out.pop(key, None)
    return out


def tiny_config(model_type: str, num_layers: int = 4) -> Any:
    """transformers' default config of ``model_type`` shrunk to tiny sizes (every sub-config too), vocabulary and
    special tokens matching :func:`tiny_tokenizer`. Raises whatever transformers raises if the shrunk config is
    inconsistent for that family."""
    from transformers import AutoConfig

    base = AutoConfig.for_model(model_type)
    return AutoConfig.for_model(model_type, **shrink_config(base.to_dict(), num_layers))


def shrink_config(config: dict, num_layers: int = 4) -> dict:
    """A config dict (``config.json``'s content) with tiny sizes, sub-configs (``text_config``...) too."""
    kwargs = _shrink(config, num_layers)
    for name, sub in config.items():
        if isinstance(sub, dict) and any(k in sub for k in _SHRINK):
            kwargs[name] = _shrink(sub, num_layers)
    return kwargs
