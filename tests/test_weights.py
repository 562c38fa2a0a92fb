"""melayer weights: data-free ME-layer candidates, read lazily from safetensors and GGUF files."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, save_lm
from safetensors.torch import load_file

import melayer
from melayer.analysis.weights import candidates, confirm_candidates
from melayer.models.gguf_file import gguf_n_bytes
from melayer.models.lazy import GGUFWeights, _gguf_config, gguf_moe_architectures, open_weights
from melayer.testing import MODEL_TYPES, tiny_lm
from melayer.util.errors import MelayerError


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_planted_checkpoint_of_every_family(tmp_path, model_type):
    """Predicted == planted == scanned (layer, dim, neuron): a plain plant, and a writer with a later remover of the
    same dim whose down weight is the larger one (the remover is named as such, with its neuron)."""
    for me_layer, neuron, dim, remover in ((1, 5, 7, None), (1, 9, 20, (3, 0.9))):
        lm = tiny_lm(model_type, me_layer=me_layer, neuron=neuron, dim=dim, num_layers=5, remover=remover)
        path = save_lm(lm, tmp_path / f"{model_type}-{me_layer}-{dim}")
        r = candidates(str(path), progress=False)
        assert (r.me_layer, r.massive_dim, r.top_neuron) == (me_layer, dim, neuron)
        assert r.attention == "o(v(x))" and r.vote["tokens"] == 1  # the tiny tokenizer always adds BOS
        assert melayer.scan(lm, ["The capital of France is Paris.", "Hello world!"], progress=False).me_layer == me_layer
        # the super weight's stored index addresses the planted entry in the stored (possibly Conv1D) tensor
        stored = lm.model.state_dict()[r.super_weight["tensor"]]
        assert float(stored[tuple(r.super_weight["stored_index"])]) == pytest.approx(r.super_weight["value"])
        assert r.super_weight["value"] == pytest.approx(float(lm.arch.down_matrix(lm.module(me_layer, "down")).detach()[dim, neuron]))
        if remover is None:
            assert r.removers == []
        else:  # the planted remover reads the dim it writes down (its only input)
            assert [(x["layer"], x["neuron"]) for x in r.removers] == [(3, neuron + 3)]
            assert r.removers[0]["write"] < 0 and r.removers[0]["reads_dim"] == pytest.approx(1.0)
            assert r.layers[3].role == "removes" and r.layers[me_layer].role == "creates"


@pytest.mark.parametrize("model_type", ["opt", "xglm", "biogpt"])
def test_ffn_of_loose_projections(tmp_path, model_type):
    """OPT, XGLM, BioGPT: the FFN is fc1/fc2 called by the layer itself (derived roles, no mlp module); XGLM's
    config counts its layers in num_layers and its width in d_model; their first input is the embedding scaled
    (XGLM, BioGPT) plus a position row (OPT and BioGPT start at row 2), measured on the twin: the path is the
    model's own stream."""
    lm = tiny_lm(model_type)
    r = candidates(str(save_lm(lm, tmp_path / model_type)), progress=False)
    assert _path_error(r, lm) < 1e-4
    assert (r.me_layer, r.massive_dim, r.top_neuron) == (1, 7, 5)
    assert r.super_weight["tensor"].endswith("layers.1.fc2.weight")
    assert float(lm.model.state_dict()[r.super_weight["tensor"]][tuple(r.super_weight["stored_index"])]) == \
        pytest.approx(r.super_weight["value"])


@pytest.mark.parametrize("model_type", ["nanochat", "doge"])
def test_a_family_whose_path_differs_from_its_own_stream_is_refused(tmp_path, model_type):
    """A family read from its config alone is checked on a tiny twin: Nanochat norms its embeddings, Doge's layers
    are not attention then FFN as melayer follows them. The path would differ from the model's own first-token
    stream, so the checkpoint is refused in one line (it used to be read, and named the plant only because the
    plant is large)."""
    lm = tiny_lm(model_type, me_layer=2, neuron=9, dim=20)
    with pytest.raises(MelayerError, match="does not reproduce the family's own hidden states") as info:
        candidates(str(save_lm(lm, tmp_path / model_type)), progress=False)
    assert "\n" not in str(info.value) and "melayer scan" in str(info.value)


def test_norm_epsilon_measured_when_the_module_does_not_hold_it(tmp_path):
    """OLMo's weightless LayerNorm fixes its epsilon (1e-5) in its code, not in its config: melayer measures it on
    the twin from how the norm scales x and 2x (RMS norms too), and the path is then the model's own stream."""
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

    from melayer.models.derive import _norm_eps

    class RMS(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.rand(64) + 0.5)

        def forward(self, x):
            return self.weight * x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 3e-6)

    assert _norm_eps(OlmoLayerNorm(64), "layer") == pytest.approx(1e-5)
    assert _norm_eps(RMS(), "rms") == pytest.approx(3e-6)
    assert _norm_eps(torch.nn.LayerNorm(64, eps=1e-6), "layer") == 1e-6  # the module's own attribute
    lm = tiny_lm("olmo", me_layer=2, neuron=9, dim=20)
    r = candidates(str(save_lm(lm, tmp_path / "olmo")), progress=False)
    assert _path_error(r, lm) < 1e-4 and (r.me_layer, r.massive_dim, r.top_neuron) == (2, 20, lm.plant.flat_neuron)


def test_granite_multipliers(tmp_path):
    """Granite scales the embedding (embedding_multiplier, measured on the twin) and both residual branches
    (residual_multiplier, from the config): with real-model values the path is the model's own stream."""
    from transformers import AutoModelForCausalLM

    from melayer.testing import plant_massive, tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    config = tiny_config("granite", 4)
    config.update({"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    lm = melayer.from_model(model, tiny_tokenizer(), name="tiny-granite")
    plant = plant_massive(lm, 2, 9, 20)
    r = candidates(str(save_lm(lm, tmp_path / "granite")), progress=False)
    assert _path_error(r, lm) < 1e-4 and (r.me_layer, r.massive_dim, r.top_neuron) == (2, 20, plant.flat_neuron)


def _path_error(r, lm) -> float:
    """The largest relative difference between the weights' path (per layer: median and largest |x|) and the
    model's own first-token hidden states (BOS alone; the last layer's output is left out, some families norm it)."""
    with torch.no_grad():
        states = lm.model(input_ids=torch.tensor([[lm.tokenizer.bos_token_id]]), output_hidden_states=True).hidden_states
    err = 0.0
    for i in range(lm.num_layers - 1):
        a = states[i + 1][0, 0].abs()
        err = max(err, abs(r.layers[i].median / float(a.median()) - 1), abs(r.layers[i].top_value / float(a.max()) - 1))
    return err


def _save_fused(lm, path: Path) -> Path:
    """A checkpoint with the experts as transformers holds them (one 3-D tensor per projection), not per expert."""
    from safetensors.torch import save_file

    save_lm(lm, path)
    save_file({k: v.contiguous() for k, v in lm.model.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("model_type", ["gpt_neox", "gptj", "falcon", "mixtral", "qwen2_moe"])
def test_parallel_blocks_and_experts(tmp_path, model_type):
    """Parallel blocks (the FFN reads the layer input; GPT-NeoX's per-head q/k/v, GPT-J's separate v) and mixtures
    of experts (routed by the first token's own router, numbered expert x I + neuron; Qwen2-MoE's shared expert
    gated by a sigmoid), read from per-expert tensors as checkpoints store them and from fused 3-D tensors: the path
    is the model's first-token stream, and the prediction is the plant; a remover in Qwen2-MoE's shared expert is
    named. Read as a sequential block, a parallel one gives another path."""
    lm = tiny_lm(model_type, me_layer=1, neuron=5, dim=7, num_layers=4)
    paths = [save_lm(lm, tmp_path / "stored")] + ([_save_fused(lm, tmp_path / "fused")] if lm.experts(1) else [])
    for path in paths:
        r = candidates(str(path), progress=False)
        assert r.attention == "o(v(x))" and _path_error(r, lm) < 1e-4
        assert (r.me_layer, r.massive_dim, r.top_neuron) == (1, 7, lm.plant.flat_neuron)
        stored = load_file(str(next(path.glob("*.safetensors"))))[r.super_weight["tensor"]]
        assert float(stored[tuple(r.super_weight["stored_index"])]) == pytest.approx(r.super_weight["value"])
        assert r.super_weight["expert"] == lm.plant.expert
    if lm.arch.parallel:
        assert _path_error(candidates(str(paths[0]), arch={"parallel": False}, progress=False), lm) > 1e-2
    if model_type == "qwen2_moe":
        lm = tiny_lm(model_type, me_layer=1, neuron=9, dim=20, num_layers=5, remover=(3, 0.9))
        r = candidates(str(save_lm(lm, tmp_path / "remover")), progress=False)
        assert (r.me_layer, r.massive_dim, r.top_neuron) == (1, 20, lm.plant.flat_neuron)
        shared = lm.experts(3).num_experts * lm.experts(3).inter + 12  # the remover is the shared expert's neuron 12
        assert [(x["layer"], x["neuron"]) for x in r.removers] == [(3, shared)] and r.removers[0]["reads_dim"] > 0.99


@pytest.mark.parametrize("model_type", ["deepseek_v3", "glm4_moe"])
def test_dense_first_layers_and_grouped_sigmoid_routing(tmp_path, model_type):
    """DeepSeek-V3 and GLM-4-MoE: dense first layers, then mixtures of experts routed by sigmoid scores with a
    correction bias among the best groups, scaled; DeepSeek's multi-head latent attention. With two groups of
    experts, random correction biases and a routed scaling factor, the path is the model's own first-token stream
    and the plant, born in an MoE layer after a dense one, is named with its expert."""
    from transformers import AutoModelForCausalLM

    from melayer.testing import plant_massive, tiny_config, tiny_tokenizer

    torch.manual_seed(0)
    config = tiny_config(model_type, 4)
    config.update({"first_k_dense_replace": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.rand(buffer.shape))
    lm = melayer.from_model(model, tiny_tokenizer(), name=f"tiny-{model_type}")
    plant = plant_massive(lm, 2, 9, 20)
    r = candidates(str(save_lm(lm, tmp_path / model_type)), progress=False)
    assert r.attention == "o(v(x))" and _path_error(r, lm) < 1e-4
    assert (r.me_layer, r.massive_dim, r.top_neuron) == (2, 20, plant.flat_neuron)
    assert r.super_weight["expert"] == plant.expert is not None


def test_checkpoint_with_fewer_layers_than_the_twin(tmp_path):
    """A config with fewer layers than the tiny twin melayer derives the map on keeps its own count (its per-layer
    lists, Qwen2-MoE's mlp_only_layers, cannot be lengthened)."""
    lm = tiny_lm("qwen2_moe", me_layer=1, neuron=5, dim=7, num_layers=3)
    r = candidates(str(save_lm(lm, tmp_path / "three")), progress=False)
    assert (r.me_layer, r.massive_dim, r.top_neuron) == (1, 7, lm.plant.flat_neuron)


@pytest.mark.parametrize("new_layout", [False, True])
def test_falcon_fused_qkv_with_fewer_value_heads(tmp_path, new_layout):
    """Falcon's fused q/k/v with fewer key/value heads than queries: multi-query, stacked (all queries, the key, the
    value) and the newer grouped layout (per key/value head: its queries, its key, its value), the value heads'
    count taken from the shapes. The path is the model's own first-token stream and the plant is named."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from melayer.testing import plant_massive, tiny_tokenizer

    torch.manual_seed(0)
    extra = {"new_decoder_architecture": True, "num_kv_heads": 2} if new_layout else {"multi_query": True}
    config = AutoConfig.for_model("falcon", hidden_size=64, num_hidden_layers=4, num_attention_heads=8, vocab_size=300,
                                  **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    lm = melayer.from_model(model, tiny_tokenizer(), name="tiny-falcon")
    plant = plant_massive(lm, 1, 5, 7)
    r = candidates(str(save_lm(lm, tmp_path / "falcon")), progress=False)
    assert r.attention == "o(v(x))" and _path_error(r, lm) < 1e-4
    assert (r.me_layer, r.massive_dim, r.top_neuron) == (1, 7, plant.flat_neuron)


def _write_moe_gguf(lm, path: Path, gguf_arch: str, qtype: str) -> Path:
    """A tiny mixture-of-experts GGUF laid out as llama.cpp's converter writes one: the routed experts as one 3-D
    tensor per projection (``blk.N.ffn_{gate,up,down}_exps``), names from gguf's own tensor-name map, a shared
    expert's gate as a vector, matrices in ``qtype`` (vectors in F32)."""
    import gguf

    cfg = lm.config
    n = cfg.num_hidden_layers
    names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch), n)
    w = gguf.GGUFWriter(str(path), gguf_arch)
    w.add_block_count(n)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(lm.experts(0).num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_bos_token_id(lm.tokenizer.bos_token_id)
    w.add_add_bos_token(True)
    tensors = {}
    for key, t in lm.model.state_dict().items():
        gname = names.get_name(key.rsplit(".", 1)[0])
        if gname is not None and (".layers." in key or key.endswith("embed_tokens.weight")):
            tensors[f"{gname}.{key.rsplit('.', 1)[1]}"] = t.detach().float().squeeze(0).numpy()
    for i in range(n):
        fused = lm.experts(i)
        parts = {"down": [fused.down(e) for e in range(fused.num_experts)]}
        for e in range(fused.num_experts):
            for role, m in fused.inputs(e).items():
                parts.setdefault(role, []).append(m)
        for role, mats in parts.items():
            tensors[f"blk.{i}.ffn_{role}_exps.weight"] = torch.stack(mats).detach().float().numpy()  # (E, out, in)
    for name, a in tensors.items():
        if a.ndim > 1 and qtype != "F32":
            q = gguf.quants.quantize(np.ascontiguousarray(a), gguf.GGMLQuantizationType[qtype])
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_moe_gguf_agrees_with_safetensors(tmp_path):
    """A Qwen2-MoE GGUF (routed experts as llama.cpp's fused 3-D tensors, a shared expert gated by a sigmoid), F32
    and Q8_0: the same (layer, dim, neuron, expert) as its safetensors save, the F32 path equal to it; experts read
    in blocks through the same decode as dense tensors. A Mixtral GGUF (architecture llama with an expert count,
    which transformers maps to no model type) is refused in one line, and read with --arch naming its experts."""
    lm = tiny_lm("qwen2_moe", me_layer=1, neuron=5, dim=7, num_layers=4)
    twin = candidates(str(save_lm(lm, tmp_path / "twin")), progress=False)
    planted = (1, 7, lm.plant.flat_neuron, lm.plant.expert)
    assert (twin.me_layer, twin.massive_dim, twin.top_neuron, twin.super_weight["expert"]) == planted
    for qtype, rel in (("F32", 1e-5), ("Q8_0", 2e-2)):
        path = _write_moe_gguf(lm, tmp_path / f"qwen2moe-{qtype}.gguf", "qwen2moe", qtype)
        lazy = open_weights(str(path))
        assert lazy.model_type == "qwen2_moe" and lazy.experts(1).num_experts == 4
        assert {lazy._info(m.key)[1].name for m in lazy.experts(1).downs} == {qtype}  # decoded as stored
        r = candidates(lazy, progress=False)
        assert r.format == "gguf" and (r.me_layer, r.massive_dim, r.top_neuron, r.super_weight["expert"]) == planted
        assert r.intermediate_size == twin.intermediate_size and r.vote["tokens"] == twin.vote["tokens"] == 1
        for a, b in zip(r.layers, twin.layers):
            assert (a.top_dim, a.role, a.neuron) == (b.top_dim, b.role, b.neuron)
            for field in ("median", "top_value", "write", "attn_write", "ffn_write"):
                assert getattr(a, field) == pytest.approx(getattr(b, field), rel=rel, abs=rel * b.top_value), field
        down = lm.experts(1).down(lm.plant.expert).detach()  # the super weight: (expert, dim, neuron) of down_proj
        assert r.super_weight["tensor"] == "model.layers.1.mlp.experts.down_proj"
        assert r.super_weight["stored_index"] == [lm.plant.expert, 7, lm.plant.neuron]
        assert r.super_weight["value"] == pytest.approx(float(down[7, lm.plant.neuron]), rel=rel)

    mixtral = tiny_lm("mixtral", me_layer=1, neuron=5, dim=7, num_layers=4)
    path = _write_moe_gguf(mixtral, tmp_path / "mixtral.gguf", "llama", "Q8_0")
    with pytest.raises(MelayerError, match=r"mixture-of-experts GGUF \(4 experts per layer\) of architecture 'llama'"):
        open_weights(str(path))
    assert {"qwen2moe", "qwen3moe"} <= set(gguf_moe_architectures())
    assert _gguf_config("qwen3moe", {}, {})["model_type"] == "qwen3_moe"  # llama.cpp renormalises Qwen3-MoE's top-k
    assert _gguf_config("qwen3moe", {}, {})["norm_topk_prob"] is True
    experts = {"router": "mlp.gate", "experts": "mlp.experts", "gate": None, "up": None, "down": None}
    r = candidates(str(path), arch=experts, progress=False)
    assert (r.me_layer, r.massive_dim, r.top_neuron, r.super_weight["expert"]) == (1, 7, mixtral.plant.flat_neuron,
                                                                                   mixtral.plant.expert)


def test_planted_precursor(tmp_path):
    """A spike at layer 0 that layer 1's FFN cancels: the cancelling neuron has the largest down weight, but the
    path sees the spike die (a precursor) and the planted value persist from layer 2."""
    lm = tiny_lm("llama", me_layer=2, num_layers=5, precursor=(0, 20))
    r = candidates(str(save_lm(lm, tmp_path / "precursor")), progress=False)
    assert (r.me_layer, r.massive_dim, r.top_neuron) == (2, 7, 5)
    assert {"layer": 0, "dim": 20, "share": 1.0} in r.precursors
    assert melayer.scan(lm, ["The capital of France is Paris.", "Hello world!"], progress=False).me_layer == 2
    c = confirm_candidates(lm, r, ["The capital of France is Paris.", "Hello world, how are you?"])
    assert c.held and c.first_held == 2


def test_result_dict_and_parts(planted_dir):
    r = candidates(str(planted_dir), top_k=3, progress=False)
    d = r.to_dict()
    assert d["schema"] == "melayer.weights/2" and d["format"] == "safetensors" and d["model_type"] == "llama"
    assert d["rule"] and d["assumptions"] and d["criterion"]["median_ratio"] == 1000
    assert len(d["layers"]) == 5 and len(d["candidates"]) == 3 and d["candidates"][0]["layer"] == 2
    for row in d["layers"][3:]:  # once the value is there, a layer's write is its attention's plus its FFN's
        assert row["write"] == pytest.approx(row["attn_write"] + row["ffn_write"], abs=1e-5 * row["top_value"])  # float32
    me = d["layers"][2]
    assert me["role"] == "creates" and me["top_dim"] == 7 and me["neuron"] == 5 and me["neuron_share"] > 0.99
    assert d["tokens"] == [{"token_id": 0, "me_layer": 2, "dim": 7, "neuron": 5, "peak": d["tokens"][0]["peak"],
                            "precursors": []}]
    json.dumps(d)  # plain JSON


def test_sharded_and_hub_style_checkpoints(tmp_path):
    """A sharded directory (index + shards), and GPT-2 keys without the ``transformer.`` prefix (hub files)."""
    from safetensors.torch import save_file

    lm = tiny_lm("llama", me_layer=2, neuron=9, dim=20, num_layers=4)
    lm.model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    r = candidates(str(tmp_path / "sharded"), progress=False)
    assert (r.me_layer, r.massive_dim, r.top_neuron) == (2, 20, 9)

    gpt2 = tiny_lm("gpt2", me_layer=1, neuron=9, dim=20, num_layers=3)
    hub = tmp_path / "gpt2-hub"
    hub.mkdir()
    gpt2.config.to_json_file(hub / "config.json")
    sd = {k.removeprefix("transformer."): v.detach().contiguous() for k, v in gpt2.model.state_dict().items()
          if k.startswith("transformer.") and not k.endswith(".attn.bias")}
    save_file(sd, str(hub / "model.safetensors"))
    lazy = open_weights(str(hub))
    assert lazy.layers_prefix() == "h"
    r = candidates(lazy, progress=False)
    assert (r.me_layer, r.massive_dim, r.top_neuron) == (1, 20, 9) and r.super_weight["tensor"] == "h.1.mlp.c_proj.weight"


def _write_weights_only(path: Path, hidden: int, inter: int, layers: int) -> Path:
    """A real safetensors checkpoint holding only what the path reads (embedding, norms, v/o, FFN), with a
    massive value planted on the first token: embedding row 0 carries dim 0, which only neuron 99 of layer 2
    reads, and that neuron writes dim 11."""
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers, "hidden_size": hidden,
                                                  "num_attention_heads": 8, "num_key_value_heads": 8}))
    g = torch.Generator().manual_seed(0)
    embed = torch.randn(32, hidden, generator=g) * 0.02
    embed[:, 0] = 0.0
    embed[0, 0] = 1.0
    tensors = {"model.embed_tokens.weight": embed}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        for name in ("v_proj", "o_proj"):
            w = torch.randn(hidden, hidden, generator=g) * 0.002  # a quiet attention path
            w[0] = 0.0  # nothing else writes the carrier dim
            tensors[p + f"self_attn.{name}.weight"] = w
        for name in ("gate_proj", "up_proj"):
            w = torch.randn(inter, hidden, generator=g) * 0.002
            w[:, 0] = 0.0
            tensors[p + f"mlp.{name}.weight"] = w
        down = torch.randn(hidden, inter, generator=g) * 0.002
        down[0] = 0.0
        tensors[p + "mlp.down_proj.weight"] = down
    tensors["model.layers.2.mlp.gate_proj.weight"][99, 0] = 2.0
    tensors["model.layers.2.mlp.up_proj.weight"][99, 0] = 2.0
    tensors["model.layers.2.mlp.down_proj.weight"][11, 99] = 5.0
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_lazy_reading_keeps_memory_at_one_tensor(tmp_path):
    """Peak RSS growth while ranking a 302 MB checkpoint stays near one tensor (25 MB), far below the file."""
    hidden, inter, layers = 1024, 6144, 4
    path = _write_weights_only(tmp_path / "big", hidden, inter, layers)
    tensor_mb = hidden * inter * 4 / 2**20
    file_mb = path.joinpath("model.safetensors").stat().st_size / 2**20
    small = _write_weights_only(tmp_path / "small", 64, 128, layers)
    # A first ranking of a small checkpoint imports (and, on a fresh clone, byte-compiles) every module the
    # ranking needs, so the peak measured next is the reading alone. VmHWM: this process's own peak
    # (ru_maxrss would carry over pytest's).
    code = ("import json, torch; torch.set_num_threads(1); from melayer.analysis import weights as W;"
            f"W.candidates({str(small)!r}); a = W._peak_rss_mb();"
            f"r = W.candidates({str(path)!r});"
            "print(json.dumps([W._peak_rss_mb() - a, r.me_layer, r.massive_dim, r.top_neuron, r.cost['max_live_tensors'], r.cost['tensors_read']]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    growth, me, dim, neuron, live, read = json.loads(out.stdout.strip().splitlines()[-1])
    assert (me, dim, neuron) == (2, 11, 99)
    assert live <= 2 and read > layers * 5  # norms whole (at most two alive), matrices in chunks
    assert file_mb > 10 * tensor_mb
    assert growth < 3 * tensor_mb, f"RSS grew {growth:.0f} MB for {tensor_mb:.0f} MB tensors ({file_mb:.0f} MB file)"


def test_gguf_path_agrees_with_safetensors(tiny_gguf, tmp_path):
    """The tiny F32 GGUF (a planted Llama, layer 2, dim 7, neuron 5) follows the same path as its safetensors twin."""
    r = candidates(str(tiny_gguf), progress=False)
    assert r.format == "gguf" and (r.me_layer, r.massive_dim, r.top_neuron) == (2, 7, 5)
    twin = candidates(str(save_lm(tiny_lm("llama", me_layer=2), tmp_path / "twin")), progress=False)
    assert r.vote["tokens"] == twin.vote["tokens"] == 1
    for a, b in zip(r.layers, twin.layers):
        assert (a.top_dim, a.role, a.neuron) == (b.top_dim, b.role, b.neuron)
        assert a.write == pytest.approx(b.write, rel=1e-4, abs=1e-3)


def _write_gemma3_gguf(lm, path: Path, qtype: str = "Q8_0") -> Path:
    """A tiny Gemma-3 GGUF laid out as llama.cpp's converter writes one: names from gguf's own tensor-name map,
    norm weights stored as 1 + weight (llama.cpp multiplies by the stored value), matrices in ``qtype``."""
    import gguf

    cfg = lm.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_bos_token_id(lm.tokenizer.bos_token_id)
    w.add_add_bos_token(True)
    for key, t in lm.model.state_dict().items():
        base = key.rsplit(".", 1)[0]
        gname = names.get_name(base)
        if gname is None or not (".layers." in key or key.endswith("embed_tokens.weight")):
            continue
        a = t.detach().float().numpy()
        if key.endswith("norm.weight"):
            a = a + 1.0
        if a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType[qtype])
            w.add_tensor(gname + ".weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType[qtype])
        else:
            w.add_tensor(gname + ".weight", np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_quantised_gemma3_gguf_norm_offset(tmp_path):
    lm = tiny_lm("gemma3_text", me_layer=2, neuron=9, dim=20, num_layers=4)
    path = _write_gemma3_gguf(lm, tmp_path / "tiny-gemma3.gguf")
    lazy = open_weights(str(path))
    assert isinstance(lazy, GGUFWeights) and lazy.model_type == "gemma3_text" and lazy.arch.post_ffn_norm
    for layer in range(4):  # gains read from the GGUF are the model's effective gains
        for role in ("pre_ffn_norm", "post_ffn_norm"):
            assert torch.allclose(lazy.norm_gain(layer, role), lm.norm_gain(layer, role), atol=1e-6)
    down = lazy.role_weight(2, "down")  # Q8_0: within one quantisation step
    assert torch.allclose(down, lm.arch.down_matrix(lm.module(2, "down")), atol=float(down.abs().max()) / 100)
    r = candidates(lazy, progress=False)
    assert (r.me_layer, r.massive_dim, r.top_neuron) == (2, 20, 9) and r.vote["first_tokens"] == "the tokenizer always adds BOS"


def _check_streamed_matmul(lazy, keys, reference) -> None:
    """``lazy.matmul`` (blocks of a few rows, one thread and three) equals x @ W.T over the whole tensor; each
    streamed block is bit-identical to the same rows of the whole tensor."""
    g = torch.Generator().manual_seed(0)
    with ThreadPoolExecutor(3) as pool:
        for key in keys:
            full = reference(key)  # (out, in), transformers' layout
            x = torch.randn(3, full.shape[1], generator=g)
            want = x @ full.T
            for chunk_values in (full.shape[1] * 3, 1 << 18):  # three rows (uneven blocks), one block
                for executor in (None, pool):
                    got = lazy.matmul(key, x, executor, chunk_values)
                    assert got.shape == want.shape
                    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
            stored = full.T if lazy.stored_transposed(key) else full
            for start, rows in lazy.chunks(key, stored.shape[1] * 5):
                assert torch.equal(rows, stored[start:start + rows.shape[0]])


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_streamed_gguf_matmul_equals_the_whole_tensor(tmp_path, qtype):
    """Every quant type gguf can write: blocks decoded from a few rows at a time are exactly gguf's dequantisation
    of the whole tensor (the same kernel, over fewer blocks), and the streamed x @ W.T matches it."""
    import gguf

    lm = tiny_lm("gemma3_text", me_layer=2, neuron=9, dim=20, num_layers=3)
    lazy = open_weights(str(_write_gemma3_gguf(lm, tmp_path / f"tiny-{qtype}.gguf", qtype)))

    def whole(key):
        dims, q, offset = lazy._info(key)
        raw = np.fromfile(lazy.path, dtype=np.uint8, count=gguf_n_bytes(dims, q), offset=offset)
        return torch.from_numpy(gguf.quants.dequantize(raw.reshape(int(np.prod(dims[1:])), -1), q).copy()).float()

    keys = [lazy.layer_key(1, role) for role in ("gate", "up", "down")] + [lazy.path_key(1, lazy.arch.attn_v)]
    _check_streamed_matmul(lazy, keys, whole)
    assert lazy.bytes_read > 0


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1"])
def test_own_block_kernels_are_gguf_bit_for_bit(qtype):
    """melayer's torch kernels decode random blocks (every bit pattern of quants and sub-scales; float16 scales over
    nine orders of magnitude) to exactly gguf's values, into a reused buffer or a new tensor, and a whole tensor
    read through them (read_gguf_tensor, what the GGUF conversion uses) equals gguf's dequantisation."""
    import gguf

    from melayer.models.gguf_file import _TORCH_KERNELS, gguf_decode, read_gguf_tensor

    q = gguf.GGMLQuantizationType[qtype]
    size, values, _ = _TORCH_KERNELS[qtype]
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(64 * 4, size), dtype=np.uint8)
    scales = (rng.normal(size=(raw.shape[0], 2)) * 10.0 ** rng.integers(-6, 3, size=(raw.shape[0], 2)))
    for i, at in enumerate({"Q4_K": (0, 2), "Q6_K": (208,), "Q4_1": (0, 2)}.get(qtype, (0,))):
        raw[:, at:at + 2] = scales[:, i].astype(np.float16).view(np.uint8).reshape(-1, 2)
    raw = raw.reshape(64, -1)
    want = gguf.quants.dequantize(raw, q)
    for out in (None, torch.full((1 << 18,), float("nan"))):
        got = gguf_decode(raw, q, out=out).numpy()
        assert got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(b"\0" * 32 + raw.tobytes())
        f.flush()
        whole = read_gguf_tensor(Path(f.name), (4 * values, 64), q, 32)
    assert np.array_equal(whole.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize(("qtype", "tokens"), [("Q4_K", 1), ("Q4_K", 5), ("Q6_K", 1), ("Q6_K", 5)])
def test_k_quant_products_equal_the_product_of_ggufs_values(qtype, tokens):
    """Q4_K's and Q6_K's own products (the constant part of every value through x's 32- or 16-value sums, the quants
    widened into contiguous halves or quarters multiplied by x's matching rows, a few rows at a time) equal x times
    gguf's dequantised rows to float32 rounding, whatever the number of rows per pass (one, an uneven three, all)."""
    import gguf

    from melayer.models.gguf_file import gguf_matmul

    rng = np.random.default_rng(tokens)
    rows, per_row, size = 7, 3, {"Q4_K": 144, "Q6_K": 210}[qtype]  # 7 rows of 3 super-blocks (768 values)
    raw = rng.integers(0, 256, size=(rows * per_row, size), dtype=np.uint8)
    scales = rng.normal(size=(raw.shape[0], 2)) * 10.0 ** rng.integers(-4, 1, size=(raw.shape[0], 2))
    scales = scales.astype(np.float16).view(np.uint8).reshape(-1, 4)
    if qtype == "Q4_K":
        raw[:, :4] = scales  # d, dmin
    else:
        raw[:, 208:] = scales[:, :2]  # d
    raw = raw.reshape(rows, -1)
    q = gguf.GGMLQuantizationType[qtype]
    w = torch.from_numpy(gguf.quants.dequantize(raw, q).copy()).double()
    xt = torch.randn(w.shape[1], tokens, generator=torch.Generator().manual_seed(0))
    want = w @ xt.double()
    for buffer in (768, 3 * 768, 1 << 16):
        out = torch.full((rows, tokens), float("nan"))
        gguf_matmul(raw, q, xt, out, torch.empty(buffer))
        assert torch.allclose(out.double(), want, rtol=0, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_safetensors_matmul_equals_the_whole_tensor(tmp_path, dtype):
    """Llama (rows = outputs) and GPT-2 (Conv1D: rows = inputs), float32 and bfloat16 files."""
    from safetensors.torch import load_file, save_file

    for model_type in ("llama", "gpt2"):
        path = save_lm(tiny_lm(model_type, me_layer=1, num_layers=3), tmp_path / f"{model_type}-{dtype}")
        for f in path.glob("*.safetensors"):
            save_file({k: v.to(dtype) for k, v in load_file(str(f)).items()}, str(f), metadata={"format": "pt"})
        lazy = open_weights(str(path))
        keys = [k for k in (lazy.layer_key(1, r) for r in ("gate", "up", "down")) if k is not None]

        def whole(key, lazy=lazy):
            t = lazy.tensor(key)
            return t.T if lazy.stored_transposed(key) else t

        _check_streamed_matmul(lazy, keys, whole)


@pytest.mark.slow
def test_streamed_blocks_of_the_embedded_ggufs_are_exact():
    """On real quantised tensors (Gemma-3-270M: Q4_K, Q6_K, Q5_0, Q8_0; SmolLM2-135M: Q4_1), every streamed block
    equals gguf's dequantisation of the whole tensor, bit for bit."""
    import gguf

    seen = set()
    for name in ("gemma-3-270m", "smollm2-135m"):
        lazy = open_weights(name)
        for layer in range(lazy.num_layers):
            for role in ("gate", "up", "down"):
                key = lazy.layer_key(layer, role)
                dims, q, offset = lazy._info(key)
                if q.name in seen:
                    continue
                seen.add(q.name)
                raw = np.fromfile(lazy.path, dtype=np.uint8, count=gguf_n_bytes(dims, q), offset=offset)
                full = torch.from_numpy(gguf.quants.dequantize(raw.reshape(int(np.prod(dims[1:])), -1), q).copy())
                for start, rows in lazy.chunks(key, 7 * int(dims[0])):
                    assert torch.equal(rows, full[start:start + rows.shape[0]])
                x = torch.randn(2, full.shape[1], generator=torch.Generator().manual_seed(0))
                want = x.double() @ full.double().T
                with ThreadPoolExecutor(2) as pool:  # each format's product (Q4_K's own), split between threads
                    for executor in (None, pool):
                        got = lazy.matmul(key, x, executor).double()
                        assert torch.allclose(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    assert seen >= {"Q4_K", "Q6_K", "Q5_0", "Q4_1"}


def test_activations_match_transformers():
    """The activation table melayer weights uses instead of importing ACT2FN gives transformers' functions."""
    from transformers.activations import ACT2FN

    from melayer.analysis.weights import ACTIVATIONS

    x = torch.linspace(-30, 30, 20001)
    for name, fn in ACTIVATIONS.items():
        assert torch.equal(fn(x), ACT2FN[name](x)), name


def test_confirm_on_a_planted_model(tmp_path):
    lm = tiny_lm("llama", me_layer=2, num_layers=5)
    r = candidates(str(save_lm(lm, tmp_path / "planted")), progress=False)
    texts = ["The capital of France is Paris.", "Hello world, how are you?"]
    c = confirm_candidates(lm, r, texts)
    assert c.held and c.first_held == 2 and c.emerges == {2: 1.0} and c.layers == [1, 2, 3]
    assert c.massive_share == {1: 0.0, 2: 1.0, 3: 1.0} and c.top_dim[2] == 7
    r.me_layer = 0  # a wrong prediction is reported as such, with the candidate that does hold
    wrong = confirm_candidates(lm, r, texts)
    assert not wrong.held and wrong.first_held == 2 and wrong.emerges == {0: 0.0, 2: 1.0}
    assert "not held at layer 0" in wrong.verdict and "first at layer 2" in wrong.verdict


def test_cli_writes_json_and_plot(run_cli, planted_dir, tmp_path):
    res = run_cli("weights", "-m", str(planted_dir), "-o", tmp_path / "out", "--confirm", "--n-prompts", "2")
    assert res.returncode == 0, res.stderr
    data = json.loads((tmp_path / "out" / "weights.json").read_text())
    assert data["schema"] == "melayer.weights/2" and (data["me_layer"], data["massive_dim"], data["neurons"][0]) == (2, 7, 5)
    assert data["confirm"]["held"] is True
    assert (tmp_path / "out" / "weights_scores.png").stat().st_size > 0


def test_cli_bad_input(run_cli, tmp_path, planted_dir, refused_dir, tiny_gguf):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "file").write_text("x")
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "config.json").write_text((planted_dir / "config.json").read_text())
    data = (planted_dir / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    gguf_cut = tmp_path / "cut.gguf"
    gguf_cut.write_bytes(tiny_gguf.read_bytes()[:-4096])
    cases = [
        (("-m", str(empty)), "holds no model weights"),
        (("-m", str(cut)), "truncated or corrupt"),
        (("-m", str(gguf_cut)), "truncated GGUF"),
        (("-m", str(refused_dir)), "cannot map model_type 'cpmant'"),
        (("-m", str(planted_dir), "-o", str(tmp_path / "file")), "exists and is not a directory"),
    ]
    for args, message in cases:
        if "-o" not in args:
            args = (*args, "-o", str(tmp_path / "o"))
        res = run_cli("weights", *args)
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("melayer: error: ") and message in lines[0], (args, res.stderr)
    assert not (tmp_path / "o").exists()


def test_checkpoint_missing_a_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    path = _write_weights_only(tmp_path / "holed", hidden=64, inter=128, layers=3)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(MelayerError, match=r"no tensor model.layers.1.mlp.down_proj.weight though layer 0 has one"):
        candidates(str(path))


def test_bad_arguments(planted_dir):
    with pytest.raises(MelayerError):
        candidates(str(planted_dir), n_tokens=0)
    with pytest.raises(MelayerError, match="no such file"):
        candidates("surely/not/here")


@pytest.mark.slow
def test_embedded_models(gemma, smollm2):
    """What docs/weights.md reports: both right (layer, dim, neuron), Gemma's precursor dim 400, SmolLM2's layer 28
    removing dim 507 (the neuron the old |W| score put first), and --confirm holds on both."""
    from melayer.models.loading import resolve_source

    g = candidates("gemma-3-270m", progress=False)
    assert g.format == "gguf" and (g.me_layer, g.massive_dim, g.top_neuron) == (3, 163, 1414)
    assert {(p["layer"], p["dim"]) for p in g.precursors} >= {(0, 400), (1, 400), (2, 400)}
    g_st = candidates(resolve_source("gemma-3-270m")[1], progress=False)  # the dequantised safetensors directory
    assert g_st.format == "safetensors" and (g_st.me_layer, g_st.massive_dim, g_st.top_neuron) == (3, 163, 1414)
    assert confirm_candidates(gemma, g).held

    s = candidates("smollm2-135m", progress=False)
    assert (s.me_layer, s.massive_dim, s.neurons[:2]) == (11, 507, [1229, 1487])
    assert s.vote["agree"] >= 0.9 * s.vote["tokens"]
    assert (28, 678) in [(x["layer"], x["neuron"]) for x in s.removers]
    assert confirm_candidates(smollm2, s).held
