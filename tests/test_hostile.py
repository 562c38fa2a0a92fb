"""Damaged and hostile inputs, tried one by one: never a wrong answer from a broken file, never unbounded work
from a small one, one ``melayer: error:`` line (exit 2) instead of a traceback, nothing left half-written.

Every malformed GGUF is generated here (``gguf_bytes``), none is a stored binary."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import cli_error
from conftest import cli_in_process as _cli
from gguf_bytes import catalogue, tiny_llama

CATALOGUE = catalogue()


def _error(monkeypatch, capsys, *args) -> str:
    return cli_error(monkeypatch, capsys, *args, alone=True)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("MELAYER_CACHE", str(path))
    return path


def _converted(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "hf").iterdir()) if (cache / "hf").exists() else []


# ------------------------------------------------------------------------------------------------ GGUF files


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_malformed_gguf_is_one_precise_line_in_weights(monkeypatch, capsys, tmp_path, cache, name):
    raw, phrase = CATALOGUE[name]
    path = tmp_path / "model.gguf"
    path.write_bytes(raw)
    line = _error(monkeypatch, capsys, "weights", "-m", path, "-o", tmp_path / "out", "--no-plots")
    assert phrase in line, line
    if not any(w in phrase for w in ("truncated", "cannot read", "runs past", "claims", "more than")):
        # not a file cut short: a new download would not repair it, and the words must not suggest it would
        assert "download it again" not in line and "truncated" not in line, line
    assert not (tmp_path / "out").exists()


CONVERTED = ["no tensors", "a layer tensor missing", "a whole block missing", "a million blocks claimed",
             "a 2^62-item UINT8 array", "a tensor of the wrong shape", "unknown architecture", "GGUF version 99",
             "duplicate tensor names", "unknown quant type", "embedding_length a billion", "cut inside the data"]


@pytest.mark.parametrize("name", CONVERTED)
def test_malformed_gguf_is_never_converted_or_cached(monkeypatch, capsys, tmp_path, cache, name):
    raw, phrase = CATALOGUE[name]
    path = tmp_path / "model.gguf"
    path.write_bytes(raw)
    line = _error(monkeypatch, capsys, "scan", "-m", path, "-o", tmp_path / "out", "-p", "abc def", "--no-plots")
    if name == "a layer tensor missing":  # the conversion names the transformers key it lacks
        phrase = "lacks 1 of the model's weights (model.layers.1.mlp.up_proj.weight)"
    elif name == "a tensor of the wrong shape":
        phrase = "model.layers.0.mlp.down_proj.weight (8, 7) instead of (8, 16)"
    elif name == "unknown architecture":
        assert "corrupt" not in line and "download" not in line, line
    assert phrase in line, line
    assert _converted(cache) == [] and not (tmp_path / "out").exists()


def test_the_intact_generated_gguf_converts_and_scans(monkeypatch, capsys, tmp_path, cache):
    """The generator's intact file is a real model: the failures above come from each damage alone."""
    path = tmp_path / "model.gguf"
    path.write_bytes(tiny_llama(2))
    code, out, err = _cli(monkeypatch, capsys, "scan", "-m", path, "-o", tmp_path / "out", "-p", "abc def", "--no-plots")
    assert code == 0 and (tmp_path / "out" / "scan.json").exists(), err
    assert len(_converted(cache)) == 1
    code, out, err = _cli(monkeypatch, capsys, "weights", "-m", path, "-o", tmp_path / "w", "--no-plots")
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ HF directories


def _edit_weights(src: Path, dst: Path, edit) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_hf_directory_with_a_tensor_removed_is_refused(monkeypatch, capsys, tmp_path, tiny_dir):
    holed = _edit_weights(tiny_dir, tmp_path / "holed", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    line = _error(monkeypatch, capsys, "scan", "-m", holed, "-o", tmp_path / "out", "-p", "abc def", "--no-plots")
    assert "lacks 1 of the model's weights (model.layers.1.mlp.up_proj.weight)" in line, line
    assert not (tmp_path / "out").exists()


def test_hf_directory_with_a_stray_tensor_is_refused(monkeypatch, capsys, tmp_path, tiny_dir):
    import torch

    extra = _edit_weights(tiny_dir, tmp_path / "extra",
                          lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}))
    line = _error(monkeypatch, capsys, "scan", "-m", extra, "-o", tmp_path / "out", "-p", "abc def", "--no-plots")
    assert "has 1 weights the model does not use (model.layers.9.mlp.up_proj.weight)" in line, line


def test_an_incomplete_cached_conversion_is_dropped_and_redone(monkeypatch, capsys, tmp_path, cache):
    path = tmp_path / "model.gguf"
    path.write_bytes(tiny_llama(2))
    args = ("scan", "-m", path, "-o", tmp_path / "out", "-p", "abc def", "--no-plots")
    assert _cli(monkeypatch, capsys, *args)[0] == 0
    [converted] = (cache / "hf").iterdir()
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(converted / "model.safetensors"))
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, str(converted / "model.safetensors"), metadata={"format": "pt"})
    line = _error(monkeypatch, capsys, *args)
    assert "lacks 1 of the model's weights (model.layers.0.mlp.down_proj.weight)" in line, line
    assert _converted(cache) == []  # the damaged conversion is gone: the next run converts the file again
    assert _cli(monkeypatch, capsys, *args)[0] == 0 and len(_converted(cache)) == 1


# ------------------------------------------------------------------------------------------------ resumed samples


def test_resume_keeps_every_valid_record_around_bad_lines_and_sets_them_aside(tmp_path, capsys):
    from melayer.eval import run
    from melayer.testing import tiny_lm
    from melayer.util.io import read_jsonl

    lm = tiny_lm("llama")
    args = dict(limit=8, batch_size=4, progress=False)
    run(lm, "arc_easy", output=tmp_path, **args)
    log = tmp_path / "samples.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    kept = [json.loads(line) for line in lines[:2] + lines[4:]]
    for rec in kept:  # a mark that survives only if the record is kept, not recomputed
        rec["kept"] = True
    bad = [b"\xff\xfe not utf-8\n", b"[1, 2, 3]\n", b'{"no_id": 1}\n', b'{"id": "arc_easy-9", \n']
    body = [json.dumps(r).encode() + b"\n" for r in kept]
    log.write_bytes(b"".join(body[:2] + bad[:2] + body[2:4] + bad[2:] + body[4:]))
    capsys.readouterr()
    result = run(lm, "arc_easy", output=tmp_path, **args)
    err = capsys.readouterr().err
    assert "4 unreadable line(s) (line 3, 4, 7, 8) set aside" in err and "the 6 valid records are kept" in err, err
    assert (tmp_path / "samples.jsonl.bad").read_bytes() == b"".join(bad)
    records = {r["id"]: r for r in read_jsonl(log)}
    assert len(records) == 8 == result.n_samples
    assert sum(1 for r in records.values() if r.get("kept")) == 6  # only the two lost samples were recomputed


def test_appends_never_follow_a_planted_symlink(tmp_path):
    from melayer.util.errors import MelayerError
    from melayer.util.io import append_jsonl

    outside = tmp_path / "outside.jsonl"
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "samples.jsonl"
    link.symlink_to(outside)  # dangling: the append would create the file outside the output directory
    with pytest.raises(MelayerError, match="is a symbolic link"):
        append_jsonl(link, {"id": "x"})
    assert not outside.exists()


# ------------------------------------------------------------------------------------------------ other runs' files


def _scan_json(tmp_path: Path) -> dict:
    import melayer
    from melayer.testing import tiny_lm

    return melayer.scan(tiny_lm("llama"), progress=False).to_dict()


@pytest.mark.parametrize("how", ["inside a result", "a bare 100000-deep array"])
def test_report_refuses_deeply_nested_json_in_one_line(monkeypatch, capsys, tmp_path, how):
    (tmp_path / "a").mkdir()
    if how == "inside a result":
        data = _scan_json(tmp_path)
        deep: dict = {}
        cur = deep
        for _ in range(600):
            cur["x"] = {}
            cur = cur["x"]
        data["settings"] = deep
        text = json.dumps(data)
    else:
        text = "[" * 100_000 + "]" * 100_000
    (tmp_path / "a" / "scan.json").write_text(text)
    line = _error(monkeypatch, capsys, "report", tmp_path / "a")
    assert "nested" in line and "scan.json" in line, line


def test_a_binary_train_log_is_read_as_no_records(tmp_path):
    from melayer.util.io import read_jsonl

    log = tmp_path / "train_log.jsonl"
    log.write_bytes(bytes(range(256)) * 64 + b"\n" + b'{"step": 1, "loss": 2.0}\n')
    assert read_jsonl(log) == [{"step": 1, "loss": 2.0}]


def test_aggregate_counts_a_broken_cell_json_as_unfinished(monkeypatch, capsys, tmp_path):
    cell = tmp_path / "sweep" / "cells" / "c1"
    cell.mkdir(parents=True)
    (cell / "cell.json").write_bytes(b'{"command": "scan", "status": "do')
    code, out, err = _cli(monkeypatch, capsys, "aggregate", tmp_path / "sweep")
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines() == [
        f"melayer: warning: c1: its results cannot be read ({cell / 'cell.json'}: not valid JSON (line 1: "
        "Unterminated string starting at)); counted as unfinished (rerun the sweep to redo it)",
        f"melayer: error: no finished cells under {tmp_path / 'sweep' / 'cells'}"]


# ------------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize("name", ["tiny[@x=(]", "model[v2]", "a$b$c", "evil\u202egpj.exe", "esc\x1b]0;pwned\x07"])
def test_a_hostile_model_name_neither_crashes_nor_loses_results(monkeypatch, capsys, tmp_path, tiny_dir, name):
    import shutil

    model = tmp_path / name
    shutil.copytree(tiny_dir, model)
    out = tmp_path / "out"
    code, stdout, err = _cli(monkeypatch, capsys, "scan", "-m", model, "-o", out, "-p", "abc def")
    assert code == 0, err
    assert json.loads((out / "scan.json").read_text())["model"] == name  # the result keeps the name as it is
    assert (out / "layer_magnitudes.png").exists() or list(out.glob("*.png"))  # the plots drew it
    if "[" in name:
        assert name in stdout  # printed as is, not taken for markup
    for control in ("\u202e", "\x1b"):
        assert control not in stdout + err  # shown as an escape, never passed to the terminal


def test_generate_shows_a_models_terminal_escapes_instead_of_sending_them(tmp_path):
    from melayer.util.console import plain

    assert plain("red \x1b[31mtext\x1b[0m \u202eabc") == "red \\u001b[31mtext\\u001b[0m \\u202eabc"
    assert plain("tab\tand\nnewline") == "tab\tand\nnewline"


# ------------------------------------------------------------------------------------------------ sweep specs


@pytest.mark.parametrize("block,message", [
    ({"command": "finetune", "method": "../../../../X"}, "unknown finetune method '../../../../X'"),
    ({"command": "scan", "batch_size": float("nan")}, "batch_size must be a positive integer (got nan)"),
    ({"command": "eval", "tasks": ["arc_easy"], "batch_size": float("inf")}, "batch_size must be a positive integer"),
    ({"command": "eval", "tasks": ["arc_easy"], "batch_size": 2.5}, "batch_size must be a positive integer"),
    ({"command": "compare", "tasks": ["arc_easy"], "rates": [0.1], "n_boot": float("nan")}, "n_boot must be"),
])
def test_sweep_spec_values_are_checked(block, message):
    from melayer.sweeps.spec import expand
    from melayer.util.errors import MelayerError

    with pytest.raises(MelayerError, match=re.escape(message)):
        expand({"models": ["m"], "runs": [block]}, fingerprint=lambda model: "fp")


def test_a_task_name_never_makes_a_cell_directory_outside_the_sweep():
    from melayer.sweeps.spec import Cell

    cell = Cell("eval", "m", "fp", {"task": "../../../../X", "rate": 0.0})
    assert "/" not in cell.id and ".." not in cell.id.split("_")


def test_a_yaml_alias_bomb_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
    spec = tmp_path / "bomb.yaml"
    spec.write_text("\n".join(lines + ["models: [m]", "runs: [*a9]"]) + "\n")
    assert spec.stat().st_size < 2000
    line = _error(monkeypatch, capsys, "sweep", spec, "-o", tmp_path / "out")
    assert "expands to more than 100,000 values" in line, line
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------ remote code


def test_a_checkpoints_own_code_never_runs_even_when_a_terminal_would_say_yes(tmp_path, tiny_dir):
    """transformers asks on a terminal whether to run a directory's code; melayer passes trust_remote_code=False,
    so there is no question and answering "y" on the terminal runs nothing."""
    import os
    import pty
    import shutil
    import subprocess
    import sys

    model = tmp_path / "remote"
    shutil.copytree(tiny_dir, model)
    marker = tmp_path / "code-ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "from transformers import LlamaConfig as EvilConfig\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    (model / "config.json").write_text(json.dumps(config))
    main, child = pty.openpty()
    env = {**os.environ, "MELAYER_QUIET": "1", "HF_HUB_OFFLINE": "1", "MELAYER_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "melayer", "scan", "-m", str(model), "-o", str(tmp_path / "out"),
                             "-p", "abc"], stdin=child, stdout=child, stderr=child, env=env)
    os.write(main, b"y\ny\ny\n")
    proc.wait(timeout=300)
    os.close(child)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ chat templates


@pytest.mark.parametrize("template,kind", [
    ("{{ raise_exception('this template refuses') }}", "TemplateError"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "SecurityError"),
])
def test_a_chat_template_that_raises_is_one_line_in_eval_and_generate(monkeypatch, capsys, tmp_path, tiny_dir,
                                                                       template, kind):
    import shutil

    model = tmp_path / "chatty"
    shutil.copytree(tiny_dir, model)
    (model / "chat_template.jinja").write_text(template)
    line = _error(monkeypatch, capsys, "eval", "-m", model, "--task", "arc_easy", "--limit", "2", "--chat", "on",
                  "-o", tmp_path / "out")
    assert "the chat template of" in line and kind in line, line
    line = _error(monkeypatch, capsys, "generate", "-m", model, "-p", "hi", "--max-new-tokens", "2", "--chat", "on")
    assert kind in line, line
    assert not (tmp_path / "out" / "eval.json").exists()


def test_a_killed_conversions_partial_directory_is_removed_by_the_next(monkeypatch, capsys, tmp_path, cache):
    from melayer.models.convert import _file_key

    path = tmp_path / "model.gguf"
    path.write_bytes(tiny_llama(1))
    stale = cache / "hf" / f"{path.stem}-{_file_key(path)}.k1ll3d"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"\0" * 1000)  # what a conversion killed mid-save leaves
    assert _cli(monkeypatch, capsys, "scan", "-m", path, "-o", tmp_path / "out", "-p", "abc def")[0] == 0
    assert not stale.exists() and len(_converted(cache)) == 1
