"""Issue 9 (speed): the batching plan and the streaming reduction give the same results as the plain paths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from melayer.capture import Hooks, encode, forward_body, left_pad
from melayer.capture.batching import CPU, GPU, in_input_order, plan_batches, policy_for
from melayer.capture.reduce import LayerReducer, lower_median
from melayer.testing import tiny_lm
from melayer.util.errors import NumericOverflow

TEXTS = [
    "The capital of France is Paris, a city on the Seine.",
    "Hi",
    "Hello world, this is a test of the scanner.",
    "1 2 3 4 5 6 7 8 9 10",
    "Massive activations sit on the first token.",
    "abc",
    "Hello world, this is a test of the scanner!",
]


# -- batching ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plan_covers_every_prompt_once_and_respects_budgets(device):
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(1, 600, size=200)] + [4096, 3, 3, 3]
    plan = plan_batches(lengths, device=device)
    flat = sorted(i for b in plan for i in b)
    assert flat == list(range(len(lengths)))
    pol = policy_for(device)
    for b in plan:
        width = max(lengths[i] for i in b)
        assert len(b) <= pol.max_batch
        assert len(b) == 1 or len(b) * width <= pol.max_tokens
        pad = sum(width - lengths[i] for i in b)
        if width > pol.short:  # long rows are never padded
            assert pad == 0
        else:
            assert pad <= pol.pad_frac * len(b) * width


def test_plan_cpu_keeps_long_prompts_unpadded_and_groups_equal_lengths():
    lengths = [500, 300, 500, 12, 12, 11, 12, 40]
    plan = plan_batches(lengths, device="cpu")
    assert [0] in plan and [2] in plan and [1] in plan  # long prompts alone (over the CPU token budget)
    assert any(set(b) >= {3, 4, 6} for b in plan)  # short prompts of (almost) equal length together
    assert plan_batches([300, 300], device="cuda") == [[0, 1]]
    assert policy_for("cpu") is CPU and policy_for("cuda:0") is GPU


def test_plan_user_cap_and_custom_cost():
    lengths = [10] * 20
    assert all(len(b) <= 3 for b in plan_batches(lengths, max_batch=3))
    plan = plan_batches(lengths, cost=lambda rows, width: rows * width * width, max_cost=250)
    assert all(len(b) * 100 <= 250 for b in plan) and sum(map(len, plan)) == 20


def test_in_input_order_and_left_pad():
    assert in_input_order([(2, "c"), (0, "a"), (1, "b")]) == ["a", "b", "c"]
    batch = left_pad([[5, 6, 7], [8]], pad=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


# -- the streaming reduction ---------------------------------------------------------------------------


def test_lower_median_matches_torch():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 10, 1001):
        x = torch.randn(n, generator=g)
        assert lower_median(x) == float(x.median())


def _run(lm, texts, reducer=None):
    """Run ``texts`` as one left-padded batch; returns the reducer's rows and every layer's full output."""
    full: list[torch.Tensor] = []
    with torch.no_grad(), Hooks() as hooks:
        for i, layer in enumerate(lm.layers):
            if reducer is not None:
                hooks.forward(layer, reducer.hook(i))
            hooks.forward(layer, lambda m, a, o: full.append((o[0] if isinstance(o, tuple) else o).clone()))
        batch = encode(lm, texts)
        if reducer is not None:
            reducer.start(batch["attention_mask"])
        forward_body(lm, batch)
    return (reducer.per_row if reducer is not None else None), full, batch["attention_mask"]


def _reference(full, mask, b, median_ratio, abs_min, top_k=8, max_massive=256, n_cand=4):
    """The plain full-size reduction of row ``b``: sort everything, compare everything."""
    off = int((mask[b] == 0).sum())
    out, watch = [], {}
    for h in full:
        x = h[b, off:]  # (n, H): the row's real tokens
        n, H = x.shape
        a = x.abs().reshape(-1)
        median = float(a.median())
        cut = float((torch.tensor(median) * median_ratio).clamp(min=abs_min))
        order = torch.argsort(a, descending=True, stable=True)
        top = [(float(x.reshape(-1)[i]), int(i) // H, int(i) % H) for i in order[:top_k]]
        massive = [(float(x.reshape(-1)[i]), int(i) // H, int(i) % H) for i in order[:max_massive] if a[i] > cut]
        watched = {k: float(x[k[0], k[1]]) for k in watch}
        for _, p, d in massive:
            if len(watch) < max_massive:
                watch.setdefault((p, d))
        cands = torch.argsort(x.abs().amax(-1), descending=True, stable=True)[: min(n_cand, n)].tolist() + [0]
        rows = {c: x[c].abs().tolist() for c in cands}
        out.append({"median": median, "top": top, "massive": massive, "rows": rows, "watched": watched})
    return out


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_reducer_equals_the_plain_reduction(model_type):
    """The fast reducer finds exactly what sorting and comparing the full layer outputs finds, row by row, on a
    left-padded batch (so a prompt's result does not depend on the rest of its batch)."""
    lm = tiny_lm(model_type, me_layer=1)
    red = LayerReducer(median_ratio=1000.0, abs_min=100.0)
    rows, full, mask = _run(lm, TEXTS, red)
    found = 0
    for b in range(len(TEXTS)):
        ref = _reference(full, mask, b, 1000.0, 100.0)
        for got, want in zip(rows[b], ref):
            assert got["median"] == want["median"]
            assert got["top"] == want["top"]
            assert got["massive"] == want["massive"]
            assert got["watched"] == want["watched"]
            assert {k: v.tolist() for k, v in got["rows"].items()} == want["rows"]
            found += bool(got["massive"])
    assert found  # the planted massive activation is there


def test_reducer_raises_on_overflow():
    red = LayerReducer(median_ratio=1000.0, abs_min=100.0)
    red.start(torch.ones(1, 3, dtype=torch.long))
    h = torch.zeros(1, 3, 16)
    h[0, 2, 3] = float("nan")
    with pytest.raises(NumericOverflow):
        red.reduce(0, h)
    h[0, 2, 3] = float("inf")
    with pytest.raises(NumericOverflow):
        red.reduce(0, h)


def test_scan_results_do_not_depend_on_the_batching():
    """Length-sorted batches give the prompts back in input order with the same findings as one at a time."""
    import melayer

    lm = tiny_lm("llama", me_layer=1)
    texts = TEXTS * 3
    auto = melayer.scan(lm, texts, progress=False)
    ones = melayer.scan(lm, texts, batch_size=1, progress=False)
    assert [p.text for p in auto.prompts] == texts and [p.index for p in auto.prompts] == list(range(len(texts)))
    assert auto.me_layer == ones.me_layer and auto.massive_dims == ones.massive_dims
    for p, q in zip(auto.prompts, ones.prompts):
        assert p.tokens == q.tokens and p.me_layer == q.me_layer and p.persistent == q.persistent
        assert [[(pos, d) for _, pos, d in layer] for layer in p.massive] == \
               [[(pos, d) for _, pos, d in layer] for layer in q.massive]
        assert np.allclose(p.medians, q.medians, rtol=1e-4, atol=1e-6)
    assert auto.to_dict()["massive_token_profile"] == ones.to_dict()["massive_token_profile"] or np.allclose(
        auto.profile["abs"], ones.profile["abs"], rtol=1e-4, atol=1e-5, equal_nan=True)


# -- GGUF conversion -----------------------------------------------------------------------------------


def _library_gguf_tensors(path):
    """The state dict transformers' own ``from_pretrained(gguf_file=...)`` loads (the reference)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.state_dict(), model.config


def _melayer_gguf_tensors(path):
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from melayer.models.convert import gguf_state_dict

    meta = load_gguf_checkpoint(str(path), return_tensors=False)
    return gguf_state_dict(path, AutoConfig.for_model(**meta["config"]), meta)


def _assert_same_tensors(ours, ref):
    ref = {k: v for k, v in ref.items() if k in ours or k != "lm_head.weight"}  # a tied head is not stored
    assert sorted(ours) == sorted(ref)
    assert [k for k in ref if not torch.equal(ours[k], ref[k])] == []


def test_conversion_reads_the_same_tensors_as_transformers(tiny_gguf):
    """melayer's tensor pass (its own header parse + transformers' processors and key map + gguf's dequantisation)
    gives transformers' own GGUF loading bit for bit."""
    ref, _ = _library_gguf_tensors(tiny_gguf)
    _assert_same_tensors(_melayer_gguf_tensors(tiny_gguf), ref)


@pytest.mark.slow
def test_conversion_reads_the_same_tensors_as_transformers_on_a_quantised_file():
    """The same on the embedded SmolLM2-135M GGUF (Q4_1 blocks, Llama's rotary permutation of q/k)."""
    from melayer.models.embedded import EMBEDDED

    path = EMBEDDED["smollm2-135m"][1]()
    ref, _ = _library_gguf_tensors(path)
    _assert_same_tensors(_melayer_gguf_tensors(path), ref)


def test_conversion_phases_one_progress_display_and_the_fresh_model(tmp_path, monkeypatch, tiny_gguf, run_cli):
    """The conversion reports its phases, the model it built is used as is for the first load (the same logits as
    reading the cache back), and transformers' own tqdm bar stays off stderr."""
    import melayer
    from melayer.models import convert

    monkeypatch.setenv("MELAYER_CACHE", str(tmp_path / "cache"))
    first = melayer.load(str(tiny_gguf), progress=False)
    assert list(convert.convert_timings) == ["reading the GGUF metadata", "rebuilding the tokenizer",
                                             "dequantising the weights", "saving"]
    again = melayer.load(str(tiny_gguf), progress=False)  # from the cache on disk
    assert again.model is not first.model
    batch = again.tokenizer(["The capital of France is Paris."], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(first.model(**batch).logits, again.model(**batch).logits)

    res = run_cli("scan", "-m", tiny_gguf, "-p", "Hello world, this is a test!", "-o", tmp_path / "out", "--no-plots",
                  env={"MELAYER_CACHE": str(tmp_path / "cli-cache"), "MELAYER_QUIET": ""})
    assert res.returncode == 0, res.stderr
    assert "de-quantizing" not in res.stderr and "it/s]" not in res.stderr


def _trained_bpe(pre_tokenizer: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    if pre_tokenizer:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"], show_progress=False))
    return tok


@pytest.mark.parametrize("pre_tokenizer", [True, False])
def test_compact_merges_is_lossless_or_left_alone(tmp_path, pre_tokenizer):
    """The cache's tokenizer.json gets string merges only when no merged piece holds a space (a piece with a space
    cannot be written as "a b"); the rewritten file tokenizes exactly like the original."""
    import json

    from tokenizers import Tokenizer

    from melayer.models.convert import compact_merges

    path = tmp_path / "tokenizer.json"
    _trained_bpe(pre_tokenizer).save(str(path))
    before = path.read_text()
    merges = json.loads(before)["model"]["merges"]
    has_space = any(" " in piece for pair in merges for piece in pair)
    assert has_space is (not pre_tokenizer)  # without a pre-tokenizer BPE merges across spaces
    assert compact_merges(path) is (not has_space)
    after = json.loads(path.read_text())["model"]["merges"]
    if has_space:
        assert path.read_text() == before
    else:
        assert after == [f"{a} {b}" for a, b in merges]
        old, new = Tokenizer.from_str(before), Tokenizer.from_file(str(path))
        for text in ["the cat sat on the log", "a dog and a mat, the end", "unseen words: zebra"]:
            assert new.encode(text).ids == old.encode(text).ids
        assert new.to_str() == old.to_str()


def test_generation_plan_sorts_by_length_and_fills_batches():
    from melayer.capture.batching import GENERATE

    lengths = [30, 5, 29, 6, 31, 4, 28, 7]
    plan = plan_batches(lengths, policy=GENERATE, max_batch=4)
    assert plan == [[4, 0, 2, 6], [7, 3, 1, 5]]


def _close_tree(a, b, path="$"):
    """Nested JSON-like values equal, floats to 1e-4 relative."""
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, rel=1e-4, abs=1e-6), path
    else:
        assert a == b, path


MIXED = ["The cat sat on the mat.", "Hello world, hello again", "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12",
         "Another prompt here!", "x" * 90, "The cat sat on the hat.", "A much longer prompt " * 6]


def test_sinks_rigidity_and_attribution_do_not_depend_on_the_batching():
    """Sinks, rigidity and explain's per-layer recording run through the shared planner (prompts out of input
    order, padded or not); their results equal one prompt at a time, in input order."""
    from melayer.analysis.attribution import record_layers
    from melayer.analysis.rigidity import rigidity
    from melayer.analysis.sinks import measure_sinks

    lm = tiny_lm("llama", me_layer=1, num_layers=4)
    a = measure_sinks(lm, MIXED, massive_positions=[0] * len(MIXED), min_tokens=None, max_tokens=None)
    b = measure_sinks(lm, MIXED, massive_positions=[0] * len(MIXED), min_tokens=None, max_tokens=None, batch_size=1)
    assert a.tokens_per_prompt == b.tokens_per_prompt == [len(lm.tokenizer(p)["input_ids"]) for p in MIXED]
    np.testing.assert_allclose(a.alpha_first, b.alpha_first, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.alpha_massive, b.alpha_massive, rtol=1e-4, atol=1e-6)
    _close_tree(rigidity(lm, MIXED, progress=False).to_dict(), rigidity(lm, MIXED, batch_size=1, progress=False).to_dict())
    positions = [1, 2, 0, 3, 5, 1, 4]
    ra = record_layers(lm, MIXED, positions, [1, 2])
    rb = record_layers(lm, MIXED, positions, [1, 2], batch_size=1)
    for layer in (1, 2):
        for site, x in ra[layer].items():
            if isinstance(x, torch.Tensor):
                torch.testing.assert_close(x, rb[layer][site], rtol=1e-4, atol=1e-5)
        _close_tree(ra[layer]["norm_scale"], rb[layer]["norm_scale"])
