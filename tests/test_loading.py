"""melayer.load: spec resolution on local paths, GGUF conversion and its cache, and one-line errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import melayer
from melayer.capture import encode
from melayer.models import cache, embedded, gguf_file
from melayer.testing import tiny_lm
from melayer.util.errors import MelayerError


def _one_line_error(spec, **kwargs) -> str:
    with pytest.raises(MelayerError) as err:
        melayer.load(str(spec), progress=False, **kwargs)
    msg = str(err.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def test_saved_directory_loads_and_keeps_its_plant(planted_dir):
    lm = melayer.load(str(planted_dir), progress=False)
    assert lm.name == "tiny-planted" and lm.source == str(planted_dir)
    assert lm.arch.name == "llama" and lm.num_layers == 5 and lm.hidden_size == 64
    assert lm.dtype == torch.float32 and not lm.model.training
    assert encode(lm, ["ab"])["input_ids"].tolist() == [[0, *lm.tokenizer("ab", add_special_tokens=False)["input_ids"]]]
    r = melayer.scan(lm, ["The capital of France is Paris.", "Hello world!"], progress=False)
    assert (r.me_layer, r.massive_dims, r.massive_tokens()[0]["token"]) == (2, [7], "<bos>")


def test_dtype_option(planted_dir):
    assert melayer.load(str(planted_dir), dtype="bfloat16", progress=False).dtype == torch.bfloat16
    assert melayer.load(str(planted_dir), dtype=torch.float16, progress=False).dtype == torch.float16
    assert "unknown dtype 'float8'" in _one_line_error(planted_dir, dtype="float8")


def test_missing_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in (tmp_path / "nope", "./nope", "nope/", "~/surely-not-here-melayer", "nope.gguf", "a/b/c"):
        assert "no such file or directory" in _one_line_error(spec)


def test_directory_without_a_model(tmp_path):
    assert "holds no model (no config.json and no .gguf file)" in _one_line_error(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    assert "holds no model" in _one_line_error(tmp_path)
    assert "is a file but not a .gguf" in _one_line_error(tmp_path / "notes.txt")


def test_directory_with_several_ggufs(tmp_path, tiny_gguf):
    shutil.copy(tiny_gguf, tmp_path / "a.gguf")
    shutil.copy(tiny_gguf, tmp_path / "b.gguf")
    assert "several .gguf files" in _one_line_error(tmp_path)


def test_non_gguf_file_renamed_gguf(tmp_path, planted_dir):
    fake = tmp_path / "model.gguf"
    shutil.copy(planted_dir / "model.safetensors", fake)
    assert "is not a GGUF file (bad magic" in _one_line_error(fake)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "is not a GGUF file" in _one_line_error(empty)


def _truncated_copy(src, dst, n_bytes):
    with open(src, "rb") as fh:
        dst.write_bytes(fh.read(n_bytes))
    return dst


@pytest.mark.parametrize("kb", [1, 64])
def test_truncated_real_gemma_gguf(tmp_path, monkeypatch, kb):
    real = embedded._embedded_gemma()  # the embedded model's GGUF (assembled into the default cache once)
    cut = _truncated_copy(real, tmp_path / "gemma-cut.gguf", kb * 1024)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MELAYER_CACHE", str(cache))
    msg = _one_line_error(cut)
    assert "corrupt or truncated GGUF" in msg and "gemma-cut.gguf" in msg
    assert not (cache / "hf").exists() or not any((cache / "hf").iterdir()), "nothing half-converted is cached"


def test_truncated_tiny_gguf(tmp_path, tiny_gguf):
    from gguf import GGUFReader

    tensors = GGUFReader(str(tiny_gguf)).tensors
    data_start = min(t.data_offset for t in tensors)
    data_end = max(t.data_offset + t.n_bytes for t in tensors)
    for n in (3, 100, data_start // 2, data_start + 10, (data_start + data_end) // 2, data_end - 1):
        cut = _truncated_copy(tiny_gguf, tmp_path / f"cut-{n}.gguf", n)
        msg = _one_line_error(cut)
        assert "not a GGUF file" in msg if n < 4 else "corrupt or truncated GGUF" in msg, (n, msg)
    gguf_file.check_gguf(tiny_gguf)  # the intact file passes


def test_hub_id_offline_fails_fast_in_one_line():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    msg = _one_line_error("melayer-test-org/no-such-model")
    assert "melayer-test-org/no-such-model" in msg and "hub" in msg


def test_corrupt_model_directories(tmp_path, planted_dir):
    cases = {}
    cases["no weights"] = shutil.copytree(planted_dir, tmp_path / "noweights")
    (cases["no weights"] / "model.safetensors").unlink()
    cases["truncated weights"] = shutil.copytree(planted_dir, tmp_path / "truncweights")
    w = cases["truncated weights"] / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    cases["garbage weights"] = shutil.copytree(planted_dir, tmp_path / "garbage")
    (cases["garbage weights"] / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    cases["bad config"] = shutil.copytree(planted_dir, tmp_path / "badconfig")
    (cases["bad config"] / "config.json").write_text("{not json")
    for what, path in cases.items():
        msg = _one_line_error(path)
        assert str(path) in msg, what


def test_cache_dir_follows_melayer_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MELAYER_CACHE", str(tmp_path / "mc"))
    assert cache.cache_dir() == tmp_path / "mc"
    monkeypatch.delenv("MELAYER_CACHE")
    assert cache.cache_dir() == Path.home() / ".cache" / "melayer"


def test_gguf_round_trip_is_converted_once_into_melayer_cache(tmp_path, monkeypatch, tiny_gguf):
    """A real (F32) GGUF of a tiny planted Llama: converted into $MELAYER_CACHE, then reused as is."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MELAYER_CACHE", str(cache))
    lm = melayer.load(str(tiny_gguf), progress=False)
    converted = list((cache / "hf").iterdir())
    assert len(converted) == 1 and converted[0].name.startswith("tiny-llama-")
    assert lm.source == str(converted[0]) and lm.name == "tiny-llama.gguf" and lm.arch.name == "llama"
    # the same weights and tokenizer as the model the file was written from
    ref = tiny_lm("llama", me_layer=2)
    text = ["The capital of France is Paris."]
    assert encode(lm, text)["input_ids"].tolist() == encode(ref, text)["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(lm.model(**encode(lm, text)).logits, ref.model(**encode(ref, text)).logits,
                                   rtol=1e-4, atol=1e-4)
    r = melayer.scan(lm, text, progress=False)
    assert (r.me_layer, r.massive_dims) == (2, [7])
    # second load: served from the cache, nothing rewritten
    stamp = (converted[0] / "model.safetensors").stat().st_mtime_ns
    again = melayer.load(str(tiny_gguf), progress=False)
    assert again.source == lm.source
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(list((cache / "hf").iterdir())) == 1
    # a directory holding exactly one .gguf resolves to it
    assert melayer.load(str(tiny_gguf.parent), progress=False).source == lm.source
    assert not list(cache.rglob("*.partial")) and not [p for p in (cache / "hf").iterdir() if "." in p.name]
