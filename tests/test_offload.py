"""A model split across devices gives exactly the unsplit model's results.

On this CPU-only machine the split is: embeddings, layers 0-2, final norm and LM head on the CPU, layers 3-5
offloaded to disk by accelerate (their weights are ``meta`` placeholders loaded for each forward pass). Scan,
WeMask (both select rules), explain's weight reads and ablations, and the eval runner must give bit-identical
results to the same checkpoint loaded whole. Splits across several GPUs (hidden states moving between devices)
cannot be run here; the same code paths move every index tensor to the hidden state's device.
"""

from __future__ import annotations

import json

import pytest
import torch

import melayer
from melayer.util.errors import MelayerError

N_LAYERS = 6
PROMPTS = ["The cat sat on the mat today", "My favorite color is dark blue", "Paris is the capital of France",
           "One two three four five six"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def half_on_disk(n: int = N_LAYERS) -> dict[str, str]:
    dm = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    dm.update({f"model.layers.{i}": "cpu" if i < n // 2 else "disk" for i in range(n)})
    return dm


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from melayer.testing import tiny_lm

    lm = tiny_lm("llama", me_layer=2, num_layers=N_LAYERS)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-6"
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def full(ckpt):
    return melayer.load(str(ckpt), progress=False)


@pytest.fixture(scope="module")
def split(ckpt, tmp_path_factory):
    lm = melayer.load(str(ckpt), device_map=half_on_disk(), offload_folder=tmp_path_factory.mktemp("offload"),
                      progress=False)
    offloaded = {n for n, p in lm.model.named_parameters() if p.device.type == "meta"}
    assert offloaded and all(n.startswith(("model.layers.3.", "model.layers.4.", "model.layers.5.")) for n in offloaded)
    return lm


def test_scan_is_identical(full, split):
    a = melayer.scan(full, PROMPTS, progress=False).to_dict()
    b = melayer.scan(split, PROMPTS, progress=False).to_dict()
    assert a["me_layer"] == 2 and a == b


@pytest.mark.parametrize("select", ["activation", "weight"])
def test_wemask_logits_are_identical(full, split, select):
    logits = []
    for lm in (full, split):
        with torch.no_grad(), melayer.wemask(lm, 0.1, select=select, me_layer=2) as wm:
            logits.append(lm.model(**melayer.encode(lm, PROMPTS)).logits)
            dims = wm.masked_dims()
        logits.append(dims)
    assert torch.equal(logits[0], logits[2]) and logits[1] == logits[3]
    with torch.no_grad():  # and the mask did something
        assert not torch.equal(full.model(**melayer.encode(full, PROMPTS)).logits, logits[0])


def test_weight_reads_see_the_offloaded_weights(full, split):
    for layer in (1, 4):  # on the CPU, offloaded
        assert torch.equal(full.norm_gain(layer, "pre_attn_norm"), split.norm_gain(layer, "pre_attn_norm"))
        assert torch.equal(full.down_weight(layer), split.down_weight(layer))
    assert split.model.model.layers[4].input_layernorm.weight.device.type == "meta"  # still offloaded afterwards


def test_fingerprint_reads_the_offloaded_weights(full, split):
    """The weights on disk count: the split model has the whole model's fingerprint, and what an offloaded
    layer's hook loads changing (an edited copy, as explain's norm ablation does) changes it."""
    from melayer.models.devices import edited_offloaded_param, read_param
    from melayer.models.fingerprint import fingerprint

    assert fingerprint(split.model) == fingerprint(full.model)
    norm = split.model.model.layers[4].input_layernorm
    edited = read_param(norm).clone()
    edited[0] += 1
    with edited_offloaded_param(norm, "weight", edited):
        assert fingerprint(split.model) != fingerprint(full.model)
    assert fingerprint(split.model) == fingerprint(full.model)
    assert norm.weight.device.type == "meta"  # read, not loaded for good


def test_explain_is_identical(full, split):
    from melayer.interventions.explain import explain

    a = explain(full, PROMPTS, ppl_tokens=64, random_draws=1, progress=False).to_dict()
    b = explain(split, PROMPTS, ppl_tokens=64, random_draws=1, progress=False).to_dict()
    a.pop("elapsed_s", None), b.pop("elapsed_s", None)
    assert a["super_weights"] and a == b
    # ablations edited what the offloaded layers load, and nothing stayed edited
    assert split.model.model.layers[4].input_layernorm.weight.device.type == "meta"
    assert torch.equal(full.norm_gain(4, "pre_attn_norm"), split.norm_gain(4, "pre_attn_norm"))


def test_norm_edits_and_neuron_ablations_on_offloaded_layers(full, split):
    """The ablations explain runs: a norm-gain edit on an offloaded layer changes what its hook loads (and is
    undone), and gives the unsplit model's logits exactly."""
    from melayer.interventions.ablate import NeuronAblation, NormEdit, ablated, fingerprint

    edits = [NormEdit(layer=4, role="pre_attn_norm", dims=(3, 7), gain=5.0), NeuronAblation(layer=5, neurons=(1, 2))]
    before = fingerprint(split)
    out = []
    for lm in (full, split):
        batch = melayer.encode(lm, PROMPTS)
        with torch.no_grad():
            plain = lm.model(**batch).logits
            with ablated(lm, edits):
                edited = lm.model(**batch).logits
            assert torch.equal(lm.model(**batch).logits, plain)  # restored
        out.append((plain, edited))
    assert not torch.equal(out[0][0], out[0][1])  # the edits do something
    assert torch.equal(out[0][1], out[1][1])
    assert fingerprint(split) == before and fingerprint(split)["weights"] == fingerprint(full)["weights"]


def test_eval_with_wemask_is_identical(full, split, tmp_path):
    from melayer.eval import run

    res = [run(lm, "lambada", limit=4, batch_size=2, progress=False,
               intervention=lambda lm=lm: melayer.wemask(lm, 0.1, select="weight", me_layer=2)) for lm in (full, split)]
    assert [r["metrics"] for r in res[0].records] == [r["metrics"] for r in res[1].records]


def test_max_memory_offloads_and_gives_the_same_scan(ckpt, full, tmp_path):
    lm = melayer.load(str(ckpt), device_map="auto", max_memory={"cpu": "300KB"}, offload_folder=tmp_path,
                      progress=False)
    assert "disk" in set(lm.model.hf_device_map.values())
    assert melayer.scan(lm, PROMPTS, progress=False).to_dict() == melayer.scan(full, PROMPTS, progress=False).to_dict()


def test_cli_device_map_and_max_memory(ckpt, run_cli, tmp_path):
    base, split_out = tmp_path / "base", tmp_path / "split"
    assert run_cli("scan", "--model", ckpt, "-p", PROMPTS[0], "-o", base, "--no-plots").returncode == 0
    r = run_cli("scan", "--model", ckpt, "-p", PROMPTS[0], "-o", split_out, "--no-plots", "--device-map", "auto",
                "--max-memory", "cpu=300KB")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((base / "scan.json").read_text())["me_layer"] == json.loads(
        (split_out / "scan.json").read_text())["me_layer"]
    bad = run_cli("scan", "--model", ckpt, "-o", tmp_path / "bad", "--max-memory", "cpu")
    assert bad.returncode == 2 and "DEVICE=SIZE" in bad.stderr and "Traceback" not in bad.stderr


def test_parsers():
    from melayer.models.devices import parse_device_map, parse_max_memory

    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    assert parse_device_map("auto") == "auto" and parse_device_map("off") is None
    assert parse_device_map('{"model.layers.3": "disk"}') == {"model.layers.3": "disk"}
    with pytest.raises(MelayerError):
        parse_device_map("gpu-please")
