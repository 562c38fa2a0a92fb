"""Every command, adversarially (issue 8): overflow, output targets and I/O errors, compare's validation, inputs
longer than the model's positions, and the small items. Each case is one ``melayer: error:`` line (exit 2), no
traceback, and nothing torn or half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, save_lm
from conftest import cli_error as _error
from conftest import cli_in_process as _cli

from melayer.util.io import read_jsonl


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A saved tiny GPT-2: learned absolute positions, 256 of them (byte-level tokenizer: 1 token per byte)."""
    from melayer.testing import tiny_lm

    return save_lm(tiny_lm("gpt2"), tmp_path_factory.mktemp("ckpt") / "tiny-gpt2")


# ------------------------------------------------------------------------------------------------ item 1: overflow


@pytest.mark.parametrize("args", [
    ["eval", "--task", "arc_easy", "--limit", "2"],
    ["eval", "--task", "ppl", "--limit", "2"],
    ["compare", "--task", "arc_easy", "--limit", "2", "--rates", "0,0.1", "--me-layer", "1", "--no-sinks"],
    ["generate", "-p", "The capital of France is", "--max-new-tokens", "6"],
])
def test_float16_overflow_is_one_error_in_every_command(monkeypatch, capsys, tmp_path, overflow_dir, args):
    out = tmp_path / ("out.json" if args[0] == "generate" else "out")
    line = _error(monkeypatch, capsys, *args, "--model", overflow_dir, "--dtype", "float16", "-o", out)
    assert "inf/nan" in line and "float32" in line, line
    assert not any(name.endswith((".json", ".png")) for name in _files(out.parent if args[0] == "generate" else out))


# ------------------------------------------------------------------------------------------------ item 4: output targets


@pytest.mark.parametrize("command,extra", [
    ("scan", ["-p", "Hello there"]), ("explain", ["-p", "Hello there"]), ("rigidity", []),
    ("sinks", ["-p", "Hello there"]), ("eval", ["--task", "arc_easy", "--limit", "2"]),
    ("compare", ["--task", "arc_easy", "--limit", "2"]),
])
def test_output_that_is_a_file_is_refused_before_loading(monkeypatch, capsys, tmp_path, command, extra):
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    # the model does not exist: an error about --output proves the target was checked before any loading
    line = _error(monkeypatch, capsys, command, *extra, "--model", tmp_path / "no-model", "-o", a_file)
    assert "--output" in line and "not a directory" in line, line
    assert a_file.read_text() == "keep me"


def test_generate_output_that_is_a_directory_is_refused_before_loading(monkeypatch, capsys, tmp_path):
    line = _error(monkeypatch, capsys, "generate", "-p", "Hi", "--model", tmp_path / "no-model", "-o", tmp_path)
    assert "--output" in line and "is a directory" in line, line


def _tmpfs(path: Path, options: str):
    """A real tmpfs mounted at ``path`` for the test (skipped where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, check=False)
    if os.geteuid() != 0 or r.returncode != 0:
        pytest.skip("mounting a tmpfs needs root with CAP_SYS_ADMIN")
    yield path
    subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (root ignores permission bits, so a chmod-ed directory would not do)."""
    yield from _tmpfs(tmp_path / "ro", "ro,size=1m")


def test_read_only_output_is_refused_before_loading(monkeypatch, capsys, read_only_dir):
    for args in (["scan", "-p", "Hello there"], ["eval", "--task", "arc_easy"], ["generate", "-p", "Hi"]):
        target = read_only_dir / ("g.json" if args[0] == "generate" else "sub")
        line = _error(monkeypatch, capsys, *args, "--model", read_only_dir / "no-model", "-o", target)
        assert "--output" in line and "not writable" in line, line


_LIMITED = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = ["melayer", *sys.argv[2:]]
from melayer.cli import main
main()
"""


def test_a_full_disk_mid_run_is_one_line_and_nothing_is_torn(planted_dir, tmp_path):
    """RLIMIT_FSIZE makes every write past 6 kB fail (EFBIG; works as root and in CI, like a full disk's ENOSPC)."""
    out = tmp_path / "ev"
    args = ["eval", "--task", "arc_easy", "--model", str(planted_dir), "--limit", "40", "--batch-size", "2", "-o",
            str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MELAYER_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", _LIMITED, "6000", *args], capture_output=True, text=True, env=env,
                       cwd=REPO, timeout=600, check=False)
    lines = [line for line in r.stderr.splitlines() if line.startswith("melayer: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert "cannot write" in lines[0] and "samples.jsonl" in lines[0], lines[0]
    raw = (out / "samples.jsonl").read_text()
    assert raw.endswith("\n") and len(read_jsonl(out / "samples.jsonl")) == raw.count("\n") > 0  # no torn line
    assert not (out / "eval.json").exists()
    # with room again, the same command resumes and completes: nothing lost, nothing repeated
    again = subprocess.run([sys.executable, "-m", "melayer", *args], capture_output=True, text=True, env=env,
                           cwd=REPO, timeout=600, check=False)
    assert again.returncode == 0, again.stderr
    ids = [rec["id"] for rec in read_jsonl(out / "samples.jsonl")]
    assert len(ids) == len(set(ids)) == 40


@pytest.fixture
def small_disk(tmp_path):
    """A 64 kB file system: a real ENOSPC."""
    yield from _tmpfs(tmp_path / "small", "size=64k")


def test_enospc_on_a_real_full_disk(monkeypatch, capsys, planted_dir, small_disk):
    out = small_disk / "ev"
    line = _error(monkeypatch, capsys, "eval", "--task", "arc_easy", "--model", planted_dir, "--limit", "400",
                  "--batch-size", "8", "-o", out)
    assert "cannot write" in line and "No space left on device" in line, line
    raw = (out / "samples.jsonl").read_text()
    assert raw.endswith("\n") and len(read_jsonl(out / "samples.jsonl")) == raw.count("\n")


# ------------------------------------------------------------------------------------------------ item 5: compare


def test_compare_validates_everything_before_the_first_forward(monkeypatch, capsys, tmp_path, planted_dir):
    out = tmp_path / "cmp"
    line = _error(monkeypatch, capsys, "compare", "--task", "arc_easy", "--limit", "2", "--rates", "0,0.1",
                  "--me-layer", "99", "--model", planted_dir, "-o", out)
    assert "99" in line, line
    assert _files(out) == []
    line = _error(monkeypatch, capsys, "compare", "--task", "arc_easy", "--limit", "2", "--rates", "0,0.1",
                  "--layers", "3-42", "--model", planted_dir, "-o", out)
    assert "out of range" in line and _files(out) == []


def test_compare_rate_directories_are_unambiguous(monkeypatch, capsys, tmp_path, planted_dir):
    from melayer.eval.compare import rate_dir

    assert rate_dir(0.1234561) != rate_dir(0.1234562)
    assert (rate_dir(0.0), rate_dir(0.01), rate_dir(0.001)) == ("rate_0", "rate_0.01", "rate_0.001")  # as before
    out = tmp_path / "cmp"
    code, _, err = _cli(monkeypatch, capsys, "compare", "--task", "arc_easy", "--limit", "2", "--rates",
                        "0.1234561,0.1234562", "--me-layer", "1", "--no-sinks", "--model", planted_dir, "-o", out)
    assert code == 0, err
    rates = json.loads((out / "compare.json").read_text())["rates"]
    assert rates == [0.0, 0.1234561, 0.1234562]
    assert len({p.name for p in out.iterdir() if p.name.startswith("rate_")}) == 3


# ------------------------------------------------------------------------------------------------ item 6: positions


def test_scan_and_generate_refuse_inputs_past_learned_positions(monkeypatch, capsys, tmp_path, gpt2_dir):
    long_prompt = "word " * 60  # 300 byte tokens + BOS > 256 positions
    line = _error(monkeypatch, capsys, "scan", "-p", long_prompt, "--model", gpt2_dir, "-o", tmp_path / "s")
    assert "256" in line and "positions" in line, line
    line = _error(monkeypatch, capsys, "sinks", "-p", long_prompt, "--max-tokens", "0", "--model", gpt2_dir,
                  "-o", tmp_path / "k")
    assert "256" in line and "positions" in line, line
    line = _error(monkeypatch, capsys, "generate", "-p", "word " * 48, "--max-new-tokens", "30", "--model", gpt2_dir)
    assert "256" in line and "positions" in line, line


def test_ppl_window_fits_the_model(monkeypatch, capsys, tmp_path, gpt2_dir):
    code, _, err = _cli(monkeypatch, capsys, "eval", "--task", "ppl", "--limit", "2", "--model", gpt2_dir, "-o",
                        tmp_path / "p")
    assert code == 0, err
    settings = json.loads((tmp_path / "p" / "eval.json").read_text())["settings"]
    assert settings["task_options"]["window"] == 256


def test_loglik_contexts_are_truncated_from_the_left_like_lm_eval(gpt2_dir):
    """Contexts longer than the model's 256 positions: the same log-likelihoods as lm-eval's HFLM (which keeps
    the last max_length tokens), and the record says how many tokens were cut."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    import melayer
    from melayer.eval import run
    from melayer.eval.tasks import get_task

    lm = melayer.load(str(gpt2_dir), progress=False)
    task = get_task("hellaswag")
    samples = [s for s in task.load(200) if len(s.doc["ctx"]) + max(map(len, s.doc["endings"])) > 250][:3]
    assert len(samples) == 3
    ref = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=4)
    assert ref.max_length == 256
    result = run(lm, task, samples=samples, batch_size=2, progress=False)
    pairs = [p for s in samples for p in task._pairs(task.request(s))]
    theirs = ref.loglikelihood([Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i)
                                for i, p in enumerate(pairs)], disable_tqdm=True)
    ours = [ll for rec in result.records for ll in rec["logliks"]]
    assert ours == pytest.approx([ll for ll, _ in theirs], abs=2e-3, rel=1e-5)
    assert all(rec["truncated_tokens"] > 0 for rec in result.records)
    assert result.to_dict()["truncated"]["samples"] == 3


# ------------------------------------------------------------------------------------------------ item 10


def test_eval_layers_without_wemask_is_refused(monkeypatch, capsys, tmp_path, planted_dir):
    line = _error(monkeypatch, capsys, "eval", "--task", "arc_easy", "--limit", "1", "--layers", "99", "--model",
                  planted_dir, "-o", tmp_path / "e")
    assert "--layers" in line and "--wemask" in line, line


def test_massive_token_rule_is_the_same_with_and_without_a_kv_cache():
    """token='massive': a massive token that first appears in the continuation is masked whether the
    continuation is scored in one forward or on a cached context (two passes)."""
    import torch

    from melayer.eval import engine as E
    from melayer.interventions.wemask import wemask
    from melayer.testing import BOS, tiny_lm

    lm = tiny_lm("llama", me_layer=1)
    ctx = lm.tokenizer("The capital of France is")["input_ids"]
    cont = [*lm.tokenizer(" Paris", add_special_tokens=False)["input_ids"], BOS,
            *lm.tokenizer(" again", add_special_tokens=False)["input_ids"]]  # BOS: massive wherever it appears

    def iv():
        return wemask(lm, 0.1, me_layer=1, token="massive")

    cached = E.score_continuations(lm, [ctx], [(0, cont)], intervention=iv)[0][0]
    whole = E.score_tails(lm, [(ctx + cont, len(cont))], intervention=iv)[0][0]
    plain = E.score_tails(lm, [(ctx + cont, len(cont))])[0][0]
    assert abs(whole - plain) > 1e-3  # the mask does something here
    assert cached == pytest.approx(whole, abs=1e-4)
    with torch.no_grad():
        assert torch.isfinite(torch.tensor(cached))
