"""``melayer scan``: bad input gives one ``melayer: error:`` line, exit code 2, no traceback and no scan.json; a
good run writes scan.json and both plots. The bad-input cases run in-process (``melayer.cli.main``, what both
entry points call); one good run goes through ``python -m melayer`` and one bad one through the console script,
each as a real process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NEOX_ARCH, REPO


def _assert_clean_failure(res, output: Path, *expected: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0, res
    assert len(lines) == 1, f"expected one stderr line, got:\n{res.stderr}"
    assert lines[0].startswith("melayer: error: "), lines[0]
    assert "Traceback" not in res.stderr + res.stdout
    for piece in expected:
        assert piece in lines[0], (piece, lines[0])
    assert not (output / "scan.json").exists()
    if output.is_dir():
        assert not any(output.iterdir()), f"left behind: {list(output.iterdir())}"


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, planted_dir, overflow_dir, refused_dir, tiny_gguf):
    """(name, args, expected message pieces) for every kind of bad input."""
    root = tmp_path_factory.mktemp("bad")
    junk = root / "junk.gguf"
    junk.write_bytes(b"this is not a gguf file at all\n" * 100)
    cut = root / "cut.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[: tiny_gguf.stat().st_size // 2])
    empty_dir = root / "empty"
    empty_dir.mkdir()
    empty_prompts = root / "empty.txt"
    empty_prompts.write_text("\n   \n\n")
    a_file = root / "a-file"
    a_file.write_text("not a directory")
    m = str(planted_dir)
    return [
        ("--output is a file", ["-m", m, "-p", "Hello", "-o", a_file], ["exists and is not a directory"]),
        ("--output inside a file", ["-m", m, "-p", "Hello", "-o", a_file / "sub"], ["which is a file"]),
        ("missing path", ["-m", root / "does-not-exist"], ["no such file or directory"]),
        ("not a gguf", ["-m", junk], ["not a GGUF file"]),
        ("truncated gguf", ["-m", cut], ["corrupt or truncated GGUF"]),
        ("empty dir", ["-m", empty_dir], ["holds no model"]),
        ("unsupported architecture", ["-m", refused_dir], ["cannot map model_type 'cpmant'", "--arch"]),
        ("wrong --arch path", ["-m", m, "--arch", root / "nope.json"], ["neither a known architecture"]),
        ("empty --prompt", ["-m", m, "--prompt", "   "], ["empty prompt"]),
        ("empty --prompt ''", ["-m", m, "--prompt", ""], ["empty prompt"]),
        ("empty prompt file", ["-m", m, "--prompts", empty_prompts], ["holds no prompts"]),
        ("missing prompt file", ["-m", m, "--prompts", root / "nope.txt"], ["prompt file not found"]),
        ("both prompt options", ["-m", m, "-p", "hi", "--prompts", empty_prompts], ["not both"]),
        ("bad dtype", ["-m", m, "--dtype", "float8"], ["'float8' is not one of 'float32', 'bfloat16', 'float16'"]),
        ("bad criterion", ["-m", m, "--persist-frac", "2"], ["invalid massive-activation criterion: persist_frac=2"]),
        ("float16 overflow", ["-m", overflow_dir, "-p", "Hello world there", "--dtype", "float16"],
         ["float16", "--dtype float32"]),
        ("hub id offline", ["-m", "melayer-test-org/no-such-model"], ["Hugging Face hub"]),
    ]


def test_bad_input_gives_one_error_line_and_no_output(bad_inputs, cli, tmp_path):
    for name, args, expected in bad_inputs:
        out = Path(args[args.index("-o") + 1]) if "-o" in args else tmp_path / name.replace(" ", "_")
        res = cli("scan", *args, *([] if "-o" in args else ["-o", out]))
        try:
            assert res.returncode == 2, res
            _assert_clean_failure(res, out, *expected)
        except AssertionError as exc:
            raise AssertionError(f"case {name!r}: {exc}") from None


def test_successful_scan_writes_json_and_plots(run_cli, planted_dir, tmp_path):
    import melayer
    from melayer.util.io import read_prompts

    out = tmp_path / "out"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is Paris.\n\nHello world, this is a test!\n1 2 3 4 5 6\n")
    res = run_cli("scan", "-m", planted_dir, "--prompts", prompts, "-o", out)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["layer_magnitudes.png", "massive_token_surface.png", "scan.json"]
    for png in ("layer_magnitudes.png", "massive_token_surface.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 10_000
    d = json.loads((out / "scan.json").read_text())
    assert d["model"] == "tiny-planted" and d["me_layer"] == 2 and d["massive_dims"] == [7]
    assert d["me_layer_consistency"] == 1.0 and len(d["prompts"]) == 3
    assert d["massive_tokens"][0]["token"] == "<bos>"
    assert "ME layer: 2" in res.stdout and f"wrote {out / 'scan.json'}" in res.stdout
    # the file is what the Python API gives for the same model and prompts
    api = melayer.scan(melayer.load(str(planted_dir), progress=False),
                       read_prompts(str(prompts)), progress=False).to_dict()
    assert api.keys() == d.keys()
    for key in ("me_layer", "me_layer_consistency", "massive_dims", "massive_tokens", "prompts", "threshold"):
        assert api[key] == d[key], key
    assert api["peak"]["value"] == pytest.approx(d["peak"]["value"], rel=1e-5)


def test_criterion_options_reach_scan_json(cli, planted_dir, tmp_path):
    out = tmp_path / "out"
    res = cli("scan", "-m", planted_dir, "-p", "Hello world, this is a test!", "-o", out, "--no-plots",
                  "--abs-min", "1e9", "--persist-frac", "0.5")
    assert res.returncode == 0, res.stderr
    assert [p.name for p in out.iterdir()] == ["scan.json"]
    d = json.loads((out / "scan.json").read_text())
    assert d["threshold"]["abs_min"] == 1e9 and d["threshold"]["persist_frac"] == 0.5
    assert d["me_layer"] is None and d["massive"] == [] and d["massive_token_profile"] is None
    assert "no persistent massive activations" in res.stdout


def test_arch_override_file_makes_an_unsupported_model_scan(cli, unsupported_dir, tmp_path):
    arch = tmp_path / "neox.json"
    arch.write_text(json.dumps(NEOX_ARCH))
    out = tmp_path / "out"
    res = cli("scan", "-m", unsupported_dir, "--arch", arch, "-p", "Hello world, this is a test!", "-o", out,
                  "--no-plots")
    assert res.returncode == 0, res.stderr
    d = json.loads((out / "scan.json").read_text())
    assert d["arch"] == "gpt_neox" and d["num_layers"] == 2


def test_console_script_is_the_same_entry_point(tmp_path):
    script = Path(sys.executable).with_name("melayer")
    if not script.exists():
        script = shutil.which("melayer")
    if script is None:
        pytest.skip("the melayer console script is not installed in this environment")
    res = subprocess.run([str(script), "scan", "-m", str(tmp_path / "nope"), "-o", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2
    assert res.stderr.strip() == f"melayer: error: no such file or directory: {tmp_path / 'nope'}"
