"""Slow: melayer.scan on the real embedded models (each loaded and scanned once per session, default prompts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import sig

import melayer
from melayer.analysis.scan import default_prompts
from melayer.models.cache import cache_dir

pytestmark = pytest.mark.slow


def test_gemma_me_layer_3_dim_163_on_bos(gemma, gemma_scan):
    """The README's figures for `melayer scan` on Gemma-3-270M, at the precision the README states them."""
    r = gemma_scan
    assert (gemma.num_layers, gemma.hidden_size, gemma.arch.name) == (18, 640, "gemma2")
    assert len(r.prompts) == len(default_prompts()) == 111
    # ME layer 3, consistency 100 % of 109 voting prompts, <bos> in 111/111 prompts, dim 163
    assert r.me_layer == 3 and r.me_layer_consistency == 1.0
    assert sum(p.eligible for p in r.prompts) == 109
    assert all(p.me_layer == 3 for p in r.prompts)
    assert r.massive_dims == [163] and r.dim_support() == {163: 1.0}
    assert r.massive_tokens() == [{"position": 0, "token": "<bos>", "prompts": 111}]
    # |a| = 1.04e4 at layer 3 (5,200x the median), 1.04e5 at layer 14, still 66,000 at the last layer
    rows = r.per_layer()
    assert sig(rows[3]["top1_mean"], 3) == 1.04e4
    assert sig(rows[3]["top1_mean"] / rows[3]["median"], 2) == 5200
    assert sig(rows[14]["top1_mean"], 3) == 1.04e5
    assert sig(rows[17]["top1_mean"], 2) == 66_000
    assert max(range(18), key=lambda layer: rows[layer]["top1_mean"]) == 14
    peak = r.peak()
    assert (peak["layer"], peak["dim"], peak["token"]) == (14, 163, "<bos>") and sig(abs(peak["value"]), 3) == 1.04e5
    # dim 400 is a precursor: massive on <bos> at layers 0-2 (up to 6,200) in every prompt, then it decays
    # (to ~750 by layer 13) while the median grows; it never persists and never counts as the ME layer
    assert {x["dim"] for x in r.precursors} == {400}
    assert {x["layer"] for x in r.precursors} == {0, 1, 2}
    for layer in (0, 1, 2):
        on_bos = {x["prompt"] for x in r.precursors if x["layer"] == layer and x["position"] == 0}
        assert len(on_bos) == 111, layer
    assert sig(max(abs(x["value"]) for x in r.precursors), 2) == 6200
    dim400 = [row[400] for row in r.profile["abs"]]
    assert dim400[13] == pytest.approx(750, rel=0.05)
    assert 400 not in {x["dim"] for x in r.massive}
    # born at layer 3 in every prompt and persisting (> 100 x median) from there on
    assert rows[3]["massive_share"] == 1.0
    assert all((0, 163) in p.persistent for p in r.prompts)


def test_gemma_scan_json_is_valid_json(gemma_scan, tmp_path):
    from melayer.util.io import write_json

    write_json(tmp_path / "scan.json", gemma_scan.to_dict())
    d = json.loads((tmp_path / "scan.json").read_text())
    assert d["me_layer"] == 3 and d["massive_dims"] == [163]
    assert len(d["massive_token_profile"]["abs"]) == 18 and len(d["massive_token_profile"]["abs"][0]) == 640


def test_gemma_warm_start_reuses_the_cached_conversion(gemma):
    """A second load reads the HF directory the first one converted, and rewrites nothing in it (the start-up
    time itself is measured by bench/bench_scan.py, not asserted here)."""
    cached = Path(gemma.source)
    assert cached.is_dir() and cached.is_relative_to(cache_dir())
    before = {p: p.stat().st_mtime_ns for p in cached.rglob("*") if p.is_file()}
    again = melayer.load(progress=False)
    assert again.source == gemma.source and again.num_layers == 18
    assert {p: p.stat().st_mtime_ns for p in cached.rglob("*") if p.is_file()} == before
    name, weight = next(iter(gemma.model.state_dict().items()))
    assert torch.equal(again.model.state_dict()[name], weight)


def test_smollm2_me_layer_11_dim_507_on_the_first_token(smollm2, smollm2_scan):
    """The README's figures for `melayer scan --model smollm2-135m`."""
    r = smollm2_scan
    assert (smollm2.num_layers, smollm2.hidden_size, smollm2.arch.name) == (30, 576, "llama")
    assert r.me_layer == 11 and r.me_layer_consistency == 1.0
    assert all(p.me_layer == 11 for p in r.prompts)
    # dim 507 in every voting prompt (and, not in the README, dim 247 of the first token in 2 of 109)
    assert r.dim_support() == {247: pytest.approx(2 / 109), 507: 1.0}
    # no BOS: the massive token is the first token itself ("The", "What", ...), in all 111 prompts; in 2 the
    # second token is massive too
    tokens = r.massive_tokens()
    assert sum(t["prompts"] for t in tokens if t["position"] == 0) == 111
    assert sum(t["prompts"] for t in tokens if t["position"] == 1) == 2
    assert tokens[0] == {"position": 0, "token": "The", "prompts": 26} and tokens[1]["token"] == "What"
    # the mean top-1 |a| jumps from 106 at layer 10 to 23,124 at layer 11 (peak 27,347, 15,900x the median)
    rows = r.per_layer()
    assert (round(rows[10]["top1_mean"]), round(rows[11]["top1_mean"])) == (106, 23124)
    peak = r.peak()
    assert (peak["layer"], peak["dim"], round(abs(peak["value"]))) == (11, 507, 27347)
    assert sig(peak["ratio_to_median"], 3) == 15900
    # one precursor, at layer 2 on dim 507
    assert [(x["layer"], x["dim"]) for x in r.precursors] == [(2, 507)]
