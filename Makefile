# `make test` and `make demo` do all the set-up on a fresh machine: create .venv, install the
# project with the pinned versions of constraints.txt, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint demo pictures install bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: a bare timm install would pull a CUDA torch of its own choosing
	$(PY) -m pip install -q -c constraints.txt torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/aptvit demo

# the README's picture (docs/results/layout.png, its numbers in docs/results/layout.json) and the demo's layouts (aptvit-demo/)
pictures: $(STAMP)
	$(PY) benchmarks/pictures.py --demo aptvit-demo --hero docs/results/layout.png

bench: $(STAMP)
	$(PY) benchmarks/bench_layout.py
	$(PY) benchmarks/bench_model.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis aptvit-demo
