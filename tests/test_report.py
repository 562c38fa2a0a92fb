"""The HTML report: built from real melayer outputs of a tiny planted checkpoint, checked as text and in a real
headless browser (Debian's chromium driven by Playwright), plus bad input and the new figures' data."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from melayer.util.errors import MelayerError

KINDS = ("scan", "weights", "explain", "rigidity", "sinks", "eval", "compare")


@pytest.fixture(scope="session")
def outputs(tmp_path_factory, planted_dir, run_cli) -> Path:
    """Every analysis command run once on the tiny planted checkpoint (me layer 2, dim 7), as a user would."""
    root = tmp_path_factory.mktemp("report-inputs")
    m = ["--model", str(planted_dir)]
    commands = [
        ["scan", *m, "--no-plots", "-o", root / "scan"],
        ["weights", "-m", str(planted_dir), "--confirm", "--no-plots", "-o", root / "weights"],
        ["explain", *m, "--no-plots", "--n-prompts", "2", "--ppl-tokens", "64", "--random-draws", "1", "-o",
         root / "explain"],
        ["rigidity", *m, "--no-plots", "--n-prompts", "3", "-o", root / "rigidity"],
        ["sinks", *m, "--no-plots", "--windows", "2", "-o", root / "sinks"],
        ["eval", *m, "--task", "arc_easy", "--limit", "4", "-o", root / "eval"],
        ["compare", *m, "--task", "arc_easy", "--limit", "6", "--rates", "0,0.3", "-o", root / "compare"],
    ]
    for cmd in commands:
        r = run_cli(*cmd)
        assert r.returncode == 0, (cmd, r.stderr[-2000:])
    return root


@pytest.fixture(scope="session")
def finetune_output(tmp_path_factory) -> Path:
    """A real (3-step) SFT run with WeMask on the tiny model, when the fine-tuning stage is installed."""
    ft = pytest.importorskip("melayer.finetuning", reason="melayer.finetuning is not on this branch")
    from melayer.testing import tiny_lm

    root = tmp_path_factory.mktemp("report-ft")
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q{i}: {i} plus {i}?", "completion": f"{2 * i}"}) + "\n"
                            for i in range(6)))
    ft.finetune(lm=tiny_lm("llama"), data=str(data), output=str(root / "sft"), wemask=0.1, max_steps=3,
                max_length=128, per_device_train_batch_size=2, logging_steps=1, progress=False)
    return root / "sft"


def _html(*sources, **kw) -> str:
    from melayer.reporting.page import html

    return html(*sources, **kw)


def _kinds(page: str) -> set[str]:
    return set(re.findall(r'<section id="[^"]+" class="section section-(\w+)" data-kind=', page))


# --------------------------------------------------------------------------------------------------
# the page as text


def test_every_section_for_its_input_and_only_then(outputs, tmp_path):
    full = _html(outputs, output=tmp_path / "all.html")
    assert (tmp_path / "all.html").read_text() == full
    assert _kinds(full) == set(KINDS)
    # a compare directory's per-rate eval.json files belong to the comparison, not to their own sections
    assert full.count('class="section section-eval"') == 1
    only_scan = _html(outputs / "scan")
    assert _kinds(only_scan) == {"scan"}
    assert "Full-factorial ablation" not in only_scan and "dose-response" not in only_scan
    two = _html(outputs / "sinks", outputs / "compare" / "compare.json")
    assert _kinds(two) == {"sinks", "compare"}
    # what the sections say comes from the files
    scan = json.loads((outputs / "scan" / "scan.json").read_text())
    assert scan["me_layer"] == 2 and f"ME layer {scan['me_layer']}</b>" in full
    assert "Massive dims (persistent)" in full and "<td>7</td>" in full
    explain = json.loads((outputs / "explain" / "explain.json").read_text())
    for run in explain["ablations"]:
        assert f"<td>{run['outcome']}</td>" in full
    assert "McNemar p" in full and "difference to rate 0" in full


def test_raw_json_is_embedded_verbatim_and_ids_are_unique(outputs):
    page = _html(outputs)
    blobs = re.findall(r'<script type="application/json" id="raw-\d+" data-kind="(\w+)" data-source="([^"]+)">(.*?)'
                       r"</script>", page, flags=re.DOTALL)
    assert sorted(k for k, _, _ in blobs) == sorted(KINDS)
    for _, source, text in blobs:
        assert json.loads(text) == json.loads(Path(source).read_text())
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1][:5]
    assert page.count("<svg ") == page.count("<figure ") >= 6
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing external
    for fig in re.findall(r"<figure .*?</figure>", page, flags=re.DOTALL):
        assert re.search(r'<svg role="img" aria-label="[^"]{20,}"', fig) and "<figcaption>" in fig


def test_text_from_the_inputs_is_escaped(outputs, tmp_path):
    data = json.loads((outputs / "scan" / "scan.json").read_text())
    data["model"] = "<script>alert('x')</script> & $5 model"
    data["massive_tokens"][0]["token"] = "</script><b>"
    (tmp_path / "scan.json").write_text(json.dumps(data))
    page = _html(tmp_path)
    assert "<script>alert" not in page and "</script><b>" not in page
    assert "&lt;script&gt;alert(" in page
    raw = re.search(r'<script type="application/json" id="raw-0"[^>]*>(.*?)</script>', page, flags=re.DOTALL).group(1)
    assert json.loads(raw)["model"] == data["model"]


def test_dose_response_plots_the_paired_difference(outputs):
    from melayer.reporting.compare import dose_response

    data = json.loads((outputs / "compare" / "compare.json").read_text())
    fig = dose_response(data)
    names = list(data["per_rate"][0]["metrics"])
    for ax, name in zip(fig.axes, names):
        line = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == len(data["per_rate"])][-1]
        want = [0.0] + [r["metrics"][name]["vs_baseline"]["diff"] for r in data["per_rate"][1:]]
        assert list(line.get_ydata()) == pytest.approx(want)
    assert fig.axes[len(names)].get_title().startswith("sink rate")


@pytest.fixture(scope="module")
def methods_compare(tmp_path_factory, planted_dir) -> Path:
    """A compare of a WeMask rate and two registered methods on the tiny planted checkpoint."""
    import melayer

    out = tmp_path_factory.mktemp("report-methods") / "compare"
    lm = melayer.load(str(planted_dir), progress=False)
    melayer.compare(lm, "arc_easy", [0.0, 0.3], limit=6, batch_size=6, output=out, n_boot=200, progress=False,
                    methods=["wemask_before:rate=0.3", "act:heads=all"])
    return out


def test_compare_section_has_the_forest_plot_and_every_method(methods_compare, tmp_path):
    from melayer.reporting.compare import forest

    data = json.loads((methods_compare / "compare.json").read_text())
    labels = ["wemask:rate=0.3", "wemask_before:rate=0.3", "act:heads=all"]
    assert [r["method"] for r in data["per_method"]] == labels[1:]
    fig = forest(data)
    names = list(data["per_rate"][0]["metrics"])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == labels
    rows = [data["per_rate"][1], *data["per_method"]]
    for ax, name in zip(fig.axes, names):  # each condition's point sits at its paired difference (top row first)
        points = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 1 and ln.get_marker() == "o"]
        assert [ln.get_xdata()[0] for ln in points] == pytest.approx([r["metrics"][name]["vs_baseline"]["diff"]
                                                                       for r in rows])
    page = _html(methods_compare)
    assert "Forest plot: each condition" in page
    for label in labels:
        assert f"<td>{label}</td>" in page
    for row in data["per_method"]:
        assert f"<td>{row['intervention']['rule']}</td>" in page
    assert "BH-adjusted p" in page and "massive after ME layer (relative)" in page
    assert "Methods' calibration (never evaluated): the last 16 arc_easy items" in page
    # a hostile method label and rule in compare.json stay text
    data["per_method"][0]["method"] = "<img src=x onerror=alert(1)>"
    data["per_method"][0]["intervention"]["rule"] = "</td><script>alert(2)</script>"
    (tmp_path / "compare.json").write_text(json.dumps(data))
    page = _html(tmp_path / "compare.json")
    assert "<img src=x" not in page and "<script>alert(2)" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;/td&gt;&lt;script&gt;alert(2)" in page


def test_interactive_inlines_plotly_and_keeps_the_static_figures(outputs):
    page = _html(outputs / "scan", outputs / "compare", interactive=True)
    assert len(page) > 3_000_000 and "Plotly.newPlot" in page
    assert page.count('class="plotly-fig"') == 2
    assert page.count("<svg ") >= 3  # printed pages keep the SVG figures


@pytest.mark.parametrize("case", ["empty dir", "missing", "truncated", "foreign", "wrong kind", "malformed",
                                  "newer schema"])
def test_bad_input_is_one_line_and_writes_nothing(outputs, tmp_path, case):
    src = tmp_path / "in"
    src.mkdir()
    scan = (outputs / "scan" / "scan.json").read_text()
    if case == "truncated":
        (src / "scan.json").write_text(scan[: len(scan) // 2])
    elif case == "foreign":
        (src / "sinks.json").write_text(json.dumps({"schema": "someone.else/1", "sink_rate": 0.5}))
    elif case == "wrong kind":
        (src / "sinks.json").write_text(scan)
    elif case == "malformed":
        (src / "scan.json").write_text(json.dumps({"schema": "melayer.scan/1", "model": "x"}))
    elif case == "newer schema":
        (src / "scan.json").write_text(scan.replace('"melayer.scan/1"', '"melayer.scan/2"'))
    target = src / "nope" if case == "missing" else src
    out = tmp_path / "report.html"
    out.write_text("previous report")
    with pytest.raises(MelayerError) as exc:
        _html(target, output=out)
    msg = str(exc.value)
    assert "\n" not in msg and str(target) in msg
    assert out.read_text() == "previous report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "report.html"]  # no temp file left


def test_output_that_cannot_be_written_fails_before_any_work(outputs, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for bad in (tmp_path, a_file / "report.html"):
        with pytest.raises(MelayerError, match="-o"):
            _html(outputs / "scan", output=bad)
    deep = tmp_path / "new" / "dir" / "report.html"
    _html(outputs / "scan", output=deep)
    assert deep.read_text().startswith("<!DOCTYPE html>")


def test_cli_writes_the_page_and_refuses_bad_input_in_one_line(outputs, run_cli, planted_dir, tmp_path):
    out = tmp_path / "r" / "report.html"
    r = run_cli("report", outputs / "scan", outputs / "sinks", "-o", out)
    assert r.returncode == 0, r.stderr
    assert _kinds(out.read_text()) == {"scan", "sinks"} and str(out) in r.stdout
    empty = tmp_path / "empty"
    empty.mkdir()
    for args in ([empty, "-o", tmp_path / "x.html"], [outputs / "scan", "-o", tmp_path]):
        r = run_cli("report", *args)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("melayer: error: "), r.stderr
    assert not (tmp_path / "x.html").exists()
    # --report refreshes a page next to a command's outputs
    r = run_cli("scan", "--model", planted_dir, "--no-plots", "--report", "-o", tmp_path / "scan")
    assert r.returncode == 0, r.stderr
    assert _kinds((tmp_path / "scan" / "report.html").read_text()) == {"scan"}


def test_results_display_as_report_sections_in_a_notebook(planted_dir):
    import melayer
    from melayer.analysis.sinks import sinks

    lm = melayer.load(str(planted_dir), progress=False)
    texts = ["The cat sat on the mat and looked at the birds outside.", "Hello world, this is a longer test prompt."]
    result = melayer.scan(lm, texts, progress=False)
    a, b = result._repr_html_(), result._repr_html_()
    assert a.startswith('<div class="melayer-report">') and 'data-kind="scan"' in a and "ME layer 2</b>" in a
    assert a.count("<svg ") == 2  # per-layer magnitudes, the massive token over layers x dims
    ids_a, ids_b = (set(re.findall(r'\bid="([^"]+)"', h)) for h in (a, b))
    assert ids_a and not ids_a & ids_b  # two results shown in one notebook do not share element ids
    page = sinks(lm, texts, min_tokens=0, progress=False)._repr_html_()
    assert 'data-kind="sinks"' in page and "<svg " in page


def test_training_section_from_a_finetune_run(finetune_output):
    page = _html(finetune_output.parent)
    assert _kinds(page) == {"finetune"} and "Training curves per optimizer step" in page
    assert page.count("<svg ") == 1


def test_finetune_png_is_the_reports_training_figure(tmp_path):
    """``melayer finetune``'s loss_curve.png draws the report's training curves (every logged quantity), also for
    a run that logged one step."""
    from melayer.reporting.finetune import loss_curve, training_curves
    from melayer.reporting.plotting import plt

    log = [{"step": i, "loss": 2 - 0.1 * i, "reward": 0.1 * i, "learning_rate": 2e-4 / i, "grad_norm": 1.0 + i}
           for i in (1, 2, 3)]
    many, one = training_curves(log, "t", min_points=1), training_curves(log[:1], "t", min_points=1)
    titles = ["loss", "reward / accuracy", "learning rate", "gradient norm"]
    assert [ax.get_title() for ax in many.axes] == [ax.get_title() for ax in one.axes] == titles
    assert [len(ax.lines[0].get_xdata()) for ax in many.axes] == [3] * 4 and list(one.axes[0].get_xticks()) == [1]
    plt.close(many), plt.close(one)
    assert loss_curve(log[:1], tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_magnitude_view_shows_gemma_precursor_and_persistent_dim(gemma_scan):
    from melayer.reporting.scan import magnitude_map, profile_dims

    d = gemma_scan.to_dict()
    dims = dict(profile_dims(d))
    assert dims[163] == "persistent" and dims[400] == "precursor"  # README: dim 400 ~3e3 before layer 3
    fig = magnitude_map(d)
    ax = next(a for a in fig.axes if a.get_title().startswith("dims that matter"))
    lines = {ln.get_label(): ln.get_ydata() for ln in ax.get_lines()}
    assert max(lines["dim 400 (precursor)"]) > 1e3 and max(lines["dim 163 (persistent)"]) > 5e4


# --------------------------------------------------------------------------------------------------
# in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
browser_reason = ("Debian's chromium is not installed (make setup installs it with apt where it can): the browser "
                  "checks of the HTML report are skipped")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip(browser_reason)
    sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'melayer[report]')")
    with sync.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _shots_dir(tmp_path: Path) -> Path:
    d = Path(os.environ.get("MELAYER_SCREENSHOTS", tmp_path))
    d.mkdir(parents=True, exist_ok=True)
    return d


def check_in_browser(browser, path: Path, kinds: set[str], shot: Path, interactive: bool = False) -> None:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems, requests = [], []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.wait_for_timeout(300)
    assert problems == []
    assert requests == [path.resolve().as_uri()]  # the page itself, nothing else
    assert set(page.eval_on_selector_all("section[data-kind]", "els => els.map(e => e.dataset.kind)")) - {
        "settings", "raw"} == kinds
    sizes = page.eval_on_selector_all("figure .svg-fig > svg", "els => els.map(e => [e.getBoundingClientRect().width, "
                                                    "e.getBoundingClientRect().height])")
    assert sizes and all(w > 100 and h > 100 for w, h in sizes), sizes
    assert page.eval_on_selector_all("table", "els => els.filter(e => e.offsetParent !== null).length") > 0
    if interactive:
        plots = page.eval_on_selector_all(".plotly-fig .main-svg", "els => els.map(e => e.getBoundingClientRect().width)")
        assert plots and min(plots) > 100
    # the raw JSON opens into a readable view
    page.click("details.raw summary")
    # the page fills the view from its "toggle" event, which the browser dispatches after the click returns
    page.wait_for_function("document.querySelector('details.raw pre').textContent.length > 0", timeout=5000)
    assert len(page.inner_text("details.raw pre")) > 100
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    # printed: the figures stay, navigation and raw JSON go
    page.emulate_media(media="print")
    assert all(w > 100 for w, _ in page.eval_on_selector_all(
        "figure .svg-fig > svg", "els => els.map(e => [e.getBoundingClientRect().width, 0])"))
    assert page.eval_on_selector("nav", "e => getComputedStyle(e).display") == "none"
    pdf = page.pdf(format="A4")
    assert pdf[:4] == b"%PDF" and len(pdf) > 20_000
    page.close()


def test_report_in_a_real_browser(browser, outputs, tmp_path):
    shots = _shots_dir(tmp_path)
    path = tmp_path / "report.html"
    _html(outputs, output=path)
    check_in_browser(browser, path, set(KINDS), shots / "report.png")
    path = tmp_path / "scan-only.html"
    _html(outputs / "scan", output=path)
    check_in_browser(browser, path, {"scan"}, shots / "report-scan.png")


def test_interactive_report_in_a_real_browser(browser, outputs, tmp_path):
    path = tmp_path / "interactive.html"
    _html(outputs / "scan", outputs / "compare", output=path, interactive=True)
    check_in_browser(browser, path, {"scan", "compare"}, _shots_dir(tmp_path) / "report-interactive.png",
                     interactive=True)


def test_finetune_report_in_a_real_browser(browser, finetune_output, tmp_path):
    path = tmp_path / "finetune.html"
    _html(finetune_output, output=path)
    check_in_browser(browser, path, {"finetune"}, _shots_dir(tmp_path) / "report-finetune.png")


def test_an_analysis_registered_without_sections_gets_a_table_of_its_values():
    """A registry entry with an analysis function but no rendering of its own is still in the report."""
    import dataclasses

    import melayer
    from melayer.reporting.blocks import Figures
    from melayer.reporting.results import KINDS
    from melayer.testing import tiny_lm

    data = melayer.scan(tiny_lm("llama", me_layer=1), ["Hello there, tiny model of the world."],
                        progress=False).to_dict()
    bare = dataclasses.replace(KINDS["scan"], sections=None, summary=None, figures=())
    assert bare.in_report and not dataclasses.replace(bare, run=None).in_report
    [section] = bare.build_sections(data, Figures())
    rows = dict(section["blocks"][0]["rows"])
    assert section["title"] == "ME layer" and rows["me_layer"] == "1" and rows["model"] == data["model"]
    assert "schema" not in rows and "prompts" not in rows  # top-level numbers and text only


HOSTILE_NAME = ('M<a href="https://example.org/">link</a><span style="font-size:80px;fill:red">big</span>'
                '%{x} $x$ &amp; \u202eevil')


@pytest.fixture(scope="module")
def hostile_scan(planted_dir, run_cli, tmp_path_factory) -> Path:
    """A real scan of the planted checkpoint whose model and token names carry plotly markup, a hover-template
    field, LaTeX dollars, an entity and an RTL override."""
    root = tmp_path_factory.mktemp("hostile-report")
    r = run_cli("scan", "--model", planted_dir, "--no-plots", "-o", root / "run")
    assert r.returncode == 0, r.stderr
    data = json.loads((root / "run" / "scan.json").read_text())
    data["model"] = HOSTILE_NAME
    data["massive_token_profile"]["token"] = '<b style="fill:red">tok</b>\u2066'
    (root / "in").mkdir()
    (root / "in" / "scan.json").write_text(json.dumps(data))
    return root / "in"


def test_bidi_and_terminal_controls_in_names_are_shown_not_obeyed(hostile_scan):
    from melayer.util.console import _UNSAFE

    page = _html(hostile_scan, title="report \u202etxt.exe")
    assert not _UNSAFE.search(page)  # no RTL override left to reverse the page's own text after it
    assert "\\u202eevil" in page and "report \\u202etxt.exe</h1>" in page
    raw = re.search(r'<script type="application/json" id="raw-0"[^>]*>(.*?)</script>', page, flags=re.DOTALL).group(1)
    assert json.loads(raw)["model"] == HOSTILE_NAME  # the embedded JSON stays exact


def test_interactive_figures_show_hostile_names_as_text(browser, hostile_scan, tmp_path):
    """plotly renders links and styles from a subset of HTML in figure text: names must show as typed."""
    from melayer.reporting import interactive as I
    from melayer.reporting.compare import dose_response_plotly

    metric = {"vs_baseline": {"diff": 0.1, "ci95": [0.0, 0.2]}, "mcnemar": {"p": 0.5}, "value": 0.5}
    compare = {"model": HOSTILE_NAME, "task": "<i>task</i>", "per_rate": [  # two metrics: plotly shows a legend
        {"rate": r, "wemask": {"k": k}, "metrics": {'<a href="https://example.org/">acc</a>%{y}': metric,
                                                    "acc_norm": metric}} for r, k in ((0.0, 0), (0.1, 2))]}
    path = tmp_path / "interactive.html"
    _html(hostile_scan, output=path, interactive=True)
    (tmp_path / "dose.html").write_text(
        f"<!DOCTYPE html><meta charset='utf-8'><script>{I.plotly_js()}</script><div id='f'></div>"
        f"<script>var s = {I.to_json(dose_response_plotly(compare))}; Plotly.newPlot('f', s.data, s.layout);</script>")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(path.resolve().as_uri(), wait_until="load")
    page.wait_for_timeout(300)
    assert page.eval_on_selector_all(".plotly-fig .main-svg", "els => els.length") > 0
    title = page.eval_on_selector(".plotly-fig .gtitle", "e => e.textContent")
    assert title.startswith(HOSTILE_NAME.replace("\u202e", "\\u202e") + ": token '<b style=\"fill:red\">tok</b>\\")
    assert page.eval_on_selector_all(".plotly-fig a, .plotly-fig tspan[style]", "els => els.length") == 0
    page.click("details.raw summary")
    page.wait_for_function("document.querySelector('details.raw pre').textContent.length > 0", timeout=5000)
    assert "\\u202eevil" in page.inner_text("details.raw pre") and "\u202e" not in page.inner_text("body")
    page.goto((tmp_path / "dose.html").resolve().as_uri(), wait_until="load")
    page.wait_for_timeout(300)
    title = page.eval_on_selector("#f .gtitle", "e => e.textContent")
    assert title.startswith(HOSTILE_NAME.replace("\u202e", "\\u202e") + " - <i>task</i>: difference")
    legend = page.eval_on_selector_all("#f .legendtext", "els => els.map(e => e.textContent)")
    assert legend == ['<a href="https://example.org/">acc</a>%{y}', "acc_norm"]
    page.evaluate("Plotly.Fx.hover('f', [{curveNumber: 0, pointNumber: 1}])")
    page.wait_for_selector("#f .hovertext")
    assert page.eval_on_selector("#f .hovertext", "e => e.textContent").startswith('<a href="https://example.org/">acc</a>%{y}')
    assert page.eval_on_selector_all("#f .main-svg a, #f tspan[style], #f tspan[font-style]", "els => els.length") == 0
    assert problems == []  # no "MathJax is not loaded" from the dollars either
    page.close()
