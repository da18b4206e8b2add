# The README's two commands: `make demo` (the main job) and `make test` (the whole test suite).
# Each sets itself up on a fresh machine: a .venv with the CPU build of torch, then the project.
VENV ?= .venv
PY := $(VENV)/bin/python
export TRANSFORMERS_VERBOSITY := error
export PYTHONUNBUFFERED := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: install demo test lint docs clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,docs]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py --output out/demo.png

lint: install
	$(VENV)/bin/ruff check src tests examples benchmarks

docs: install
	$(VENV)/bin/mkdocs build --strict -d site  # not -q: it hides the warnings that --strict counts

test: install lint docs
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) site out
