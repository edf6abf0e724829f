# The whole set-up on a fresh machine is `make demo` or `make test`: each creates .venv if missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
OUT    ?= demo_out
PYTEST_ARGS ?=

.PHONY: install demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-dev.txt torch torchvision
	$(PY) -m pip install --quiet -c constraints-dev.txt -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/camlens demo --out $(OUT)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
