"""WeMask: masking site, token choice under KV-cached generation and padding, exact restore, CLI, lm-eval."""

from __future__ import annotations

import json
import math
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import argmax_decode

from melayer.capture import encode, position_ids
from melayer.capture.hooks import Hooks
from melayer.interventions.generate import greedy_generate
from melayer.interventions.wemask import WeMask, format_layers, parse_layers, wemask
from melayer.testing import BOS, MODEL_TYPES, tiny_lm
from melayer.util.errors import MelayerError

PROMPTS = ["hello there, friend", "hi"]  # the second row is left-padded
LAYERS = [2, 3]  # tiny models: 4 layers, massive activation planted at layer 1
RATE = 0.1  # hidden 64 -> k = 6


@pytest.fixture(scope="module")
def tiny():
    cache: dict[str, object] = {}

    def get(model_type: str = "llama"):
        if model_type not in cache:
            cache[model_type] = tiny_lm(model_type)
        return cache[model_type]

    return get


def logits(lm, batch):
    with torch.no_grad():
        return lm.model(**batch, position_ids=position_ids(batch["attention_mask"]), use_cache=False).logits


def all_hook_counts(model):
    return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()]


@contextmanager
def instrument(lm, layer: int, wm: WeMask):
    """Record what WeMask's pre-hook changed in the attention input of ``layer``: a pre-hook registered
    before WeMask's snapshots the input, one registered after it diffs. Yields a list of
    (chunk length, {(row, position): [changed dims]}) per forward pass."""
    attn = lm.module(layer, "attn")
    log: list[tuple[int, dict[tuple[int, int], list[int]]]] = []
    seen: dict[str, torch.Tensor] = {}

    def get(args, kwargs):
        return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    def before(mod, args, kwargs):
        seen["h"] = get(args, kwargs).detach().clone()

    def after(mod, args, kwargs):
        h = get(args, kwargs)
        changed: dict[tuple[int, int], list[int]] = {}
        for r, p, d in (h != seen["h"]).nonzero().tolist():
            changed.setdefault((r, p), []).append(d)
        log.append((h.shape[1], changed))

    with Hooks() as hooks:
        hooks.pre(attn, before, with_kwargs=True)
        wm.apply()
        hooks.pre(attn, after, with_kwargs=True)
        try:
            yield log
        finally:
            wm.remove()


# ----------------------------------------------------------------------------------------------------
# every mapped architecture: KV-cached generate == no-cache recompute under the mask; exact restore


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cache_equals_recompute_and_exact_restore(tiny, model_type):
    lm = tiny(model_type)
    batch = encode(lm, PROMPTS)
    hooks_before = all_hook_counts(lm.model)
    params_before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    base = logits(lm, batch)
    n_new = 4
    with wemask(lm, RATE, layers=LAYERS) as wm:
        assert wm.k == 6
        with torch.no_grad():
            out = lm.model.generate(**batch, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        full_mask = torch.cat([batch["attention_mask"], torch.ones(2, n_new, dtype=torch.long)], dim=1)
        recompute = logits(lm, {"input_ids": out.sequences, "attention_mask": full_mask})
        masked_prompt = logits(lm, batch)
    T = batch["input_ids"].shape[1]
    for i, step in enumerate(out.logits):
        ref = recompute[:, T - 1 + i]
        rel = float((step - ref).abs().max() / ref.abs().max())
        assert rel < 1e-4, f"{model_type}: decode step {i} differs from the no-cache recompute (rel {rel:.2e})"
    # the mask does something, on every row (incl. the left-padded one), and only while applied
    real = batch["attention_mask"].bool()
    for row in range(2):
        assert (masked_prompt[row][real[row]] - base[row][real[row]]).abs().max() > 1e-4
    after = logits(lm, batch)
    assert torch.equal(after, base), "model not restored bit-exactly"
    assert all_hook_counts(lm.model) == hooks_before
    assert all(torch.equal(v, params_before[k]) for k, v in lm.model.state_dict().items())


# ----------------------------------------------------------------------------------------------------
# which tokens are masked


@pytest.mark.parametrize("model_type", ["llama", "olmo2", "gpt2"])
def test_only_first_real_token_masked_never_decode_steps(tiny, model_type):
    lm = tiny(model_type)
    batch = encode(lm, PROMPTS)
    first = batch["attention_mask"].argmax(dim=1).tolist()
    assert first[0] == 0 and first[1] > 0  # row 1 is left-padded
    wm = WeMask(lm, RATE, layers=LAYERS)
    with instrument(lm, 3, wm) as log, torch.no_grad():
        lm.model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                          pad_token_id=lm.tokenizer.pad_token_id)
    prefill, *decode = log
    assert prefill[0] == batch["input_ids"].shape[1]
    # each row masks exactly its own first real token (not position 0 of the padded row), k dims each
    assert sorted(prefill[1]) == [(0, first[0]), (1, first[1])]
    assert all(len(dims) == wm.k for dims in prefill[1].values())
    assert len(decode) == 4 and all(length == 1 and not changed for length, changed in decode)
    # the record matches what was changed (absolute positions)
    rec = wm.to_dict()["masked_tokens"]["3"]
    assert {(r["row"], r["position"]): r["dims"] for r in rec} == {k: sorted(v) for k, v in prefill[1].items()}


def test_masked_dims_are_the_top_abs_activation_dims(tiny):
    lm = tiny("llama")
    batch = encode(lm, ["abc"])
    seen = {}

    def grab(mod, args, kwargs):
        seen["h"] = kwargs["hidden_states"][0, 0].clone()

    with Hooks() as hooks:
        hooks.pre(lm.module(2, "attn"), grab, with_kwargs=True)
        logits(lm, batch)
    expected = sorted(seen["h"].abs().topk(6).indices.tolist())
    assert lm.plant.dim in expected  # the planted massive dim is among them
    wm = WeMask(lm, RATE, layers=[2])
    with instrument(lm, 2, wm) as log:
        logits(lm, batch)
    assert sorted(log[0][1][(0, 0)]) == expected == wm.masked_dims()[2]


def test_gamma_scales_instead_of_zeroing(tiny):
    lm = tiny("llama")
    batch = encode(lm, ["abc"])
    got = {}

    def grab(key):
        def fn(mod, args, kwargs):
            got[key] = kwargs["hidden_states"][0, 0].clone()
        return fn

    wm = WeMask(lm, RATE, layers=[2], gamma=0.25)
    with Hooks() as hooks:
        hooks.pre(lm.module(2, "attn"), grab("before"), with_kwargs=True)
        wm.apply()
        hooks.pre(lm.module(2, "attn"), grab("after"), with_kwargs=True)
        logits(lm, batch)
        wm.remove()
    dims = wm.masked_dims()[2]
    assert torch.allclose(got["after"][dims], 0.75 * got["before"][dims])
    others = [d for d in range(lm.hidden_size) if d not in dims]
    assert torch.equal(got["after"][others], got["before"][others])


def test_token_rule_massive(tiny):
    lm = tiny("llama")
    batch = encode(lm, PROMPTS)
    first = batch["attention_mask"].argmax(dim=1).tolist()
    wm = WeMask(lm, RATE, layers=LAYERS, token="massive")
    with instrument(lm, 2, wm) as log, torch.no_grad():
        lm.model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                          pad_token_id=lm.tokenizer.pad_token_id)
    # the planted massive token is BOS, i.e. each row's first real token; decode steps untouched
    assert sorted(log[0][1]) == [(0, first[0]), (1, first[1])]
    assert all(not changed for _, changed in log[1:])
    assert wm.to_dict()["criterion"]["abs_min"] == 100.0


# ----------------------------------------------------------------------------------------------------
# select="weight"


def test_select_weight_picks_top_gain_dims():
    lm = tiny_lm("llama")
    norm = lm.module(2, "pre_attn_norm")
    top = [3, 11, 20, 33, 47, 60]
    with torch.no_grad():
        norm.weight.fill_(1.0)
        norm.weight[top] = torch.tensor([4.0, -5.0, 3.0, 6.0, -3.5, 2.5])  # |gain| decides, sign does not
    wm = WeMask(lm, RATE, layers=[2, 3], select="weight")
    assert wm.masked_dims()[2] == sorted(top)
    batch = encode(lm, ["abcd"])
    with instrument(lm, 2, wm) as log:
        logits(lm, batch)
    assert set(log[0][1][(0, 0)]) <= set(top) and len(log[0][1][(0, 0)]) >= 5
    assert wm.to_dict()["masked_dims"]["2"] == sorted(top)


def test_select_weight_uses_effective_gain_gemma():
    lm = tiny_lm("gemma")  # gain = 1 + weight
    norm = lm.module(2, "pre_attn_norm")
    top = [1, 2, 3, 4, 5, 6]
    with torch.no_grad():
        norm.weight.zero_()
        norm.weight[top] = 0.5  # gain 1.5
        norm.weight[9] = -1.0  # largest |weight|, but gain 0
    wm = WeMask(lm, RATE, layers=[2], select="weight")
    assert wm.masked_dims()[2] == top


def test_select_weight_without_pre_attn_norm_is_an_error(tiny):
    with pytest.raises(MelayerError, match="pre-attention norm"):
        WeMask(tiny("olmo2"), RATE, layers=LAYERS, select="weight")


# ----------------------------------------------------------------------------------------------------
# validation, defaults, records


@pytest.mark.parametrize("kwargs, message", [
    ({"rate": -0.01}, r"rate must be in \[0, 1\]"),
    ({"rate": 1.5}, r"rate must be in \[0, 1\]"),
    ({"rate": "lots"}, "must be numbers"),
    ({"rate": 0.1, "gamma": 2.0}, "gamma"),
    ({"rate": 0.1, "select": "random"}, "select rule"),
    ({"rate": 0.1, "token": "last"}, "token rule"),
    ({"rate": 0.1, "layers": [7]}, "out of range"),
    ({"rate": 0.1, "layers": "2-x"}, "invalid layer list"),
    ({"rate": 0.1, "me_layer": 9}, "out of range"),
    ({"rate": 0.1, "me_layer": 3}, "last layer"),
])
def test_validation(tiny, kwargs, message):
    with pytest.raises(MelayerError, match=message):
        WeMask(tiny("llama"), **kwargs)


def test_rate_zero_is_a_noop(tiny):
    lm = tiny("llama")
    batch = encode(lm, PROMPTS)
    base = logits(lm, batch)
    hooks_before = all_hook_counts(lm.model)
    with wemask(lm, 0.0, me_layer=1) as wm:
        assert wm.is_noop and all_hook_counts(lm.model) == hooks_before
        assert torch.equal(logits(lm, batch), base)
    assert wm.to_dict()["k"] == 0 and "off" in wm.describe()


def test_default_layers_follow_the_me_layer(tiny):
    lm = tiny("llama")
    assert WeMask(lm, RATE, me_layer=1).layers == [2, 3]
    # no me_layer: found by melayer.scan (a few prompts here to stay fast; default: the shipped prompts)
    wm = WeMask(lm, RATE, scan_prompts=["hello world, how are you", "the cat sat on the mat"])
    assert (wm.me_layer, wm.me_layer_source, wm.layers) == (1, "scan", [2, 3])


def test_apply_remove_persistent_and_double_apply(tiny):
    lm = tiny("llama")
    batch = encode(lm, PROMPTS)
    base = logits(lm, batch)
    wm = wemask(lm, RATE, layers=LAYERS).apply()
    try:
        assert wm.active
        masked = logits(lm, batch)
        assert torch.equal(logits(lm, batch), masked)  # persistent and deterministic
        with pytest.raises(MelayerError, match="already applied"):
            wm.apply()
    finally:
        wm.remove()
    assert torch.equal(logits(lm, batch), base)
    d = wm.to_dict()
    assert d["schema"] == "melayer.wemask/1" and d["layers"] == LAYERS and d["k"] == 6
    assert d["select"] == "activation" and d["token"] == "first" and d["gamma"] == 1.0
    assert set(d["masked_dims"]) == {"2", "3"} and all(len(v) == 6 for v in d["masked_dims"].values())
    json.dumps(d)


def test_parse_layers():
    assert parse_layers("4-6,9", 18) == [4, 5, 6, 9]
    assert parse_layers("4;5 6", 18) == [4, 5, 6]
    assert parse_layers(3, 18) == [3]
    assert parse_layers(None, 18) is None
    assert format_layers([4, 5, 6, 9]) == "4-6,9"
    with pytest.raises(MelayerError):
        parse_layers("6-4", 18)


# ----------------------------------------------------------------------------------------------------
# CLI


def test_cli_generate(tiny_dir, tmp_path, capsys, monkeypatch):
    from melayer.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["melayer", "generate", "--model", str(tiny_dir), *args])
        try:
            main()
        except SystemExit as exc:
            return exc.code, capsys.readouterr()
        return 0, capsys.readouterr()

    code, plain = run("--prompt", "hello", "--max-new-tokens", "6")
    assert code == 0 and plain.out.strip()
    out_json = tmp_path / "g.json"
    code, masked = run("--prompt", "hello", "--max-new-tokens", "6", "--wemask", "0.1", "--layers", "2-3", "-o", str(out_json))
    assert code == 0 and "k=6" in masked.err and "layers 2-3" in masked.err
    data = json.loads(out_json.read_text())
    assert data["wemask"]["layers"] == [2, 3] and data["text"] == masked.out.rstrip("\n")
    # the same texts as an independent greedy decode (full forward per step, no cache), without and with the mask
    lm = tiny_lm("llama")
    ids = lm.tokenizer("hello")["input_ids"]
    eos = (lm.tokenizer.eos_token_id,)
    assert plain.out.rstrip("\n") == lm.tokenizer.decode(argmax_decode(lm, ids, 6, eos)[0])
    with wemask(lm, 0.1, layers="2-3"):
        masked_ref, _ = argmax_decode(lm, ids, 6, eos)
        texts, batch, out = greedy_generate(lm, ["hello"], max_new_tokens=6)
    assert out[0, batch["input_ids"].shape[1]:].tolist() == masked_ref
    assert data["text"] == lm.tokenizer.decode(masked_ref) == texts[0]
    code, bad = run("--prompt", "hello", "--wemask", "2")
    assert code == 2 and bad.err.startswith("melayer: error:") and len(bad.err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------
# lm-eval


def write_task(root: Path) -> list[str]:
    data = root / "data.jsonl"
    rows = [{"q": "ab", "choices": ["cd", "ef"], "label": 0, "answer": "gh"},
            {"q": "hello", "choices": ["world", "there"], "label": 1, "answer": "xy"},
            {"q": "one two three", "choices": ["four", "five"], "label": 0, "answer": "zz"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    head = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
    (root / "mc.yaml").write_text("task: melayer_test_mc\n" + head + textwrap.dedent("""\
        output_type: multiple_choice
        doc_to_text: "{{q}}"
        doc_to_choice: "{{choices}}"
        doc_to_target: label
        metric_list:
          - metric: acc
        """))
    (root / "gen.yaml").write_text("task: melayer_test_gen\n" + head + textwrap.dedent("""\
        output_type: generate_until
        doc_to_text: "{{q}}"
        doc_to_target: answer
        generation_kwargs:
          until: ["\\n"]
          max_gen_toks: 4
          do_sample: false
        metric_list:
          - metric: exact_match
        """))
    return ["melayer_test_mc", "melayer_test_gen"]


def test_lm_eval_model_type(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import melayer.eval.lm_eval_model  # noqa: F401  registers model type "melayer"

    tasks = write_task(tmp_path)
    manager = TaskManager(include_path=str(tmp_path))

    def run(model, args):
        res = lm_eval.simple_evaluate(model=model, model_args=args, tasks=tasks, task_manager=manager, batch_size=2,
                                      device="cpu", log_samples=True)
        lls = [float(r[0]) for s in res["samples"]["melayer_test_mc"] for r in s["filtered_resps"]]
        gens = [s["filtered_resps"][0] for s in res["samples"]["melayer_test_gen"]]
        return res, lls, gens

    _, hf_ll, hf_gen = run("hf", {"pretrained": str(tiny_dir), "dtype": "float32"})
    _, off_ll, off_gen = run("melayer", f"pretrained={tiny_dir},wemask=0")
    res, on_ll, on_gen = run("melayer", f"pretrained={tiny_dir},wemask=0.1,wemask_layers=2-3")
    # without a mask the wrapper is lm-eval's own HFLM; with it, log-likelihoods move
    assert off_ll == hf_ll and off_gen == hf_gen
    assert max(abs(a - b) for a, b in zip(on_ll, off_ll)) > 1e-3
    assert all(math.isfinite(x) for x in on_ll)
    info = res["config"]["wemask"]
    assert info["k"] == 6 and info["layers"] == [2, 3] and info["active"]
    assert set(res["results"]) == set(tasks)


# ----------------------------------------------------------------------------------------------------
# the real embedded Gemma-3-270M


@pytest.mark.slow
def test_real_gemma_wemask(gemma, gemma_scan, tmp_path):
    import subprocess

    lm = gemma
    assert gemma_scan.me_layer == 3  # melayer.scan on the shipped prompts (what WeMask runs by default)
    wm = WeMask(lm, 0.01, me_layer=gemma_scan.me_layer)
    assert wm.me_layer == 3 and wm.layers == list(range(4, 18)) and wm.k == 6
    batch = encode(lm, ["The capital of France is", "Water boils at a temperature of"])
    base = logits(lm, batch)
    n_new = 6
    with wm:
        with torch.no_grad():
            out = lm.model.generate(**batch, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=lm.tokenizer.pad_token_id)
        full_mask = torch.cat([batch["attention_mask"], torch.ones(2, n_new, dtype=torch.long)], dim=1)
        recompute = logits(lm, {"input_ids": out.sequences, "attention_mask": full_mask})
        masked = logits(lm, batch)
        assert 163 in wm.masked_dims()[4]  # the massive dim of the <bos> token
    T = batch["input_ids"].shape[1]
    for i, step in enumerate(out.logits):
        ref = recompute[:, T - 1 + i]
        assert float((step - ref).abs().max() / ref.abs().max()) < 1e-4
    kl = torch.nn.functional.kl_div(masked[:, -1].log_softmax(-1), base[:, -1].log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1)
    assert (kl > 1e-3).all()  # WeMask at rate 0.01 changes the next-token distribution
    assert torch.equal(logits(lm, batch), base)
    # the documented lm-eval command line, offline, with a local task
    tasks = write_task(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "melayer.eval.lm_eval_model", "--model", "melayer", "--model_args",
         "pretrained=gemma-3-270m,wemask=0.01,wemask_me_layer=3", "--tasks", tasks[0], "--include_path",
         str(tmp_path), "--device", "cpu", "--batch_size", "2", "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1",
                                             "HF_DATASETS_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert results["config"]["wemask"]["layers"] == list(range(4, 18))
    assert "acc,none" in results["results"][tasks[0]]


# ----------------------------------------------------------------------------------------------------
# per-row selection: a batch whose rows start with different tokens (no <bos>), and padding that looks massive


def _masked_run(lm, texts, layer: int, add_special_tokens: bool = True, **kwargs):
    """Logits of ``texts`` (one left-padded batch) under WeMask, and what the mask changed at ``layer``."""
    batch = encode(lm, texts, add_special_tokens=add_special_tokens)
    wm = WeMask(lm, RATE, layers=LAYERS, **kwargs)
    with instrument(lm, layer, wm) as log:
        out = logits(lm, batch)
    assert len(log) == 1
    return batch, out, log[0][1]


def test_activation_dims_are_chosen_per_row_on_a_no_bos_batch(tiny):
    """Without <bos> each row's first token differs, so does its attention input: every row must get the top-k
    dims of its own first token, exactly as if it ran alone (averaging |a| over the batch, as the released code
    does, gives every row the same dims)."""
    lm = tiny("llama")
    texts = ["hello there, friend", "Zq", "12345 678", "what?"]
    batch, together, changed = _masked_run(lm, texts, 2, add_special_tokens=False)
    first = batch["attention_mask"].argmax(dim=1).tolist()
    assert (batch["input_ids"] != BOS).all()
    assert sorted(changed) == [(row, first[row]) for row in range(len(texts))]
    assert len({tuple(sorted(d)) for d in changed.values()}) == len(texts), "the rows need different dims"
    for row, text in enumerate(texts):
        _, alone, alone_changed = _masked_run(lm, [text], 2, add_special_tokens=False)
        assert {k: sorted(v) for k, v in alone_changed.items()} == {(0, 0): sorted(changed[(row, first[row])])}
        real = batch["attention_mask"][row].bool()
        torch.testing.assert_close(together[row][real], alone[0], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def _loud_padding(lm, value: float = 1e4):
    """Make the pad token's embedding huge (except the carrier dim, so no planted neuron fires on it)."""
    from melayer.models.archmap import resolve

    embed = resolve(lm.model, lm.arch.embed).weight
    embed[lm.tokenizer.pad_token_id] = value
    embed[lm.tokenizer.pad_token_id, lm.plant.carrier] = 0.0


def test_token_massive_median_ignores_padding():
    """token='massive': the cutoff uses the median of each row's *real* tokens. Here the pads of the short row
    are huge (|a| ~ 1e4 > the massive <bos>); were they counted, the short row's median would be ~1e4 and its
    <bos> would not be masked. Each row must be masked exactly as when it runs alone."""
    lm = tiny_lm("llama")
    _loud_padding(lm)
    texts = ["hello there, friend", "hi"]
    batch, together, changed = _masked_run(lm, texts, 2, token="massive")
    first = batch["attention_mask"].argmax(dim=1).tolist()
    assert first[1] > len(texts[1]) + 1 - first[1]  # the padded row is mostly padding
    assert sorted(changed) == [(0, 0), (1, first[1])]
    for row, text in enumerate(texts):
        _, alone, alone_changed = _masked_run(lm, [text], 2, token="massive")
        assert list(alone_changed) == [(0, 0)]
        assert sorted(alone_changed[(0, 0)]) == sorted(changed[(row, first[row])])
        real = batch["attention_mask"][row].bool()
        torch.testing.assert_close(together[row][real], alone[0], rtol=1e-4, atol=1e-4)


def test_token_massive_without_a_mask_and_before_the_me_layer(tiny):
    """No attention mask: every token is real. A layer whose input has no massive token yet is left alone."""
    lm = tiny("llama")
    ids = encode(lm, ["abcdef"])["input_ids"]
    wm = WeMask(lm, RATE, layers=[1, 2], token="massive")  # planted at layer 1: layer 1's input has none yet
    for layer, expected in ((1, {}), (2, {(0, 0)})):
        with instrument(lm, layer, wm) as log, torch.no_grad():
            lm.model(input_ids=ids)
        assert {k: len(v) for k, v in log[0][1].items()} == {k: wm.k for k in expected}
    assert set(wm.to_dict()["masked_tokens"]) == {"2"}
