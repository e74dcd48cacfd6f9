# Every target creates or reuses .venv itself, so `make demo` / `make test` work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?=
OUT ?= runs/demo

# Python's bytecode cache on, even where the environment turns it off (PYTHONDONTWRITEBYTECODE):
# the tests start many Python processes, and without it each compiles every module of src/ again
# and pytest rewrites the asserts of every test module and plugin again (~3 s per process).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install install-serve lock demo test test-fast bench browser web-runtime clean

# Everything (extras serve, train, explain, test) at the exact versions of requirements.lock;
# torch==2.14.1/torchvision==0.29.1 are pinned there (pip takes them from this machine's disk).
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

# The torch-free server alone (what deploy/Dockerfile installs), in its own venv.
install-serve:
	test -x .venv-serve/bin/python || $(PY) -m venv .venv-serve
	.venv-serve/bin/pip install -q -c requirements.lock '.[serve]'

# Re-pin requirements.lock from pyproject's ranges (keeps existing pins; add --upgrade to move them).
lock: $(STAMP)
	$(BIN)/pip install -q 'uv>=0.5'
	$(BIN)/uv pip compile pyproject.toml --extra all --python-version 3.11 \
		--python-platform x86_64-manylinux_2_35 --no-header --annotation-style line -q -o requirements.lock

# Debian's chromium for the web-page test (installed once). In CI (CI set) a failed install fails
# the target, and tests/serve/test_web.py fails rather than skips without the browser.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q chromium) >/dev/null || { echo "could not install chromium"; \
		if [ -n "$$CI" ]; then exit 1; else echo "WARNING: the web-page test will be skipped"; fi; }

# onnxruntime-web for the page's in-browser mode (pinned, ~15 MB, fetched with npm, not committed):
# served by our own server so the page works offline; without npm the browser-mode test is skipped.
web-runtime: $(STAMP)
	$(BIN)/python scripts/fetch_onnxruntime_web.py || echo "WARNING: could not fetch onnxruntime-web; the page's in-browser mode is unavailable"

demo: $(STAMP)
	$(BIN)/covid-cxr demo $(if $(DATA),--data "$(DATA)") --out $(OUT)

test: $(STAMP) browser web-runtime
	$(BIN)/python -m pytest -q

# The unit tier: under a minute, no ../shared/data (tiny generated images, random weights, 64 px),
# on both cores (pytest-xdist); its slower tests (marked slow: fuzzing, audit, fine-tuning, lung
# U-Net training, exports) run in `make test`.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist worksteal tests/unit -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_serve.py

clean:
	rm -rf runs .pytest_cache
