"""The documentation site: `mkdocs build --strict` is clean, every command has a page whose examples use options the
command has, and the built site works in a real browser (Debian's chromium driven by Playwright, as for the HTML
report): no console error, no request leaving the site, every page reachable from the navigation, every internal
link and anchor resolves, code blocks rendered."""

from __future__ import annotations

import html.parser
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.parse
import urllib.request
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_api_reference import resolve

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _commands() -> dict:
    """Every command a user can type, by its words ("scan", "sweep run", ...); hidden aliases left out."""
    import typer

    from melayer.cli import app

    out = {}
    for name, cmd in typer.main.get_command(app).commands.items():
        if getattr(cmd, "hidden", False):
            continue
        for sub, subcmd in getattr(cmd, "commands", {}).items():
            out[f"{name} {sub}"] = subcmd
        if not getattr(cmd, "commands", None):
            out[name] = cmd
    return out


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md"))]


# --------------------------------------------------------------------------------------------------
# the pages against the CLI (no build needed)


def test_every_command_has_a_page_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {m.group(1): p for p in (DOCS / "commands").glob("*.md")
             for m in re.finditer(r"^<!-- melayer-cli ([^>]+?) -->$", p.read_text(), re.M)}
    assert set(_commands()) <= set(pages), f"commands without a page: {set(_commands()) - set(pages)}"
    for page in set(pages.values()):
        assert f"commands/{page.name}" in nav, f"{page} is not in mkdocs.yml's nav"


def test_every_page_is_in_the_nav():
    import yaml

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for v in node.values():
                yield from pages(v)
        elif isinstance(node, list):
            for v in node:
                yield from pages(v)

    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    in_nav = set(pages(config["nav"]))
    # exclude_docs: fragments other pages include (the Speed page's tables, written by `make bench`)
    excluded = tuple(line.strip().strip("/") + "/" for line in config.get("exclude_docs", "").splitlines() if line.strip())
    on_disk = {rel for p in DOCS.rglob("*") if p.suffix in (".md", ".ipynb")
               if not (rel := p.relative_to(DOCS).as_posix()).startswith(excluded)}
    assert on_disk - in_nav == set(), "add these pages to the nav in mkdocs.yml"
    assert in_nav - on_disk == set()


def test_speed_tables_come_from_make_bench():
    """No page holds a hand-copied speed table: each bench `bench/all.sh` runs writes docs/bench/NAME.md
    (bench/fragment.py), a page includes it (the Speed page, or the page of the command it times), and the Speed page
    includes the verdicts and the run time."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("fragment", ROOT / "bench/fragment.py")
    fragment = module_from_spec(spec)
    spec.loader.exec_module(fragment)
    benches = fragment.benches()
    assert len(benches) >= 8
    pages = {p: p.read_text() for p in DOCS.rglob("*.md") if DOCS / "bench" not in p.parents}
    included = {name: page for page, text in pages.items()
                for name in re.findall(r'^--8<-- "docs/bench/([\w-]+)\.md"$', text, re.M)}
    missing = [b for b in benches if b not in included]
    assert missing == [], (f"benches of bench/all.sh whose table no page includes: {missing}; add "
                           '--8<-- "docs/bench/NAME.md" to the page and run `bash bench/all.sh NAME` (or '
                           "`python bench/fragment.py --targets` for a 'not measured yet' note)")
    assert included.get("targets") == included.get("total") == DOCS / "speed.md"
    speed = pages[DOCS / "speed.md"]
    assert not re.search(r"^\|.*\d", speed, re.M), "a table with numbers written into docs/speed.md by hand"
    for name in included:
        text = (DOCS / "bench" / f"{name}.md").read_text()
        assert text.startswith("<!-- written by `make bench`"), name
        if name not in ("targets", "total") and "Not measured on this code yet" not in text:
            assert re.search(r"with \d+ torch/OMP threads? on .+, \d+ s\. Regenerate on your machine", text) and "|---" in text, name


def _melayer_lines(text: str):
    """Every `melayer COMMAND ...` line inside a fenced code block (continuation lines joined)."""
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("melayer "):
                yield line


def test_documented_command_lines_use_existing_commands_and_options():
    commands = _commands()
    checked = 0
    for path in _doc_files():
        for line in _melayer_lines(path.read_text()):
            words = shlex.split(line)
            if words[1:] == ["--help"]:
                continue
            plain = [w for w in words[1:] if not w.startswith("-")]
            name = plain[0] if plain else None
            if name is not None and name not in commands and any(c.startswith(name + " ") for c in commands):
                # a group: its command is the next word, or `run` (`melayer sweep SPEC` runs a spec)
                name = f"{name} {plain[1]}" if f"{name} {plain[1]}" in commands else f"{name} run"
            assert name in commands, f"{path.name}: `{line}`: melayer has no command {name!r}"
            params = commands[name].params
            known = {o for p in params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
            flags = {o for p in params if getattr(p, "is_flag", False) for o in (*p.opts, *p.secondary_opts)}
            arguments = [p for p in params if p.param_type_name == "argument"]
            positional, rest = [], words[1 + len(name.split()):]
            if name.startswith("sweep ") and words[2] != name.split()[1]:
                rest = words[2:]  # `melayer sweep SPEC` is `melayer sweep run SPEC`
            i = 0
            while i < len(rest):
                word = rest[i]
                if word.startswith("-") and not re.fullmatch(r"-\d.*", word):
                    assert word.split("=")[0] in known, f"{path.name}: `{line}`: melayer {name} has no option {word}"
                    i += 1 if (word in flags or "=" in word) else 2
                    continue
                positional.append(word)
                i += 1
            if not any(p.nargs == -1 for p in arguments):
                assert len(positional) <= len(arguments), f"{path.name}: `{line}`: melayer {name} takes no {positional}"
            checked += 1
    assert checked >= 30, checked


def _resolves(name: str) -> bool:
    try:
        resolve(name)
    except (LookupError, AttributeError):
        return False
    return True


def test_every_python_name_in_the_docs_exists():
    """`melayer.x.y` in the README and the docs names a module, function or class that exists (the API moves)."""
    name = re.compile(r"(?<![\w/.])(melayer(?:\.[A-Za-z_]\w*)+)(?![\w/-]|\.\w)")
    missing, seen = [], 0
    for path in _doc_files():
        for m in name.finditer(path.read_text()):
            seen += 1
            if not _resolves(m.group(1)):
                missing.append(f"{path.relative_to(ROOT)}: {m.group(1)}")
    assert seen > 40
    assert sorted(set(missing)) == []


# --------------------------------------------------------------------------------------------------
# the build


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    warnings = [ln for ln in r.stderr.splitlines() if "WARNING" in ln]
    assert warnings == []
    return out


def _html_pages(site: Path) -> set[str]:
    return {p.relative_to(site).as_posix() for p in site.rglob("*.html") if p.name != "404.html"}


def test_every_page_is_built_with_its_generated_parts(site):
    pages = _html_pages(site)
    assert {"index.html", "getting-started/index.html", "commands/scan/index.html", "reference/index.html",
            "architectures/index.html", "tutorials/quickstart/index.html"} <= pages
    scan = (site / "commands/scan/index.html").read_text()
    assert "--persist-frac" in scan and "melayer scan [OPTIONS]" in scan  # the option table, from the command
    arch = (site / "architectures/index.html").read_text()
    assert all(f"<code>{t}</code>" in arch for t in ("llama", "gemma3_text", "gpt2"))
    ref = (site / "reference/index.html").read_text()
    assert 'id="melayer.analysis.scan.scan"' in ref  # mkdocstrings rendered the API
    assert (site / "assets/layer_magnitudes.png").stat().st_size > 10_000


# --------------------------------------------------------------------------------------------------
# in a real browser, over HTTP (the site uses directory URLs)


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("href"):
            self.hrefs.append(a["href"])


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(site):
    handler = partial(_QuietHandler, directory=str(site))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make setup installs it with apt where it can)")
    sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'melayer[report]')")
    with sync.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _page_path(base: str, url: str) -> str | None:
    """The site-relative HTML file a same-site URL points at (None for other sites)."""
    if not url.startswith(base):
        return None
    path = urllib.parse.urlparse(url).path[len(urllib.parse.urlparse(base).path):]
    return path + "index.html" if path == "" or path.endswith("/") else path


def test_site_in_chromium(site, served, browser):
    pages = _html_pages(site)
    base = served
    home = browser.new_page(viewport={"width": 1280, "height": 900})
    home.goto(base, wait_until="load")
    nav = home.eval_on_selector_all("nav.md-nav--primary a.md-nav__link[href]", "els => els.map(e => e.href)")
    home.close()
    in_nav = {_page_path(base, u.split("#")[0]) for u in nav} - {None}
    assert pages - in_nav == set(), f"pages not reachable from the navigation: {sorted(pages - in_nav)}"

    ids: dict[str, set[str]] = {}
    code_blocks = {}
    for rel in sorted(pages):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems: list[str] = []
        page.on("console", lambda m, p=problems: p.append(f"console {m.type}: {m.text}")
                if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e, p=problems: p.append(f"page error: {e}"))
        page.on("requestfailed", lambda r, p=problems: p.append(f"failed request: {r.url}"))
        page.on("request", lambda r, p=problems: None if r.url.startswith(base) or r.url.startswith("data:")
                else p.append(f"request leaving the site: {r.url}"))
        url = base + (rel[: -len("index.html")] if rel.endswith("index.html") else rel)
        response = page.goto(url, wait_until="load")
        page.wait_for_timeout(100)
        assert response is not None and response.ok, (rel, response and response.status)
        assert problems == [], (rel, problems)
        assert page.inner_text("article").strip(), rel
        code_blocks[rel] = page.eval_on_selector_all("article pre", "els => els.length")
        page.close()
        parser = _Links()
        parser.feed((site / rel).read_text())
        ids[rel] = parser.ids

    broken = []
    for rel in sorted(pages):
        parser = _Links()
        parser.feed((site / rel).read_text())
        page_url = base + rel
        for href in parser.hrefs:
            target = urllib.parse.urljoin(page_url, href)
            path = _page_path(base, target.split("#")[0])
            if path is None:
                continue
            if not (site / path).exists():
                broken.append(f"{rel}: {href} (no {path})")
                continue
            anchor = urllib.parse.urlparse(target).fragment
            if anchor and path in ids and anchor not in ids[path]:
                broken.append(f"{rel}: {href} (no #{anchor} in {path})")
    assert broken == []

    # code blocks: every command page and the pages that teach by example show some
    must = [p for p in pages if p.startswith("commands/") or p in (
        "index.html", "getting-started/index.html", "api/index.html", "findings/index.html",
        "tutorials/quickstart/index.html", "scaling/index.html")]
    assert [p for p in must if p != "index.html" and code_blocks[p] == 0] == []
    assert sum(code_blocks.values()) > 60
