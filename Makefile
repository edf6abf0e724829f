# The whole set-up on a fresh machine is `make demo` or `make test`: each creates .venv if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
OUT    ?= demo_out
PYTEST_ARGS ?=

.PHONY: install demo test test-fast browser clean

install: $(VENV)/.installed

# Debian's Chromium for the HTML report's browser test (Playwright drives it; it never downloads a
# browser). Installed when we are root and it is missing; otherwise that test is skipped locally.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "chromium not installed: the browser test will be skipped"; }

$(VENV)/.installed: pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-dev.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints-dev.txt -e ".[torch,dev]"
	touch $@

demo: install
	$(VENV)/bin/camlens demo --out $(OUT)

test: install browser
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
