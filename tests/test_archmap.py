"""The architecture map: every mapped family loads, every role is the module it claims to be (checked on the
data flow with hooks, not on names), a scan finds the planted ME layer, and unmapped models fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NEOX_ARCH, REFUSED_TYPE, refused_model, unsupported_model
from torch import nn
from transformers.activations import ACT2FN

import melayer
from melayer.capture import Hooks, encode, layer_output
from melayer.models.archmap import (
    ARCHITECTURES,
    LAYER_ROLES,
    MODEL_ROLES,
    NORM_ROLES,
    ArchSpec,
    resolve,
)
from melayer.models.derive import arch_for
from melayer.testing import (
    INTER,
    MODEL_TYPES,
    VOCAB,
    plant_massive,
    tiny_lm,
    tiny_tokenizer,
)
from melayer.util.errors import MelayerError, UnsupportedArchitecture

PROMPTS = ["The capital of France is Paris.", "Hello world, this is a test!", "1 2 3 4 5 6 7 8"]


def test_every_mapped_type_has_a_tiny_checkpoint():
    assert set(MODEL_TYPES) == set(ARCHITECTURES)


def _hidden_in(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _out(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _act_name(cfg) -> str:
    return getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None) or cfg.activation_function


def _reference_norm(lm, layer: int, role: str, x: torch.Tensor) -> torch.Tensor:
    """What a norm must compute from ``x`` given the map's ``norm_kind`` and ``norm_gain`` (weight + offset)."""
    norm = lm.module(layer, role)
    gain = lm.norm_gain(layer, role)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None)
    x = x.float()
    if lm.arch.norm_kind == "rms":
        y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = (x - x.mean(-1, keepdim=True)) * torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)
    y = y * gain
    if getattr(norm, "bias", None) is not None:
        y = y + norm.bias
    return y


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_roles_resolve_to_the_right_kind_of_module(model_type):
    lm = tiny_lm(model_type, plant=False)
    assert lm.arch is ARCHITECTURES[model_type]
    for role in MODEL_ROLES:
        assert resolve(lm.model, lm.arch.path(role)) is not None, role
    assert isinstance(lm.layers, nn.ModuleList) and lm.num_layers == 4
    assert isinstance(resolve(lm.model, lm.arch.embed), nn.Embedding)
    assert resolve(lm.model, lm.arch.embed).num_embeddings == VOCAB
    assert resolve(lm.model, lm.arch.lm_head).out_features == VOCAB
    hidden = lm.hidden_size
    for layer in range(lm.num_layers):
        for role in LAYER_ROLES:
            mod = lm.module(layer, role)
            assert (mod is None) == (lm.arch.path(role) is None), (role, lm.arch.path(role))
        for role in NORM_ROLES:
            if lm.module(layer, role) is not None:
                assert lm.module(layer, role).weight.shape == (hidden,), role
                assert lm.norm_gain(layer, role).shape == (hidden,)
        assert lm.down_weight(layer).shape == (hidden, INTER)
        assert sum(p.numel() for p in lm.module(layer, "attn").parameters()) >= 4 * hidden * hidden // 2
        assert lm.module(layer, "down") in list(lm.module(layer, "mlp").modules())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_roles_match_the_data_flow(model_type):
    """Hooks on every role: what each norm emits is what the next block reads, and the FFN output (after the
    post-FFN norm where there is one) is exactly what gets added to the residual stream."""
    lm = tiny_lm(model_type, plant=False)
    with torch.no_grad():  # non-trivial norm gains, so a wrong gain offset would show
        for layer in range(lm.num_layers):
            for role in NORM_ROLES:
                norm = lm.module(layer, role)
                if norm is not None:
                    norm.weight.copy_(0.5 + torch.rand_like(norm.weight))
    seen: dict[tuple[int, str], torch.Tensor] = {}

    def keep(key, value):
        seen[key] = value.detach().clone()

    with Hooks() as hooks:
        for i, layer in enumerate(lm.layers):
            hooks.pre(layer, lambda m, a, k, i=i: keep((i, "layer_in"), _hidden_in(a, k)), with_kwargs=True)
            hooks.forward(layer, lambda m, a, o, i=i: keep((i, "layer_out"), layer_output(o)))
            for role in LAYER_ROLES:
                mod = lm.module(i, role)
                if mod is None:
                    continue
                hooks.pre(mod, lambda m, a, k, i=i, r=role: keep((i, r + "_in"), _hidden_in(a, k)), with_kwargs=True)
                hooks.forward(mod, lambda m, a, o, i=i, r=role: keep((i, r + "_out"), _out(o)))
        final = resolve(lm.model, lm.arch.final_norm)
        head = resolve(lm.model, lm.arch.lm_head)
        hooks.forward(final, lambda m, a, o: keep((-1, "final_out"), o))
        hooks.pre(head, lambda m, a: keep((-1, "head_in"), a[0]))
        with torch.no_grad():
            lm.model(**encode(lm, ["The quick brown fox jumps."]))

    def close(a, b, what):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{model_type} {what}: {m}")

    act = ACT2FN[_act_name(lm.config)]
    for i in range(lm.num_layers):
        s = {k[1]: v for k, v in seen.items() if k[0] == i}
        x = s["layer_in"]
        # attention block: (pre-norm) -> attn -> (post-attn norm) -> + residual
        close(s["attn_in"], s["pre_attn_norm_out"] if "pre_attn_norm_out" in s else x, "attention input")
        if "pre_attn_norm_out" in s:
            close(s["pre_attn_norm_in"], x, "pre_attn_norm input")
            close(s["pre_attn_norm_out"], _reference_norm(lm, i, "pre_attn_norm", x), "pre_attn_norm gain")
        attn_delta = s["attn_out"]
        if "post_attn_norm_out" in s:
            close(s["post_attn_norm_in"], s["attn_out"], "post_attn_norm input")
            close(s["post_attn_norm_out"], _reference_norm(lm, i, "post_attn_norm", s["attn_out"]), "post_attn_norm gain")
            attn_delta = s["post_attn_norm_out"]
        mid = x + attn_delta
        # FFN block: (pre-norm) -> mlp -> (post-FFN norm) -> + residual
        if "pre_ffn_norm_out" in s:
            close(s["pre_ffn_norm_in"], mid, "pre_ffn_norm input = residual after attention")
            close(s["pre_ffn_norm_out"], _reference_norm(lm, i, "pre_ffn_norm", mid), "pre_ffn_norm gain")
            close(s["mlp_in"], s["pre_ffn_norm_out"], "mlp input = pre_ffn_norm output")
        else:
            close(s["mlp_in"], mid, "mlp input = residual (post-norm family)")
        mlp_in = s["mlp_in"]
        # inside the FFN: gate/up (or fused gate_up) -> act -> down
        assert s["down_in"].shape[-1] == INTER, "down input width = intermediate size"
        if "gate_up_out" in s:
            assert s["gate_up_out"].shape[-1] == 2 * INTER
            close(s["gate_up_in"], mlp_in, "gate_up input")
            gate, up = s["gate_up_out"].chunk(2, dim=-1)  # first half gate, second half up
            close(s["down_in"], act(gate) * up, "down input = act(gate) * up (fused)")
        elif "gate_out" in s:
            close(s["gate_in"], mlp_in, "gate input")
            close(s["up_in"], mlp_in, "up input")
            assert s["gate_out"].shape[-1] == s["up_out"].shape[-1] == INTER
            close(s["down_in"], act(s["gate_out"]) * s["up_out"], "down input = act(gate) * up")
        else:
            close(s["up_in"], mlp_in, "up input")
            close(s["down_in"], act(s["up_out"]), "down input = act(up)")
        close(s["mlp_out"], s["down_out"], "mlp output = down output")
        down_w = lm.down_weight(i)
        down_bias = getattr(lm.module(i, "down"), "bias", None)
        ref = s["down_in"] @ down_w.T + (down_bias if down_bias is not None else 0)
        close(s["down_out"], ref, "down_weight() is (hidden, intermediate)")
        ffn_delta = s["mlp_out"]
        if "post_ffn_norm_out" in s:
            close(s["post_ffn_norm_in"], s["mlp_out"], "post_ffn_norm input = mlp output")
            close(s["post_ffn_norm_out"], _reference_norm(lm, i, "post_ffn_norm", s["mlp_out"]), "post_ffn_norm gain")
            ffn_delta = s["post_ffn_norm_out"]
        close(s["layer_out"], mid + ffn_delta, "layer output = residual + FFN (post-norm) output")
        if i + 1 < lm.num_layers:
            close(seen[(i + 1, "layer_in")], s["layer_out"], "layer outputs chain")
    close(seen[(-1, "head_in")], seen[(-1, "final_out")], "lm_head input = final_norm output")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_body_is_the_decoder_stack_without_head(model_type):
    lm = tiny_lm(model_type, plant=False)
    batch = encode(lm, PROMPTS[:1])
    with torch.no_grad():
        body = lm.body(**batch).last_hidden_state
        full = lm.model(**batch, output_hidden_states=True)
    assert body.shape[-1] == lm.hidden_size
    torch.testing.assert_close(full.hidden_states[-1], body)
    head = resolve(lm.model, lm.arch.lm_head)
    torch.testing.assert_close(head(body), full.logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("me_layer", [1, 2])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_scan_finds_the_planted_me_layer(model_type, me_layer):
    lm = tiny_lm(model_type, me_layer=me_layer, dim=7, neuron=5, num_layers=4)
    r = melayer.scan(lm, PROMPTS, progress=False)
    assert r.me_layer == me_layer
    assert r.me_layer_consistency == 1.0
    assert [p.me_layer for p in r.prompts] == [me_layer] * len(PROMPTS)
    assert r.massive_dims == [7]
    assert r.massive_tokens() == [{"position": 0, "token": "<bos>", "prompts": len(PROMPTS)}]
    assert all(rec["position"] == 0 and rec["layer"] >= me_layer for rec in r.massive)
    assert r.precursors == [] and r.transient == []
    peak = r.peak()
    assert abs(peak["value"]) > 1000 and peak["dim"] == 7 and peak["ratio_to_median"] > 1000
    # the planted "super weight" is the largest entry of down at the ME layer, in the (hidden, inter) layout
    w = lm.down_weight(me_layer).abs()
    assert divmod(int(w.argmax()), w.shape[1]) == (7, 5)


# ------------------------------------------------------------------------------------------------
# unmapped architectures and overrides


def test_underivable_architecture_says_why():
    with pytest.raises(UnsupportedArchitecture) as err:
        melayer.from_model(refused_model(), tiny_tokenizer())
    msg = str(err.value)
    assert "\n" not in msg
    assert f"cannot map model_type {REFUSED_TYPE!r}" in msg
    assert "input projections of ffn" in msg  # which role could not be told, and where
    assert "--arch" in msg
    assert isinstance(err.value, MelayerError)


def test_override_by_name_reuses_a_mapped_layout():
    lm = tiny_lm("qwen2", me_layer=2)
    lm2 = melayer.from_model(lm.model, lm.tokenizer, arch="llama")
    assert lm2.arch.name == "llama"
    assert melayer.scan(lm2, PROMPTS, progress=False).me_layer == 2


def test_override_by_name_that_does_not_fit_lists_the_missing_roles():
    with pytest.raises(UnsupportedArchitecture, match=r"does not fit model_type 'gpt_neox': not found: body=model"):
        melayer.from_model(unsupported_model("gpt_neox"), tiny_tokenizer(), arch="llama")


@pytest.mark.parametrize("form", ["dict", "json", "archspec"])
def test_override_maps_an_unsupported_model(form, tmp_path):
    """A full map for GPT-NeoX makes it work end to end: the tiny plant (placed through the roles) is found."""
    model = unsupported_model("gpt_neox", num_layers=4)
    if form == "dict":
        arch = dict(NEOX_ARCH)
    elif form == "json":
        arch = tmp_path / "neox.json"
        arch.write_text(json.dumps(NEOX_ARCH))
        arch = str(arch)
    else:
        arch = ArchSpec(**NEOX_ARCH)
    lm = melayer.from_model(model, tiny_tokenizer(), name="tiny-neox", arch=arch)
    assert lm.arch.name == "gpt_neox" and lm.arch.norm_kind == "layer"
    assert lm.module(0, "down") is model.gpt_neox.layers[0].mlp.dense_4h_to_h
    assert lm.module(3, "pre_attn_norm") is model.gpt_neox.layers[3].input_layernorm
    plant_massive(lm, me_layer=1, neuron=5, dim=7)
    r = melayer.scan(lm, PROMPTS, progress=False)
    assert (r.me_layer, r.massive_dims) == (1, [7])
    assert r.massive_tokens()[0]["token"] == "<bos>"


def test_partial_override_of_a_mapped_model():
    lm = tiny_lm("llama", plant=False)
    spec = arch_for(lm.model, {"notes": "custom"})
    assert spec.notes == "custom" and spec.down == ARCHITECTURES["llama"].down
    with pytest.raises(UnsupportedArchitecture, match=r"not found: down=model\.layers\.0\.mlp\.nope"):
        arch_for(lm.model, {"down": "mlp.nope"})


def test_bad_overrides_error_clearly(tmp_path):
    model = tiny_lm("llama", plant=False).model
    with pytest.raises(MelayerError, match="neither a known architecture .* nor an existing JSON file"):
        arch_for(model, str(tmp_path / "missing.json"))
    with pytest.raises(MelayerError, match="neither a known architecture"):
        arch_for(model, "lama")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(MelayerError, match="cannot read architecture map"):
        arch_for(model, str(bad))
    bad.write_text("[1, 2]")
    with pytest.raises(MelayerError, match="must hold a JSON object"):
        arch_for(model, str(bad))
    with pytest.raises(MelayerError, match="unknown architecture-map keys: colour"):
        arch_for(model, {"colour": "blue"})


def test_load_with_json_override(unsupported_dir, tmp_path):
    arch = tmp_path / "neox.json"
    arch.write_text(json.dumps(NEOX_ARCH))
    lm = melayer.load(str(unsupported_dir), arch=str(arch), progress=False)
    assert lm.arch.name == "gpt_neox" and lm.num_layers == 2
    derived = melayer.load(str(unsupported_dir), progress=False).arch  # without the override: the same roles
    assert {k: v for k, v in derived.to_dict().items() if k in NEOX_ARCH} == NEOX_ARCH


def test_check_arch_accepts_a_fitting_map_and_flags_a_wrong_one():
    from melayer.testing import check_arch

    good = check_arch(unsupported_model("gpt_neox", num_layers=4), NEOX_ARCH, me_layer=2, dim=11)
    assert good.ok and (good.me_layer, good.massive_dims, good.tokens) == (2, [11], ["<bos>"])
    # down pointing at the attention output: the plant writes into a module the FFN never uses
    bad = check_arch(unsupported_model("gpt_neox", num_layers=4), {**NEOX_ARCH, "down": "attention.dense"})
    assert not bad.ok and "does not fit" in bad.message and bad.me_layer is None
    with pytest.raises(MelayerError, match="vocab_size"):
        check_arch(_small_vocab_neox(), NEOX_ARCH)


def _small_vocab_neox():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("gpt_neox", vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128)
    return AutoModelForCausalLM.from_config(config)
