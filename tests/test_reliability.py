"""Nothing lost, nothing mixed, no traceback (issue 8): concurrent first runs, file modes, truncated GGUFs,
resume keyed by the model's identity, Ctrl-C. Real processes and tiny real checkpoints throughout."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

import melayer
from melayer.eval import run
from melayer.models import gguf_file
from melayer.testing import tiny_lm
from melayer.util.errors import MelayerError
from melayer.util.io import read_jsonl, write_json

REPO = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "MELAYER_QUIET": "1", "PYTHONPATH": str(REPO), **extra}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ------------------------------------------------------------------------------------------------ item 8

_CONVERT = """
import os, sys, time
os.umask(int(sys.argv[4], 8))
import torch
torch.set_num_threads(1)
import melayer
open(sys.argv[2], "w").close()              # ready: imports done
while not os.path.exists(sys.argv[3]):      # wait for the other process, then convert at the same moment
    time.sleep(0.005)
print(melayer.load(sys.argv[1], progress=False).source)
"""


def test_two_processes_convert_one_gguf_at_once_and_share_the_cache(tiny_gguf, tmp_path):
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    env = _env(MELAYER_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", _CONVERT, str(tiny_gguf), str(tmp_path / f"ready{i}"), str(go),
                               "027"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    deadline = time.time() + 240
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    sources = {out.strip() for out, _ in outs}
    assert len(sources) == 1
    model_dir = Path(sources.pop())
    hf = cache / "hf"
    assert [p.name for p in hf.iterdir() if p.is_dir()] == [model_dir.name]  # one conversion, no temp leftovers
    assert not [p for p in hf.iterdir() if p.name.startswith(".")]
    # the user's umask (027 here), not mkdtemp's 0700 / mkstemp's 0600
    assert _mode(model_dir) == 0o750 and _mode(hf) == 0o750
    files = [p for p in model_dir.rglob("*") if p.is_file()]
    assert files and {_mode(p) for p in files} == {0o640}
    assert melayer.load(str(model_dir), progress=False).num_layers == 4


def test_result_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
        lm = tiny_lm("llama")
        run(lm, "arc_easy", limit=2, batch_size=2, output=tmp_path / "ev", progress=False)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "x.json") == 0o644
    assert _mode(tmp_path / "ev" / "eval.json") == 0o644 and _mode(tmp_path / "ev" / "samples.jsonl") == 0o644


# ------------------------------------------------------------------------------------------------ truncated GGUF


def test_truncated_gguf_message_is_plain(tiny_gguf, tmp_path):
    from gguf import GGUFReader

    tensors = GGUFReader(str(tiny_gguf)).tensors
    start = min(t.data_offset for t in tensors)
    end = max(t.data_offset + t.n_bytes for t in tensors)
    raw = tiny_gguf.read_bytes()
    for n in (100, start // 2, start + 10, (start + end) // 2, end - 1):
        cut = tmp_path / f"cut-{n}.gguf"
        cut.write_bytes(raw[:n])
        with pytest.raises(MelayerError) as err:
            gguf_file.check_gguf(cut)
        msg = str(err.value)
        assert "truncated" in msg and f"{n:,} bytes" in msg, msg
        for internal in ("dtype", "reshape", "divisor", "ValueError", "array", "axis"):
            assert internal not in msg, msg


# ------------------------------------------------------------------------------------------------ item 2


def _save(lm, path: Path) -> Path:
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def test_resume_refuses_other_weights_at_the_same_path(tmp_path):
    model_dir = _save(tiny_lm("llama", seed=0), tmp_path / "m")
    run(melayer.load(str(model_dir), progress=False), "arc_easy", limit=4, batch_size=2, output=tmp_path / "ev",
        progress=False)
    _save(tiny_lm("llama", seed=1), model_dir)  # new weights, same path, same config
    with pytest.raises(MelayerError, match="different model"):
        run(melayer.load(str(model_dir), progress=False), "arc_easy", limit=8, batch_size=2, output=tmp_path / "ev",
            progress=False)
    assert len(read_jsonl(tmp_path / "ev" / "samples.jsonl")) == 4


def test_resume_accepts_the_same_model_by_another_path(tmp_path, monkeypatch):
    model_dir = _save(tiny_lm("llama"), tmp_path / "m")
    first = run(melayer.load(str(model_dir), progress=False), "arc_easy", limit=4, batch_size=2,
                output=tmp_path / "ev", progress=False)
    monkeypatch.chdir(tmp_path)
    seen = []
    again = run(melayer.load("./m/", progress=False), "arc_easy", limit=6, batch_size=2, output=tmp_path / "ev",
                progress=False, on_batch=seen.append)
    assert sum(len(b) for b in seen) == 2  # only the two new samples ran
    assert again.records[:4] == first.records
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["n_samples"] == 6


# ------------------------------------------------------------------------------------------------ Ctrl-C


def test_ctrl_c_says_how_to_resume_and_the_resume_completes(planted_dir, tmp_path):
    out = tmp_path / "ev"
    args = [sys.executable, "-m", "melayer", "eval", "--task", "arc_easy", "--model", str(planted_dir), "--limit",
            "60", "--batch-size", "1", "-o", str(out), "--overwrite"]
    # a child started from a non-interactive shell may inherit an ignored SIGINT; a terminal's Ctrl-C is not ignored
    proc = subprocess.Popen(args, env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    samples = out / "samples.jsonl"
    deadline = time.time() + 240
    while not (samples.exists() and samples.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.startswith("melayer: ")][-1]
    assert last.startswith("melayer: interrupted; "), err
    done = len(read_jsonl(samples))
    assert f"{done}/60 samples" in last and str(samples) in last
    resume = last.split("resume with: ", 1)[1]
    assert "--overwrite" not in resume and resume.startswith("melayer eval ")
    import shlex

    again = subprocess.run([sys.executable, "-m", "melayer", *shlex.split(resume)[1:]], env=_env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr
    ids = [r["id"] for r in read_jsonl(samples)]
    assert len(ids) == len(set(ids)) == 60
