"""Slow: melayer.scan on the real embedded models (each loaded and scanned once per session, default prompts)."""

from __future__ import annotations

import json
import time

import pytest

import melayer
from melayer.analysis.scan import default_prompts

pytestmark = pytest.mark.slow


def test_gemma_me_layer_3_dim_163_on_bos(gemma, gemma_scan):
    r = gemma_scan
    assert (gemma.num_layers, gemma.hidden_size, gemma.arch.name) == (18, 640, "gemma2")
    assert len(r.prompts) == len(default_prompts()) == 111
    assert r.me_layer == 3
    assert r.me_layer_consistency == 1.0
    assert all(p.me_layer == 3 for p in r.prompts)
    assert r.massive_dims == [163] and r.dim_support()[163] == 1.0
    tokens = r.massive_tokens()
    assert tokens == [{"position": 0, "token": "<bos>", "prompts": 111}]
    peak = r.peak()
    assert peak["dim"] == 163 and peak["token"] == "<bos>" and abs(peak["value"]) > 5e4
    # dim 400 is a precursor: massive on <bos> at layers 0-2 in every prompt (at layer 1 on many other
    # tokens too), never counted as the ME layer
    assert {x["dim"] for x in r.precursors} == {400}
    assert {x["layer"] for x in r.precursors} == {0, 1, 2}
    for layer in (0, 1, 2):
        on_bos = {x["prompt"] for x in r.precursors if x["layer"] == layer and x["position"] == 0}
        assert len(on_bos) == 111, layer
    assert 400 not in {x["dim"] for x in r.massive}
    # born at layer 3 in every prompt and persisting (> 100 x median) from there on
    assert r.per_layer()[3]["massive_share"] == 1.0
    assert all((0, 163) in p.persistent for p in r.prompts)


def test_gemma_scan_json_is_valid_json(gemma_scan, tmp_path):
    from melayer.util.io import write_json

    write_json(tmp_path / "scan.json", gemma_scan.to_dict())
    d = json.loads((tmp_path / "scan.json").read_text())
    assert d["me_layer"] == 3 and d["massive_dims"] == [163]
    assert len(d["massive_token_profile"]["abs"]) == 18 and len(d["massive_token_profile"]["abs"][0]) == 640


def test_gemma_warm_start_from_cache(gemma):
    """Sanity bound only (the real start-up target is in bench/): the cached conversion is reused."""
    t0 = time.perf_counter()
    again = melayer.load(progress=False)
    elapsed = time.perf_counter() - t0
    assert again.source == gemma.source and again.num_layers == 18
    assert elapsed < 10, f"warm load took {elapsed:.1f} s"


def test_smollm2_has_a_persistent_me_layer(smollm2, smollm2_scan):
    r = smollm2_scan
    assert (smollm2.num_layers, smollm2.hidden_size, smollm2.arch.name) == (30, 576, "llama")
    # measured: the first token's dim 507 jumps ~200x (|a| ~100 -> ~23000) at layer 11 and stays there
    assert r.me_layer == 11
    assert r.me_layer_consistency >= 0.9
    assert 507 in r.massive_dims and r.dim_support()[507] >= 0.9
    # SmolLM2's tokenizer adds no BOS: the massive token is whatever comes first (in 2 of 111 prompts the
    # second token is massive too)
    tokens = r.massive_tokens()
    first = sum(t["prompts"] for t in tokens if t["position"] == 0)
    assert first >= 0.9 * len(r.prompts)
    assert first >= 0.9 * sum(t["prompts"] for t in tokens)
    rows = r.per_layer()
    assert rows[r.me_layer]["massive_share"] >= 0.9
    persisting = [row["massive_share"] >= 0.9 for row in rows[r.me_layer:]]
    assert sum(persisting) >= 0.75 * len(persisting)
    assert abs(r.peak()["value"]) > 1e4 and r.peak()["dim"] == 507
