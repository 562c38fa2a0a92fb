"""Shared fixtures: tiny real checkpoints (saved, GGUF, unsupported), the CLI runner, and the real embedded models.

Nothing here is mocked: every fixture builds a real transformers model (random weights, tiny sizes, a
massive activation planted through the architecture map) or loads a real embedded model.
"""

from __future__ import annotations

import os

# No test may reach the network: a hub id must fail fast and offline. Set before transformers is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MELAYER_QUIET", "1")

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# One thread for the whole suite, set once: the tiny models run far faster on one thread on a small shared CPU
# (no oversubscription), and results do not depend on the thread count. MELAYER_TEST_THREADS overrides it.
torch.set_num_threads(int(os.environ.get("MELAYER_TEST_THREADS", "1")))

# The architecture map that makes an unmapped GPT-NeoX model work (used as --arch override).
NEOX_ARCH = {
    "name": "gpt_neox",
    "body": "gpt_neox",
    "layers": "gpt_neox.layers",
    "embed": "gpt_neox.embed_in",
    "final_norm": "gpt_neox.final_layer_norm",
    "lm_head": "lm_head",
    "pre_attn_norm": "input_layernorm",
    "attn": "attention",
    "pre_ffn_norm": "post_attention_layernorm",
    "mlp": "mlp",
    "gate": None,
    "up": "mlp.dense_h_to_4h",
    "down": "mlp.dense_4h_to_h",
    "norm_kind": "layer",
}


def unsupported_model(model_type: str = "gpt_neox", num_layers: int = 2):
    """A tiny random-weight model of a family outside melayer's named layouts (its roles are derived)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from melayer.testing import BOS, EOS, HEADS, HIDDEN, INTER, PAD, VOCAB

    torch.manual_seed(0)
    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=num_layers, num_attention_heads=HEADS,
                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if model_type == "gpt_neox":
        kwargs.update(intermediate_size=INTER, max_position_embeddings=256, use_parallel_residual=False,
                      tie_word_embeddings=False)
    elif model_type == "falcon":
        kwargs.update(new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False)
    config = AutoConfig.for_model(model_type, **kwargs)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")


REFUSED_TYPE = "cpmant"  # its FFN reads a norm output melayer cannot match to a projection: roles cannot be derived


def refused_model():
    """A tiny random-weight model whose roles melayer cannot derive (see REFUSED_TYPE)."""
    from transformers import AutoModelForCausalLM

    from melayer.testing import tiny_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(REFUSED_TYPE, num_layers=2), dtype=torch.float32)


def save_lm(lm, path: Path) -> Path:
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def _permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k row order (rotate-half pairs) -> llama.cpp's interleaved pairs; transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(lm, path: Path) -> Path:
    """Write a tiny Llama model (``tiny_lm("llama")``) as an F32 GGUF file that transformers can load."""
    from gguf import GGUFWriter

    cfg = lm.config
    sd = {k: v.detach().float().numpy() for k, v in lm.model.state_dict().items()}
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float((getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    tokens = [t for t, _ in sorted(lm.tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")  # byte-level BPE, like the tiny tokenizer
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<bos>", "<eos>", "<pad>") else 1 for t in tokens])  # 3 = control
    w.add_token_scores([0.0] * len(tokens))  # no merges: single-symbol vocabulary
    w.add_bos_token_id(lm.tokenizer.bos_token_id)
    w.add_eos_token_id(lm.tokenizer.eos_token_id)
    w.add_pad_token_id(lm.tokenizer.pad_token_id)
    w.add_add_bos_token(True)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if hf == "self_attn.q_proj":
                t = _permute_rotary(t, cfg.num_attention_heads)
            elif hf == "self_attn.k_proj":
                t = _permute_rotary(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def sig(x: float, digits: int) -> float:
    """``x`` rounded to ``digits`` significant digits: how the README writes its figures (1.04e4, 5,200x)."""
    return float(f"{x:.{digits - 1}e}")


def argmax_decode(lm, ids, n: int, eos=()) -> tuple[list[int], bool]:
    """Independent greedy decoding of one unpadded row: no KV cache, no ``generate``, the argmax of a full forward
    per step. Returns the new tokens before the first of ``eos`` and whether one was met."""
    seq, new = list(ids), []
    for _ in range(n):
        with torch.no_grad():
            token = int(lm.model(torch.tensor([seq], device=lm.device)).logits[0, -1].argmax())
        if token in eos:
            return new, True
        new.append(token)
        seq.append(token)
    return new, False


# ------------------------------------------------------------------------------------------------
# tiny checkpoints on disk (session-scoped: built once)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """``tiny_lm("llama")`` saved as a Hugging Face directory (4 layers, massive activation at layer 1, dim 7,
    neuron 5, on <bos>): the checkpoint the CLI tests load."""
    from melayer.testing import tiny_lm

    return save_lm(tiny_lm("llama"), tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="session")
def planted_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (5 layers) with a massive activation planted at layer 2, dim 7, on <bos>."""
    from melayer.testing import tiny_lm

    return save_lm(tiny_lm("llama", me_layer=2, num_layers=5), tmp_path_factory.mktemp("ckpt") / "tiny-planted")


@pytest.fixture(scope="session")
def overflow_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama whose planted massive value (~3e7) overflows float16 (max 65504)."""
    from melayer.testing import plant_massive, tiny_lm

    lm = tiny_lm("llama", plant=False)
    plant_massive(lm, me_layer=1, neuron=5, dim=7, strength=1e6)
    return save_lm(lm, tmp_path_factory.mktemp("ckpt") / "tiny-overflow")


@pytest.fixture(scope="session")
def unsupported_dir(tmp_path_factory) -> Path:
    """A saved tiny GPT-NeoX (outside the named layouts: its roles are derived) with a tokenizer."""
    from melayer.testing import tiny_tokenizer

    path = tmp_path_factory.mktemp("ckpt") / "tiny-neox"
    unsupported_model("gpt_neox").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def refused_dir(tmp_path_factory) -> Path:
    """A saved tiny model whose roles melayer cannot derive (REFUSED_TYPE), with a tokenizer."""
    from melayer.testing import tiny_tokenizer

    path = tmp_path_factory.mktemp("ckpt") / "tiny-refused"
    refused_model().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    """A real GGUF file (F32) of a tiny planted Llama (me_layer 2, dim 7)."""
    from melayer.testing import tiny_lm

    lm = tiny_lm("llama", me_layer=2)
    return write_tiny_llama_gguf(lm, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


# ------------------------------------------------------------------------------------------------
# the CLI, run as a real process


@dataclass
class CliRun:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(monkeypatch, capsys):
    """``melayer ARGS`` in this process, through the same ``main()`` as the console script and ``python -m``."""
    from melayer.cli import main

    def run(*args) -> CliRun:
        monkeypatch.setattr(sys, "argv", ["melayer", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return CliRun(code, out.out, out.err)

    return run


@pytest.fixture(scope="session")
def run_cli():
    """Run ``python -m melayer ARGS`` in a fresh process (the same entry point as the console script)."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> CliRun:
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "MELAYER_QUIET": "1", "COLUMNS": "200", **(env or {})}
        proc = subprocess.run([sys.executable, "-m", "melayer", *map(str, args)], capture_output=True, text=True,
                              env=full_env, cwd=REPO, timeout=timeout)
        return CliRun(proc.returncode, proc.stdout, proc.stderr)

    return run


def cli_in_process(monkeypatch, capsys, *args):
    """Run ``melayer ARGS`` in this process (quiet); returns (exit code, stdout, stderr)."""
    from melayer.cli import main

    monkeypatch.setenv("MELAYER_QUIET", "1")
    monkeypatch.setattr(sys, "argv", ["melayer", *map(str, args)])
    with pytest.raises(SystemExit) as exc:
        main()
    cap = capsys.readouterr()
    code = exc.value.code
    return (0 if code is None else code), cap.out, cap.err


def cli_error(monkeypatch, capsys, *args, alone: bool = False) -> str:
    """Run ``melayer ARGS``, which must fail with exactly one ``melayer: error:`` line (exit 2, no traceback);
    ``alone``: and nothing else on stderr (no library report either)."""
    code, out, err = cli_in_process(monkeypatch, capsys, *args)
    assert code == 2 and "Traceback" not in err + out, err
    lines = [line for line in err.splitlines() if line.strip() if alone or line.startswith("melayer: ")]
    assert len(lines) == 1 and lines[0].startswith("melayer: error: "), err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# the real embedded models (slow tests): each loads and scans once per session


@pytest.fixture(scope="session")
def gemma():
    import melayer

    return melayer.load("gemma-3-270m", progress=False)


@pytest.fixture(scope="session")
def gemma_scan(gemma):
    import melayer

    return melayer.scan(gemma, progress=False)


@pytest.fixture(scope="session")
def smollm2():
    import melayer

    return melayer.load("smollm2-135m", progress=False)


@pytest.fixture(scope="session")
def smollm2_scan(smollm2):
    import melayer

    return melayer.scan(smollm2, progress=False)
