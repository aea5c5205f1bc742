# Every target installs what it needs first, so each is one command on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,verify,plan]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q -n 2 tests

lint: install
	$(VENV)/bin/ruff check .

demo: install
	$(VENV)/bin/eureka-jax demo --workdir $(WORKDIR)

bench: install
	$(PY) benchmarks/forward.py
	$(PY) benchmarks/sampler.py
	$(PY) benchmarks/rewards.py
	$(PY) benchmarks/train_step.py

clean:
	rm -rf $(VENV) runs .pytest_cache
