# The README's commands: `make demo` (the main job), `make test` (the whole test suite), `make app` (the web page).
# Each sets itself up on a fresh machine: a .venv with the CPU build of torch, then the project.
VENV ?= .venv
PY := $(VENV)/bin/python
export TRANSFORMERS_VERBOSITY := error
export PYTHONUNBUFFERED := 1
export NO_MKDOCS_2_WARNING := 1

.PHONY: install demo app test lint docs clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test,docs,app]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/demo.py --output out/demo.png

app: install  # the page on http://127.0.0.1:7860; MODEL=repo-or-folder PORT=N to change
	$(PY) examples/app.py $(if $(MODEL),--model $(MODEL)) $(if $(PORT),--port $(PORT))

lint: install
	$(VENV)/bin/ruff check src tests examples benchmarks

docs: install
	$(VENV)/bin/mkdocs build --strict -d site  # not -q: it hides the warnings that --strict counts

test: install lint docs
	$(PY) -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) site out
