"""The tutorial notebook (examples/quickstart.ipynb) runs top to bottom on the embedded model, in a fresh kernel,
and the outputs it shows in the docs are the ones this code prints; the README's Python example runs as written."""

from __future__ import annotations

import io
import os
import re
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def _code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_committed_notebook_has_outputs_and_no_errors():
    nbformat = pytest.importorskip("nbformat", reason="the test extra is not installed (pip install -e '.[test]')")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = _code_cells(nb)
    assert cells and all(c.execution_count for c in cells), "run the notebook before committing it (see CONTRIBUTING)"
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for c in cells for o in c.outputs)
    assert "ME layer: 3" in text  # what the docs show is what melayer prints on Gemma-3-270M
    assert "/tmp/" not in text and os.path.expanduser("~") + "/" not in text  # no paths of the machine that ran it


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    nbformat = pytest.importorskip("nbformat", reason="the test extra is not installed (pip install -e '.[test]')")
    nbclient = pytest.importorskip("nbclient", reason="the test extra is not installed (pip install -e '.[test]')")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in _code_cells(nb):
        cell.outputs, cell.execution_count = [], None
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env_path) if p)  # the kernel imports this tree
    try:
        start = time.perf_counter()
        nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
        seconds = time.perf_counter() - start
    finally:
        os.environ["PYTHONPATH"] = env_path
    cells = _code_cells(nb)
    assert all(c.execution_count for c in cells)
    text = "".join(o.get("text", "") for c in cells for o in c.outputs)
    assert "ME layer: 3 (consistency 100%)" in text and "massive dims: [163]" in text
    html = "".join(o.get("data", {}).get("text/html", "") for c in cells for o in c.outputs)
    assert 'data-kind="scan"' in html and 'data-kind="explain"' in html and 'data-kind="compare"' in html
    assert any("image/png" in o.get("data", {}) for c in cells for o in c.outputs)  # the figure
    print(f"notebook ran in {seconds:.0f} s")


@pytest.mark.slow
def test_readme_python_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "melayer.load()" in b]
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    lines = out.getvalue().splitlines()
    assert lines[0] == "3 [163]"  # the comment in the README says what it prints
    assert len(lines) >= 2 and lines[1].strip()
