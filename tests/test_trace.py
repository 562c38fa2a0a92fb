"""``melayer.trace``: activations at the named capture sites, by melayer or TransformerLens names, independent of
batching, with reductions; on tiny real checkpoints."""

from __future__ import annotations

import pytest
import torch

import melayer
from melayer.capture import Hooks, encode, forward_body, read_site
from melayer.testing import tiny_lm
from melayer.util.errors import MelayerError

PROMPTS = ["The cat sat on the mat.", "Hi", "Numbers: 1 2 3 4 5 6 7 8 9 10"]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", me_layer=1, num_layers=4)


def _alone(lm, prompt: str, site: str, layer: int) -> torch.Tensor:
    got = {}
    with Hooks() as hooks, torch.no_grad():
        read_site(hooks, lm, layer, site, lambda x: got.__setitem__("x", x[0].clone()))
        forward_body(lm, encode(lm, [prompt]))
    return got["x"]


def test_trace_equals_each_prompt_run_alone(lm):
    t = melayer.trace(lm, PROMPTS, sites=["resid_out", "attn_in", "down_in"], layers=[1, 3], batch_size=3)
    assert t.layers == [1, 3] and t.sites == ["resid_out", "attn_in", "down_in"]
    for site in t.sites:
        for layer in t.layers:
            for b, prompt in enumerate(PROMPTS):
                x = t[site, layer][b]
                assert x.shape[0] == len(lm.tokenizer(prompt)["input_ids"])
                torch.testing.assert_close(x, _alone(lm, prompt, site, layer), rtol=1e-5, atol=1e-5)


def test_transformer_lens_names_are_aliases(lm):
    t = melayer.trace(lm, PROMPTS, sites=["blocks.1.hook_resid_post", "ln1.hook_out"])
    assert t.sites == ["resid_out", "attn_in"] and t.layers == [1]  # the blocks.L name sets the layer
    assert t["blocks.1.hook_resid_post"] is t["resid_out", 1] and t["hook_resid_post", 1] is t["resid_out", 1]
    assert t["blocks.1.ln1.hook_out"] is t["attn_in", 1]


def test_reductions_find_the_planted_massive_activation(lm):
    t = melayer.trace(lm, PROMPTS, sites="resid_out", layers=[0, 1], reduce="max_abs")
    peak = t.stack("resid_out", 1)  # (prompts, hidden)
    assert peak.shape == (len(PROMPTS), lm.hidden_size)
    assert (peak.argmax(dim=1) == 7).all()  # planted at layer 1, dim 7, on <bos>
    assert (t.stack("resid_out", 0).amax(dim=1) < peak[:, 7]).all()
    full = melayer.trace(lm, PROMPTS, sites="resid_out", layers=1)
    first = melayer.trace(lm, PROMPTS, sites="resid_out", layers=1, reduce="first")
    custom = melayer.trace(lm, PROMPTS, sites="resid_out", layers=1, reduce=lambda x: x.sum(dim=0))
    for b in range(len(PROMPTS)):
        assert torch.equal(first["resid_out", 1][b], full["resid_out", 1][b][0])
        torch.testing.assert_close(custom["resid_out", 1][b], full["resid_out", 1][b].sum(dim=0))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"sites": "resid_middle"}, "unknown site 'resid_middle'"),
    ({"layers": [4]}, "layer 4 is out of range"),
    ({"reduce": "median"}, "unknown reduction 'median'"),
    ({"sites": "post_ffn_out"}, "has no post_ffn_out site"),
])
def test_bad_requests_are_one_clear_error(lm, kwargs, message):
    with pytest.raises(MelayerError, match=message):
        melayer.trace(lm, PROMPTS, **kwargs)


def test_untraced_site_is_a_clear_error(lm):
    t = melayer.trace(lm, PROMPTS[0], layers=[2])
    with pytest.raises(MelayerError, match="was not traced"):
        t["resid_out", 1]
    with pytest.raises(MelayerError, match="names no layer"):
        t["hook_resid_post"]


def test_the_model_objects_trace_is_melayer_trace(lm):
    """``lm.trace`` (a method of the models layer, which cannot import capture) is ``melayer.trace`` on ``lm``:
    the same tensors, the same TransformerLens aliases, the same options and errors."""
    ours = lm.trace(PROMPTS, sites=["blocks.1.hook_resid_post", "attn_in"], reduce="max_abs", batch_size=2)
    root = melayer.trace(lm, PROMPTS, sites=["resid_out", "ln1.hook_out"], layers=[1], reduce="max_abs")
    assert isinstance(ours, melayer.Trace) and ours.sites == root.sites and ours.layers == root.layers == [1]
    for key in (("resid_out", 1), ("attn_in", 1)):
        assert all(torch.equal(a, b) for a, b in zip(ours[key], root[key]))
    full = lm.trace(PROMPTS[0], layers=[3])
    torch.testing.assert_close(full["blocks.3.hook_resid_post"][0], _alone(lm, PROMPTS[0], "resid_out", 3),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(MelayerError, match="layer 4 is out of range"):
        lm.trace(PROMPTS, layers=[4])


def test_the_model_objects_trace_needs_no_capture_import_first(tmp_path):
    """A fresh process that never imported melayer.capture: ``lm.trace`` imports it on the first call."""
    import os
    import subprocess
    import sys

    code = ("import sys; from melayer.testing import tiny_lm; lm = tiny_lm('llama', me_layer=1, num_layers=2); "
            "before = 'melayer.capture.trace' in sys.modules; t = lm.trace('Hello there', layers=1); "
            "print(before, t['resid_out', 1][0].shape[-1])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.stdout.split() == ["False", "64"]
