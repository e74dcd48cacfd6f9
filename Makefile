# Every target creates or reuses .venv itself, so `make demo` / `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=
OUT ?= runs/demo

.PHONY: install demo test test-fast bench browser web-runtime clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, pinned: pip takes them from this machine's disk.
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium for the web-page test (installed once; skipped if already there).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q chromium) >/dev/null || echo "WARNING: could not install chromium; the web-page test will be skipped"

# onnxruntime-web for the page's in-browser mode (pinned, ~15 MB, fetched with npm, not committed):
# served by our own server so the page works offline; without npm the browser-mode test is skipped.
web-runtime: $(STAMP)
	$(BIN)/python scripts/fetch_onnxruntime_web.py || echo "WARNING: could not fetch onnxruntime-web; the page's in-browser mode is unavailable"

demo: $(STAMP)
	$(BIN)/covid-cxr demo $(if $(DATA),--data "$(DATA)") --out $(OUT)

test: $(STAMP) browser web-runtime
	$(BIN)/python -m pytest -q

# The unit tier: under a minute, no ../shared/data (tiny generated images, random weights, 64 px);
# its few slower tests (marked slow: fuzzing, audit, fine-tuning) run in `make test`.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_serve.py

clean:
	rm -rf runs .pytest_cache
