"""What melayer leaves on a model: nothing on a user's own model given to ``from_model`` (mode, hooks) unless
asked; a removable overflow guard that checks once per forward and names the first bad layer; the ME layer
found by a scan cached on the LM and reused by WeMask."""

from __future__ import annotations

import pytest
import torch

import melayer
from melayer.analysis import me_layer as ME
from melayer.models.guard import OverflowGuard
from melayer.testing import BOS, plant_massive, tiny_lm, tiny_tokenizer
from melayer.util.errors import NumericOverflow

PROMPTS = ["The capital of France is Paris.", "Hello world, this is a test!"]


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_from_model_leaves_a_users_model_as_it_was():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_lm("gpt2", plant=False).config)  # GPT-2 has dropout
    model.train()
    lm = melayer.from_model(model, tiny_tokenizer())
    assert all(m.training for m in model.modules())  # still in training mode
    assert _hook_count(model) == 0 and lm.overflow_guard is None  # nothing installed


def test_the_guard_is_installed_only_when_asked_and_comes_off():
    lm = tiny_lm("llama", plant=False)
    plant_massive(lm, me_layer=1, neuron=5, dim=7, strength=1e6)  # overflows float16
    lm.model.half()
    ids = torch.tensor([[BOS, 40, 41, 42]])
    guard = lm.overflow_guard
    assert isinstance(guard, OverflowGuard) and guard.active
    with pytest.raises(NumericOverflow, match="layer 1 produced inf/nan in float16"):
        lm.model(input_ids=ids)
    assert lm.guard_overflow() is guard  # installed once
    guard.remove()
    assert lm.overflow_guard is None and _hook_count(lm.model) == 0
    logits = lm.model(input_ids=ids).logits  # no guard: the garbage comes back
    assert not bool(torch.isfinite(logits).all())
    # the map is given: deriving it would run a forward of this overflowing model, which the guard stops first
    again = melayer.from_model(lm.model, lm.tokenizer, arch=lm.arch, overflow_guard=True).overflow_guard
    assert again is not None and again is not guard
    with pytest.raises(NumericOverflow, match="layer 1"):
        lm.model(input_ids=ids)


def test_the_guard_records_device_flags_per_layer_and_checks_once():
    lm = tiny_lm("llama")
    seen = []
    last = lm.layers[-1]
    handle = last.register_forward_hook(lambda *_: seen.append(list(lm.overflow_guard._flags)))
    try:
        lm.model(input_ids=torch.tensor([[BOS, 40, 41]]))
    finally:
        handle.remove()
    flags = seen[0]
    # the guard's hook on the last layer was registered first: one flag per layer, tensors, not host bools
    assert [i for i, _, _ in flags] == list(range(lm.num_layers))
    assert all(isinstance(f, torch.Tensor) and f.dtype == torch.bool and f.dim() == 0 for _, f, _ in flags)
    assert lm.overflow_guard._flags == []  # read and cleared by the check at the end of the forward


def test_the_me_layer_is_scanned_once_and_wemask_says_so(monkeypatch):
    lm = tiny_lm("llama", me_layer=2)
    calls = []
    real = ME.scan
    monkeypatch.setattr(ME, "scan", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = melayer.WeMask(lm, 0.05)
    second = melayer.WeMask(lm, 0.1, select="weight")
    assert (first.me_layer, second.me_layer) == (2, 2) and len(calls) == 1
    assert first.me_layer_source == "scan" and second.me_layer_source == "scan (cached on the LM)"
    assert "after ME layer 2, scan" in first.describe()
    given = melayer.WeMask(lm, 0.05, me_layer=1)
    assert given.me_layer_source == "given" and len(calls) == 1
    assert ME.find_me_layer(lm, PROMPTS) == 2 and len(calls) == 2  # other prompts: a new scan
